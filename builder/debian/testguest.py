"""The Debian side of the two-VM test network (builder.testnet): the private link by
systemd-networkd, the test DNS as an unbound drop-in, services by systemd, logs from journald.
Its OpenBSD counterpart is builder.openbsd.testguest."""
from __future__ import annotations

import ipaddress

from ..errors import MkMailImageError

SERVICES = ["unbound.service", "redis-server.service", "rspamd.service", "dovecot.service",
            "opensmtpd.service"]
ZONE_FILE = "/etc/unbound/mkmailimage.d/testnet.conf"

NETWORK_UNIT = """\
# mkmailimage test network: static address on the private link to the peer
[Match]
MACAddress={mac}

[Network]
Address={address}/{prefix}
DHCP=no
LinkLocalAddressing=no
IPv6AcceptRA=no

[Route]
Destination={peer_network}
Scope=link
"""


def configure(machine, peer, other, zone_config: str, write_file) -> None:
    """Give the guest its private-link address, a route to the peer, and the test DNS; wait
    until the mail services run. `peer`/`other`: builder.testnet.PeerSpec."""
    prefix = ipaddress.ip_network(peer.network).prefixlen
    unit = NETWORK_UNIT.format(mac=peer.mac, address=peer.address, prefix=prefix,
                               peer_network=other.network)
    write_file(machine, "/etc/systemd/network/10-mkmailimage-testnet.network", unit)
    write_file(machine, ZONE_FILE, zone_config)
    machine.succeed("networkctl reload")
    iface = machine.succeed(f"ip -o link | awk -F': ' '/{peer.mac}/ {{print $2}}'").strip()
    if not iface:
        raise MkMailImageError(f"{peer.domain}: no interface with MAC {peer.mac}")
    machine.succeed(f"networkctl reconfigure {iface}")
    machine.wait_until_succeeds(f"ip -4 addr show dev {iface} | grep -q 'inet {peer.address}/'", timeout=60)
    machine.succeed("unbound-checkconf && systemctl restart unbound")
    machine.wait_until_succeeds(f"getent hosts mail.{other.domain} | grep -q {other.address}", timeout=60)
    for unit in SERVICES:
        machine.wait_for_unit(unit, timeout=600)
    # rspamd reports "started" before its scanner listens (config load; with no DNS upstream
    # its fuzzy servers' names take ~15 s to fail), and filter-rspamd answers 421 until then.
    # (Minutes with a hyperscan-capable guest CPU: see TCG_ARGS in builder/accel.py.)
    machine.wait_for_open_port(11333, timeout=1200)


def mail_logs_cmd() -> str:
    return ("journalctl --no-pager -o short-monotonic -u opensmtpd -u dovecot -u rspamd "
            "-u unbound | tail -n 200")


def connects_cmd(address: str, port: int) -> str:
    """Succeeds when a TCP connection to ADDRESS:PORT opens (bash's /dev/tcp: the image has no nc)."""
    return f"timeout 5 bash -c '</dev/tcp/{address}/{port}'"
