"""`mkmailimage build openbsd SITE`: an OpenBSD mail server image, installed by OpenBSD's own
autoinstall(8) inside QEMU on any Linux host.

    verify sets -> site set -> install (netboot, autoinstall) -> first boot -> export

- verify sets: SHA256.sig checked with signify against the release key, every boot file, set
  and package checked against it (builder.openbsd.sets); staged under one served directory.
- site set: the rendered overlay + install.site as siteXY.tgz, index.txt (builder.openbsd.siteset).
- install: QEMU netboots pxeboot from its built-in TFTP server (DHCP boot file "pxeboot", not
  "auto_install", so the installer does not spend minutes on http://10.0.2.2/install.conf, which
  restrict=on makes unreachable) and asks `Response file location?`; the driver answers with the
  builder's HTTP server as the guest sees it (guestfwd 10.0.2.100:80 -> a relay to 127.0.0.1).
  The installer's final reboot ends QEMU (-action reboot=shutdown).
- first boot: the installed disk boots alone (no network path out); rc.firsttime runs
  firstboot.sh, which checks the daemons' configs and removes the per-instance secrets; then the
  VM is powered off over QMP (ACPI power button).
- export: builder.export_image.publish (qcow2, optional raw, manifest, SHA256SUMS, serial log).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import paths
from ..errors import BuildError
from ..progress import Progress
from ..render import Tree, render_tree
from ..site import Site
from . import answers, installer, sets, siteset

GUEST_SERVER = "10.0.2.100"          # guestfwd address of the build's HTTP server (port 80)
BASE_URL = f"http://{GUEST_SERVER}"
# pxeboot's boot> prompt: bsd.rd from QEMU's TFTP; then the default kernel name ("bsd" in the
# TFTP root is a copy of bsd.rd) if the first form is refused.
BOOT_COMMANDS = ("boot tftp:/bsd.rd", "boot tftp:bsd.rd", "boot")
INSTALL_STALL = 3600                 # seconds without console output (TCG relinks silently)
INSTALL_DEADLINE = 8 * 3600
FIRSTBOOT_STALL = 3600
MEMORY = 1024


def signify_key_file(site: Site) -> Path | None:
    key = site.model.openbsd.signify_key
    return (site.path.parent / key) if key else None


def stage_release(site: Site, served: Path, tftp: Path, use_cache: bool = True, log=None) -> dict:
    """Verified boot files, sets and packages under `served` (HTTP) and `tftp`; returns facts
    for the manifest."""
    o = site.model.openbsd
    src = sets.source_for(o.version, o.mirror, o.sets_dir)
    base = sets.find_release_key(o.version, "base", signify_key_file(site), site.model.debian.mirror, log)
    pkg = sets.find_release_key(o.version, "pkg", signify_key_file(site), site.model.debian.mirror, log)
    base_key, pkg_key = base.path, pkg.path
    sets_dir = served / answers.server_dir(o.version)
    names = list(dict.fromkeys(sets.BOOT_FILES + sets.set_names(o.version)))
    verified = sets.stage(src.sets, src.is_dir, base_key, names, sets_dir, "sets", use_cache)
    pkg_dir = served / answers.packages_dir(o.version)
    pkg_files = sets.stage_packages(src, pkg_key, sets.PACKAGES, pkg_dir, use_cache)

    write_package_listing(pkg_dir)

    tftp.mkdir(parents=True, exist_ok=True)
    for name, source in [("pxeboot", "pxeboot"), ("bsd.rd", "bsd.rd"), ("bsd", "bsd.rd")]:
        shutil.copyfile(sets_dir / source, tftp / name)
    (tftp / "etc").mkdir(exist_ok=True)
    # pxeboot reads etc/boot.conf over TFTP: the console moves to the serial line before the
    # kernel loads (so the kernel and installer talk on com0), then bsd.rd boots at once. Should
    # a boot> prompt appear anyway, the driver types BOOT_COMMANDS.
    (tftp / "etc" / "boot.conf").write_text("stty com0 115200\nset tty com0\nboot tftp:/bsd.rd\n")
    return {
        "source": o.mirror or f"local directory ({Path(o.sets_dir).name})",
        "signify_key": base_key.name,
        "signify_key_source": base.source,
        "signify_pkg_key_source": pkg.source,
        "sha256_sig": sets.sha256_file(sets_dir / "SHA256.sig"),
        "sets": verified.files,
        "packages": {f: sets.sha256_file(pkg_dir / f) for f in pkg_files},
        "package_order": pkg_files,
    }


def write_package_listing(pkg_dir: Path) -> None:
    """A mirror-like listing of the packages directory: pkg_add resolves package names over HTTP
    by reading the directory page's <a href="...tgz"> links (the build's server never lists
    directories itself), and index.txt like a mirror's."""
    names = sorted(f.name for f in pkg_dir.iterdir() if f.suffix == ".tgz")
    links = "".join(f'<a href="{n}">{n}</a>\n' for n in names)
    (pkg_dir / "index.html").write_text(f"<html><body><pre>\n{links}</pre></body></html>\n")
    (pkg_dir / "index.txt").write_text(siteset.index_txt(pkg_dir))


