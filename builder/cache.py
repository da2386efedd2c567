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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


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
