"""Assemble a partitioned disk image from a directory tree, without loop devices or mounts.

Layout (MBR, so one disk boots under SeaBIOS and OVMF alike):

    sector 0          GRUB boot.img (first 440 bytes) + partition table, fixed disk id
    sectors 1..2047   GRUB core.img (i386-pc); its first sector carries the blocklist
    partition 1       EFI System Partition (type 0xef, FAT32, fixed volume id):
                      EFI/BOOT/BOOTX64.EFI, a GRUB x86_64-efi image
    partition 2       root ext4 (type 0x83), made by `mke2fs -d TREE -E offset=...`

Both GRUB images are made with the image's own grub-mkimage (run inside the tree) and embed
a small config that finds the root file system by its UUID, so disk order does not matter;
/boot/grub/grub.cfg then boots /vmlinuz with a serial console. Every identifier comes from
`Seeds`, and file systems are written with a fixed clock, so the same tree gives the same disk.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError, ToolMissing
from ..progress import Progress

SECTOR = 512
ESP_START = 2048                       # 1 MiB: room for core.img before the first partition
ESP_SECTORS = 64 * 2048                # 64 MiB
ROOT_START = ESP_START + ESP_SECTORS
MBR_BOOT_CODE = 440
DRIVE_CHECK = 0x66                     # boot.img's "is the boot drive a floppy?" jump (grub-setup NOPs it)

BIOS_MODULES = ["biosdisk", "part_msdos", "ext2", "search", "search_fs_uuid", "normal", "linux", "serial",
                "terminal", "echo", "test", "gzio", "configfile"]
EFI_MODULES = ["part_msdos", "part_gpt", "fat", "ext2", "search", "search_fs_uuid", "normal", "linux",
               "serial", "terminal", "echo", "test", "gzio", "configfile", "efi_gop"]

KERNEL_CMDLINE = "ro console=tty0 console=ttyS0,115200"


@dataclass(frozen=True)
class Seeds:
    """Every identifier written into the disk. Derive them from one string (`from_string`) so a
    lock file needs to keep only that string."""
    root_uuid: str
    hash_seed: str
    esp_volume_id: str        # 8 hex digits
    disk_id: str              # 8 hex digits (MBR disk signature)

    @classmethod
    def from_string(cls, seed: str) -> "Seeds":
        ns = uuid.uuid5(uuid.NAMESPACE_URL, "mkmailimage:" + seed)
        esp = uuid.uuid5(ns, "esp").hex[:8]
        disk = uuid.uuid5(ns, "disk").hex[:8]
        return cls(str(uuid.uuid5(ns, "root")), str(uuid.uuid5(ns, "hash_seed")), esp, disk)


def parse_size(text: str) -> int:
    n, unit = int(text[:-1]), text[-1].upper()
    return n * {"M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if not path:
        raise ToolMissing(tool, package)
    return path


def in_tree(tree: Path, cmd: list[str]) -> list[str]:
    """Run a command of the image itself (its grub-mkimage). The build runs as root or as root
    of a user namespace (builder.userns), where chroot is allowed too."""
    return ["chroot", str(tree), *cmd]


def kernel_paths(tree: Path) -> tuple[str, str]:
    """Paths of the kernel and initrd to boot, preferring Debian's /vmlinuz symlinks."""
    for k, i in (("vmlinuz", "initrd.img"), ("boot/vmlinuz", "boot/initrd.img")):
        if (tree / k).is_symlink() and (tree / i).is_symlink():
            return "/" + k, "/" + i
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise BuildError("disk: no kernel in /boot of the image tree (is linux-image-amd64 installed?)")
    version = kernels[-1].name[len("vmlinuz-"):]
    if not (tree / f"boot/initrd.img-{version}").exists():
        raise BuildError(f"disk: /boot/initrd.img-{version} is missing (initramfs-tools failed?)")
    return f"/boot/vmlinuz-{version}", f"/boot/initrd.img-{version}"


def prepare_tree(tree: Path, seeds: Seeds) -> None:
    """Write what booting needs into the tree: grub.cfg, GRUB's modules, fstab."""
    kernel, initrd = kernel_paths(tree)
    grub = tree / "boot/grub"
    grub.mkdir(parents=True, exist_ok=True)
    (grub / "grub.cfg").write_text(
        "# written by mkmailimage; the boot images find this file system by UUID\n"
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        "set timeout=1\n"
        "menuentry 'Debian GNU/Linux (mkmailimage)' {\n"
        f"\tsearch --no-floppy --fs-uuid --set=root {seeds.root_uuid}\n"
        f"\tlinux {kernel} root=UUID={seeds.root_uuid} {KERNEL_CMDLINE}\n"
        f"\tinitrd {initrd}\n"
        "}\n")
    # modules beside grub.cfg, frozen together with the core images made from them
    for platform in ("i386-pc", "x86_64-efi"):
        src = tree / "usr/lib/grub" / platform
        dst = grub / platform
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, symlinks=True,
                        ignore=shutil.ignore_patterns("*.image", "*.exec", "*.module", "kernel.img"))
    (tree / "etc/fstab").write_text(
        "# <file system>\t<mount point>\t<type>\t<options>\t<dump>\t<pass>\n"
        f"UUID={seeds.root_uuid}\t/\text4\terrors=remount-ro\t0\t1\n")


