"""Every inode of an ext2/3/4 filesystem inside a raw image, read with e2fsprogs' debugfs through
its `FILE?offset=N` io option: no mount, no loop device, no root.

Three batched debugfs runs do the work: `ls -p` level by level for the tree, `stat` for times,
xattrs and device numbers, `cat` streamed for content hashes (sizes are known, so the stream is
cut exactly; every file's echo line is checked, so a misread can never pass silently)."""
from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
from pathlib import Path

from ..errors import BuildError
from .disk import need

S_IFMT = 0o170000
TYPES = {0o040000: "dir", 0o100000: "file", 0o120000: "symlink", 0o020000: "char",
         0o060000: "block", 0o010000: "fifo", 0o140000: "socket"}
ROOT_INO = 2
PRIVATE_KEY_MARK = b"PRIVATE KEY-----"
# a real PEM private key, not the marker string that ssh/openssl binaries carry as a constant
PRIVATE_KEY_PEM = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=]{16}")
KEEP_CONTENT = ("/etc/passwd", "/etc/group", "/etc/fstab")   # to name owners and mount points


class Ext4Reader:
    def __init__(self, raw: Path, offset: int):
        self.spec = f"{raw}?offset={offset}"
        self.debugfs = need("debugfs", "e2fsprogs")

    def _batch(self, commands: list[str]) -> subprocess.Popen:
        cmdfile = tempfile.NamedTemporaryFile("w", prefix="mkmailimage-debugfs-", suffix=".cmds")
        cmdfile.write("".join(c + "\n" for c in commands))
        cmdfile.flush()
        errfile = tempfile.TemporaryFile()
        proc = subprocess.Popen([self.debugfs, "-f", cmdfile.name, self.spec],
                                stdout=subprocess.PIPE, stderr=errfile)
        proc._mkmailimage_keep = (cmdfile, errfile)   # closed (deleted) with the process object
        return proc

    def _finish(self, proc: subprocess.Popen) -> None:
        proc.stdout.close()
        rc = proc.wait()
        errfile = proc._mkmailimage_keep[1]
        errfile.seek(0)
        errors = [l for l in errfile.read().decode(errors="replace").splitlines()
                  if l.strip() and not l.startswith("debugfs ")]
        if rc != 0 or errors:
            raise BuildError(f"debugfs on {self.spec}: " + ("; ".join(errors[:5]) or f"exit {rc}"))

    def sections(self, commands: list[str]) -> dict[str, list[str]]:
        """Run commands, return each command's output lines (text commands only)."""
        proc = self._batch(commands)
        sections: dict[str, list[str]] = {}
        current = None
        for raw_line in proc.stdout:
            line = raw_line.decode("utf-8", errors="surrogateescape").rstrip("\n")
            if line.startswith("debugfs: "):
                current = sections.setdefault(line[len("debugfs: "):], [])
            elif current is not None:
                current.append(line)
        self._finish(proc)
        return sections

    def superblock(self) -> dict[str, str]:
        out = self.sections(["stats -h"])["stats -h"]
        facts = {}
        for line in out:
            key, sep, value = line.partition(":")
            if sep and value.strip():
                facts[key.strip()] = value.strip()
        return facts

    def walk(self) -> list[dict]:
        """[{path, ino, mode, uid, gid, size}] for every name in the tree, root first."""
        entries = [{"path": "/", "ino": ROOT_INO, "mode": 0o040755, "uid": 0, "gid": 0, "size": 0}]
        level = [("/", ROOT_INO)]
        root_seen = False
        while level:
            cmds = [f"ls -p <{ino}>" for _, ino in level]
            sections = self.sections(cmds)
            nxt = []
            for (dirpath, ino), cmd in zip(level, cmds):
                for line in sections.get(cmd, []):
                    child = _parse_ls_p(line)
                    if child is None:
                        continue
                    name, cino, mode, uid, gid, size = child
                    if name == "." and ino == ROOT_INO and not root_seen:
                        entries[0].update(mode=mode, uid=uid, gid=gid)
                        root_seen = True
                    if name in (".", ".."):
                        continue
                    path = dirpath.rstrip("/") + "/" + name
                    entries.append({"path": path, "ino": cino, "mode": mode, "uid": uid, "gid": gid, "size": size})
                    if mode & S_IFMT == 0o040000:
                        nxt.append((path, cino))
            level = nxt
        return entries

    def stat(self, inodes: list[int]) -> dict[int, dict]:
        """Per inode: times, nlink, xattrs, device number, fast symlink target."""
        cmds = [f"stat <{i}>" for i in inodes]
        sections = self.sections(cmds)
        facts = {}
        for ino, cmd in zip(inodes, cmds):
            facts[ino] = _parse_stat(sections.get(cmd, []))
        return facts

    def hash_contents(self, wanted: list[tuple[int, int]]) -> dict[int, dict]:
        """sha256 of each (inode, size) by streaming `cat`; also flags private keys and keeps the
        bytes of the few files the manifest needs (see KEEP_CONTENT, by inode in `keep`)."""
        proc = self._batch([f"cat <{ino}>" for ino, _ in wanted])
        out = proc.stdout
        result = {}
        try:
            for ino, size in wanted:
                echo = out.readline()
                if echo != f"debugfs: cat <{ino}>\n".encode():
                    raise BuildError(f"debugfs on {self.spec}: unexpected output before inode {ino}: {echo[:80]!r}")
                h = hashlib.sha256()
                key = False
                tail = b""
                head = bytearray()
                left = size
                while left > 0:
                    chunk = out.read(min(left, 1 << 20))
                    if not chunk:
                        raise BuildError(f"debugfs on {self.spec}: inode {ino} ended {left} bytes early")
                    h.update(chunk)
                    if not key:
                        window = tail + chunk
                        key = PRIVATE_KEY_MARK in window and PRIVATE_KEY_PEM.search(window) is not None
                        tail = chunk[-256:]
                    if len(head) < 65536:
                        head += chunk[:65536 - len(head)]
                    left -= len(chunk)
                result[ino] = {"sha256": h.hexdigest(), "private_key": key, "head": bytes(head)}
        finally:
            self._finish(proc)
        return result


