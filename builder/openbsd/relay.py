"""`python -m builder.openbsd.relay HOST PORT`: copy stdin/stdout to and from a TCP connection.

QEMU's user network runs with restrict=on, so the installer reaches the builder's HTTP server
only through `guestfwd=tcp:10.0.2.100:80-cmd:...`, which starts one command per guest
connection with the connection on its stdin/stdout. This is that command (no netcat needed).
"""
from __future__ import annotations

import os
import selectors
import socket
import sys


def relay(host: str, port: int, fd_in: int = 0, fd_out: int = 1) -> None:
    sock = socket.create_connection((host, port), timeout=30)
    sock.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(fd_in, selectors.EVENT_READ)
    sel.register(sock, selectors.EVENT_READ)
    open_ends = 2
    while open_ends:
        for key, _ in sel.select():
            if key.fileobj == fd_in:
                data = os.read(fd_in, 65536)
                if not data:
                    sel.unregister(fd_in)
                    sock.shutdown(socket.SHUT_WR)
                    open_ends -= 1
                else:
                    sock.sendall(data)
            else:
                data = sock.recv(65536)
                if not data:
                    sel.unregister(sock)
                    open_ends -= 1
                    if fd_in in [k.fileobj for k in sel.get_map().values()]:
                        sel.unregister(fd_in)   # the server is done; stop reading the guest
                        open_ends -= 1
                else:
                    os.write(fd_out, data)
    sock.close()


if __name__ == "__main__":
    relay(sys.argv[1], int(sys.argv[2]))
