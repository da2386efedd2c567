"""Render the autoinstall(8) response file and the disklabel template from `autoinstall/openbsd/`.

The answers follow what OpenBSD's `install.sub` asks in our configuration (serial console com0,
one virtio NIC vio0 configured by DHCP, one virtio disk sd0, sets over HTTP from the builder's
server). `tests/test_openbsd_answers.py` replays the installer's question sequence against the
rendered file with the installer's own matching rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import jinja2

from .. import paths
from ..errors import BuildError
from ..site import SIZE_RE, Site
from . import sets

DISABLED_PASSWORD = "*" * 13      # install.sub's encr_pwd keeps 13 asterisks: no password login
ADMIN_LOGIN = "admin"             # the system account that carries admin_ssh_keys
NIC = "vio0"                      # virtio-net under QEMU
DISK = "sd0"                      # virtio-blk under QEMU
DISKLABEL_NAME = "disklabel"


@dataclass(frozen=True)
class Admin:
    login: str
    full_name: str
    password: str
    key: str


def site_set_name(version: str) -> str:
    return f"site{sets.short_version(version)}.tgz"


def server_dir(version: str) -> str:
    """Where the builder's HTTP server keeps the sets (the installer's own default layout)."""
    return f"pub/OpenBSD/{version}/{sets.ARCH}"


def packages_dir(version: str) -> str:
    return f"pub/OpenBSD/{version}/packages/{sets.ARCH}"


def set_selection(version: str) -> str:
    """Sets answer: drop X, games and compilers from the preselection, add the site set, done."""
    return f"-x* -game* -comp* {site_set_name(version)} done"


def admin_for(site: Site) -> Admin | None:
    """The login account, only when there is a key to log in with (passwords stay disabled)."""
    keys = site.model.admin_ssh_keys
    if not keys:
        return None
    return Admin(ADMIN_LOGIN, "Mail server administrator", DISABLED_PASSWORD, keys[0])


def template_env() -> jinja2.Environment:
    """Templates of autoinstall/openbsd/ (answers, disklabel, site set scripts)."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(paths.AUTOINSTALL / "openbsd")),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True, autoescape=False)


def render_install_conf(site: Site, base_url: str, display: bool = False) -> str:
    """install.conf for an installer that fetches everything from `base_url`
    (e.g. http://10.0.2.2:8080, the builder's HTTP server as QEMU's guest sees it).
    `display`: the VM has a VGA display, so the installer asks about X."""
    version = site.model.openbsd.version
    for value in (site.hostname, site.model.timezone, base_url):
        if any(c.isspace() for c in value):
            raise BuildError(f"{value!r} contains blanks; the installer's answers cannot")
    return template_env().get_template("install.conf.j2").render(
        site=site, m=site.model, nic=NIC, disk=DISK, display=display,
        root_password=DISABLED_PASSWORD, admin=admin_for(site),
        base_url=base_url.rstrip("/"), disklabel_name=DISKLABEL_NAME,
        server_dir=server_dir(version), set_selection=set_selection(version),
        site_set=site_set_name(version))


def disk_gib(site: Site) -> int:
    n, unit = SIZE_RE.match(site.model.openbsd.disk_size).groups()
    assert unit == "G"  # the site model allows only G sizes here
    return int(n)


def partition_sizes(gib: int) -> dict[str, str]:
    """Fixed sizes in MiB for everything but /var, which gets the rest of the disk.
    /usr as OpenBSD's own auto layout (3 GiB from 8 GiB disks): base (~1.2 GiB unpacked), the
    relink kits, the packages in /usr/local, and, during the install, the prefetched sets (the
    installer needs more than 1 GiB free in /tmp, /home or /usr to verify them before unpacking)."""
    total = gib * 1024
    root = 768 if gib >= 8 else 512
    swap = min(1024, max(256, total // 20))
    tmp = min(2048, max(256, total // 20))
    usr = min(8192, max(3072 if gib >= 8 else 2304, total // 5))
    home = 256 if gib >= 16 else 64
    var_min = total - root - swap - tmp - usr - home - 64   # 64 MiB: MBR, boot blocks, rounding
    if var_min < 512:
        raise BuildError(f"openbsd.disk_size {gib}G leaves {var_min}M for /var; use at least 5G")
    return {"root": f"{root}M", "swap": f"{swap}M", "tmp": f"{tmp}M", "usr": f"{usr}M",
            "home": f"{home}M", "var": f"{min(var_min, 1024)}M"}


def render_disklabel(site: Site) -> str:
    return template_env().get_template("disklabel.j2").render(
        site=site, disk_size=site.model.openbsd.disk_size, sizes=partition_sizes(disk_gib(site)))
