"""A tiny real Linux guest for testing builder.qemu / builder.machine without a mail image.

Debian's cloud kernel + an initramfs with busybox-static and dropbear (dropbear-bin and its
libraries), all taken from the Debian archive with `apt-get download` and the build host's
own libc. Built once into cache_dir()/tinyguest/ (lock-protected, safe under pytest-xdist).

The guest's /init reads its configuration from the kernel command line (`append()` makes it):
  tg.net=MAC@IP/PREFIX,...   static addresses, interfaces found by MAC
  tg.http=PORT               busybox httpd serving /www (index.html says TINYGUEST-HTTP)
  tg.key=BASE64              root's authorized_keys line -> dropbear on port 22
and prints TINYGUEST-READY on ttyS0 when done, then offers a root shell on the console.
The ACPI power button (QMP system_powerdown) powers it off (prints TINYGUEST-POWERBUTTON).
"""
from __future__ import annotations

import base64
import fcntl
import gzip
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.paths import cache_dir

VERSION = "4"  # bump when the initramfs layout changes
USER_MAC = "52:54:00:12:34:56"
USER_IP = "10.0.2.15/24"
MODULES = ["virtio_pci", "virtio_net", "virtio_blk", "virtio_rng", "button", "evdev"]
HOST_LIBDIR = "/lib/x86_64-linux-gnu"

INIT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m.ko; done
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }

