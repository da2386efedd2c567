"""`mkmailimage manifest IMAGE` and `mkmailimage diff A B`.

A manifest lists every file of an image (path, type, mode, owner, size, sha256, link target,
xattrs, times) read without booting it, plus the disk facts that can make two images differ
while their files do not: partition table ids, filesystem UUIDs and superblock fields, and the
hash of every byte range (boot code, the gap where GRUB's core.img lives, each partition).
ext4 is read with debugfs, FAT (the ESP) with mtools. Filesystems neither can read (OpenBSD's
FFS inside its disklabel) are listed with their hash only: docs/reproducibility.md says how
their files are listed from the booted guest instead."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import sys
import textwrap
from pathlib import Path

from .errors import BuildError
from .imageread import disk as diskread
from .imageread.ext4 import S_IFMT, TYPES, Ext4Reader
from .imageread.fat import read_fat

FORMAT = "mkmailimage-files/1"
TIME_FIELDS = ("mtime", "ctime", "atime", "crtime")
# superblock fields that only say how debugfs counted, not what is on disk
SUPERBLOCK_SKIP = {"Free blocks", "Free inodes"}
# where a DKIM / TLS / SSH host private key lives, to name what a found private key is
KEY_KINDS = (("ssh-host", lambda p: p.startswith("/etc/ssh/ssh_host_")),
             ("dkim", lambda p: "dkim" in p.lower()),
             ("tls", lambda p: p.startswith(("/etc/ssl/", "/etc/mail/", "/etc/letsencrypt/", "/var/lib/acme"))
              or p.endswith((".key", ".pem"))))


# ---------------------------------------------------------------- making a manifest

def make_manifest(image: Path) -> dict:
    image = Path(image)
    fmt = diskread.image_format(image)
    with diskread.raw_view(image) as raw:
        table, parts = diskread.partition_table(raw)
        hashes = _region_hashes(raw, parts)
        manifest = {
            "format": FORMAT,
            "image": {"name": image.name, "format": fmt, "sha256": diskread.sha256_file(image) if fmt != "raw" else hashes["raw"],
                      "raw_sha256": hashes["raw"], "raw_size": raw.stat().st_size},
            "disk": {"table": table, "boot_code_sha256": hashes["boot_code"],
                     "gap_sha256": hashes["gap"], "partitions": []},
        }
        filesystems = []
        for part in parts:
            info = {"number": part.number, "start": part.start, "size": part.size, "type": part.type,
                    "uuid": part.uuid, "name": part.name, "bootable": part.bootable,
                    "sha256": hashes[part.number]}
            probe = diskread.probe(raw, part)
            if probe:
                info["filesystem"] = probe
            manifest["disk"]["partitions"].append(info)
            fstype = probe.get("TYPE", "")
            if fstype in ("ext2", "ext3", "ext4"):
                reader = Ext4Reader(raw, part.start)
                info["superblock"] = {k: v for k, v in reader.superblock().items() if k not in SUPERBLOCK_SKIP}
                filesystems.append((info, probe, _read_ext4(reader)))
            elif fstype == "vfat":
                filesystems.append((info, probe, read_fat(raw, part.start)))
            elif part.number:
                info["files"] = "not readable without booting (see docs/reproducibility.md)"
    manifest["files"], manifest["secrets"] = _merge(filesystems)
    return manifest


def _read_ext4(reader: Ext4Reader) -> list[dict]:
    walked = reader.walk()
    inodes = sorted({e["ino"] for e in walked})
    stats = reader.stat(inodes)
    kinds = {e["ino"]: TYPES.get(e["mode"] & S_IFMT, "unknown") for e in walked}
    sizes = {e["ino"]: e["size"] for e in walked}
    to_read = [(i, sizes[i]) for i in inodes
               if kinds[i] == "file" or (kinds[i] == "symlink" and "target" not in stats[i])]
    contents = reader.hash_contents(to_read)
    first_path: dict[int, str] = {}
    entries = []
    for e in sorted(walked, key=lambda e: e["path"]):
        ino, kind = e["ino"], kinds[e["ino"]]
        st = stats[ino]
        entry = {"path": e["path"], "type": kind, "mode": f"{e['mode'] & 0o7777:04o}",
                 "uid": e["uid"], "gid": e["gid"], "size": st.get("size", e["size"])}
        for t in TIME_FIELDS:
            if t in st:
                entry[t] = st[t]
        if st["xattrs"]:
            entry["xattrs"] = dict(sorted(st["xattrs"].items()))
        if "rdev" in st:
            entry["rdev"] = st["rdev"]
        if kind == "file":
            entry["sha256"] = contents[ino]["sha256"]
            if contents[ino]["private_key"]:
                entry["private_key"] = True
            entry["_head"] = contents[ino]["head"]
        elif kind == "symlink":
            entry["target"] = st.get("target") or contents[ino]["head"].decode("utf-8", "surrogateescape")
        if kind != "dir":
            if ino in first_path:
                entry["hardlink"] = first_path[ino]
            else:
                first_path[ino] = e["path"]
        entries.append(entry)
    return entries


def _region_hashes(raw: Path, parts) -> dict:
    """One pass over the raw bytes: the whole image, the MBR boot code, the gap before the first
    partition (GPT headers or GRUB's core.img) and each partition."""
    size = raw.stat().st_size
    first = min((p.start for p in parts if p.number), default=512)   # no table: no gap
    regions = {"boot_code": (0, min(440, size)), "gap": (512, max(first, 512))}
    for p in parts:
        regions[p.number] = (p.start, p.start + p.size)
    hashers = {k: hashlib.sha256() for k in regions}
    whole = hashlib.sha256()
    pos = 0
    with open(raw, "rb") as f:
        while chunk := f.read(1 << 22):
            whole.update(chunk)
            end = pos + len(chunk)
            for k, (a, b) in regions.items():
                lo, hi = max(a, pos), min(b, end)
                if lo < hi:
                    hashers[k].update(chunk[lo - pos:hi - pos])
            pos = end
    out = {k: h.hexdigest() for k, h in hashers.items()}
    out["raw"] = whole.hexdigest()
    return out


def _merge(filesystems) -> tuple[list[dict], dict]:
    """One file list for the whole image: the root filesystem at /, the others at their fstab
    mount point (or /.partitionN). Owners are named from the image's own passwd/group."""
    root = next((fs for fs in filesystems if any(e["path"] == "/etc" for e in fs[2])), None)
    if root is None and len(filesystems) == 1:
        root = filesystems[0]          # a bare file system image: it is the whole tree
    mounts = {}
    names = {"uid": {}, "gid": {}}
    if root:
        heads = {e["path"]: e.get("_head", b"") for e in root[2]}
        names["uid"] = _id_names(heads.get("/etc/passwd", b""))
        names["gid"] = _id_names(heads.get("/etc/group", b""))
        mounts = _fstab_mounts(heads.get("/etc/fstab", b""))
    files = []
    seen = set()
    for info, probe, entries in sorted(filesystems, key=lambda fs: not _is_root(root, fs[0])):
        if _is_root(root, info):
            mount = "/"
        else:
            mount = (mounts.get(("UUID", probe.get("UUID", "").lower()))
                     or mounts.get(("PARTUUID", info["uuid"].lower()))
                     or mounts.get(("LABEL", probe.get("LABEL", "")))
                     or f"/.partition{info['number']}")
        info["mount"] = mount
        for e in entries:
            e = dict(e)
            e.pop("_head", None)
            if mount != "/":
                e["path"] = mount.rstrip("/") + (e["path"] if e["path"] != "/" else "")
                if "hardlink" in e:
                    e["hardlink"] = mount.rstrip("/") + e["hardlink"]
            if e["path"] in seen:
                continue   # a mount point: keep the directory of the filesystem it is in
            seen.add(e["path"])
            if "uid" in e:
                e["owner"] = f"{names['uid'].get(e['uid'], e['uid'])}:{names['gid'].get(e['gid'], e['gid'])}"
            files.append(e)
    files.sort(key=lambda e: e["path"])
    return files, secrets_of(files)


def secrets_of(files: list[dict]) -> dict:
    keys = [{"path": e["path"], "kind": _key_kind(e["path"])} for e in files
            if e.get("private_key") or (e.get("type") == "file" and _is_key_path(e["path"]))]
    return {"private_keys": keys,
            "dkim_private_key": any(k["kind"] == "dkim" for k in keys),
            "ssh_host_keys": any(k["kind"] == "ssh-host" for k in keys),
            "tls_private_key": any(k["kind"] == "tls" for k in keys)}


def guest_manifest(machine, roots: list[str] | None = None) -> dict:
    """The manifest of a booted guest (OpenBSD's FFS, or any system the host cannot read),
    listed by the guest's own tar over SSH; see builder.imageread.guest."""
    from .imageread.guest import RECORDED, guest_files
    files = guest_files(machine, roots)
    return {"format": FORMAT, "image": {"name": f"guest {machine.name}", "format": "booted guest"},
            "recorded": RECORDED, "disk": {}, "files": files, "secrets": secrets_of(files)}


def _is_root(root, info) -> bool:
    return root is not None and root[0] is info


def _id_names(data: bytes) -> dict[int, str]:
    names = {}
    for line in data.decode("utf-8", "replace").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            names.setdefault(int(fields[2]), fields[0])
    return names


def _fstab_mounts(data: bytes) -> dict[tuple[str, str], str]:
    mounts = {}
    for line in data.decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith("#"):
            continue
        spec, where = fields[0], fields[1]
        for tag in ("UUID", "PARTUUID", "LABEL"):
            if spec.startswith(tag + "="):
                value = spec[len(tag) + 1:].strip('"')
                mounts[(tag, value if tag == "LABEL" else value.lower())] = where
        if spec.startswith("/dev/disk/by-uuid/"):
            mounts[("UUID", spec.rsplit("/", 1)[1].lower())] = where
    return mounts


def _is_key_path(path: str) -> bool:
    """Private keys in a non-PEM format (rspamd's ed25519 DKIM keys, OpenSSH's) found by place."""
    return any(fnmatch.fnmatch(path, pat) for pat in ("/etc/ssh/ssh_host_*_key", "*/dkim/*.key",
                                                      "/etc/ssl/private/*"))


def _key_kind(path: str) -> str:
    for kind, matches in KEY_KINDS:
        if matches(path):
            return kind
    return "other"


# ---------------------------------------------------------------- stable text form

def dumps(manifest: dict) -> str:
    """Sorted keys, one file per line: stable, greppable, diffable with diff(1) too."""
    parts = []
    for key in sorted(manifest):
        value = manifest[key]
        if key == "files":
            body = ",\n".join("  " + json.dumps(e, sort_keys=True) for e in value)
            parts.append(f' "files": [\n{body}\n ]')
        else:
            text = json.dumps(value, indent=1, sort_keys=True)
            parts.append(f' {json.dumps(key)}: ' + textwrap.indent(text, " ")[1:])
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _is_manifest_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(64).lstrip().startswith(b"{")


def load(path: Path) -> dict:
    """A manifest from a manifest file (JSON) or made from an image."""
    path = Path(path)
    if not path.exists():
        raise BuildError(f"{path}: no such image or manifest")
    with open(path, "rb") as f:
        start = f.read(64).lstrip()
    if start.startswith(b"{"):
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BuildError(f"{path}:{e.lineno}:{e.colno}: not a valid manifest: {e.msg}") from None
        if manifest.get("format") != FORMAT:
            raise BuildError(f"{path}: not a file manifest (format is {manifest.get('format')!r}, want {FORMAT!r})")
        return manifest
    return make_manifest(path)


# ---------------------------------------------------------------- diff

CONTENT_FIELDS = ("type", "sha256")
META_FIELDS = ("mode", "uid", "gid", "owner", "target", "xattrs", "rdev", "hardlink", "size")
TIME_EXAMPLES = 10


def diff(a: dict, b: dict) -> list[str]:
    """Differences, in order: files, metadata, timestamps, disk. Empty when the manifests agree."""
    fa = {e["path"]: e for e in a["files"]}
    fb = {e["path"]: e for e in b["files"]}
    # a guest manifest (tar) records fewer fields than an image manifest: compare the common ones
    recorded = None
    if "recorded" in a or "recorded" in b:
        recorded = set(a.get("recorded", b.get("recorded"))) & set(b.get("recorded", a.get("recorded")))
    meta_fields = [f for f in META_FIELDS if recorded is None or f in recorded]
    time_fields = [t for t in TIME_FIELDS if recorded is None or t in recorded]
    files, meta, disk = [], [], []
    times: dict[str, list[str]] = {t: [] for t in TIME_FIELDS}
    for path in sorted(fa.keys() | fb.keys()):
        ea, eb = fa.get(path), fb.get(path)
        if eb is None:
            files.append(f"- {path}  ({_describe(ea)})")
            continue
        if ea is None:
            files.append(f"+ {path}  ({_describe(eb)})")
            continue
        if ea.get("type") != eb.get("type"):
            files.append(f"~ {path}  type {ea.get('type')} -> {eb.get('type')}")
            continue
        if ea.get("sha256") != eb.get("sha256"):
            files.append(f"~ {path}  content {_short(ea.get('sha256'))} -> {_short(eb.get('sha256'))}"
                         f", size {ea.get('size')} -> {eb.get('size')}")
        for field in meta_fields:
            if field == "size" and ea.get("type") in ("file", "dir") and recorded is not None:
                continue  # tar gives no directory size
            if field == "size" and ea.get("type") == "file":
                continue  # a file's size change is reported with its content
            if field in ("uid", "gid") and ea.get("owner") != eb.get("owner") and "owner" in ea:
                continue  # said once, by owner
            if ea.get(field) != eb.get(field):
                meta.append(f"~ {path}  {field} {_val(ea.get(field))} -> {_val(eb.get(field))}")
        for t in time_fields:
            if ea.get(t) != eb.get(t):
                times[t].append(f"{path} ({ea.get(t)} -> {eb.get(t)})")
    timestamps = []
    for t in TIME_FIELDS:
        changed = times[t]
        if not changed:
            continue
        if len(changed) <= TIME_EXAMPLES:
            timestamps += [f"~ {c}  {t}" for c in changed]
        else:
            timestamps.append(f"~ {t} differs on {len(changed)} paths, e.g. " + ", ".join(changed[:TIME_EXAMPLES]))
    disk = _diff_disk(a, b)
    out = []
    for title, lines in (("files", files), ("metadata", meta), ("timestamps", timestamps), ("disk", disk)):
        if lines:
            out.append(f"{title}:")
            out += ["  " + l for l in lines]
    if out:
        counts = {"added": sum(l.startswith("+") for l in files), "removed": sum(l.startswith("-") for l in files),
                  "changed": sum(l.startswith("~") for l in files), "metadata": len(meta),
                  "timestamps": sum(len(v) for v in times.values()), "disk": len(disk)}
        out.append("summary: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return out


def _diff_disk(a: dict, b: dict) -> list[str]:
    out = []
    if not a.get("disk") or not b.get("disk"):
        return out   # a booted guest's manifest has no disk view to compare
    flat_a, flat_b = _flatten("", a.get("disk", {})), _flatten("", b.get("disk", {}))
    for key in sorted(flat_a.keys() | flat_b.keys(), key=_natural):
        if flat_a.get(key) != flat_b.get(key):
            out.append(f"~ {key}: {_val(flat_a.get(key))} -> {_val(flat_b.get(key))}")
    for key in ("raw_sha256", "raw_size"):
        va, vb = a.get("image", {}).get(key), b.get("image", {}).get(key)
        if va != vb:
            out.append(f"~ image {key}: {_val(va)} -> {_val(vb)}")
    return out


def _flatten(prefix: str, value) -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) and "number" in v for v in value):
        out = {}
        for v in value:
            out.update(_flatten(f"{prefix}[{v['number']}]", {k: x for k, x in v.items() if k != "number"}))
        return out
    return {prefix: value}


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _describe(e: dict) -> str:
    if e.get("type") == "file":
        return f"file, {e.get('size')} bytes, {_short(e.get('sha256'))}"
    if e.get("type") == "symlink":
        return f"symlink -> {e.get('target')}"
    return e.get("type", "?")


