"""Two mail servers on a private network: the proof that an image works.

Two test domains, a.test and b.test, get their own site files and images. Both VMs boot from
copy-on-write overlays of those images; each has

- a user-mode NIC with `restrict=on` (reaches nothing) and host port forwards for SSH,
  SMTP, submission and IMAPS, through which the tests act as clients;
- a second NIC joined to the peer over a QEMU dgram netdev on 127.0.0.1, addressed from the
  documentation ranges (192.0.2.0/24 and 198.51.100.0/24), which rspamd treats as foreign,
  so SPF/DKIM/DMARC really run (RFC 1918 addresses would be skipped as local).

DNS for both zones (the records `mkmailimage dns` prints) is put into each guest's own unbound
by the harness; the same data is served on the host by `testdns.LocalDns` so the tests can
verify signatures independently.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import dnsrecords
from .errors import MkMailImageError
from .initsite import init_site
from .site import Site, load_site
from .testdns import unbound_zone_config

MAIL_PORTS = [22, 25, 465, 587, 993]


@dataclass
class PeerSpec:
    domain: str
    address: str          # on the private link
    network: str
    mac: str
    user: str = "alice"
    password: str = ""

    @property
    def email(self) -> str:
        return f"{self.user}@{self.domain}"


PEERS = [
    PeerSpec("a.test", "192.0.2.10", "192.0.2.0/24", "52:54:00:00:0a:01", "alice", "alice's test password"),
    PeerSpec("b.test", "198.51.100.10", "198.51.100.0/24", "52:54:00:00:0b:01", "bob", "bob's test password"),
]


def make_sites(workdir: Path, ssh_public_key: str, os_name: str = "debian") -> list[Site]:
    """Site files for the two test domains (DMARC p=quarantine, the peer's address as ipv4).
    For OpenBSD the release comes from MKMAILIMAGE_OPENBSD_MIRROR (a local copy)."""
    release = None
    if os_name == "openbsd":
        from .openbsd.testguest import MIRROR_ENV, release_from_env
        release = release_from_env()
        if release is None:
            raise MkMailImageError(f"the OpenBSD test pair needs {MIRROR_ENV}: a URL or directory "
                                   "with a copy of an OpenBSD release")
    sites = []
    for peer in PEERS:
        d = workdir / peer.domain
        path = d / "site.yaml"
        if not path.exists():
            init_site(peer.domain, d, user=peer.user, password=peer.password, out=open(os.devnull, "w"))
            text = path.read_text()
            text = text.replace("# ipv4: 203.0.113.25", f"ipv4: {peer.address}")
            text = text.replace("admin_ssh_keys: []", f"admin_ssh_keys:\n  - {ssh_public_key}")
            path.write_text(text)
            if release is not None:
                import yaml
                data = yaml.safe_load(path.read_text())
                data["openbsd"] = {**(data.get("openbsd") or {}), **release}
                path.write_text(yaml.safe_dump(data, sort_keys=False))
        sites.append(load_site(path))
    return sites


def zones(sites: list[Site]) -> dict[str, list[dnsrecords.Record]]:
    return {s.domain + ".": dnsrecords.records(s, ipv4=p.address) for s, p in zip(sites, PEERS)}


def write_file(machine, path: str, text: str) -> None:
    status, _, err = machine.run(f"cat > {path}", stdin=text.encode())
    if status != 0:
        raise MkMailImageError(f"{machine.name}: cannot write {path}: {err.decode(errors='replace')}")


def guest_side(machine):
    """The module that knows the guest's OS (one per distribution, like mkosi): configure(),
    mail_logs_cmd(), connects_cmd()."""
    if machine.guest_os() == "OpenBSD":
        from .openbsd import testguest
    else:
        from .debian import testguest
    return testguest


def configure_guest(machine, peer: PeerSpec, other: PeerSpec, zone_config: str) -> None:
    """Give the guest its private-link address, a route to the peer, and the test DNS; wait
    until its mail services (rspamd's scanner last) are up."""
    guest_side(machine).configure(machine, peer, other, zone_config, write_file)


@dataclass
class Peer:
    spec: PeerSpec
    site: Site
    image: Path
    nic: object = None       # builder.qemu.Nic: its end of the private network
    vm: object = None        # builder.qemu.Qemu
    machine: object = None   # builder.machine.Machine

    def port(self, guest_port: int) -> int:
        return self.vm.host_port(guest_port)

    def imap(self):
        from .mailclient import Imap
        return Imap("127.0.0.1", self.port(993), self.spec.email, self.spec.password)


class TestNetwork:
    """Boot the two peers from their images (copy-on-write) and wire them together.

    `with TestNetwork(sites, images, workdir, ssh_key) as net:` -> net.a, net.b (Peer), net.dns
    (LocalDns with the same zones). Both VMs are always stopped on leaving, also on failure;
    their serial logs stay in `workdir`."""

    __test__ = False  # not a pytest class

    def __init__(self, sites: list[Site], images: list[Path], workdir: Path, ssh_key: Path,
                 verbose: bool = False, memory: int = 1536):
        self.workdir = Path(workdir)
        self.ssh_key = Path(ssh_key)
        self.verbose = verbose
        self.memory = memory
        self.peers = [Peer(spec, site, Path(img)) for spec, site, img in zip(PEERS, sites, images)]
        self.dns = None
        self._stack = []

    @property
    def a(self) -> Peer:
        return self.peers[0]

    @property
    def b(self) -> Peer:
        return self.peers[1]

    def __enter__(self) -> "TestNetwork":
        try:
            self._start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _start(self) -> None:
        from .qemu import dgram_pair
        from .testdns import LocalDns

        self.workdir.mkdir(parents=True, exist_ok=True)
        all_zones = zones([p.site for p in self.peers])
        self.dns = LocalDns(all_zones).__enter__()
        self._stack.append(self.dns)
        nic_a, nic_b = dgram_pair(self.a.spec.mac, self.b.spec.mac)
        zone_config = unbound_zone_config(all_zones, refuse_others=True)
        for peer, nic in zip(self.peers, (nic_a, nic_b)):
            peer.nic = nic
            self._boot(peer)
        for peer, other in ((self.a, self.b), (self.b, self.a)):
            self._wait_for_login(peer)
            configure_guest(peer.machine, peer.spec, other.spec, zone_config)

    def _boot(self, peer: Peer):
        """Start the peer's QEMU on a fresh copy-on-write overlay of its image; its Machine."""
        from .machine import Machine
        from .qemu import Disk, Qemu, QemuSpec

        overlay = self.workdir / f"{peer.spec.domain}.overlay.qcow2"
        overlay.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", _format(peer.image),
                        "-b", str(peer.image.resolve()), str(overlay)], check=True)
        spec = QemuSpec(disks=[Disk(overlay)], memory=self.memory, smp=1,
                        forwards={p: None for p in MAIL_PORTS}, nics=[peer.nic],
                        name=peer.spec.domain)
        peer.vm = Qemu(spec, self.workdir, log_path=self.workdir / f"{peer.spec.domain}.serial.log",
                       verbose=self.verbose)
        self._stack.append(peer.vm)
        peer.vm.__enter__()
        peer.machine = Machine(peer.vm, key=self.ssh_key, name=peer.spec.domain)
        return peer.machine

    def _wait_for_login(self, peer: Peer) -> None:
        """Until the peer accepts SSH; a boot the emulator fails gets one more (machine.py)."""
        from .machine import login_or_reboot

        # 900 s: TCG on a loaded 2-core CI machine
        peer.machine = login_or_reboot(peer.machine, lambda: self._boot(peer), timeout=900)

    def mail_logs(self, peer: Peer) -> str:
        """What the peer's mail daemons said (for failure reports)."""
        try:
            return peer.machine.succeed(guest_side(peer.machine).mail_logs_cmd())
        except Exception as e:  # the VM may be the thing that failed
            return f"(could not read {peer.spec.domain}'s logs: {e})"

    def __exit__(self, *exc) -> None:
        for item in reversed(self._stack):
            try:
                item.__exit__(None, None, None)
            except Exception:
                pass
        self._stack.clear()


