"""OpenBSD release files (boot files, sets, packages), fetched and verified with real signify.

Chain of trust, the same one the installer and pkg_add use:
  SHA256.sig  --signify -V -e, release key (openbsd-XY-base.pub / openbsd-XY-pkg.pub)-->  SHA256
  SHA256      --sha256 of every file we use-->  the file
and, before anything is served, `signify -C -p KEY -x SHA256.sig FILE...` over the staged files,
so the real tool has the last word. A file that is not listed in the signed SHA256, or whose
checksum differs, refuses the build with its name.

Sources: a mirror URL (`https://.../pub/OpenBSD` or directly `.../<version>/amd64`, also file://)
or a local directory holding the `<version>/amd64` files (`openbsd.sets_dir`). Packages come
from the same place, `<version>/packages/amd64` beside the sets.

Downloads are cached content-addressed under `paths.cache_dir()/openbsd/blobs/<sha256>` and
hashed again on every use, so a damaged cache entry is fetched anew, never trusted.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .. import paths
from ..errors import BuildError, MkMailImageError, ToolMissing
from ..cache import sha256_file

ARCH = "amd64"
SIGNIFY = "signify-openbsd"
DEBIAN_KEYS = Path("/usr/share/signify-openbsd-keys")
# Where the host may have release keys, in the order they are looked at.
HOST_KEY_DIRS = (DEBIAN_KEYS, Path("/etc/signify"))
# The packages the mail server needs on top of base (OpenSMTPD is in base); quirks first, as
# pkg_add itself wants it.
PACKAGES = ("quirks", "dovecot", "dovecot-pigeonhole", "rspamd", "opensmtpd-filter-rspamd", "redis")
SHA_LINE = re.compile(r"^SHA256 \((?P<name>[^)/]+)\) = (?P<hex>[0-9a-f]{64})$")


class OpenBSDSetError(BuildError):
    """A release file could not be fetched or verified; the message names the file."""


class SetFetchError(OpenBSDSetError):
    pass


class SetVerifyError(OpenBSDSetError):
    pass


def short_version(version: str) -> str:
    """'7.8' -> '78', as in base78.tgz and openbsd-78-base.pub."""
    major, minor = version.split(".")
    return f"{major}{minor}"


def set_names(version: str) -> list[str]:
    """The sets a mail server installs: kernels, base, man. No compilers, no X, no games."""
    v = short_version(version)
    return ["bsd", "bsd.mp", "bsd.rd", f"base{v}.tgz", f"man{v}.tgz", "BUILDINFO"]


BOOT_FILES = ["pxeboot", "bsd.rd"]


def _signify() -> str:
    exe = shutil.which(SIGNIFY)
    if not exe:
        raise ToolMissing(SIGNIFY, "signify-openbsd")
    return exe


@dataclass(frozen=True)
class ReleaseKey:
    path: Path
    source: str     # where it came from, for the manifest: see find_release_key


def release_key(version: str, kind: str = "base", key_file: str | Path | None = None,
                debian_mirror: str | None = None, log=None) -> Path:
    """The path of the signify public key for `version`; see find_release_key."""
    return find_release_key(version, kind, key_file, debian_mirror, log).path


def find_release_key(version: str, kind: str = "base", key_file: str | Path | None = None,
                     debian_mirror: str | None = None, log=None) -> ReleaseKey:
    """The signify public key for `version` ('base' for sets, 'pkg' for packages), looked for in
    this order:

    1. the key the user names (openbsd.signify_key, resolved by the caller) for the sets; the
       package key beside it (the same name with -pkg instead of -base);
    2. the host's signify-openbsd-keys package (DEBIAN_KEYS), then /etc/signify;
    3. Debian trixie's signify-openbsd-keys .deb, fetched and verified from `debian_mirror` (the
       site's debian.mirror), else the Debian mirror of the host's apt sources
       (builder.openbsd.debkeys).
    The error names the version, the key file and everything tried."""
    name = f"openbsd-{short_version(version)}-{kind}.pub"
    candidates: list[tuple[Path, str]] = []
    if key_file:
        key_file = Path(key_file)
        if kind == "base":
            candidates.append((key_file, "site file (openbsd.signify_key)"))
        elif key_file.name.endswith("-base.pub"):
            candidates.append((key_file.with_name(key_file.name[: -len("base.pub")] + f"{kind}.pub"),
                               "site file (beside openbsd.signify_key)"))
    candidates += [(d / name, f"host ({d})") for d in HOST_KEY_DIRS]
    for path, source in candidates:
        if path.is_file():
            return ReleaseKey(path, source)
    tried = [f"{path}: not there" for path, _ in candidates]
    from . import debkeys
    from ..hostinfo import host_debian_mirror
    mirror = debian_mirror or host_debian_mirror()
    what = f"Debian {debkeys.SUITE}'s {debkeys.PACKAGE} package"
    if not mirror:
        tried.append(f"{what}: no Debian mirror (set debian.mirror in the site file or configure "
                     f"one in the host's apt sources)")
    else:
        try:
            got = debkeys.fetch_key(name, mirror, log=log or (lambda _: None))
            return ReleaseKey(got.path, got.source)
        except MkMailImageError as e:        # the chain failed, gpgv missing, not in the package
            where = "the site's debian.mirror" if debian_mirror else "the host's Debian mirror"
            tried.append(f"{what} from {where}: {e}")
    raise OpenBSDSetError(
        f"no signify key {name} for OpenBSD {version}; tried: {'; '.join(tried)}. Install a "
        f"signify-openbsd-keys package that ships {name}, or name the key file in openbsd.signify_key "
        f"in the site file (the -pkg key beside it)")


# -- sources -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """Where `<version>/amd64` and `<version>/packages/amd64` live: a URL or a directory."""
    sets: str            # URL ending in / or a directory path
    packages: str
    is_dir: bool


def source_for(version: str, mirror: str | None = None, sets_dir: str | Path | None = None) -> Source:
    if sets_dir:
        d = Path(sets_dir).resolve()
        if not d.is_dir():
            raise OpenBSDSetError(f"openbsd.sets_dir: {d} is not a directory")
        return Source(str(d), str(d.parent / "packages" / ARCH), True)
    if not mirror:
        raise OpenBSDSetError("no OpenBSD source: set openbsd.mirror (a mirror URL) or "
                              "openbsd.sets_dir (a local copy of the release) in the site file")
    base = mirror.rstrip("/")
    tail = f"/{version}/{ARCH}"
    if base.endswith(tail):
        base = base[: -len(tail)]
    return Source(f"{base}{tail}/", f"{base}/{version}/packages/{ARCH}/", False)


def _read(location: str, is_dir: bool, name: str, timeout: int = 60):
    """Open a file of the source for reading; SetFetchError names it when it is not there."""
    try:
        if is_dir:
            return open(location, "rb")
        return urllib.request.urlopen(location, timeout=timeout)
    except (OSError, urllib.error.URLError, ValueError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise SetFetchError(f"{name}: cannot fetch {location}: {reason}") from None


# -- cache -------------------------------------------------------------------------------------

def blobs_dir() -> Path:
    d = paths.cache_dir() / "openbsd" / "blobs"
    d.mkdir(parents=True, exist_ok=True)
    return d



def _download(location: str, is_dir: bool, name: str) -> tuple[Path, str]:
    """Copy one file into the cache under a temporary name; return (temp path, sha256)."""
    fd, tmp = tempfile.mkstemp(prefix=".dl.", dir=blobs_dir())
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, _read(location, is_dir, name) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):  # the connection broke mid-transfer
            raise SetFetchError(f"{name}: download from {location} failed: {e}") from None
        raise
    return Path(tmp), h.hexdigest()


def fetch_expected(location: str, is_dir: bool, name: str, expected: str, use_cache: bool = True) -> Path:
    """The cached blob of `name` with sha256 `expected`, downloading it if absent or damaged
    (or always, with use_cache=False). Refuses (SetVerifyError naming the file) when the
    downloaded content has another hash."""
    blob = blobs_dir() / expected
    if use_cache and blob.is_file() and sha256_file(blob) == expected:
        return blob
    tmp, got = _download(location, is_dir, name)
    if got != expected:
        tmp.unlink()
        raise SetVerifyError(f"{name}: sha256 {got} does not match the signed SHA256 ({expected}); "
                             f"refusing {location}")
    os.replace(tmp, blob)
    return blob


def fetch_any(location: str, is_dir: bool, name: str) -> Path:
    """Fetch a file we cannot know the hash of in advance (SHA256.sig) into the cache."""
    tmp, got = _download(location, is_dir, name)
    blob = blobs_dir() / got
    os.replace(tmp, blob)
    return blob


# -- signify -----------------------------------------------------------------------------------

def verify_signature(sig: Path, key: Path, what: str = "SHA256.sig") -> dict[str, str]:
    """Check `sig` with `key` (signify -V -e) and return its signed {file name: sha256}."""
    with tempfile.TemporaryDirectory(prefix="mkmailimage-signify-") as tmp:
        msg = Path(tmp) / "SHA256"
        r = subprocess.run([_signify(), "-V", "-e", "-p", str(key), "-x", str(sig), "-m", str(msg)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SetVerifyError(f"{what}: signature check with {key} failed: "
                                 f"{(r.stderr or r.stdout).strip()}")
        return parse_sha256(msg.read_text(), what)


def parse_sha256(text: str, what: str = "SHA256") -> dict[str, str]:
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = SHA_LINE.match(line.strip())
        if not m:
            raise SetVerifyError(f"{what}: line {n} is not a 'SHA256 (file) = hex' line: {line[:80]!r}")
        out[m["name"]] = m["hex"]
    return out


def check_with_signify(directory: Path, key: Path, names: list[str]) -> None:
    """The real tool's verdict over staged files: `signify -C -p KEY -x SHA256.sig NAMES`."""
    r = subprocess.run([_signify(), "-C", "-p", str(key), "-x", "SHA256.sig", *names],
                       cwd=directory, capture_output=True, text=True)
    if r.returncode != 0:
        failed = [ln.split(":")[0] for ln in (r.stdout + r.stderr).splitlines() if ln.rstrip().endswith("FAIL")]
        detail = (r.stderr or r.stdout).strip()
        raise SetVerifyError(f"{', '.join(failed) or 'SHA256.sig'}: signify -C refused "
                             f"{directory}: {detail}")


