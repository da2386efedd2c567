"""Where two raw images differ byte by byte, for the differences no manifest field shows (an
inode's generation number, a free block's leftovers, journal contents ...).

The images are compared in 4 KiB blocks; each run of differing blocks is named by the partition
it falls in and, inside ext4, by what owns it (debugfs `icheck` -> inode, `ncheck` -> path; a
block no inode owns is file system metadata: superblock copies, group descriptors, bitmaps,
inode tables, or free space)."""
from __future__ import annotations

import re
from pathlib import Path

from .ext4 import Ext4Reader

BLOCK = 4096
MAX_RUNS = 20


def differing_runs(a: Path, b: Path, limit: int = 10_000) -> list[tuple[int, int]]:
    """[(first byte, length)] of differing 4 KiB-aligned runs (at most `limit` blocks looked at)."""
    runs: list[list[int]] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if not ca and not cb:
                break
            if ca != cb:
                for i in range(0, max(len(ca), len(cb)), BLOCK):
                    if ca[i:i + BLOCK] != cb[i:i + BLOCK]:
                        start = offset + i
                        if runs and runs[-1][0] + runs[-1][1] == start:
                            runs[-1][1] += BLOCK
                        else:
                            runs.append([start, BLOCK])
                        limit -= 1
                        if limit <= 0:
                            return [tuple(r) for r in runs]
            offset += max(len(ca), len(cb))
    return [tuple(r) for r in runs]


def explain(a: Path, b: Path, partitions: list[dict]) -> list[str]:
    """One line per differing run: where it is and what it holds (read from image `a`)."""
    lines = []
    runs = differing_runs(a, b)
    for start, length in runs[:MAX_RUNS]:
        part = next((p for p in partitions if p["start"] <= start < p["start"] + p["size"]), None)
        where = f"bytes {start}..{start + length - 1}"
        if part is None:
            what = "outside every partition (boot code, partition table, gap)"
        else:
            what = f"partition {part['number']}"
            fs = (part.get("filesystem") or {}).get("TYPE", "")
            if fs in ("ext2", "ext3", "ext4"):
                what += ": " + _ext4_owner(a, part["start"], start - part["start"], length,
                                           int(part.get("superblock", {}).get("Block size", BLOCK)))
            elif fs:
                what += f" ({fs})"
        lines.append(f"~ {where}: {what}")
    if len(runs) > MAX_RUNS:
        lines.append(f"~ ... and {len(runs) - MAX_RUNS} more differing runs")
    return lines


_GROUP = re.compile(r"Group\s+(\d+): block bitmap at (\d+), inode bitmap at (\d+), inode table at (\d+)")


def _ext4_owner(raw: Path, part_start: int, rel: int, length: int, block_size: int) -> str:
    blocks = list(range(rel // block_size, (rel + length - 1) // block_size + 1))[:64]
    r = Ext4Reader(raw, part_start)
    first = f"ext4 blocks {blocks[0]}..{blocks[-1]}"
    layout = _layout(r, block_size)
    kinds, table_inodes = set(), set()
    for b in blocks:
        kind, inodes = _metadata_kind(b, layout)
        if kind:
            kinds.add(kind)
            table_inodes |= inodes
    if kinds:
        names = _names(r, table_inodes)
        return f"{first}: {', '.join(sorted(kinds))}" + (f" (inodes of {names})" if names else "")
    out = r.sections(["icheck " + " ".join(map(str, blocks))])
    inodes = set()
    for section in out.values():
        for line in section:
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                inodes.add(int(parts[1]))
    if not inodes:
        return f"{first}: metadata or free space (no inode owns them)"
    return f"{first}: data of {_names(r, inodes)}"


def _layout(r: Ext4Reader, block_size: int) -> dict:
    sb = r.superblock()
    groups = []
    for line in r.sections(["stats"])["stats"]:
        m = _GROUP.search(line)
        if m:
            groups.append(tuple(int(x) for x in m.groups()))
    ipg, isize = int(sb.get("Inodes per group", 0)), int(sb.get("Inode size", 256))
    return {"groups": groups, "ipg": ipg, "isize": isize, "bs": block_size,
            "table_blocks": max(1, ipg * isize // block_size)}


def _metadata_kind(block: int, layout: dict) -> tuple[str | None, set[int]]:
    if block == 0:
        return "superblock", set()
    for g, bbitmap, ibitmap, table in layout["groups"]:
        if block == bbitmap:
            return f"block bitmap of group {g}", set()
        if block == ibitmap:
            return f"inode bitmap of group {g}", set()
        if table <= block < table + layout["table_blocks"]:
            per_block = layout["bs"] // layout["isize"]
            first = g * layout["ipg"] + (block - table) * per_block + 1
            return f"inode table of group {g}", set(range(first, first + per_block))
    return None, set()


def _names(r: Ext4Reader, inodes: set[int]) -> str:
    if not inodes:
        return ""
    out = r.sections(["ncheck " + " ".join(map(str, sorted(inodes)))])
    paths = sorted({"/" + line.split(None, 1)[1].lstrip("/") for sec in out.values() for line in sec
                    if len(line.split(None, 1)) == 2 and line.split(None, 1)[0].isdigit()})
    special = [f"reserved inode {i}" + (" (journal)" if i == 8 else "") for i in sorted(inodes)
               if i < 11 and i != 2 and len(inodes) <= 16]
    shown = paths[:5] + (["..."] if len(paths) > 5 else []) + special
    return ", ".join(shown)
