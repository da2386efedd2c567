"""Run the real daemons' own configuration checkers on a rendered tree.

The rendered files are written into the upper layer of an overlay mount whose lower layer is a
tools tree (builder/toolstree.py: Debian 13 with the image's daemons), together with what the
image makes at first boot and the checkers insist on: the accounts of `overlays/<os>/accounts.yaml`,
a throwaway self-signed certificate at the pki paths and throwaway SSH host keys. Everything
runs in a private mount and network namespace (`unshare --mount --net`), so nothing is mounted
on the host and `nft -c` may use netlink without touching the host's firewall; the layers are
deleted afterwards.

OpenBSD: the same trixie binaries check smtpd.conf, rspamd, unbound and sshd_config; Dovecot
2.3 syntax is checked with Debian 12's dovecot 2.3 in a second tools tree. What no Linux tool
checks is listed in OPENBSD_UNCHECKED.
"""
from __future__ import annotations

import datetime
import itertools
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from . import paths
from .errors import MkMailImageError
from .render import OS_FACTS, Tree
from .toolstree import PACKAGES, tools_tree


class CheckFailed(MkMailImageError):
    """One or more checkers rejected the rendered configuration."""

    def __init__(self, failures: list["CheckResult"]):
        self.failures = failures
        parts = [f"{r.name} ({r.command}) failed with exit status {r.status}:\n{r.output.rstrip()}"
                 for r in failures]
        super().__init__("configuration check failed:\n" + "\n\n".join(parts))


@dataclass(frozen=True)
class Check:
    name: str
    argv: list[str]           # run with chroot inside the merged tree
    tools: str = "trixie"     # which tools tree


@dataclass(frozen=True)
class CheckResult:
    name: str
    command: str
    status: int
    output: str

    @property
    def ok(self) -> bool:
        return self.status == 0


SIEVE = "/etc/dovecot/sieve/spam-to-junk.sieve"

CHECKS = {
    "debian": [
        Check("smtpd", ["smtpd", "-n", "-f", "/etc/smtpd.conf"]),
        Check("doveconf", ["doveconf", "-n", "-c", "/etc/dovecot/dovecot.conf"]),
        Check("sievec", ["sievec", "-c", "/etc/dovecot/dovecot.conf", SIEVE, "/tmp/spam-to-junk.svbin"]),
        Check("rspamadm", ["rspamadm", "configtest", "-c", "/etc/rspamd/rspamd.conf"]),
        Check("unbound-checkconf", ["unbound-checkconf", "/etc/unbound/unbound.conf"]),
        Check("nft", ["nft", "-c", "-f", "/etc/nftables.conf"]),
        Check("sshd", ["/usr/sbin/sshd", "-t", "-f", "/etc/ssh/sshd_config"]),
    ],
    "openbsd": [
        Check("smtpd", ["smtpd", "-n", "-f", "/etc/mail/smtpd.conf"]),
        Check("rspamadm", ["rspamadm", "configtest", "-c", "/etc/rspamd/rspamd.conf"]),
        # unbound.conf sets its own chroot/directory (OpenBSD's /var/unbound), present in the layer
        Check("unbound-checkconf", ["unbound-checkconf", "/var/unbound/etc/unbound.conf"]),
        Check("sshd", ["/usr/sbin/sshd", "-t", "-f", "/etc/ssh/sshd_config"]),
        Check("doveconf-2.3", ["doveconf", "-n", "-c", "/etc/dovecot/dovecot.conf"], tools="bookworm"),
        Check("sievec-2.3", ["sievec", "-c", "/etc/dovecot/dovecot.conf", SIEVE, "/tmp/spam-to-junk.svbin"],
              tools="bookworm"),
    ],
}