# -- releases ----------------------------------------------------------------------------------

@dataclass
class Verified:
    """Verified files staged (hard links into the cache) in one directory with their SHA256.sig."""
    directory: Path
    files: dict[str, str] = field(default_factory=dict)   # name -> sha256


def stage(base: str, is_dir: bool, key: Path, names: list[str], out: Path, what: str,
          use_cache: bool = True) -> Verified:
    """Fetch `names` from `base` into `out` (+ SHA256.sig), every one checked; refuse otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    sig_blob, table = signed_table(base, is_dir, key, what)
    _link(sig_blob, out / "SHA256.sig")
    result = Verified(out)
    for name in names:
        expected = table.get(name)
        if expected is None:
            raise SetVerifyError(f"{what}/{name}: not listed in the signed SHA256; refusing to use it")
        blob = fetch_expected(_join(base, is_dir, name), is_dir, f"{what}/{name}", expected, use_cache)
        _link(blob, out / name)
        result.files[name] = expected
    check_with_signify(out, key, names)
    return result


def _join(base: str, is_dir: bool, name: str) -> str:
    return os.path.join(base, name) if is_dir else base + name


def _link(blob: Path, dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    try:
        os.link(blob, dest)
    except OSError:
        shutil.copyfile(blob, dest)


def signed_table(base: str, is_dir: bool, key: Path, what: str) -> tuple[Path, dict[str, str]]:
    sig_blob = fetch_any(_join(base, is_dir, "SHA256.sig"), is_dir, f"{what}/SHA256.sig")
    return sig_blob, verify_signature(sig_blob, key, f"{what}/SHA256.sig")


# -- packages ----------------------------------------------------------------------------------

PKG_FILE = re.compile(r"^(?P<stem>.+?)-(?P<version>[0-9][^-]*)(?P<flavor>(-[a-z][^-]*)*)\.tgz$")


def pick_package(stem: str, available: list[str]) -> str:
    """The unflavoured package file for `stem` ('dovecot' -> 'dovecot-2.3.21.1p0v0.tgz')."""
    matches = [n for n in available if (m := PKG_FILE.match(n)) and m["stem"] == stem and not m["flavor"]]
    if not matches:
        raise OpenBSDSetError(f"package {stem}: no unflavoured {stem}-<version>.tgz in the signed "
                              f"packages SHA256")
    return sorted(matches)[-1]


def package_depends(pkg: Path) -> list[str]:
    """Default package names of the `@depend` lines in the package's +CONTENTS."""
    try:
        with tarfile.open(pkg, "r:gz") as t:
            member = t.next()
            if member is None or member.name != "+CONTENTS":
                raise OpenBSDSetError(f"{pkg.name}: first member is not +CONTENTS; not an OpenBSD package")
            text = t.extractfile(member).read().decode("utf-8", "replace")
    except (tarfile.TarError, OSError) as e:
        raise OpenBSDSetError(f"{pkg.name}: cannot read package: {e}") from None
    deps = []
    for line in text.splitlines():
        if line.startswith("@depend "):
            # @depend pkgpath:spec:default-pkgname
            deps.append(line.split(" ", 1)[1].rsplit(":", 1)[-1].strip())
    return deps


