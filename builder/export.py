"""`mkmailimage export`: convert a built image into the format a provider imports, with its sha256.

Every output is written under a temporary name in the target directory and renamed only once it
is complete, so an interrupted export leaves nothing a user could mistake for a finished image.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cache import sha256_file
from .errors import MkMailImageError, ToolMissing

FORMATS = ("qcow2", "raw", "raw.gz", "raw.zst", "raw.xz", "vmdk", "vhdx")

# qemu-img output format and creation options per export format. streamOptimized is the VMDK
# flavour importers (OVF/OVA, cloud image services) expect: compressed grains, one file.
_QEMU_IMG = {
    # -m 1: with parallel writers compressed clusters land in timing order; one writer makes
    # the same input give the same file
    "qcow2": ["-O", "qcow2", "-c", "-m", "1"],
    "raw": ["-O", "raw"],
    "vmdk": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    "vhdx": ["-O", "vhdx", "-o", "subformat=dynamic"],
}
# Compressors reading a raw image on stdin; -T0 uses every core. gzip -n leaves out the file
# name and time stamp, so the same image always compresses to the same bytes.
_COMPRESS = {
    "raw.gz": (["gzip", "-c", "-n", "-6"], "gzip"),
    "raw.zst": (["zstd", "-q", "-c", "-T0", "-6"], "zstd"),
    "raw.xz": (["xz", "-c", "-T0", "-6"], "xz-utils"),
}
_CHUNK = 4 << 20


class ExportError(MkMailImageError):
    """The image cannot be read or converted."""

    exit_code = 5


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    format: str          # qemu-img's name: "raw", "qcow2", ...
    virtual_size: int    # bytes the guest sees = bytes written to a disk


def need_tool(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if not found:
        raise ToolMissing(tool, package)
    return found


def image_info(path: Path) -> ImageInfo:
    """Format and virtual size from `qemu-img info`; refuses images with a backing file, which
    would silently drag another file into the export."""
    need_tool("qemu-img", "qemu-utils")
    if not path.is_file():
        raise ExportError(f"{path}: no such image file")
    proc = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExportError(f"{path}: qemu-img cannot read it: {proc.stderr.strip()}")
    info = json.loads(proc.stdout)
    if info.get("backing-filename"):
        raise ExportError(f"{path}: has a backing file ({info['backing-filename']}); "
                          "export the image it was built as, not an overlay")
    if info["format"] not in ("raw", "qcow2"):
        raise ExportError(f"{path}: is {info['format']}; export reads the builder's qcow2 or raw images")
    if info["format"] == "qcow2":
        # A truncated or damaged qcow2 converts "successfully" with zeros where data was missing;
        # `qemu-img check` exits 2 on corruption (3 means only leaked clusters, harmless).
        check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(path)], capture_output=True, text=True)
        if check.returncode not in (0, 3):
            summary = next((line for line in check.stdout.splitlines() if "error" in line.lower()),
                           check.stderr.strip().splitlines()[0] if check.stderr.strip() else "check failed")
            raise ExportError(f"{path}: damaged qcow2 image (qemu-img check: {summary})")
    return ImageInfo(path, info["format"], int(info["virtual-size"]))


def default_output(image: Path, fmt: str) -> Path:
    name = image.name
    for suffix in (".qcow2", ".raw", ".img"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return image.with_name(f"{name}.{fmt}")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt for the duration, so `finally` blocks clean up
    temporary files and child processes whichever way the user stops us."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:          # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(cmd: list[str], what: str, stdin=None, stdout=subprocess.DEVNULL) -> None:
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate()
    finally:
        _stop(proc)
    if proc.returncode != 0:
        raise ExportError(f"{what} failed: {err.strip()}")


def _stop(proc: subprocess.Popen) -> None:
    """Make sure a child is gone (used on every exit path, including interrupts)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def raw_view(info: ImageInfo, workdir: Path):
    """A raw file with the image's bytes: the image itself when it is raw, else a sparse
    temporary conversion in `workdir` (removed afterwards). qemu-img cannot write raw to a
    pipe, and a sparse file costs only the image's real data on disk."""
    if info.format == "raw":
        yield info.path
        return
    need_tool("qemu-img", "qemu-utils")
    with tempfile.TemporaryDirectory(prefix=".mkmailimage-raw-", dir=workdir) as tmp:
        raw = Path(tmp) / "image.raw"
        _run(["qemu-img", "convert", "-f", info.format, "-O", "raw", str(info.path), str(raw)],
             f"converting {info.path} to raw")
        yield raw


def _compress(src: Path, dest: Path, fmt: str) -> None:
    cmd, package = _COMPRESS[fmt]
    need_tool(cmd[0], package)
    with open(src, "rb") as inp, open(dest, "wb") as out:
        _run(cmd, cmd[0], stdin=inp, stdout=out)


def export_image(image: Path, fmt: str, out: Path | None = None) -> tuple[Path, str]:
    """Write IMAGE as FORMAT to OUT (default: beside IMAGE) and OUT.sha256 beside it.
    Returns (output path, sha256 hex)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    info = image_info(image)
    out = (out or default_output(image, fmt)).absolute()
    if out.exists() and out.resolve() == image.resolve():
        raise ExportError(f"{out}: is the input image; choose another --out")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: output directory does not exist")
    sumfile = out.with_name(out.name + ".sha256")
    tmp_out = out.with_name(f".{out.name}.part-{os.getpid()}")
    tmp_sum = sumfile.with_name(f".{sumfile.name}.part-{os.getpid()}")
    try:
        with sigterm_as_interrupt():
            if fmt in _QEMU_IMG:
                _run(["qemu-img", "convert", "-f", info.format, *_QEMU_IMG[fmt], str(info.path), str(tmp_out)],
                     f"qemu-img convert to {fmt}")
            else:
                with raw_view(info, out.parent) as raw:
                    _compress(raw, tmp_out, fmt)
            digest = sha256_file(tmp_out)
            # sha256sum's format, with the name as it sits beside the file: `sha256sum -c` works there.
            tmp_sum.write_text(f"{digest}  {out.name}\n")
            os.replace(tmp_out, out)
            os.replace(tmp_sum, sumfile)
    finally:
        tmp_out.unlink(missing_ok=True)
        tmp_sum.unlink(missing_ok=True)
    return out, digest


def cmd_export(args) -> int:
    out, digest = export_image(args.image, args.format, args.out)
    print(f"exported {args.image} as {args.format}: {out} ({out.stat().st_size} bytes)")
    print(f"sha256 {digest}  (in {out.name}.sha256)")
    return 0
