"""The rendered configs pass the real daemons' own checkers (Debian 13's smtpd, doveconf, sievec,
rspamadm, unbound-checkconf, nft, sshd run from a trixie tools tree), and a broken config fails
each of them, proving the checker really ran on our file.

Needs root (overlay mount + chroot in a private namespace) and, the first time, a Debian mirror
for mmdebstrap to build the tools trees (about a minute each, cached afterwards).
"""
from __future__ import annotations

import io
import os
import re

import pytest

from builder.checkers import (CHECKS, OPENBSD_UNCHECKED, CheckFailed, check_tree, run_command,
                              run_checks)
from builder.initsite import init_site
from builder.render import OS_FACTS, Entry, render_tree
from builder.site import load_site

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: overlay mount and chroot")]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("site") / "a"
    path = init_site("a.test", d, password="correct horse", ed25519=True, out=io.StringIO())
    return load_site(path)


@pytest.fixture(scope="module")
def debian(site):
    return render_tree(site, "debian")


@pytest.fixture(scope="module")
def openbsd(site):
    return render_tree(site, "openbsd")


def test_every_debian_config_passes_its_checker(debian):
    results = check_tree(debian, "debian")
    assert [r.name for r in results] == [c.name for c in CHECKS["debian"]]
    assert {"smtpd", "doveconf", "sievec", "rspamadm", "unbound-checkconf", "nft", "sshd"} == {
        r.name for r in results}
    out = {r.name: r.output for r in results}
    assert "configuration OK" in out["smtpd"]
    assert "syntax OK" in out["rspamadm"]
    assert "no errors in /etc/unbound/unbound.conf" in out["unbound-checkconf"]
    assert re.search(r"^# 2\.4\.", out["doveconf"], re.M)        # really Dovecot 2.4


def test_openbsd_configs_pass_the_linux_checkers_and_the_rest_is_listed(openbsd):
    results = check_tree(openbsd, "openbsd")
    names = [r.name for r in results]
    assert names[0] == "smtpd" and "configuration OK" in results[0].output
    assert {"smtpd", "rspamadm", "unbound-checkconf", "sshd", "doveconf-2.3", "sievec-2.3"} == set(names)
    dove = next(r for r in results if r.name == "doveconf-2.3")
    assert re.search(r"^# 2\.3\.", dove.output, re.M)             # Dovecot 2.3 syntax checker
    # what no Linux tool checks, as data: every rendered OpenBSD-only file is listed
    for path in ("/etc/pf.conf", "/etc/rc.conf.local", "/etc/myname"):
        assert path in openbsd and path in OPENBSD_UNCHECKED


def _broken(tree, path: str, mutate) -> dict:
    copy = type(tree)(tree)
    e = tree[path]
    copy.add(Entry(e.path, mutate(e.data.decode()).encode(), e.mode, e.owner, e.group))
    return copy


BREAKAGES = {
    # checker: (file, mutation, text the checker's own error must contain)
    "smtpd": ("/etc/smtpd.conf", lambda s: s.replace('action "out"\n', 'action "nowhere"\n', 1),
              "no such dispatcher"),
    "doveconf": ("/etc/dovecot/dovecot.conf", lambda s: s + "imap_no_such_setting = yes\n",
                 "imap_no_such_setting"),
    "sievec": ("/etc/dovecot/sieve/spam-to-junk.sieve", lambda s: s.replace("stop;", "stop"), "error"),
    "rspamadm": ("/etc/rspamd/local.d/actions.conf", lambda s: s + "reject = {\n", ""),
    "unbound-checkconf": ("/etc/unbound/unbound.conf.d/mkmailimage.conf",
                          lambda s: s.replace("hide-version: yes", "hide-version: maybe"), "mkmailimage.conf:9"),
    "nft": ("/etc/nftables.conf", lambda s: s.replace("policy drop;", "policy dorp;"), "dorp"),
    "sshd": ("/etc/ssh/sshd_config", lambda s: s.replace("PasswordAuthentication no",
                                                         "PasswordAuthentication maybe"), "maybe"),
}


@pytest.mark.parametrize("checker", sorted(BREAKAGES))
def test_a_broken_config_fails_its_checker(debian, checker):
    path, mutate, message = BREAKAGES[checker]
    broken = _broken(debian, path, mutate)
    with pytest.raises(CheckFailed) as e:
        check_tree(broken, "debian", only=[checker])
    (failure,) = e.value.failures
    assert failure.name == checker and failure.status != 0
    assert message in failure.output
    assert checker in str(e.value)                 # the CLI error names the checker
    # and the unbroken tree passes the same single checker
    assert check_tree(debian, "debian", only=[checker])[0].ok


def test_broken_openbsd_smtpd_conf_fails_smtpd(openbsd):
    broken = _broken(openbsd, "/etc/mail/smtpd.conf", lambda s: s.replace("tls-require", "tls-requir"))
    (result,) = run_checks(broken, "openbsd", only=["smtpd"])
    assert not result.ok and "smtpd.conf" in result.output


def test_rspamd_sees_loopback_only_as_local_and_signs_with_the_rendered_keys(debian, site):
    out = run_command(debian, "debian", ["rspamadm", "configdump", "-c", "/etc/rspamd/rspamd.conf",
                                         "options"]).output
    local = re.search(r"local_addrs \[(.*?)\]", out, re.S).group(1)
    addresses = re.findall(r'"([^"]+)"', local)
    assert "127.0.0.0/8" in addresses and "::1" in addresses
    assert not [a for a in addresses if a.startswith(("10.", "192.168.", "172.16.", "fd00"))]
    assert re.search(r'nameserver \[\s*"127\.0\.0\.1:53"', out)
    dkim = run_command(debian, "debian", ["rspamadm", "configdump", "dkim_signing"]).output
    for sel in site.model.dkim.selectors:
        assert f'path = "{OS_FACTS["debian"]["rspamd_dkim_dir"]}/a.test.{sel.name}.key";' in dkim
    assert "use_esld = false;" in dkim
    modules = run_command(debian, "debian", ["rspamadm", "configdump", "-m"]).output
    disabled = re.search(r"Modules disabled \(explicitly\): (.*)", modules).group(1)
    assert "greylist" in disabled.split(", ")


def test_dovecot_settings_as_dovecot_reads_them(debian):
    def setting(name):
        r = run_command(debian, "debian", ["doveconf", "-c", "/etc/dovecot/dovecot.conf", "-h", name])
        assert r.ok, r.output
        return r.output.strip()
    assert setting("ssl") == "required"
    assert setting("auth_allow_cleartext") == "no"
    assert setting("mail_driver") == "maildir"


def test_rendered_owners_exist_in_the_checked_tree(debian):
    # accounts.yaml's groups/users are created in the layer; the passwd file's group resolves
    r = run_command(debian, "debian", ["stat", "-c", "%a %U %G", "/etc/mail/passwd"])
    assert r.output.split() == ["640", "root", "_mailauth"]
    r = run_command(debian, "debian", ["id", "-nG", "opensmtpd"])
    assert "_mailauth" in r.output.split()
