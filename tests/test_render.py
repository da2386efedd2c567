"""The rendered mail configuration holds what issue 2 requires (fast: no daemons run here;
tests/test_checkers.py runs the real checkers on the same trees)."""
from __future__ import annotations

import base64
import io
import re

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from builder import dnsrecords, paths
from builder.initsite import init_site
from builder.render import OS_FACTS, render_tree
from builder.secrets import dkim_public_record
from builder.site import load_site

OSES = ["debian", "openbsd"]
SMTPD_CONF = {"debian": "/etc/smtpd.conf", "openbsd": "/etc/mail/smtpd.conf"}
UNBOUND_CONF = {"debian": "/etc/unbound/unbound.conf.d/mkmailimage.conf",
                "openbsd": "/var/unbound/etc/unbound.conf"}
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0QbO8t8Ow8lp3Nf8p8qgS8jpl1nqkq4V7c+JYV8m3H admin@laptop"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("site") / "a"
    path = init_site("a.test", d, password="correct horse", ed25519=True, out=io.StringIO())
    text = path.read_text()
    text = text.replace("admin_ssh_keys: []", f"admin_ssh_keys:\n  - {SSH_KEY}")
    text = text.replace("  dmarc-reports: admin\n",
                        "  dmarc-reports: admin\n  team: [admin, bob]\n  outside: someone@example.org\n")
    hashed = load_site(path).users[0].password_hash
    text = text.replace(f'    password_hash: "{hashed}"\n',
                        f'    password_hash: "{hashed}"\n  - name: bob\n    password_hash: "{hashed}"\n')
    path.write_text(text)
    return load_site(path)


@pytest.fixture(scope="module", params=OSES)
def rendered(request, site):
    return request.param, render_tree(site, request.param)


def text(tree, path: str) -> str:
    return tree[path].data.decode()


def smtpd_lines(tree, os_name: str, keyword: str) -> list[str]:
    return [line for line in text(tree, SMTPD_CONF[os_name]).splitlines() if line.startswith(keyword + " ")]


# -- OpenSMTPD -------------------------------------------------------------------------------

def test_every_listener_uses_the_rspamd_filter_and_the_right_tls_and_auth(rendered, site):
    os_name, tree = rendered
    listens = smtpd_lines(tree, os_name, "listen")
    assert "listen on socket filter \"rspamd\"" in listens
    by_port: dict[str, list[str]] = {}
    for line in listens:
        assert line.endswith('filter "rspamd"'), line
        m = re.search(r" port (\d+) ", line)
        if m:
            by_port.setdefault(m.group(1), []).append(line)
    assert sorted(by_port) == ["25", "465", "587"]
    for port, lines in by_port.items():
        assert sorted(l.split()[2] for l in lines) == ["0.0.0.0", "::"]   # IPv4 and IPv6 wildcards
        for line in lines:
            assert f"pki {site.hostname}" in line
            assert f"hostname {site.hostname}" in line
            if port == "25":
                assert " tls " in line and "auth" not in line         # STARTTLS, no AUTH on the MX
            elif port == "465":
                assert " smtps " in line and "auth <passwd>" in line
            else:
                assert " tls-require " in line and "auth <passwd>" in line


def test_no_open_relay_and_local_domain_accepted_from_anyone(rendered, site):
    os_name, tree = rendered
    matches = smtpd_lines(tree, os_name, "match")
    assert matches[0] == f'match from any for domain "{site.domain}" action "local"'
    outbound = [m for m in matches if m.endswith('action "out"')]
    assert outbound == ['match from local for any action "out"', 'match auth from any for any action "out"']
    assert not [m for m in matches if m.startswith(("match from any for any", "match from src"))]


def test_delivery_and_tables(rendered, site):
    os_name, tree = rendered
    facts = OS_FACTS[os_name]
    conf = text(tree, SMTPD_CONF[os_name])
    assert f'action "local" lmtp "{facts["lmtp_socket"]}" rcpt-to virtual <virtuals>' in conf
    # OpenBSD: smtpd's built-in file table (its packages have no table-passwd); Debian: table-passwd
    auth_table = {"debian": f"passwd:{facts['mail_dir']}/passwd",
                  "openbsd": f"file:{facts['mail_dir']}/credentials"}[os_name]
    assert f"table passwd {auth_table}\n" in conf
    assert f"table virtuals file:{facts['mail_dir']}/virtuals" in conf
    assert f'filter "rspamd" proc-exec "{facts["filter_rspamd"]} ' in conf
    assert f"smtp max-message-size {site.max_message_bytes}\n" in conf
    assert f"pki {site.hostname} cert \"{facts['tls_dir']}/fullchain.pem\"" in conf
    assert f"pki {site.hostname} key \"{facts['tls_dir']}/privkey.pem\"" in conf


