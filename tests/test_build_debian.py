"""`mkmailimage build debian` (bootstrap installer): caches, disk layout, interrupts, and the
built image booted under QEMU (TCG here) with the whole mail stack.

VM tests share one image (`debian_image`, tests/fixtures_build.py) and one booted instance."""
from __future__ import annotations

import dataclasses
import imaplib
import io
import json
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder import cache
from builder.debian import disk, sources
from builder.debian.bootstrap import BaseInputs, base_layer, build_mirror
from builder.progress import Progress

MAIL_UNITS = ["opensmtpd", "dovecot", "rspamd", "redis-server", "unbound"]
PORTS = [25, 465, 587, 993]


def _insecure() -> ssl.SSLContext:
    # the image's certificate is self-signed at first boot: the tests check TLS works, not trust
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- fast tests (no VM, no network) ---------------------------------------------------------

def test_site_only_change_keeps_base_layer_key(tmp_path):
    """The base layer's key depends on suite, packages, mirror, epoch, recipe -- not the site."""
    a = BaseInputs("trixie", "http://mirror.example.net/debian")
    assert a.key() == BaseInputs("trixie", "http://mirror.example.net/debian").key()
    assert a.key() != BaseInputs("forky", "http://mirror.example.net/debian").key()
    assert a.key() != BaseInputs("trixie", "http://other.example.net/debian").key()
    assert a.key() != dataclasses.replace(a, epoch=a.epoch + 1).key()
    assert a.key() != dataclasses.replace(a, packages=a.packages + ["swaks"]).key()


def test_image_sources_come_from_the_trees_apt_examples(tmp_path):
    ex = tmp_path / "usr/share/doc/apt/examples"
    ex.mkdir(parents=True)
    (ex / "debian.sources").write_text(
        "Types: deb\nURIs: http://default.example.org/debian\nSuites: trixie trixie-updates\n\n"
        "Types: deb\nURIs: http://default.example.org/debian-security\nSuites: trixie-security\n")
    text = sources.sources_file(tmp_path, "trixie", None, None)
    assert "URIs: http://default.example.org/debian\n" in text
    assert "URIs: http://default.example.org/debian-security\n" in text
    text = sources.sources_file(tmp_path, "trixie", "http://mirror.example.net/debian", None)
    assert "URIs: http://mirror.example.net/debian\n" in text
    assert "default.example.org/debian\n" not in text


def test_seeds_are_stable_and_distinct():
    a, b = disk.Seeds.from_string("mail.a.test"), disk.Seeds.from_string("mail.b.test")
    assert a == disk.Seeds.from_string("mail.a.test")
    assert a.root_uuid != b.root_uuid and a.disk_id != b.disk_id
    assert len(a.esp_volume_id) == 8 and len(a.disk_id) == 8


# -- the deb cache (network: the Debian mirror; root: mmdebstrap root mode) -----------------

@pytest.mark.root
def test_corrupted_cached_deb_is_detected_and_fetched_again(tmp_path, monkeypatch):
    mirror = build_mirror(None)
    shared = cache.debs_dir()
    monkeypatch.setenv("MKMAILIMAGE_CACHE", str(tmp_path / "cache"))
    private = cache.debs_dir()
    for deb in shared.glob("*.deb"):           # copies: the shared cache must stay intact
        shutil.copyfile(deb, private / deb.name)
    inputs = BaseInputs("trixie", mirror, packages=["base-files"])
    out = io.StringIO()
    base_layer(inputs, Progress(verbose=True, out=out), no_cache=True)   # fills the private cache
    victim = next(p for p in sorted(private.glob("*.deb"))
                  if subprocess.run(["dpkg-deb", "-f", p, "Package"], capture_output=True,
                                    text=True).stdout.strip() == "base-files")
    good = victim.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF                 # same size: apt alone would trust it
    victim.write_bytes(bytes(bad))

    out = io.StringIO()
    tar, reused = base_layer(inputs, Progress(verbose=True, out=out), no_cache=True)
    log = out.getvalue()
    assert not reused
    assert f"{victim.name} is corrupted" in log, log[-3000:]
    assert victim.read_bytes() == good, "the re-fetched .deb was not stored again"
    assert cache.sha256_file(victim) == victim.name[:-4]
    listing = subprocess.run(["tar", "-tf", tar], capture_output=True, text=True).stdout
    assert "./etc/debian_version" in listing


