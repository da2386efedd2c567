"""The rendered configs pass the real daemons' own checkers (Debian 13's smtpd, doveconf, sievec,
rspamadm, unbound-checkconf, nft, sshd run from a trixie tools tree), and a broken config fails
each of them, proving the checker really ran on our file.

Needs root (overlay mount + chroot in a private namespace) and, the first time, a Debian mirror
for mmdebstrap to build the tools trees (about a minute each, cached afterwards).
"""
from __future__ import annotations

import io
import json
import os
import re
import sys

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
    path = init_site("a.test", d, password=PASSWORD, ed25519=True, out=io.StringIO())
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
    # Every rendered OpenBSD file, as data: which checker reads it, or why none does.
    checked = {
        "/etc/mail/smtpd.conf": "smtpd", "/etc/mail/virtuals": "smtpd", "/etc/mail/aliases": "smtpd",
        "/etc/mail/credentials": "smtpd",      # file tables are parsed with the config
        "/etc/dovecot/dovecot.conf": "doveconf-2.3", "/etc/dovecot/sieve/spam-to-junk.sieve": "sievec-2.3",
        "/var/unbound/etc/unbound.conf": "unbound-checkconf", "/etc/ssh/sshd_config": "sshd",
    }
    unchecked = {   # OpenBSD-only: no Linux tool checks these
        "/etc/pf.conf", "/etc/rc.conf.local", "/etc/rc.local", "/etc/myname", "/etc/mail/passwd",
    }
    not_config = {"/etc/mail/relay-secrets", "/root/.ssh/authorized_keys",
                  "/var/unbound/etc/mkmailimage.d/README"}
    for path, e in openbsd.items():
        if e.is_dir or path.startswith(OS_FACTS["openbsd"]["rspamd_dkim_dir"] + "/"):
            continue   # DKIM keys: rspamd loads them when signing (see the Debian mail-flow test)
        if path.startswith("/etc/rspamd/"):
            checked[path] = "rspamadm"
        assert path in checked or path in unchecked or path in not_config, path
    assert unchecked <= set(OPENBSD_UNCHECKED)
    assert set(checked.values()) <= set(names)


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


def test_openbsd_smtpd_conf_reads_the_credentials_file(openbsd):
    # `smtpd -n` parses file tables with the config: a credentials line without a hash turns the
    # mapping into a mix of list and mapping entries, which smtpd refuses
    broken = _broken(openbsd, "/etc/mail/credentials", lambda s: s + "lonely@a.test\n")
    (result,) = run_checks(broken, "openbsd", only=["smtpd"])
    assert not result.ok and "credentials" in result.output
    missing = type(openbsd)(openbsd)
    del missing["/etc/mail/credentials"]
    (result,) = run_checks(missing, "openbsd", only=["smtpd"])
    assert not result.ok and "credentials" in result.output


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


# -- the daemons running on the rendered configs ----------------------------------------------

SYSLOG_SINK = r'''
import os, socket, sys
path, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
os.chmod(path, 0o666)
with open(out, "ab", buffering=0) as f:
    while True:
        f.write(s.recv(65536).rstrip(b"\0") + b"\n")
'''