def test_relay_host_is_used_for_outbound_mail(site, tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(site.path.read_text().replace(
        "# relay_host: smtp+tls://relay.example.net:587", "relay_host: smtp+tls://isp@relay.example.net:587"))
    (tmp_path / "secrets").symlink_to(site.secrets_dir)
    tree = render_tree(load_site(path), "debian")
    conf = text(tree, "/etc/smtpd.conf")
    assert 'action "out" relay host "smtp+tls://isp@relay.example.net:587" auth <relaysecrets>' in conf
    assert "table relaysecrets file:/etc/mail/relay-secrets" in conf
    assert tree["/etc/mail/relay-secrets"].mode == 0o600


def test_passwd_file_is_one_format_for_smtpd_and_dovecot(rendered, site):
    os_name, tree = rendered
    lines = text(tree, f"{OS_FACTS[os_name]['mail_dir']}/passwd").splitlines()
    assert len(lines) == len(site.users)
    for user, line in zip(site.users, lines):
        # user:password:uid:gid:gecos:home:shell:extra -- table-passwd reads the first seven
        # fields and ignores extras; Dovecot's passwd-file takes empty uid/gid/home
        fields = line.split(":")
        assert fields[0] == site.address(user.name)
        assert fields[1] == user.password_hash
        assert fields[2:] == [""] * 6


def test_openbsd_smtpd_credentials_hold_the_same_users_and_hashes(site):
    # table(5) credentials for smtpd's file backend: "user@domain hash", whitespace-separated;
    # a bcrypt hash has no ':' (which would split it into username:password)
    tree = render_tree(site, "openbsd")
    lines = [l for l in text(tree, "/etc/mail/credentials").splitlines() if l and not l.startswith("#")]
    assert [l.split() for l in lines] == [[site.address(u.name), u.password_hash] for u in site.users]
    assert not [u for u in site.users if ":" in u.password_hash]
    assert "/etc/mail/credentials" not in render_tree(site, "debian")


def test_virtuals_map_every_address_to_mailboxes_or_vmail(rendered, site):
    os_name, tree = rendered
    facts = OS_FACTS[os_name]
    table = {}
    for line in text(tree, f"{facts['mail_dir']}/virtuals").splitlines():
        if line and not line.startswith("#"):
            key, value = line.split(None, 1)
            table[key] = [v.strip() for v in value.split(",")]
    for mailbox in site.mailboxes:
        assert table[mailbox] == [facts["vmail_user"]]
    assert table["team@a.test"] == ["admin@a.test", "bob@a.test"]
    assert table["outside@a.test"] == ["someone@example.org"]
    for required in ("postmaster", "abuse", "dmarc-reports"):
        assert site.address(required) in table


# -- Dovecot ---------------------------------------------------------------------------------

DOVECOT = "/etc/dovecot/dovecot.conf"


def test_dovecot_imaps_only_lmtp_socket_and_junk(rendered):
    os_name, tree = rendered
    conf = text(tree, DOVECOT)
    compact = re.sub(r"\s+", " ", conf)
    assert "inet_listener imap { port = 0 }" in compact            # 143 closed
    assert "inet_listener imaps { port = 993 ssl = yes }" in compact
    assert "\nssl = required\n" in conf
    assert "protocols = imap lmtp\n" in conf
    assert "mailbox Junk { special_use = \\Junk auto = subscribe }" in compact
    for box in ("Drafts", "Sent", "Trash"):
        assert f"mailbox {box} {{ special_use = \\{box} auto = subscribe }}" in compact
    # the LMTP listener is the socket smtpd.conf delivers to (base_dir + "lmtp")
    assert OS_FACTS[os_name]["lmtp_socket"].endswith("/lmtp")
    assert "unix_listener lmtp {" in conf
    assert f"{OS_FACTS[os_name]['mail_dir']}/passwd" in conf
    assert f"{OS_FACTS[os_name]['tls_dir']}/fullchain.pem" in conf


def test_dovecot_24_syntax_on_debian_23_on_openbsd(site):
    deb = text(render_tree(site, "debian"), DOVECOT)
    first = [l for l in deb.splitlines() if l and not l.startswith("#")][0]
    assert first.startswith("dovecot_config_version = 2.4")
    assert "dovecot_storage_version = 2.4" in deb
    assert "mail_driver = maildir" in deb and "mail_location" not in deb
    assert "home = /var/vmail/%{user | domain}/%{user | username}" in deb
    obsd = text(render_tree(site, "openbsd"), DOVECOT)
    assert "dovecot_config_version" not in obsd
    assert "mail_location = maildir:~/Maildir" in obsd
    assert "sieve_before = /etc/dovecot/sieve/spam-to-junk.sieve" in obsd


def test_sieve_files_the_header_filter_rspamd_writes_into_junk(rendered):
    _, tree = rendered
    script = text(tree, "/etc/dovecot/sieve/spam-to-junk.sieve")
    # poolpOrg/filter-rspamd 0.1.8 writes exactly "X-Spam: yes" for rspamd's "add header" action
    assert 'if header :is "X-Spam" "yes" {' in script
    assert 'fileinto :create "Junk";' in script


# -- rspamd ----------------------------------------------------------------------------------

def test_rspamd_checks_every_peer_and_uses_the_local_resolver(rendered):
    os_name, tree = rendered
    d = OS_FACTS[os_name]["rspamd_dir"]
    assert 'local_addrs = ["127.0.0.0/8", "::1"];' in text(tree, f"{d}/override.d/options.inc")
    assert f"{d}/local.d/options.inc" in tree and f"{d}/override.d/options.inc" in tree
    assert 'nameserver = ["127.0.0.1:53"];' in text(tree, f"{d}/local.d/options.inc")
    assert 'use = ["authentication-results"];' in text(tree, f"{d}/local.d/milter_headers.conf")
    assert "use_milter_headers" not in text(tree, f"{d}/local.d/dkim_signing.conf")  # default false
    assert 'servers = "127.0.0.1";' in text(tree, f"{d}/local.d/redis.conf")
    assert "enabled = false;" in text(tree, f"{d}/local.d/greylist.conf")
    assert "greylist = null;" in text(tree, f"{d}/local.d/actions.conf")
    dmarc = text(tree, f"{d}/local.d/dmarc.conf")
    assert 'quarantine = "add_header";' in dmarc and 'reject = "reject";' in dmarc
    for worker in ("worker-normal.inc", "worker-controller.inc", "worker-proxy.inc"):
        assert re.search(r'bind_socket = "127\.0\.0\.1:\d+";', text(tree, f"{d}/local.d/{worker}"))


def test_dkim_paths_keys_and_dns_records_agree(rendered, site):
    os_name, tree = rendered
    facts = OS_FACTS[os_name]
    conf = text(tree, f"{facts['rspamd_dir']}/local.d/dkim_signing.conf")
    assert "use_esld = false;" in conf and "allow_username_mismatch = false;" in conf
    assert "sign_authenticated = true;" in conf and "sign_local = true;" in conf
    pairs = re.findall(r'path = "([^"]+)";\s*selector = "([^"]+)";', conf)
    assert [s for _, s in pairs] == [s.name for s in site.model.dkim.selectors]
    published = {r.name: r.value for r in dnsrecords.records(site) if "._domainkey." in r.name}
    algorithms = {s.name: s.algorithm for s in site.model.dkim.selectors}
    assert sorted(algorithms.values()) == ["ed25519", "rsa"]
    for path, selector in pairs:
        assert path == f"{facts['rspamd_dkim_dir']}/{site.domain}.{selector}.key"
        entry = tree[path]
        assert (entry.mode, entry.owner, entry.group) == (0o640, "root", facts["rspamd_user"])
        record = published[f"{selector}._domainkey.{site.domain}."]
        if algorithms[selector] == "rsa":
            assert entry.data == site.dkim_keys[selector]          # PEM as generated
            assert record == dkim_public_record(entry.data)
        else:
            # rspamd's ed25519 format: base64(seed + public key)
            raw = base64.b64decode(entry.data, validate=True)
            site_key = serialization.load_pem_private_key(site.dkim_keys[selector], None)
            seed = site_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())
            assert raw[:32] == seed
            assert ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32]).public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw) == raw[32:]
            assert record == "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw[32:]).decode()
    assert tree[facts["rspamd_dkim_dir"]].mode == 0o750


