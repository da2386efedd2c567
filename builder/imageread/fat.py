"""Files of a FAT filesystem (the EFI system partition) inside a raw image, copied out with mtools
(`mcopy -i FILE@@OFFSET`): no mount, no root. FAT has no owners or modes; times are read in UTC."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from ..errors import BuildError
from .disk import need, sha256_file


def read_fat(raw: Path, offset: int) -> list[dict]:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", TZ="UTC")
    with tempfile.TemporaryDirectory(prefix="mkmailimage-fat-") as tmp:
        out = subprocess.run([need("mcopy", "mtools"), "-s", "-p", "-m", "-n", "-Q",
                              "-i", f"{raw}@@{offset}", "::/", tmp + "/"],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0 and "no match" not in out.stderr.lower():
            raise BuildError(f"mcopy on {raw}@@{offset}: {out.stderr.strip()}")
        entries = [{"path": "/", "type": "dir"}]
        for dirpath, dirnames, filenames in os.walk(tmp):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                full = Path(dirpath) / name
                rel = "/" + str(full.relative_to(tmp))
                st = full.lstat()
                if full.is_dir():
                    entries.append({"path": rel, "type": "dir", "mtime": int(st.st_mtime)})
                else:
                    entries.append({"path": rel, "type": "file", "size": st.st_size,
                                    "sha256": sha256_file(full), "mtime": int(st.st_mtime)})
        return entries
