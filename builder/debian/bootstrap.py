"""The Debian base layer: an mmdebstrap tarball of the suite with the mail stack, cached by inputs.

The layer holds packages only; everything site-specific is layered on top afterwards
(builder.debian.layer), so a site-file change reuses the cached tarball. mmdebstrap sorts the
tarball and clamps mtimes to SOURCE_DATE_EPOCH, and empties /etc/machine-id and the logs it
knows about, so equal inputs give an equal tarball.

Ownership: mmdebstrap always runs in unshare mode, which works the same as root, as root of a
user namespace (builder.userns) and as an ordinary user with subordinate ids, so who builds
does not change the layer. Its tarball records the owners; the build extracts it as (namespace)
root.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import cache
from ..errors import BuildError, ToolMissing
from ..hostinfo import host_debian_mirror
from ..progress import Progress

# Bump when the recipe below changes in a way the inputs do not show, so old layers are not reused.
RECIPE_VERSION = 2   # 2: always --mode=unshare

# Trixie's release day (2025-08-09 00:00 UTC). The default timestamp of every file the build
# writes, so two builds agree without a lock; a lock file (or SOURCE_DATE_EPOCH) overrides it.
DEFAULT_EPOCH = 1754697600

PACKAGES = [
    # boot and base system (variant "apt" lacks login on trixie: it is no longer essential)
    "linux-image-amd64", "initramfs-tools", "zstd", "systemd", "systemd-sysv", "udev", "dbus",
    "libpam-systemd", "login", "passwd", "kmod", "e2fsprogs", "iproute2", "netbase", "tzdata",
    "systemd-timesyncd", "cloud-guest-utils", "fdisk", "procps", "less",
    # GRUB's modules and grub-mkimage: the boot images are made from the image's own GRUB
    "grub-pc-bin", "grub-efi-amd64-bin",
    # the mail stack and what it needs
    "openssh-server", "opensmtpd", "opensmtpd-filter-rspamd", "rspamd", "redis-server",
    "dovecot-core", "dovecot-imapd", "dovecot-lmtpd", "dovecot-sieve", "unbound", "nftables",
    "ca-certificates", "openssl",
    # smtpd.conf's `table passwd passwd:` backend; unbound's root trust anchor (a Recommends)
    "opensmtpd-table-passwd", "dns-root-data",
]


# tls.mode acme: Debian's ACME client (standalone http-01: no web server needed)
ACME_PACKAGES = ["certbot"]


def packages_for(site) -> list[str]:
    """The base layer's packages for this site: the ACME client only where it is used (the
    layer is cached per package list, so acme and selfsigned sites share nothing else)."""
    return PACKAGES + (ACME_PACKAGES if site.model.tls.mode == "acme" else [])


@dataclass
class BaseInputs:
    suite: str
    mirror: str                     # where the build downloads from (never written into the image)
    packages: list[str] = field(default_factory=lambda: list(PACKAGES))
    epoch: int = DEFAULT_EPOCH
    pins: dict[str, str] = field(default_factory=dict)   # package -> exact version (build --locked)

    def key_inputs(self) -> dict:
        return {
            "recipe": RECIPE_VERSION,
            "suite": self.suite,
            "mirror": self.mirror,
            "packages": sorted(set(self.packages)),
            "epoch": self.epoch,
            "mmdebstrap": mmdebstrap_version(),
            **({"pins": dict(sorted(self.pins.items()))} if self.pins else {}),
        }

    def key(self) -> str:
        return cache.input_key(self.key_inputs())


def build_mirror(site_mirror: str | None) -> str:
    mirror = site_mirror or host_debian_mirror()
    if not mirror:
        raise BuildError("base layer: no Debian mirror: set debian.mirror in the site file or "
                         "configure one in the host's /etc/apt/sources.list")
    return mirror


def mmdebstrap_version() -> str:
    exe = shutil.which("mmdebstrap")
    if not exe:
        raise ToolMissing("mmdebstrap", "mmdebstrap")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return out.strip().split()[-1] if out.strip() else "unknown"


def layer_path(inputs: BaseInputs) -> Path:
    return cache.layers_dir() / f"debian-base-{inputs.key()[:20]}.tar"


def base_layer(inputs: BaseInputs, progress: Progress, no_cache: bool = False) -> tuple[Path, bool]:
    """Return (tarball, reused). Builds it with mmdebstrap unless a layer with the same key exists."""
    final = layer_path(inputs)
    with cache.locked(final.name):
        if final.exists() and not no_cache:
            return final, True
        _mmdebstrap(inputs, final, progress)
        meta = {"key": inputs.key(), "inputs": {**inputs.key_inputs(), "mirror": "(hashed)"}}
        cache.write_atomic(final.with_suffix(".json"), json.dumps(meta, indent=1).encode())
        return final, False


def _mmdebstrap(inputs: BaseInputs, final: Path, progress: Progress) -> None:
    exe = shutil.which("mmdebstrap")
    if not exe:
        raise ToolMissing("mmdebstrap", "mmdebstrap")
    debs = cache.debs_dir()
    hook = f"{shlex.quote(sys.executable)} -m builder.debian.debcache"
    with cache.atomic_path(final, suffix=".tar") as tmp, _pin_hooks(inputs.pins) as pin_hooks:
        cmd = [
            exe, "--variant=apt", "--format=tar",
            "--mode=unshare",
            "--include=" + ",".join(sorted(set(inputs.packages))),
            # keep essential .debs until the customize hook has stored them
            "--skip=essential/unlink",
            "--aptopt=Acquire::Languages \"none\"",
            "--dpkgopt=path-exclude=/usr/share/doc/*/changelog*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/locale/locale.alias",
            f"--setup-hook={hook} sync-in \"$1\" {shlex.quote(str(debs))}",
            f"--customize-hook={hook} sync-out \"$1\" {shlex.quote(str(debs))}",
            *pin_hooks,
            inputs.suite, str(tmp), inputs.mirror,
        ]
        env = {"SOURCE_DATE_EPOCH": str(inputs.epoch),
               "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        progress.run(cmd, env=env, what=f"base layer: mmdebstrap {inputs.suite}")


@contextlib.contextmanager
def _pin_hooks(pins: dict[str, str]):
    """mmdebstrap hooks pinning apt to exact versions (a lock file's) for the whole bootstrap,
    essential set included; the preferences file is removed again before the tarball is made."""
    if not pins:
        yield []
        return
    from ..lock import PREFERENCES, apt_preferences_text
    with tempfile.NamedTemporaryFile("w", prefix="mkmailimage-pins-", suffix=".pref") as f:
        f.write(apt_preferences_text(pins))
        f.flush()
        dest = f'"$1"/{PREFERENCES}'
        yield [f"--setup-hook=mkdir -p \"$1\"/{os.path.dirname(PREFERENCES)} && cp {shlex.quote(f.name)} {dest}",
               f"--customize-hook=rm -f {dest}"]
