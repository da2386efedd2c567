"""The image's own apt sources: the site's mirror, else the default Debian's apt documents.

Never the build host's mirror. The default is read from the image tree's
/usr/share/doc/apt/examples/sources.list (shipped by the image's apt), so no mirror host name
is written in this project."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import BuildError

# trixie's apt documents its default in deb822 form; older ones in one-line form
EXAMPLES = ["usr/share/doc/apt/examples/debian.sources", "usr/share/doc/apt/examples/sources.list"]


def _example_uris(text: str):
    """(uri, first suite) pairs of the active or commented-out entries of an example file."""
    uri = None
    for line in text.splitlines():
        m = re.match(r"^\s*#?\s*deb\s+(?:\[[^\]]*\]\s+)?(https?://\S+)\s+(\S+)", line)
        if m:
            yield m.group(1), m.group(2)
            continue
        m = re.match(r"^\s*URIs:\s*(https?://\S+)", line)
        if m:
            uri = m.group(1)
            continue
        m = re.match(r"^\s*Suites:\s*(\S+)", line)
        if m and uri:
            yield uri, m.group(1)
            uri = None


def documented_mirrors(tree: Path) -> tuple[str, str | None]:
    """(archive URI, security URI or None) from the example sources of the tree's apt."""
    files = [Path(tree) / e for e in EXAMPLES if (Path(tree) / e).exists()]
    if not files:
        raise BuildError(f"apt sources: none of {', '.join(EXAMPLES)} is in the image, cannot learn "
                         "Debian's default mirror; set debian.mirror in the site file")
    f = files[0]
    archive = security = None
    for uri, suite in _example_uris(f.read_text()):
        uri = uri.rstrip("/")
        if uri.endswith("-security") or suite.endswith("-security") or "/debian-security" in uri:
            security = security or uri
        elif uri.endswith("/debian"):
            archive = archive or uri
    if not archive:
        raise BuildError(f"apt sources: no Debian archive line in {f}; set debian.mirror in the site file")
    return archive, security


def security_from_archive(archive: str) -> str:
    return re.sub(r"/debian$", "/debian-security", archive)


def sources_file(tree: Path, suite: str, mirror: str | None, security_mirror: str | None) -> str:
    """deb822 text for /etc/apt/sources.list.d/debian.sources."""
    doc_archive, doc_security = documented_mirrors(tree)
    archive = mirror or doc_archive
    # a site mirror need not carry the security suites: only an explicit security_mirror
    # replaces the documented one
    security = security_mirror or doc_security or security_from_archive(doc_archive)
    components = "main"
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    stanzas = [
        f"Types: deb\nURIs: {archive}\nSuites: {suite} {suite}-updates\n"
        f"Components: {components}\nSigned-By: {keyring}\n",
    ]
    if suite not in ("sid", "unstable"):
        stanzas.append(f"Types: deb\nURIs: {security}\nSuites: {suite}-security\n"
                       f"Components: {components}\nSigned-By: {keyring}\n")
    return "\n".join(stanzas)
