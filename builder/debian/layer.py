"""Layer a site onto an extracted base tree: the rendered overlay plus the system integration
every image needs (apt sources, hostname, resolver, network, users, enabled units).

Works on a plain directory; ownership is applied numerically from the TREE's own passwd/group
(never the build host's). Nothing from the build host (mirror, resolv.conf, hostname,
machine-id) stays in the tree, and per-instance secrets that packages generated at install
time (SSH host keys, dovecot's self-signed key) are removed: first boot makes fresh ones."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from .. import paths
from ..errors import BuildError
from ..render import OS_FACTS, Tree
from ..site import Site
from . import sources

# Units enabled in every image. Packages enable most of them already; listing them all makes
# the image independent of maintainer-script defaults.
UNITS = [
    "mkmailimage-firstboot.service", "systemd-networkd.service", "systemd-timesyncd.service",
    "ssh.service", "nftables.service", "unbound.service", "redis-server.service",
    "rspamd.service", "dovecot.service", "opensmtpd.service",
]

# tls.mode acme: our certbot runner, and Debian's renewal timer (the certbot package enables
# it too; listed so the image does not depend on that)
ACME_UNITS = ["mkmailimage-acme.service", "certbot.timer"]


# Units the packages enable that a mail VM has no use for; each costs seconds of a TCG boot.
UNITS_OFF = [
    "grub-common.service",     # records boot success for Debian's GRUB menu; the image boots its own grub.cfg
    "e2scrub_reap.service",    # removes e2scrub's LVM snapshots; the image has no LVM
]


def units_for(site: Site) -> list[str]:
    return UNITS + (ACME_UNITS if site.model.tls.mode == "acme" else [])


def site_env(site: Site) -> str:
    """/etc/mkmailimage/site.env: the values first boot and the ACME runner need."""
    tls = site.model.tls
    acme = tls.mode == "acme"
    return (f"HOSTNAME={site.hostname}\nDOMAIN={site.domain}\nTLS_MODE={tls.mode}\n"
            f"ACME_EMAIL={tls.acme_email or ''}\n"
            f"ACME_SERVER={tls.acme_directory if acme else ''}\n")


NETWORK_FILE = "etc/systemd/network/20-mkmailimage-dhcp.network"
NETWORK = """\
# DHCP on the first Ethernet NIC, whatever its name (ens3, enp0s3, eth0 ...)
[Match]
Type=ether
Kind=!*

