"""mmdebstrap hooks that keep downloaded .debs in the content-addressed cache (`cache.debs_dir()`).

`sync-in` (setup hook) refreshes the new root's apt indexes (apt checks the Release signature
and the Packages hashes), then offers apt only those cached .debs whose sha256, hashed again now,
equals the one the signed Packages index gives. A cached file that does not match is deleted and
apt downloads it again (apt itself trusts a file already in its archive by its size alone, so
this check is the one that catches a corrupted cache). `sync-out` (customize hook) stores every
.deb apt left behind under its sha256. Run by mmdebstrap as
`python -m builder.debian.debcache sync-in|sync-out ROOT CACHE_DIR`.
"""
from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..cache import sha256_file

ARCHIVES = "var/cache/apt/archives"
LISTS = "var/lib/apt/lists"


def apt_archive_name(package: str, version: str, arch: str) -> str:
    """The file name apt gives a .deb in /var/cache/apt/archives (epoch colon escaped)."""
    return f"{package}_{version.replace(':', '%3a')}_{arch}.deb"


def _open_index(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", errors="replace")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", errors="replace")
    return open(path, errors="replace")


def index_hashes(root: Path, wanted: set[str]) -> dict[str, str]:
    """sha256 -> apt archive name, for the sha256s in `wanted` found in root's Packages indexes."""
    found: dict[str, str] = {}
    for index in sorted((root / LISTS).glob("*_Packages*")):
        if index.suffix in (".lz4", ".zst"):
            continue
        fields: dict[str, str] = {}
        with _open_index(index) as f:
            for line in f:
                if line == "\n":
                    _take(fields, wanted, found)
                    fields = {}
                elif line[0] != " " and ":" in line:
                    k, _, v = line.partition(":")
                    if k in ("Package", "Version", "Architecture", "SHA256"):
                        fields[k] = v.strip()
            _take(fields, wanted, found)
    return found


def _take(fields, wanted, found):
    sha = fields.get("SHA256")
    if sha in wanted and {"Package", "Version", "Architecture"} <= fields.keys():
        found[sha] = apt_archive_name(fields["Package"], fields["Version"], fields["Architecture"])


def sync_in(root: Path, cache: Path, log=sys.stderr) -> tuple[int, int]:
    """Place verified cached .debs into root's apt archive. Returns (used, discarded)."""
    env = dict(os.environ)
    if env.get("MMDEBSTRAP_APT_CONFIG"):
        env["APT_CONFIG"] = env["MMDEBSTRAP_APT_CONFIG"]
    # the indexes are needed now to know what each .deb must hash to; mmdebstrap's own
    # update right after this finds them current
    subprocess.run(["apt-get", "update", "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
    cached = {p.name[:-4]: p for p in cache.glob("*.deb") if len(p.name) == 68}
    known = index_hashes(root, set(cached))
    archives = root / ARCHIVES
    archives.mkdir(parents=True, exist_ok=True)
    used = discarded = 0
    for sha, name in sorted(known.items()):
        src = cached[sha]
        actual = sha256_file(src)
        if actual != sha:
            print(f"debcache: {src.name} is corrupted (sha256 {actual}); discarded, fetching it again",
                  file=log, flush=True)
            src.unlink()
            discarded += 1
            continue
        dst = archives / name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        used += 1
    print(f"debcache: {used} verified .debs from the cache, {discarded} discarded", file=log, flush=True)
    return used, discarded


def sync_out(root: Path, cache: Path, log=sys.stderr) -> int:
    """Store every .deb in root's apt archive under its sha256 (apt verified each one it fetched)."""
    stored = 0
    for deb in sorted((root / ARCHIVES).glob("*.deb")):
        sha = sha256_file(deb)
        final = cache / f"{sha}.deb"
        if final.exists():
            continue
        tmp = cache / f".{sha}.deb.tmp{os.getpid()}"
        shutil.copyfile(deb, tmp)
        os.replace(tmp, final)
        stored += 1
    print(f"debcache: stored {stored} new .debs", file=log, flush=True)
    return stored


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    action, root, cache = argv[0], Path(argv[1]), Path(argv[2])
    cache.mkdir(parents=True, exist_ok=True)
    if action == "sync-in":
        sync_in(root, cache)
    elif action == "sync-out":
        sync_out(root, cache)
    else:
        print(f"unknown action {action}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
