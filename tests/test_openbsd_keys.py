"""Where the OpenBSD release keys come from: the site's key, the host's signify-openbsd-keys,
/etc/signify, and else Debian trixie's signify-openbsd-keys .deb fetched through the verified
archive chain (builder.openbsd.debkeys, builder.debian.archive).

The fetch tests download from the build host's Debian mirror (skipped when its apt sources name
none) and check the real chain: gpgv over InRelease, the sha256 of Packages.xz, the sha256 of the
.deb. Signatures are checked with the real signify-openbsd and keys it generates here.
"""
from __future__ import annotations

import hashlib
import lzma
import subprocess
from pathlib import Path

import pytest

from builder.debian import archive
from builder.hostinfo import host_debian_mirror
from builder.httpserve import FileServer
from builder.openbsd import debkeys, sets

HOST_MIRROR = host_debian_mirror()
needs_mirror = pytest.mark.skipif(not HOST_MIRROR, reason="the build host's apt sources name no Debian mirror")


def signify(*args, cwd=None):
    return subprocess.run(["signify-openbsd", *args], check=True, cwd=cwd, capture_output=True)


def keypair(d: Path, name: str) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    pub, sec = d / f"{name}.pub", d / f"{name}.sec"
    signify("-G", "-n", "-p", str(pub), "-s", str(sec))
    return pub, sec


def signed_sha256(d: Path, sec: Path) -> tuple[Path, str]:
    """SHA256.sig (signify -S -e) over one file made here; returns (sig, that file's sha256)."""
    (d / "bsd.rd").write_bytes(b"a ramdisk kernel\n" * 100)
    digest = hashlib.sha256((d / "bsd.rd").read_bytes()).hexdigest()
    (d / "SHA256").write_text(f"SHA256 (bsd.rd) = {digest}\n")
    signify("-S", "-e", "-s", str(sec), "-m", str(d / "SHA256"), "-x", str(d / "SHA256.sig"))
    return d / "SHA256.sig", digest


# -- the trixie package, really fetched --------------------------------------------------------

@pytest.fixture(scope="module")
def trixie(tmp_path_factory):
    if not HOST_MIRROR:
        pytest.skip("the build host's apt sources name no Debian mirror")
    cache = tmp_path_factory.mktemp("keys-cache")
    said: list[str] = []
    base = debkeys.fetch_key("openbsd-78-base.pub", HOST_MIRROR, cache=cache, log=said.append)
    return cache, base, said


def test_trixie_package_is_verified_and_ships_the_78_keys(trixie):
    cache, base, said = trixie
    deb = archive.blob_path(cache, base.deb_sha256)
    assert archive.file_sha256(deb) == base.deb_sha256            # the .deb the signed index named
    assert base.path.name == "openbsd-78-base.pub"
    assert base.path.parent.name == hashlib.sha256(base.path.read_bytes()).hexdigest()   # content-addressed
    assert base.path.read_text().startswith("untrusted comment: openbsd 7.8 base public key\n")
    assert base.source.startswith(f"Debian trixie signify-openbsd-keys {base.package_version} (.deb sha256 ")
    assert any("openbsd-78-base.pub from trixie's signify-openbsd-keys" in s for s in said)
    pkg = debkeys.fetch_key("openbsd-78-pkg.pub", HOST_MIRROR, cache=cache)
    assert pkg.path.read_text().startswith("untrusted comment: OpenBSD 7.8 packages public key\n")
    assert pkg.deb_sha256 == base.deb_sha256


def test_fetched_key_is_a_real_signify_key_that_refuses_a_foreign_signature(trixie, tmp_path):
    _, base, _ = trixie
    _, sec = keypair(tmp_path / "k", "openbsd-78-base")
    sig, _ = signed_sha256(tmp_path, sec)
    with pytest.raises(sets.SetVerifyError, match="signature check with .*openbsd-78-base.pub failed"):
        sets.verify_signature(sig, base.path)