PEER_CLIENT = r'''
import imaplib, json, smtplib, socket, ssl, sys, time
server, user, password, domain = sys.argv[1:5]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
result = {}
def wait(port):
    for _ in range(150):
        try:
            socket.create_connection((server, port), 1).close(); return True
        except OSError:
            time.sleep(0.2)
    return False
result["open"] = {p: wait(p) for p in (25, 465, 587, 993)}
import paramiko
t = paramiko.Transport((server, 22)); t.start_client(timeout=30)
try:
    t.auth_none("root"); result["ssh_auth"] = "none accepted"
except paramiko.BadAuthenticationType as e:
    result["ssh_auth"] = e.allowed_types
t.close()
try:    # a listener the firewall does not open: dropped (time-out), not refused
    socket.create_connection((server, 8025), 3).close(); result["8025"] = "open"
except socket.timeout:
    result["8025"] = "filtered"
except OSError as e:
    result["8025"] = f"error {e}"
try:
    socket.create_connection((server, 143), 2).close(); result["143"] = "open"
except OSError:
    result["143"] = "closed"
def message(mid, subject, extra=""):
    return (f"From: {user}\r\nTo: {user}\r\nSubject: {subject}\r\nDate: Sun, 22 Nov 2026 04:00:00 +0000\r\n"
            f"Message-ID: <{mid}@{domain}>\r\n{extra}\r\nhello\r\n")
with smtplib.SMTP(server, 587, timeout=60) as s:
    s.starttls(context=ctx); s.login(user, password)
    result["587"] = s.sendmail(user, [user], message("m587", "via 587"))
with smtplib.SMTP_SSL(server, 465, context=ctx, timeout=60) as s:
    s.login(user, password)
    result["465"] = s.sendmail(user, [f"postmaster@{domain}"], message("m465", "via 465"))
try:
    with smtplib.SMTP(server, 587, timeout=60) as s:
        s.starttls(context=ctx); s.login(user, "wrong password")
    result["bad_login"] = "accepted"
except smtplib.SMTPAuthenticationError as e:
    result["bad_login"] = e.smtp_code
spam = ("From: Peer <peer@example.org>\r\nTo: someone\r\nSubject: offer\r\n"
        "Date: Sun, 22 Nov 2026 04:00:00 +0000\r\nMessage-ID: <spam@example.org>\r\nX-Spam: yes\r\n\r\nbuy\r\n")
with smtplib.SMTP(server, 25, timeout=60) as s:
    s.starttls(context=ctx)
    result["mx"] = s.sendmail("peer@example.org", [user], spam)
    for rcpt, key in (("someone@example.org", "relay"), (f"nosuchuser@{domain}", "unknown")):
        try:
            s.sendmail("peer@example.org", [rcpt], spam); result[key] = "accepted"
        except smtplib.SMTPRecipientsRefused as e:
            result[key] = e.recipients[rcpt][0]
time.sleep(3)
m = imaplib.IMAP4_SSL(server, 993, ssl_context=ctx)
m.login(user, password)
result["folders"] = sorted(l.decode().rsplit(" ", 1)[-1] for l in m.list()[1])
result["boxes"] = {}
for box in ("INBOX", "Junk"):
    m.select(box)
    nums = m.search(None, "ALL")[1][0].split()
    result["boxes"][box] = [m.fetch(n, "(RFC822)")[1][0][1].decode() for n in nums]
print("RESULT " + json.dumps(result))
'''


@pytest.fixture(scope="module")
def mail_flow(site, debian, tmp_path_factory):
    """Start unbound, dovecot, rspamd and smtpd on the rendered Debian configs in the throwaway
    layer, and talk to them from a peer in its own network namespace (192.0.2.10, a foreign
    address for both smtpd and rspamd) over a veth pair. No redis: rspamd runs without it."""
    from builder.checkers import run_script
    d = tmp_path_factory.mktemp("flow")
    (d / "sink.py").write_text(SYSLOG_SINK)
    (d / "client.py").write_text(PEER_CLIENT)
    py = sys.executable
    # what the image runs before dovecot starts (the rendered systemd drop-in)
    dropin = debian["/etc/systemd/system/dovecot.service.d/mkmailimage.conf"].data.decode()
    # ("+" = run outside the unit's sandbox; the chroot runs it as root anyway)
    SIEVE_PRECOMPILE = re.search(r"^ExecStartPre=\+?(.+)$", dropin, re.M).group(1)
    user = site.mailboxes[0]
    script = f"""
ip link set lo up
ip link add veth0 type veth peer name veth1
unshare --net sleep 900 & PEER=$!
sleep 0.3
ip link set veth1 netns $PEER
ip addr add 192.0.2.1/24 dev veth0 && ip link set veth0 up
nsenter -t $PEER -n sh -c 'ip link set lo up; ip addr add 192.0.2.10/24 dev veth1; ip link set veth1 up'
{py} {d}/sink.py $ROOT/dev/log {d}/syslog.txt &
sleep 0.5
chroot $ROOT sh -c 'mkdir -p /run/rspamd /run/dovecot && chown _rspamd:_rspamd /run/rspamd'
chroot $ROOT unbound -c /etc/unbound/unbound.conf || echo "START FAILED: unbound"
chroot $ROOT {SIEVE_PRECOMPILE} || echo "START FAILED: sievec"
chroot $ROOT dovecot -c /etc/dovecot/dovecot.conf || echo "START FAILED: dovecot"
chroot $ROOT rspamd -c /etc/rspamd/rspamd.conf -u _rspamd -g _rspamd || echo "START FAILED: rspamd"
chroot $ROOT smtpd -f /etc/smtpd.conf || echo "START FAILED: smtpd"
chroot $ROOT nft -f /etc/nftables.conf || echo "START FAILED: nft"
chroot $ROOT /usr/sbin/sshd -f /etc/ssh/sshd_config || echo "START FAILED: sshd"
{py} -c 'import socket,time; s=socket.socket(); s.bind(("0.0.0.0", 8025)); s.listen(); time.sleep(900)' &
for i in $(seq 50); do [ -S $ROOT/run/smtpd.sock ] && break; sleep 0.2; done
printf 'From: {user}\nTo: {user}\nSubject: via sendmail\nMessage-ID: <local@{site.domain}>\n\nhi\n' | chroot $ROOT sendmail -f {user} {user} || echo "SENDMAIL FAILED"
nsenter -t $PEER -n {py} {d}/client.py 192.0.2.1 {user} {PASSWORD!r} {site.domain}
echo "--- rspamd log"; grep -E "rspamd_task_write_log|error" $ROOT/var/log/rspamd/rspamd.log | tail -n 20
"""
    status, output = run_script(debian, "debian", script, timeout=600)
    syslog = (d / "syslog.txt").read_text(errors="replace") if (d / "syslog.txt").exists() else ""
    line = next((l for l in output.splitlines() if l.startswith("RESULT ")), None)
    assert line, f"the peer client did not finish:\n{output}\n--- syslog\n{syslog}"
    return json.loads(line[len("RESULT "):]), output, syslog


