"""Files of a booted guest, for file systems the host cannot read (OpenBSD's FFS): the guest's own
`tar` (OpenBSD, Debian and busybox all have one) streams the tree over an SSH exec channel
(builder.machine), and the archive is read on the fly: types, modes, owners, sizes, mtimes,
link targets, hard links and a sha256 of every file, never stored on disk.

tar carries no ctime/atime/crtime and, portably, no xattrs: a guest manifest says so in
`recorded`, and `mkmailimage diff` compares only what both sides recorded."""
from __future__ import annotations

import hashlib
import shlex
import tarfile

from ..errors import BuildError
from .ext4 import PRIVATE_KEY_MARK, PRIVATE_KEY_PEM

VOLATILE = {"proc", "sys", "dev", "run", "tmp"}   # kernel views and scratch, not the installed system
# hard links are kept when the guest's tar stores them as links (OpenBSD's, GNU's) but busybox's
# stores each name in full: not a field two manifests can be compared on
RECORDED = ["path", "type", "mode", "uid", "gid", "owner", "size", "sha256", "target", "rdev", "mtime"]
TAR_TYPES = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir",
             tarfile.SYMTYPE: "symlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
             tarfile.FIFOTYPE: "fifo", tarfile.CONTTYPE: "file"}


def guest_roots(machine) -> list[str]:
    """The top-level directories of the guest's / that hold the installed system."""
    names = machine.succeed("ls -A /").split()
    return ["/" + n for n in sorted(names) if n not in VOLATILE]


def guest_files(machine, roots: list[str] | None = None) -> list[dict]:
    """Manifest entries (sorted by path) for everything under `roots` (default: guest_roots)."""
    roots = roots or guest_roots(machine)
    rel = " ".join(shlex.quote("." + r if r.startswith("/") else r) for r in roots)
    transport = machine._ssh().get_transport()
    chan = transport.open_session()
    chan.exec_command(f"cd / && tar -cf - {rel}")
    entries: dict[str, dict] = {}
    try:
        with tarfile.open(fileobj=chan.makefile("rb"), mode="r|") as tar:
            for member in tar:
                entries_add(entries, tar, member)
    except tarfile.TarError as e:
        raise BuildError(f"{machine.name}: reading the guest's tar stream failed: {e}") from None
    status = chan.recv_exit_status()
    err = chan.makefile_stderr("rb").read().decode(errors="replace").strip()
    if status != 0:
        raise BuildError(f"{machine.name}: tar in the guest exited {status}: {err[-500:]}")
    return [entries[p] for p in sorted(entries)]


def entries_add(entries: dict[str, dict], tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
    path = "/" + m.name.lstrip("./").rstrip("/") if m.name not in (".", "./") else "/"
    e = {"path": path, "mode": f"{m.mode & 0o7777:04o}", "uid": m.uid, "gid": m.gid,
         "owner": f"{m.uname or m.uid}:{m.gname or m.gid}", "mtime": int(m.mtime)}
    if m.islnk():
        first = "/" + m.linkname.lstrip("./")
        target = entries.get(first, {})
        e.update(type="file", hardlink=first, size=target.get("size"), sha256=target.get("sha256"))
        if target.get("private_key"):
            e["private_key"] = True
    else:
        e["type"] = TAR_TYPES.get(m.type, "unknown")
        if m.issym():
            e["target"], e["size"] = m.linkname, len(m.linkname.encode())
        elif m.ischr() or m.isblk():
            e["rdev"] = f"{m.devmajor}:{m.devminor}"
        elif m.isfile():
            e["size"] = m.size
            e["sha256"], key = _hash(tar.extractfile(m))
            if key:
                e["private_key"] = True
    entries[path] = e


def _hash(f) -> tuple[str, bool]:
    h = hashlib.sha256()
    key = False
    tail = b""
    while chunk := f.read(1 << 20):
        h.update(chunk)
        if not key:
            window = tail + chunk
            key = PRIVATE_KEY_MARK in window and PRIVATE_KEY_PEM.search(window) is not None
            tail = chunk[-256:]
    return h.hexdigest(), key
