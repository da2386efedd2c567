#!/usr/bin/env python3
"""Benchmark `mkmailimage build debian` (bootstrap installer). Prints figures, asserts nothing.

    .venv/bin/python bench/build.py [--empty-cache] [--no-boot] [--keep DIR]
    .venv/bin/python bench/build.py --boot-only IMAGE [--key SSH_KEY]   # boot-to-ready only

- cold build: `--no-cache` (mmdebstrap runs again; the verified .deb cache is reused unless
  --empty-cache, which points MKMAILIMAGE_CACHE at an empty directory so every .deb is fetched)
- warm rebuild after a site change (a new alias): the cached base layer is reused
- boot-to-ready: power-on (QEMU start) until 25/465/587/993 all answer with their greeting,
  and until rspamd's scanner listens (filter-rspamd answers 421 before that, so mail is only
  really accepted from then on; polled over SSH, so it needs root's key)
- sizes: qcow2, raw (apparent and allocated), installed tree, base layer tarball
Targets from issue 3: cold <= 4 min, warm <= 30 s, boot-to-ready <= 60 s (2 cores, TCG).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.build import BuildState, run_build  # noqa: E402
from builder.initsite import init_site  # noqa: E402
from builder.machine import ssh_keypair  # noqa: E402
from builder.progress import Progress  # noqa: E402


def timed_build(site: Path, out: Path, name: str, **kw) -> tuple[float, BuildState]:
    t0 = time.monotonic()
    st = run_build(BuildState(site_path=site, out_dir=out, name=name, progress=Progress(), **kw))
    return time.monotonic() - t0, st


PORTS = {25: (False, b"220"), 465: (True, b"220"), 587: (False, b"220"), 993: (True, b"* OK")}


def _greets(port: int, tls: bool, greeting: bytes) -> bool:
    """One short try: connect through the host forward and read the service's greeting.
    Short time-outs, because before the guest's NIC is up QEMU accepts and then says nothing."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.settimeout(5)
            if tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE      # self-signed at first boot
                s = ctx.wrap_socket(s)
            return s.recv(256).startswith(greeting)
    except (OSError, ssl.SSLError):
        return False


def boot_to_ready(image: Path, serial_log: Path, key: Path | None, timeout: float = 900) -> dict:
    """Seconds from QEMU's start until each mail port greets (all polled at once), and until
    rspamd's scanner (127.0.0.1:11333 in the guest) listens. Same VM size as the build's
    first-boot check (2 vCPUs, 2 GiB); the image is not modified (snapshot)."""
    from concurrent.futures import ThreadPoolExecutor

    from builder.machine import Machine
    from builder.qemu import Disk, Qemu, QemuSpec
    spec = QemuSpec(disks=[Disk(image, snapshot=True)], memory=2048, name="bench-boot",
                    forwards={p: None for p in [22, *PORTS]})
    with Qemu(spec, serial_log.parent, log_path=serial_log) as vm:
        t0 = time.monotonic()

        def wait_port(port: int) -> float:
            tls, greeting = PORTS[port]
            while not _greets(vm.host_port(port), tls, greeting):
                if time.monotonic() - t0 > timeout or not vm.alive():
                    raise RuntimeError(f"port {port} did not answer (see {serial_log})")
                time.sleep(0.5)
            return round(time.monotonic() - t0, 1)

        def wait_rspamd() -> float | None:
            if key is None:
                return None
            m = Machine(vm, key=key, name="bench-boot")
            m.wait_for_ssh(timeout=timeout)
            m.wait_for_open_port(11333, timeout=max(1.0, timeout - (time.monotonic() - t0)))
            m.close()
            return round(time.monotonic() - t0, 1)

        with ThreadPoolExecutor(len(PORTS) + 1) as pool:
            ports = {p: pool.submit(wait_port, p) for p in PORTS}
            rspamd = pool.submit(wait_rspamd)
            ready = {p: f.result() for p, f in ports.items()}
            scanner = rspamd.result()
        vm.powerdown(timeout=60)
    return {"accel": f"{vm.accel.reason} ({' '.join(vm.accel.args)})", "ports": ready,
            "ports_ready": max(ready.values()), "rspamd_ready": scanner}


