"""`mkmailimage upload` against real SSH servers.

VM part (issue 7): a built Debian image booted in QEMU plays the rescue system, with a blank
disk the size of the image (/dev/vdb) and a small one (/dev/vdc). The upload is refused -- with
nothing written -- for an unknown host key, the rescue system's own root disk, a disk whose
partition is mounted or used as swap, and a too-small disk; a killed remote writer and a dropped
connection end in a clear error, never "done"; a real upload (range zeroed, zero blocks skipped)
is verified independently (`qemu-img compare` of the written disk with the image, on the host)
and a third QEMU boot from the written disk runs the mail services.

No-VM part: the host's own sshd on a loopback port (a stand-in server, not a rescue system)
checks the host-key decisions, which happen before any command runs on the server.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest

from builder.upload import (UploadError, _human, _writer_script, can_write_sparse, fingerprint, parse_target,
                            read_back)

SSHD = "/usr/sbin/sshd"


def cli(*args, home: Path, timeout: float = 1800, wait: bool = True):
    """Run `mkmailimage` as a user would; HOME decides which ~/.ssh/known_hosts is read."""
    env = dict(os.environ, HOME=str(home))
    env.pop("SSH_AUTH_SOCK", None)           # only the key we pass
    cmd = [sys.executable, "-m", "builder.cli", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------- parsing (pure)


@pytest.mark.parametrize("spec,user,host,port", [
    ("root@203.0.113.7", "root", "203.0.113.7", 22),
    ("root@rescue.example.net:2222", "root", "rescue.example.net", 2222),
    ("admin@[2001:db8::1]:22022", "admin", "2001:db8::1", 22022),
    ("[2001:db8::1]", "root", "2001:db8::1", 22),
    ("host.example", "root", "host.example", 22),
])
def test_parse_target(spec, user, host, port):
    t = parse_target(spec)
    assert (t.user, t.host, t.port) == (user, host, port)


@pytest.mark.parametrize("spec", ["root@host:0", "root@host:ssh", "root@", "root@[::1]x"])
def test_parse_target_rejects(spec):
    with pytest.raises(UploadError, match=re.escape(spec)):
        parse_target(spec)


@pytest.mark.parametrize("method,compress", [("zstd", ["zstd", "-q", "-c"]), ("gzip", ["gzip", "-c"]),
                                             ("plain", None)])
def test_remote_writer_script_fails_on_a_cut_stream(tmp_path, method, compress):
    """The script `upload` runs on the rescue system, run here by sh with a file as the disk:
    a complete stream is written exactly; a stream cut in half fails although dd sees a clean
    end of input."""
    data = os.urandom(1 << 20) + bytes(3 << 20)
    wire = subprocess.run(compress, input=data, capture_output=True, check=True).stdout if compress else data
    disk = tmp_path / "disk"
    disk.write_bytes(b"")
    ok = subprocess.run(["sh", "-c", _writer_script(method, str(disk))], input=wire, capture_output=True)
    assert ok.returncode == 0, ok.stderr
    assert disk.read_bytes() == data
    if method == "plain":
        return      # nothing to detect in a plain stream: the read-back sha256 catches it
    cut = subprocess.run(["sh", "-c", _writer_script(method, str(disk))], input=wire[: len(wire) // 2],
                         capture_output=True)
    assert cut.returncode == 92
    assert b"cut short" in cut.stderr


@pytest.mark.parametrize("method,compress", [("zstd", ["zstd", "-q", "-c"]), ("plain", None)])
def test_sparse_writer_skips_zero_blocks(tmp_path, method, compress):
    """The sparse writer (run by sh with real dd, a file as the disk) gives the same bytes as the
    plain one but writes only the non-zero 4 MiB blocks: the file's allocated blocks stay near
    the non-zero data, where the plain writer allocates all of it. Zero runs at the end, in the
    middle, and a block that is zero but for one byte are all kept exact."""
    mib = 1 << 20
    data = (os.urandom(mib) + bytes(15 * mib) + b"\1" + bytes(4 * mib - 1) + os.urandom(3 * mib)
            + bytes(9 * mib))                             # 32 MiB, 5 MiB non-zero (one 1-byte block)
    wire = subprocess.run(compress, input=data, capture_output=True, check=True).stdout if compress else data
    allocated = {}
    for sparse in (True, False):
        disk = tmp_path / f"disk-{sparse}"
        disk.write_bytes(b"")
        r = subprocess.run(["sh", "-c", _writer_script(method, str(disk), sparse)], input=wire,
                           capture_output=True)
        assert r.returncode == 0, r.stderr
        assert disk.stat().st_size == len(data)
        assert disk.read_bytes() == data
        allocated[sparse] = disk.stat().st_blocks * 512
    # the blocks holding data: 1 MiB random (its 4 MiB block), the 1-byte block, 3 MiB random
    assert allocated[True] <= 12 * mib, allocated
    assert allocated[False] >= len(data), allocated


class LocalShell:
    """Runs `upload`'s remote probes with the local sh and a chosen PATH: the same interface as
    builder.upload.Remote, real commands."""

    target = "local"

    def __init__(self, path: str):
        self.env = dict(os.environ, PATH=path)

    def run(self, command, check=True, timeout=120):
        r = subprocess.run(["sh", "-c", command], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0 or not check, r.stderr
        return r.returncode, r.stdout, r.stderr

    def has(self, tool):
        return self.run(f"command -v {tool}", check=False)[0] == 0


def test_can_write_sparse(tmp_path):
    """GNU dd and blkdiscard (this host): yes for whole sectors, no for a size that is not;
    busybox dd (no conv=sparse) or no blkdiscard: no."""
    import shutil
    if not (shutil.which("blkdiscard") or os.path.exists("/usr/sbin/blkdiscard")):
        pytest.skip("blkdiscard is not installed (Debian package util-linux)")
    system = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    assert can_write_sparse(LocalShell(system), 4 << 20)
    assert not can_write_sparse(LocalShell(system), (4 << 20) + 100)
    only = tmp_path / "bin"
    only.mkdir()
    for tool in ("sh", "cat", "blkdiscard"):
        (only / tool).symlink_to(shutil.which(tool, path=system))
    assert not can_write_sparse(LocalShell(str(only)), 4 << 20)          # no dd at all
    busybox = shutil.which("busybox")
    if busybox:
        (only / "dd").symlink_to(busybox)
        assert not can_write_sparse(LocalShell(str(only)), 4 << 20)
    (only / "blkdiscard").unlink()
    (only / "dd").unlink(missing_ok=True)
    (only / "dd").symlink_to(shutil.which("dd", path=system))
    assert not can_write_sparse(LocalShell(str(only)), 4 << 20)          # no blkdiscard


@pytest.mark.parametrize("size", [(8 << 20) + 4096, 8 << 20, (8 << 20) + 100])
@pytest.mark.parametrize("gnu_dd", [True, False])
def test_read_back_hashes_exactly_size_bytes(tmp_path, size, gnu_dd):
    """The read-back command (local sh, a file as the disk, real dd/head and sha256sum) hashes
    the first SIZE bytes and nothing after them, on each of its paths: O_DIRECT + count_bytes
    (GNU dd, whole sectors), dd by 4 MiB, head -c."""
    import shutil
    system = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("sh", "dd", "head", "blockdev", "sha256sum"):
        if shutil.which(tool, path=system):
            (bin_ / tool).symlink_to(shutil.which(tool, path=system))
    disk = tmp_path / "disk"
    data = os.urandom(size) + os.urandom(4096)          # bytes past SIZE must not count
    disk.write_bytes(data)
    assert read_back(LocalShell(str(bin_)), str(disk), size, gnu_dd) == hashlib.sha256(data[:size]).hexdigest()


# ---------------------------------------------------------------- host sshd stand-in (no VM)


@pytest.fixture(scope="module")
def host_sshd(tmp_path_factory):
    """The host's OpenSSH sshd on 127.0.0.1 with its own host key and our client key: a stand-in
    server for the host-key decisions (no disk is ever written through it)."""
    if not os.path.exists(SSHD):
        pytest.skip("openssh-server is not installed (Debian package openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("hostkey", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / name], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    from builder.qemu import free_port
    port = free_port()
    (d / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {d}/hostkey
PidFile none
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
""")
    Path("/run/sshd").mkdir(exist_ok=True)   # sshd's privilege-separation directory
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while "Server listening" not in (d / "sshd.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (d / "sshd.log").read_text()
            time.sleep(0.1)
        public = (d / "hostkey.pub").read_text().split()
        fp = subprocess.run(["ssh-keygen", "-lf", d / "hostkey.pub"], capture_output=True, text=True,
                            check=True).stdout.split()[1]
        yield {"dir": d, "port": port, "fp": fp, "key_line": f"{public[0]} {public[1]}",
               "identity": d / "client", "log": d / "sshd.log"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _home(tmp_path, known_hosts: str | None = None) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    if known_hosts is not None:
        (home / ".ssh" / "known_hosts").write_text(known_hosts)
    return home


def _sessions(host_sshd) -> int:
    return host_sshd["log"].read_text().count("Accepted publickey")


def test_stand_in_unknown_host_key_refused_with_fingerprint(host_sshd, tmp_path, small_qcow2):
    before = _sessions(host_sshd)
    r = cli("upload", small_qcow2, "--ssh", f"root@127.0.0.1:{host_sshd['port']}", "--disk", "/dev/null",
            "--identity", host_sshd["identity"], "--yes", home=_home(tmp_path))
    assert r.returncode == 6, r.stderr
    assert "unknown host key" in r.stderr
    assert f"--accept-host-key {host_sshd['fp']}" in r.stderr   # the same as ssh-keygen -lf prints
    assert "done" not in r.stdout
    assert _sessions(host_sshd) == before                       # refused before logging in


def test_stand_in_wrong_accepted_fingerprint_refused(host_sshd, tmp_path, small_qcow2):
    wrong = "SHA256:" + "A" * 43
    r = cli("upload", small_qcow2, "--ssh", f"root@127.0.0.1:{host_sshd['port']}", "--disk", "/dev/null",
            "--identity", host_sshd["identity"], "--accept-host-key", wrong, home=_home(tmp_path))
    assert r.returncode == 6
    assert f"host key is ssh-ed25519 {host_sshd['fp']}, not the accepted {wrong}" in r.stderr


def test_stand_in_known_or_accepted_key_gets_to_the_disk_checks(host_sshd, tmp_path, small_qcow2):
    """Past the host key, the disk checks run on the server: /dev/null is refused as not a
    block device (nothing is written, whatever the server)."""
    known = f"[127.0.0.1]:{host_sshd['port']} {host_sshd['key_line']}\n"
    for home, extra in ((_home(tmp_path / "k", known), []),
                        (_home(tmp_path / "a"), ["--accept-host-key", host_sshd["fp"]])):
        r = cli("upload", small_qcow2, "--ssh", f"root@127.0.0.1:{host_sshd['port']}", "--disk", "/dev/null",
                "--identity", host_sshd["identity"], "--yes", *extra, home=home)
        assert r.returncode == 6
        assert "/dev/null is not a block device" in r.stderr, r.stderr


def test_stand_in_changed_host_key(host_sshd, tmp_path, small_qcow2):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other], check=True)
    known = f"[127.0.0.1]:{host_sshd['port']} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n"
    home = _home(tmp_path, known)
    args = ["upload", small_qcow2, "--ssh", f"root@127.0.0.1:{host_sshd['port']}", "--disk", "/dev/null",
            "--identity", host_sshd["identity"], "--yes"]
    r = cli(*args, home=home)
    assert r.returncode == 6
    assert "host key CHANGED" in r.stderr and host_sshd["fp"] in r.stderr
    r = cli(*args, "--accept-host-key", host_sshd["fp"], home=home)
    assert "differs from known_hosts" in r.stderr
    assert "/dev/null is not a block device" in r.stderr
    assert (home / ".ssh/known_hosts").read_text() == known       # never rewritten