# -- interrupts -----------------------------------------------------------------------------

def _our_qemus(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line]


@pytest.mark.root
@pytest.mark.vm
def test_interrupted_build_leaves_nothing_and_next_build_succeeds(debian_image, tmp_path):
    out = tmp_path / "images"
    cmd = [sys.executable, "-m", "builder.cli", "build", "debian", str(debian_image.site),
           "--out", str(out), "--name", "interrupted"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    seen = ""
    for line in proc.stderr:                   # SIGTERM in the middle of the disk assembly
        seen += line
        if "assemble disk ..." in line:
            time.sleep(1)
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(60) != 0, seen + rest
    assert "assemble disk ..." in seen
    assert sorted(p.name for p in out.iterdir()) == [], "left behind: " + ", ".join(p.name for p in out.iterdir())
    assert not _our_qemus(str(out))
    # the image tree, extracted to /dev/shm when it has room (builder.build.tree_dir)
    from builder.build import SHM, SHM_PREFIX
    assert not list(SHM.glob(f"{SHM_PREFIX}{proc.pid}.*")), "the image tree was left in /dev/shm"
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "interrupted.qcow2").exists() and (out / "SHA256SUMS").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# -- the built image --------------------------------------------------------------------------

@pytest.mark.vm
def test_outputs_manifest_and_sums(debian_image):
    out = debian_image.outputs
    manifest = json.loads(Path(out["manifest"]).read_text())
    assert manifest["packages"]["opensmtpd"] and manifest["packages"]["dovecot-imapd"]
    assert manifest["inputs"]["seeds"]["root_uuid"]
    assert manifest["site"]["sha256"] == cache.sha256_file(debian_image.site)
    sums = dict(reversed(line.split("  ")) for line in Path(out["sums"]).read_text().splitlines())
    for kind in ("qcow2", "raw", "manifest"):
        assert sums[Path(out[kind]).name] == cache.sha256_file(out[kind])
    # read the root file system without booting: no per-instance secrets, no build-host state
    fs = f"{out['raw']}?offset={disk.ROOT_START * disk.SECTOR}"

    def debugfs(req: str) -> str:
        return subprocess.run(["debugfs", "-R", req, fs], capture_output=True, text=True).stdout
    assert "ssh_host_" not in debugfs("ls /etc/ssh")
    assert debugfs("cat /etc/machine-id") == ""
    assert debugfs("cat /etc/hostname") == "mail.a.test\n"
    assert debugfs("cat /etc/resolv.conf").strip().endswith("nameserver 127.0.0.1")
    assert sorted(debugfs("ls -p /etc/apt/sources.list.d").split("/")).count("debian.sources") == 1
    assert "sources.list/" not in debugfs("ls -p /etc/apt")


def _boot(image: Path, tmp: Path, name: str, key: Path, firmware: str = "bios",
          grow_to: str | None = None):
    """Context manager: (vm, machine) of `image` booted and logged in over SSH."""
    from builder.machine import booted
    from builder.qemu import Disk, QemuSpec
    if grow_to:   # a bigger disk than the image, as a VPS provider gives: first boot grows root
        overlay = tmp / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image),
                        str(overlay), grow_to], check=True)
        drive = Disk(overlay)
    else:
        drive = Disk(image, snapshot=True)
    spec = QemuSpec(disks=[drive], firmware=firmware, memory=2048, name=name,
                    forwards={22: None, 25: None, 143: None, 465: None, 587: None, 993: None})
    return booted(spec, tmp, key, timeout=600, log_path=tmp / f"{name}.serial.log")