def verify_package_signature(pkg: Path, key: Path, name: str) -> None:
    """pkg_add's own check, on the host: the signature embedded in the gzip header (signify -z)."""
    r = subprocess.run([_signify(), "-V", "-z", "-q", "-p", str(key), "-x", str(pkg), "-m", "/dev/null"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SetVerifyError(f"{name}: embedded package signature check with {key} failed: "
                             f"{(r.stderr or r.stdout).strip()}")


def stage_packages(src: Source, key: Path, wanted: tuple[str, ...], out: Path,
                   use_cache: bool = True) -> list[str]:
    """Fetch the wanted packages and their dependency closure into `out`, each one checked
    against the signed packages SHA256. Returns package file names, dependencies first."""
    out.mkdir(parents=True, exist_ok=True)
    sig_blob, table = signed_table(src.packages, src.is_dir, key, "packages")
    _link(sig_blob, out / "SHA256.sig")
    order: list[str] = []
    seen: set[str] = set()

    def visit(filename: str, chain: tuple[str, ...]) -> None:
        if filename in seen:
            return
        seen.add(filename)
        expected = table.get(filename)
        if expected is None:
            raise SetVerifyError(f"packages/{filename} (needed by {' <- '.join(chain) or 'the build'}): "
                                 f"not listed in the signed packages SHA256")
        blob = fetch_expected(_join(src.packages, src.is_dir, filename), src.is_dir,
                              f"packages/{filename}", expected, use_cache)
        verify_package_signature(blob, key, f"packages/{filename}")
        for dep in package_depends(blob):
            visit(dep + ".tgz", (filename,) + chain)
        _link(blob, out / filename)
        order.append(filename)

    for stem in wanted:
        visit(pick_package(stem, list(table)), ())
    check_with_signify(out, key, order)
    return order