PASSWORD = "correct horse"


def test_daemons_start_and_only_the_mail_ports_listen(mail_flow):
    result, output, syslog = mail_flow
    assert "START FAILED" not in output and "SENDMAIL FAILED" not in output, output
    # no daemon logged an error (e.g. Dovecot failing to save the global sieve binary)
    # (smtpd's purge task may race the spool's creation on a never-started spool: harmless)
    errors = [l for l in syslog.splitlines() if re.search(r"dovecot.*(Error|Fatal)|smtpd.*(fatal|warn:)", l)
              and "purge_task: opendir" not in l]
    assert not errors, "\n".join(errors)
    assert result["open"] == {"25": True, "465": True, "587": True, "993": True}
    assert result["143"] == "closed"
    assert result["8025"] == "filtered"            # nftables (loaded for real here) drops it
    assert result["ssh_auth"] == ["publickey"]     # sshd offers no password login


def test_submission_authenticates_against_the_shared_passwd_file(mail_flow):
    result, _, _ = mail_flow
    assert result["587"] == {} and result["465"] == {}      # every recipient accepted
    assert result["bad_login"] == 535


def test_no_open_relay_and_unknown_users_refused(mail_flow):
    result, _, _ = mail_flow
    assert result["mx"] == {}                                # the local domain takes mail from anyone
    assert result["relay"] == 550                            # but relays nothing for a stranger
    assert 500 <= result["unknown"] < 600


def test_outgoing_mail_is_dkim_signed_with_every_selector_and_verifies(mail_flow, site):
    import dkim
    from builder.dnsrecords import records
    result, _, _ = mail_flow
    txt = {r.name: r.value for r in records(site) if r.rtype == "TXT"}
    def dnsfunc(name, timeout=5):
        return txt.get(name.decode()).encode()
    inbox = result["boxes"]["INBOX"]
    # via 587, via 465 (to the postmaster alias), and injected locally with sendmail (socket)
    assert sorted(re.search(r"^Subject: (.*?)\r?$", t, re.M).group(1) for t in inbox) == [
        "via 465", "via 587", "via sendmail"]
    for text in inbox:
        raw = text.encode()
        d = dkim.DKIM(raw)
        sigs = [l for l in text.splitlines() if l.startswith("DKIM-Signature:")]
        assert len(sigs) == len(site.model.dkim.selectors), text
        for idx in range(len(sigs)):
            assert d.verify(idx=idx, dnsfunc=dnsfunc), (idx, text)