# ACPI power button -> clean power-off
for ev in /sys/class/input/event*; do
  if grep -q "Power Button" $ev/device/name 2>/dev/null; then
    (dd if=/dev/input/${ev##*/} bs=24 count=1 >/dev/null 2>&1
     echo TINYGUEST-POWERBUTTON > /dev/console; sync; poweroff -f) &
  fi
done

ip link set lo up
for spec in $(arg tg.net | tr ',' ' '); do
  mac=${spec%@*}; addr=${spec#*@}
  for n in /sys/class/net/*; do
    if [ "$(cat $n/address)" = "$mac" ]; then
      ip addr add $addr dev ${n##*/}; ip link set ${n##*/} up
      echo "TINYGUEST-NET ${n##*/} $mac $addr"
    fi
  done
done

port=$(arg tg.http)
[ -n "$port" ] && httpd -p $port -h /www && echo "TINYGUEST-HTTPD $port"

key=$(arg tg.key)
if [ -n "$key" ]; then
  mkdir -p /root/.ssh /etc/dropbear; chmod 700 /root /root/.ssh
  echo "$key" | base64 -d > /root/.ssh/authorized_keys; chmod 600 /root/.ssh/authorized_keys
  dropbear -R -s -p 22 && echo "TINYGUEST-SSHD"
fi

echo TINYGUEST-READY
while true; do setsid cttyhack sh -l; done
"""


@dataclass
class TinyGuest:
    kernel: Path
    initrd: Path

    def ssh_spec(self, authorized_key: str, name: str, extra_append: str = ""):
        """QemuSpec of one small tiny guest whose sshd (port 22, forwarded) takes `authorized_key`."""
        from builder.qemu import QemuSpec
        return QemuSpec(kernel=self.kernel, initrd=self.initrd,
                        append=append(authorized_key=authorized_key) + extra_append,
                        memory=256, smp=1, forwards={22: None}, name=name)


def append(*, nets: dict[str, str] | None = None, http_port: int | None = None,
           authorized_key: str | None = None, user_net: bool = True) -> str:
    """Kernel command line for the tiny guest (see module docstring)."""
    nets = dict(nets or {})
    if user_net:
        nets.setdefault(USER_MAC, USER_IP)
    parts = ["console=ttyS0", "panic=-1", "quiet", "loglevel=3"]
    if nets:
        parts.append("tg.net=" + ",".join(f"{m}@{a}" for m, a in nets.items()))
    if http_port:
        parts.append(f"tg.http={http_port}")
    if authorized_key:
        parts.append("tg.key=" + base64.b64encode(authorized_key.strip().encode()).decode())
    return " ".join(parts)


def tiny_guest() -> TinyGuest:
    """Build (once) and return the kernel and initramfs."""
    root = cache_dir() / "tinyguest"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kpkg = _kernel_package()
        out = root / f"{kpkg}-v{VERSION}"
        if not (out / "initrd.gz").exists():
            _build(kpkg, out)
    return TinyGuest(out / "vmlinuz", out / "initrd.gz")


def _kernel_package() -> str:
    out = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"Depends: (linux-image-\S+-cloud-amd64)", out)
    if not m:
        raise RuntimeError(f"cannot resolve linux-image-cloud-amd64: {out!r}")
    return m.group(1)


def _build(kpkg: str, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="tinyguest-") as tmp:
        tmp = Path(tmp)
        debs = tmp / "debs"
        debs.mkdir()
        pkgs = [kpkg, "busybox-static", "dropbear-bin", "libtomcrypt1", "libtommath1"]
        subprocess.run(["apt-get", "download", *pkgs], cwd=debs, check=True,
                       capture_output=True)
        x = tmp / "x"
        for deb in debs.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True)
        files = _initramfs_files(x)
        staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        shutil.copyfile(next((x / "boot").glob("vmlinuz-*")), staging / "vmlinuz")
        with gzip.open(staging / "initrd.gz", "wb", compresslevel=6) as f:
            f.write(newc(files))
        os.replace(staging, out) if not out.exists() else shutil.rmtree(staging)


def _initramfs_files(x: Path) -> list[tuple[str, int, bytes]]:
    """(path, mode, data) entries; directories have data b"", symlinks their target."""
    D, F, L = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFLNK | 0o777
    files: list[tuple[str, int, bytes]] = []
    for d in ["bin", "dev", "etc", "lib", "lib/modules", "lib64", "proc", "sys", "root",
              "tmp", "www", "usr", "usr/bin", "usr/sbin", HOST_LIBDIR.lstrip("/")]:
        files.append((d, D, b""))
    files.append(("dev/console", stat.S_IFCHR | 0o600, b""))
    files.append(("init", F, INIT.encode()))
    files.append(("bin/busybox", F, (x / "bin/busybox").read_bytes()))
    files.append(("bin/sh", L, b"busybox"))
    files.append(("etc/passwd", stat.S_IFREG | 0o644, b"root:x:0:0:root:/root:/bin/sh\n"))
    files.append(("etc/group", stat.S_IFREG | 0o644, b"root:x:0:\n"))
    files.append(("etc/shells", stat.S_IFREG | 0o644, b"/bin/sh\n"))
    files.append(("www/index.html", stat.S_IFREG | 0o644, b"TINYGUEST-HTTP\n"))
    # kernel modules in dependency order (depends= from each module's .modinfo)
    kos = {p.name[:-3].replace("-", "_"): p for p in (x / "lib/modules").rglob("*.ko")}
    order: list[str] = []

    def add(name: str) -> None:
        name = name.replace("-", "_")
        if name in order:
            return
        data = kos[name].read_bytes()
        m = re.search(rb"\0depends=([^\0]*)\0", data)
        for dep in (m.group(1).decode().split(",") if m and m.group(1) else []):
            add(dep)
        order.append(name)
        files.append((f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, data))

    for mod in MODULES:
        add(mod)
    files.append(("etc/modules.order", stat.S_IFREG | 0o644, "\n".join(order).encode() + b"\n"))
    # dropbear with its libraries (libtom* from the downloaded debs, the rest from the host)
    dropbear = x / "usr/sbin/dropbear"
    files.append(("usr/sbin/dropbear", F, dropbear.read_bytes()))
    files.append(("bin/dropbear", L, b"/usr/sbin/dropbear"))
    libdirs = [x / HOST_LIBDIR.lstrip("/"), x / "usr" / HOST_LIBDIR.lstrip("/")]
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(map(str, libdirs)))
    ldd = subprocess.run(["ldd", str(dropbear)], capture_output=True, text=True, env=env,
                         check=True).stdout
    for line in ldd.splitlines():
        m = re.search(r"(\S+) => (/\S+)", line) or re.search(r"^\s*(/\S+ld-linux\S*)", line)
        if not m:
            continue
        path = Path(m.group(m.lastindex))
        name = path.name
        dest = "lib64/" + name if "ld-linux" in name else f"{HOST_LIBDIR.lstrip('/')}/{name}"
        files.append((dest, F, path.resolve().read_bytes()))
    return files


def newc(files: list[tuple[str, int, bytes]]) -> bytes:
    """An initramfs cpio archive ("newc" format) from (path, mode, data) entries."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    def entry(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        name_b = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(name_b), 0]
        out.extend(b"070701" + b"".join(b"%08X" % v for v in fields))
        out.extend(name_b)
        pad4()
        out.extend(data)
        pad4()

    for ino, (name, mode, data) in enumerate(files, start=1):
        rdev = (5, 1) if name == "dev/console" else (0, 0)
        entry(ino, name, mode, data, rdev)
    entry(0, "TRAILER!!!", 0, b"", (0, 0))
    return bytes(out)
