"""`mkmailimage export` with the real qemu-img, zstd and xz (no VM): every format converts back to
the exact bytes of the source, the .sha256 beside it passes `sha256sum -c`, and an export stopped
half-way leaves no file behind and no child process running."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.errors import MkMailImageError
from builder.export import FORMATS, export_image

MiB = 1 << 20


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)


@pytest.fixture(scope="module")
def small_images(tmp_path_factory) -> dict[str, Path]:
    """A 64 MiB disk with an MBR partition table, random data in two places and zeros elsewhere
    (like a real image: mostly holes), as raw and as qcow2."""
    d = tmp_path_factory.mktemp("src")
    raw = d / "disk.raw"
    run("qemu-img", "create", "-f", "raw", raw, "64M")
    run("sfdisk", "--quiet", raw, input=b"label: dos\nstart=2048, type=83\n")
    with open(raw, "r+b") as f:
        for offset in (1 * MiB, 40 * MiB):
            f.seek(offset)
            f.write(os.urandom(3 * MiB + 123))
    qcow2 = d / "disk.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", raw, qcow2)
    return {"raw": raw, "qcow2": qcow2}


def back_to_raw(exported: Path, fmt: str, work: Path) -> Path:
    """Undo the export with the standard tools a provider or user would use."""
    raw = work / "roundtrip.raw"
    if fmt in ("raw.gz", "raw.zst", "raw.xz"):
        tool = {"raw.gz": "gzip", "raw.zst": "zstd", "raw.xz": "xz"}[fmt]
        with open(raw, "wb") as f:
            subprocess.run([tool, "-d", "-c", str(exported)], stdout=f, check=True)
    else:
        run("qemu-img", "convert", "-O", "raw", exported, raw)
    return raw


@pytest.mark.parametrize("source", ["raw", "qcow2"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_round_trips_and_checksum_verifies(small_images, tmp_path, source, fmt):
    out = tmp_path / f"mail.{fmt}"
    path, digest = export_image(small_images[source], fmt, out)
    assert path == out
    assert digest == sha256(out)
    # the checksum file is in sha256sum's format, next to the file it names
    assert (tmp_path / f"mail.{fmt}.sha256").read_text() == f"{digest}  mail.{fmt}\n"
    run("sha256sum", "--check", "--strict", f"mail.{fmt}.sha256", cwd=tmp_path)
    assert sha256(back_to_raw(out, fmt, tmp_path)) == sha256(small_images["raw"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"mail.{fmt}", f"mail.{fmt}.sha256", "roundtrip.raw"])


def test_format_details_importers_need(small_images, tmp_path):
    vmdk, _ = export_image(small_images["qcow2"], "vmdk", tmp_path / "m.vmdk")
    info = json.loads(run("qemu-img", "info", "--output=json", vmdk).stdout)
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    vhdx, _ = export_image(small_images["raw"], "vhdx", tmp_path / "m.vhdx")
    assert json.loads(run("qemu-img", "info", "--output=json", vhdx).stdout)["format"] == "vhdx"
    # gzip without name and time stamp: exporting twice gives the same file
    _, first = export_image(small_images["qcow2"], "raw.gz", tmp_path / "a.raw.gz")
    _, second = export_image(small_images["raw"], "raw.gz", tmp_path / "b.raw.gz")
    assert first == second
    qcow2, once = export_image(small_images["raw"], "qcow2", tmp_path / "m.qcow2")
    _, again = export_image(small_images["qcow2"], "qcow2", tmp_path / "n.qcow2")
    assert once == again
    assert json.loads(run("qemu-img", "info", "--output=json", qcow2).stdout)["format"] == "qcow2"


def test_cli_default_output_is_beside_the_image(small_images, tmp_path):
    src = tmp_path / "site.qcow2"
    src.write_bytes(small_images["qcow2"].read_bytes())
    proc = subprocess.run([sys.executable, "-m", "builder.cli", "export", str(src), "--format", "raw.zst"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "site.raw.zst").is_file()
    run("sha256sum", "--check", "site.raw.zst.sha256", cwd=tmp_path)
    assert "site.raw.zst" in proc.stdout


def test_bad_inputs_are_named(small_images, tmp_path):
    with pytest.raises(MkMailImageError, match="missing.qcow2: no such image file"):
        export_image(tmp_path / "missing.qcow2", "raw")
    overlay = tmp_path / "overlay.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", small_images["qcow2"], overlay)
    with pytest.raises(MkMailImageError, match="backing file"):
        export_image(overlay, "raw", tmp_path / "o.raw")
    with pytest.raises(MkMailImageError, match="is the input image"):
        export_image(small_images["qcow2"], "qcow2")
    with pytest.raises(MkMailImageError, match="directory does not exist"):
        export_image(small_images["raw"], "raw", tmp_path / "nodir" / "x.raw")
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(small_images["qcow2"].read_bytes()[:4096])   # header only, truncated
    with pytest.raises(MkMailImageError, match="broken.qcow2"):
        export_image(broken, "raw", tmp_path / "b.raw")


@pytest.fixture(scope="module")
def big_random_raw(tmp_path_factory) -> Path:
    """Incompressible data, so that xz and the streamOptimized writer take seconds: long enough
    to stop the export half-way."""
    path = tmp_path_factory.mktemp("big") / "big.raw"
    with open(path, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    return path


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


@pytest.mark.parametrize("fmt,sig", [("raw.xz", signal.SIGINT), ("raw.xz", signal.SIGTERM),
                                     ("vmdk", signal.SIGTERM)])
def test_interrupted_export_leaves_nothing(big_random_raw, tmp_path, fmt, sig):
    src = tmp_path / "src.raw"
    os.link(big_random_raw, src)
    out = tmp_path / f"out.{fmt}"
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "export", str(src), "--format", fmt,
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    children: set[int] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        parts = [p for p in tmp_path.iterdir() if ".part-" in p.name]
        children = _children(proc.pid)
        if parts and children:
            time.sleep(0.5)   # let the writer get going
            break
        time.sleep(0.02)
    assert proc.poll() is None, "export finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.raw"]
    for child in children:   # the converter/compressor was stopped, not orphaned
        assert not Path(f"/proc/{child}").exists() or \
            Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"
