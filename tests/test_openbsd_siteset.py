"""The site set siteXY.tgz: paths, owners, modes, reproducibility, index.txt and install.site."""
from __future__ import annotations

import io
import subprocess
import tarfile

import pytest
import yaml

from builder.initsite import init_site
from builder.openbsd import answers, siteset
from builder.render import Entry, Tree, render_tree
from builder.site import load_site

KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGr6Jz3m4hQ1Z0u6X2w8b5Qm0b2dC1s3k4Vq9yYxZ1Aa one@a",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPx1Jz3m4hQ1Z0u6X2w8b5Qm0b2dC1s3k4Vq9yYxZ1Bb two@b"]
PLAN = siteset.PackagePlan("http://10.0.2.100/pub/OpenBSD/7.8/packages/amd64",
                           ["quirks-7.103.tgz", "lua-5.3.6p2.tgz", "rspamd-3.10.0.tgz"])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("site")
    f = init_site("a.test", d / "a", password="correct horse battery", out=open("/dev/null", "w"))
    data = yaml.safe_load(f.read_text())
    data["admin_ssh_keys"] = KEYS
    data["openbsd"] = {"version": "7.8", "mirror": "https://mirror.example.net/pub/OpenBSD"}
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_site(f)


@pytest.fixture(scope="module")
def tree(site):
    return render_tree(site, "openbsd")


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as t:
        return t.getmembers()


def test_paths_owners_and_modes_follow_the_render_entries(site, tree):
    data = siteset.build_site_tgz(siteset.site_entries(site, tree, PLAN))
    got = {m.name: m for m in members(data)}
    for e in tree.sorted():
        name = "." + e.path
        if e.is_dir and e.path in siteset.BASE_DIRS:
            assert name not in got, f"base directory {e.path} must not be in the site set"
            continue
        m = got[name]
        assert m.isdir() == e.is_dir
        assert m.mode == e.mode, name
        assert (m.uname, m.gname) == (e.owner, "wheel" if e.group == "root" else e.group), name
        assert m.uid == m.gid == 0 and m.mtime == siteset.DEFAULT_MTIME
        if not e.is_dir:
            assert m.size == len(e.data)
    assert got["./install.site"].mode == 0o755
    assert got["./etc/mkmailimage/firstboot.sh"].mode == 0o700
    dkim = [n for n in got if n.startswith("./etc/mail/dkim/") and n.endswith(".key")]
    assert dkim and all(got[n].mode == 0o640 and got[n].gname == "_rspamd" for n in dkim)
    names = [m.name for m in members(data)]
    assert names == sorted(names)
    assert all(n.startswith("./") for n in names)


def test_site_set_is_byte_for_byte_reproducible(site, tree):
    a = siteset.build_site_tgz(siteset.site_entries(site, tree, PLAN))
    b = siteset.build_site_tgz(siteset.site_entries(site, render_tree(site, "openbsd"), PLAN))
    assert a == b


def test_write_site_set_and_index(site, tree, tmp_path):
    (tmp_path / "bsd.rd").write_bytes(b"x" * 1234)
    (tmp_path / "SHA256.sig").write_text("sig\n")
    tgz = siteset.write_site_set(site, tree, PLAN, tmp_path)
    assert tgz.name == "site78.tgz"
    index = (tmp_path / "index.txt").read_text().splitlines()
    # install_http(): sed -En 's/^.* ([a-zA-Z][a-zA-Z0-9._-]+)$/\1/p' index.txt
    listed = [l.rsplit(" ", 1)[1] for l in index]
    assert listed == ["SHA256.sig", "bsd.rd", "site78.tgz"]
    assert " 1234 " in index[1]
    assert not list(tmp_path.glob(".*.tmp"))


def test_install_site_installs_packages_in_order_and_fixes_owners(site, tree):
    entries = {e.path: e for e in siteset.extra_entries(site, tree, PLAN)}
    script = entries["/install.site"].data.decode()
    adds = [l.split()[-1] for l in script.splitlines() if l.startswith("pkg_add")]
    assert adds == [f"{PLAN.base_url}/{f}" for f in PLAN.files]
    assert "chown -h root:_mailauth /etc/mail/passwd" in script
    assert "useradd -g vmail -d /var/vmail -s /sbin/nologin" in script
    assert "chown -h root:_smtpd /etc/mail/credentials" in script
    assert "usermod" not in script      # no memberships needed: smtpd reads credentials as _smtpd
    for key in KEYS:
        assert key in script
    # the finished system points at the site's mirror, never at the build's server
    assert "print -r -- https://mirror.example.net/pub/OpenBSD >/etc/installurl" in script
    assert not [l for l in script.splitlines() if "installurl" in l and "10.0.2.100" in l]
    assert "/etc/rc.firsttime" in script and "/etc/rc.securelevel" in script


def test_scripts_parse(site, tree, tmp_path):
    # No ksh on this host: bash -n parses install.site's syntax (print is a ksh builtin, a
    # plain command to bash); the first-boot scripts are plain sh and are checked with dash.
    entries = {e.path: e for e in siteset.extra_entries(site, tree, PLAN)}
    for path, shell in [("/install.site", "bash"), (siteset.FIRSTBOOT, "dash"),
                        (siteset.INSTANCE_SECRETS, "dash")]:
        f = tmp_path / path.strip("/").replace("/", "_")
        f.write_bytes(entries[path].data)
        r = subprocess.run([shell, "-n", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, (path, r.stderr)


def test_instance_secrets_makes_a_certificate_only_when_absent(site, tree, tmp_path):
    """Run the real script (dash + the host's openssl) against a temporary tls_dir."""
    entries = {e.path: e for e in siteset.extra_entries(site, tree, PLAN)}
    text = entries[siteset.INSTANCE_SECRETS].data.decode().replace("/etc/ssl/mkmailimage", str(tmp_path / "tls"))
    script = tmp_path / "s.sh"
    script.write_text(text)
    subprocess.run(["dash", str(script)], check=True, capture_output=True)
    key, cert = tmp_path / "tls" / "privkey.pem", tmp_path / "tls" / "fullchain.pem"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    out = subprocess.run(["openssl", "x509", "-noout", "-subject", "-in", str(cert)],
                         capture_output=True, text=True, check=True).stdout
    assert "mail.a.test" in out
    before = cert.read_bytes()
    subprocess.run(["dash", str(script)], check=True, capture_output=True)
    assert cert.read_bytes() == before


def test_installurl_defaults(site):
    assert siteset.installurl(site) == "https://mirror.example.net/pub/OpenBSD"
