"""OpenBSD release keys from Debian's `signify-openbsd-keys` package of a newer suite.

Debian 12's signify-openbsd-keys stops at OpenBSD 7.3; trixie's ships the keys up to 7.8. When
neither the site nor the host has the key a release needs, the builder takes it from trixie's
package, fetched from the host's (or the site's) Debian mirror with the chain builder.debian
.archive checks for every .deb: InRelease (gpgv, debian-archive-keyring) -> the sha256 of
main/binary-amd64/Packages.xz -> the sha256 and size of the .deb (kept content-addressed in the
cache, hashed again on every use). The key is read from the verified .deb's data.tar.* with
Python (ar + tarfile; `dpkg-deb --fsys-tarfile` for compressions tarfile lacks) on every use and
written under the cache as `openbsd/keys/<sha256 of the key>/<key name>`.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import paths
from ..debian import archive
from ..errors import BuildError, ToolMissing

SUITE = "trixie"
PACKAGE = "signify-openbsd-keys"
KEY_DIR = "usr/share/signify-openbsd-keys"


class DebianKeyError(BuildError):
    """The key could not be had from Debian's package (not in it, or the chain failed)."""


@dataclass(frozen=True)
class FetchedKey:
    path: Path
    package_version: str
    deb_sha256: str
    suite: str = SUITE

    @property
    def source(self) -> str:
        return (f"Debian {self.suite} {PACKAGE} {self.package_version} "
                f"(.deb sha256 {self.deb_sha256})")


def keys_dir(cache: Path | None = None) -> Path:
    d = Path(cache or paths.cache_dir()) / "openbsd" / "keys"
    d.mkdir(parents=True, exist_ok=True)
    return d


def fetch_key(name: str, mirror: str, suite: str = SUITE, cache: Path | None = None,
              log: Callable[[str], None] = lambda _: None) -> FetchedKey:
    """`name` (e.g. openbsd-78-base.pub) from the suite's verified signify-openbsd-keys .deb.
    The key is read from the .deb (itself hashed again) on every call, so a damaged copy in
    keys_dir() is simply written anew."""
    deb, stanza = archive.fetch_deb(mirror, suite, PACKAGE, cache=cache, log=log)
    data = deb_member(deb, f"{KEY_DIR}/{name}")
    if data is None:
        raise DebianKeyError(f"{suite}'s {PACKAGE} {stanza['Version']} does not ship {KEY_DIR}/{name}")
    digest = hashlib.sha256(data).hexdigest()
    dest = keys_dir(cache) / digest / name
    if not (dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == digest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=dest.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    log(f"signify key: {name} from {suite}'s {PACKAGE} {stanza['Version']} "
        f"(sha256 {stanza['SHA256'][:16]}..., verified)")
    return FetchedKey(dest, stanza["Version"], stanza["SHA256"], suite)


# -- reading a .deb ----------------------------------------------------------------------------

def ar_members(deb: Path) -> dict[str, bytes]:
    """The members of an ar(1) archive (a .deb): {name: content}."""
    raw = Path(deb).read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise DebianKeyError(f"{deb}: not an ar archive (.deb)")
    out, pos = {}, 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        if header[58:60] != b"`\n":
            raise DebianKeyError(f"{deb}: damaged ar member header at byte {pos}")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        out[name] = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def data_tar(deb: Path) -> bytes:
    """The uncompressed data.tar of a .deb."""
    members = ar_members(deb)
    for name, mode in (("data.tar.xz", "xz"), ("data.tar.gz", "gz"), ("data.tar.bz2", "bz2"),
                       ("data.tar", "")):
        if name in members:
            if not mode:
                return members[name]
            return {"xz": lzma.decompress, "gz": gzip.decompress, "bz2": bz2.decompress}[mode](members[name])
    if not any(n.startswith("data.tar") for n in members):
        raise DebianKeyError(f"{deb}: no data.tar member")
    if not shutil.which("dpkg-deb"):   # data.tar.zst and whatever else dpkg knows
        raise ToolMissing("dpkg-deb", "dpkg")
    r = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True)
    if r.returncode != 0:
        raise DebianKeyError(f"{deb}: dpkg-deb --fsys-tarfile failed: "
                             f"{r.stderr.decode(errors='replace').strip()}")
    return r.stdout


def deb_member(deb: Path, path: str) -> bytes | None:
    """A regular file of the .deb's data (path without ./), or None when it has none there."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data_tar(deb)), mode="r:") as t:
            for m in t:
                if m.isfile() and m.name.removeprefix("./") == path.lstrip("/"):
                    return t.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DebianKeyError(f"{deb}: cannot read data.tar: {e}") from None
    return None
