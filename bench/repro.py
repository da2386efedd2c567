#!/usr/bin/env python3
"""Benchmark reproducible builds. Prints figures, asserts nothing.

    .venv/bin/python bench/repro.py [--site SITE] [--keep DIR]

- lock: `mkmailimage lock SITE` (base layer from the cache when it is there, signed index)
- unlocked rebuild: `build debian SITE` with the cached base layer
- locked rebuild: `build debian SITE --locked`: the same plus the lock's check against the
  mirror's signed index and of the layer's dpkg status against the lock
- manifest: `mkmailimage manifest` of the raw image (debugfs + mtools, no boot)
and whether the unlocked and the locked raw images are bit-identical (they are when the
lock was made from the same base layer: the lock pins what the build would have used anyway).
Each build is run through the CLI in its own process, as a user would.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.cache import sha256_file  # noqa: E402
from builder.initsite import init_site  # noqa: E402


def cli(*argv) -> float:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "builder.cli", *map(str, argv)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode != 0:
        sys.exit(f"mkmailimage {' '.join(map(str, argv))} failed:\n{p.stdout}\n{p.stderr}")
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--site", type=Path, help="site file (default: a fresh demo site)")
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="mkmailimage-bench-repro."))
    work.mkdir(parents=True, exist_ok=True)
    site = args.site
    if site is None:
        init_site("bench.test", work / "site", password="bench bench bench")
        site = work / "site" / "site.yaml"
    figures = []
    figures.append(("lock (mkmailimage lock)", cli("lock", site)))
    figures.append(("unlocked rebuild (cached base layer)", cli("build", "debian", site, "--raw", "--out", work / "unlocked")))
    figures.append(("locked rebuild (cached base layer)", cli("build", "debian", site, "--locked", "--raw",
                                                              "--out", work / "locked")))
    raws = [next((work / d).glob("*.raw")) for d in ("unlocked", "locked")]
    figures.append(("manifest of the raw image", cli("manifest", raws[1])))
    for what, seconds in figures:
        print(f"{what:40s} {seconds:7.1f} s")
    a, b = (sha256_file(r) for r in raws)
    print(f"{'raw images bit-identical':40s} {'yes' if a == b else 'NO'} ({a[:16]} / {b[:16]})")
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
