"""DNS for test networks: the records `mkmailimage dns` prints, served by a real unbound.

`unbound_zone_config(zones)` makes unbound config lines that answer a site's zone authoritatively
(local-zone static + local-data); the two-VM harness drops them into each guest's unbound, and
`LocalDns` runs the host's unbound on a loopback port with the same data so tests can check
signatures independently (dkimpy, pyspf) against exactly what the guests see.
"""
from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .dnsrecords import Record
from .errors import ToolMissing


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def unbound_zone_config(zones: dict[str, list[Record]], refuse_others: bool = False) -> str:
    """`zones`: zone name -> records. With `refuse_others`, every name outside these zones gets
    NXDOMAIN at once (a test VM has no upstream: waiting for time-outs would slow rspamd)."""
    lines = ["server:"]
    if refuse_others:
        lines.append('    local-zone: "." static')
    for zone, records in zones.items():
        lines.append(f'    local-zone: "{zone.rstrip(".")}." static')
        for r in records:
            if r.rtype == "PTR":
                ip = ipaddress.ip_address(_ptr_to_ip(r.name))
                # the documentation ranges are unbound default zones: make ours authoritative
                lines.append(f'    local-zone: "{r.name}" static')
                lines.append(f'    local-data-ptr: "{ip} {r.value}"')
                continue
            lines.append(f"    local-data: '{r.name} 300 IN {r.rtype} {r.rdata()}'")
    return "\n".join(lines) + "\n"


def _ptr_to_ip(name: str) -> str:
    labels = name.rstrip(".").split(".")
    if labels[-2:] == ["in-addr", "arpa"]:
        return ".".join(reversed(labels[:-2]))
    nibbles = "".join(reversed(labels[:-2]))
    return ":".join(nibbles[i:i + 4] for i in range(0, 32, 4))


def _free_udp_tcp_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                    return port
                except OSError:
                    continue


class LocalDns:
    """The host's unbound on 127.0.0.1:port answering only the given zones (no recursion out)."""

    def __init__(self, zones: dict[str, list[Record]]):
        if not shutil.which("unbound"):
            raise ToolMissing("unbound", "unbound")
        self.zones = zones
        self.port = _free_udp_tcp_port()
        self._dir = Path(tempfile.mkdtemp(prefix="mkmailimage-dns-"))
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "LocalDns":
        conf = self._dir / "unbound.conf"
        conf.write_text(
            "server:\n"
            "    interface: 127.0.0.1\n"
            f"    port: {self.port}\n"
            "    do-ip6: no\n"
            "    username: \"\"\n"
            f"    directory: \"{self._dir}\"\n"
            "    chroot: \"\"\n"
            "    pidfile: \"\"\n"
            "    use-syslog: no\n"
            f"    logfile: \"{self._dir}/unbound.log\"\n"
            "    access-control: 127.0.0.0/8 allow\n"
            + unbound_zone_config(self.zones, refuse_others=True).removeprefix("server:\n"))
        subprocess.run(["unbound-checkconf", str(conf)], check=True, capture_output=True)
        self._proc = subprocess.Popen(["unbound", "-d", "-c", str(conf)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        import dns.message
        import dns.query
        deadline = time.monotonic() + timeout
        q = dns.message.make_query("localhost.", "A")
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"unbound exited: {self._proc.stderr.read().decode()}")
            try:
                dns.query.udp(q, "127.0.0.1", port=self.port, timeout=0.5)
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("unbound did not answer within 10 s")

    def resolver(self):
        import dns.resolver
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.port
        r.lifetime = 5
        return r

    def txt(self, name: str) -> bytes | None:
        """dkimpy-style lookup: the TXT text of `name` (strings joined), or None."""
        import dns.resolver
        try:
            answer = self.resolver().resolve(name if isinstance(name, str) else name.decode(), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    def __exit__(self, *exc) -> None:
        if self._proc:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
