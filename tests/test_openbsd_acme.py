"""tls.mode: acme on OpenBSD: acme-client(1) with httpd(8) answering http-01 on port 80.

No OpenBSD can run here, and Debian packages neither acme-client nor OpenBSD's httpd, so these
are contract tests: the rendered files say what acme-client.conf(5), httpd.conf(5), pf.conf(5)
and rc.conf.local(8) document, the scripts parse with sh -n, and the build's first boot checks
both files with the daemons' own `-n` and removes any ACME key before the image is exported."""
from __future__ import annotations

import subprocess

from builder.openbsd import siteset
from builder.render import render_tree
from builder.site import load_site

from test_acme import ACME_WITH_CA, site_dir, with_tls  # noqa: F401  (site_dir is a fixture)

ACME_FILES = ["/etc/acme-client.conf", "/etc/httpd.conf", "/etc/daily.local",
              "/usr/local/sbin/mkmailimage-acme"]
CA_FILE = "/etc/ssl/mkmailimage-acme-ca.pem"


def _text(tree, path: str) -> str:
    return tree[path].data.decode()


def _pf_ports(tree) -> list[str]:
    line = next(l for l in _text(tree, "/etc/pf.conf").splitlines() if l.startswith("pass in proto tcp"))
    return line.split("{")[1].split("}")[0].split()


def test_selfsigned_renders_no_acme_and_keeps_80_closed(site_dir):
    tree = render_tree(load_site(site_dir / "site.yaml"), "openbsd")
    assert not [p for p in tree if "acme" in p or p == "/etc/httpd.conf" or p == "/etc/daily.local"]
    assert _pf_ports(tree) == ["22", "25", "465", "587", "993"]
    assert "httpd_flags" not in _text(tree, "/etc/rc.conf.local")
    assert "mkmailimage-acme" not in _text(tree, "/etc/rc.local")


def test_acme_renders_acme_client_httpd_and_opens_80(site_dir):
    site = load_site(with_tls(site_dir, ACME_WITH_CA, "acme.yaml"))
    tree = render_tree(site, "openbsd")
    for path in ACME_FILES + [CA_FILE]:
        assert path in tree, path
    conf = _text(tree, "/etc/acme-client.conf")
    assert 'api url "https://10.0.2.100:14000/dir"' in conf
    assert 'contact "mailto:hostmaster@a.test"' in conf
    assert 'domain "mail.a.test" {' in conf and "sign with mkmailimage" in conf
    assert 'domain full chain certificate "/etc/ssl/acme/mail.a.test.fullchain.pem"' in conf
    assert 'challengedir "/var/www/acme"' in conf
    httpd = _text(tree, "/etc/httpd.conf")
    # the location block acme-client(1) documents for its default challenge directory
    assert 'location "/.well-known/acme-challenge/*" {\n\t\troot "/acme"\n\t\trequest strip 2' in httpd
    assert "listen on * port 80" in httpd
    assert _pf_ports(tree) == ["22", "25", "465", "587", "993", "80"]
    assert "httpd_flags=\n" in _text(tree, "/etc/rc.conf.local")
    assert "[ -e /etc/rc.firsttime ] || /usr/local/sbin/mkmailimage-acme" in _text(tree, "/etc/rc.local")
    assert _text(tree, "/etc/daily.local").strip().endswith("/usr/local/sbin/mkmailimage-acme")
    assert tree["/usr/local/sbin/mkmailimage-acme"].mode == 0o755
    assert tree[CA_FILE].data.decode().strip() == site.acme_ca_pem.strip()
    script = _text(tree, "/usr/local/sbin/mkmailimage-acme")
    assert script.startswith("#!/bin/sh\n") and CA_FILE in script
    for path in ("/usr/local/sbin/mkmailimage-acme", "/etc/rc.local", "/etc/daily.local"):
        proc = subprocess.run(["sh", "-n"], input=tree[path].data, capture_output=True)
        assert proc.returncode == 0, (path, proc.stderr)


def test_without_email_or_private_ca(site_dir):
    tree = render_tree(load_site(with_tls(site_dir, "  mode: acme\n", "plain-acme.yaml")), "openbsd")
    conf = _text(tree, "/etc/acme-client.conf")
    assert "contact" not in conf
    assert 'api url "https://acme-v02.api.letsencrypt.org/directory"' in conf
    assert CA_FILE not in tree
    assert "cert.pem" not in _text(tree, "/usr/local/sbin/mkmailimage-acme")


def test_build_first_boot_checks_the_acme_files_and_removes_acme_keys(site_dir):
    site = load_site(with_tls(site_dir, ACME_WITH_CA, "acme.yaml"))
    tree = render_tree(site, "openbsd")
    plan = siteset.PackagePlan("http://10.0.2.100/pkg", [])
    entries = {e.path: e for e in siteset.extra_entries(site, tree, plan)}
    firstboot = entries[siteset.FIRSTBOOT].data.decode()
    assert "check httpd -n\n" in firstboot and "check acme-client -n mail.a.test\n" in firstboot
    assert "rm -f /etc/acme/mkmailimage-account.key /etc/ssl/acme/private/*.key" in firstboot
    plain = load_site(site_dir / "site.yaml")
    entries = {e.path: e for e in siteset.extra_entries(plain, render_tree(plain, "openbsd"), plan)}
    assert "acme" not in entries[siteset.FIRSTBOOT].data.decode()