def write_answers(site: Site, served: Path) -> None:
    (served / "install.conf").write_text(answers.render_install_conf(site, BASE_URL, display=False))
    (served / answers.DISKLABEL_NAME).write_text(answers.render_disklabel(site))


def install_spec(disk: Path, tftp: Path, http_port: int, workdir: Path, bootfile: str = "pxeboot"):
    """The install VM: netboot from QEMU's TFTP, the build's HTTP server at 10.0.2.100:80."""
    from ..qemu import Disk, QemuSpec
    relay = f"cmd:{sys.executable} -m builder.openbsd.relay 127.0.0.1 {http_port}"
    # SeaBIOS's serial console (sercon): firmware, iPXE and pxeboot's own output (and its
    # boot> prompt, before etc/boot.conf switches it to com0) appear on the serial line too.
    sercon = workdir / "sercon-port"
    sercon.write_bytes((0x3F8).to_bytes(2, "little"))
    return QemuSpec(disks=[Disk(disk, format="raw")], memory=MEMORY, smp=2,
                    tftp=tftp, bootfile=bootfile, guestfwd={f"{GUEST_SERVER}:80": relay},
                    reboot_shutdown=True, name="openbsd-install",
                    extra_args=["-boot", "n", "-fw_cfg", f"name=etc/sercon-port,file={sercon}"])


def run_install(site: Site, served: Path, tftp: Path, disk: Path, workdir: Path, log: Path,
                progress: Progress) -> None:
    from ..httpserve import FileServer
    from ..qemu import Qemu
    with FileServer(served) as srv:
        spec = install_spec(disk, tftp, srv.port, workdir)
        with Qemu(spec, workdir / "install", log_path=log, verbose=progress.verbose) as vm:
            try:
                installer.drive_install(vm.serial, f"{BASE_URL}/install.conf", boot_commands=BOOT_COMMANDS,
                                        stall_timeout=INSTALL_STALL, deadline=INSTALL_DEADLINE)
            except installer.InstallerError as e:
                missing = srv.failed()
                if missing:
                    raise type(e)(f"{e.words} [asked for but not on the build's server: "
                                  f"{', '.join(sorted(set(missing)))}]", e.tail) from None
                raise
            progress.say("install: finished, waiting for the installer's reboot to end QEMU")
            vm.wait_exit(timeout=600)


def run_first_boot(disk: Path, workdir: Path, log: Path, progress: Progress) -> None:
    from ..qemu import Disk, Qemu, QemuSpec
    spec = QemuSpec(disks=[Disk(disk, format="raw")], memory=MEMORY, smp=2, name="openbsd-firstboot")
    with Qemu(spec, workdir / "firstboot", log_path=log, verbose=progress.verbose) as vm:
        installer.wait_first_boot(vm.serial, siteset.FIRSTBOOT_DONE, stall_timeout=FIRSTBOOT_STALL)
        if not vm.powerdown(timeout=600):
            raise BuildError("first boot: the VM did not power off after the ACPI power button "
                             f"(serial log: {log})")


def locked_release(site: Site):
    """`build --locked`: the OpenBSD part of SITE's lock file (SHA256.sig and set hashes)."""
    from ..lock import LockError, read_lock
    lock = read_lock(site.path)
    ob = lock.data.get("openbsd") or {}
    if not ob.get("locked"):
        raise LockError(f"{lock.path}: no OpenBSD sets are locked ({ob.get('reason', 'no openbsd section')}); "
                        f"run `mkmailimage lock` with openbsd.mirror or openbsd.sets_dir set")
    if ob.get("version") != site.model.openbsd.version:
        raise LockError(f"{lock.path}: locked OpenBSD {ob.get('version')}, the site file asks for "
                        f"{site.model.openbsd.version}")
    return lock, ob


def check_locked(release: dict, ob: dict, lock_file: Path) -> None:
    """Refuse a release whose signed list or sets differ from the lock, naming what differs."""
    from ..lock import LockError
    if release["sha256_sig"] != ob.get("sha256_sig"):
        raise LockError(f"{lock_file}: SHA256.sig has sha256 {release['sha256_sig']}, the lock has "
                        f"{ob.get('sha256_sig')}: the mirror serves another release build")
    for name, digest in sorted((ob.get("sets") or {}).items()):
        if release["sets"].get(name) != digest:
            raise LockError(f"{lock_file}: {name} is {release['sets'].get(name)}, locked {digest}")