def _format(image: Path) -> str:
    return "qcow2" if image.suffix == ".qcow2" else "raw"


def build_images(workdir: Path, ssh_public_key: str, verbose: bool = False,
                 os_name: str = "debian") -> tuple[list[Site], list[Path]]:
    """Site files and images for both test domains. Debian: the cached base layer makes the
    second build (and every later run) cost only the site layer and the disk assembly."""
    sites = make_sites(workdir, ssh_public_key, os_name)
    images = []
    for site in sites:
        if os_name == "openbsd":
            import types
            from .openbsd.build import build_openbsd
            args = types.SimpleNamespace(name=site.domain, out=workdir / "images", raw=False,
                                         verbose=verbose, no_cache=False, locked=False)
            images.append(Path(build_openbsd(site, args)))
            continue
        from .build import BuildState, run_build
        from .progress import Progress
        st = BuildState(site_path=site.path, out_dir=workdir / "images", name=site.domain,
                        progress=Progress(verbose=verbose))
        run_build(st)
        images.append(Path(st.outputs["qcow2"]))
    return sites, images


def cmd_test(args) -> int:
    """`mkmailimage test`: run the two-VM scenarios (tests/test_testnet.py) with pytest."""
    import pytest

    from . import paths
    test_file = paths.ROOT / "tests" / "test_testnet.py"
    if not test_file.exists():
        raise MkMailImageError(f"{test_file} is missing: `mkmailimage test` runs from a source checkout")
    if os.geteuid() != 0:
        # the images are built like `mkmailimage build` does without root (builder.userns)
        from .userns import reexec_as_namespace_root
        reexec_as_namespace_root(args.argv)
    os.environ["MKMAILIMAGE_TEST_OS"] = args.os
    argv = [str(test_file), "-p", "no:cacheprovider", "-v", "-s" if args.verbose else "-q",
            *args.pytest_args]
    return int(pytest.main(argv))
