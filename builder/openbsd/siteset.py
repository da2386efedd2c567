"""The site set `siteXY.tgz`: the rendered mail configuration plus `install.site`.

The installer extracts it last (`tar -zxphf - -C /mnt`) and then runs `/install.site` chrooted
in the new system. The tar carries owner and group names and the modes from the render Entries;
its numeric ids are 0 because the ramdisk's tar looks names up in the *ramdisk's* passwd, where
package users such as _rspamd or _dovecot do not exist yet. `install.site` therefore re-applies
every non-root owner by name after pkg_add has created those users.

Output is reproducible: entries sorted, fixed mtime, gzip header without name or time.
`index.txt` (ls -l style, one file per line, the name last) lists every served file, because the
installer only offers sets named in the signed SHA256 or in index.txt.
"""
from __future__ import annotations

import gzip
import io
import shlex
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import paths
from ..render import Entry, Tree
from ..site import Site
from . import answers, sets

# Directories the base sets own: never put their entries in the site set (a wrong mode on /etc
# or /var would break the system); their contents are still extracted.
BASE_DIRS = {"/", "/etc", "/etc/mail", "/etc/ssl", "/etc/ssh", "/home", "/root", "/tmp", "/usr",
             "/usr/local", "/usr/local/sbin", "/var", "/var/db", "/var/log", "/var/run", "/var/unbound",
             "/var/unbound/etc", "/etc/rc.d"}
DEFAULT_MTIME = 1735689600   # 2025-01-01T00:00:00Z, when neither the site nor the build gives one
ROOT_NAMES = {"root", "wheel"}
INSTALL_SITE = "/install.site"
FIRSTBOOT = "/etc/mkmailimage/firstboot.sh"
INSTANCE_SECRETS = "/etc/mkmailimage/instance-secrets.sh"
FIRSTBOOT_DONE = "mkmailimage-firstboot: done"   # printed on the console by firstboot.sh


@dataclass(frozen=True)
class PackagePlan:
    base_url: str          # where the guest fetches packages, e.g. http://10.0.2.100/pub/.../amd64
    files: list[str]       # package file names, dependencies first


def installurl(site: Site) -> str:
    """The mirror the finished system uses for pkg_add/syspatch (never the builder's server)."""
    mirror = site.model.openbsd.mirror
    if mirror and mirror.startswith(("http://", "https://")):
        tail = f"/{site.model.openbsd.version}/{sets.ARCH}"
        return mirror[: -len(tail)] if mirror.endswith(tail) else mirror
    return "https://cdn.openbsd.org/pub/OpenBSD"   # OpenBSD's documented default


def accounts() -> dict:
    """overlays/openbsd/accounts.yaml: groups (with members) and users the configs rely on."""
    f = paths.OVERLAYS / "openbsd" / "accounts.yaml"
    data = (yaml.safe_load(f.read_text()) if f.exists() else None) or {}
    return {"groups": data.get("groups") or [], "users": data.get("users") or []}


def extra_entries(site: Site, tree: Tree, plan: PackagePlan) -> list[Entry]:
    """install.site and the first-boot scripts, rendered from autoinstall/openbsd/."""
    env = answers.template_env()
    admin = answers.admin_for(site)
    chowns = [e for e in tree.sorted() if e.owner not in ROOT_NAMES or e.group not in ROOT_NAMES]
    ctx = dict(site=site, m=site.model, plan=plan, admin=admin, installurl=installurl(site),
               accounts=accounts(),
               chowns=chowns, q=shlex.quote, firstboot=FIRSTBOOT, instance_secrets=INSTANCE_SECRETS,
               done_marker=FIRSTBOOT_DONE,
               tls_dir="/etc/ssl/mkmailimage")
    return [
        Entry(INSTALL_SITE, env.get_template("install.site.j2").render(**ctx).encode(), 0o755, "root", "wheel"),
        Entry("/etc/mkmailimage", None, 0o755, "root", "wheel"),
        Entry(FIRSTBOOT, env.get_template("firstboot.sh.j2").render(**ctx).encode(), 0o700, "root", "wheel"),
        Entry(INSTANCE_SECRETS, env.get_template("instance-secrets.sh.j2").render(**ctx).encode(),
              0o700, "root", "wheel"),
    ]


def site_entries(site: Site, tree: Tree, plan: PackagePlan) -> list[Entry]:
    """Everything the site set carries, sorted by path, base directories left out."""
    merged = Tree(tree)
    for e in extra_entries(site, tree, plan):
        merged.add(e)
    return [e for e in merged.sorted() if not (e.is_dir and e.path in BASE_DIRS)]


def _group_name(name: str) -> str:
    # OpenBSD's root group is wheel; the render layer speaks Linux ("root").
    return "wheel" if name == "root" else name


def build_site_tgz(entries: list[Entry], mtime: int = DEFAULT_MTIME) -> bytes:
    """A reproducible gzip'd ustar archive of `entries` with ./-relative names."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for e in sorted(entries, key=lambda e: e.path):
            info = tarfile.TarInfo("." + e.path)
            info.mode = e.mode
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = e.owner
            info.gname = _group_name(e.group)
            if e.is_dir:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def index_txt(directory: Path, mtime: int = DEFAULT_MTIME) -> str:
    """`ls -ln`-style listing of the files in `directory` (the installer reads the last field)."""
    stamp = time.strftime("%b %d %H:%M:%S %Y", time.gmtime(mtime))
    lines = []
    for f in sorted(p for p in directory.iterdir() if p.is_file() and p.name != "index.txt"):
        lines.append(f"-rw-r--r--  1 0  0  {f.stat().st_size:>12} {stamp} {f.name}")
    return "\n".join(lines) + "\n"


def write_site_set(site: Site, tree: Tree, plan: PackagePlan, sets_dir: Path,
                   mtime: int = DEFAULT_MTIME) -> Path:
    """Write siteXY.tgz and index.txt into the served sets directory; return the tgz path."""
    name = answers.site_set_name(site.model.openbsd.version)
    target = sets_dir / name
    tmp = target.with_name(f".{name}.tmp")
    tmp.write_bytes(build_site_tgz(site_entries(site, tree, plan), mtime))
    tmp.replace(target)
    (sets_dir / "index.txt").write_text(index_txt(sets_dir, mtime))
    return target
