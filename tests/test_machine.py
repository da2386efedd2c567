"""builder.machine over real SSH (dropbear in the tiny guest, real QEMU under TCG)."""
from __future__ import annotations

import os

import pytest

from builder.machine import (CommandFailed, GuestPanicked, Machine, MachineError, QemuCrashed,
                             booted, login_or_reboot, ssh_keypair)
from builder.qemu import Qemu

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def machine(tiny_guest, tmp_path_factory):
    """One booted tiny guest with sshd for the whole module (booting costs ~6 s of TCG)."""
    tmp = tmp_path_factory.mktemp("machine")
    key, public = ssh_keypair(tmp / "ssh")
    spec = tiny_guest.ssh_spec(public, "m")
    with Qemu(spec, tmp) as vm, Machine(vm, key=key) as m:
        m.wait_for_ssh(timeout=300)
        yield m


def test_succeed_returns_stdout_only(machine):
    assert machine.succeed("echo out; echo err >&2") == "out\n"


def test_succeed_raises_with_status_stdout_stderr(machine):
    with pytest.raises(CommandFailed) as e:
        machine.succeed("echo partial; echo broken >&2; exit 4")
    assert (e.value.status, e.value.stdout, e.value.stderr) == (4, "partial\n", "broken\n")
    assert "status 4" in str(e.value) and "broken" in str(e.value)


def test_fail_and_execute(machine):
    assert machine.fail("echo no; exit 1") == "no\n"
    with pytest.raises(CommandFailed, match="expected non-zero"):
        machine.fail("true")
    assert machine.execute("echo x; exit 7") == (7, "x\n")


def test_large_output_and_stderr_do_not_deadlock(machine):
    out = machine.succeed("i=0; while [ $i -lt 3000 ]; do echo line-$i; echo err-$i >&2;"
                          " i=$((i+1)); done")
    assert out.count("\n") == 3000 and out.endswith("line-2999\n")


def test_command_timeout(machine):
    with pytest.raises(MachineError, match="still running"):
        machine.run("sleep 30", timeout=1)


def test_wait_until_succeeds_polls(machine):
    machine.succeed("rm -f /tmp/flag; (sleep 2; echo done > /tmp/flag) >/dev/null 2>&1 &")
    assert machine.wait_until_succeeds("cat /tmp/flag", timeout=60) == "done\n"


def test_wait_until_succeeds_times_out_with_last_output(machine):
    with pytest.raises(CommandFailed) as e:
        machine.wait_until_succeeds("echo still-not; false", timeout=2)
    assert e.value.stdout == "still-not\n"


def test_wait_for_open_port(machine):
    machine.succeed("(nc -l -p 5555 >/dev/null 2>&1 &) ; true")
    machine.wait_for_open_port(5555, timeout=60)
    with pytest.raises(MachineError):
        machine.wait_for_open_port(5556, timeout=2)


def test_wait_for_unit_with_stub_systemctl(machine):
    """STUB: the tiny guest has no systemd, so a shell stub stands in for `systemctl show`
    (printing the properties from a file); the real units are checked against the Debian image."""
    machine.succeed("printf '#!/bin/sh\\necho LoadState=loaded; echo ActiveState=$(cat /tmp/unit-state)\\n'"
                    " > /bin/systemctl && chmod +x /bin/systemctl")
    machine.succeed("echo activating > /tmp/unit-state;"
                    " (sleep 2; echo active > /tmp/unit-state) >/dev/null 2>&1 &")
    machine.wait_for_unit("demo.service", timeout=60)
    machine.succeed("echo failed > /tmp/unit-state")
    with pytest.raises(MachineError, match="demo.service failed"):
        machine.wait_for_unit("demo.service", timeout=60)
    machine.succeed("printf '#!/bin/sh\\necho LoadState=not-found\\n' > /bin/systemctl")
    with pytest.raises(MachineError, match="does not exist"):
        machine.wait_for_unit("nope.service", timeout=60)
    machine.succeed("rm /bin/systemctl")


def test_copy_roundtrip_file_and_directory(machine, tmp_path):
    src = tmp_path / "payload"
    (src / "sub").mkdir(parents=True)
    blob = os.urandom(200_000)
    (src / "sub" / "blob.bin").write_bytes(blob)
    (src / "note.txt").write_text("hello\n")
    assert machine.copy_to_vm(src, "/tmp/in") == "/tmp/in/payload"
    assert machine.succeed("cat /tmp/in/payload/note.txt") == "hello\n"
    got = machine.copy_from_vm("/tmp/in/payload", tmp_path / "back")
    assert (got / "sub" / "blob.bin").read_bytes() == blob
    one = machine.copy_from_vm("/etc/passwd", tmp_path / "single")
    assert one.read_text().startswith("root:")
    with pytest.raises(CommandFailed):
        machine.copy_from_vm("/no/such/file", tmp_path / "x")


