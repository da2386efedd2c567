"""The disk level of an image: raw view, partition table, which filesystem each partition holds."""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError, ToolMissing
from ..cache import sha256_file

SECTOR = 512


@dataclass
class Partition:
    number: int            # 1-based, as the kernel would name it; 0 = the whole disk (no table)
    start: int             # bytes
    size: int              # bytes
    type: str = ""
    uuid: str = ""
    name: str = ""
    bootable: bool = False


def need(tool: str, package: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if not path:
        raise ToolMissing(tool, package)
    return path


def image_format(image: Path) -> str:
    out = subprocess.run([need("qemu-img", "qemu-utils"), "info", "--output=json", str(image)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise BuildError(f"{image}: qemu-img cannot read it: {out.stderr.strip()}")
    return json.loads(out.stdout)["format"]


@contextlib.contextmanager
def raw_view(image: Path):
    """Yield a raw file with the image's bytes: the image itself, or a temporary conversion
    (qcow2, vmdk ...) removed afterwards."""
    image = Path(image)
    if not image.is_file():
        raise BuildError(f"{image}: no such image file")
    if image_format(image) == "raw":
        yield image
        return
    with tempfile.TemporaryDirectory(prefix="mkmailimage-raw-") as tmp:
        raw = Path(tmp) / "image.raw"
        out = subprocess.run([need("qemu-img", "qemu-utils"), "convert", "-O", "raw", str(image), str(raw)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise BuildError(f"{image}: qemu-img convert failed: {out.stderr.strip()}")
        yield raw


def partition_table(raw: Path) -> tuple[dict, list[Partition]]:
    """(table facts, partitions). An image without a table is one whole-disk 'partition' 0."""
    out = subprocess.run([need("sfdisk", "fdisk"), "--json", str(raw)], capture_output=True, text=True)
    size = raw.stat().st_size
    if out.returncode != 0 or not out.stdout.strip():
        return {"label": "none"}, [Partition(0, 0, size)]
    t = json.loads(out.stdout)["partitiontable"]
    sector = t.get("sectorsize", SECTOR)
    parts = []
    for p in t.get("partitions", []):
        number = int(p["node"][len(str(raw)):].lstrip("p") or 0)
        parts.append(Partition(number, p["start"] * sector, p["size"] * sector, str(p.get("type", "")),
                               p.get("uuid", ""), p.get("name", ""), bool(p.get("bootable", False))))
    facts = {"label": t["label"], "id": t.get("id", "")}
    return facts, sorted(parts, key=lambda p: p.number)


def probe(raw: Path, part: Partition) -> dict:
    """blkid's view of the filesystem in a partition: TYPE, UUID, LABEL ... ({} when none)."""
    out = subprocess.run([need("blkid", "util-linux"), "-p", "-O", str(part.start), "-S", str(part.size),
                          "-o", "export", str(raw)], capture_output=True, text=True)
    facts = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key and key != "DEVNAME":
            facts[key] = value
    return facts


def sha256_range(raw: Path, start: int, length: int) -> str:
    h = hashlib.sha256()
    with open(raw, "rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()