# Parts of the OpenBSD tree no Linux tool checks (listed by the tests as unchecked).
OPENBSD_UNCHECKED = {
    "/etc/pf.conf": "pfctl -nf exists only on OpenBSD",
    "/etc/rc.conf.local": "rc.d(8) variables, read only by OpenBSD's rc",
    "/etc/myname": "plain host name, no checker",
    "/etc/rc.local": "ksh commands run by OpenBSD's rc (sievec of the global sieve script)",
    "/etc/mail/passwd": "read by Dovecot's passwd-file only at login; `doveconf -n` does not open it "
                        "(logins against it: the OpenBSD Dovecot 2.3 test in tests/test_checkers.py)",
    "/etc/mail/smtpd.conf": "checked with trixie's OpenSMTPD 7.6 portable, not OpenBSD's base smtpd; "
                            "`smtpd -n` never looks at the filter-rspamd path (on either OS)",
    "/etc/dovecot/dovecot.conf": "checked with Debian 12's Dovecot 2.3.19, not the OpenBSD package's 2.3.21",
    "/etc/ssh/sshd_config": "checked with trixie's OpenSSH 10.0p1 (portable), not OpenBSD's",
    "/var/unbound/etc/unbound.conf": "checked with trixie's unbound 1.22, not OpenBSD's base unbound",
}

UNBOUND_ROOT_KEY = {"debian": "/var/lib/unbound/root.key", "openbsd": "/var/unbound/db/root.key"}

# The second tools tree: Debian 12's Dovecot 2.3 for the OpenBSD package's 2.3 syntax.
BOOKWORM_PACKAGES = ["dovecot-core", "dovecot-imapd", "dovecot-lmtpd", "dovecot-sieve", "openssl"]


def check_tree(tree: Tree, os_name: str, only: list[str] | None = None) -> list[CheckResult]:
    """Run every checker for `os_name` on `tree`; return the results or raise CheckFailed."""
    results = run_checks(tree, os_name, only)
    failed = [r for r in results if not r.ok]
    if failed:
        raise CheckFailed(failed)
    return results


def run_checks(tree: Tree, os_name: str, only: list[str] | None = None) -> list[CheckResult]:
    if os_name not in CHECKS:
        raise MkMailImageError(f"no checkers for OS '{os_name}'")
    if os.geteuid() != 0:
        raise MkMailImageError("render --check needs root: it mounts an overlay over a Debian 13 "
                               "tools tree in a private namespace and chroots into it")
    for tool in ("unshare", "mount", "chroot"):
        if not shutil.which(tool):
            raise MkMailImageError(f"'{tool}' not found: install util-linux/coreutils")
    checks = [c for c in CHECKS[os_name] if only is None or c.name in only]
    results: list[CheckResult] = []
    for tools in dict.fromkeys(c.tools for c in checks):
        results += _run_in_layer(tree, os_name, _tools(tools), [c for c in checks if c.tools == tools])
    return results


def run_command(tree: Tree, os_name: str, argv: list[str], tools: str = "trixie") -> CheckResult:
    """Run one command in the same throwaway layer the checkers use (e.g. `rspamadm configdump`
    to see the configuration as the daemon parses it)."""
    if os.geteuid() != 0:
        raise MkMailImageError("needs root (overlay mount, chroot)")
    return _run_in_layer(tree, os_name, _tools(tools), [Check(argv[0], argv, tools)])[0]


def _tools(name: str) -> Path:
    return tools_tree() if name == "trixie" else tools_tree(suite="bookworm", packages=BOOKWORM_PACKAGES)