def _parse_ls_p(line: str):
    # /ino/mode/uid/gid/name/size/   (names cannot hold '/', but keep any just in case)
    if not line.startswith("/") or not line.endswith("/"):
        return None
    parts = line[1:-1].split("/")
    if len(parts) < 6:
        return None
    ino, mode, uid, gid = parts[:4]
    name = "/".join(parts[4:-1])
    size = parts[-1]
    if not name or ino == "0":
        return None   # an unused directory slot (lost+found is full of them)
    return name, int(ino), int(mode, 8), int(uid), int(gid), int(size or 0)


_TIME = re.compile(r"^\s*(ctime|atime|mtime|crtime):\s*0x([0-9a-f]+)(?::([0-9a-f]+))?")
_XATTR = re.compile(r"^\s{2}(\S+) \((\d+)\)(?: = (.*))?$")


def _ext4_time(base: int, extra: int):
    """Seconds since the epoch (an int, or 'S.NNNNNNNNN' when the inode holds nanoseconds)."""
    if base >= 1 << 31:
        base -= 1 << 32
    seconds = base + ((extra & 3) << 32)
    nsec = extra >> 2
    return seconds if nsec == 0 else f"{seconds}.{nsec:09d}"


def _parse_stat(lines: list[str]) -> dict:
    facts: dict = {"xattrs": {}}
    in_xattrs = False
    for line in lines:
        m = _TIME.match(line)
        if m:
            facts[m.group(1)] = _ext4_time(int(m.group(2), 16), int(m.group(3) or "0", 16))
            in_xattrs = False
            continue
        if line.startswith("User:") and "Size:" in line:
            facts["size"] = int(line.rsplit("Size:", 1)[1].split()[0])
        elif line.startswith("Links:"):
            facts["links"] = int(line.split()[1])
        elif line.startswith("Extended attributes:"):
            in_xattrs = True
            continue
        elif line.startswith("Fast link dest:"):
            facts["target"] = line.partition(":")[2].strip()[1:-1]
        elif line.startswith("Device major/minor number:"):
            mm = line.split(":", 1)[1].split()[0]          # e.g. 01:03 (hex 01:03)
            major, minor = mm.split(":")
            facts["rdev"] = f"{int(major)}:{int(minor)}"
        if in_xattrs:
            m = _XATTR.match(line)
            if m:
                facts["xattrs"][m.group(1)] = (m.group(3) or "").strip()
            else:
                in_xattrs = False
    return facts


def read_text_file(raw: Path, path: str) -> str | None:
    """PATH's text from the first ext2/3/4 file system of the disk that has it (None if none
    does): how a pipeline that never mounts its image reads e.g. /var/lib/dpkg/status."""
    from . import disk as diskread
    _, parts = diskread.partition_table(raw)
    for part in parts:
        if diskread.probe(raw, part).get("TYPE") in ("ext4", "ext3", "ext2"):
            lines = Ext4Reader(raw, part.start).sections([f"cat {path}"]).get(f"cat {path}")
            if lines:
                return "\n".join(lines) + "\n"
    return None