def test_inbound_mail_gets_authentication_results_and_spam_goes_to_junk(mail_flow, site):
    result, _, _ = mail_flow
    junk = result["boxes"]["Junk"]
    assert len(junk) == 1 and "Subject: offer" in junk[0]
    # a foreign peer is checked (not in local_addrs): rspamd wrote Authentication-Results
    assert f"Authentication-Results: {site.hostname};" in junk[0]
    assert "spf=" in junk[0] and "dmarc=" in junk[0]
    assert sorted(result["folders"]) == ["Drafts", "INBOX", "Junk", "Sent", "Trash"]


LMTP_IMAP_CLIENT = r'''
import imaplib, json, os, pwd, smtplib, socket, ssl, sys, time
root, socket_path, user, password = sys.argv[1:5]
vmail_uid = int(sys.argv[5])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
result = {}
for _ in range(100):
    if os.path.exists(root + socket_path):
        break
    time.sleep(0.2)
rd, wr = os.pipe()
pid = os.fork()
if pid == 0:                 # deliver as vmail inside the tree, as OpenSMTPD's LMTP delivery does
    import encodings.idna    # noqa: F401 -- the codec cannot be imported after chroot
    os.chroot(root); os.chdir("/")
    os.setuid(vmail_uid)
    out = {}
    with smtplib.LMTP(socket_path, local_hostname="peer.example.org") as l:
        ham = f"From: peer@example.org\r\nTo: {user}\r\nSubject: ham\r\n\r\nhi\r\n"
        spam = f"From: peer@example.org\r\nTo: {user}\r\nSubject: spam\r\nX-Spam: yes\r\n\r\nbuy\r\n"
        out["ham"] = l.sendmail("peer@example.org", [user], ham)
        out["spam"] = l.sendmail("peer@example.org", [user], spam)
        try:
            l.sendmail("peer@example.org", ["nosuchuser@" + user.split("@")[1]], ham); out["unknown"] = "accepted"
        except smtplib.SMTPRecipientsRefused as e:
            out["unknown"] = list(e.recipients.values())[0][0]
    os.write(wr, json.dumps(out).encode())
    os._exit(0)
os.close(wr)
data = b""
while chunk := os.read(rd, 65536):
    data += chunk
os.waitpid(pid, 0)
result["lmtp"] = json.loads(data)
try:
    socket.create_connection(("127.0.0.1", 143), 2).close(); result["143"] = "open"
except OSError:
    result["143"] = "closed"
m = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
m.login(user, password)
result["folders"] = sorted(l.decode().rsplit(" ", 1)[-1] for l in m.list()[1])
result["boxes"] = {}
for box in ("INBOX", "Junk"):
    m.select(box)
    nums = m.search(None, "ALL")[1][0].split()
    result["boxes"][box] = [m.fetch(n, "(BODY[HEADER.FIELDS (SUBJECT)])")[1][0][1].decode().strip() for n in nums]
print("RESULT " + json.dumps(result))
'''


def test_openbsd_dovecot_config_delivers_files_spam_and_serves_imaps_on_dovecot_23(openbsd, site, tmp_path):
    """The OpenBSD package ships Dovecot 2.3: run Debian 12's 2.3.19 on the rendered OpenBSD
    dovecot.conf. Differences from OpenBSD, honestly: base_dir is Debian's /run/dovecot (OpenBSD's
    is /var/dovecot, where smtpd.conf points), sievec is /usr/bin/sievec (OpenBSD: /usr/local/bin)."""
    from builder.checkers import run_script
    (tmp_path / "sink.py").write_text(SYSLOG_SINK)
    (tmp_path / "client.py").write_text(LMTP_IMAP_CLIENT)
    py, user = sys.executable, site.mailboxes[0]
    script = f"""
ip link set lo up
{py} {tmp_path}/sink.py $ROOT/dev/log {tmp_path}/syslog.txt &
sleep 0.5
chroot $ROOT /usr/bin/sievec /etc/dovecot/sieve/spam-to-junk.sieve || echo "START FAILED: sievec"
chroot $ROOT dovecot -c /etc/dovecot/dovecot.conf || echo "START FAILED: dovecot"
{py} {tmp_path}/client.py $ROOT /run/dovecot/lmtp {user} {PASSWORD!r} $(chroot $ROOT id -u vmail)
"""
    status, output = run_script(openbsd, "openbsd", script, tools="bookworm", timeout=300)
    syslog = (tmp_path / "syslog.txt").read_text(errors="replace")
    assert "START FAILED" not in output, output
    line = next((l for l in output.splitlines() if l.startswith("RESULT ")), None)
    assert line, f"{output}\n--- syslog\n{syslog}"
    result = json.loads(line[len("RESULT "):])
    assert result["lmtp"]["ham"] == {} and result["lmtp"]["spam"] == {}
    assert result["lmtp"]["unknown"] == 550
    assert result["143"] == "closed"
    assert result["folders"] == ["Drafts", "INBOX", "Junk", "Sent", "Trash"]
    assert result["boxes"] == {"INBOX": ["Subject: ham"], "Junk": ["Subject: spam"]}
    errors = [l for l in syslog.splitlines() if re.search(r"dovecot.*(Error|Fatal)", l)]
    assert not errors, "\n".join(errors)