def run_script(tree: Tree, os_name: str, script: str, timeout: float = 600,
               tools: str = "trixie") -> tuple[int, str]:
    """Run a shell script in the namespace of the checkers, with the layer mounted at $ROOT
    (commands run on the host's binaries unless chrooted: `chroot "$ROOT" smtpd`). The network
    namespace is empty and private, so daemons started there reach nothing and are killed with it.
    Returns (exit status, output)."""
    if os.geteuid() != 0:
        raise MkMailImageError("needs root (overlay mount, chroot)")
    with tempfile.TemporaryDirectory(prefix="mkmailimage-run-") as tmp:
        tmp = Path(tmp)
        upper, work, merged, out = tmp / "upper", tmp / "work", tmp / "merged", tmp / "out"
        for d in (upper, work, merged, out):
            d.mkdir()
        lower = _tools(tools)
        prepare_upper(upper, lower, tree, os_name)
        setup = _namespace_script(lower, upper, work, merged, out, [])
        setup = setup.rsplit("\nexit 0", 1)[0]
        # the new PID namespace gets its own /proc (so $! and nsenter -t agree)
        body = (f"{setup}\nmount -t proc proc /proc\nexport ROOT={shlex.quote(str(merged))}\n"
                f"{script}\n")
        # --kill-child: daemons left behind die with the namespace's first process
        proc = subprocess.run(["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child",
                               "--propagation", "private", "sh", "-c", body],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        return proc.returncode, proc.stdout


def _run_in_layer(tree: Tree, os_name: str, lower: Path, checks: list[Check]) -> list[CheckResult]:
    with tempfile.TemporaryDirectory(prefix="mkmailimage-check-") as tmp:
        tmp = Path(tmp)
        upper, work, merged, out = tmp / "upper", tmp / "work", tmp / "merged", tmp / "out"
        for d in (upper, work, merged, out):
            d.mkdir()
        prepare_upper(upper, lower, tree, os_name)
        script = _namespace_script(lower, upper, work, merged, out, checks)
        proc = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private",
                               "sh", "-c", script],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise MkMailImageError(f"could not set up the check namespace over {lower}:\n{proc.stdout}")
        results = []
        for i, c in enumerate(checks):
            status = int((out / f"{i}.rc").read_text())
            output = (out / f"{i}.out").read_text(errors="replace")
            results.append(CheckResult(c.name, shlex.join(c.argv), status, output))
        return results


def _namespace_script(lower, upper, work, merged, out, checks: list[Check]) -> str:
    q = shlex.quote
    lines = [
        "set -e",
        f"mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} {q(str(merged))}",
        # a private /dev: the host's device nodes the daemons need, nothing written to the host
        f"mount -t tmpfs -o mode=0755 tmpfs {q(str(merged / 'dev'))}",
        f"for n in null zero full random urandom tty; do touch {q(str(merged / 'dev'))}/$n; "
        f"mount --bind /dev/$n {q(str(merged / 'dev'))}/$n; done",
        f"mkdir -m 1777 {q(str(merged / 'dev/shm'))}",
        f"mount -t proc proc {q(str(merged / 'proc'))}",
        f"mount -t tmpfs tmpfs {q(str(merged / 'tmp'))}",
        "set +e",
    ]
    for i, c in enumerate(checks):
        cmd = shlex.join(["chroot", str(merged), *c.argv])
        lines.append(f"env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 {cmd} "
                     f"> {q(str(out / f'{i}.out'))} 2>&1 < /dev/null; echo $? > {q(str(out / f'{i}.rc'))}")
    lines.append("exit 0")
    return "\n".join(lines)


# -- the upper layer ---------------------------------------------------------------------------

def prepare_upper(upper: Path, lower: Path, tree: Tree, os_name: str) -> None:
    """Accounts, throwaway TLS/SSH keys, resolv.conf, root trust anchor, then the rendered tree (owners applied)."""
    users, groups = _add_accounts(upper, lower, os_name)
    facts = OS_FACTS[os_name]
    _write(upper, f"{facts['tls_dir']}/privkey.pem", _throwaway_cert()[0], 0o600)
    _write(upper, f"{facts['tls_dir']}/fullchain.pem", _throwaway_cert()[1], 0o644)
    for name, (key, pub) in _ssh_host_keys().items():
        _write(upper, f"/etc/ssh/{name}", key, 0o600)
        _write(upper, f"/etc/ssh/{name}.pub", pub, 0o644)
    (upper / "run/sshd").mkdir(parents=True, exist_ok=True)   # sshd -t insists on it
    _write(upper, "/etc/resolv.conf", b"nameserver 127.0.0.1\n", 0o644)   # as in the image
    # the unbound service puts the root trust anchor there before starting (Debian: copied
    # from dns-root-data; OpenBSD: unbound-anchor in rc.d/unbound)
    root_key = lower / "usr/share/dns/root.key"
    if root_key.exists():
        _write(upper, UNBOUND_ROOT_KEY[os_name], root_key.read_bytes(), 0o644)
    for e in tree.sorted():
        target = upper / e.path.lstrip("/")
        if e.is_dir:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(e.data)
        uid = users.get(e.owner)
        gid = groups.get(e.group)
        if uid is None or gid is None:
            if os_name == "debian":
                missing = e.owner if uid is None else e.group
                raise MkMailImageError(f"{e.path}: owner/group '{missing}' exists neither in the "
                                       f"tools tree nor in overlays/debian/accounts.yaml")
            uid, gid = uid or 0, gid or 0   # OpenBSD-only accounts (_smtpd, ...): root here
        os.chown(target, uid, gid)
        os.chmod(target, e.mode)


