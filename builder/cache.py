"""The build cache under `paths.cache_dir()`: content-addressed downloads and keyed layers.

- `debs/<sha256>.deb`: every .deb a build fetched, named by its own sha256. A file is only ever
  used after it was hashed again and matched the sha256 that apt's signed indexes give for it
  (see builder.debian.debcache), so a corrupted entry is dropped and fetched again.
- `layers/<name>-<key>.tar` (+ `.json`): a cached filesystem layer; `key` is the sha256 of
  everything that went into it (see `input_key`), so any input change picks a new file.
Everything is written to a temporary name in the same directory and renamed, so a killed
build never leaves a half-written entry that a later build would trust.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

from . import paths


def root() -> Path:
    return Path(paths.cache_dir())


def debs_dir() -> Path:
    d = root() / "debs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def layers_dir() -> Path:
    d = root() / "layers"
    d.mkdir(parents=True, exist_ok=True)
    return d


def input_key(inputs: dict) -> str:
    """sha256 of a JSON-serialisable dict, independent of key order."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    """sha256 of a file's bytes. Holes of a sparse file (a 4 GiB raw image holds ~0.7 GiB of
    data) are hashed as zeros from memory instead of being read: the same digest, in a fraction
    of the time (reading the holes through the kernel cost 12 s of the 14 s here)."""
    h = hashlib.sha256()
    zeros = memoryview(bytes(bufsize))
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            data = _next_data(fd, pos, size)
            while pos < data:                           # a hole: zeros up to the next data
                n = min(bufsize, data - pos)
                h.update(zeros[:n])
                pos += n
            if pos >= size:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)        # the data runs up to the next hole
            end = end if end > pos else size             # (never stall on an odd file system)
            os.lseek(fd, pos, os.SEEK_SET)
            while pos < end:
                chunk = f.read(min(bufsize, end - pos))
                if not chunk:                           # the file shrank while being read
                    return h.hexdigest()
                h.update(chunk)
                pos += len(chunk)
    return h.hexdigest()


def _next_data(fd: int, pos: int, size: int) -> int:
    """Offset of the first data at or after `pos` (`size` if only a hole is left). File systems
    without SEEK_DATA report everything as data, which is still correct."""
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return size
        raise


@contextlib.contextmanager
def atomic_path(final: Path, suffix: str = ""):
    """Yield a temporary path beside `final`; rename it to `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def locked(name: str):
    """Serialise builders of the same cache entry (parallel test workers, two shells)."""
    lockfile = root() / f".{name}.lock"
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    with open(lockfile, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
