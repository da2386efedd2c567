"""Publish a built image: qcow2 (compressed) and optional raw, manifest, SHA256SUMS.

Every output is written under a temporary name in the output directory and renamed into
place only when all of them are complete, so `NAME.qcow2` existing means the build finished."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from .cache import sha256_file
from .errors import ToolMissing
from .lock import dpkg_installed
from .progress import Progress


def dpkg_packages(tree: Path) -> dict[str, str]:
    """package[:arch] -> version of every installed package in the tree's dpkg status."""
    return packages_from_status((Path(tree) / "var/lib/dpkg/status").read_text())


def packages_from_status(status: str) -> dict[str, str]:
    """package[:arch] -> version of every installed package in a dpkg status file's text."""
    return dict(sorted((f"{name}:{arch}" if arch not in ("", "all", "amd64") else name, version)
                       for name, arch, version in dpkg_installed(status)))


def to_qcow2(raw: Path, dest: Path, progress: Progress) -> None:
    qemu_img = shutil.which("qemu-img")
    if not qemu_img:
        raise ToolMissing("qemu-img", "qemu-utils")
    # zstd: about a tenth of zlib's CPU time here; readable by QEMU >= 5.1 (qemu-img convert
    # to another format or `mkmailimage export` for older consumers)
    # -m 1: one request in flight, so compressed clusters land in order and equal raw images
    # give equal qcow2 files (with the default 8 the layout follows thread timing)
    progress.run([qemu_img, "convert", "-m", "1", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
                  str(raw), str(dest)], what="export: qemu-img convert")


def publish(workdir: Path, out_dir: Path, name: str, raw: Path, manifest: dict, progress: Progress,
            keep_raw: bool = False, serial_log: Path | None = None) -> dict[str, Path]:
    """Convert and rename into `out_dir`. Returns {kind: final path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, tuple[Path, Path]] = {}     # kind -> (temporary, final)

    def stage(kind: str, final_name: str) -> Path:
        tmp = out_dir / f".{final_name}.{os.getpid()}.tmp"
        staged[kind] = (tmp, out_dir / final_name)
        return tmp

    try:
        to_qcow2(raw, stage("qcow2", f"{name}.qcow2"), progress)
        if keep_raw:
            os.link(raw, stage("raw", f"{name}.raw")) if raw.stat().st_dev == out_dir.stat().st_dev \
                else shutil.copyfile(raw, stage("raw", f"{name}.raw"))
        sums = {final.name: sha256_file(tmp) for tmp, final in staged.values()}
        manifest = {**manifest, "outputs": sums}
        stage("manifest", f"{name}.manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if serial_log is not None and serial_log.exists():
            shutil.copyfile(serial_log, stage("serial", f"{name}.serial.log"))
        stage("sums", "SHA256SUMS").write_text(_merged_sums(out_dir / "SHA256SUMS", {
            **sums, f"{name}.manifest.json": sha256_file(staged["manifest"][0])}))
        # the image last: its presence means everything beside it is complete
        for kind in sorted(staged, key=lambda k: k == "qcow2"):
            tmp, final = staged[kind]
            os.replace(tmp, final)
        return {kind: final for kind, (_, final) in staged.items()}
    finally:
        for tmp, _ in staged.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _merged_sums(path: Path, new: dict[str, str]) -> str:
    """SHA256SUMS lines for this image, keeping other images' lines in the same directory."""
    lines = {}
    if path.exists():
        for line in path.read_text().splitlines():
            digest, _, fname = line.partition("  ")
            if fname and fname not in new:
                lines[fname] = digest
    lines.update(new)
    return "".join(f"{d}  {f}\n" for f, d in sorted(lines.items()))
