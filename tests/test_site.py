"""The site model: what it accepts, what it refuses, and that every refusal names file, line,
column and field without a traceback and without writing anything."""
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.errors import SiteError
from builder.initsite import init_site
from builder.site import load_site

MKMAILIMAGE = [sys.executable, "-m", "builder.cli"]


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("site") / "a"
    init_site("a.test", d, password="correct horse battery", ed25519=True)
    return d


def write_variant(site_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the good site file, changed by `edit(text) -> text`, sharing its secrets."""
    text = (site_dir / "site.yaml").read_text()
    target = tmp_path / "site.yaml"
    target.write_text(edit(text))
    if not (tmp_path / "secrets").exists():
        os.symlink(site_dir / "secrets", tmp_path / "secrets")
    return target


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_init_site_validates_and_has_defaults(site_dir):
    site = load_site(site_dir / "site.yaml")
    assert site.domain == "a.test"
    assert site.hostname == "mail.a.test"
    assert site.mailboxes == ["admin@a.test"]
    assert site.resolve("postmaster") == {"admin@a.test"}
    assert site.dmarc_report_address == "dmarc-reports@a.test"
    assert [s.algorithm for s in site.model.dkim.selectors] == ["rsa", "ed25519"]
    assert site.model.debian.suite == "trixie" and site.model.openbsd.version == "7.8"


@pytest.mark.parametrize("find,replace,field,message", [
    ("domain: a.test", "domain: -bad-.test", "domain", "not a valid domain"),
    ("domain: a.test", "domain: a..test", "domain", "not a valid domain"),
    ("max_message_size: 35M", "max_message_size: 35M\npassword: hunter2", "password", "plaintext passwords"),
    ("max_message_size: 35M", "max_message_size: lots", "max_message_size", "not a size"),
    ("timezone: UTC", "timezone: UTC\ncolour: blue", "colour", "unknown setting"),
    ("  postmaster: admin", "  postmaster: nobody", "aliases", "postmaster@a.test"),
    ("  report: dmarc-reports", "  report: nobody", "dmarc.report", "dmarc"),
    ("  suite: trixie", "  suite: buster", "debian.suite", "trixie"),
    ('  version: "7.8"', "  version: 7.8", "openbsd.version", "string"),
    ("  mode: selfsigned", "  mode: letsencrypt", "tls.mode", "selfsigned"),
    ("admin_ssh_keys: []", "admin_ssh_keys: [not-a-key]", "admin_ssh_keys", "OpenSSH public key"),
])
def test_bad_values_are_refused_with_place(site_dir, tmp_path, find, replace, field, message):
    path = write_variant(site_dir, tmp_path, lambda t: t.replace(find, replace, 1))
    text = path.read_text()
    with pytest.raises(SiteError) as exc:
        load_site(path)
    e = exc.value
    assert e.file == str(path)
    assert e.field == field, str(e)
    assert message.lower() in str(e).lower()
    # the reported line is the one we changed (or, for a section-level error, its section)
    changed_line = line_of(text, replace.splitlines()[-1].strip()[:12])
    assert e.line is not None and abs(e.line - changed_line) <= 12


def test_plain_password_hash_is_refused(site_dir, tmp_path):
    path = write_variant(site_dir, tmp_path,
                         lambda t: re.sub(r'password_hash: "[^"]+"', 'password_hash: "secret123"', t))
    with pytest.raises(SiteError, match="bcrypt") as exc:
        load_site(path)
    assert exc.value.field == "users[0].password_hash"
    assert exc.value.line == line_of(path.read_text(), "password_hash")


def test_duplicate_user_is_refused(site_dir, tmp_path):
    def dup(text):
        h = re.search(r'password_hash: "([^"]+)"', text).group(1)
        return text.replace("\n# Aliases", f'\n  - name: admin\n    password_hash: "{h}"\n\n# Aliases', 1)
    path = write_variant(site_dir, tmp_path, dup)
    with pytest.raises(SiteError, match="duplicate user 'admin'") as exc:
        load_site(path)
    assert exc.value.field == "users[1].name"


def test_small_rsa_key_is_refused(site_dir, tmp_path):
    (tmp_path / "secrets" / "dkim").mkdir(parents=True)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    text = (site_dir / "site.yaml").read_text()
    sel = re.search(r"key: (secrets/dkim/\S+\.key)", text).group(1)
    (tmp_path / sel).write_bytes(weak)
    (tmp_path / "site.yaml").write_text(text)
    (tmp_path / sel.replace(".key", "e.key")).write_bytes((site_dir / sel.replace(".key", "e.key")).read_bytes())
    with pytest.raises(SiteError, match="1024 bits") as exc:
        load_site(tmp_path / "site.yaml")
    assert exc.value.field == "dkim.selectors[0].key"


def test_missing_dkim_key_is_named(site_dir, tmp_path):
    path = write_variant(site_dir, tmp_path, lambda t: t.replace("key: secrets/dkim/", "key: secrets/nope/", 1))
    with pytest.raises(SiteError, match="does not exist"):
        load_site(path)


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("not a key\n", "is not a signify public key"),
    ("untrusted comment: x\nRWQ=\n", "is not a signify public key"),
    ("untrusted comment: \u00e9\n", "is not a signify public key"),
])
def test_named_signify_key_must_be_a_signify_public_key(site_dir, tmp_path, content, message):
    if content is not None:
        (tmp_path / "release.pub").write_text(content)
    path = write_variant(site_dir, tmp_path, lambda t: t.replace(
        'version: "7.8"', 'version: "7.8"\n  signify_key: release.pub', 1))
    with pytest.raises(SiteError, match=message) as exc:
        load_site(path)
    assert exc.value.field == "openbsd.signify_key"
    assert exc.value.line == line_of(path.read_text(), "signify_key:")


def test_named_signify_key_made_by_signify_is_accepted(site_dir, tmp_path):
    subprocess.run(["signify-openbsd", "-G", "-n", "-p", str(tmp_path / "release.pub"),
                    "-s", str(tmp_path / "release.sec")], check=True, capture_output=True)
    path = write_variant(site_dir, tmp_path, lambda t: t.replace(
        'version: "7.8"', 'version: "7.8"\n  signify_key: release.pub', 1))
    assert load_site(path).model.openbsd.signify_key == "release.pub"


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    p = tmp_path / "site.yaml"
    p.write_text("domain: a.test\nusers: [\n  - x\n")
    with pytest.raises(SiteError) as exc:
        load_site(p)
    assert exc.value.line is not None and exc.value.column is not None


def test_cli_reports_error_exits_nonzero_and_writes_nothing(site_dir, tmp_path):
    path = write_variant(site_dir, tmp_path, lambda t: t.replace("domain: a.test", "domain: a_b.test"))
    out = tmp_path / "out"
    r = subprocess.run(MKMAILIMAGE + ["render", str(path), "--os", "debian", "--out", str(out)],
                       capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 2
    assert f"{path}:{line_of(path.read_text(), 'domain: a_b')}:9: domain:" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


# --- property: malformed site files always give a SiteError, never another exception ---------

GOOD_KEYS = ["domain", "hostname", "users", "aliases", "dkim", "dmarc", "tls", "max_message_size",
             "relay_host", "admin_ssh_keys", "timezone", "debian", "openbsd", "ipv4", "ipv6"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=20), st.sampled_from(["a.test", "$2b$12$x", "7.8", "35M", "::1"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(GOOD_KEYS + ["name", "password_hash", "key"]),
                              st.text(string.ascii_lowercase, min_size=1, max_size=8)), inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.sampled_from(GOOD_KEYS + ["bogus"]), values, max_size=8))
def test_random_documents_never_crash(site_dir, tmp_path, doc):
    p = tmp_path / "site.yaml"
    p.write_text(yaml.safe_dump(doc))
    try:
        load_site(p)
    except SiteError as e:
        assert str(e).startswith(str(p))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_good_file_never_crashes(site_dir, tmp_path, data):
    """Byte-level damage to a real site file: a SiteError with a place, or still valid."""
    text = (site_dir / "site.yaml").read_text()
    pos = data.draw(st.integers(0, len(text) - 1))
    cut = data.draw(st.integers(0, 30))
    junk = data.draw(st.text(alphabet=":-[]{}&*!|>'\"%@`#\t\n ", max_size=6))
    path = write_variant(site_dir, tmp_path, lambda t: t[:pos] + junk + t[pos + cut:])
    try:
        load_site(path)
    except SiteError as e:
        assert str(e).startswith(str(path))


def test_non_utf8_and_binary_files(tmp_path):
    p = tmp_path / "site.yaml"
    p.write_bytes(b"domain: \xff\xfe\n")
    with pytest.raises(SiteError, match="UTF-8"):
        load_site(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(SiteError, match="mapping"):
        load_site(p)
    p.write_text("")
    with pytest.raises(SiteError, match="empty"):
        load_site(p)
