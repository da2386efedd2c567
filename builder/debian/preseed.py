"""Installer `preseed`: Debian's own installer, answered by a preseed file, driven over serial.

    install(site, rendered_tree, disk_path, workdir, verbose=False, progress=None) -> None

boots the netboot kernel and initrd (builder.debian.netboot, verified from the signed archive)
in QEMU, installs onto `disk_path` (raw or qcow2, created by the caller) and returns when the
installer has powered the machine off with the site overlay in place. `cmd_build(args)` is the
whole `mkmailimage build debian --installer preseed` pipeline around it.

The install VM's network is restricted (builder.qemu): it reaches only two things the builder
forwards to it, its own HTTP server at 10.0.2.100 (preseed, late scripts, overlay; served by
builder.httpserve) and a pass-through mirror at 10.0.2.101 (builder.debian.mirrorproxy). So
the installer needs no DNS, the image never sees the build host's mirror, and each failed
download is known by its real URL. The first question the preseed leaves open and the first
failed download stop the build at once with the installer's own words (builder.debian.diconsole).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import jinja2
import yaml

from .. import paths
from ..errors import BuildError, ToolMissing
from ..render import OS_FACTS, OWNERS_FILE, Entry, Tree
from ..site import Site
from . import archive, diconsole, netboot
from .diconsole import (InstallerCrashed, InstallerDownloadFailed, InstallerError,  # noqa: F401
                        InstallerExited, InstallerStalled, LateCommandFailed,
                        PreseedUnansweredQuestion)

FILES_ADDR = "10.0.2.100"        # the builder's HTTP server, as the guest sees it (port 80)
MIRROR_ADDR = "10.0.2.101"       # the pass-through mirror, as the guest sees it (port 80)
DISK = "/dev/vda"                # the target disk is the guest's first virtio disk
# d-i insists on a user account when root has no password; it is removed again by the late
# command: like the bootstrap image, root logs in with the site's SSH keys only.
INSTALL_USER = "mkmailimage"
MEMORY = 2048                    # below ~1 GiB d-i drops into its low-memory mode
SMP = 1                          # TCG: multi-vCPU d-i kernels sometimes panic while patching code
ACCOUNTS = paths.OVERLAYS / "debian" / "accounts.yaml"


# -- mirrors ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InstallerMirror:
    """A mirror as d-i's mirror/* and apt-setup/* questions want it."""
    protocol: str
    hostname: str       # host[:port]
    directory: str
    services: str       # apt-setup/services-select
    security_host: str | None
    security_path: str | None


def installer_mirror(mirror: str, security_mirror: str | None = None) -> InstallerMirror:
    """Split mirror URLs for d-i. Security updates come from `security_mirror`, else from the
    same host's `-security` directory beside the archive's."""
    u = urlsplit(mirror)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise BuildError(f"the Debian installer needs an http(s) mirror, not '{mirror}' "
                         "(set debian.mirror in the site file)")
    directory = u.path.rstrip("/") or "/"
    sec = urlsplit(security_mirror) if security_mirror else None
    if sec is None and directory.endswith("/debian"):
        sec = u._replace(path=directory + "-security")
    services = "security, updates" if sec is not None else "updates"
    return InstallerMirror(u.scheme, u.netloc, directory, services,
                           sec.netloc if sec else None, (sec.path.rstrip("/") or "/") if sec else None)


def upstream_mirrors(site: Site) -> dict[str, str]:
    """What the pass-through mirror serves: path prefix -> the real mirror the build uses."""
    from .bootstrap import build_mirror
    from .sources import security_from_archive
    d = site.model.debian
    archive_url = build_mirror(d.mirror)
    if not archive_url.startswith(("http://", "https://")):
        raise BuildError(f"debian.mirror: the installer fetches over http(s), not '{archive_url}'")
    return {"/debian": archive_url,
            "/debian-security": d.security_mirror or security_from_archive(archive_url)}


def guest_mirror() -> str:
    return f"http://{MIRROR_ADDR}/debian"


def image_sources(site: Site) -> str:
    """The image's /etc/apt/sources.list.d/debian.sources: the site's mirrors, else the
    default Debian's apt documents (never the mirror the build used)."""
    from .sources import sources_file
    d = site.model.debian
    return sources_file(Path("/"), d.suite, d.mirror, d.security_mirror)


# -- the answers --------------------------------------------------------------------------------

def render_preseed(site: Site, mirror: str, base_url: str, disk: str = DISK,
                   packages: list[str] | None = None, security_mirror: str | None = None) -> str:
    """The preseed for this site; `mirror` is the one the installer downloads from."""
    from .bootstrap import packages_for
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(paths.AUTOINSTALL / "debian")),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, autoescape=False)
    inst = installer_mirror(mirror, security_mirror)
    return env.get_template("preseed.cfg.j2").render(
        site=site, m=site.model, inst=inst, admin=INSTALL_USER, disk=disk, base_url=base_url,
        packages=packages or packages_for(site))


