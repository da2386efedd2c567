"""Choose QEMU's accelerator by trying it: KVM when a guest really runs under it, TCG otherwise.

    from builder.accel import detect_accel
    accel = detect_accel()          # Accel(name="tcg", args=[...], reason="KVM unusable (...)")
    print(accel.reason)

/dev/kvm opening is not proof: on a nested hypervisor it opens, `-cpu host` aborts and a
`qemu64` guest hangs at its first SSE instruction. So the probe boots a 238-byte multiboot
kernel that walks the path a real kernel takes (protected mode -> paging -> long mode -> SSE,
CPUID, RDTSC), writes "L" to the serial port and leaves through the isa-debug-exit device.
If that does not happen within a few seconds the CPU model is unusable.

The answer is cached per process and on disk (cache_dir()/accel-*.json, keyed by the host
kernel and QEMU version). MKMAILIMAGE_ACCEL=tcg|kvm skips the probe.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from hashlib import sha256
from pathlib import Path

from .errors import BuildError
from .paths import cache_dir

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT = 3.0

# TCG: "qemu64" (baseline x86-64, no SSSE3), not "max". With SSSE3 rspamd uses hyperscan,
# and compiling its public-suffix database (9760 patterns) takes 5+ minutes of emulated CPU
# at every first boot before the scanner listens; without SSSE3 rspamd takes its documented
# non-hyperscan path (Aho-Corasick + PCRE) and is ready in seconds. Mixing "max,-ssse3" is
# not an option: glibc in the guest then traps on invalid opcodes (modprobe in the initramfs).
# Multi-threaded TCG uses one host thread per vCPU.
TCG_ARGS = ["-accel", "tcg,thread=multi", "-cpu", "qemu64"]
# KVM CPU models to try, best first.
KVM_CPUS = ["host", "max"]

# Assembled from this source (GNU as --32, objcopy -O binary); kept as bytes so the probe
# needs no assembler on the build host:
#   multiboot header (flags bit 16: flat binary loaded at 0x100000, entry after the header)
#   out 'P' to 0x3f8; identity-map the first 2 MiB (PML4/PDPT/PD at 0x110000..0x112fff);
#   CR4.PAE, EFER.LME (wrmsr 0xC0000080), CR0.PG|PE; lgdt; ljmp to a 64-bit code segment;
#   clear CR0.EM, set CR0.MP, CR4.OSFXSR|OSXMMEXCPT; pxor xmm0 (out 'S'); cpuid (out 'C');
#   rdtsc (out 'R'); out 'L'; out 0 to port 0xf4 (isa-debug-exit -> QEMU exits with status 1).
PROBE_KERNEL = bytes.fromhex(
    "02b0ad1b00000100fe4f51e4000010000000100000000000000000002000100066baf803b050eebf00001100"
    "31c0b9000c0000f3abc7050000110003101100c7050010110003201100c7050020110083000000b800001100"
    "0f22d80f20e083c8200f22e0b9800000c00f320d000100000f300f20c00d010000800f22c00f0115e8001000"
    "ea8b00100008000f20c04883e0fb4883c8020f22c00f20e0480d000600000f22e0660fefc066baf803b053ee"
    "31c00fa266baf803b043ee0f3166baf803b052ee66baf803b04cee66baf400b000eef4ebfd8d760000000000"
    "0000000000000000009a20000f00d8001000"
)
PROBE_MARKER = b"PSCRL"


@dataclass(frozen=True)
class Accel:
    name: str            # "kvm" or "tcg"
    args: list[str]      # QEMU arguments selecting accelerator and CPU model
    reason: str          # one line for the user: what was chosen and why


_cached: Accel | None = None


def detect_accel(use_disk_cache: bool = True) -> Accel:
    """The accelerator to use, decided once per process (see module docstring)."""
    global _cached
    forced = os.environ.get("MKMAILIMAGE_ACCEL", "").strip().lower()
    if forced:
        return _forced(forced)
    if _cached is None:
        _cached = _from_disk() if use_disk_cache else None
        if _cached is None:
            _cached = _probe_all()
            if use_disk_cache:
                _to_disk(_cached)
    return _cached


def _forced(name: str) -> Accel:
    if name == "tcg":
        return Accel("tcg", TCG_ARGS, "TCG (forced by MKMAILIMAGE_ACCEL=tcg)")
    if name == "kvm":
        return Accel("kvm", ["-accel", "kvm", "-cpu", "host"], "KVM (forced by MKMAILIMAGE_ACCEL=kvm)")
    raise BuildError(f"MKMAILIMAGE_ACCEL={name!r}: expected 'tcg' or 'kvm'")


def _probe_all() -> Accel:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", TCG_ARGS, "KVM unavailable (/dev/kvm not accessible): using TCG")
    why = ""
    for cpu in KVM_CPUS:
        args = ["-accel", "kvm", "-cpu", cpu]
        ok, why = probe(args)
        if ok:
            return Accel("kvm", args, f"KVM works (probe guest ran with -cpu {cpu}): using KVM")
    return Accel("tcg", TCG_ARGS, f"KVM unusable ({why}): using TCG")


def probe(accel_args: list[str], timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the probe kernel with `accel_args`; (worked, reason it did not)."""
    with tempfile.TemporaryDirectory(prefix="mkmi-accel-") as tmp:
        kernel = Path(tmp) / "probe.bin"
        kernel.write_bytes(PROBE_KERNEL)
        cmd = [QEMU, *accel_args, "-machine", "pc", "-m", "32", "-nodefaults", "-display", "none",
               "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
               "-kernel", str(kernel)]
        try:
            res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired as e:
            got = (e.stdout or b"").decode(errors="replace")
            return False, f"guest did not run within {timeout:g} s{', got ' + repr(got) if got else ''}"
        except FileNotFoundError:
            raise BuildError(f"'{QEMU}' not found: install the Debian package 'qemu-system-x86'")
    # isa-debug-exit: exit status = (value << 1) | 1 = 1 after writing 0.
    if res.returncode == 1 and PROBE_MARKER in res.stdout:
        return True, ""
    err = res.stderr.decode(errors="replace").strip().splitlines()
    return False, (err[-1] if err else f"probe exited with status {res.returncode}")


def _qemu_version() -> str:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def _disk_path() -> Path:
    key = sha256(f"{platform.release()}\n{_qemu_version()}".encode()).hexdigest()[:16]
    return cache_dir() / f"accel-{key}.json"


def _from_disk() -> Accel | None:
    try:
        data = json.loads(_disk_path().read_text())
        if data["name"] == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return None   # KVM went away since: decide again
        args = TCG_ARGS if data["name"] == "tcg" else list(data["args"])  # TCG_ARGS may change
        return Accel(data["name"], args, data["reason"] + " [cached]")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _to_disk(accel: Accel) -> None:
    path = _disk_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(accel)))
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation only
