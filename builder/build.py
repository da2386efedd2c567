"""`mkmailimage build`: the image pipeline as named steps, like Packer's builder steps.

    validate -> render -> base layer -> layer overlay -> assemble disk -> first-boot check -> export

Each step is one function taking the shared `BuildState`. Everything temporary lives in one
work directory beside the output (same file system, so publishing is a rename) that is removed
on success, failure, Ctrl-C and SIGTERM; outputs appear only when complete (builder.export_image).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import paths
from .cache import sha256_file
from .errors import BuildError, MkMailImageError, ToolMissing
from .progress import Progress

BUILDER_VERSION = "0.1.0"


class Interrupted(MkMailImageError):
    exit_code = 130


@dataclass
class BuildState:
    site_path: Path
    out_dir: Path
    name: str | None = None
    keep_raw: bool = False
    no_cache: bool = False
    boot_check: bool = False
    locked: bool = False
    epoch: int | None = None
    seed: str | None = None
    progress: Progress = field(default_factory=Progress)
    # filled by the steps
    site: object = None
    lock: object = None
    overlay: object = None
    base_inputs: object = None
    base_tar: Path | None = None
    base_reused: bool = False
    workdir: Path | None = None
    tree: Path | None = None
    raw: Path | None = None
    seeds: object = None
    serial_log: Path | None = None
    tree_bytes: int = 0
    boot_report: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)


# -- steps ----------------------------------------------------------------------------------

def step_validate(st: BuildState) -> None:
    from .site import load_site
    from .debian.bootstrap import DEFAULT_EPOCH
    from .debian.disk import Seeds
    st.site = load_site(st.site_path)
    for tool, pkg in (("mmdebstrap", "mmdebstrap"), ("mke2fs", "e2fsprogs"), ("sfdisk", "fdisk"),
                      ("mkfs.vfat", "dosfstools"), ("mcopy", "mtools"), ("qemu-img", "qemu-utils"),
                      ("systemctl", "systemd")):
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")):
            raise ToolMissing(tool, pkg)
    if os.geteuid() != 0:
        raise BuildError("build: assembling the Debian image needs root or root of a user "
                         "namespace (the base layer's owners must survive extraction for "
                         "mke2fs -d); `mkmailimage build` enters one by itself")
    st.name = st.name or st.site.domain
    if "/" in st.name or st.name.startswith("."):
        raise BuildError(f"build: --name '{st.name}' must be a plain file name")
    if st.locked and st.lock is None:
        from .lock import read_lock
        st.lock = read_lock(st.site_path)
    if st.lock is not None:
        st.epoch, st.seed = st.lock.epoch, st.lock.seed
    env_epoch = os.environ.get("SOURCE_DATE_EPOCH")
    st.epoch = st.epoch if st.epoch is not None else int(env_epoch) if env_epoch else DEFAULT_EPOCH
    st.seeds = Seeds.from_string(st.seed or st.site.hostname)


def step_render(st: BuildState) -> None:
    from .render import render_tree
    st.overlay = render_tree(st.site, "debian")


def step_base_layer(st: BuildState) -> None:
    from .debian.bootstrap import BaseInputs, base_layer, build_mirror, packages_for
    d = st.site.model.debian
    st.base_inputs = BaseInputs(suite=d.suite, mirror=build_mirror(d.mirror), epoch=st.epoch,
                                packages=packages_for(st.site))
    if st.lock:
        from .lock import locked_base_layer
        st.base_inputs.pins = st.lock.pins()
        st.base_inputs.packages = st.lock.include or st.base_inputs.packages
        st.base_tar, st.base_reused = locked_base_layer(st.lock, st.base_inputs, st.progress, st.no_cache)
    else:
        st.base_tar, st.base_reused = base_layer(st.base_inputs, st.progress, no_cache=st.no_cache)
    st.progress.say(f"base layer: {'reused cached' if st.base_reused else 'built'} {st.base_tar.name}")


def step_layer_overlay(st: BuildState) -> None:
    from .debian import layer
    st.tree = tree_dir(st.workdir, st.base_tar.stat().st_size)
    st.progress.say(f"layer overlay: image tree in {st.tree}")
    # without /dev's nodes: mknod is not allowed in a user namespace, and the booted system
    # mounts devtmpfs there anyway; leaving them out everywhere keeps root and rootless builds equal
    st.progress.run(["tar", "--extract", "--numeric-owner", "--same-permissions", "--xattrs",
                     "--xattrs-include=*", "--exclude=./dev/?*", "-f", str(st.base_tar),
                     "-C", str(st.tree)],
                    what="layer: extracting the base layer")
    (st.tree / "dev").mkdir(mode=0o755, exist_ok=True)
    layer.apply(st.tree, st.site, st.overlay, epoch=st.epoch)


def step_assemble_disk(st: BuildState) -> None:
    from .debian import disk, layer
    st.raw = st.workdir / f"{st.name}.raw"
    size = disk.parse_size(st.site.model.debian.disk_size)
    disk.prepare_tree(st.tree, st.seeds)
    layer.clamp_mtimes(st.tree, st.epoch)
    st.tree_bytes = layer.tree_bytes(st.tree)
    disk.assemble(st.tree, st.raw, size, st.seeds, st.epoch, st.progress, st.workdir)


def step_first_boot_check(st: BuildState) -> None:
    from .debian.bootcheck import boot_check
    st.serial_log = st.workdir / f"{st.name}.serial.log"
    st.boot_report = boot_check(st.raw, st.serial_log, st.progress)


def step_export(st: BuildState) -> None:
    from .export_image import dpkg_packages, publish
    manifest = make_manifest(st, dpkg_packages(st.tree))
    # the tree is not needed any more; free the space before writing qcow2
    shutil.rmtree(st.tree)
    st.outputs = publish(st.workdir, st.out_dir, st.name, st.raw, manifest, st.progress,
                         keep_raw=st.keep_raw, serial_log=st.serial_log)


SHM = Path("/dev/shm")
SHM_PREFIX = "mkmailimage-tree."


def tree_dir(workdir: Path, layer_bytes: int) -> Path:
    """Where the image tree is extracted: in memory (/dev/shm) when it has room, else in the
    work directory. Writing, reading (mke2fs -d) and removing ~18000 files cost 10-20 s on this
    machine's disk and about a second in tmpfs; the image is the same either way (mke2fs -d
    gives equal file systems from both). Trees of builds killed without cleanup are removed.
    MKMAILIMAGE_TREE_IN_MEMORY=0 keeps the tree on disk."""
    in_memory = os.environ.get("MKMAILIMAGE_TREE_IN_MEMORY", "1") != "0"
    with contextlib.suppress(OSError):
        if in_memory and SHM.is_dir() and shutil.disk_usage(SHM).free > 2 * layer_bytes + (512 << 20):
            _remove_stale_trees()
            tree = Path(tempfile.mkdtemp(prefix=f"{SHM_PREFIX}{os.getpid()}.", dir=SHM))
            os.chmod(tree, 0o755)       # it becomes the image's / (mkdtemp makes 0700)
            return tree
    tree = workdir / "tree"
    tree.mkdir()
    return tree


def _remove_stale_trees() -> None:
    for d in SHM.glob(SHM_PREFIX + "*"):
        pid = d.name[len(SHM_PREFIX):].split(".")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


STEPS = [
    ("validate", step_validate),
    ("render", step_render),
    ("base layer", step_base_layer),
    ("layer overlay", step_layer_overlay),
    ("assemble disk", step_assemble_disk),
    ("first-boot check", step_first_boot_check),
    ("export", step_export),
]


def make_manifest(st: BuildState, packages: dict[str, str]) -> dict:
    from .debian.bootstrap import mmdebstrap_version
    d = st.site.model.debian
    overlay_hash = hashlib.sha256()
    for e in st.overlay.sorted():
        overlay_hash.update(f"{e.path}\0{e.mode:o}\0{e.owner}\0{e.group}\0".encode())
        overlay_hash.update(hashlib.sha256(e.data).digest() if e.data is not None else b"dir")
    from .render import OS_FACTS
    dkim_dir = OS_FACTS["debian"]["rspamd_dkim_dir"]
    return {
        "name": st.name,
        "os": "debian",
        "builder": {"version": BUILDER_VERSION, "git": _git_commit()},
        "site": {"file": st.site_path.name, "sha256": sha256_file(st.site_path),
                 "domain": st.site.domain, "hostname": st.site.hostname},
        "inputs": {
            "installer": "bootstrap",
            "lock": ({"file": st.lock.path.name, "sha256": sha256_file(st.lock.path)}
                     if st.lock is not None else None),
            "suite": d.suite,
            # the build host's mirror is not recorded by name (images never name it)
            "build_mirror": d.mirror or "build host's apt mirror",
            "image_mirror": d.mirror or "Debian's default (from the image's apt examples)",
            "source_date_epoch": st.epoch,
            "seeds": {"seed": st.seed or st.site.hostname, **st.seeds.__dict__},
            "base_layer": {"key": st.base_inputs.key(), "file": st.base_tar.name,
                           "sha256": sha256_file(st.base_tar), "reused": st.base_reused,
                           "packages_requested": sorted(set(st.base_inputs.packages))},
            "mmdebstrap": mmdebstrap_version(),
            "overlay_sha256": overlay_hash.hexdigest(),
            "disk_size": d.disk_size,
            "tree_bytes": st.tree_bytes,
        },
        "secrets_in_image": {"dkim_private_keys": [f"{dkim_dir}/{st.site.domain}.{s}.key"
                                                   for s in sorted(st.site.dkim_keys)],
                             "ssh_host_keys": "none (made at first boot)",
                             "tls_key": "none (made at first boot)"},
        "packages": packages,
        "boot_check": st.boot_report or None,
        "host": {"machine": platform.machine()},
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(paths.ROOT), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- running ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so `finally` blocks remove temp files and stop QEMU."""
    def handler(signum, frame):
        raise Interrupted(f"interrupted by signal {signum}")
    old = signal.signal(signal.SIGTERM, handler)
    old_hup = signal.signal(signal.SIGHUP, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGHUP, old_hup)


