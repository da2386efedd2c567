"""A Debian 13 (trixie) directory tree holding the image's daemons, used only to run their checkers.

The build host may be Debian 12, whose dovecot/rspamd/opensmtpd are older than the image's and
reject its configuration syntax, so configs are checked with trixie's own binaries (the way mkosi
uses a tools tree). The tree is built once with mmdebstrap and cached under
`paths.cache_dir()/tools-<hash of the inputs>`; a build goes into a temporary directory that is
renamed into place only when complete, so an interrupted build never leaves a half tree behind.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import paths
from .errors import BuildError, ToolMissing
from .hostinfo import host_debian_mirror

SUITE = "trixie"
PACKAGES = [
    "opensmtpd", "opensmtpd-filter-rspamd", "opensmtpd-table-passwd",
    "dovecot-core", "dovecot-imapd", "dovecot-lmtpd", "dovecot-sieve",
    "rspamd", "unbound", "dns-root-data", "nftables", "openssh-server", "openssl",
]
# Bump when the way the tree is made changes, so old caches are not reused.
RECIPE = 1


def tree_key(suite: str = SUITE, packages: list[str] = PACKAGES) -> str:
    text = f"{RECIPE}\n{suite}\n" + "\n".join(sorted(packages))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tools_tree(mirror: str | None = None, suite: str = SUITE, packages: list[str] = PACKAGES,
               cache: Path | None = None, log=None) -> Path:
    """Return the path of a complete tools tree, building it first if it is not cached."""
    cache = Path(cache or paths.cache_dir())
    final = cache / f"tools-{tree_key(suite, packages)}"
    if _complete(final):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    # one builder at a time (parallel test workers would otherwise all run mmdebstrap)
    with open(cache / ".tools.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(final):
            return final
        mirror = mirror or host_debian_mirror()
        if not mirror:
            raise BuildError("tools tree: no Debian mirror found in the host's apt sources "
                             "(/etc/apt/sources.list*); cannot run mmdebstrap")
        _build(final, mirror, suite, packages, log)
    return final


MARKER = ".mkmailimage-tools-complete"


def _complete(tree: Path) -> bool:
    return (tree / MARKER).exists()


def _build(final: Path, mirror: str, suite: str, packages: list[str], log) -> None:
    if os.geteuid() != 0:
        raise BuildError("tools tree: building it needs root (mmdebstrap in root mode, and the "
                         "checkers chroot into it); run as root")
    mmdebstrap = ensure_mmdebstrap()
    tmp = Path(tempfile.mkdtemp(prefix=".tools-tmp-", dir=final.parent))
    try:
        cmd = [mmdebstrap, "--mode=root", "--variant=apt", "--include=" + ",".join(packages),
               suite, str(tmp), mirror]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if log is not None:
            log.write(proc.stdout)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-30:])
            raise BuildError(f"tools tree: mmdebstrap failed with exit status {proc.returncode} "
                             f"building a {suite} tree with {', '.join(packages)}:\n{tail}")
        (tmp / MARKER).write_text(tree_key(suite, packages) + "\n")
        if final.exists():   # an incomplete leftover from an older, killed run
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_mmdebstrap() -> str:
    """mmdebstrap's path; installs it with apt when missing (as root)."""
    found = shutil.which("mmdebstrap")
    if found:
        return found
    if os.geteuid() != 0:
        raise ToolMissing("mmdebstrap", "mmdebstrap")
    proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "mmdebstrap"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("mmdebstrap")
    if proc.returncode != 0 or not found:
        raise BuildError("tools tree: installing mmdebstrap with apt-get failed:\n"
                         + "\n".join(proc.stdout.splitlines()[-15:]))
    return found


def main() -> None:
    """`python -m builder.toolstree`: build (or find) the tools tree and print its path."""
    import sys
    print(tools_tree(log=sys.stderr))


if __name__ == "__main__":
    main()
