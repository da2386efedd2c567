"""`mkmailimage init` and `mkmailimage passwd` through the real command line."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import bcrypt
from cryptography.hazmat.primitives import serialization

from builder.site import load_site

ROOT = Path(__file__).parent.parent


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "builder.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, cwd=ROOT)


def tree_state(d: Path) -> dict:
    return {p: (p.stat().st_mode, p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def test_init_writes_valid_site_and_private_keys(tmp_path):
    d = tmp_path / "b"
    r = cli("init", "b.test", "--dir", d, "--ed25519", "--user", "carol", "--password-stdin",
            stdin="a long enough password\n")
    assert r.returncode == 0, r.stderr
    site = load_site(d / "site.yaml")
    assert site.mailboxes == ["carol@b.test"]
    assert bcrypt.checkpw(b"a long enough password", site.users[0].password_hash.encode())
    assert stat.S_IMODE((d / "secrets").stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "secrets" / "dkim").stat().st_mode) == 0o700
    keys = sorted((d / "secrets" / "dkim").iterdir())
    assert len(keys) == 2
    for k in keys:
        assert stat.S_IMODE(k.stat().st_mode) == 0o600
    rsa_key = serialization.load_pem_private_key(keys[0].read_bytes(), None)
    assert rsa_key.key_size == 2048
    assert "# mkmailimage site file" in (d / "site.yaml").read_text()  # commented


def test_init_generates_password_when_not_given(tmp_path):
    r = cli("init", "c.test", "--dir", tmp_path / "c")
    assert r.returncode == 0
    password = r.stdout.split("(shown once): ")[1].strip()
    site = load_site(tmp_path / "c" / "site.yaml")
    assert bcrypt.checkpw(password.encode(), site.users[0].password_hash.encode())


def test_init_never_overwrites(tmp_path):
    d = tmp_path / "d"
    assert cli("init", "d.test", "--dir", d).returncode == 0
    before = tree_state(d)
    r = cli("init", "d.test", "--dir", d)
    assert r.returncode != 0 and "already exists" in r.stderr
    assert tree_state(d) == before
    # a stray key file alone also stops init before anything is written
    e = tmp_path / "e"
    (e / "secrets" / "dkim").mkdir(parents=True)
    for key in (d / "secrets" / "dkim").iterdir():
        (e / "secrets" / "dkim" / key.name).write_text("mine")
    r = cli("init", "e.test", "--dir", e)
    assert r.returncode != 0
    assert not (e / "site.yaml").exists()
    assert all(k.read_text() == "mine" for k in (e / "secrets" / "dkim").iterdir())


def test_init_refuses_bad_domain(tmp_path):
    r = cli("init", "not_a_domain", "--dir", tmp_path / "x")
    assert r.returncode == 2 and "DOMAIN" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_passwd_adds_and_changes_users_keeping_comments(tmp_path):
    d = tmp_path / "f"
    cli("init", "f.test", "--dir", d)
    site_file = d / "site.yaml"
    r = cli("passwd", site_file, "dave", "--stdin", stdin="dave's password\n")
    assert r.returncode == 0 and "added dave" in r.stdout
    r = cli("passwd", site_file, "admin", "--stdin", stdin="admin's new password\n")
    assert r.returncode == 0 and "changed" in r.stdout
    site = load_site(site_file)
    hashes = {u.name: u.password_hash for u in site.users}
    assert bcrypt.checkpw(b"dave's password", hashes["dave"].encode())
    assert bcrypt.checkpw(b"admin's new password", hashes["admin"].encode())
    text = site_file.read_text()
    assert "# Aliases: local part" in text and "dave's password" not in text
    assert text.index("name: dave") < text.index("# Aliases")


def test_passwd_refuses_short_password_and_changes_nothing(tmp_path):
    d = tmp_path / "g"
    cli("init", "g.test", "--dir", d)
    before = (d / "site.yaml").read_bytes()
    r = cli("passwd", d / "site.yaml", "eve", "--stdin", stdin="short\n")
    assert r.returncode != 0 and "too short" in r.stderr
    assert (d / "site.yaml").read_bytes() == before
    r = cli("passwd", d / "site.yaml", "Bad_Name", "--stdin", stdin="long enough pw\n")
    assert r.returncode == 2
    assert (d / "site.yaml").read_bytes() == before
    assert sorted(os.listdir(d)) == ["secrets", "site.yaml"]  # no temp files left