SUBMISSION_CLIENT = r'''
import json, smtplib, socket, ssl, sys, time
user, password, domain = sys.argv[1:4]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
for _ in range(150):
    try:
        socket.create_connection(("127.0.0.1", 587), 1).close(); break
    except OSError:
        time.sleep(0.2)
result = {}
def rcpts(s):
    s.mail(user)
    out = {r: s.rcpt(r)[0] for r in (user, f"postmaster@{domain}", f"nosuchuser@{domain}")}
    s.rset()
    return out
with smtplib.SMTP("127.0.0.1", 587, timeout=60) as s:
    s.starttls(context=ctx)
    result["587_login"] = s.login(user, password)[0]
    result["587_rcpt"] = rcpts(s)
with smtplib.SMTP_SSL("127.0.0.1", 465, context=ctx, timeout=60) as s:
    result["465_login"] = s.login(user, password)[0]
for port in (587, 465):
    try:
        if port == 587:
            s = smtplib.SMTP("127.0.0.1", 587, timeout=60); s.starttls(context=ctx)
        else:
            s = smtplib.SMTP_SSL("127.0.0.1", 465, context=ctx, timeout=60)
        s.login(user, "wrong password"); result[f"{port}_bad"] = "accepted"
    except smtplib.SMTPAuthenticationError as e:
        result[f"{port}_bad"] = e.smtp_code
print("RESULT " + json.dumps(result))
'''


def test_openbsd_smtpd_conf_authenticates_against_the_credentials_file(openbsd, site, tmp_path):
    """Run OpenSMTPD (trixie's portable 7.6, the checker's build: OpenBSD's base smtpd cannot run
    here) on the rendered OpenBSD smtpd.conf: AUTH on 587 and 465 uses the built-in file table
    /etc/mail/credentials (no table-passwd package), and the virtual table accepts mailboxes and
    aliases and refuses unknown users. The filter path is OpenBSD's; here it points at the
    tools tree's filter-rspamd (not consulted before DATA, so no rspamd is needed)."""
    from builder.checkers import run_script
    (tmp_path / "client.py").write_text(SUBMISSION_CLIENT)
    filter_path = OS_FACTS["openbsd"]["filter_rspamd"]
    script = f"""
ip link set lo up
mkdir -p $ROOT{os.path.dirname(filter_path)}
ln -s /usr/libexec/opensmtpd/filter-rspamd $ROOT{filter_path}
chroot $ROOT smtpd -f /etc/mail/smtpd.conf || echo "START FAILED: smtpd"
{sys.executable} {tmp_path}/client.py {site.mailboxes[0]} {PASSWORD!r} {site.domain}
"""
    status, output = run_script(openbsd, "openbsd", script, timeout=300)
    assert "START FAILED" not in output, output
    line = next((l for l in output.splitlines() if l.startswith("RESULT ")), None)
    assert line, output
    result = json.loads(line[len("RESULT "):])
    assert result["587_login"] == 235 and result["465_login"] == 235
    assert result["587_bad"] == 535 and result["465_bad"] == 535
    rcpt = result["587_rcpt"]
    assert rcpt[site.mailboxes[0]] == 250 and rcpt[f"postmaster@{site.domain}"] == 250
    assert 500 <= rcpt[f"nosuchuser@{site.domain}"] < 600