def test_damaged_cached_deb_is_detected_and_fetched_again(trixie):
    cache, base, _ = trixie
    deb = archive.blob_path(cache, base.deb_sha256)
    data = bytearray(deb.read_bytes())
    data[len(data) // 2] ^= 0xFF
    deb.write_bytes(bytes(data))
    said: list[str] = []
    again = debkeys.fetch_key("openbsd-78-base.pub", HOST_MIRROR, cache=cache, log=said.append)
    assert any("does not match its sha256" in s for s in said)
    assert archive.file_sha256(deb) == base.deb_sha256
    assert again.path.read_bytes() == base.path.read_bytes()


def test_damaged_cached_key_is_written_again_from_the_deb(trixie):
    cache, base, _ = trixie
    good = base.path.read_bytes()
    base.path.write_text("untrusted comment: not the key\nRWQ=\n")
    again = debkeys.fetch_key("openbsd-78-base.pub", HOST_MIRROR, cache=cache)
    assert again.path == base.path and again.path.read_bytes() == good


def test_key_missing_from_the_package_is_named(trixie):
    cache, _, _ = trixie
    with pytest.raises(debkeys.DebianKeyError,
                       match=r"does not ship usr/share/signify-openbsd-keys/openbsd-99-base\.pub"):
        debkeys.fetch_key("openbsd-99-base.pub", HOST_MIRROR, cache=cache)


@pytest.fixture
def fake_mirror(tmp_path):
    """A local mirror holding trixie's real signed InRelease."""
    if not HOST_MIRROR:
        pytest.skip("the build host's apt sources name no Debian mirror")
    dists = tmp_path / "mirror" / "debian" / "dists" / "trixie"
    (dists / "main" / "binary-amd64").mkdir(parents=True)
    (dists / "InRelease").write_bytes(archive._download_bytes(f"{HOST_MIRROR}/dists/trixie/InRelease"))
    return tmp_path / "mirror", dists


def test_packages_index_not_matching_the_signed_inrelease_is_refused(fake_mirror, tmp_path):
    root, dists = fake_mirror
    stanza = ("Package: signify-openbsd-keys\nVersion: 9999\nArchitecture: all\n"
              "Filename: pool/main/s/signify-openbsd-keys/evil.deb\nSize: 3\nSHA256: " + "0" * 64 + "\n")
    (dists / "main" / "binary-amd64" / "Packages.xz").write_bytes(lzma.compress(stanza.encode()))
    with FileServer(root) as srv:
        with pytest.raises(archive.ArchiveVerifyError,
                           match=r"binary-amd64/Packages\.xz: got .* the signed index says"):
            debkeys.fetch_key("openbsd-78-base.pub", f"http://127.0.0.1:{srv.port}/debian", cache=tmp_path / "c")
    assert not list((tmp_path / "c").glob("openbsd/keys/*/*"))      # no key taken


def test_tampered_inrelease_is_refused(fake_mirror, tmp_path):
    root, dists = fake_mirror
    text = (dists / "InRelease").read_bytes()
    (dists / "InRelease").write_bytes(text.replace(b"Codename: trixie", b"Codename: trixiE", 1))
    with FileServer(root) as srv:
        with pytest.raises(archive.ArchiveVerifyError, match="InRelease: signature not valid"):
            debkeys.fetch_key("openbsd-78-base.pub", f"http://127.0.0.1:{srv.port}/debian", cache=tmp_path / "c")


def test_trixie_release_lists_arch_all_packages_per_architecture():
    """trixie's Release says `No-Support-for-Architecture-all: Packages`: only binary-amd64 is
    read (binary-all/Packages.xz need not match its signed hash on a mirror)."""
    release = archive.parse_release(
        "Codename: trixie\nNo-Support-for-Architecture-all: Packages\nSHA256:\n"
        f" {'1' * 64} 10 main/binary-all/Packages.xz\n {'2' * 64} 20 main/binary-amd64/Packages.xz\n")
    assert archive.packages_indexes(release) == ["main/binary-amd64/Packages.xz"]


# -- reading a .deb ----------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["xz", "gzip", "zstd", "none"])
def test_key_is_read_from_a_deb_built_by_dpkg_deb(tmp_path, compression):
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text("Package: signify-openbsd-keys\nVersion: 1\nArchitecture: all\n"
                                            "Maintainer: t <t@example.org>\nDescription: test\n")
    keys = pkg / debkeys.KEY_DIR
    keys.mkdir(parents=True)
    (keys / "openbsd-99-base.pub").write_text("untrusted comment: test\nRWQ=\n")
    deb = tmp_path / "k.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "-b", str(pkg), str(deb)],
                   check=True, capture_output=True)
    assert debkeys.deb_member(deb, f"{debkeys.KEY_DIR}/openbsd-99-base.pub") == b"untrusted comment: test\nRWQ=\n"
    assert debkeys.deb_member(deb, f"{debkeys.KEY_DIR}/openbsd-99-pkg.pub") is None


def test_not_a_deb_is_named(tmp_path):
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(debkeys.DebianKeyError, match="bad.deb: not an ar archive"):
        debkeys.deb_member(bad, "x")


# -- lookup order ------------------------------------------------------------------------------

