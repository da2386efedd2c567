"""builder.accel / builder.qemu against real QEMU (TCG) booting the tiny busybox guest."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pexpect
import pytest

from builder import accel
from builder.errors import BuildError
from builder.qemu import Disk, Nic, Qemu, QemuError, QemuSpec, dgram_pair, free_port
from tinyguest import append

READY = "TINYGUEST-READY"
PROMPT = "/ # "


def guest_spec(guest, name="vm", **kw) -> QemuSpec:
    opts = {k: kw.pop(k) for k in ("nets", "http_port", "authorized_key", "user_net") if k in kw}
    return QemuSpec(kernel=guest.kernel, initrd=guest.initrd, append=append(**opts),
                    memory=256, smp=1, name=name, **kw)


def console(vm, cmd: str, expect: str, timeout: float = 120) -> str:
    """Run `cmd` on the guest's console shell; `expect` must not occur in `cmd` itself."""
    vm.serial.sendline(cmd)
    vm.serial.expect(expect, timeout=timeout)
    return vm.serial.before


def wait_gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or "Z" in _state(pid):
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
    except (OSError, IndexError):
        return "Z"


# ------------------------------------------------------------------ accel


def test_probe_runs_under_tcg():
    ok, why = accel.probe(accel.TCG_ARGS)
    assert ok, why


def test_probe_reports_qemu_error():
    ok, why = accel.probe(["-accel", "tcg", "-cpu", "no-such-cpu-model"])
    assert not ok
    assert "no-such-cpu-model" in why


def test_accel_env_override(monkeypatch):
    monkeypatch.setenv("MKMAILIMAGE_ACCEL", "tcg")
    a = accel.detect_accel()
    assert a.name == "tcg" and "-accel" in a.args and "forced" in a.reason
    monkeypatch.setenv("MKMAILIMAGE_ACCEL", "hvf")
    with pytest.raises(BuildError, match="MKMAILIMAGE_ACCEL"):
        accel.detect_accel()


def test_detect_accel_decision_matches_probe(monkeypatch, tmp_path):
    """Whatever detect_accel decides, the guest really runs with those arguments."""
    monkeypatch.delenv("MKMAILIMAGE_ACCEL", raising=False)
    monkeypatch.setenv("MKMAILIMAGE_CACHE", str(tmp_path))
    monkeypatch.setattr(accel, "_cached", None)
    a = accel.detect_accel()
    assert a.name in ("kvm", "tcg") and a.reason
    assert accel.probe(a.args)[0]
    # cached on disk for the next process
    assert list(tmp_path.glob("accel-*.json"))


def test_cached_tcg_decision_uses_the_current_tcg_arguments(monkeypatch, tmp_path):
    """A TCG decision cached by an older builder (then "-cpu max") must not pin its CPU model:
    with SSSE3 the guest's rspamd compiles hyperscan databases for minutes at first boot."""
    monkeypatch.delenv("MKMAILIMAGE_ACCEL", raising=False)
    monkeypatch.setenv("MKMAILIMAGE_CACHE", str(tmp_path))
    monkeypatch.setattr(accel, "_cached", None)
    accel._to_disk(accel.Accel("tcg", ["-accel", "tcg", "-cpu", "max"], "KVM unusable: using TCG"))
    a = accel.detect_accel()
    assert a.name == "tcg" and a.args == accel.TCG_ARGS and "[cached]" in a.reason
    assert "max" not in a.args


# ------------------------------------------------------------------ one guest


@pytest.mark.vm
def test_boot_console_log_qmp_and_clean_powerdown(tiny_guest, tmp_path, capfd):
    log = tmp_path / "logs" / "serial.log"
    with Qemu(guest_spec(tiny_guest), tmp_path, log_path=log, verbose=True) as vm:
        vm.serial.expect(READY, timeout=300)
        assert vm.qmp_status() == "running"
        vm.qmp("stop")
        assert vm.qmp_status() == "paused"
        vm.qmp("cont")
        assert vm.qmp_status() == "running"
        # the console is interactive
        console(vm, "echo answer=$((6 * 7))", "answer=42")
        rundir = vm.rundir
        assert (rundir / "qmp.sock").exists()
        assert vm.powerdown(timeout=180) is True
        assert vm.proc.returncode == 0
        vm.serial.expect(pexpect.EOF, timeout=30)   # the console ends with QEMU
    assert not rundir.exists()
    text = log.read_text()
    assert READY in text and "TINYGUEST-POWERBUTTON" in text   # QEMU logged the console
    assert READY in capfd.readouterr().out                     # verbose streamed it