def manifest(site: Site, name: str, release: dict, tree: Tree, site_tgz: Path, served: Path) -> dict:
    from ..build import BUILDER_VERSION, _git_commit
    o = site.model.openbsd
    overlay = hashlib.sha256()
    for e in tree.sorted():
        overlay.update(f"{e.path}\0{e.mode:o}\0{e.owner}\0{e.group}\0".encode())
        overlay.update(hashlib.sha256(e.data).digest() if e.data is not None else b"dir")
    return {
        "name": name,
        "os": "openbsd",
        "builder": {"version": BUILDER_VERSION, "git": _git_commit()},
        "site": {"file": site.path.name, "sha256": sets.sha256_file(site.path),
                 "domain": site.domain, "hostname": site.hostname},
        "inputs": {
            "version": o.version, "arch": sets.ARCH, "source": release["source"],
            "signify_key": release["signify_key"], "signify_key_source": release["signify_key_source"],
            "signify_pkg_key_source": release["signify_pkg_key_source"], "sha256_sig": release["sha256_sig"],
            "sets": release["sets"], "site_set": {site_tgz.name: sets.sha256_file(site_tgz)},
            "install_conf_sha256": sets.sha256_file(served / "install.conf"),
            "disklabel_sha256": sets.sha256_file(served / answers.DISKLABEL_NAME),
            "overlay_sha256": overlay.hexdigest(), "disk_size": o.disk_size,
        },
        "packages": release["packages"],
        "secrets_in_image": {
            "dkim_private_keys": [e.path for e in tree.sorted() if e.path.endswith(".key")],
            "ssh_host_keys": "none (removed after the build's first boot; made by rc on the first boot)",
            "tls_key": "none (removed after the build's first boot; made by rc.securelevel)",
        },
        "host": {"machine": platform.machine()},
    }


def build_openbsd(site: Site, args) -> Path:
    """Build the OpenBSD image for `site`; returns the published NAME.qcow2.
    args: name (str|None), out (Path|None), raw (bool), verbose (bool), no_cache (bool: fetch
    every file again even if a verified copy is cached), locked (bool: the sets
    must match SITE.lock.json's OpenBSD section; its epoch dates the site set)."""
    from ..build import _sigterm_as_interrupt
    from ..export_image import publish
    progress = Progress(verbose=getattr(args, "verbose", False))
    out_dir = Path(getattr(args, "out", None) or paths.IMAGES)
    name = getattr(args, "name", None) or site.domain
    o = site.model.openbsd
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = ob_lock = None
    if getattr(args, "locked", False):
        lock, ob_lock = locked_release(site)      # before anything is fetched or written
    with _sigterm_as_interrupt():
        workdir = Path(tempfile.mkdtemp(prefix=".mkmailimage-openbsd.", dir=out_dir))
        try:
            served, tftp = workdir / "served", workdir / "tftp"
            with progress.stage("verify sets", f"OpenBSD {o.version}/{sets.ARCH}"):
                release = stage_release(site, served, tftp, use_cache=not getattr(args, "no_cache", False),
                                        log=progress.say)
                if lock is not None:
                    check_locked(release, ob_lock, lock.path)
            with progress.stage("site set"):
                tree = render_tree(site, "openbsd")
                plan = siteset.PackagePlan(f"{BASE_URL}/{answers.packages_dir(o.version)}",
                                           release["package_order"])
                epoch = lock.epoch if lock is not None else \
                    int(os.environ.get("SOURCE_DATE_EPOCH", siteset.DEFAULT_MTIME))
                site_tgz = siteset.write_site_set(site, tree, plan, served / answers.server_dir(o.version), epoch)
                write_answers(site, served)
            disk = workdir / f"{name}.raw"
            subprocess.run(["truncate", "-s", o.disk_size, str(disk)], check=True)
            install_log, boot_log = workdir / "install.serial.log", workdir / "firstboot.serial.log"
            with progress.stage("install", "OpenBSD autoinstall in QEMU (TCG: slow)"):
                run_install(site, served, tftp, disk, workdir, install_log, progress)
            with progress.stage("first boot"):
                run_first_boot(disk, workdir, boot_log, progress)
            serial = workdir / f"{name}.serial.log"
            serial.write_bytes(install_log.read_bytes() + b"\n" + boot_log.read_bytes())
            with progress.stage("export"):
                outputs = publish(workdir, out_dir, name, disk,
                                  manifest(site, name, release, tree, site_tgz, served), progress,
                                  keep_raw=getattr(args, "raw", False), serial_log=serial)
        except BaseException:
            _keep_logs(workdir, out_dir, name, progress)
            raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return outputs["qcow2"]


def _keep_logs(workdir: Path, out_dir: Path, name: str, progress: Progress) -> None:
    """A failed build keeps its serial logs (never an image) for the post-mortem."""
    for log in ("install.serial.log", "firstboot.serial.log"):
        src = workdir / log
        if src.exists():
            dest = out_dir / f"{name}.failed.{log}"
            shutil.copyfile(src, dest)
            progress.say(f"kept {dest}")
