"""Real mail clients for tests and `mkmailimage test`: swaks for SMTP, imaplib for IMAPS, and an
Authentication-Results parser. Talks to guests through their host port forwards."""
from __future__ import annotations

import email
import email.policy
import imaplib
import re
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass
from functools import cache

from .errors import MkMailImageError, ToolMissing


@dataclass
class SwaksResult:
    returncode: int
    transcript: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def swaks(server: str, port: int, *, sender: str, to: str, tls: str | None = None,
          auth: tuple[str, str] | None = None, headers: dict[str, str] | None = None,
          body: str = "mkmailimage test message", data: bytes | None = None,
          helo: str = "client.invalid", timeout: int = 60) -> SwaksResult:
    """Send one message with swaks. tls: None (plain), 'starttls' (required) or 'smtps'."""
    if not shutil.which("swaks"):
        raise ToolMissing("swaks", "swaks")
    if tls and not swaks_supports_tls():
        # swaks only Recommends its TLS module: without it every TLS session "fails" at the client
        raise ToolMissing("swaks TLS support (perl Net::SSLeay)", "libnet-ssleay-perl")
    cmd = ["swaks", "--server", server, "--port", str(port), "--from", sender, "--to", to,
           "--helo", helo, "--timeout", str(timeout), "--hide-informational"]
    if tls == "starttls":
        cmd.append("--tls")
    elif tls == "smtps":
        cmd.append("--tls-on-connect")
    if auth:
        cmd += ["--auth", "PLAIN", "--auth-user", auth[0], "--auth-password", auth[1]]
    if data is not None:
        cmd += ["--data", "-"]
    else:
        for k, v in (headers or {}).items():
            cmd += ["--header", f"{k}: {v}"]
        cmd += ["--body", body]
    r = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout + 30)
    return SwaksResult(r.returncode, (r.stdout + r.stderr).decode(errors="replace"))


@cache
def swaks_supports_tls() -> bool:
    r = subprocess.run(["swaks", "--support"], capture_output=True, text=True, timeout=30)
    return "=== TLS supported" in r.stdout + r.stderr


class Imap:
    """IMAPS session to a guest (self-signed certificate: encryption without verification)."""

    def __init__(self, host: str, port: int, user: str, password: str):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.conn = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=30)
        self.conn.login(user, password)

    def __enter__(self) -> "Imap":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.conn.logout()
        except (imaplib.IMAP4.error, OSError):
            pass

    def folders(self) -> list[str]:
        typ, data = self.conn.list()
        out = []
        for line in data:
            m = re.match(rb'\(.*?\) "?[^ "]*"? "?([^"]*)"?$', line)
            if m:
                out.append(m.group(1).decode())
        return out

    def messages(self, folder: str = "INBOX") -> list[bytes]:
        typ, _ = self.conn.select(f'"{folder}"', readonly=True)
        if typ != "OK":
            return []
        typ, data = self.conn.search(None, "ALL")
        out = []
        for num in data[0].split():
            typ, msg = self.conn.fetch(num, "(BODY.PEEK[])")
            out.append(msg[0][1])
        return out

    def find(self, subject: str, folder: str = "INBOX") -> bytes | None:
        typ, _ = self.conn.select(f'"{folder}"', readonly=True)
        if typ != "OK":
            return None
        typ, data = self.conn.search(None, "SUBJECT", f'"{subject}"')
        nums = data[0].split()
        if not nums:
            return None
        typ, msg = self.conn.fetch(nums[-1], "(BODY.PEEK[])")
        return msg[0][1]

    def header_values(self, header: str, folder: str = "INBOX") -> list[str]:
        """One header of every message in a folder (cheap: headers only)."""
        typ, _ = self.conn.select(f'"{folder}"', readonly=True)
        if typ != "OK":
            return []
        typ, data = self.conn.search(None, "ALL")
        nums = data[0].split()
        if not nums:
            return []
        typ, items = self.conn.fetch(b",".join(nums), f"(BODY.PEEK[HEADER.FIELDS ({header.upper()})])")
        out = []
        for item in items:
            if isinstance(item, tuple):
                value = item[1].decode(errors="replace").split(":", 1)
                if len(value) == 2:
                    out.append(value[1].strip())
        return out


def wait_for_message(connect, subject: str, folders=("INBOX",), timeout: float = 180) -> tuple[str, bytes]:
    """Poll IMAP until a message with `subject` appears in one of `folders`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            with connect() as imap:
                for folder in folders:
                    msg = imap.find(subject, folder)
                    if msg:
                        return folder, msg
        except (imaplib.IMAP4.error, OSError) as e:
            last_error = e
        time.sleep(2)
    raise MkMailImageError(f"no message with subject {subject!r} in {folders} within {timeout:.0f} s"
                           + (f" (last IMAP error: {last_error})" if last_error else ""))


def auth_results(raw: bytes) -> dict[str, str]:
    """Parse the Authentication-Results header(s): {'dkim': 'pass', 'spf': 'pass', ...}."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    out: dict[str, str] = {}
    for value in msg.get_all("Authentication-Results") or []:
        flat = " ".join(value.split())
        for method, result in re.findall(r"\b(dkim|spf|dmarc|arc)=([a-z]+)", flat):
            out.setdefault(method, result)
    return out
