"""A pass-through mirror for the installer VM.

The install VM runs with QEMU user networking restricted (restrict=on): it reaches only what
the builder forwards to it. Instead of opening the network, the builder serves the Debian
archive itself at an address the guest can reach, fetching each file from the real mirror as
it is asked for. Side effects that matter: the guest needs no DNS, the installed system never
sees the build host's mirror name, and every file the installer could not get is recorded
with its real URL and status, so a failed download is reported by name.

Index files whose sha256 the builder knows from the suite's signed InRelease (`signed`) are
hashed as they pass, and Release.gpg is checked against the Release it signs: a mirror whose
files do not match their signatures makes the installer refuse them with only "Downloading a
file failed", so the proxy records which file it was and why.

    with MirrorProxy({"/debian": "http://mirror/debian"}, signed={path: sha256}) as px:
        px.port, px.requests, px.failed()
"""
from __future__ import annotations

import hashlib
import http.server
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

TIMEOUT = 120


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    path: str
    status: int
    url: str | None         # the upstream URL, None when the path matched no route
    problem: str | None = None   # why a delivered file is still a failure

    @property
    def failed(self) -> bool:
        return self.status >= 400 or self.problem is not None

    def describe(self) -> str:
        return f"{self.url or self.path} ({self.problem or f'HTTP {self.status}'})"


def _detached_signature_problem(release: bytes, signature: bytes, keyring: Path) -> str | None:
    with tempfile.TemporaryDirectory(prefix="mkmailimage-release-") as tmp:
        (Path(tmp) / "Release").write_bytes(release)
        (Path(tmp) / "Release.gpg").write_bytes(signature)
        r = subprocess.run(["gpgv", "--keyring", str(keyring), str(Path(tmp) / "Release.gpg"),
                            str(Path(tmp) / "Release")], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    said = [line.removeprefix("gpgv: ").strip() for line in r.stderr.splitlines() if line.strip()]
    return f"does not verify the Release served with it: {said[-1] if said else 'gpgv failed'}"


class _InFlight:
    """How many requests are being served: a file is judged only after its last byte went out,
    so whoever reads the verdicts first waits for the requests still running."""

    def __init__(self):
        self._count = 0
        self._changed = threading.Condition()

    def __enter__(self):
        with self._changed:
            self._count += 1

    def __exit__(self, *exc):
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._count == 0, timeout)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "mkmailimage-mirror"
    routes: dict[str, str] = {}
    signed: dict[str, str] = {}          # proxied path -> sha256 from the signed InRelease
    keyring: Path | None = None          # checks Release.gpg against the Release served before it
    releases: dict[str, bytes] = {}
    log: list[ProxiedRequest] = []
    in_flight: _InFlight

    def do_GET(self):
        with self.in_flight:
            self._proxy(send_body=True)

    def do_HEAD(self):
        with self.in_flight:
            self._proxy(send_body=False)

    def _proxy(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        url = self._upstream(path)
        if url is None:
            self._record(path, 404, None)
            self.send_error(404, "not a proxied path")
            return
        req = urllib.request.Request(url, method="GET" if send_body else "HEAD")
        try:
            resp = urllib.request.urlopen(req, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            self._record(path, e.code, url)
            self.send_error(e.code, str(e.reason))
            return
        except (urllib.error.URLError, OSError) as e:
            self._record(path, 502, url)
            self.send_error(502, f"upstream: {getattr(e, 'reason', e)}")
            return
        with resp:
            self.send_response(resp.status)
            for header in ("Content-Type", "Content-Length", "Last-Modified", "ETag"):
                if resp.headers.get(header):
                    self.send_header(header, resp.headers[header])
            self.end_headers()
            digest, kept, complete = hashlib.sha256(), bytearray(), send_body
            # Release and Release.gpg are kept (small) to check the one against the other
            keep = path.endswith(("/Release", "/Release.gpg"))
            try:
                while send_body and (block := resp.read(1 << 16)):
                    digest.update(block)
                    if keep:
                        kept += block
                    self.wfile.write(block)
            except (BrokenPipeError, ConnectionResetError):
                complete = False            # the client left: nothing to judge
            problem = self._judge(path, digest.hexdigest(), bytes(kept)) if complete else None
            self._record(path, resp.status, url, problem)

    def _judge(self, path: str, sha256: str, kept: bytes) -> str | None:
        """Why a file delivered whole is unusable to the installer, or None."""
        want = self.signed.get(path)
        if want and sha256 != want:
            return f"sha256 {sha256[:16]}... differs from the signed InRelease's {want[:16]}..."
        if path.endswith("/Release"):
            self.releases[path] = kept
        elif path.endswith("/Release.gpg") and self.keyring and path[:-4] in self.releases:
            return _detached_signature_problem(self.releases[path[:-4]], kept, self.keyring)
        return None

    def _upstream(self, path: str) -> str | None:
        # longest prefix first: /debian-security must not match /debian
        for prefix in sorted(self.routes, key=len, reverse=True):
            if path == prefix or path.startswith(prefix + "/"):
                return self.routes[prefix].rstrip("/") + path[len(prefix):]
        return None

    def _record(self, path: str, status: int, url: str | None, problem: str | None = None) -> None:
        self.log.append(ProxiedRequest(self.command, path, status, url, problem))

    def log_message(self, format, *args):  # the build output stays clean
        pass


class MirrorProxy:
    """Context manager serving `routes` (path prefix -> upstream URL) on 127.0.0.1; `signed`
    maps proxied paths to the sha256 their signed Release gives; with `keyring`, each
    Release.gpg is checked against the Release it follows (what the installer does)."""

    def __init__(self, routes: dict[str, str], host: str = "127.0.0.1", port: int = 0,
                 signed: dict[str, str] | None = None, keyring: Path | None = None):
        self.requests: list[ProxiedRequest] = []
        self._in_flight = _InFlight()
        handler = type("Handler", (_Handler,), {"routes": dict(routes), "log": self.requests,
                                                "signed": dict(signed or {}), "keyring": keyring,
                                                "releases": {}, "in_flight": self._in_flight})
        self._httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="mkmailimage-mirror",
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def failed(self, settle: float = 60) -> list[ProxiedRequest]:
        """The requests that failed, once those still being served (up to `settle` s) are done."""
        self._in_flight.wait_idle(settle)
        return [r for r in self.requests if r.failed]

    def __enter__(self) -> "MirrorProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