# -- resolver, firewall, sshd ------------------------------------------------------------------

def test_unbound_local_only_with_drop_in_directory(rendered):
    os_name, tree = rendered
    conf = text(tree, UNBOUND_CONF[os_name])
    interfaces = re.findall(r"^\s*interface: (\S+)", conf, re.M)
    assert interfaces == ["127.0.0.1", "::1"]
    drop_in = re.search(r'^include: "(.+)/\*\.conf"$', conf, re.M).group(1)
    assert drop_in in tree and tree[drop_in].is_dir


def test_firewall_opens_only_the_mail_ports(rendered):
    os_name, tree = rendered
    if os_name == "debian":
        conf = text(tree, "/etc/nftables.conf")
        assert "type filter hook input priority filter; policy drop;" in conf
        assert re.findall(r"tcp dport \{([^}]*)\} accept", conf) == [" 22, 25, 465, 587, 993 "]
        assert re.findall(r"tcp dport", conf) == ["tcp dport"]
    else:
        conf = text(tree, "/etc/pf.conf")
        assert "\nblock return log\n" in conf
        assert re.findall(r"port \{([^}]*)\}", conf) == [" 22 25 465 587 993 "]


def test_sshd_key_only_and_root_keys(rendered):
    _, tree = rendered
    conf = text(tree, "/etc/ssh/sshd_config")
    for line in ("PasswordAuthentication no", "KbdInteractiveAuthentication no",
                 "PermitRootLogin prohibit-password", "AuthenticationMethods publickey"):
        assert f"\n{line}\n" in conf
    assert not re.search(r"^\s*Include", conf, re.M | re.I)
    assert SSH_KEY in text(tree, "/root/.ssh/authorized_keys").splitlines()
    assert tree["/root/.ssh/authorized_keys"].mode == 0o600
    assert tree["/root/.ssh"].mode == 0o700 and tree["/root"].mode == 0o700


