"""OpenBSD release verification with the real signify-openbsd: keys made in the test with
`signify-openbsd -G`, a release directory signed with `-S -e` (sets) and `-S -z` (packages),
served from a local directory and over HTTP (builder.httpserve)."""
from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from builder.httpserve import FileServer
from builder.openbsd import sets

VERSION = "7.8"
SETS = ["pxeboot", "bsd", "bsd.mp", "bsd.rd", "base78.tgz", "man78.tgz", "BUILDINFO"]


def signify(*args, cwd=None):
    subprocess.run(["signify-openbsd", *args], check=True, cwd=cwd, capture_output=True)


def keypair(d: Path, name: str) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    pub, sec = d / f"{name}.pub", d / f"{name}.sec"
    signify("-G", "-n", "-p", str(pub), "-s", str(sec))
    return pub, sec


def sign_dir(d: Path, sec: Path, names: list[str]) -> None:
    lines = [f"SHA256 ({n}) = {hashlib.sha256((d / n).read_bytes()).hexdigest()}" for n in names]
    (d / "SHA256").write_text("\n".join(lines) + "\n")
    signify("-S", "-e", "-s", str(sec), "-m", str(d / "SHA256"), "-x", str(d / "SHA256.sig"))
    (d / "SHA256").unlink()


def package(d: Path, name: str, depends: list[str], sec: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        contents = f"@name {name}\n" + "".join(f"@depend x/{dep.split('-')[0]}:{dep.split('-')[0]}-*:{dep}\n"
                                                for dep in depends)
        info = tarfile.TarInfo("+CONTENTS")
        info.size = len(contents)
        t.addfile(info, io.BytesIO(contents.encode()))
    plain = d / f".{name}.tgz"
    plain.write_bytes(gzip.compress(raw.getvalue()))
    signify("-S", "-z", "-s", str(sec), "-m", str(plain), "-x", str(d / f"{name}.tgz"))
    plain.unlink()


@pytest.fixture
def release(tmp_path, monkeypatch):
    monkeypatch.setenv("MKMAILIMAGE_CACHE", str(tmp_path / "cache"))
    return signed_release(tmp_path)


def signed_release(tmp_path: Path) -> dict:
    """A release under tmp_path/mirror signed with keys made here (signify -G): the sets plus
    INSTALL.amd64 (-S -e), and packages with dependencies, each signed with -S -z."""
    keys = tmp_path / "keys"
    base_pub, base_sec = keypair(keys, "openbsd-78-base")
    pkg_pub, pkg_sec = keypair(keys, "openbsd-78-pkg")
    top = tmp_path / "mirror" / "pub" / "OpenBSD"
    d = top / VERSION / "amd64"
    d.mkdir(parents=True)
    for n in SETS + ["INSTALL.amd64"]:
        (d / n).write_bytes(f"{n} contents\n".encode() * 100)
    sign_dir(d, base_sec, SETS + ["INSTALL.amd64"])
    p = top / VERSION / "packages" / "amd64"
    p.mkdir(parents=True)
    for name, deps in [("quirks-7.103", []), ("lua-5.3.6p2", []), ("redis-7.2.5", []),
                       ("rspamd-3.10.0", ["lua-5.3.6p2"]), ("rspamd-3.10.0-hyperscan", ["lua-5.3.6p2"]),
                       ("dovecot-2.3.21.1p0v0", []), ("dovecot-pigeonhole-0.5.21.1v1", ["dovecot-2.3.21.1p0v0"]),
                       ("opensmtpd-filter-rspamd-0.1.8p0", [])]:
        package(p, name, deps, pkg_sec)
    sign_dir(p, pkg_sec, sorted(f.name for f in p.iterdir()))
    return dict(top=top, sets=d, packages=p, key=base_pub, pkg_key=pkg_pub, tmp=tmp_path,
                base_sec=base_sec)


def test_good_release_from_a_directory(release):
    src = sets.source_for(VERSION, sets_dir=release["sets"])
    out = release["tmp"] / "served"
    v = sets.stage(src.sets, src.is_dir, release["key"], SETS, out, "sets")
    assert sorted(v.files) == sorted(SETS)
    for n in SETS:
        assert (out / n).read_bytes() == (release["sets"] / n).read_bytes()
        assert (Path(str(sets.blobs_dir())) / v.files[n]).exists()   # content-addressed cache
    assert (out / "SHA256.sig").exists()


def test_good_release_over_http_and_packages_with_dependencies(release):
    with FileServer(release["top"].parent.parent) as srv:
        src = sets.source_for(VERSION, mirror=f"http://127.0.0.1:{srv.port}/pub/OpenBSD")
        v = sets.stage(src.sets, src.is_dir, release["key"], ["bsd.rd", "base78.tgz"],
                       release["tmp"] / "s", "sets")
        order = sets.stage_packages(src, release["pkg_key"], sets.PACKAGES, release["tmp"] / "p")
    assert set(v.files) == {"bsd.rd", "base78.tgz"}
    assert order == ["quirks-7.103.tgz", "dovecot-2.3.21.1p0v0.tgz", "dovecot-pigeonhole-0.5.21.1v1.tgz",
                     "lua-5.3.6p2.tgz", "rspamd-3.10.0.tgz", "opensmtpd-filter-rspamd-0.1.8p0.tgz",
                     "redis-7.2.5.tgz"]
    assert not (release["tmp"] / "p" / "rspamd-3.10.0-hyperscan.tgz").exists()


def test_mirror_url_may_name_the_arch_directory(release):
    src = sets.source_for(VERSION, mirror="https://m.example.net/pub/OpenBSD/7.8/amd64/")
    assert src.sets == "https://m.example.net/pub/OpenBSD/7.8/amd64/"
    assert src.packages == "https://m.example.net/pub/OpenBSD/7.8/packages/amd64/"


def test_tampered_set_is_refused_by_name(release):
    with open(release["sets"] / "base78.tgz", "ab") as f:
        f.write(b"evil")
    src = sets.source_for(VERSION, sets_dir=release["sets"])
    with pytest.raises(sets.SetVerifyError, match=r"sets/base78\.tgz: sha256 .* does not match"):
        sets.stage(src.sets, src.is_dir, release["key"], SETS, release["tmp"] / "served", "sets")
    assert not (release["tmp"] / "served" / "base78.tgz").exists()


def test_wrong_key_is_refused(release):
    other_pub, _ = keypair(release["tmp"] / "other", "openbsd-78-base")
    src = sets.source_for(VERSION, sets_dir=release["sets"])
    with pytest.raises(sets.SetVerifyError, match=r"sets/SHA256\.sig: signature check with .* failed"):
        sets.stage(src.sets, src.is_dir, other_pub, SETS, release["tmp"] / "served", "sets")


def test_file_missing_from_the_signed_list_is_refused(release):
    (release["sets"] / "comp78.tgz").write_bytes(b"not signed")
    src = sets.source_for(VERSION, sets_dir=release["sets"])
    with pytest.raises(sets.SetVerifyError, match=r"sets/comp78\.tgz: not listed in the signed SHA256"):
        sets.stage(src.sets, src.is_dir, release["key"], ["comp78.tgz"], release["tmp"] / "x", "sets")


def test_damaged_cache_entry_is_fetched_again(release):
    src = sets.source_for(VERSION, sets_dir=release["sets"])
    v = sets.stage(src.sets, src.is_dir, release["key"], ["bsd"], release["tmp"] / "a", "sets")
    blob = sets.blobs_dir() / v.files["bsd"]
    (release["tmp"] / "a" / "bsd").unlink()           # drop the hard link, then damage the blob
    blob.write_bytes(b"bit rot")
    sets.stage(src.sets, src.is_dir, release["key"], ["bsd"], release["tmp"] / "b", "sets")
    assert (release["tmp"] / "b" / "bsd").read_bytes() == (release["sets"] / "bsd").read_bytes()


def test_signify_check_names_a_staged_file_changed_after_fetch(release):
    src = sets.source_for(VERSION, sets_dir=release["sets"])
    out = release["tmp"] / "served"
    sets.stage(src.sets, src.is_dir, release["key"], ["bsd", "bsd.rd"], out, "sets")
    (out / "bsd.rd").unlink()
    (out / "bsd.rd").write_bytes(b"swapped")
    with pytest.raises(sets.SetVerifyError, match=r"^bsd\.rd: signify -C refused"):
        sets.check_with_signify(out, release["key"], ["bsd", "bsd.rd"])


def test_unsigned_package_is_refused(release):
    p = release["packages"]
    (p / "redis-7.2.5.tgz").write_bytes(gzip.compress(b"unsigned"))
    _, pkg_sec = release["pkg_key"], release["tmp"] / "keys" / "openbsd-78-pkg.sec"
    sign_dir(p, pkg_sec, sorted(f.name for f in p.iterdir() if f.suffix == ".tgz"))
    src = sets.source_for(VERSION, sets_dir=release["sets"])
    with pytest.raises(sets.SetVerifyError, match=r"packages/redis-7\.2\.5\.tgz: embedded package signature"):
        sets.stage_packages(src, release["pkg_key"], ("redis",), release["tmp"] / "p")


def test_missing_key_names_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr("builder.hostinfo.host_debian_mirror", lambda: None)   # no fetch (test_openbsd_keys)
    with pytest.raises(sets.OpenBSDSetError, match="openbsd.signify_key"):
        sets.release_key("9.9", key_file=tmp_path / "nope.pub")
    named = tmp_path / "openbsd-99-base.pub"
    named.write_text("untrusted comment: test\nRWQ=\n")
    assert sets.release_key("9.9", key_file=named) == named


def test_package_key_is_looked_for_beside_a_named_base_key(tmp_path, monkeypatch):
    monkeypatch.setattr("builder.hostinfo.host_debian_mirror", lambda: None)
    base = tmp_path / "openbsd-99-base.pub"
    pkg = tmp_path / "openbsd-99-pkg.pub"
    for k in (base, pkg):
        k.write_text("untrusted comment: test\nRWQ=\n")
    assert sets.release_key("9.9", "pkg", base) == pkg
    odd = tmp_path / "mykey.pub"
    odd.write_text("x\n")
    with pytest.raises(sets.OpenBSDSetError, match="openbsd-99-pkg.pub"):
        sets.release_key("9.9", "pkg", odd)      # never the base key for packages


def test_no_cache_fetches_again(release):
    src = sets.source_for(VERSION, sets_dir=release["sets"])
    v = sets.stage(src.sets, src.is_dir, release["key"], ["bsd"], release["tmp"] / "a", "sets")
    blob = sets.blobs_dir() / v.files["bsd"]
    before = blob.stat().st_ino
    sets.stage(src.sets, src.is_dir, release["key"], ["bsd"], release["tmp"] / "b", "sets")
    assert blob.stat().st_ino == before                 # cached copy reused
    sets.stage(src.sets, src.is_dir, release["key"], ["bsd"], release["tmp"] / "c", "sets", use_cache=False)
    assert blob.stat().st_ino != before                 # downloaded and checked again