@pytest.fixture
def places(tmp_path, monkeypatch):
    """Empty stand-ins for the host's key directories, a mirror, and a recording fetcher."""
    usr, etc = tmp_path / "usr-share-signify-openbsd-keys", tmp_path / "etc-signify"
    usr.mkdir()
    etc.mkdir()
    monkeypatch.setattr(sets, "HOST_KEY_DIRS", (usr, etc))
    monkeypatch.setattr("builder.hostinfo.host_debian_mirror", lambda: "http://mirror.invalid/debian")
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    calls: list[tuple[str, str]] = []

    def fetch_key(name, mirror, log=None, **_):
        calls.append((name, mirror))
        if not (fetched / name).exists():
            raise debkeys.DebianKeyError(f"trixie's signify-openbsd-keys 1 does not ship {debkeys.KEY_DIR}/{name}")
        return debkeys.FetchedKey(fetched / name, "1", "f" * 64)

    monkeypatch.setattr(debkeys, "fetch_key", fetch_key)
    return dict(usr=usr, etc=etc, fetched=fetched, site=tmp_path / "site", calls=calls)


def put(d: Path, name: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(f"untrusted comment: {d.name}\nRWQ=\n")
    return d / name


def test_lookup_order_site_then_host_package_then_etc_then_trixie(places):
    name = "openbsd-78-base.pub"
    for d in ("fetched", "etc", "usr"):
        put(places[d], name)
    site_key = put(places["site"], name)
    k = sets.find_release_key("7.8", "base", site_key)
    assert (k.path, k.source) == (site_key, "site file (openbsd.signify_key)")
    k = sets.find_release_key("7.8", "base", None)
    assert (k.path, k.source) == (places["usr"] / name, f"host ({places['usr']})")
    (places["usr"] / name).unlink()
    k = sets.find_release_key("7.8", "base", None)
    assert (k.path, k.source) == (places["etc"] / name, f"host ({places['etc']})")
    assert places["calls"] == []                                   # nothing fetched so far
    (places["etc"] / name).unlink()
    k = sets.find_release_key("7.8", "base", None)
    assert k.path == places["fetched"] / name
    assert k.source == f"Debian trixie signify-openbsd-keys 1 (.deb sha256 {'f' * 64})"
    assert places["calls"] == [(name, "http://mirror.invalid/debian")]


def test_site_debian_mirror_is_used_for_the_fetch(places):
    put(places["fetched"], "openbsd-78-pkg.pub")
    sets.find_release_key("7.8", "pkg", None, "http://site-mirror.invalid/debian")
    assert places["calls"] == [("openbsd-78-pkg.pub", "http://site-mirror.invalid/debian")]


def test_package_key_beside_the_site_key_comes_first(places):
    site_key = put(places["site"], "openbsd-78-base.pub")
    put(places["usr"], "openbsd-78-pkg.pub")
    k = sets.find_release_key("7.8", "pkg", site_key)
    assert k.source == f"host ({places['usr']})"                    # none beside the site key
    beside = put(places["site"], "openbsd-78-pkg.pub")
    k = sets.find_release_key("7.8", "pkg", site_key)
    assert (k.path, k.source) == (beside, "site file (beside openbsd.signify_key)")


def test_no_key_anywhere_names_version_key_file_and_everything_tried(places):
    with pytest.raises(sets.OpenBSDSetError) as e:
        sets.find_release_key("7.8", "base", places["site"] / "missing.pub")
    msg = str(e.value)
    assert msg.startswith("no signify key openbsd-78-base.pub for OpenBSD 7.8; tried: ")
    for tried in (f"{places['site'] / 'missing.pub'}: not there",
                  f"{places['usr'] / 'openbsd-78-base.pub'}: not there",
                  f"{places['etc'] / 'openbsd-78-base.pub'}: not there",
                  "Debian trixie's signify-openbsd-keys package from the host's Debian mirror: trixie's "
                  "signify-openbsd-keys 1 does not ship usr/share/signify-openbsd-keys/openbsd-78-base.pub"):
        assert tried in msg
    assert "openbsd.signify_key" in msg


def test_no_debian_mirror_is_said(places, monkeypatch):
    monkeypatch.setattr("builder.hostinfo.host_debian_mirror", lambda: None)
    with pytest.raises(sets.OpenBSDSetError, match="signify-openbsd-keys package: no Debian mirror"):
        sets.find_release_key("7.8", "pkg", None)
    assert places["calls"] == []


def test_site_key_made_here_verifies_with_real_signify(places, tmp_path):
    """signify -V with a key generated here, found as the site's key, still passes; the same
    SHA256.sig under another key of the same name refuses."""
    pub, sec = keypair(places["site"], "openbsd-78-base")
    sig, digest = signed_sha256(tmp_path, sec)
    k = sets.find_release_key("7.8", "base", pub)
    assert k.source == "site file (openbsd.signify_key)"
    assert sets.verify_signature(sig, k.path) == {"bsd.rd": digest}
    other, _ = keypair(places["usr"], "openbsd-78-base")
    with pytest.raises(sets.SetVerifyError, match="signature check with .* failed"):
        sets.verify_signature(sig, sets.find_release_key("7.8", "base", None).path)