def boot_rows(boot: dict) -> list[tuple[str, str, str]]:
    rows = [("boot to mail ports 25/465/587/993 greeting", f"{boot['ports_ready']:.1f} s "
             f"(per port {boot['ports']})", "target <= 60 s")]
    if boot["rspamd_ready"] is not None:
        rows.append(("boot to rspamd scanner listening", f"{boot['rspamd_ready']:.1f} s", ""))
        everything = max(boot["ports_ready"], boot["rspamd_ready"])
        rows.append(("boot to all services ready", f"{everything:.1f} s", "target <= 60 s"))
    rows.append(("  accelerator", boot["accel"], ""))
    return rows


def print_rows(rows: list[tuple[str, str, str]]) -> None:
    rows = rows + [("host load average (1/5/15 min)", " ".join(f"{x:.1f}" for x in os.getloadavg()), "")]
    width = max(len(r[0]) for r in rows)
    for name, value, target in rows:
        print(f"{name:<{width}}  {value}  {target}".rstrip())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--empty-cache", action="store_true", help="cold build with an empty download cache")
    ap.add_argument("--no-boot", action="store_true", help="skip the boot-to-ready measurement")
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it")
    ap.add_argument("--boot-only", type=Path, metavar="IMAGE",
                    help="only measure boot-to-ready of this built image (qcow2 or raw)")
    ap.add_argument("--key", type=Path, help="with --boot-only: root's SSH key, to see rspamd's scanner")
    args = ap.parse_args()
    if args.boot_only:
        with tempfile.TemporaryDirectory(prefix="mkmailimage-bench.") as tmp:
            print_rows(boot_rows(boot_to_ready(args.boot_only, Path(tmp) / "boot.serial.log", args.key)))
        return 0
    work = args.keep or Path(tempfile.mkdtemp(prefix="mkmailimage-bench."))
    work.mkdir(parents=True, exist_ok=True)
    if args.empty_cache:
        os.environ["MKMAILIMAGE_CACHE"] = str(work / "cache")
    key, public = ssh_keypair(work / "ssh")   # root's key in the image: the boot check reads rspamd
    init_site("bench.test", work / "site", password="bench password", out=open(os.devnull, "w"))
    site = work / "site" / "site.yaml"
    site.write_text(site.read_text().replace("admin_ssh_keys: []", f"admin_ssh_keys:\n  - {public}"))
    out = work / "images"

    cold, st = timed_build(site, out, "cold", no_cache=True)
    site.write_text(site.read_text().replace("aliases:\n", "aliases:\n  sales: admin\n", 1))
    warm, st2 = timed_build(site, out, "warm", keep_raw=True)
    manifest = json.loads(st2.outputs["manifest"].read_text())
    boot = None
    if not args.no_boot:   # measured apart from the build, on the published raw image
        boot = boot_to_ready(st2.outputs["raw"], work / "boot.serial.log", key)

    raw = st2.outputs["raw"]
    rows = [
        ("cold build (--no-cache)", f"{cold:.1f} s", "target <= 240 s"),
        ("  stages", json.dumps(st.progress.timings), ""),
        ("warm rebuild after a site change (+ --raw)", f"{warm:.1f} s", "target <= 30 s"),
        ("  stages", json.dumps(st2.progress.timings), ""),
        ("  base layer reused", str(st2.base_reused), ""),
    ]
    if boot:
        rows += boot_rows(boot)
    rows += [
        ("qcow2 (compressed)", f"{st2.outputs['qcow2'].stat().st_size / 2**20:.0f} MiB", ""),
        ("raw apparent / allocated", f"{raw.stat().st_size / 2**20:.0f} MiB / "
                                     f"{raw.stat().st_blocks * 512 / 2**20:.0f} MiB", ""),
        ("installed tree", f"{manifest['inputs'].get('tree_bytes', 0) / 2**20:.0f} MiB", ""),
        ("base layer tarball", f"{st2.base_tar.stat().st_size / 2**20:.0f} MiB", ""),
    ]
    print_rows(rows)
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