def kernel_append(site: Site, base_url: str) -> str:
    """The installer's command line: auto mode from our preseed, text frontend on ttyS0.
    Hostname, domain and name server go here too: netcfg runs before the preseed is fetched,
    and the restricted network offers no DNS (none is needed: the guest reaches the builder by
    address; 127.0.0.1 makes lookups fail at once). What follows `---` is kept for the
    installed system's kernel."""
    domain = site.hostname.split(".", 1)[1]
    return (f"auto=true priority=critical url={base_url}/preseed.cfg DEBIAN_FRONTEND=text "
            f"hostname={site.short_hostname} domain={domain} interface=auto "
            "netcfg/get_nameservers=127.0.0.1 "
            "console=ttyS0,115200n8 --- console=ttyS0,115200n8")


# -- the overlay ----------------------------------------------------------------------------------

def system_entries(site: Site) -> list[Entry]:
    """System integration the bootstrap image gets from builder.debian.layer, as overlay
    entries (same contents): apt sources, hostname, hosts, resolver, network, site.env."""
    from . import layer
    text = {
        "/etc/apt/sources.list.d/debian.sources": image_sources(site),
        "/etc/hostname": site.hostname + "\n",
        "/etc/hosts": (f"127.0.0.1\tlocalhost\n127.0.1.1\t{site.hostname} {site.short_hostname}\n"
                       "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
                       "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n"),
        "/etc/resolv.conf": "# unbound on this machine validates and caches\nnameserver 127.0.0.1\n",
        "/" + layer.NETWORK_FILE: layer.NETWORK,
        # ifupdown (installed by d-i) must not run DHCP beside systemd-networkd
        "/etc/network/interfaces": "# network: systemd-networkd (/etc/systemd/network)\n"
                                   "auto lo\niface lo inet loopback\n",
        "/etc/mkmailimage/site.env": layer.site_env(site),
    }
    return [Entry(path, data.encode(), 0o644) for path, data in text.items()]


def all_entries(site: Site, tree: Tree) -> list[Entry]:
    """The site overlay plus system entries it does not override, with parent directories."""
    entries = dict(tree)
    for e in system_entries(site):
        entries.setdefault(e.path, e)
    for path in list(entries):
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            entries.setdefault("/" + "/".join(parts[:i]), Entry("/" + "/".join(parts[:i]), None, 0o755))
    return [entries[k] for k in sorted(entries)]


def load_tree(rendered: Tree | Path) -> Tree:
    """A Tree, or a directory written by render.write_tree (owners in its owners file)."""
    if isinstance(rendered, Tree):
        return rendered
    root = Path(rendered)
    owners = root / OWNERS_FILE
    if not owners.exists():
        raise BuildError(f"{root}: not a rendered tree (no {OWNERS_FILE})")
    tree = Tree()
    for line in owners.read_text().splitlines():
        mode, owner, group, path = line.split(" ", 3)
        f = root / path.lstrip("/")
        tree.add(Entry(path, None if f.is_dir() else f.read_bytes(), int(mode, 8), owner, group))
    return tree


def overlay_tar(entries: list[Entry], mtime: int | None = None) -> bytes:
    """A tar of the entries carrying owner NAMES: GNU tar in the target maps them to its ids."""
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", time.time())) if mtime is None else mtime
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for e in sorted(entries, key=lambda e: e.path):
            info = tarfile.TarInfo("." + e.path)
            info.mode, info.mtime = e.mode, mtime
            info.uid = info.gid = 0      # an owner the target lacks would fall back to root
            info.uname, info.gname = e.owner, e.group
            if e.is_dir:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    return buf.getvalue()


def owners_list(entries: list[Entry]) -> str:
    return "".join(f"{e.mode:04o} {e.owner} {e.group} {e.path}\n" for e in entries)


