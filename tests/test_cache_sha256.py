"""cache.sha256_file hashes the holes of sparse files from memory; the digest must be the one
of the file's bytes whatever the layout (checked against hashlib over a plain read)."""
import hashlib
import os

import pytest

from builder.cache import sha256_file

MiB = 1 << 20


def _plain(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sparse(path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)


@pytest.mark.parametrize("layout", [
    "hole-data-hole", "data-at-start", "data-at-end", "only-hole", "unaligned", "empty"])
def test_sparse_files_hash_like_their_bytes(tmp_path, layout):
    p = tmp_path / "disk.raw"
    rnd = os.urandom(3 * MiB + 123)
    size, pieces = {
        "hole-data-hole": (16 * MiB, [(5 * MiB, rnd)]),
        "data-at-start": (9 * MiB, [(0, rnd)]),
        "data-at-end": (9 * MiB, [(9 * MiB - len(rnd), rnd)]),
        "only-hole": (7 * MiB + 5, []),
        "unaligned": (10 * MiB + 77, [(12345, b"x" * 5000), (4 * MiB + 1, rnd), (10 * MiB, b"tail")]),
        "empty": (0, []),
    }[layout]
    _sparse(p, size, pieces)
    assert p.stat().st_size == size
    if layout == "hole-data-hole":
        # the point of the test: the file really has holes here (tmpfs and ext4 both make them)
        assert p.stat().st_blocks * 512 < size
    assert sha256_file(p) == _plain(p)


def test_small_buffer_still_gives_the_same_digest(tmp_path):
    p = tmp_path / "f"
    _sparse(p, 3 * MiB, [(MiB + 7, os.urandom(1000))])
    assert sha256_file(p, bufsize=4096) == _plain(p)