# -- secrets and accounts ------------------------------------------------------------------------

def test_secret_files_modes_and_owners(rendered, site):
    os_name, tree = rendered
    facts = OS_FACTS[os_name]
    passwd = tree[f"{facts['mail_dir']}/passwd"]
    assert (passwd.mode, passwd.owner, passwd.group) == (0o640, "root", facts["mail_auth_group"])
    if os_name == "openbsd":
        # smtpd's lookup process keeps only its primary group (setgroups(1, &pw_gid) in lka.c)
        creds = tree[f"{facts['mail_dir']}/credentials"]
        assert (creds.mode, creds.owner, creds.group) == (0o640, "root", "_smtpd")
    assert tree[f"{facts['mail_dir']}/relay-secrets"].mode == 0o600
    for e in tree.values():
        if not e.is_dir and e.mode & 0o004:
            assert b"PRIVATE KEY" not in e.data, e.path
            for user in site.users:
                assert user.password_hash.encode() not in e.data, e.path


def test_accounts_cover_the_groups_configs_rely_on(rendered):
    os_name, tree = rendered
    facts = OS_FACTS[os_name]
    accounts = yaml.safe_load((paths.OVERLAYS / os_name / "accounts.yaml").read_text())
    groups = {g["name"]: g.get("members", []) for g in accounts["groups"]}
    users = {u["name"]: u for u in accounts["users"]}
    if os_name == "debian":     # table-passwd reads the shared passwd file
        assert "opensmtpd" in groups[facts["mail_auth_group"]]
    else:                       # smtpd reads its own credentials file (group _smtpd), not passwd
        assert "_smtpd" not in groups[facts["mail_auth_group"]]
    assert f"extra_groups = {facts['mail_auth_group']}" in text(tree, DOVECOT)
    assert users[facts["vmail_user"]]["home"] == facts["vmail_home"]


def test_host_names(site):
    assert text(render_tree(site, "debian"), "/etc/mailname") == site.hostname + "\n"
    obsd = render_tree(site, "openbsd")
    assert text(obsd, "/etc/myname") == site.hostname + "\n"
    rc = text(obsd, "/etc/rc.conf.local")
    assert 'pkg_scripts="redis rspamd dovecot"' in rc and "unbound_flags=\n" in rc


def test_global_sieve_script_is_compiled_by_root_before_delivery(site):
    # LMTP runs as vmail and cannot write the binary next to the script: the image compiles it
    script = "/etc/dovecot/sieve/spam-to-junk.sieve"
    deb = render_tree(site, "debian")
    dropin = text(deb, "/etc/systemd/system/dovecot.service.d/mkmailimage.conf")
    # "+": outside the unit's ProtectSystem=full sandbox, which makes /etc read-only
    assert f"\nExecStartPre=+/usr/bin/sievec {script}\n" in dropin and script in deb
    obsd = render_tree(site, "openbsd")
    assert f"/usr/local/bin/sievec {script}\n" in text(obsd, "/etc/rc.local") and script in obsd
