"""The OpenBSD build pipeline up to the point where OpenBSD media are needed, plus the
end-to-end build when MKMAILIMAGE_OPENBSD_MIRROR names a local copy of a release.

- staging: a release signed in the test (real signify keys) becomes the served tree the
  installer reads (sets dir with SHA256.sig, site set, index.txt; packages; install.conf,
  disklabel) and the TFTP root;
- QEMU: the install VM spec boots real firmware (SeaBIOS + iPXE) which netboots from QEMU's TFTP
  and fetches install.conf from the build's HTTP server through guestfwd 10.0.2.100:80 under
  restrict=on. The boot file is an iPXE script STAND-IN for pxeboot (no OpenBSD media here).
"""
from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import yaml

from builder.httpserve import FileServer
from builder.initsite import init_site
from builder.openbsd.testguest import MIRROR_ENV, release_from_env
from builder.openbsd import answers, build, sets, siteset
from builder.render import render_tree
from builder.site import load_site

from test_openbsd_sets import SETS, signed_release



def make_site(tmp_path, openbsd: dict):
    f = init_site("a.test", tmp_path / "site", password="correct horse battery", out=open("/dev/null", "w"))
    data = yaml.safe_load(f.read_text())
    data["openbsd"] = openbsd
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_site(f)


@pytest.fixture
def fake_release(tmp_path, monkeypatch):
    monkeypatch.setenv("MKMAILIMAGE_CACHE", str(tmp_path / "cache"))
    release = signed_release(tmp_path)
    return release["sets"], release["key"]


def test_stage_release_and_site_set_make_the_tree_the_installer_reads(tmp_path, fake_release):
    sets_dir, key = fake_release
    site = make_site(tmp_path, {"version": "7.8", "sets_dir": str(sets_dir),
                                "signify_key": str(key)})
    served, tftp = tmp_path / "served", tmp_path / "tftp"
    release = build.stage_release(site, served, tftp)
    tree = render_tree(site, "openbsd")
    plan = siteset.PackagePlan(f"{build.BASE_URL}/{answers.packages_dir('7.8')}", release["package_order"])
    siteset.write_site_set(site, tree, plan, served / answers.server_dir("7.8"))
    build.write_answers(site, served)

    s = served / "pub/OpenBSD/7.8/amd64"
    assert {f.name for f in s.iterdir()} == set(SETS) | {"SHA256.sig", "site78.tgz", "index.txt"}
    assert [l.rsplit(" ", 1)[1] for l in (s / "index.txt").read_text().splitlines()] == \
        sorted(set(SETS) | {"SHA256.sig", "site78.tgz"})
    pk = served / "pub/OpenBSD/7.8/packages/amd64"
    assert release["package_order"][0] == "quirks-7.103.tgz"
    assert (release["signify_key_source"], release["signify_pkg_key_source"]) == \
        ("site file (openbsd.signify_key)", "site file (beside openbsd.signify_key)")
    assert set(release["package_order"]) <= {f.name for f in pk.iterdir()}
    listing = (pk / "index.html").read_text()
    assert all(f'<a href="{n}">' in listing for n in release["package_order"])
    assert sorted(p.relative_to(tftp).as_posix() for p in tftp.rglob("*") if p.is_file()) == \
        ["bsd", "bsd.rd", "etc/boot.conf", "pxeboot"]
    assert (tftp / "etc/boot.conf").read_text() == "stty com0 115200\nset tty com0\nboot tftp:/bsd.rd\n"
    conf = (served / "install.conf").read_text()
    assert "HTTP Server = http://10.0.2.100\n" in conf
    assert "URL to autopartitioning template for disklabel = http://10.0.2.100/disklabel\n" in conf
    assert (served / "disklabel").read_text().startswith("/\t\t")
    # what the installer will fetch resolves on the build's HTTP server
    with FileServer(served) as srv:
        import urllib.request
        for path in ["/install.conf?path=7.8/amd64", "/disklabel", "/pub/OpenBSD/7.8/amd64/SHA256.sig",
                     "/pub/OpenBSD/7.8/amd64/index.txt", "/pub/OpenBSD/7.8/amd64/site78.tgz",
                     f"/pub/OpenBSD/7.8/packages/amd64/{release['package_order'][-1]}",
                     "/pub/OpenBSD/7.8/packages/amd64/"]:
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}{path}", timeout=10).read()
        assert srv.failed() == []


def test_tampered_mirror_refuses_the_build_before_any_vm(tmp_path, fake_release):
    sets_dir, key = fake_release
    with open(sets_dir / "bsd.rd", "ab") as f:
        f.write(b"x")
    site = make_site(tmp_path, {"version": "7.8", "sets_dir": str(sets_dir), "signify_key": str(key)})
    args = types.SimpleNamespace(name="t", out=tmp_path / "out", raw=False, verbose=False)
    with pytest.raises(sets.SetVerifyError, match=r"sets/bsd\.rd"):
        build.build_openbsd(site, args)
    assert [p.name for p in (tmp_path / "out").iterdir()] == []    # no half-written output


