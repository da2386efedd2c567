#!/usr/bin/env python3
"""Benchmark `mkmailimage build debian` (bootstrap installer). Prints figures, asserts nothing.

    .venv/bin/python bench/build.py [--empty-cache] [--no-boot] [--keep DIR]

- cold build: `--no-cache` (mmdebstrap runs again; the verified .deb cache is reused unless
  --empty-cache, which points MKMAILIMAGE_CACHE at an empty directory so every .deb is fetched)
- warm rebuild after a site change (a new alias): the cached base layer is reused
- boot-to-ready: power-on until 25/465/587/993 all answer (first-boot check, TCG here)
- sizes: qcow2, raw (apparent and allocated), installed tree, base layer tarball
Targets from issue 3: cold <= 4 min, warm <= 30 s, boot-to-ready <= 60 s (2 cores, TCG).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.build import BuildState, run_build  # noqa: E402
from builder.initsite import init_site  # noqa: E402
from builder.progress import Progress  # noqa: E402


def timed_build(site: Path, out: Path, name: str, **kw) -> tuple[float, BuildState]:
    t0 = time.monotonic()
    st = run_build(BuildState(site_path=site, out_dir=out, name=name, progress=Progress(), **kw))
    return time.monotonic() - t0, st


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--empty-cache", action="store_true", help="cold build with an empty download cache")
    ap.add_argument("--no-boot", action="store_true", help="skip the boot-to-ready measurement")
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="mkmailimage-bench."))
    work.mkdir(parents=True, exist_ok=True)
    if args.empty_cache:
        os.environ["MKMAILIMAGE_CACHE"] = str(work / "cache")
    init_site("bench.test", work / "site", password="bench password", out=open(os.devnull, "w"))
    site = work / "site" / "site.yaml"
    out = work / "images"

    cold, st = timed_build(site, out, "cold", no_cache=True)
    site.write_text(site.read_text().replace("aliases:\n", "aliases:\n  sales: admin\n", 1))
    warm, st2 = timed_build(site, out, "warm", keep_raw=True)
    manifest = json.loads(st2.outputs["manifest"].read_text())
    boot = None
    if not args.no_boot:   # measured apart from the build, on the published raw image
        from builder.debian.bootcheck import boot_check
        boot = boot_check(st2.outputs["raw"], work / "boot.serial.log", Progress())

    raw = st2.outputs["raw"]
    rows = [
        ("cold build (--no-cache)", f"{cold:.1f} s", "target <= 240 s"),
        ("  stages", json.dumps(st.progress.timings), ""),
        ("warm rebuild after a site change (+ --raw)", f"{warm:.1f} s", "target <= 30 s"),
        ("  stages", json.dumps(st2.progress.timings), ""),
        ("  base layer reused", str(st2.base_reused), ""),
    ]
    if boot:
        rows.append(("boot to all mail ports ready", f"{boot['all_ready_seconds']:.1f} s "
                     f"({boot['accel']}, per port {boot['ready_seconds']})", "target <= 60 s"))
    rows += [
        ("qcow2 (compressed)", f"{st2.outputs['qcow2'].stat().st_size / 2**20:.0f} MiB", ""),
        ("raw apparent / allocated", f"{raw.stat().st_size / 2**20:.0f} MiB / "
                                     f"{raw.stat().st_blocks * 512 / 2**20:.0f} MiB", ""),
        ("installed tree", f"{manifest['inputs'].get('tree_bytes', 0) / 2**20:.0f} MiB", ""),
        ("base layer tarball", f"{st2.base_tar.stat().st_size / 2**20:.0f} MiB", ""),
    ]
    rows.append(("host load average (1/5/15 min)", " ".join(f"{x:.1f}" for x in os.getloadavg()), ""))
    width = max(len(r[0]) for r in rows)
    for name, value, target in rows:
        print(f"{name:<{width}}  {value}  {target}".rstrip())
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