def run_build(st: BuildState, skip: tuple[str, ...] = ()) -> BuildState:
    st.out_dir = Path(st.out_dir)
    st.out_dir.mkdir(parents=True, exist_ok=True)
    os.umask(0o022)   # directories the build makes in the tree (/, /boot/grub ...) must not follow the caller's umask
    with _sigterm_as_interrupt():
        st.workdir = Path(tempfile.mkdtemp(prefix=".mkmailimage-build.", dir=st.out_dir))
        try:
            for name, func in STEPS:
                if name in skip or (name == "first-boot check" and not st.boot_check):
                    continue
                with st.progress.stage(name):
                    func(st)
        finally:
            if st.tree is not None:
                shutil.rmtree(st.tree, ignore_errors=True)
            shutil.rmtree(st.workdir, ignore_errors=True)
    return st


def summary(st: BuildState) -> str:
    lines = []
    sums = json.loads(st.outputs["manifest"].read_text())["outputs"]
    for kind in ("qcow2", "raw"):
        p = st.outputs.get(kind)
        if p:
            lines.append(f"{p}  {p.stat().st_size / 2**20:.0f} MiB  sha256 {sums[p.name]}")
    for kind in ("manifest", "sums", "serial"):
        if st.outputs.get(kind):
            lines.append(str(st.outputs[kind]))
    return "\n".join(lines)


