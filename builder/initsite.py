"""`mkmailimage init` and `mkmailimage passwd`: create a site, add or change a mailbox user.

Both check everything first and only then write, so a refused call leaves the disk unchanged.
The site file is edited as text (not re-dumped) so the user's comments survive.
"""
from __future__ import annotations

import datetime
import getpass
import os
import secrets as pysecrets
import sys
import tempfile
from pathlib import Path

import jinja2
import yaml

from . import paths
from .errors import MkMailImageError, SiteError
from .secrets import generate_dkim_key, hash_password, write_new_private
from .site import LOCALPART_RE, _domain, load_site


def init_site(domain: str, directory: Path | None, user: str = "admin", ed25519: bool = False,
              password: str | None = None, out=sys.stdout) -> Path:
    try:
        domain = _domain(domain)
    except ValueError as e:
        raise SiteError(str(e), field="DOMAIN") from None
    if not LOCALPART_RE.match(user):
        raise SiteError(f"'{user}' is not a valid mailbox name", field="--user")
    directory = Path(directory or domain)
    site_file = directory / "site.yaml"
    selector = datetime.date.today().strftime("s%Y%m")
    keys = {f"secrets/dkim/{selector}.key": "rsa"}
    if ed25519:
        keys[f"secrets/dkim/{selector}e.key"] = "ed25519"
    for p in [site_file, *(directory / k for k in keys)]:
        if p.exists():
            raise MkMailImageError(f"{p} already exists; init never overwrites (use another --dir)")

    generated = password is None
    if generated:
        password = pysecrets.token_urlsafe(15)
    text = _env().get_template("site.yaml.j2").render(
        domain=domain, user=user, password_hash=hash_password(password), selector=selector,
        ed25519=ed25519,
        created=datetime.date.today().isoformat())

    directory.mkdir(parents=True, exist_ok=True)
    for rel, algorithm in keys.items():
        write_new_private(directory / rel, generate_dkim_key(algorithm))
    os.chmod(directory / "secrets", 0o700)
    _write_atomic(site_file, text, exclusive=True)
    load_site(site_file)  # what init writes must validate; a failure here is our bug
    print(f"wrote {site_file} and DKIM key(s) under {directory / 'secrets'}", file=out)
    if generated:
        print(f"mailbox {user}@{domain} password (shown once): {password}", file=out)
    return site_file


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(paths.TEMPLATES / "site"),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def read_new_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise MkMailImageError("no password on standard input")
        return line.rstrip("\r\n")
    first = getpass.getpass("New password: ")
    if first != getpass.getpass("Repeat password: "):
        raise MkMailImageError("the two passwords differ; nothing changed")
    return first


def set_password(site_path: Path, user: str, password: str) -> bool:
    """Set USER's bcrypt hash in the site file; add the user if new. Returns True if added."""
    site_path = Path(site_path)
    load_site(site_path)  # refuse to edit a file that is already invalid
    if not LOCALPART_RE.match(user):
        raise SiteError(f"'{user}' is not a valid mailbox name", str(site_path), field="USER")
    hashed = hash_password(password)
    text = site_path.read_text()
    new_text, added = _edit_user_hash(text, user, hashed)
    # validate the result before it replaces the original
    with tempfile.TemporaryDirectory(dir=site_path.parent) as tmp:
        candidate = Path(tmp) / site_path.name
        candidate.write_text(new_text)
        os.symlink(site_path.parent.resolve() / "secrets", Path(tmp) / "secrets")
        load_site(candidate)
    _write_atomic(site_path, new_text)
    return added


def _edit_user_hash(text: str, user: str, hashed: str) -> tuple[str, bool]:
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    users = next(v for k, v in root.value if k.value == "users")
    for item in users.value:
        fields = {k.value: v for k, v in item.value}
        if fields.get("name") is not None and fields["name"].value == user:
            node = fields["password_hash"]
            s, e = node.start_mark.index, node.end_mark.index
            return text[:s] + f'"{hashed}"' + text[e:], False
    if users.flow_style:
        raise MkMailImageError("passwd can only edit a block-style `users:` list")
    last = users.value[-1]
    indent = " " * last.start_mark.column
    dash_indent = " " * max(last.start_mark.column - 2, 0)
    # insert after the line holding the last item's last scalar (the item's own end mark
    # already points past trailing comments, which belong to what follows)
    node = last
    while isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.value:
        node = node.value[-1][1] if isinstance(node, yaml.MappingNode) else node.value[-1]
    nl = text.find("\n", node.end_mark.index)
    pos = len(text) if nl < 0 else nl + 1
    head = text[:pos] if text[:pos].endswith("\n") else text[:pos] + "\n"
    addition = f'{dash_indent}- name: {user}\n{indent}password_hash: "{hashed}"\n'
    return head + addition + text[pos:], True


def _write_atomic(path: Path, text: str, exclusive: bool = False) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if exclusive:
            os.link(tmp, path)  # fails if path appeared meanwhile
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