def _short(digest) -> str:
    return digest[:12] if isinstance(digest, str) else str(digest)


def _val(v) -> str:
    if v is None:
        return "(none)"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


# ---------------------------------------------------------------- installers that cannot repeat

# Paths two builds by the OS's own installer legitimately differ in (docs/reproducibility.md says
# why for each); timestamps differ everywhere with these installers and are not listed.
EXPECTED_DIFFERENCES = {
    "openbsd": ["/bsd", "/bsd.booted", "/bsd.sp", "/bsd.mp", "/usr/share/relink/*",
                "/usr/lib/libc.so.*", "/usr/lib/libcrypto.so.*", "/usr/libexec/ld.so", "/usr/sbin/sshd",
                "/usr/libexec/sshd-*", "/etc/random.seed", "/var/db/host.random", "/etc/soii.key",
                "/etc/ssh/ssh_host_*", "/etc/iked/private/local.key", "/etc/iked/local.pub",
                "/etc/isakmpd/private/local.key", "/etc/isakmpd/local.pub", "/etc/fstab",
                "/etc/spwd.db", "/etc/pwd.db", "/var/log/*", "/var/db/dhcpleased/*", "/var/run/*",
                "/var/db/kvm_bsd.db"],
    "preseed": ["/etc/fstab", "/boot/grub/grub.cfg", "/boot/grub/grubenv", "/boot/initrd.img-*",
                "/var/log/*", "/etc/shadow", "/etc/shadow-", "/etc/gshadow-", "/var/cache/apt/*",
                "/var/lib/apt/lists/*", "/var/cache/debconf/*", "/etc/machine-id", "/var/lib/dbus/machine-id",
                "/var/lib/systemd/random-seed", "/etc/ssh/ssh_host_*", "/etc/dovecot/private/*",
                "/etc/unbound/unbound_control.*", "/etc/unbound/unbound_server.*",
                "/etc/ssl/private/ssl-cert-snakeoil.key", "/etc/ssl/certs/ssl-cert-snakeoil.pem"],
}


