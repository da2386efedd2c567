"""`mkmailimage dns`: the records, their DKIM key, and `--check` against a real unbound."""
import subprocess
import sys
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from builder.dnsrecords import records, txt_chunks, zone_snippet
from builder.initsite import init_site
from builder.site import load_site
from builder.testdns import LocalDns

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("dns") / "a"
    path = init_site("a.test", d, password="correct horse battery", ed25519=True)
    text = path.read_text().replace("# ipv4: 203.0.113.25", "ipv4: 192.0.2.10")
    path.write_text(text)
    return load_site(path)


def test_zone_snippet_has_every_record(site):
    text = zone_snippet(site)
    for needle in ["IN MX    10 mail.a.test.", "IN A     192.0.2.10", '"v=spf1 mx -all"',
                   "._domainkey.a.test.", "_dmarc.a.test.", "rua=mailto:dmarc-reports@a.test",
                   "IN CAA", "; 10.2.0.192.in-addr.arpa."]:
        assert needle in text, needle


def test_txt_strings_are_at_most_255_bytes(site):
    dkim_rsa = next(r for r in records(site) if "k=rsa" in r.value)
    chunks = txt_chunks(dkim_rsa.value)
    assert len(chunks) >= 2 and all(len(c.encode()) <= 255 for c in chunks)
    assert "".join(chunks) == dkim_rsa.value


def test_dkim_record_matches_private_key_by_signing(site):
    """Sign with the site's private key, verify with the published record (dkimpy)."""
    published = {f"{r.name}".encode(): r.value.encode() for r in records(site) if "DKIM1" in r.value}
    msg = b"From: admin@a.test\r\nTo: b@b.test\r\nSubject: hi\r\n\r\nbody\r\n"
    for sel in site.model.dkim.selectors:
        pem = site.dkim_keys[sel.name]
        if sel.algorithm == "ed25519":
            key = serialization.load_pem_private_key(pem, None)
            raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
            import base64
            sig = dkim.sign(msg, sel.name.encode(), b"a.test", base64.b64encode(raw),
                            signature_algorithm=b"ed25519-sha256")
        else:
            sig = dkim.sign(msg, sel.name.encode(), b"a.test", pem)
        assert dkim.verify(sig + msg, dnsfunc=lambda name, timeout=5: published.get(name))


def test_check_reports_ok_missing_and_different(site):
    recs = records(site)
    served = [r for r in recs if r.rtype != "CAA"]                      # CAA: missing
    served = [r if r.rtype != "A" else type(r)(r.name, "A", "192.0.2.99") for r in served]  # A: different
    with LocalDns({"a.test.": served}) as dns_server:
        r = subprocess.run([sys.executable, "-m", "builder.cli", "dns", str(site.path), "--check",
                            "--nameserver", f"127.0.0.1:{dns_server.port}"],
                           capture_output=True, text=True, cwd=ROOT)
    lines = r.stdout.splitlines()
    assert r.returncode != 0 and "missing or different" in r.stderr
    state = {(l.split()[1], l.split()[2]): l.split()[0] for l in lines}
    assert state[("MX", "a.test.")] == "ok"
    assert state[("TXT", "_dmarc.a.test.")] == "ok"
    assert all(state[("TXT", f"{s.name}._domainkey.a.test.")] == "ok" for s in site.model.dkim.selectors)
    assert state[("A", "mail.a.test.")] == "different"
    assert state[("CAA", "a.test.")] == "missing"
    assert state[("PTR", "10.2.0.192.in-addr.arpa.")] == "ok"


def test_check_all_ok_exits_zero(site):
    with LocalDns({"a.test.": records(site)}) as dns_server:
        r = subprocess.run([sys.executable, "-m", "builder.cli", "dns", str(site.path), "--check",
                            "--nameserver", f"127.0.0.1:{dns_server.port}"],
                           capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(line.startswith("ok") for line in r.stdout.splitlines())