def load_accounts(os_name: str) -> dict:
    f = paths.OVERLAYS / os_name / "accounts.yaml"
    return yaml.safe_load(f.read_text()) if f.exists() else {}


def _add_accounts(upper: Path, lower: Path, os_name: str) -> tuple[dict, dict]:
    """Append accounts.yaml's groups/users to the tools tree's /etc/group and /etc/passwd (in
    the upper layer) with free system ids; return name -> id maps."""
    passwd = (lower / "etc/passwd").read_text().splitlines()
    group = (lower / "etc/group").read_text().splitlines()
    users = {f.split(":")[0]: int(f.split(":")[2]) for f in passwd if f.count(":") >= 6}
    groups = {f.split(":")[0]: int(f.split(":")[2]) for f in group if f.count(":") >= 3}
    members: dict[str, list[str]] = {}
    acc = load_accounts(os_name)
    taken = set(users.values()) | set(groups.values())

    def free_id() -> int:
        new = next(i for i in itertools.count(900) if i not in taken)
        taken.add(new)
        return new

    for g in acc.get("groups", []):
        if g["name"] not in groups:
            groups[g["name"]] = gid = free_id()
            members[g["name"]] = [m for m in g.get("members", []) if m in users]
            group.append(f"{g['name']}:x:{gid}:{','.join(members[g['name']])}")
    for u in acc.get("users", []):
        if u["name"] not in users:
            users[u["name"]] = uid = free_id()
            passwd.append(f"{u['name']}:x:{uid}:{groups[u['group']]}::{u['home']}:{u['shell']}")
    _write(upper, "/etc/passwd", ("\n".join(passwd) + "\n").encode(), 0o644)
    _write(upper, "/etc/group", ("\n".join(group) + "\n").encode(), 0o644)
    for u in acc.get("users", []):     # homes as the image makes them (vmail: 0750 vmail:vmail)
        home = upper / u["home"].lstrip("/")
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, users[u["name"]], groups[u["group"]])
        os.chmod(home, 0o750)
    return users, groups


def _write(upper: Path, path: str, data: bytes, mode: int) -> None:
    target = upper / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    os.chmod(target, mode)


_CERT: tuple[bytes, bytes] | None = None


def _throwaway_cert() -> tuple[bytes, bytes]:
    """(key PEM, cert PEM) of a self-signed certificate; stands in for the one made at first boot."""
    global _CERT
    if _CERT is None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mkmailimage-check.invalid")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .sign(key, hashes.SHA256()))
        _CERT = (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()),
                 cert.public_bytes(serialization.Encoding.PEM))
    return _CERT


def _ssh_host_keys() -> dict[str, tuple[bytes, bytes]]:
    """Throwaway host keys (private, public) in OpenSSH format; the image makes its own at first boot."""
    keys = {"ssh_host_ed25519_key": ed25519.Ed25519PrivateKey.generate(),
            "ssh_host_ecdsa_key": ec.generate_private_key(ec.SECP256R1()),
            "ssh_host_rsa_key": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
    return {name: (k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()),
                   k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH) + b"\n")
            for name, k in keys.items()}


def main() -> None:
    """`python -m builder.checkers SITE OS`: render and print every checker's result."""
    import sys
    from .render import render_tree
    from .site import load_site
    site, os_name = sys.argv[1], sys.argv[2]
    for r in run_checks(render_tree(load_site(site), os_name), os_name):
        print(f"== {r.name}: {'ok' if r.ok else 'FAILED'} ({r.command}, exit {r.status})")
        print(r.output.rstrip())


if __name__ == "__main__":
    main()