[Network]
DHCP=yes
IPv6AcceptRA=yes
"""

# Files that carry per-instance secrets or build-host state; recreated at first boot.
INSTANCE_FILES = [
    "etc/ssh/ssh_host_*", "etc/ssl/private/ssl-cert-snakeoil.key", "etc/ssl/certs/ssl-cert-snakeoil.pem",
    "var/lib/dbus/machine-id", "var/lib/systemd/random-seed", "var/lib/systemd/credential.secret",
    "etc/unbound/unbound_control.*", "etc/unbound/unbound_server.*",
    "var/cache/debconf/*-old", "etc/*-", "var/log/*.log", "var/log/apt/*",
]


def apply(tree: Path, site: Site, overlay: Tree, *, epoch: int) -> None:
    tree = Path(tree)
    m = site.model
    _remove_instance_files(tree)
    _remove_bytecode(tree)
    _apt_sources(tree, site)
    _write(tree, "etc/hostname", site.hostname + "\n")
    _write(tree, "etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{site.hostname} {site.short_hostname}\n"
                              "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
                              "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n")
    _write(tree, "etc/resolv.conf", "# unbound on this machine validates and caches\nnameserver 127.0.0.1\n")
    _write(tree, "etc/machine-id", "")
    _write(tree, NETWORK_FILE, NETWORK)
    _timezone(tree, m.timezone)
    _write(tree, "etc/mkmailimage/site.env", site_env(site))
    _accounts(tree, epoch)
    _overlay(tree, overlay, epoch)
    if m.admin_ssh_keys and not (tree / "root/.ssh/authorized_keys").exists():
        (tree / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
        _write(tree, "root/.ssh/authorized_keys", "\n".join(m.admin_ssh_keys) + "\n", 0o600)
    _enable_units(tree, units_for(site))
    _systemctl(tree, "disable", [u for u in UNITS_OFF if _unit_exists(tree, u)])
    _check_no_host_state(tree)


def _write(tree: Path, rel: str, text: str, mode: int = 0o644) -> None:
    p = tree / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_symlink() or p.exists():
        p.unlink()
    p.write_text(text)
    os.chmod(p, mode)


def _remove_instance_files(tree: Path) -> None:
    for pattern in INSTANCE_FILES:
        for p in tree.glob(pattern):
            if p.is_file() or p.is_symlink():
                p.unlink()


def _remove_bytecode(tree: Path) -> None:
    """Python bytecode that packages compiled while installing (py3compile) is not the same from
    one bootstrap to the next -- marshal's output depends on reference counts -- so two builds of
    the same packages would differ in it. It is a cache: Python compiles again on demand."""
    for cache_dir in (tree / "usr").rglob("__pycache__"):
        if cache_dir.is_dir() and not cache_dir.is_symlink():
            for pyc in cache_dir.glob("*.pyc"):
                pyc.unlink()
            if not any(cache_dir.iterdir()):
                cache_dir.rmdir()


def _apt_sources(tree: Path, site: Site) -> None:
    d = site.model.debian
    text = sources.sources_file(tree, d.suite, d.mirror, d.security_mirror)
    old = tree / "etc/apt/sources.list"
    if old.exists() or old.is_symlink():
        old.unlink()
    for f in (tree / "etc/apt/sources.list.d").glob("*"):
        f.unlink()
    for f in (tree / "etc/apt/apt.conf.d").glob("*mmdebstrap*"):   # our build-time --aptopt
        f.unlink()
    _write(tree, "etc/apt/sources.list.d/debian.sources", text)


def _timezone(tree: Path, tz: str) -> None:
    zone = tree / "usr/share/zoneinfo" / tz
    if not zone.exists():
        raise BuildError(f"layer: timezone '{tz}' (site field timezone) is not in the image's tzdata")
    lt = tree / "etc/localtime"
    if lt.exists() or lt.is_symlink():
        lt.unlink()
    lt.symlink_to(f"/usr/share/zoneinfo/{tz}")
    _write(tree, "etc/timezone", tz + "\n")


# -- users and groups in the tree's own databases ------------------------------------------

def _read_db(path: Path) -> list[list[str]]:
    return [line.split(":") for line in path.read_text().splitlines() if line and not line.startswith("#")]


def _ids(tree: Path) -> tuple[dict[str, int], dict[str, int]]:
    users = {f[0]: int(f[2]) for f in _read_db(tree / "etc/passwd")}
    groups = {f[0]: int(f[2]) for f in _read_db(tree / "etc/group")}
    return users, groups


def _free_id(used: set[int]) -> int:
    # like useradd --system: the highest free id below 1000
    for i in range(999, 99, -1):
        if i not in used:
            return i
    raise BuildError("layer: no free system uid/gid left in the image")


def ensure_group(tree: Path, name: str) -> int:
    _, groups = _ids(tree)
    if name in groups:
        return groups[name]
    gid = _free_id(set(groups.values()))
    with open(tree / "etc/group", "a") as f:
        f.write(f"{name}:x:{gid}:\n")
    gshadow = tree / "etc/gshadow"
    if gshadow.exists():
        with open(gshadow, "a") as f:
            f.write(f"{name}:!::\n")
    return gid


def ensure_user(tree: Path, name: str, home: str, epoch: int = 0, group: str | None = None,
                shell: str = "/usr/sbin/nologin") -> int:
    users, groups = _ids(tree)
    if name in users:
        return users[name]
    group = group or name
    uid = _free_id(set(users.values()) | (set(groups.values()) - {groups.get(group)}))
    gid = groups[group] if group in groups else None
    if gid is None:
        gid = uid if uid not in groups.values() else _free_id(set(groups.values()))
        with open(tree / "etc/group", "a") as f:
            f.write(f"{group}:x:{gid}:\n")
        if (tree / "etc/gshadow").exists():
            with open(tree / "etc/gshadow", "a") as f:
                f.write(f"{group}:!::\n")
    with open(tree / "etc/passwd", "a") as f:
        f.write(f"{name}:x:{uid}:{gid}:{name}:{home}:{shell}\n")
    with open(tree / "etc/shadow", "a") as f:
        f.write(f"{name}:!:{epoch // 86400}::::::\n")
    return uid


ACCOUNTS = paths.OVERLAYS / "debian" / "accounts.yaml"


def _accounts(tree: Path, epoch: int, accounts_file: Path = ACCOUNTS) -> None:
    """Groups (with members) and users the rendered configs rely on (overlays/debian/accounts.yaml)."""
    if not accounts_file.exists():
        return
    spec = yaml.safe_load(accounts_file.read_text()) or {}
    for g in spec.get("groups", []):
        ensure_group(tree, g["name"])
    for u in spec.get("users", []):
        home = u.get("home", "/nonexistent")
        ensure_user(tree, u["name"], home, epoch, group=u.get("group", u["name"]),
                    shell=u.get("shell", "/usr/sbin/nologin"))
        if home != "/nonexistent" and not (tree / home.lstrip("/")).exists():
            users, groups = _ids(tree)
            h = tree / home.lstrip("/")
            h.mkdir(parents=True)
            os.chown(h, users[u["name"]], groups[u.get("group", u["name"])])
            os.chmod(h, 0o750)
    for g in spec.get("groups", []):
        for member in g.get("members", []):
            add_member(tree, g["name"], member)


def add_member(tree: Path, group: str, user: str) -> None:
    for db in ("etc/group", "etc/gshadow"):
        path = tree / db
        if not path.exists():
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            f = line.split(":")
            if f[0] == group:
                members = [m for m in f[-1].split(",") if m]
                if user not in members:
                    f[-1] = ",".join(members + [user])
                    lines[i] = ":".join(f)
        path.write_text("\n".join(lines) + "\n")


def _overlay(tree: Path, overlay: Tree, epoch: int) -> None:
    facts = OS_FACTS["debian"]
    homes = {facts["vmail_user"]: facts["vmail_home"]}
    entries = overlay.sorted()
    for e in entries:
        users, groups = _ids(tree)
        if e.group not in groups:
            ensure_group(tree, e.group)
        if e.owner not in users:
            ensure_user(tree, e.owner, homes.get(e.owner, "/nonexistent"), epoch)
    users, groups = _ids(tree)
    for e in entries:
        target = tree / e.path.lstrip("/")
        if e.is_dir:
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                target.unlink()
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()
            target.write_bytes(e.data)
        os.lchown(target, users[e.owner], groups[e.group])
        os.chmod(target, e.mode)


def _enable_units(tree: Path, units: list[str]) -> None:
    present = [u for u in units if _unit_exists(tree, u)]
    missing = sorted(set(units) - set(present))
    if missing:
        raise BuildError(f"layer: units missing from the image: {', '.join(missing)}")
    _systemctl(tree, "enable", present)


def _systemctl(tree: Path, verb: str, units: list[str]) -> None:
    if not units:
        return
    proc = subprocess.run(["systemctl", f"--root={tree}", verb, *units], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"layer: systemctl --root {verb} failed: {proc.stderr.strip()}")


def _unit_exists(tree: Path, unit: str) -> bool:
    return any((tree / d / unit).exists() for d in ("etc/systemd/system", "usr/lib/systemd/system",
                                                    "lib/systemd/system"))


def _check_no_host_state(tree: Path) -> None:
    """Only the sources written here may remain (mmdebstrap wrote the build mirror elsewhere)."""
    apt = tree / "etc/apt"
    left = [p for p in [apt / "sources.list", *(apt / "sources.list.d").glob("*")]
            if (p.exists() or p.is_symlink()) and p.name != "debian.sources"]
    left += list((apt / "apt.conf.d").glob("*mmdebstrap*"))
    if left:
        raise BuildError("layer: build-time apt configuration left in the image: "
                         + ", ".join("/" + str(p.relative_to(tree)) for p in left))


def clamp_mtimes(tree: Path, epoch: int) -> None:
    """Files written by the build get the build's epoch, like mmdebstrap's own files."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames + ["."]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_mtime > epoch or st.st_atime > epoch:
                os.utime(p, (epoch, min(st.st_mtime, epoch)), follow_symlinks=False)


def tree_bytes(tree: Path) -> int:
    """Apparent size of the installed tree (regular files, hard links counted once)."""
    seen, total = set(), 0
    for dirpath, _, filenames in os.walk(tree):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total
