"""The OpenBSD side of the two-VM test network (builder.testnet): what the harness does inside
an OpenBSD guest that a Debian guest does with networkd, systemd and journald.

- the private link: /etc/hostname.IF with the static address and an on-link route to the
  peer's network (route(8) `-iface`: the gateway named is this host's own address on the
  link), brought up with /etc/netstart IF;
- the test DNS: a drop-in under /var/unbound/etc/mkmailimage.d (the rendered unbound.conf
  includes it), checked with unbound-checkconf, then `rcctl restart unbound`;
- services by rcctl, mail logs from /var/log/maillog.

Not run on the CI machine: it cannot reach OpenBSD media (see MIRROR_ENV). The commands are
checked there against a recording stand-in for the guest (tests/test_testnet_openbsd.py).
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from ..errors import MkMailImageError

# Where a local copy of an OpenBSD release is named, for the end-to-end build and the OpenBSD
# test pair: a URL or a directory holding <version>/amd64 (and <version>/packages/amd64).
MIRROR_ENV = "MKMAILIMAGE_OPENBSD_MIRROR"
VERSION_ENV = "MKMAILIMAGE_OPENBSD_VERSION"
KEY_ENV = "MKMAILIMAGE_OPENBSD_KEY"

SERVICES = ["unbound", "redis", "rspamd", "dovecot", "smtpd"]
ZONE_FILE = "/var/unbound/etc/mkmailimage.d/testnet.conf"


def release_from_env(environ=os.environ) -> dict | None:
    """The site file's `openbsd:` section for the release MIRROR_ENV names, or None."""
    mirror = environ.get(MIRROR_ENV)
    if not mirror:
        return None
    version = environ.get(VERSION_ENV, "7.8")
    section: dict = {"version": version}
    if os.path.isdir(mirror):
        nested = Path(mirror) / version / "amd64"
        section["sets_dir"] = str(nested if nested.is_dir() else Path(mirror))
    else:
        section["mirror"] = mirror
    if environ.get(KEY_ENV):
        section["signify_key"] = environ[KEY_ENV]
    return section


def interface_cmd(mac: str) -> str:
    """Prints the name of the interface with MAC (ifconfig's `lladdr` line follows its name)."""
    return f"ifconfig | awk '/^[a-z]/ {{ i = $1 }} /lladdr {mac}/ {{ sub(/:$/, \"\", i); print i }}'"


def hostname_if(address: str, network: str, peer_network: str) -> str:
    """/etc/hostname.IF for the private link (hostname.if(5): `!` lines are run by netstart)."""
    mask = ipaddress.ip_network(network).netmask
    return (f"inet {address} {mask}\n"
            f"!route -qn add -inet {peer_network} -iface {address}\n")


def configure(machine, peer, other, zone_config: str, write_file) -> None:
    """Give the guest its private-link address, a route to the peer, and the test DNS; wait
    until the mail services run. `peer`/`other`: builder.testnet.PeerSpec."""
    iface = machine.succeed(interface_cmd(peer.mac)).strip()
    if not iface:
        raise MkMailImageError(f"{peer.domain}: no interface with MAC {peer.mac}")
    write_file(machine, f"/etc/hostname.{iface}", hostname_if(peer.address, peer.network, other.network))
    machine.succeed(f"chmod 0640 /etc/hostname.{iface} && sh /etc/netstart {iface}")
    machine.wait_until_succeeds(f"ifconfig {iface} | grep -q 'inet {peer.address} '", timeout=60)
    write_file(machine, ZONE_FILE, zone_config)
    machine.succeed("unbound-checkconf && rcctl restart unbound")
    machine.wait_until_succeeds(f"host -t A mail.{other.domain} 127.0.0.1 | grep -q '{other.address}$'",
                                timeout=60)
    for service in SERVICES:
        machine.wait_for_unit(service, timeout=600)        # `rcctl check` on OpenBSD
    machine.wait_for_open_port(11333, timeout=1200)         # rspamd's scanner, as on Debian


def mail_logs_cmd() -> str:
    return ("tail -n 200 /var/log/maillog; echo '--- rspamd'; tail -n 100 /var/log/rspamd/rspamd.log; "
            "echo '--- daemon'; tail -n 50 /var/log/daemon")


def connects_cmd(address: str, port: int) -> str:
    """Succeeds when a TCP connection to ADDRESS:PORT opens (nc(1) is in OpenBSD's base)."""
    return f"nc -z -w 5 {address} {port}"