def accounts_list(entries: list[Entry], accounts_file: Path = ACCOUNTS) -> str:
    """`group NAME` / `user NAME GROUP HOME SHELL` / `member GROUP USER` lines: the accounts
    of overlays/debian/accounts.yaml plus any owner the overlay names (as the bootstrap layer
    creates them), for late-target.sh to create before it extracts the overlay."""
    spec = yaml.safe_load(accounts_file.read_text()) or {} if accounts_file.exists() else {}
    facts = OS_FACTS["debian"]
    homes = {facts["vmail_user"]: facts["vmail_home"]}
    lines, groups, users = [], [], []
    for g in spec.get("groups", []):
        groups.append(g["name"])
    for u in spec.get("users", []):
        users.append((u["name"], u.get("group", u["name"]), u.get("home", "/nonexistent"),
                      u.get("shell", "/usr/sbin/nologin")))
    for e in entries:
        if e.group not in groups and e.group != "root":
            groups.append(e.group)
        if e.owner != "root" and e.owner not in [u[0] for u in users]:
            users.append((e.owner, e.owner, homes.get(e.owner, "/nonexistent"), "/usr/sbin/nologin"))
    lines += [f"group {g}" for g in groups]
    lines += [f"user {n} {g} {h} {s}" for n, g, h, s in users]
    lines += [f"member {g['name']} {m}" for g in spec.get("groups", []) for m in g.get("members", [])]
    return "".join(line + "\n" for line in lines)


def write_served_dir(site: Site, tree: Tree, out: Path, base_url: str, mirror: str | None = None) -> Path:
    """Everything the installer fetches from the builder: preseed, late scripts, overlay data."""
    from . import layer
    out = Path(out)
    (out / "status").mkdir(parents=True, exist_ok=True)
    entries = all_entries(site, tree)
    security = f"http://{MIRROR_ADDR}/debian-security" if mirror is None else None
    (out / "preseed.cfg").write_text(render_preseed(site, mirror or guest_mirror(), base_url,
                                                    security_mirror=security))
    for script in ("late.sh", "late-target.sh"):
        shutil.copyfile(paths.AUTOINSTALL / "debian" / script, out / script)
    (out / "overlay.tar").write_bytes(overlay_tar(entries))
    (out / "owners.txt").write_text(owners_list(entries))
    (out / "accounts.txt").write_text(accounts_list(entries))
    (out / "units.txt").write_text("".join(u + "\n" for u in layer.units_for(site)))
    (out / "instance-files.txt").write_text("".join(p + "\n" for p in layer.INSTANCE_FILES))
    (out / "install-user.txt").write_text(INSTALL_USER + "\n")
    (out / "status" / "late-ok").write_text("ok\n")
    return out


# -- the install --------------------------------------------------------------------------------

def late_status(requests) -> str | None:
    """What the late command reported through the HTTP server: ok, failed:<step>, or None."""
    for _, path, _ in reversed(list(requests)):
        if path == "/status/late-ok":
            return "ok"
        if path.startswith("/status/late-failed"):
            return "failed:" + path.rsplit("/", 1)[-1]
    return None


def install(site: Site, rendered_tree: Tree | Path, disk_path: Path, workdir: Path,
            verbose: bool = False, progress=None, stall_timeout: float = 1200,
            deadline: float = 4 * 3600, netboot_files: netboot.Netboot | None = None,
            append: str | None = None) -> None:
    """Install Debian with the preseed onto `disk_path` (an existing raw or qcow2 file).
    Raises an InstallerError subclass naming the question, URL or failure that stopped it.
    `append` replaces the kernel command line (tests use it to leave a question open)."""
    from ..httpserve import FileServer
    from ..qemu import Disk, Qemu, QemuSpec
    from .mirrorproxy import MirrorProxy
    say = progress.say if progress is not None else (lambda text: print(text, file=sys.stderr, flush=True))
    workdir = Path(workdir)
    tree = load_tree(rendered_tree)
    routes = upstream_mirrors(site)
    nb = netboot_files or netboot.fetch_netboot(routes["/debian"], site.model.debian.suite, log=say)
    served = workdir / "preseed-served"
    served.mkdir(parents=True, exist_ok=True)
    base_url = f"http://{FILES_ADDR}"
    write_served_dir(site, tree, served, base_url)
    log_path = workdir / "installer-serial.log"
    suite = site.model.debian.suite
    signed = {f"/debian/dists/{suite}/{name}": sha
              for name, (sha, _size) in archive.verified_release(routes["/debian"], suite)["SHA256"].items()}
    with FileServer(served) as files, MirrorProxy(routes, signed=signed, keyring=archive.KEYRING) as mirror:
        relay = f"cmd:{sys.executable} -m builder.openbsd.relay 127.0.0.1"
        spec = QemuSpec(disks=[Disk(disk_path)], kernel=nb.kernel, initrd=nb.initrd,
                        append=append or kernel_append(site, base_url), memory=MEMORY, smp=SMP,
                        guestfwd={f"{FILES_ADDR}:80": f"{relay} {files.port}",
                                  f"{MIRROR_ADDR}:80": f"{relay} {mirror.port}"},
                        reboot_shutdown=True, name="debian-install")
        say(f"installer: booting {nb.package} {nb.version} (serial log {log_path})")

        def failed_downloads() -> list[str]:
            urls = [r.describe() for r in mirror.failed() if r.url]
            urls += [f"{base_url}{p} (HTTP {code})" for _, p, code in files.requests
                     if isinstance(code, int) and code >= 400 and not p.startswith("/status/")]
            return list(dict.fromkeys(urls))

        with Qemu(spec, workdir, log_path=log_path, verbose=verbose) as vm:
            diconsole.watch(vm.serial, report=say, failed_downloads=failed_downloads,
                            late_status=lambda: late_status(files.requests),
                            stall_timeout=stall_timeout, deadline=deadline)
            vm.wait_exit(60)