@pytest.fixture(scope="module")
def small_qcow2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", d / "tiny.qcow2", "16M"], check=True)
    return d / "tiny.qcow2"


def test_fingerprint_matches_ssh_keygen(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "k"], check=True)
    expected = subprocess.run(["ssh-keygen", "-lf", tmp_path / "k.pub"], capture_output=True, text=True,
                              check=True).stdout.split()[1]
    assert fingerprint(paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "k"))) == expected


# ---------------------------------------------------------------- the rescue VM


def _sha256_raw(image: Path, work: Path) -> tuple[str, int]:
    raw = work / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, raw], check=True)
    h = hashlib.sha256()
    with open(raw, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    size = raw.stat().st_size
    raw.unlink()
    return h.hexdigest(), size


UPLOAD_DISK_SIZE = "2G"      # builder/site.py's smallest Debian disk_size


@pytest.fixture(scope="module")
def mail_image(tmp_path_factory):
    """(image, private key) of a built Debian mail image whose root accepts the key:
    MKMAILIMAGE_TEST_IMAGE + MKMAILIMAGE_TEST_KEY (an image built earlier) when set, else this
    suite's own build of the tests' site with the smallest allowed disk (2 GiB instead of the
    shared image's 4 GiB: every byte of the disk is streamed, hashed and read back under TCG,
    while the base layer is the shared build's cached one, so the build itself takes a minute)."""
    if os.environ.get("MKMAILIMAGE_TEST_IMAGE") and os.environ.get("MKMAILIMAGE_TEST_KEY"):
        return Path(os.environ["MKMAILIMAGE_TEST_IMAGE"]), Path(os.environ["MKMAILIMAGE_TEST_KEY"])
    from fixtures_build import make_test_site

    from builder.build import BuildState, run_build
    from builder.machine import ssh_keypair
    from builder.progress import Progress
    d = tmp_path_factory.mktemp("upload-image")
    key, public = ssh_keypair(d / "ssh")
    site = make_test_site(d, public, disk_size=UPLOAD_DISK_SIZE)
    st = run_build(BuildState(site_path=site, out_dir=d / "images", name="a.test",
                              progress=Progress(verbose=False)))
    return Path(st.outputs["qcow2"]), key


class Rescue:
    """The running rescue VM and what the tests need to reach it."""


@pytest.fixture(scope="module")
def rescue(mail_image, tmp_path_factory):
    from builder.machine import booted
    from builder.qemu import Disk, QemuSpec
    image, key = mail_image
    work = tmp_path_factory.mktemp("rescue")
    r = Rescue()
    r.image, r.key, r.work = image, key, work
    r.sha256, r.size = _sha256_raw(image, work)
    r.target = work / "target.qcow2"          # exactly the image's size: the boundary is allowed
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", r.target, str(r.size)], check=True)
    small = work / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", small, "256M"], check=True)
    spec = QemuSpec(disks=[Disk(image, snapshot=True), Disk(r.target), Disk(small)],
                    forwards={22: None}, memory=1024, smp=2, name="rescue")
    with booted(spec, work, key, timeout=600, log_path=work / "rescue-serial.log") as (vm, m):
        r.vm, r.m, r.port = vm, m, vm.host_port(22)
        pub = m.succeed("cat /etc/ssh/ssh_host_ed25519_key.pub").split()
        r.known_hosts = f"[127.0.0.1]:{r.port} {pub[0]} {pub[1]}\n"
        r.fp = m.succeed("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").split()[1]
        yield r


def _upload(r: Rescue, disk: str, tmp_path: Path, *extra, known=True, wait=True):
    home = _home(tmp_path, r.known_hosts if known else None)
    return cli("upload", r.image, "--ssh", f"root@127.0.0.1:{r.port}", "--disk", disk,
               "--identity", r.key, *extra, home=home, wait=wait)


def _head_sha(m, disk: str) -> str:
    return m.succeed(f"head -c 8388608 {disk} | sha256sum").split()[0]


@pytest.mark.vm
@pytest.mark.xdist_group("upload-rescue")
def test_vm_unknown_host_key_refused(rescue, tmp_path):
    before = _head_sha(rescue.m, "/dev/vdb")
    r = _upload(rescue, "/dev/vdb", tmp_path, "--yes", known=False)
    assert r.returncode == 6, r.stderr
    assert f"unknown host key ssh-ed25519 {rescue.fp}" in r.stderr
    assert "done" not in r.stdout
    assert _head_sha(rescue.m, "/dev/vdb") == before


@pytest.mark.vm
@pytest.mark.xdist_group("upload-rescue")
def test_vm_refuses_the_rescue_root_disk(rescue, tmp_path):
    r = _upload(rescue, "/dev/vda", tmp_path, "--yes")
    assert r.returncode == 6, r.stderr
    assert "/dev/vda holds the rescue system's root filesystem" in r.stderr
    assert "nothing was written" in r.stderr
    rescue.m.succeed("test -s /etc/os-release && sync")   # the rescue system is intact


@pytest.mark.vm
@pytest.mark.xdist_group("upload-rescue")
def test_vm_refuses_a_disk_with_a_mounted_partition_or_swap(rescue, tmp_path):
    m = rescue.m
    m.succeed("printf 'label: dos\\nsize=64M, type=83\\nsize=64M, type=82\\n' | sfdisk -q /dev/vdb "
              "&& udevadm settle && mkfs.ext4 -q /dev/vdb1 && mkswap -q /dev/vdb2 "
              "&& mkdir -p /mnt/data && mount /dev/vdb1 /mnt/data && swapon /dev/vdb2")
    try:
        before = _head_sha(m, "/dev/vdb")
        r = _upload(rescue, "/dev/vdb", tmp_path, "--yes")
        assert r.returncode == 6, r.stderr
        assert "/dev/vdb is mounted (/dev/vdb1 on /mnt/data)" in r.stderr
        assert "/dev/vdb2 on /dev/vdb is in use as swap" in r.stderr
        assert "done" not in r.stdout
        assert _head_sha(m, "/dev/vdb") == before
    finally:
        m.succeed("swapoff /dev/vdb2; umount /mnt/data")
    # giving a partition instead of the disk is refused too
    r = _upload(rescue, "/dev/vdb1", tmp_path / "p", "--yes")
    assert "/dev/vdb1 is a part, not a whole disk" in r.stderr


@pytest.mark.vm
@pytest.mark.xdist_group("upload-rescue")
def test_vm_refuses_a_too_small_disk(rescue, tmp_path):
    r = _upload(rescue, "/dev/vdc", tmp_path, "--yes")
    assert r.returncode == 6, r.stderr
    assert f"/dev/vdc is too small: {256 << 20} bytes" in r.stderr
    assert f"the image needs {rescue.size} bytes" in r.stderr


def _start_and_wait_for_dd(rescue, tmp_path):
    proc = _upload(rescue, "/dev/vdb", tmp_path, "--yes", wait=False)
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, proc.communicate()
        status, out = rescue.m.execute("pgrep -x dd")
        if status == 0:
            # wait until data flows, not just the process start
            time.sleep(3)
            return proc
        assert time.monotonic() < deadline, "the remote dd never started"
        time.sleep(0.5)


@pytest.mark.vm
@pytest.mark.xdist_group("upload-rescue")
def test_vm_killed_remote_writer_is_an_error(rescue, tmp_path):
    proc = _start_and_wait_for_dd(rescue, tmp_path)
    rescue.m.succeed("pkill -KILL -x dd")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 6, err
    assert "writing /dev/vdb failed" in err and "NOT done" in err
    assert "done:" not in out


@pytest.mark.vm
@pytest.mark.xdist_group("upload-rescue")
def test_vm_dropped_connection_is_an_error(rescue, tmp_path):
    proc = _start_and_wait_for_dd(rescue, tmp_path)
    # The upload's own sshd session process (dd's grandparent) dies: its TCP connection drops,
    # as when a provider's network or the rescue system goes away.
    # dd's parent is the shell, its grandparent the session's sshd, whose parent the monitor:
    # both sshd processes hold the TCP connection, so killing both closes it.
    rescue.m.succeed("sh=$(ps -o ppid= -p $(pgrep -xo dd)); s1=$(ps -o ppid= -p $sh); "
                     "s2=$(ps -o ppid= -p $s1); kill -KILL $s1 $s2")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 6, err
    assert "NOT done" in err, err
    assert any(why in err for why in ("connection lost", "connection stalled", "cut short")), err
    assert "done:" not in out


@pytest.mark.vm
@pytest.mark.xdist_group("upload-rescue")
def test_vm_upload_verifies_and_the_disk_boots(rescue, tmp_path):
    from builder.machine import booted
    from builder.qemu import Disk, QemuSpec
    r = _upload(rescue, "/dev/vdb", tmp_path, "--yes")
    print(r.stderr)                      # with pytest -rP: throughput and read-back time
    assert r.returncode == 0, r.stderr
    assert f"sha256 {rescue.sha256} verified" in r.stdout
    assert "MB/s" in r.stderr and "(100%)" in r.stderr          # the progress line
    # the rescue system has blkdiscard and GNU dd: the range was zeroed, zero blocks skipped
    # (earlier tests in this module leave a partition table, filesystems and a partial image)
    assert f"zeroing the first {_human(rescue.size)} of /dev/vdb" in r.stderr, r.stderr
    assert "zero blocks skipped" in r.stderr
    rescue.m.close()
    rescue.vm.close()                                            # release target.qcow2
    # independent of the tool's own claim: the host compares the disk the guest wrote with the
    # image, byte for byte (the target is the image's size: every byte is compared)
    cmp = subprocess.run(["qemu-img", "compare", rescue.image, rescue.target],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    spec = QemuSpec(disks=[Disk(rescue.target)], forwards={22: None}, memory=1024, smp=2, name="uploaded")
    with booted(spec, rescue.work, rescue.key, timeout=600,
                log_path=rescue.work / "uploaded-serial.log") as (vm, m):
        for unit in ("opensmtpd", "dovecot", "rspamd"):
            m.wait_for_unit(f"{unit}.service", timeout=300)
        assert m.succeed("systemctl is-active opensmtpd dovecot rspamd").split() == ["active"] * 3