@pytest.mark.vm
def test_powerdown_falls_back_to_quit_when_guest_ignores_button(tiny_guest, tmp_path):
    spec = guest_spec(tiny_guest)
    spec.append += " rdinit=/bin/sh"   # a bare shell as init: nobody listens to the button
    with Qemu(spec, tmp_path) as vm:
        vm.serial.expect(PROMPT, timeout=300)
        assert vm.powerdown(timeout=5) is False
        assert not vm.alive()


@pytest.mark.vm
def test_hostfwd_reaches_guest_service(tiny_guest, tmp_path):
    spec = guest_spec(tiny_guest, http_port=8080, forwards={8080: None})
    with Qemu(spec, tmp_path) as vm:
        vm.serial.expect("TINYGUEST-HTTPD", timeout=300)
        port = vm.host_port(8080)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=30).read()
        assert body == b"TINYGUEST-HTTP\n"
        with pytest.raises(QemuError, match="not forwarded"):
            vm.host_port(9999)


@pytest.mark.vm
def test_restrict_on_guest_cannot_reach_host(tiny_guest, tmp_path):
    """restrict=on: a host service on 127.0.0.1 is not reachable through 10.0.2.2."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        srv.settimeout(0)
        with Qemu(guest_spec(tiny_guest, http_port=80), tmp_path) as vm:
            vm.serial.expect(READY, timeout=300)
            # control: nc works, the guest reaches its own service
            console(vm, "nc -w 5 10.0.2.15 80 </dev/null; echo rc=$?", r"rc=\d+")
            assert vm.serial.after == "rc=0"
            out = console(vm, f"echo hello | nc -w 5 10.0.2.2 {port}; echo rc=$?", r"rc=\d+")
            assert vm.serial.after != "rc=0", out
        with pytest.raises(BlockingIOError):
            srv.accept()   # nothing ever arrived


@pytest.mark.vm
def test_snapshot_disk_untouched_and_blank_disk_attached(tiny_guest, tmp_path):
    disk = tmp_path / "base.raw"
    disk.write_bytes(b"ORIGINAL" * 131072)  # 1 MiB
    spec = guest_spec(tiny_guest, disks=[Disk(disk, snapshot=True)], blank_disks=["16M"])
    with Qemu(spec, tmp_path) as vm:
        vm.serial.expect(READY, timeout=300)
        console(vm, "echo vdb-sectors=$(cat /sys/block/vdb/size)", "vdb-sectors=32768")
        console(vm, "printf CHANGED_ | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null;"
                    " echo wrote=$(head -c 8 /dev/vda | tr A-Z a-z)", "wrote=changed_")
        assert (vm.rundir / "blank0.qcow2").exists()
        rundir = vm.rundir
    assert disk.read_bytes()[:8] == b"ORIGINAL"
    assert not rundir.exists()


@pytest.mark.vm
def test_uefi_boot_with_private_vars(tiny_guest, tmp_path):
    spec = guest_spec(tiny_guest, firmware="uefi")
    with Qemu(spec, tmp_path) as vm:
        vm.serial.expect(READY, timeout=300)
        assert (vm.rundir / "OVMF_VARS.fd").exists()
        console(vm, "echo efi=$(ls /sys/firmware/efi >/dev/null 2>&1 && echo yes || echo no)",
                r"efi=(yes|no)")
        assert vm.serial.after == "efi=yes"


@pytest.mark.vm
def test_expect_errors_name_pattern_and_show_console(tiny_guest, tmp_path):
    spec = guest_spec(tiny_guest, name="errs")
    spec.append += " rdinit=/bin/sh"
    with Qemu(spec, tmp_path) as vm:
        vm.expect(PROMPT, timeout=300)
        with pytest.raises(QemuError, match=r"(?s)'never-printed'.*within 2 s.*/ # "):
            vm.expect("never-printed", timeout=2)
        vm.serial.sendline("/bin/busybox poweroff -f")   # immediate power-off
        with pytest.raises(QemuError, match="QEMU exited .*before 'never-printed'"):
            vm.expect("never-printed", timeout=180)


# ------------------------------------------------------------------ two guests


def nic_pair(kind: str, mac_a: str, mac_b: str) -> tuple[Nic, Nic]:
    if kind == "dgram":
        return dgram_pair(mac_a, mac_b)
    if kind == "stream":
        port = free_port()
        return (Nic(mac_a, "stream", remote_port=port, listen=True),
                Nic(mac_b, "stream", remote_port=port))
    pa, pb = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    return (Nic(mac_a, kind, local_port=pa, remote_port=pb),
            Nic(mac_b, kind, local_port=pb, remote_port=pa))


@pytest.mark.vm
@pytest.mark.parametrize("kind", ["dgram", "stream", "socket-udp"])
def test_private_link_between_two_guests(tiny_guest, tmp_path, kind):
    mac_a, mac_b = "52:54:00:00:02:01", "52:54:00:00:02:02"
    nic_a, nic_b = nic_pair(kind, mac_a, mac_b)
    spec_a = guest_spec(tiny_guest, "a", nics=[nic_a], nets={mac_a: "192.0.2.1/24"})
    spec_b = guest_spec(tiny_guest, "b", nics=[nic_b], nets={mac_b: "192.0.2.2/24"}, http_port=80)
    # a first: for "stream" it is the listening side
    with Qemu(spec_a, tmp_path / "a") as a, Qemu(spec_b, tmp_path / "b") as b:
        b.expect("TINYGUEST-HTTPD", timeout=300)
        a.expect(READY, timeout=300)
        console(a, "wget -O - http://192.0.2.2/ | tr A-Z a-z", "tinyguest-http", timeout=180)
        assert "eth1 52:54:00:00:02:01 192.0.2.1/24" in a.serial_log()


# ------------------------------------------------------------------ failures and cleanup


def test_missing_disk_is_a_clear_error(tmp_path):
    q = Qemu(QemuSpec(disks=[tmp_path / "nope.qcow2"]), tmp_path, accel=accel._forced("tcg"))
    with pytest.raises(QemuError, match="nope.qcow2"):
        with q:
            pass
    assert q.proc is None and not q.rundir.exists()


def test_qemu_startup_error_is_reported(tmp_path):
    q = Qemu(QemuSpec(extra_args=["-device", "no-such-device"]), tmp_path,
             accel=accel._forced("tcg"))
    with pytest.raises(QemuError, match="no-such-device"):
        with q:
            pass
    assert q.proc.poll() is not None and not q.rundir.exists()


def test_busy_host_port_is_reported(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        q = Qemu(QemuSpec(forwards={22: port}), tmp_path, accel=accel._forced("tcg"))
        with pytest.raises(QemuError, match="forwarding"):
            with q:
                pass
    assert not q.rundir.exists()


CHILD = """
import json, sys, time
from builder.qemu import Qemu, QemuSpec
spec = QemuSpec(kernel=sys.argv[1], initrd=sys.argv[2], append="console=ttyS0 quiet",
                memory=256, smp=1, forwards={22: None})
