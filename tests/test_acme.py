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


# -- the VM test: a real ACME server (pebble) on the host ---------------------------------------

class Pebble:
    """Debian's pebble on 127.0.0.1 with our HTTPS certificate; http-01 checks go to
    127.0.0.1:`http_port` after resolving names with `dns_port` (a LocalDns)."""

    def __init__(self, workdir: Path, dns_port: int, http_port: int):
        from builder.qemu import free_port
        self.dir, self.dns_port, self.http_port = workdir, dns_port, http_port
        self.port, self.mgmt_port = free_port(), free_port()
        self.ca_key, self.ca = make_ca()
        key, cert = make_server_cert(self.ca_key, self.ca, ["127.0.0.1", GUEST_ACME_ADDR], ["localhost"])
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "ca.pem").write_bytes(pem(self.ca))
        (self.dir / "cert.pem").write_bytes(pem(cert))
        (self.dir / "key.pem").write_bytes(pem(key))
        self.log = self.dir / "pebble.log"
        self.proc = None

    def __enter__(self) -> "Pebble":
        from builder.qemu import free_port
        if not shutil.which("pebble"):
            pytest.skip("Debian package pebble is not installed (./quickstart installs it)")
        cfg = {"pebble": {"listenAddress": f"127.0.0.1:{self.port}",
                          "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
                          "certificate": str(self.dir / "cert.pem"), "privateKey": str(self.dir / "key.pem"),
                          "httpPort": self.http_port, "tlsPort": free_port(),   # tls-alpn-01: unused
                          "ocspResponderURL": "", "externalAccountBindingRequired": False}}
        (self.dir / "pebble.json").write_text(json.dumps(cfg))
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        self.proc = subprocess.Popen(["pebble", "-config", str(self.dir / "pebble.json"),
                                      "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/dir", self.port)
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pebble did not start: {self.log.read_text()}")
                time.sleep(0.2)

    def get(self, path: str, port: int) -> bytes:
        import urllib.request
        ctx = ssl.create_default_context(cadata=pem(self.ca).decode())
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx, timeout=10) as r:
            return r.read()

    def issuing_cas(self) -> list[x509.Certificate]:
        """pebble's own root and intermediate (made at its start; they sign what it issues)."""
        return [x509.load_pem_x509_certificate(self.get(p, self.mgmt_port))
                for p in ("/roots/0", "/intermediates/0")]

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _presented_cert(port: int, starttls: bool = False) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE      # compared by hand below
    if starttls:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
            s.starttls(context=ctx)
            der = s.sock.getpeercert(binary_form=True)
    else:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as raw, \
                ctx.wrap_socket(raw) as s:
            der = s.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