def unexplained(a: dict, b: dict, installer: str) -> list[str]:
    """The file and metadata differences between two builds by `installer` ("openbsd",
    "preseed") that EXPECTED_DIFFERENCES does not explain: empty when the builds agree
    everywhere else."""
    patterns = EXPECTED_DIFFERENCES[installer]
    out, section = [], None
    for line in diff(a, b):
        if not line.startswith("  "):
            section = line.rstrip(":")
            continue
        if section not in ("files", "metadata"):
            continue
        path = line.split()[1]
        if not any(fnmatch.fnmatch(path, p) for p in patterns):
            out.append(line.strip())
    return out


# ---------------------------------------------------------------- commands

def cmd_manifest(args) -> int:
    sys.stdout.write(dumps(make_manifest(args.image)))
    return 0


def cmd_diff(args) -> int:
    a, b = load(args.a), load(args.b)
    lines = diff(a, b)
    shown = {l.rstrip(":") for l in lines if not l.startswith(" ")}
    if a["image"].get("raw_sha256") != b["image"].get("raw_sha256") and not shown & {"files", "metadata", "timestamps"} \
            and not _is_manifest_file(args.a) and not _is_manifest_file(args.b):
        # no recorded field explains the difference: find the bytes and say what holds them
        from .imageread.bytediff import explain
        with diskread.raw_view(args.a) as ra, diskread.raw_view(args.b) as rb:
            found = explain(ra, rb, a["disk"].get("partitions", []))
        lines = lines[:-1] + ["bytes:"] + ["  " + l for l in found] + lines[-1:]
    if not lines:
        print(f"no differences: {len(a['files'])} files, metadata and disk layout agree")
        return 0
    print("\n".join(lines))
    return 1
