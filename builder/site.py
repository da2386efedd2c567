"""The site model: one YAML file describing one mail domain, validated before anything is written.

`load_site(path)` returns a `Site` or raises `SiteErrors` naming file, line, column and field of
every problem. Secrets (DKIM private keys) live in a directory beside the site file and are only
referenced by path here; they are read and checked during validation.
"""
from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from . import yamlmarks
from .errors import SiteError, SiteErrors

LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
DOMAIN_RE = re.compile(rf"^(?=.{{1,253}}$){LABEL}(\.{LABEL})+$")
LOCALPART_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._+-]{0,62}[a-z0-9])?$")
BCRYPT_RE = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
SSH_KEY_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|"
    r"sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( [^\n]*)?$")
SIZE_RE = re.compile(r"^([1-9][0-9]*)([KMG]?)$")
SELECTOR_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def _domain(value: str) -> str:
    v = value.strip().lower().rstrip(".")
    if not DOMAIN_RE.match(v):
        raise ValueError(f"'{value}' is not a valid domain name")
    if v.split(".")[-1].isdigit():
        raise ValueError(f"'{value}' is not a domain name (numeric top-level label)")
    return v


def _mirror_url(v: str | None) -> str | None:
    if v is not None and not re.match(r"^(https?|file)://\S+$", v):
        raise ValueError(f"'{v}' is not an http(s):// or file:// URL")
    return v.rstrip("/") if v else v


def _disk_size(v: str, smallest: int) -> str:
    m = SIZE_RE.match(v)
    if not m or m.group(2) != "G" or not smallest <= int(m.group(1)) <= 2048:
        raise ValueError(f"'{v}' must be a size in G between {smallest}G and 2048G")
    return v


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class User(Strict):
    name: Annotated[str, Field(description="local part of the address")]
    password_hash: str
    quota: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not LOCALPART_RE.match(v):
            raise ValueError(f"'{v}' is not a valid mailbox name (lower-case letters, digits, . _ + -)")
        return v

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        if not BCRYPT_RE.match(v):
            raise ValueError("must be a bcrypt hash ($2b$...); set it with `mkmailimage passwd`, "
                             "plaintext passwords are refused")
        return v

    @field_validator("quota")
    @classmethod
    def _quota(cls, v: str | None) -> str | None:
        if v is not None and not SIZE_RE.match(v):
            raise ValueError(f"'{v}' is not a size like 2G or 500M")
        return v


class DkimSelector(Strict):
    name: str
    algorithm: Literal["rsa", "ed25519"] = "rsa"
    key: str = Field(description="private key file, relative to the site file")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SELECTOR_RE.match(v):
            raise ValueError(f"'{v}' is not a valid DKIM selector")
        return v


class Dkim(Strict):
    selectors: list[DkimSelector] = Field(min_length=1)


class Dmarc(Strict):
    policy: Literal["none", "quarantine", "reject"] = "quarantine"
    report: str = "dmarc-reports"   # local part (resolved via users/aliases) or full address


LETSENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"