def test_serial_log(machine):
    assert "TINYGUEST-SSHD" in machine.serial_log()


def test_wrong_key_is_refused(machine, tmp_path):
    other, _ = ssh_keypair(tmp_path)
    stranger = Machine(machine.qemu, key=other)
    with pytest.raises(MachineError, match="not accepted"):
        stranger.wait_for_ssh(timeout=30)


def test_shutdown_powers_off(tiny_guest, tmp_path, ssh_key):
    key, public = ssh_key
    spec = tiny_guest.ssh_spec(public, "s")
    with Qemu(spec, tmp_path) as vm, Machine(vm, key=key) as m:
        m.wait_for_ssh(timeout=300)
        assert m.shutdown(timeout=180) is True
        assert vm.proc.returncode == 0
        with pytest.raises(MachineError, match="QEMU exited"):
            m.wait_for_ssh(timeout=10)


def test_guest_dying_mid_command_is_reported(tiny_guest, tmp_path, ssh_key):
    key, public = ssh_key
    spec = tiny_guest.ssh_spec(public, "d")
    with Qemu(spec, tmp_path) as vm, Machine(vm, key=key) as m:
        m.wait_for_ssh(timeout=300)
        m.succeed("(sleep 1; poweroff -f) >/dev/null 2>&1 &")
        with pytest.raises(MachineError, match="QEMU exited .*while running 'sleep 60'"):
            m.run("sleep 60", timeout=120)
        with pytest.raises(MachineError, match="QEMU exited"):
            m.succeed("true")


def test_guest_kernel_panic_is_reported_at_once(tiny_guest, tmp_path, ssh_key):
    """A panicked guest keeps QEMU running but will never answer: the wait stops at once and
    says why instead of running into its time-out (a real panic, triggered with sysrq)."""
    key, public = ssh_key
    spec = tiny_guest.ssh_spec(public, "p")
    with Qemu(spec, tmp_path) as vm, Machine(vm, key=key) as m:
        m.wait_for_ssh(timeout=300)
        m.succeed("(sleep 1; echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger) "
                  ">/dev/null 2>&1 &")
        with pytest.raises(GuestPanicked, match="guest kernel panicked while waiting for"):
            m.wait_until_succeeds("false", timeout=600)
        assert vm.alive(), "QEMU itself keeps running after a guest panic"
        with pytest.raises(GuestPanicked):
            m.wait_for_ssh(timeout=600)


def test_qemu_crashing_is_named_and_a_boot_gets_one_more_try(tiny_guest, tmp_path, ssh_key, capfd):
    """QEMU dying of a crash signal (here: a real SIGSEGV sent to the real QEMU, standing in for
    the emulator's own general protection fault seen in CI) is named as a crash; while booting,
    login_or_reboot boots once more and keeps the failed boot's serial log."""
    import signal
    key, public = ssh_key
    spec = tiny_guest.ssh_spec(public, "crash")
    started = []

    def start() -> Machine:
        vm = Qemu(spec, tmp_path, log_path=tmp_path / "crash.serial.log")
        started.append(vm)
        vm.__enter__()
        return Machine(vm, key=key)

    try:
        first = start()
        first.qemu.expect("TINYGUEST-NET", timeout=120)     # booting, not yet logged in
        os.kill(first.qemu.pid, signal.SIGSEGV)
        first.qemu.proc.wait(30)
        with pytest.raises(QemuCrashed, match="QEMU crashed [(]SIGSEGV[)] while waiting for SSH"):
            first.wait_for_ssh(timeout=60)
        m = login_or_reboot(first, start, timeout=300)
        assert m is not first and m.succeed("echo up").strip() == "up"
    finally:
        for vm in started:
            vm.close()
    assert len(started) == 2
    assert "TINYGUEST-NET" in (tmp_path / "crash.serial.failed-boot-1.log").read_text(errors="replace")
    assert "crash: the emulated machine failed while booting; booting it once more" in capfd.readouterr().err


def test_booted_stops_its_qemu_and_a_plain_exit_is_not_retried(tiny_guest, tmp_path, ssh_key):
    key, public = ssh_key
    with booted(tiny_guest.ssh_spec(public, "b"), tmp_path, key, timeout=300) as (vm, m):
        assert m.succeed("echo up").strip() == "up"
        m.succeed("(sleep 1; poweroff -f) >/dev/null 2>&1 &")
        vm.proc.wait(60)
        with pytest.raises(MachineError, match="QEMU exited [(]status 0[)]") as e:
            login_or_reboot(m, lambda: pytest.fail("a clean exit must not be retried"), timeout=30)
        assert not isinstance(e.value, (QemuCrashed, GuestPanicked))
    assert not vm.alive()
