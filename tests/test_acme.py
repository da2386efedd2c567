"""tls.mode: acme -- certbot in the Debian image, proven against a real ACME server.

Fast tests: the site fields (tls.acme_server, tls.acme_ca, tls.acme_email) and what they render
(certbot and its units only in acme mode, port 80 open only in acme mode).

VM test: Debian's `pebble` (Let's Encrypt's test ACME server) runs on the host's loopback with
a CA made here for its HTTPS; its -dnsserver is a LocalDns that resolves the test hostname to
127.0.0.1, and its http-01 port is the host port QEMU forwards to the guest's port 80. The
guest (restrict=on) reaches pebble's ACME API only through a guestfwd at 10.0.2.100:14000.
The image is built with tls.mode acme, acme_server = pebble as the guest sees it and
acme_ca = the CA made here; after boot certbot must have obtained a certificate that smtpd
(465, 587) and dovecot (993) present.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from builder.errors import SiteError
from builder.initsite import init_site
from builder.render import render_tree
from builder.site import LETSENCRYPT_DIRECTORY, load_site

ACME_UNIT = "/etc/systemd/system/mkmailimage-acme.service"
ACME_FILES = [ACME_UNIT, "/usr/local/sbin/mkmailimage-acme", "/usr/local/sbin/mkmailimage-acme-deploy"]
CA_FILE = "/etc/mkmailimage/acme-ca.pem"
CERTBOT_DROPIN = "/etc/systemd/system/certbot.service.d/mkmailimage.conf"
GUEST_ACME_ADDR = "10.0.2.100"     # guestfwd address of pebble's ACME API as the guest sees it
GUEST_ACME_PORT = 14000


# -- a CA and certificates made here ---------------------------------------------------------

def make_ca(name: str = "mkmailimage test ACME HTTPS CA"):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert, ips: list[str], names: list[str]):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips] + [x509.DNSName(n) for n in names]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# -- sites ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("acme-site") / "a"
    init_site("a.test", d, password="correct horse battery", out=open(os.devnull, "w"))
    _, ca = make_ca()
    (d / "acme-ca.pem").write_bytes(pem(ca))
    return d


def with_tls(site_dir: Path, tls_lines: str, name: str = "site.yaml") -> Path:
    """A copy of the site file (same directory, so relative paths work) with this tls section."""
    text = (site_dir / "site.yaml").read_text()
    start = text.index("\ntls:\n") + 1
    end = text.index("\n\n", start)
    target = site_dir / name
    target.write_text(text[:start] + "tls:\n" + tls_lines + text[end:])
    return target


ACME_WITH_CA = ("  mode: acme\n  acme_email: hostmaster@a.test\n"
                "  acme_server: https://10.0.2.100:14000/dir\n  acme_ca: acme-ca.pem\n")


def test_acme_fields_are_read(site_dir):
    site = load_site(with_tls(site_dir, ACME_WITH_CA, "acme.yaml"))
    tls = site.model.tls
    assert (tls.mode, tls.acme_email) == ("acme", "hostmaster@a.test")
    assert tls.acme_directory == "https://10.0.2.100:14000/dir"
    ca = x509.load_pem_x509_certificate((site_dir / "acme-ca.pem").read_bytes())
    assert x509.load_pem_x509_certificates(site.acme_ca_pem.encode()) == [ca]


def test_acme_server_defaults_to_lets_encrypt(site_dir):
    site = load_site(with_tls(site_dir, "  mode: acme\n", "plain-acme.yaml"))
    assert site.model.tls.acme_directory == LETSENCRYPT_DIRECTORY
    assert site.acme_ca_pem is None


@pytest.mark.parametrize("tls_lines,field,message", [
    ("  mode: acme\n  acme_server: http://acme.example.net/dir\n", "tls.acme_server", "https://"),
    ("  mode: acme\n  acme_email: not-an-address\n", "tls.acme_email", "e-mail address"),
    ("  mode: acme\n  acme_ca: nope.pem\n", "tls.acme_ca", "does not exist"),
    ("  mode: acme\n  acme_ca: site.yaml\n", "tls.acme_ca", "not a PEM certificate"),
    ("  mode: selfsigned\n  acme_server: https://acme.example.net/dir\n", "tls.acme_server",
     "only used with tls.mode: acme"),
    ("  mode: selfsigned\n  acme_ca: acme-ca.pem\n", "tls.acme_ca", "only used with tls.mode: acme"),
])
def test_bad_acme_fields_are_refused_with_place(site_dir, tls_lines, field, message):
    path = with_tls(site_dir, tls_lines, "bad.yaml")
    with pytest.raises(SiteError) as exc:
        load_site(path)
    e = exc.value
    assert (e.file, e.field) == (str(path), field), str(e)
    assert message in str(e)
    key = field.split(".")[1]
    lines = path.read_text().splitlines()
    assert lines[e.line - 1].strip().startswith(key + ":"), (str(e), lines[e.line - 1])


def test_acme_ca_with_a_private_key_is_refused(site_dir):
    key, ca = make_ca()
    (site_dir / "ca-and-key.pem").write_bytes(pem(ca) + pem(key))
    path = with_tls(site_dir, "  mode: acme\n  acme_ca: ca-and-key.pem\n", "keyed.yaml")
    with pytest.raises(SiteError, match="private key") as exc:
        load_site(path)
    assert exc.value.field == "tls.acme_ca"


def _allowed_ports(tree) -> str:
    nft = tree["/etc/nftables.conf"].data.decode()
    return next(l for l in nft.splitlines() if l.strip().startswith("tcp dport"))


def test_selfsigned_renders_no_acme_client_and_keeps_80_closed(site_dir):
    site = load_site(site_dir / "site.yaml")
    tree = render_tree(site, "debian")
    assert not [p for p in tree if "acme" in p or "certbot" in p]
    assert "/etc/mkmailimage" not in tree            # emptied by the omitted CA file
    assert _allowed_ports(tree).split("{")[1].split("}")[0].split(",") == [" 22", " 25", " 465", " 587", " 993 "]
    from builder.debian import bootstrap, layer
    assert "certbot" not in bootstrap.packages_for(site)
    assert "mkmailimage-acme.service" not in layer.units_for(site)
    assert "ACME_SERVER=\n" in layer.site_env(site)


def test_acme_renders_certbot_runner_and_opens_80(site_dir):
    site = load_site(with_tls(site_dir, ACME_WITH_CA, "acme.yaml"))
    tree = render_tree(site, "debian")
    for path in ACME_FILES:
        assert path in tree, path
    assert tree["/usr/local/sbin/mkmailimage-acme"].mode == 0o755
    assert tree["/usr/local/sbin/mkmailimage-acme-deploy"].mode == 0o755
    assert tree["/usr/local/sbin/mkmailimage-acme"].data.startswith(b"#!/bin/sh\n")
    assert " 80," in _allowed_ports(tree)
    assert tree[CA_FILE].data.decode() == site.acme_ca_pem
    unit = tree[ACME_UNIT].data.decode()
    assert f"Environment=REQUESTS_CA_BUNDLE={CA_FILE}" in unit
    assert f"Environment=REQUESTS_CA_BUNDLE={CA_FILE}" in tree[CERTBOT_DROPIN].data.decode()
    for path in ACME_FILES[1:]:        # the shell scripts parse
        proc = subprocess.run(["sh", "-n"], input=tree[path].data, capture_output=True)
        assert proc.returncode == 0, (path, proc.stderr)
    from builder.debian import bootstrap, layer
    assert "certbot" in bootstrap.packages_for(site)
    assert {"mkmailimage-acme.service", "certbot.timer"} <= set(layer.units_for(site))
    env = layer.site_env(site)
    assert "TLS_MODE=acme\n" in env and "ACME_SERVER=https://10.0.2.100:14000/dir\n" in env
    assert "ACME_EMAIL=hostmaster@a.test\n" in env


def test_acme_without_private_ca_uses_the_system_trust_store(site_dir):
    site = load_site(with_tls(site_dir, "  mode: acme\n", "plain-acme.yaml"))
    tree = render_tree(site, "debian")
    assert ACME_UNIT in tree
    assert CA_FILE not in tree and CERTBOT_DROPIN not in tree
    assert "/etc/systemd/system/certbot.service.d" not in tree
    assert "REQUESTS_CA_BUNDLE" not in tree[ACME_UNIT].data.decode()
    from builder.debian import layer
    assert f"ACME_SERVER={LETSENCRYPT_DIRECTORY}\n" in layer.site_env(site)


def test_acme_base_layer_is_keyed_apart(site_dir):
    from builder.debian.bootstrap import BaseInputs, packages_for
    plain = load_site(site_dir / "site.yaml")
    acme = load_site(with_tls(site_dir, "  mode: acme\n", "plain-acme.yaml"))
    a = BaseInputs("trixie", "http://mirror.example.net/debian", packages=packages_for(plain))
    b = BaseInputs("trixie", "http://mirror.example.net/debian", packages=packages_for(acme))
    assert a.key() != b.key()
    assert a.key() == BaseInputs("trixie", "http://mirror.example.net/debian").key()


def test_preseed_overlay_gets_the_same_acme_setup(site_dir):
    from builder.debian import layer, preseed
    site = load_site(with_tls(site_dir, ACME_WITH_CA, "acme.yaml"))
    entries = {e.path: e for e in preseed.system_entries(site)}
    assert entries["/etc/mkmailimage/site.env"].data.decode() == layer.site_env(site)
    text = preseed.render_preseed(site, "http://mirror.example.net/debian", "http://10.0.2.100")
    assert "certbot" in next(l for l in text.splitlines() if l.startswith("d-i pkgsel/include"))
