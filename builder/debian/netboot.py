"""The Debian installer's netboot kernel and initrd, fetched the way apt would verify them.

The archive does not serve installer images under dists/*/installer-amd64 on every mirror, so
they come from the `debian-installer-N-netboot-amd64` package instead. Chain of trust:
InRelease (OpenPGP-signed, checked with gpgv against the Debian archive keyring) -> the sha256
of Packages.xz -> the sha256 and size of the .deb -> linux and initrd.gz extracted from it.
Downloads are kept content-addressed (by sha256) in the cache and checked again on every use,
so a corrupted cached file is noticed and fetched anew.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import paths
from ..errors import BuildError, ToolMissing
from ..cache import sha256_file as file_sha256

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Debian release number of each suite the installer package exists for.
SUITE_RELEASE = {"bookworm": 12, "trixie": 13}
# Where the text-mode (serial-friendly) installer sits inside the package.
IMAGE_DIR = "usr/lib/debian-installer/images/{release}/amd64/text/debian-installer/amd64"
TIMEOUT = 60


class NetbootVerifyError(BuildError):
    """A signature or checksum in the netboot chain did not match."""


class NetbootDownloadError(BuildError):
    """A file of the netboot chain could not be downloaded."""


@dataclass(frozen=True)
class Netboot:
    kernel: Path
    initrd: Path
    package: str
    version: str
    deb_sha256: str


def package_name(suite: str) -> str:
    if suite not in SUITE_RELEASE:
        raise BuildError(f"the preseed installer supports suites {', '.join(SUITE_RELEASE)}; "
                         f"debian.suite is '{suite}' (use installer: bootstrap)")
    return f"debian-installer-{SUITE_RELEASE[suite]}-netboot-amd64"


def fetch_netboot(mirror: str, suite: str = "trixie", cache: Path | None = None,
                  keyring: Path = KEYRING, log: Callable[[str], None] = print) -> Netboot:
    """Return the verified kernel and initrd of the suite's netboot package from `mirror`."""
    cache = Path(cache or paths.cache_dir())
    mirror = mirror.rstrip("/")
    package = package_name(suite)
    release = verified_release(mirror, suite, keyring)
    stanza = _find_package(mirror, suite, release, package, cache)
    deb = fetch_verified(f"{mirror}/{stanza['Filename']}", stanza["SHA256"], int(stanza["Size"]),
                         cache, log)
    kernel, initrd = _extract(deb, stanza["SHA256"], SUITE_RELEASE[suite], cache)
    log(f"netboot: {package} {stanza['Version']} (sha256 {stanza['SHA256'][:16]}...) verified")
    return Netboot(kernel, initrd, package, stanza["Version"], stanza["SHA256"])


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
            raise NetbootVerifyError(f"{url}: signature not valid for {keyring}: "
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


def _find_package(mirror: str, suite: str, release: dict, package: str, cache: Path) -> dict:
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
                        raise NetbootVerifyError(f"{mirror}/dists/{suite}/{name}: {package} has no {key}")
                return stanza
    raise NetbootDownloadError(f"{package} not found in {', '.join(tried) or 'any Packages.xz'} "
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
            raise NetbootVerifyError(f"{url}: got {n} bytes with sha256 {h.hexdigest()}, "
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
        raise NetbootDownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise NetbootDownloadError(f"{url}: {getattr(e, 'reason', e)}") from None


def _download_bytes(url: str) -> bytes:
    with _open(url) as resp:
        return resp.read()


# -- extraction ----------------------------------------------------------------------------------

def _extract(deb: Path, deb_sha256: str, release: int, cache: Path) -> tuple[Path, Path]:
    """linux and initrd.gz from the package, kept beside a list of their sha256 so a damaged
    extracted copy is noticed too."""
    if not shutil.which("dpkg-deb"):
        raise ToolMissing("dpkg-deb", "dpkg")
    out = Path(cache) / "netboot" / deb_sha256
    sums = out / "SHA256SUMS"
    kernel, initrd = out / "linux", out / "initrd.gz"
    if sums.exists() and kernel.exists() and initrd.exists():
        want = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())
        if all(want.get(p.name) == file_sha256(p) for p in (kernel, initrd)):
            return kernel, initrd
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{deb_sha256[:16]}.", dir=out.parent))
    try:
        inner = IMAGE_DIR.format(release=release)
        members = [f"./{inner}/linux", f"./{inner}/initrd.gz"]
        fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        tar = subprocess.run(["tar", "-x", "-C", str(tmp), *members], stdin=fsys.stdout,
                             capture_output=True, text=True)
        fsys.stdout.close()
        if fsys.wait() != 0 or tar.returncode != 0:
            raise NetbootVerifyError(f"{deb}: could not extract {', '.join(members)}: {tar.stderr.strip()}")
        for name in ("linux", "initrd.gz"):
            os.replace(tmp / inner / name, tmp / name)
        shutil.rmtree(tmp / "usr")
        (tmp / "SHA256SUMS").write_text("".join(f"{file_sha256(tmp / n)}  {n}\n" for n in ("linux", "initrd.gz")))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return kernel, initrd