class Tls(Strict):
    mode: Literal["selfsigned", "acme"] = "selfsigned"
    acme_email: str | None = None      # ACME account contact; None: register without one
    acme_server: str | None = None     # ACME directory URL; None: Let's Encrypt's production one
    acme_ca: str | None = None         # PEM CA bundle the ACME server's HTTPS is signed by
                                       # (private ACME CAs), relative to the site file

    @property
    def acme_directory(self) -> str:
        return self.acme_server or LETSENCRYPT_DIRECTORY

    @field_validator("acme_email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        if v is not None:
            local, at, dom = v.rpartition("@")
            if not at or not re.match(r"^[A-Za-z0-9._%+-]+$", local):
                raise ValueError(f"'{v}' is not an e-mail address")
            _domain(dom)
        return v

    @field_validator("acme_server")
    @classmethod
    def _server(cls, v: str | None) -> str | None:
        # RFC 8555 6.1: ACME is spoken over HTTPS only
        if v is not None and not re.match(r"^https://[A-Za-z0-9.:\[\]-]+(/\S*)?$", v):
            raise ValueError(f"'{v}' is not an https:// ACME directory URL")
        return v

    @model_validator(mode="after")
    def _only_with_acme(self) -> "Tls":
        if self.mode != "acme":
            for name in ("acme_email", "acme_server", "acme_ca"):
                if getattr(self, name) is not None:
                    raise _at(("tls", name), f"{name} is only used with tls.mode: acme "
                                             f"(mode is {self.mode})")
        return self


class Debian(Strict):
    suite: Literal["trixie", "forky", "sid", "bookworm"] = "trixie"
    mirror: str | None = None          # None: the build host's apt mirror for building,
                                       # Debian's documented default inside the image
    security_mirror: str | None = None
    installer: Literal["bootstrap", "preseed"] = "bootstrap"
    disk_size: str = "4G"

    @field_validator("mirror", "security_mirror")
    @classmethod
    def _mirror(cls, v: str | None) -> str | None:
        return _mirror_url(v)

    @field_validator("disk_size")
    @classmethod
    def _size(cls, v: str) -> str:
        return _disk_size(v, 2)


class OpenBSD(Strict):
    version: str = "7.8"
    mirror: str | None = None
    sets_dir: str | None = None
    signify_key: str | None = None
    disk_size: str = "8G"

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not re.match(r"^[5-9]\.[0-9]$", v):
            raise ValueError(f"'{v}' is not an OpenBSD release like 7.8 (quote it in YAML)")
        return v

    @field_validator("mirror")
    @classmethod
    def _mirror(cls, v: str | None) -> str | None:
        return _mirror_url(v)

    @field_validator("disk_size")
    @classmethod
    def _size(cls, v: str) -> str:
        return _disk_size(v, 4)


class SiteModel(Strict):
    """What the YAML may say. Paths are still relative to the site file here."""

    domain: str
    hostname: str | None = None
    ipv4: str | None = None
    ipv6: str | None = None
    users: list[User] = Field(min_length=1)
    aliases: dict[str, str | list[str]] = Field(default_factory=dict)
    dkim: Dkim
    dmarc: Dmarc = Dmarc()
    tls: Tls = Tls()
    max_message_size: str = "35M"
    relay_host: str | None = None
    admin_ssh_keys: list[str] = Field(default_factory=list)
    timezone: str = "UTC"
    debian: Debian = Debian()
    openbsd: OpenBSD = OpenBSD()

    @field_validator("domain", "hostname")
    @classmethod
    def _domains(cls, v: str | None) -> str | None:
        return None if v is None else _domain(v)

    @field_validator("ipv4")
    @classmethod
    def _v4(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return str(ipaddress.IPv4Address(v))
        except ValueError:
            raise ValueError(f"'{v}' is not an IPv4 address") from None

    @field_validator("ipv6")
    @classmethod
    def _v6(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return str(ipaddress.IPv6Address(v))
        except ValueError:
            raise ValueError(f"'{v}' is not an IPv6 address") from None

    @field_validator("max_message_size")
    @classmethod
    def _size(cls, v: str) -> str:
        if not SIZE_RE.match(v):
            raise ValueError(f"'{v}' is not a size like 35M")
        return v

    @field_validator("relay_host")
    @classmethod
    def _relay(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(smtp\+tls|smtps|smtp)://([^@\s]+@)?[a-z0-9.-]+(:[0-9]{1,5})?$", v):
            raise ValueError(f"'{v}' must look like smtp+tls://[label@]host[:port]")
        return v

    @field_validator("admin_ssh_keys")
    @classmethod
    def _ssh(cls, v: list[str]) -> list[str]:
        for i, key in enumerate(v):
            if not SSH_KEY_RE.match(key.strip()):
                raise ValueError(f"entry {i} is not an OpenSSH public key line")
        return [k.strip() for k in v]

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$", v):
            raise ValueError(f"'{v}' is not a timezone name like Europe/Berlin")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "SiteModel":
        names = [u.name for u in self.users]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise _at(("users", i, "name"), f"duplicate user '{n}'")
        for alias, target in self.aliases.items():
            if not LOCALPART_RE.match(alias):
                raise _at(("aliases", alias, "__key__"), f"'{alias}' is not a valid alias name")
            if alias in names:
                raise _at(("aliases", alias, "__key__"), f"'{alias}' is both a user and an alias")
            for t in [target] if isinstance(target, str) else target:
                _check_address_or_local(t, ("aliases", alias))
        selectors = [s.name for s in self.dkim.selectors]
        for i, s in enumerate(selectors):
            if s in selectors[:i]:
                raise _at(("dkim", "selectors", i, "name"), f"duplicate selector '{s}'")
        return self


class _Located(ValueError):
    """A cross-field error that knows which path it belongs to."""

    def __init__(self, path: tuple, message: str):
        self.path = path
        super().__init__(message)


def _at(path: tuple, message: str) -> _Located:
    return _Located(path, message)


def _check_address_or_local(value: str, path: tuple) -> None:
    if "@" in value:
        local, _, dom = value.rpartition("@")
        if not LOCALPART_RE.match(local):
            raise _at(path, f"'{value}' is not a valid address")
        try:
            _domain(dom)
        except ValueError:
            raise _at(path, f"'{value}' is not a valid address") from None
    elif not LOCALPART_RE.match(value):
        raise _at(path, f"'{value}' is neither a local user nor an address")


class Site:
    """A validated site with derived values the templates need. Built only by `load_site`."""

    REQUIRED_ALIASES = ("postmaster", "abuse")

    def __init__(self, model: SiteModel, path: Path, dkim_keys: dict[str, bytes]):
        self.model = model
        self.path = path
        self.dkim_keys = dkim_keys          # selector -> PEM private key
        self.acme_ca_pem: str | None = None   # tls.acme_ca's certificates (PEM), read at load
        m = model
        self.domain = m.domain
        self.hostname = m.hostname or f"mail.{m.domain}"
        self.short_hostname = self.hostname.split(".")[0]

    # -- derived values -------------------------------------------------------------------
    @property
    def users(self) -> list[User]:
        return self.model.users

    def address(self, local: str) -> str:
        return local if "@" in local else f"{local}@{self.domain}"

    @property
    def mailboxes(self) -> list[str]:
        return [self.address(u.name) for u in self.model.users]

    @property
    def aliases(self) -> dict[str, list[str]]:
        """alias address -> list of target addresses (users, or external addresses)."""
        out: dict[str, list[str]] = {}
        for alias, target in self.model.aliases.items():
            targets = [target] if isinstance(target, str) else list(target)
            out[self.address(alias)] = [self.address(t) for t in targets]
        return out

    @property
    def dmarc_report_address(self) -> str:
        return self.address(self.model.dmarc.report)

    @property
    def max_message_bytes(self) -> int:
        n, unit = SIZE_RE.match(self.model.max_message_size).groups()
        return int(n) * {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}[unit]

    @property
    def secrets_dir(self) -> Path:
        return self.path.parent / "secrets"

    def resolve(self, local_or_address: str, seen: frozenset = frozenset()) -> set[str]:
        """The mailboxes an address finally delivers to (empty if it leaves the domain or loops)."""
        address = self.address(local_or_address)
        if address in self.mailboxes:
            return {address}
        if address in seen or address not in self.aliases:
            return set()
        out: set[str] = set()
        for t in self.aliases[address]:
            out |= self.resolve(t, seen | {address})
        return out


def load_site(path: str | Path) -> Site:
    """Read, validate and check one site file; raise SiteErrors naming every problem found."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SiteErrors([SiteError("no such file", name)]) from None
    except UnicodeDecodeError as e:
        raise SiteErrors([SiteError(f"not UTF-8 text ({e.reason} at byte {e.start})", name)]) from None
    except OSError as e:
        raise SiteErrors([SiteError(f"cannot read: {e.strerror}", name)]) from None
    try:
        marked = yamlmarks.load(text, name)
    except SiteError as e:
        raise SiteErrors([e]) from None
    if not isinstance(marked.value, dict):
        raise SiteErrors([SiteError("the site file must be a mapping of settings", name, 1, 1)])
    try:
        model = SiteModel.model_validate(marked.value)
    except ValidationError as e:
        raise SiteErrors(_convert(e, marked, name)) from None
    errors: list[SiteError] = []
    site = Site(model, path.resolve(), {})
    _check_aliases_resolve(site, marked, name, errors)
    _load_dkim_keys(site, marked, name, errors)
    _load_acme_ca(site, marked, name, errors)
    _check_signify_key(site, marked, name, errors)
    if errors:
        raise SiteErrors(errors)
    return site


def _error_at(marked: yamlmarks.Marked, name: str, path: tuple, message: str) -> SiteError:
    line, col = marked.mark(path)
    return SiteError(message, name, line, col, yamlmarks.dotted(path) or None)


def _convert(e: ValidationError, marked: yamlmarks.Marked, name: str) -> list[SiteError]:
    out = []
    for err in e.errors(include_url=False):
        loc = tuple(err["loc"])
        msg = err["msg"]
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _Located):
            loc, msg = ctx_error.path, str(ctx_error)
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            field = loc[-1]
            msg = f"unknown setting '{field}'"
            if field == "password":
                msg = "plaintext passwords are refused: use `mkmailimage passwd` to store a bcrypt password_hash"
            loc = loc + ("__key__",)
        elif err["type"] == "missing":
            msg = f"required setting '{loc[-1]}' is missing"
        # pydantic appends the union member type name ('str', 'list[str]') to the location
        loc = tuple(p for p in loc if p not in ("str", "list[str]", "function-after[_mirror(), str]"))
        out.append(_error_at(marked, name, loc, msg))
    return out


def _check_aliases_resolve(site: Site, marked, name: str, errors: list[SiteError]) -> None:
    m = site.model
    for required in Site.REQUIRED_ALIASES + (m.dmarc.report,):
        address = site.address(required)
        if not address.endswith("@" + site.domain):
            continue  # DMARC reports may go to an outside address
        if not site.resolve(required):
            where = ("dmarc", "report") if required == m.dmarc.report else ("aliases",)
            errors.append(_error_at(marked, name, where,
                                    f"'{address}' must resolve to a mailbox (add an alias to a user)"))


def _load_dkim_keys(site: Site, marked, name: str, errors: list[SiteError]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    for i, sel in enumerate(site.model.dkim.selectors):
        where = ("dkim", "selectors", i, "key")
        key_path = (site.path.parent / sel.key)
        try:
            pem = key_path.read_bytes()
            key = serialization.load_pem_private_key(pem, password=None)
        except FileNotFoundError:
            errors.append(_error_at(marked, name, where, f"DKIM key file {key_path} does not exist "
                                    "(`mkmailimage init` creates one)"))
            continue
        except (ValueError, TypeError, OSError) as e:
            errors.append(_error_at(marked, name, where, f"cannot read DKIM private key {key_path}: {e}"))
            continue
        if sel.algorithm == "rsa":
            if not isinstance(key, rsa.RSAPrivateKey):
                errors.append(_error_at(marked, name, where, f"{key_path} is not an RSA key"))
            elif key.key_size < 2048:
                errors.append(_error_at(marked, name, where,
                                        f"RSA key {key_path} has {key.key_size} bits; at least 2048 are required"))
            else:
                site.dkim_keys[sel.name] = pem
        elif not isinstance(key, ed25519.Ed25519PrivateKey):
            errors.append(_error_at(marked, name, where, f"{key_path} is not an ed25519 key"))
        else:
            site.dkim_keys[sel.name] = pem


def _check_signify_key(site: Site, marked, name: str, errors: list[SiteError]) -> None:
    """openbsd.signify_key: a key the user names must be there and be a signify public key, not
    silently replaced by another source's key."""
    import base64
    import binascii
    rel = site.model.openbsd.signify_key
    if rel is None:
        return
    where = ("openbsd", "signify_key")
    key_path = site.path.parent / rel
    lines: list[str] = []
    try:
        lines = key_path.read_text(encoding="ascii").splitlines()
        blob = base64.b64decode(lines[1], validate=True) if len(lines) >= 2 else b""
    except FileNotFoundError:
        errors.append(_error_at(marked, name, where, f"signify public key {key_path} does not exist"))
        return
    except (UnicodeDecodeError, binascii.Error, OSError):
        blob = b""
    # signify's public key file: an "untrusted comment:" line, then base64 of "Ed" + 8-byte key
    # number + 32-byte Ed25519 key
    if not (lines and lines[0].startswith("untrusted comment:") and len(blob) == 42
            and blob.startswith(b"Ed")):
        errors.append(_error_at(marked, name, where, f"{key_path} is not a signify public key "
                                "(as made by `signify-openbsd -G`, e.g. openbsd-78-base.pub)"))


def _load_acme_ca(site: Site, marked, name: str, errors: list[SiteError]) -> None:
    """tls.acme_ca: PEM certificates only (copied into the image as certbot's CA bundle)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    rel = site.model.tls.acme_ca
    if rel is None:
        return
    where = ("tls", "acme_ca")
    ca_path = site.path.parent / rel
    try:
        text = ca_path.read_text(encoding="ascii")
        certs = x509.load_pem_x509_certificates(text.encode())
    except FileNotFoundError:
        errors.append(_error_at(marked, name, where, f"ACME CA bundle {ca_path} does not exist"))
        return
    except (ValueError, OSError) as e:
        errors.append(_error_at(marked, name, where, f"{ca_path} is not a PEM certificate bundle: {e}"))
        return
    if "PRIVATE KEY" in text:
        errors.append(_error_at(marked, name, where, f"{ca_path} contains a private key; "
                                "give only the CA certificate(s)"))
        return
    # re-encoded: the image gets the certificates alone, without comments or stray text
    site.acme_ca_pem = "".join(c.public_bytes(Encoding.PEM).decode() for c in certs)