def cmd_build(args) -> int:
    if args.os == "openbsd":
        from .openbsd.build import build_openbsd   # one module per distribution, like mkosi
        from .site import load_site
        print(build_openbsd(load_site(Path(args.site)), args))
        return 0
    from .site import load_site
    installer = getattr(args, "installer", None) or load_site(Path(args.site)).model.debian.installer
    if installer == "preseed":
        from .debian import preseed   # the preseed installer has its own pipeline
        if not hasattr(preseed, "cmd_build"):
            raise BuildError("build: the 'preseed' installer's pipeline is not available in this tree")
        return preseed.cmd_build(args)
    if os.geteuid() != 0:
        from .userns import reexec_as_namespace_root
        reexec_as_namespace_root(args.argv)   # does not return
    lock = None
    if getattr(args, "locked", False):
        # before anything is written: the lock must be readable and the mirror must still
        # have every pinned package (each missing one is named)
        from .debian.bootstrap import build_mirror
        from .lock import check_mirror, read_lock
        from .site import load_site
        lock = read_lock(Path(args.site))
        d = load_site(Path(args.site)).model.debian
        check_mirror(lock, build_mirror(d.mirror), d.suite)
        from .lock import builder_note
        if builder_note(lock):
            print(builder_note(lock), file=sys.stderr)
    progress = Progress(verbose=getattr(args, "verbose", False))
    st = BuildState(site_path=Path(args.site), out_dir=Path(args.out or paths.IMAGES),
                    name=args.name, keep_raw=args.raw, no_cache=args.no_cache,
                    locked=getattr(args, "locked", False),
                    boot_check=getattr(args, "boot_check", False), progress=progress,
                    lock=lock, epoch=lock.epoch if lock else None, seed=lock.seed if lock else None)
    try:
        run_build(st)
    except KeyboardInterrupt:
        raise Interrupted("build interrupted; no image was written") from None
    print(summary(st))
    return 0