@pytest.fixture(scope="module")
def booted(debian_image, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("boot")
    with _boot(debian_image.image, tmp, "debian-a", debian_image.key) as (vm, m):
        yield vm, m


@pytest.mark.vm
def test_mail_stack_is_up(booted):
    vm, m = booted
    for unit in ["mkmailimage-firstboot", *MAIL_UNITS, "ssh"]:
        m.wait_for_unit(unit, timeout=300)
    for port in PORTS:
        m.wait_for_open_port(port, timeout=120)
    m.fail(m._listening_cmd(143))
    assert m.succeed("cat /etc/hostname").strip() == "mail.a.test"
    assert "127.0.0.1" in m.succeed("cat /etc/resolv.conf")
    assert m.succeed("test -s /etc/machine-id && cat /etc/machine-id").strip()
    m.succeed("test -s /etc/ssl/mkmailimage/fullchain.pem && test -s /etc/ssl/mkmailimage/privkey.pem")
    m.succeed("journalctl -u mkmailimage-firstboot | grep -q 'mkmailimage-firstboot: done'")
    # the disk is the image's size: nothing to grow, so growpart is not run (it costs seconds)
    m.fail("journalctl -u mkmailimage-firstboot | grep -q grew")
    # units the packages enable that a mail VM does not need (builder.debian.layer.UNITS_OFF)
    from builder.debian.layer import UNITS_OFF
    m.fail(f"systemctl -q is-enabled {' '.join(UNITS_OFF)}")


@pytest.mark.vm
def test_no_auth_before_starttls_on_587(booted):
    vm, m = booted
    m.wait_for_open_port(587, timeout=300)
    with smtplib.SMTP("127.0.0.1", vm.host_port(587), timeout=60) as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls")
        assert not s.has_extn("auth"), s.esmtp_features
        s.starttls(context=_insecure())
        s.ehlo("client.example")
        assert s.has_extn("auth")


@pytest.mark.vm
def test_user_logs_in_over_imaps(booted, debian_image):
    vm, m = booted
    m.wait_for_open_port(993, timeout=300)
    imap = imaplib.IMAP4_SSL("127.0.0.1", vm.host_port(993), ssl_context=_insecure(), timeout=60)
    try:
        typ, _ = imap.login("alice@a.test", debian_image.password)
        assert typ == "OK"
        typ, _ = imap.select("INBOX")
        assert typ == "OK"
    finally:
        imap.logout()
    imap = imaplib.IMAP4_SSL("127.0.0.1", vm.host_port(993), ssl_context=_insecure(), timeout=60)
    with pytest.raises(imaplib.IMAP4.error):
        imap.login("alice@a.test", "not the password")


def _host_key(m) -> str:
    return m.succeed("cat /etc/ssh/ssh_host_ed25519_key.pub").split()[1]


@pytest.mark.vm
def test_two_instances_have_different_ssh_host_keys(booted, debian_image, tmp_path):
    vm, m = booted
    first = _host_key(m)
    with _boot(debian_image.image, tmp_path, "debian-b", debian_image.key, grow_to="6G") as (vm2, m2):
        m2.wait_for_unit("mkmailimage-firstboot", timeout=300)
        second = _host_key(m2)
        machine_ids = m.succeed("cat /etc/machine-id"), m2.succeed("cat /etc/machine-id")
        certs = [x.succeed("openssl x509 -noout -fingerprint -sha256 -in /etc/ssl/mkmailimage/fullchain.pem")
                 for x in (m, m2)]
        root_bytes = int(m2.succeed("findmnt -bno SIZE /").strip())
        grew_log = m2.succeed("journalctl -u mkmailimage-firstboot")
    assert first != second
    assert machine_ids[0] != machine_ids[1]
    assert certs[0] != certs[1]
    assert root_bytes > 5 * 2**30, f"root was not grown to the 6G disk: {root_bytes} bytes"
    assert "grew /dev/vda2 to fill /dev/vda" in grew_log, grew_log


@pytest.mark.vm
def test_site_only_change_reuses_the_cached_base_layer(debian_image, tmp_path):
    """A different site (other domain, users) builds on the very layer the fixture's build used."""
    from builder.build import BuildState, run_build
    from fixtures_build import make_test_site
    from builder.machine import ssh_keypair
    _, public = ssh_keypair(tmp_path / "ssh")
    site = make_test_site(tmp_path, public, domain="other.test")
    first = json.loads(Path(debian_image.outputs["manifest"]).read_text())["inputs"]["base_layer"]
    st = run_build(BuildState(site_path=site, out_dir=tmp_path / "images", progress=Progress()),
                   skip=("layer overlay", "assemble disk", "export"))
    assert st.base_reused
    assert st.base_tar.name == first["file"]
    assert st.base_inputs.key() == first["key"]


@pytest.mark.vm
def test_boots_under_uefi(debian_image, tmp_path):
    with _boot(debian_image.image, tmp_path, "debian-uefi", debian_image.key, firmware="uefi") as (vm, m):
        m.succeed("test -d /sys/firmware/efi")
        m.wait_for_unit("opensmtpd", timeout=300)
