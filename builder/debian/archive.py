"""Files of a Debian archive, fetched the way apt verifies them; shared by the netboot installer
(builder.debian.netboot), the lock file (builder.lock) and the OpenBSD release keys
(builder.openbsd.debkeys).

Chain of trust: dists/SUITE/InRelease (OpenPGP-signed, checked with gpgv against the Debian
archive keyring) -> the sha256 and size of main/binary-amd64/Packages.xz it lists -> the sha256
and size of a .deb in that index. Downloads are kept content-addressed (by sha256) under the
cache's downloads/sha256/ and hashed again on every use, so a corrupted cached file is noticed
and fetched anew.
"""
from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from .. import paths
from ..cache import sha256_file as file_sha256
from ..errors import BuildError, ToolMissing

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
TIMEOUT = 60


class ArchiveVerifyError(BuildError):
    """A signature or checksum in the archive's chain did not match."""


class ArchiveDownloadError(BuildError):
    """A file of the archive could not be downloaded or is not in it."""


def fetch_deb(mirror: str, suite: str, package: str, cache: Path | None = None,
              keyring: Path = KEYRING, log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The verified .deb of `package` in SUITE's main (amd64 or all) and its Packages stanza."""
    cache = Path(cache or paths.cache_dir())
    mirror = mirror.rstrip("/")
    release = verified_release(mirror, suite, keyring)
    stanza = find_package(mirror, suite, release, package, cache)
    deb = fetch_verified(f"{mirror}/{stanza['Filename']}", stanza["SHA256"], int(stanza["Size"]),
                         cache, log)
    return deb, stanza


# -- Release and Packages ---------------------------------------------------------------------

def verified_release(mirror: str, suite: str, keyring: Path = KEYRING) -> dict:
    """Download dists/SUITE/InRelease, check its signature, return its fields (only the signed
    text is parsed: gpgv writes it out)."""
    if not shutil.which("gpgv"):
        raise ToolMissing("gpgv", "gpgv")
    if not Path(keyring).exists():
        raise ToolMissing(str(keyring), "debian-archive-keyring")
    url = f"{mirror}/dists/{suite}/InRelease"
    data = _download_bytes(url)
    with tempfile.TemporaryDirectory(prefix="mkmailimage-inrelease-") as tmp:
        signed, out = Path(tmp) / "InRelease", Path(tmp) / "Release"
        signed.write_bytes(data)
        r = subprocess.run(["gpgv", "--keyring", str(keyring), "--output", str(out), str(signed)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ArchiveVerifyError(f"{url}: signature not valid for {keyring}: "
                                     f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'gpgv failed'}")
        return parse_release(out.read_text(errors="replace"))


def parse_release(text: str) -> dict:
    """Fields of a Release file; SHA256 becomes {path: (sha256, size)}."""
    fields: dict = {}
    current = None
    for line in text.splitlines():
        if line.startswith(" ") and current == "SHA256":
            parts = line.split()
            if len(parts) == 3:
                fields["SHA256"][parts[2]] = (parts[0], int(parts[1]))
        elif ":" in line and not line.startswith(" "):
            current, _, value = line.partition(":")
            fields[current] = {} if current == "SHA256" else value.strip()
    return fields


def parse_packages(text: str):
    """Yield each stanza of a Packages file as a dict (continuation lines dropped)."""
    for block in text.split("\n\n"):
        stanza = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                stanza[key] = value.strip()
        if stanza:
            yield stanza


def packages_indexes(release: dict, arch: str = "amd64") -> list[str]:
    """The main Packages.xz files that list ARCH's packages and the arch:all ones. With
    `No-Support-for-Architecture-all: Packages` (trixie on), arch:all packages are listed in each
    binary-ARCH index and binary-all/Packages is not for clients: it is not even guaranteed to
    match its signed hash on every mirror, so it is not fetched."""
    names = [f"main/binary-{arch}/Packages.xz"]
    if release.get("No-Support-for-Architecture-all", "").strip() != "Packages":
        names.append("main/binary-all/Packages.xz")
    return [n for n in names if n in release.get("SHA256", {})]


def find_package(mirror: str, suite: str, release: dict, package: str, cache: Path) -> dict:
    """The Packages stanza of `package` (Filename, SHA256, Size, Version checked present)."""
    tried = []
    for name in packages_indexes(release):
        sha, size = release["SHA256"][name]
        path = fetch_verified(f"{mirror}/dists/{suite}/{name}", sha, size, cache, lambda _: None)
        text = lzma.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        tried.append(name)
        for stanza in parse_packages(text):
            if stanza.get("Package") == package:
                for key in ("Filename", "SHA256", "Size", "Version"):
                    if key not in stanza:
                        raise ArchiveVerifyError(f"{mirror}/dists/{suite}/{name}: {package} has no {key}")
                return stanza
    raise ArchiveDownloadError(f"{package} not found in {', '.join(tried) or 'any Packages.xz'} "
                               f"of {mirror}/dists/{suite}")


# -- content-addressed downloads ------------------------------------------------------------

def blob_path(cache: Path, sha256: str) -> Path:
    return Path(cache) / "downloads" / "sha256" / sha256


def fetch_verified(url: str, sha256: str, size: int, cache: Path,
                   log: Callable[[str], None] = print) -> Path:
    """The cached file with this sha256, downloaded (and checked) when absent or corrupt."""
    dest = blob_path(cache, sha256)
    if dest.exists():
        if dest.stat().st_size == size and file_sha256(dest) == sha256:
            return dest
        log(f"cache: {dest} does not match its sha256; fetching {url} again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{sha256[:16]}.", dir=dest.parent)
    try:
        h = hashlib.sha256()
        n = 0
        with os.fdopen(fd, "wb") as out, _open(url) as resp:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
                out.write(chunk)
        if n != size or h.hexdigest() != sha256:
            raise ArchiveVerifyError(f"{url}: got {n} bytes with sha256 {h.hexdigest()}, "
                                     f"the signed index says {size} bytes with sha256 {sha256}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _open(url: str):
    try:
        return urllib.request.urlopen(url, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        raise ArchiveDownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ArchiveDownloadError(f"{url}: {getattr(e, 'reason', e)}") from None


def _download_bytes(url: str) -> bytes:
    with _open(url) as resp:
        return resp.read()
