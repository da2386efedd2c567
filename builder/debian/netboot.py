"""The Debian installer's netboot kernel and initrd, fetched the way apt would verify them.

The archive does not serve installer images under dists/*/installer-amd64 on every mirror, so
they come from the `debian-installer-N-netboot-amd64` package instead, fetched with the chain
builder.debian.archive checks (InRelease signed with the Debian archive keyring -> the sha256 of
Packages.xz -> the sha256 and size of the .deb, kept content-addressed in the cache and checked
again on every use); linux and initrd.gz are extracted from it.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import paths
from ..errors import BuildError, ToolMissing
# The archive chain lives in builder.debian.archive; these names stay importable from here.
from .archive import (KEYRING, TIMEOUT, blob_path, fetch_verified, file_sha256,  # noqa: F401
                      packages_indexes, parse_packages, parse_release, verified_release)
from .archive import ArchiveDownloadError as NetbootDownloadError  # noqa: F401
from .archive import ArchiveVerifyError as NetbootVerifyError
from .archive import fetch_deb

# Debian release number of each suite the installer package exists for.
SUITE_RELEASE = {"bookworm": 12, "trixie": 13}
# Where the text-mode (serial-friendly) installer sits inside the package.
IMAGE_DIR = "usr/lib/debian-installer/images/{release}/amd64/text/debian-installer/amd64"


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
    package = package_name(suite)
    deb, stanza = fetch_deb(mirror, suite, package, cache, keyring, log)
    kernel, initrd = _extract(deb, stanza["SHA256"], SUITE_RELEASE[suite], cache)
    log(f"netboot: {package} {stanza['Version']} (sha256 {stanza['SHA256'][:16]}...) verified")
    return Netboot(kernel, initrd, package, stanza["Version"], stanza["SHA256"])


# -- extraction ----------------------------------------------------------------------------------

def _extract(deb: Path, deb_sha256: str, release: int, cache: Path) -> tuple[Path, Path]:
    """linux and initrd.gz from the package, kept beside a list of their sha256 so a damaged
    extracted copy is noticed too."""
    if not shutil.which("dpkg-deb"):
        raise ToolMissing("dpkg-deb", "dpkg")
    out = Path(cache) / "netboot" / deb_sha256
    out.parent.mkdir(parents=True, exist_ok=True)
    # Two builds at once (parallel test workers) must not both extract: the second rename failed.
    with open(out.parent / f".{deb_sha256}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _extract_into(out, deb, release)


def _extract_into(out: Path, deb: Path, release: int) -> tuple[Path, Path]:
    sums = out / "SHA256SUMS"
    kernel, initrd = out / "linux", out / "initrd.gz"
    if sums.exists() and kernel.exists() and initrd.exists():
        want = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())
        if all(want.get(p.name) == file_sha256(p) for p in (kernel, initrd)):
            return kernel, initrd
    shutil.rmtree(out, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:16]}.", dir=out.parent))
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