@pytest.mark.vm
@pytest.mark.xdist_group("acme")
def test_acme_image_gets_its_certificate_from_a_real_acme_server(tmp_path):
    from builder.build import BuildState, run_build
    from builder.dnsrecords import Record
    from builder.machine import booted, ssh_keypair
    from builder.progress import Progress
    from builder.qemu import Disk, QemuSpec, free_port
    from builder.testdns import LocalDns
    from fixtures_build import make_test_site

    key, public = ssh_keypair(tmp_path / "ssh")
    site_path = make_test_site(tmp_path, public, domain="acme.test")
    http_port = free_port()          # host side of the guest's port 80: pebble's http-01 port
    zones = {"acme.test": [Record("mail.acme.test.", "A", "127.0.0.1")]}
    with LocalDns(zones) as dns, Pebble(tmp_path / "pebble", dns.port, http_port) as pebble:
        (site_path.parent / "acme-ca.pem").write_bytes(pem(pebble.ca))
        site_path.write_text(site_path.read_text().replace(
            "  mode: selfsigned ", "  mode: acme\n  acme_email: hostmaster@acme.test\n"
            f"  acme_server: https://{GUEST_ACME_ADDR}:{GUEST_ACME_PORT}/dir\n"
            "  acme_ca: acme-ca.pem\n ", 1))
        st = run_build(BuildState(site_path=site_path, out_dir=tmp_path / "images", name="acme.test",
                                  progress=Progress(verbose=False)))
        assert "certbot" in json.loads(Path(st.outputs["manifest"]).read_text())["packages"]
        relay = f"cmd:{sys.executable} -m builder.openbsd.relay 127.0.0.1 {pebble.port}"
        spec = QemuSpec(disks=[Disk(st.outputs["qcow2"], snapshot=True)], memory=2048, name="acme",
                        forwards={22: None, 80: http_port, 465: None, 587: None, 993: None},
                        guestfwd={f"{GUEST_ACME_ADDR}:{GUEST_ACME_PORT}": relay})
        with booted(spec, tmp_path, key, timeout=600, log_path=tmp_path / "acme.serial.log") as (vm, m):
            assert " 80," in m.succeed("nft list chain inet filter input")
            try:
                m.wait_until_succeeds("test -s /etc/letsencrypt/live/mkmailimage/fullchain.pem "
                                      "&& journalctl -u mkmailimage-acme | grep -q 'certificate for mail.acme.test issued'",
                                      timeout=600)
            except Exception:
                print(m.execute("journalctl --no-pager -u mkmailimage-acme -u opensmtpd -u dovecot | tail -n 80")[1])
                print(pebble.log.read_text()[-4000:])
                raise
            chain = m.succeed("cat /etc/ssl/mkmailimage/fullchain.pem")
            installed = x509.load_pem_x509_certificate(chain.encode())
            renewal = m.succeed("cat /etc/letsencrypt/renewal/mkmailimage.conf")
            m.succeed("systemctl is-enabled certbot.timer")
            # idempotent: a second run (every boot does one) changes nothing
            m.succeed("/usr/local/sbin/mkmailimage-acme")
            assert m.succeed("cat /etc/ssl/mkmailimage/fullchain.pem") == chain
            m.wait_for_unit("opensmtpd", timeout=300)
            m.wait_for_unit("dovecot", timeout=300)
            presented = {p: _presented_cert(vm.host_port(p), starttls=(p == 587)) for p in (465, 587, 993)}
        root, intermediate = pebble.issuing_cas()
    # issued by pebble's intermediate (not self-signed), for the site's hostname
    assert installed.issuer == intermediate.subject != installed.subject
    installed.verify_directly_issued_by(intermediate)      # raises unless pebble signed it
    san = installed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.acme.test"]
    assert "renew_hook = /usr/local/sbin/mkmailimage-acme-deploy" in renewal
    for port, cert in presented.items():
        assert cert == installed, f"port {port} presents {cert.subject} issued by {cert.issuer}"


@pytest.mark.vm
def test_selfsigned_image_has_no_acme_client_and_port_80_closed(debian_image):
    """The suite's shared selfsigned image, read without booting: the firewall it loads at
    boot admits no port 80, and neither certbot nor our ACME units are in it."""
    from builder.debian import disk
    out = debian_image.outputs
    fs = f"{out['raw']}?offset={disk.ROOT_START * disk.SECTOR}"

    def debugfs(req: str) -> str:
        return subprocess.run(["debugfs", "-R", req, fs], capture_output=True, text=True).stdout
    nft = debugfs("cat /etc/nftables.conf")
    rule = next(l for l in nft.splitlines() if l.strip().startswith("tcp dport"))
    assert rule.strip() == "tcp dport { 22, 25, 465, 587, 993 } accept"
    assert "certbot" not in json.loads(Path(out["manifest"]).read_text())["packages"]
    assert "mkmailimage-acme" not in debugfs("ls /usr/local/sbin")
    assert "mkmailimage-acme" not in debugfs("ls /etc/systemd/system")
    assert "TLS_MODE=selfsigned" in debugfs("cat /etc/mkmailimage/site.env")
