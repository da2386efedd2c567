"""Render a site into the file tree that is layered into an image.

Layout convention: `overlays/<os>/root/` mirrors the target filesystem. Every file there is a
Jinja template (suffix `.j2`, stripped on output) or copied as is. `overlays/<os>/modes.yaml` gives
owner, group and mode per path (fnmatch patterns, first match wins), because a rendered tree on
the build host cannot carry foreign owners: the image assembler and the OpenBSD site set apply
them. `overlays/common/` holds fragments both OSes include.

Per-site secrets (DKIM private keys) are added by `render_tree` itself, never copied from
the template tree.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2
import yaml

from . import paths
from .errors import MkMailImageError
from .secrets import dkim_public_record
from .site import Site


@dataclass(frozen=True)
class Entry:
    path: str            # absolute path in the image, e.g. "/etc/smtpd.conf"
    data: bytes | None   # None for a directory
    mode: int
    owner: str = "root"
    group: str = "root"

    @property
    def is_dir(self) -> bool:
        return self.data is None


class Tree(dict):
    """path -> Entry, kept sorted on output so every consumer sees one order."""

    def add(self, entry: Entry) -> None:
        self[entry.path] = entry

    def sorted(self) -> list[Entry]:
        return [self[k] for k in sorted(self)]


OS_FACTS = {
    # Facts templates need that differ per OS; one place so templates stay declarative.
    "debian": {
        "filter_rspamd": "/usr/libexec/opensmtpd/filter-rspamd",
        "mail_dir": "/etc/mail",
        "lmtp_socket": "/run/dovecot/lmtp",
        "tls_dir": "/etc/ssl/mkmailimage",
        "rspamd_dir": "/etc/rspamd",
        "rspamd_dkim_dir": "/var/lib/rspamd/dkim",
        "rspamd_user": "_rspamd",
        "vmail_user": "vmail",
        "vmail_home": "/var/vmail",
        "mail_auth_group": "_mailauth",
        "unbound_conf_dir": "/etc/unbound/unbound.conf.d",
    },
    "openbsd": {
        "filter_rspamd": "/usr/local/libexec/smtpd/filter-rspamd",
        "mail_dir": "/etc/mail",
        "lmtp_socket": "/var/dovecot/lmtp",
        "tls_dir": "/etc/ssl/mkmailimage",
        "rspamd_dir": "/etc/rspamd",
        "rspamd_dkim_dir": "/etc/mail/dkim",
        "rspamd_user": "_rspamd",
        "vmail_user": "vmail",
        "vmail_home": "/var/vmail",
        "mail_auth_group": "_mailauth",
        "unbound_conf_dir": "/var/unbound/etc",
    },
}


class _Omit(Exception):
    """Raised by `{{ omit() }}` in a template: the file is not part of this site's tree
    (e.g. the ACME client's files when tls.mode is selfsigned)."""


def _omit():
    raise _Omit()


def template_env(os_name: str) -> jinja2.Environment:
    base = paths.OVERLAYS
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(base / os_name / "root"), str(base / "common")]),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
        lstrip_blocks=True, autoescape=False)
    env.globals["omit"] = _omit
    return env


def context(site: Site, os_name: str, extra: dict | None = None) -> dict:
    ctx = {
        "site": site,
        "m": site.model,
        "os": os_name,
        "facts": OS_FACTS[os_name],
        "dkim_records": {name: dkim_public_record(pem) for name, pem in site.dkim_keys.items()},
    }
    ctx.update(extra or {})
    return ctx


def _modes(os_name: str) -> list[dict]:
    f = paths.OVERLAYS / os_name / "modes.yaml"
    return yaml.safe_load(f.read_text()) or [] if f.exists() else []


def _meta(rules: list[dict], path: str, is_dir: bool) -> tuple[int, str, str]:
    for rule in rules:
        if fnmatch.fnmatchcase(path, rule["path"]):
            mode = rule.get("dir_mode" if is_dir else "mode")
            if mode is None:
                continue
            return int(str(mode), 8), rule.get("owner", "root"), rule.get("group", "root")
    return (0o755 if is_dir else 0o644), "root", "root"


