"""What the build host says about itself: its Debian mirror (used to build, never put in images)."""
from __future__ import annotations

import re
from pathlib import Path

APT_SOURCES = [Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d")]


def host_debian_mirror(roots=APT_SOURCES) -> str | None:
    """The first Debian archive URI in the host's apt sources (deb822 or one-line format).

    A Debian archive is recognised by its path ending in /debian, which also skips
    debian-security and third-party repositories."""
    for uri in _uris(roots):
        if re.match(r"^https?://[^ ]+/debian/?$", uri):
            return uri.rstrip("/")
    return None


def _uris(roots):
    files = []
    for root in roots:
        if root.is_dir():
            files += sorted(p for p in root.iterdir() if p.suffix in (".list", ".sources"))
        elif root.exists():
            files.append(root)
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            m = re.match(r"^URIs:\s*(.+)$", line, re.I)
            if m:
                yield from m.group(1).split()
                continue
            m = re.match(r"^deb(?:-src)?\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
            if m:
                yield m.group(1)
