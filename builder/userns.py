"""Building without root: the build runs again as root of a user namespace.

An image's files belong to many users (root, _smtpd, dovecot, redis ...) and `mke2fs -d`
records the owners it finds in the tree, so the tree has to be extracted with those owners.
An ordinary user gets that in a user namespace where they are root and their subordinate ids
(/etc/subuid, /etc/subgid) stand for the image's other users -- the same thing mmdebstrap's
unshare mode does. `unshare --map-root-user --map-auto` (util-linux 2.38) sets it up with the
setuid helpers newuidmap/newgidmap (package uidmap). Files the build writes belong, outside
the namespace, to the user who started it.
"""
from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys

from .errors import BuildError, ToolMissing

# The image's ids run up to 65534 (nobody/nogroup): the namespace must map 0..65535.
IDS_NEEDED = 65536
UNSHARE = ["unshare", "--map-root-user", "--map-auto"]


def mapped_ids(map_text: str) -> int:
    """How many ids a /proc/PID/uid_map (or gid_map) maps, counting only the block from 0 up."""
    covered = 0
    for inside, _outside, count in sorted(tuple(map(int, line.split())) for line in map_text.splitlines()
                                          if line.strip()):
        if inside > covered:
            break
        covered = max(covered, inside + count)
    return covered


def check_namespace() -> None:
    """Refuse, naming the fix, unless a namespace mapping all of the image's ids can be made."""
    for tool, package in (("unshare", "util-linux"), ("newuidmap", "uidmap"), ("newgidmap", "uidmap")):
        if not shutil.which(tool):
            raise ToolMissing(tool, package)
    user = getpass.getuser()
    fix = (f"give user '{user}' 65536 subordinate ids (as root: usermod --add-subuids "
           f"100000-165535 --add-subgids 100000-165535 {user}), or build as root")
    proc = subprocess.run([*UNSHARE, "cat", "/proc/self/uid_map", "/proc/self/gid_map"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError("build: building without root needs a user namespace, and "
                         f"`{' '.join(UNSHARE)}` failed: {proc.stderr.strip()}\n{fix}")
    lines = proc.stdout.splitlines()
    half = len(lines) // 2
    for kind, text in (("uid", lines[:half]), ("gid", lines[half:])):
        n = mapped_ids("\n".join(text))
        if n < IDS_NEEDED:
            raise BuildError(f"build: building without root maps only {n} {kind}s into the user "
                             f"namespace; the image's files need {IDS_NEEDED} (0 to 65535)\n{fix}")


def reexec_as_namespace_root(argv: list[str]) -> None:
    """Replace this process with `mkmailimage ARGV` run as root of a new user namespace.
    The process keeps its id (unshare execs), so signals and the exit status pass through."""
    if os.environ.get("MKMAILIMAGE_USERNS") == "1":
        raise BuildError("build: still not root inside the user namespace (uid "
                         f"{os.geteuid()}); is /proc/sys/user/max_user_namespaces 0?")
    check_namespace()
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ["MKMAILIMAGE_USERNS"] = "1"
    os.execvp(UNSHARE[0], [*UNSHARE, "--", sys.executable, "-m", "builder.cli", *argv])