def grub_images(tree: Path, seeds: Seeds, workdir: Path, progress: Progress) -> tuple[Path, Path]:
    """(core.img, BOOTX64.EFI) made by the tree's own grub-mkimage."""
    early = ("search --no-floppy --fs-uuid --set=root " + seeds.root_uuid + "\n"
             "set prefix=($root)/boot/grub\n")
    scratch = Path(tempfile.mkdtemp(prefix="mkmailimage-grub.", dir=tree / "tmp"))
    try:
        (scratch / "early.cfg").write_text(early)
        inner = "/" + scratch.relative_to(tree).as_posix()
        for fmt, out, mods in (("i386-pc", "core.img", BIOS_MODULES),
                               ("x86_64-efi", "BOOTX64.EFI", EFI_MODULES)):
            progress.run(in_tree(tree, ["grub-mkimage", "-O", fmt, "-o", f"{inner}/{out}",
                                        "-c", f"{inner}/early.cfg", "-p", "/boot/grub", *mods]),
                         what=f"disk: grub-mkimage -O {fmt}")
            shutil.move(scratch / out, workdir / out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    core = workdir / "core.img"
    if core.stat().st_size > (ESP_START - 1) * SECTOR:
        raise BuildError(f"disk: core.img is {core.stat().st_size} bytes, larger than the "
                         f"{(ESP_START - 1) * SECTOR} bytes before the first partition")
    return core, workdir / "BOOTX64.EFI"


def make_esp(path: Path, efi_binary: Path, seeds: Seeds, epoch: int, progress: Progress) -> None:
    mkfs = _need("mkfs.vfat", "dosfstools")
    mcopy = _need("mcopy", "mtools")
    mmd = _need("mmd", "mtools")
    with open(path, "wb") as f:
        f.truncate(ESP_SECTORS * SECTOR)
    # FAT stores local time: without TZ=UTC the ESP's timestamps follow the build host's zone
    env = {"SOURCE_DATE_EPOCH": str(epoch), "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}
    progress.run([mkfs, "-F", "32", "-s", "1", "-n", "ESP", "-i", seeds.esp_volume_id,
                  "--invariant", str(path)], env=env)
    os.utime(efi_binary, (epoch, epoch))
    progress.run([mmd, "-i", str(path), "::EFI", "::EFI/BOOT"], env=env)
    progress.run([mcopy, "-m", "-i", str(path), str(efi_binary), "::EFI/BOOT/BOOTX64.EFI"], env=env)


def partition(raw: Path, size: int, seeds: Seeds, progress: Progress) -> None:
    sfdisk = _need("sfdisk", "fdisk")
    table = (f"label: dos\nlabel-id: 0x{seeds.disk_id}\nunit: sectors\n\n"
             f"start={ESP_START}, size={ESP_SECTORS}, type=ef\n"
             f"start={ROOT_START}, type=83, bootable\n")
    progress.run([sfdisk, "--no-reread", "--no-tell-kernel", "-q", str(raw)], input=table.encode())


def make_root(raw: Path, tree: Path, size: int, seeds: Seeds, epoch: int, progress: Progress) -> None:
    mke2fs = _need("mke2fs", "e2fsprogs")
    offset = ROOT_START * SECTOR
    blocks = (size - offset) // 4096
    env = {"E2FSPROGS_FAKE_TIME": str(epoch), "SOURCE_DATE_EPOCH": str(epoch),
           "MKE2FS_CONFIG": "/etc/mke2fs.conf"}
    progress.run([mke2fs, "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "root", "-U", seeds.root_uuid,
                  "-E", f"offset={offset},hash_seed={seeds.hash_seed},root_owner=0:0",
                  "-d", str(tree), str(raw), str(blocks)], env=env)
    # mke2fs 1.47.0 copies ctime/atime from the extracted tree (the time of extraction)
    from ..reproducible import fix_ext4_times
    fix_ext4_times(raw, offset, epoch)


def write_boot_code(raw: Path, tree: Path, core: Path, esp: Path) -> None:
    boot = (tree / "usr/lib/grub/i386-pc/boot.img").read_bytes()
    if len(boot) != SECTOR:
        raise BuildError("disk: the image's GRUB boot.img is not one sector long")
    code = bytearray(boot[:MBR_BOOT_CODE])
    code[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
    with open(raw, "r+b") as f:
        f.seek(0)
        f.write(code)
        f.seek(SECTOR)
        f.write(core.read_bytes())
        f.seek(ESP_START * SECTOR)
        with open(esp, "rb") as e:
            shutil.copyfileobj(e, f, 1 << 20)


def assemble(tree: Path, raw: Path, size: int, seeds: Seeds, epoch: int, progress: Progress,
             workdir: Path) -> None:
    """Write a bootable raw disk of `size` bytes (sparse) at `raw` from `tree`."""
    if size < (ROOT_START * SECTOR) + (1 << 30):
        raise BuildError(f"disk: {size} bytes is too small for the image")
    prepare_tree(tree, seeds)
    core, efi = grub_images(tree, seeds, workdir, progress)
    with open(raw, "wb") as f:
        f.truncate(size)
    partition(raw, size, seeds, progress)
    esp = workdir / "esp.img"
    make_esp(esp, efi, seeds, epoch, progress)
    # the steps above wrote into the tree (grub.cfg, fstab, /tmp): clamp right before mke2fs
    from .layer import clamp_mtimes
    clamp_mtimes(tree, epoch)
    make_root(raw, tree, size, seeds, epoch, progress)
    write_boot_code(raw, tree, core, esp)
    esp.unlink()