with Qemu(spec, sys.argv[3]) as vm:
    vm.serial.expect("TINYGUEST-READY", timeout=300)
    print(json.dumps({"pid": vm.pid, "rundir": str(vm.rundir)}), flush=True)
    while True:
        time.sleep(1)
"""


@pytest.mark.vm
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_signal_to_builder_leaves_no_qemu(tiny_guest, tmp_path, sig):
    line = ""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_guest.kernel),
                              str(tiny_guest.initrd), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line, "child died before the guest was up"
        info = json.loads(line)
        assert Path(f"/proc/{info['pid']}").exists()
        child.send_signal(sig)
        assert child.wait(120) == -sig   # the handlers pass the signal on
        assert wait_gone(info["pid"]), "QEMU survived its parent"
        if sig != signal.SIGKILL:       # SIGKILL gives no chance to delete files
            assert not Path(info["rundir"]).exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if line:
            subprocess.run(["rm", "-rf", json.loads(line)["rundir"]])


def test_auto_port_taken_before_qemu_binds_is_retried(tmp_path, monkeypatch):
    """The race between picking a free port and QEMU binding it: the first pick is made busy
    on purpose, the retry must pick another one."""
    import builder.qemu as qemu_mod
    real_free_port = qemu_mod.free_port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        picks = [busy.getsockname()[1]]
        monkeypatch.setattr(qemu_mod, "free_port",
                            lambda *a: picks.pop(0) if picks else real_free_port(*a))
        with Qemu(QemuSpec(forwards={22: None}), tmp_path, accel=accel._forced("tcg")) as vm:
            assert vm.qmp_status() in ("running", "prelaunch", "paused")
            assert vm.host_port(22) != busy.getsockname()[1]


def test_persistent_uefi_vars_created_from_template(tmp_path):
    vars_file = tmp_path / "nvram" / "VARS.fd"
    vars_file.parent.mkdir()
    spec = QemuSpec(firmware="uefi", uefi_vars=vars_file)
    with Qemu(spec, tmp_path, accel=accel._forced("tcg")) as vm:
        assert vm.qmp_status() == "running"
        assert f"file={vars_file}" in " ".join(vm.cmdline)
    assert vars_file.stat().st_size in (131072, 540672)   # OVMF_VARS(_4M).fd