@pytest.mark.vm
def test_install_vm_netboots_from_tftp_and_reaches_the_http_server(tmp_path):
    """Real QEMU + SeaBIOS + iPXE with build.install_spec: DHCP boot file from QEMU's TFTP root,
    then (iPXE script standing in for pxeboot) an HTTP fetch of install.conf from 10.0.2.100:80."""
    from builder.qemu import Qemu
    served, tftp = tmp_path / "served", tmp_path / "tftp"
    served.mkdir()
    tftp.mkdir()
    (served / "install.conf").write_text("System hostname = mail.a.test\n")
    (tftp / "pxeboot").write_text("#!ipxe\nchain http://10.0.2.100/install.conf?path=7.8/amd64\n")
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"")
    os.truncate(disk, 64 << 20)
    with FileServer(served) as srv:
        spec = build.install_spec(disk, tftp, srv.port, tmp_path)
        with Qemu(spec, tmp_path / "vm", log_path=tmp_path / "serial.log") as vm:
            vm.serial.expect(r"tftp://10\.0\.2\.2/pxeboot\.\.\. ok", timeout=300)
            # iPXE prints the URL without its query string
            vm.serial.expect(r"http://10\.0\.2\.100/install\.conf\.\.\. ok", timeout=300)
        assert ("GET", "/install.conf", 200) in srv.requests


@pytest.mark.vm
@pytest.mark.skipif(release_from_env() is None,
                    reason=f"{MIRROR_ENV} is not set: it must name a local copy of an OpenBSD release "
                           "(URL or directory holding <version>/amd64 and <version>/packages/amd64); "
                           "no OpenBSD media can be reached from this machine")
def test_end_to_end_build_from_a_local_release(tmp_path):
    ob = release_from_env()
    site = make_site(tmp_path, ob)
    args = types.SimpleNamespace(name="obsd", out=tmp_path / "out", raw=False, verbose=True)
    qcow2 = build.build_openbsd(site, args)
    assert qcow2.exists()
    out = tmp_path / "out"
    assert (out / "obsd.manifest.json").exists() and (out / "SHA256SUMS").exists()
    log = (out / "obsd.serial.log").read_text(errors="replace")
    assert "CONGRATULATIONS!" in log and siteset.FIRSTBOOT_DONE in log


def test_locked_build_refuses_a_release_that_differs_from_the_lock(tmp_path, fake_release):
    import json
    from builder.lock import FORMAT, LockError, lock_path
    sets_dir, key = fake_release
    site = make_site(tmp_path, {"version": "7.8", "sets_dir": str(sets_dir), "signify_key": str(key)})
    served, tftp = tmp_path / "served", tmp_path / "tftp"
    release = build.stage_release(site, served, tftp)
    ob = {"locked": True, "version": "7.8", "sha256_sig": release["sha256_sig"],
          "sets": {n: release["sets"][n] for n in sets.set_names("7.8")}}
    build.check_locked(release, ob, Path("site.lock.json"))          # same release: accepted
    other = dict(ob, sets=dict(ob["sets"], **{"base78.tgz": "0" * 64}))
    with pytest.raises(LockError, match="base78.tgz is .* locked 0000"):
        build.check_locked(release, other, Path("site.lock.json"))
    with pytest.raises(LockError, match="SHA256.sig has sha256"):
        build.check_locked(release, dict(ob, sha256_sig="1" * 64), Path("site.lock.json"))
    # a lock without OpenBSD sets refuses --locked before anything is fetched
    lock_path(site.path).write_text(json.dumps({
        "format": FORMAT, "epoch": 1700000000, "seeds": {"seed": "s"},
        "debian": {"suite": "trixie", "packages": {"a": {"package": "a", "architecture": "amd64",
                                                          "version": "1", "sha256": "0" * 64, "filename": "a.deb"}}},
        "openbsd": {"locked": False, "reason": "no openbsd.mirror", "version": "7.8"}}))
    args = types.SimpleNamespace(name="t", out=tmp_path / "out", raw=False, verbose=False, locked=True)
    with pytest.raises(LockError, match="no OpenBSD sets are locked"):
        build.build_openbsd(site, args)


def test_guestfwd_relay_carries_a_request_to_the_http_server(tmp_path):
    """builder.openbsd.relay as QEMU's guestfwd runs it: the connection on stdin/stdout."""
    import subprocess
    import sys
    (tmp_path / "install.conf").write_text("Terminal type = vt220\n")
    with FileServer(tmp_path) as srv:
        r = subprocess.run([sys.executable, "-m", "builder.openbsd.relay", "127.0.0.1", str(srv.port)],
                           input=b"GET /install.conf?path=7.8/amd64 HTTP/1.0\r\nHost: 10.0.2.100\r\n\r\n",
                           capture_output=True, timeout=30)
    assert r.returncode == 0
    assert r.stdout.startswith(b"HTTP/1.0 200") and r.stdout.endswith(b"Terminal type = vt220\n")
