"""The OpenBSD side of the test network (builder.openbsd.testguest), checked without OpenBSD.

No OpenBSD guest can run here (no media), so `RecordingGuest` is a STAND-IN for one: it
records the commands the harness would run and answers `ifconfig` with the text below, which
was written for this test in the form of OpenBSD 7.x's ifconfig(8) (interface name at the
start of a line, `lladdr` on a following line). The awk that picks the interface is real awk
run on that text; the hostname.if(5) and route(8) lines are checked literally."""
from __future__ import annotations

import subprocess

import pytest

from builder.openbsd import testguest
from builder.testnet import PEERS, write_file

IFCONFIG = """\
lo0: flags=2008049<UP,LOOPBACK,RUNNING,MULTICAST,LRO> mtu 32768
\tindex 3 priority 0 llprio 3
\tgroups: lo
\tinet 127.0.0.1 netmask 0xff000000
vio0: flags=2008843<UP,BROADCAST,RUNNING,SIMPLEX,MULTICAST,LRO> mtu 1500
\tlladdr 52:54:00:12:34:56
\tindex 1 priority 0 llprio 3
\tgroups: egress
\tinet 10.0.2.15 netmask 0xffffff00 broadcast 10.0.2.255
vio1: flags=2008802<BROADCAST,SIMPLEX,MULTICAST,LRO> mtu 1500
\tlladdr 52:54:00:00:0a:01
\tindex 2 priority 0 llprio 3
\tstatus: active
pflog0: flags=141<UP,RUNNING,PROMISC> mtu 33136
\tindex 5 priority 0 llprio 3
"""


class RecordingGuest:
    """STAND-IN for an OpenBSD guest's Machine (see the module docstring)."""
    name = "stand-in"

    def __init__(self):
        self.commands: list[str] = []
        self.files: dict[str, str] = {}
        self.units: list[str] = []
        self.ports: list[int] = []

    def guest_os(self) -> str:
        return "OpenBSD"

    def run(self, cmd, stdin=None, timeout=300):
        self.commands.append(cmd)
        if cmd.startswith("cat > "):
            self.files[cmd[len("cat > "):]] = stdin.decode()
        return 0, b"", b""

    def succeed(self, cmd, timeout=300) -> str:
        self.commands.append(cmd)
        if cmd.startswith("ifconfig |"):
            # the harness's own pipeline, with real awk, on the ifconfig text
            return subprocess.run(["sh", "-c", cmd.replace("ifconfig |", "cat |", 1)], input=IFCONFIG,
                                  capture_output=True, text=True, check=True).stdout
        return ""

    def wait_until_succeeds(self, cmd, timeout=300) -> str:
        self.commands.append(cmd)
        return ""

    def wait_for_unit(self, unit, timeout=300) -> None:
        self.units.append(unit)

    def wait_for_open_port(self, port, timeout=300) -> None:
        self.ports.append(port)


def test_configure_wires_the_private_link_dns_and_waits_for_the_mail_services():
    a, b = PEERS
    guest = RecordingGuest()
    testguest.configure(guest, a, b, "server:\n  local-zone: \"b.test.\" static\n", write_file)
    assert guest.files["/etc/hostname.vio1"] == (
        "inet 192.0.2.10 255.255.255.0\n"
        "!route -qn add -inet 198.51.100.0/24 -iface 192.0.2.10\n")
    assert guest.files[testguest.ZONE_FILE].startswith("server:")
    ran = "\n".join(guest.commands)
    assert "sh /etc/netstart vio1" in ran
    assert "ifconfig vio1 | grep -q 'inet 192.0.2.10 '" in ran
    # unbound is checked before it is restarted, then the peer's name must resolve to its address
    assert ran.index("unbound-checkconf") < ran.index("rcctl restart unbound") < ran.index("host -t A mail.b.test")
    assert guest.units == ["unbound", "redis", "rspamd", "dovecot", "smtpd"]
    assert guest.ports == [11333]


def test_an_unknown_mac_is_a_named_error():
    a, b = PEERS
    lost = type(a)(a.domain, a.address, a.network, "52:54:00:ff:ff:ff")
    with pytest.raises(Exception, match="no interface with MAC 52:54:00:ff:ff:ff"):
        testguest.configure(RecordingGuest(), lost, b, "", write_file)


def test_release_from_env(tmp_path):
    assert testguest.release_from_env({}) is None
    url = "https://openbsd.mirror.invalid/pub/OpenBSD"
    assert testguest.release_from_env({testguest.MIRROR_ENV: url}) == {"version": "7.8", "mirror": url}
    (tmp_path / "7.8" / "amd64").mkdir(parents=True)
    assert testguest.release_from_env({testguest.MIRROR_ENV: str(tmp_path), testguest.KEY_ENV: "k.pub"}) == {
        "version": "7.8", "sets_dir": str(tmp_path / "7.8" / "amd64"), "signify_key": "k.pub"}
    flat = tmp_path / "7.8" / "amd64"
    assert testguest.release_from_env({testguest.MIRROR_ENV: str(flat), testguest.VERSION_ENV: "7.7"}) == {
        "version": "7.7", "sets_dir": str(flat)}


def test_openbsd_sites_name_the_release(tmp_path, monkeypatch):
    from builder.testnet import make_sites
    monkeypatch.delenv(testguest.MIRROR_ENV, raising=False)
    with pytest.raises(Exception, match=testguest.MIRROR_ENV):
        make_sites(tmp_path / "none", "ssh-ed25519 AAAA test", "openbsd")
    (tmp_path / "rel" / "7.8" / "amd64").mkdir(parents=True)
    monkeypatch.setenv(testguest.MIRROR_ENV, str(tmp_path / "rel"))
    sites = make_sites(tmp_path / "obsd", "ssh-ed25519 AAAA test", "openbsd")
    assert [s.domain for s in sites] == ["a.test", "b.test"]
    for s in sites:
        assert s.model.openbsd.sets_dir == str(tmp_path / "rel" / "7.8" / "amd64")
        assert s.model.ipv4 in ("192.0.2.10", "198.51.100.10")
