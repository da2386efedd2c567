"""Secrets a site needs: DKIM key pairs and bcrypt password hashes.

Keys are written with 0600 in a 0700 directory and never overwritten; DNS records are derived
from the private key so they cannot drift from what rspamd signs with.
"""
from __future__ import annotations

import base64
import os
from pathlib import Path

import bcrypt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from .errors import MkMailImageError


def generate_dkim_key(algorithm: str = "rsa", bits: int = 2048) -> bytes:
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(algorithm)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def dkim_public_record(pem: bytes) -> str:
    """The DKIM TXT record value (`v=DKIM1; k=...; p=...`) for a PEM private key."""
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    raise ValueError("unsupported DKIM key type")


def write_new_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 (parents 0700); refuse if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise MkMailImageError(f"{path} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


BCRYPT_ROUNDS = 12


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise MkMailImageError("password too short: use at least 8 characters")
    if len(password.encode()) > 72:
        raise MkMailImageError("password too long for bcrypt: use at most 72 bytes")
    # $2b$ is what OpenBSD's crypt(3), libxcrypt (Debian) and Dovecot's BLF-CRYPT all accept.
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS, prefix=b"2b")).decode()


def check_password(password: str, hashed: str) -> bool:
    return bcrypt.checkpw(password.encode(), hashed.encode())
