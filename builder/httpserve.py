"""A tiny HTTP server for installers: serves one directory read-only on 127.0.0.1 (reached from
the guest through QEMU user networking at 10.0.2.2) and records what was asked for, so a driver
can tell which files the installer fetched and which it missed.

Query strings are ignored (OpenBSD asks for `install.conf?path=...`).
"""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from urllib.parse import urlsplit


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, server_log=None, **kwargs):
        self._server_log = server_log
        super().__init__(*args, **kwargs)

    def send_head(self):
        self.path = urlsplit(self.path).path
        return super().send_head()

    def log_request(self, code="-", size="-"):
        if self._server_log is not None:
            self._server_log.append((self.command, urlsplit(self.path).path, int(code) if str(code).isdigit() else code))

    def log_message(self, format, *args):  # keep the build output clean
        pass

    def list_directory(self, path):
        self.send_error(403, "no directory listings")
        return None


class FileServer:
    """Context manager: `with FileServer(dir) as srv: srv.port, srv.requests`."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root)
        self.requests: list[tuple[str, str, int]] = []   # (method, path, status)
        handler = functools.partial(_Handler, directory=str(self.root), server_log=self.requests)
        self._httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="mkmailimage-http", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def failed(self) -> list[str]:
        """Paths asked for that were not served (404 and other errors)."""
        return [p for _, p, code in self.requests if isinstance(code, int) and code >= 400]

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