def render_tree(site: Site, os_name: str, extra: dict | None = None) -> Tree:
    if os_name not in OS_FACTS:
        raise MkMailImageError(f"unknown OS '{os_name}'")
    root = paths.OVERLAYS / os_name / "root"
    env = template_env(os_name)
    ctx = context(site, os_name, extra)
    rules = _modes(os_name)
    tree = Tree()
    omitted: list[str] = []
    for src in sorted(root.rglob("*")):
        rel = "/" + src.relative_to(root).as_posix()
        if src.is_dir():
            tree.add(Entry(rel, None, *_meta(rules, rel, True)))
            continue
        if src.suffix == ".j2":
            rel = rel[:-3]
            tmpl = env.get_template(src.relative_to(root).as_posix())
            try:
                data = tmpl.render(**ctx).encode()
            except _Omit:
                omitted.append(rel)
                continue
        else:
            data = src.read_bytes()
        mode, owner, group = _meta(rules, rel, False)
        if src.suffix != ".j2" and os.access(src, os.X_OK) and mode == 0o644:
            mode = 0o755
        tree.add(Entry(rel, data, mode, owner, group))
    _drop_emptied_dirs(tree, omitted)
    _add_dkim_keys(tree, site, os_name, rules)
    return tree


def _drop_emptied_dirs(tree: Tree, omitted: list[str]) -> None:
    """Directories of the template tree left empty by omitted files are not created either."""
    for path in sorted({p.rsplit("/", 1)[0] for p in omitted}, key=len, reverse=True):
        while path and path in tree and not any(k.startswith(path + "/") for k in tree):
            del tree[path]
            path = path.rsplit("/", 1)[0]


def _add_dkim_keys(tree: Tree, site: Site, os_name: str, rules) -> None:
    facts = OS_FACTS[os_name]
    d = facts["rspamd_dkim_dir"]
    _ensure_parents(tree, d, rules)
    tree.add(Entry(d, None, 0o750, "root", facts["rspamd_user"]))
    for selector, pem in site.dkim_keys.items():
        tree.add(Entry(f"{d}/{site.domain}.{selector}.key", rspamd_dkim_key(pem), 0o640, "root",
                       facts["rspamd_user"]))


def rspamd_dkim_key(pem: bytes) -> bytes:
    """The key file rspamd signs with: RSA as PEM; ed25519 in rspamd's own format (base64 of
    seed + public key, what `rspamadm dkim_keygen -t ed25519` writes), because rspamd treats
    any PEM key as RSA and fails to sign with an ed25519 PEM."""
    import base64
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        return pem
    raw = serialization.Encoding.Raw
    seed = key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public = key.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed + public)


def _ensure_parents(tree: Tree, path: str, rules) -> None:
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        p = "/" + "/".join(parts[:i])
        if p not in tree:
            tree.add(Entry(p, None, *_meta(rules, p, True)))


OWNERS_FILE = ".mkmailimage-owners"


def write_tree(tree: Tree, out: Path) -> None:
    """Write the tree under `out` atomically (temp dir, then rename) with modes; owners are
    listed in `out/.mkmailimage-owners` as `mode owner group path` lines for whoever assembles
    the image. Refuses a non-empty `out`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MkMailImageError(f"{out} exists and is not an empty directory; refusing to write into it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        lines = []
        for e in tree.sorted():
            target = tmp / e.path.lstrip("/")
            if e.is_dir:
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(e.data)
            lines.append(f"{e.mode:04o} {e.owner} {e.group} {e.path}")
        # modes last: a 0500 directory must not stop us writing into it
        for e in sorted(tree.sorted(), key=lambda e: -len(e.path)):
            os.chmod(tmp / e.path.lstrip("/"), e.mode)
        (tmp / OWNERS_FILE).write_text("\n".join(lines) + "\n")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
