"""Reproducible builds: the lock file and two bit-identical `build debian --locked` images.

The build test is slow (two real builds: mmdebstrap layer from the shared cache, disk assembly
and qcow2 export each time) and needs root and the build host's Debian mirror. When the two
images differ, the failure message IS `mkmailimage diff` of the two images."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder import lock as lk
from builder.hostinfo import host_debian_mirror
from builder.initsite import init_site

MKMAILIMAGE = [sys.executable, "-m", "builder.cli"]
ROOT = Path(__file__).resolve().parent.parent

needs_mirror = pytest.mark.skipif(host_debian_mirror() is None, reason="no Debian mirror in the host's apt sources")


def cli(*argv, cwd=None, env=None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([*MKMAILIMAGE, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if check and p.returncode != 0:
        pytest.fail(f"mkmailimage {' '.join(map(str, argv))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def sha256(path: Path) -> str:
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


# ---------------------------------------------------------------- lock files, fast

def write_lock(site_path: Path, packages: dict, **extra) -> Path:
    data = {"format": lk.FORMAT, "epoch": 1754697600, "seeds": {"seed": "mail.a.test"},
            "debian": {"suite": "trixie", "packages": packages}, **extra}
    path = lk.lock_path(site_path)
    path.write_text(lk.dumps(data))
    return path


def pkg(name: str, version: str, arch: str = "amd64", sha: str = "0" * 64) -> dict:
    return {f"{name}:{arch}": {"package": name, "architecture": arch, "version": version, "sha256": sha,
                               "size": 1, "filename": f"pool/main/x/{name}_{version}_{arch}.deb"}}


def test_lock_path_is_beside_the_site_file(tmp_path):
    assert lk.lock_path(tmp_path / "s" / "site.yaml") == tmp_path / "s" / "site.lock.json"


def test_read_lock_names_what_is_wrong(tmp_path):
    site = tmp_path / "site.yaml"
    with pytest.raises(lk.LockError, match=r"site.lock.json: no lock file; make one with `mkmailimage lock"):
        lk.read_lock(site)
    lk.lock_path(site).write_text('{"format": "mkmailimage-lock/1",\n "epoch": }')
    with pytest.raises(lk.LockError, match=r"site.lock.json:2:11: not valid JSON"):
        lk.read_lock(site)
    write_lock(site, {})
    with pytest.raises(lk.LockError, match=r"field 'debian.packages' is missing or empty"):
        lk.read_lock(site)
    broken = pkg("libc6", "2.41-12")
    del broken["libc6:amd64"]["sha256"]
    write_lock(site, broken)
    with pytest.raises(lk.LockError, match=r"debian.packages.libc6:amd64: field 'sha256' is missing"):
        lk.read_lock(site)
    write_lock(site, pkg("libc6", "2.41-12"))
    lock = lk.read_lock(site)
    assert lock.pins() == {"libc6": "2.41-12"} and lock.epoch == 1754697600 and lock.seed == "mail.a.test"


def test_lock_file_is_stable_sorted_json(tmp_path):
    a = lk.dumps({"b": 1, "a": {"z": 1, "y": [2, 1]}})
    assert a == lk.dumps(json.loads(a)) and a.index('"a"') < a.index('"b"') and a.endswith("}\n")


def test_resolve_names_packages_the_index_lacks():
    index = {("libc6", "amd64"): {"2.41-12": {"Package": "libc6", "Architecture": "amd64", "Version": "2.41-12",
                                              "SHA256": "a" * 64, "Size": "5", "Filename": "pool/l/libc6.deb"}}}
    assert lk.resolve([("libc6", "amd64", "2.41-12")], index)["libc6:amd64"]["sha256"] == "a" * 64
    with pytest.raises(lk.LockError, match=r"libc6 2.40-1 \(amd64\): the mirror has 2.41-12; zz 1 \(all\): not in the mirror"):
        lk.resolve([("libc6", "amd64", "2.40-1"), ("zz", "all", "1")], index)


def test_dpkg_status_and_apt_pins():
    status = ("Package: a\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:2.0-1\n\n"
              "Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1\n\n"
              "Package: b\nStatus: install ok installed\nArchitecture: all\nVersion: 3\nDescription: x\n y\n")
    assert lk.dpkg_installed(status) == [("a", "amd64", "1:2.0-1"), ("b", "all", "3")]
    assert lk.apt_preferences_text({"b": "3", "a": "1:2.0-1"}) == (
        "Package: a\nPin: version 1:2.0-1\nPin-Priority: 1001\n\nPackage: b\nPin: version 3\nPin-Priority: 1001\n")


def test_image_manifest_package_list_from_the_same_dpkg_status_reader(tmp_path):
    from builder.export_image import dpkg_packages
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text("Package: zlib1g\nStatus: install ok installed\nArchitecture: i386\nVersion: 1\n\n"
                      "Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1\n\n"
                      "Package: b\nStatus: install ok installed\nArchitecture: all\nVersion: 3\n\n"
                      "Package: a\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:2.0-1\n")
    # the native architecture and "all" without a suffix, foreign ones with; sorted by name
    assert list(dpkg_packages(tmp_path).items()) == [("a", "1:2.0-1"), ("b", "3"), ("zlib1g:i386", "1")]


@needs_mirror
def test_locked_build_names_what_the_mirror_no_longer_has(tmp_path):
    site = init_site("a.test", tmp_path / "a", password="correct horse battery")
    site_file = tmp_path / "a" / "site.yaml"
    write_lock(site_file, {**pkg("libc6", "2.0-0+gone"), **pkg("mkmailimage-no-such-package", "1.0", "all")})
    out = tmp_path / "out"
    p = cli("build", "debian", site_file, "--locked", "--out", out, check=False)
    assert p.returncode == lk.LockError.exit_code, p.stderr
    assert "the mirror no longer has what site.lock.json pins (2 of 2)" in p.stderr
    assert "libc6 2.0-0+gone (amd64): the mirror has only " in p.stderr
    assert "mkmailimage-no-such-package 1.0 (all): not in the mirror" in p.stderr
    assert not out.exists() or not any(out.iterdir())      # nothing written
    del site


# ---------------------------------------------------------------- two locked builds, slow

def _diff_message(a: Path, b: Path) -> str:
    p = cli("diff", a, b, check=False)
    return f"the two locked builds differ; `mkmailimage diff {a.name} {b.name}`:\n{p.stdout}{p.stderr}"


@pytest.mark.build
@pytest.mark.root
@needs_mirror
@pytest.mark.xdist_group("debian-build")
def test_two_locked_builds_are_bit_identical(tmp_path):
    init_site("a.test", tmp_path / "site", password="correct horse battery")
    site_file = tmp_path / "site" / "site.yaml"
    p = cli("lock", site_file)
    lock = lk.read_lock(site_file)
    assert "linux-image-amd64:amd64" in lock.packages and "opensmtpd:amd64" in lock.packages, p.stdout
    # the second build: another working directory, a copy of the site, another clock, TZ and locale
    other = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(tmp_path / "site", other / "site")
    outs = []
    for n, (cwd, site, env) in enumerate([(tmp_path, site_file, {}),
                                          (other, other / "site" / "site.yaml",
                                           {"TZ": "Pacific/Kiritimati", "LC_ALL": "C.UTF-8"})]):
        out = tmp_path / f"out{n}"
        cli("build", "debian", site, "--locked", "--raw", "--out", out, cwd=cwd, env=env)
        outs.append(out)
    raw = [o / "a.test.raw" for o in outs]
    qcow = [o / "a.test.qcow2" for o in outs]
    if sha256(raw[0]) != sha256(raw[1]):
        pytest.fail(_diff_message(raw[0], raw[1]), pytrace=False)
    assert sha256(qcow[0]) == sha256(qcow[1]), "raw images equal but qcow2 differ: qemu-img is not deterministic here"
    # the image holds exactly the locked packages, and locking the image gives the same lock
    built = json.loads((outs[0] / "a.test.manifest.json").read_text())
    assert built["inputs"]["source_date_epoch"] == lock.epoch
    assert built["inputs"]["seeds"]["seed"] == lock.seed
    cli("lock", site_file, "--from-image", qcow[0])
    again = lk.read_lock(site_file)
    assert again.packages == lock.packages and again.epoch == lock.epoch and again.seed == lock.seed
    # the per-instance secrets are not in the image; the DKIM key (from secrets/) is, and is said so
    m = json.loads(cli("manifest", raw[0]).stdout)
    assert not m["secrets"]["ssh_host_keys"] and not m["secrets"]["tls_private_key"], m["secrets"]
    assert m["secrets"]["dkim_private_key"], m["secrets"]


def test_lock_records_openbsd_sets_from_a_signed_release(tmp_path, monkeypatch):
    """A release signed in the test with real signify keys (as in test_openbsd_sets)."""
    import hashlib
    import yaml
    from builder.openbsd import sets
    from builder.site import load_site
    from test_openbsd_sets import SETS, keypair, sign_dir
    monkeypatch.setenv("MKMAILIMAGE_CACHE", str(tmp_path / "cache"))
    pub, sec = keypair(tmp_path / "keys", "openbsd-78-base")
    d = tmp_path / "OpenBSD" / "7.8" / "amd64"
    d.mkdir(parents=True)
    for n in SETS:
        (d / n).write_bytes(f"{n}\n".encode() * 50)
    sign_dir(d, sec, SETS)
    f = init_site("a.test", tmp_path / "site", password="correct horse battery")
    site = load_site(f)
    assert lk._openbsd(site) == {"locked": False, "version": "7.8",
                                 "reason": "no openbsd.mirror or openbsd.sets_dir in the site file"}
    data = yaml.safe_load(f.read_text())
    data["openbsd"] = {"version": "7.8", "sets_dir": str(d), "signify_key": str(pub)}
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    ob = lk._openbsd(load_site(f))
    assert ob["locked"] is True, ob
    assert ob["sha256_sig"] == hashlib.sha256((d / "SHA256.sig").read_bytes()).hexdigest()
    assert ob["sets"] == {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in sets.set_names("7.8")}
    (d / "base78.tgz").write_bytes(b"tampered")             # the signature still lists the old hash
    (d / "SHA256.sig").write_bytes((d / "SHA256.sig").read_bytes().replace(b"base78.tgz", b"base78.tgX"))
    ob = lk._openbsd(load_site(f))
    assert ob["locked"] is False and "SHA256.sig" in ob["reason"], ob
