"""Fixes that make an image byte-for-byte repeatable, for the steps whose tools leave a trace of
when or where they ran. Each one was found with `mkmailimage diff` on two builds from one lock
(docs/reproducibility.md lists them and why).

- (builder.debian.layer.clamp_mtimes, called by disk.assemble right before mke2fs: files the
  build writes after mmdebstrap, grub.cfg and fstab included, carry the build's clock.)
- `fix_ext4_times`: mke2fs 1.47.0 `-d` copies each inode's ctime and atime from the source
  tree (ctime = when the tree was extracted, atime = when mke2fs read the file, thanks to
  relatime) and ignores SOURCE_DATE_EPOCH; only crtime and the superblock follow
  E2FSPROGS_FAKE_TIME. Rewrite atime and ctime of every inode in use with `debugfs -w`.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from .errors import BuildError
from .imageread.disk import need
from .imageread.ext4 import Ext4Reader


def fix_ext4_times(raw: Path, offset: int, epoch: int) -> int:
    """Set atime and ctime of every inode in use to `epoch`. Returns the number of inodes."""
    inodes = sorted({e["ino"] for e in Ext4Reader(raw, offset).walk()})
    with tempfile.NamedTemporaryFile("w", prefix="mkmailimage-times-", suffix=".cmds") as cmds:
        for ino in inodes:
            cmds.write(f"sif <{ino}> atime {epoch}\nsif <{ino}> ctime {epoch}\n")
        cmds.flush()
        env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(epoch))
        out = subprocess.run([need("debugfs", "e2fsprogs"), "-w", "-f", cmds.name, f"{raw}?offset={offset}"],
                             capture_output=True, text=True, env=env)
    errors = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith("debugfs ")]
    if out.returncode != 0 or errors:
        raise BuildError(f"disk: resetting inode times with debugfs failed: {'; '.join(errors[:3])}")
    return len(inodes)