# -- the pipeline -------------------------------------------------------------------------------

def installed_packages(raw: Path) -> dict[str, str]:
    """What the installer put on the disk, from its /var/lib/dpkg/status (read with debugfs,
    never mounted)."""
    from ..export_image import packages_from_status
    from ..imageread.ext4 import read_text_file
    status = read_text_file(raw, "/var/lib/dpkg/status")
    if not status:
        raise BuildError(f"{raw}: the installed disk has no ext4 file system with /var/lib/dpkg/status")
    return packages_from_status(status)


def cmd_build(args) -> int:
    """`mkmailimage build debian SITE --installer preseed`: install into a raw disk in a work
    directory beside the output, then publish qcow2 (+ raw), manifest and SHA256SUMS."""
    from ..build import BUILDER_VERSION, Interrupted, _sigterm_as_interrupt
    from ..cache import sha256_file
    from ..export_image import publish
    from ..progress import Progress
    from ..render import render_tree
    from ..site import load_site
    from .disk import parse_size
    if not shutil.which("qemu-img"):
        raise ToolMissing("qemu-img", "qemu-utils")
    progress = Progress(verbose=getattr(args, "verbose", False))
    site_path = Path(args.site)
    with progress.stage("validate"):
        site = load_site(site_path)
        name = getattr(args, "name", None) or site.domain
        if "/" in name or name.startswith("."):
            raise BuildError(f"build: --name '{name}' must be a plain file name")
    with progress.stage("render"):
        tree = render_tree(site, "debian")
    out_dir = Path(getattr(args, "out", None) or paths.IMAGES)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _sigterm_as_interrupt():
        workdir = Path(tempfile.mkdtemp(prefix=".mkmailimage-preseed.", dir=out_dir))
        try:
            raw = workdir / f"{name}.raw"
            with open(raw, "wb") as f:
                f.truncate(parse_size(site.model.debian.disk_size))
            with progress.stage("netboot", "verified debian-installer package"):
                nb = netboot.fetch_netboot(upstream_mirrors(site)["/debian"], site.model.debian.suite,
                                           log=progress.say)
            with progress.stage("install", "Debian installer with preseed (TCG: tens of minutes)"):
                install(site, tree, raw, workdir, verbose=progress.verbose, progress=progress,
                        netboot_files=nb)
            with progress.stage("export"):
                manifest = {
                    "name": name, "os": "debian",
                    "builder": {"version": BUILDER_VERSION},
                    "site": {"file": site_path.name, "sha256": sha256_file(site_path),
                             "domain": site.domain, "hostname": site.hostname},
                    "inputs": {"installer": "preseed", "suite": site.model.debian.suite,
                               "netboot": {"package": nb.package, "version": nb.version,
                                           "sha256": nb.deb_sha256},
                               "preseed_sha256": hashlib.sha256(
                                   (workdir / "preseed-served" / "preseed.cfg").read_bytes()).hexdigest(),
                               "image_mirror": site.model.debian.mirror or "Debian's default",
                               "disk_size": site.model.debian.disk_size},
                    "packages": installed_packages(raw),
                }
                outputs = publish(workdir, out_dir, name, raw, manifest, progress,
                                  keep_raw=getattr(args, "raw", False),
                                  serial_log=workdir / "installer-serial.log")
        except BaseException as e:
            _keep_serial_log(workdir / "installer-serial.log", out_dir / f"{name}.installer-serial.log",
                             progress)
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted("build interrupted; no image was written") from None
            raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    sums = json.loads(outputs["manifest"].read_text())["outputs"]
    for kind in ("qcow2", "raw"):
        if outputs.get(kind):
            p = outputs[kind]
            print(f"{p}  {p.stat().st_size / 2**20:.0f} MiB  sha256 {sums[p.name]}")
    return 0


def _keep_serial_log(log: Path, kept: Path, progress) -> None:
    """A failed install leaves no image, but its console log stays beside where it would be."""
    if log.exists():
        shutil.copyfile(log, kept)
        progress.say(f"installer: serial console log kept at {kept}")
