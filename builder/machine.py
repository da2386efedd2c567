"""Drive a booted guest in the style of NixOS's test driver: SSH commands, waits, copies.

    from builder.machine import Machine, ssh_keypair, CommandFailed
    key_path, public_line = ssh_keypair(tmp_dir)        # put public_line into admin_ssh_keys
    with Qemu(spec(forwards={22: None}), workdir) as vm, Machine(vm, key=key_path) as m:
        m.wait_for_ssh(timeout=300)
        out = m.succeed("uname -a")                      # stdout; CommandFailed if status != 0
        m.fail("test -e /nonexistent")                   # CommandFailed if status == 0
        status, out = m.execute("systemctl is-active opensmtpd")
        m.wait_for_unit("dovecot.service", timeout=120)  # systemd; rcctl on OpenBSD
        m.wait_for_open_port(25)                         # something listens on TCP 25 in the guest
        m.wait_until_succeeds("test -s /var/mail/x", timeout=60)
        m.copy_from_vm("/var/log/mail.log", dest_dir)    # file or directory -> dest_dir/<name>
        m.copy_to_vm(local_path, "/root")               # -> /root/<name>
        m.serial_log()                                   # the console text so far
        m.shutdown()                                     # ACPI power-off via QMP

SSH goes through the user-net host forward of guest port 22 (`ssh_port` overrides), with
paramiko and a key (`key=` or `key_path=`: a path or a paramiko.PKey). `run(cmd, timeout,
stdin=bytes)` is the primitive under all commands: (status, stdout bytes, stderr bytes);
status -1 means the command was killed by a signal. Copies stream a tar archive over an SSH
exec channel (`tar` exists on Debian, OpenBSD and busybox; no SFTP server needed). Every
wait polls with a deadline; nothing sleeps a fixed time. When QEMU exits under a command or
a wait, MachineError says so and shows the serial console's last lines.

Booting with one more try when the emulated machine itself fails (QEMU killed by a crash
signal, or the guest kernel panicking) -- see `login_or_reboot`:

    with booted(spec, workdir, key=key_path, timeout=600) as (vm, m):
        m.succeed("systemctl is-system-running --wait")
"""
from __future__ import annotations

import io
import logging
import select
import shutil
import signal
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import BuildError

POLL = 0.5  # seconds between tries of a wait_* condition

# paramiko logs each failed attempt of wait_for_ssh with a traceback; our errors say enough.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


class MachineError(BuildError):
    """The guest did not get where it was asked to within the time-out."""


class WaitTimedOut(MachineError):
    """A wait_* condition did not come true in time (the guest is still up)."""


class GuestPanicked(MachineError):
    """The guest's kernel panicked (its serial console says so): nothing will answer any more."""


class QemuCrashed(MachineError):
    """QEMU itself died of a crash signal (e.g. a general protection fault in the emulator)."""


# What Linux prints on the console when it panics; once seen, waiting longer cannot help.
KERNEL_PANIC = b"Kernel panic - not syncing"
# Signals QEMU dies of when it crashes (not those we stop it with: SIGTERM, SIGKILL).
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE}


class CommandFailed(MachineError):
    """A guest command ended with an unexpected exit status."""

    def __init__(self, cmd: str, status: int, stdout: str, stderr: str, expected: str = "0"):
        self.cmd, self.status, self.stdout, self.stderr = cmd, status, stdout, stderr
        super().__init__(f"command {cmd!r} exited with status {status} (expected {expected})\n"
                         f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-4000:]}")


def ssh_keypair(directory: str | Path, name: str = "id_ed25519") -> tuple[Path, str]:
    """A new ed25519 key in `directory`: (private key path, public "ssh-ed25519 ..." line)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = directory / name
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    public += " mkmailimage-test"
    (directory / f"{name}.pub").write_text(public + "\n")
    return private, public


def _load_key(key) -> paramiko.PKey:
    if isinstance(key, paramiko.PKey):
        return key
    path = str(key)
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key_file(path)
        except paramiko.SSHException:
            continue
    raise MachineError(f"{path}: not an unencrypted ed25519, ECDSA or RSA private key")


class Machine:
    """A guest reachable over SSH; `qemu` is a running builder.qemu.Qemu (or None when only
    SSH is wanted, then `ssh_port` is required)."""

    def __init__(self, qemu, ssh_port: int | None = None, key=None, user: str = "root",
                 host: str = "127.0.0.1", name: str | None = None, key_path=None):
        key = key if key is not None else key_path   # key_path: alias of key
        self.qemu = qemu
        self.ssh_port = ssh_port or qemu.host_port(22)
        self.key = _load_key(key) if key is not None else None
        self.user = user
        self.host = host
        self.name = name or (qemu.spec.name if qemu is not None else f"{host}:{self.ssh_port}")
        self._client: paramiko.SSHClient | None = None
        self._os: str | None = None
        self._log_scanned = 0   # bytes of the serial log already searched for a kernel panic
        self._panicked = False

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- SSH connection

    def _connect(self, timeout: float = 30) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # fresh test VMs
        client.connect(self.host, self.ssh_port, username=self.user, pkey=self.key,
                       allow_agent=False, look_for_keys=False, timeout=timeout,
                       banner_timeout=timeout, auth_timeout=30)
        client.get_transport().set_keepalive(15)
        return client

    def _ssh(self) -> paramiko.SSHClient:
        if self._client is None or not self._client.get_transport() \
                or not self._client.get_transport().is_active():
            try:
                self._client = self._connect()
            except (paramiko.SSHException, OSError, EOFError) as e:
                self._check_alive("connecting over SSH", grace=2)
                raise MachineError(f"{self.name}: cannot connect over SSH on port "
                                   f"{self.ssh_port}: {e!r}") from e
        return self._client

    def _check_alive(self, doing: str, grace: float = 0) -> None:
        """MachineError with the console tail if QEMU has exited (or exits within `grace` s:
        a lost connection is often the first sign of a guest going down)."""
        if self.qemu is not None and grace and self.qemu.alive():
            try:
                self.qemu.proc.wait(grace)
            except Exception:  # noqa: BLE001 - still running: not our explanation
                pass
        if self.qemu is not None and not self.qemu.alive():
            status = self.qemu.proc.returncode if self.qemu.proc else None
            if status is not None and -status in CRASH_SIGNALS:
                raise QemuCrashed(f"{self.name}: QEMU crashed ({signal.Signals(-status).name}) while "
                                  f"{doing}; {self.qemu.stderr_tail()}; serial log "
                                  f"{self.qemu.log_path}:\n{self._log_tail()}")
            raise MachineError(f"{self.name}: QEMU exited (status {status}) while {doing}; "
                               f"{self.qemu.stderr_tail()}; serial log "
                               f"{self.qemu.log_path}:\n{self._log_tail()}")
        if self._kernel_panicked():
            raise GuestPanicked(f"{self.name}: the guest kernel panicked while {doing}; serial log "
                                f"{self.qemu.log_path}:\n{self._log_tail()}")

    def _kernel_panicked(self) -> bool:
        """Whether the serial log shows a kernel panic; reads only what is new since last time
        (plus an overlap, so a message split across two reads is still found)."""
        if self.qemu is None or self._panicked:
            return self._panicked
        try:
            with open(self.qemu.log_path, "rb") as log:
                start = max(0, self._log_scanned - len(KERNEL_PANIC))
                log.seek(start)
                new = log.read()
        except FileNotFoundError:
            return False
        self._log_scanned = start + len(new)
        self._panicked = KERNEL_PANIC in new
        return self._panicked

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.serial_log().splitlines()[-lines:])

    def wait_for_ssh(self, timeout: float = 300) -> None:
        """Until an SSH login with our key works (sshd up, key accepted)."""
        deadline = time.monotonic() + timeout
        last = None
        # The user-net forward accepts on the host before the guest listens and then just
        # waits: keep early attempts short, lengthen them as a slow sshd may need longer.
        attempt_timeout = 1.5
        while True:
            self._check_alive("waiting for SSH")
            try:
                self.close()
                left = deadline - time.monotonic()
                self._client = self._connect(timeout=max(1.0, min(attempt_timeout, left)))
                return
            except (paramiko.SSHException, OSError, EOFError) as e:
                last = e
                if isinstance(e, paramiko.AuthenticationException):
                    raise MachineError(f"{self.name}: SSH key not accepted for {self.user}") from e
            if time.monotonic() >= deadline:
                raise MachineError(f"{self.name}: no SSH login on port {self.ssh_port} within "
                                   f"{timeout:g} s (last error: {last!r})\n{self._log_tail()}")
            attempt_timeout = min(attempt_timeout * 1.5, 30)
            time.sleep(POLL)

    # -- commands

    def run(self, cmd: str, timeout: float | None = 300, stdin: bytes | None = None
            ) -> tuple[int, bytes, bytes]:
        """Run `cmd` with the guest's shell: (status, stdout bytes, stderr bytes)."""
        chan = self._ssh().get_transport().open_session()
        try:
            chan.exec_command(cmd)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                if chan.exit_status_ready() and not chan.recv_ready() \
                        and not chan.recv_stderr_ready():
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise MachineError(f"{self.name}: command {cmd!r} still running after "
                                       f"{timeout:g} s\n--- stdout so far ---\n"
                                       f"{out.decode(errors='replace')[-2000:]}")
                select.select([chan], [], [], 0.1)
            status = chan.recv_exit_status()
            if status == -1 and not chan.get_transport().is_active():
                self.close()
                self._check_alive(f"running {cmd!r}", grace=5)
                raise MachineError(f"{self.name}: SSH connection lost while running {cmd!r}")
            return status, bytes(out), bytes(err)   # -1: killed by a signal
        finally:
            chan.close()

    def execute(self, cmd: str, timeout: float | None = 300) -> tuple[int, str]:
        """(exit status, stdout) of `cmd`."""
        status, out, _ = self.run(cmd, timeout)
        return status, out.decode(errors="replace")

    def succeed(self, cmd: str, timeout: float | None = 300) -> str:
        """stdout of `cmd`; CommandFailed (with status, stdout, stderr) unless it exits 0."""
        status, out, err = self.run(cmd, timeout)
        if status != 0:
            raise CommandFailed(cmd, status, out.decode(errors="replace"),
                                err.decode(errors="replace"))
        return out.decode(errors="replace")

    def fail(self, cmd: str, timeout: float | None = 300) -> str:
        """stdout of `cmd`; CommandFailed if it exits 0."""
        status, out, err = self.run(cmd, timeout)
        if status == 0:
            raise CommandFailed(cmd, status, out.decode(errors="replace"),
                                err.decode(errors="replace"), expected="non-zero")
        return out.decode(errors="replace")

    # -- waits

    def _poll(self, what: str, check, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(f"waiting for {what}")
            result = check()
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                raise WaitTimedOut(f"{self.name}: timed out after {timeout:g} s waiting for {what}")
            time.sleep(POLL)

    def wait_until_succeeds(self, cmd: str, timeout: float = 300) -> str:
        """Repeat `cmd` until it exits 0; its stdout."""
        last: list = []

        def check():
            status, out, err = self.run(cmd, timeout=max(1, timeout))
            last[:] = [status, out, err]
            return out.decode(errors="replace") if status == 0 else None
        try:
            return self._poll(f"{cmd!r} to succeed", check, timeout)
        except WaitTimedOut as e:   # a dead or panicked guest is reported as such instead
            if last:
                raise CommandFailed(cmd, last[0], last[1].decode(errors="replace"),
                                    last[2].decode(errors="replace")) from e
            raise

    def wait_until_fails(self, cmd: str, timeout: float = 300) -> str:
        def check():
            status, out = self.execute(cmd)
            return out if status != 0 else None
        return self._poll(f"{cmd!r} to fail", check, timeout)

    def guest_os(self) -> str:
        """`uname -s` of the guest: "Linux" or "OpenBSD"."""
        if self._os is None:
            self._os = self.succeed("uname -s").strip()
        return self._os

    def wait_for_unit(self, unit: str, timeout: float = 300) -> None:
        """Until the service is active; fails at once if systemd says it failed or does not
        know the unit."""
        if self.guest_os() == "OpenBSD":
            self.wait_until_succeeds(f"rcctl check {unit}", timeout)
            return

        def check():
            props = self.execute(f"systemctl show -p LoadState -p ActiveState {unit}")[1]
            values = dict(l.split("=", 1) for l in props.splitlines() if "=" in l)
            if values.get("LoadState") == "not-found":
                raise MachineError(f"{self.name}: unit {unit} does not exist")
            state = values.get("ActiveState", "")
            if state == "failed":
                status = self.execute(f"systemctl status --no-pager -l {unit}; "
                                      f"journalctl --no-pager -n 40 -u {unit}")[1]
                raise MachineError(f"{self.name}: unit {unit} failed\n{status}")
            return True if state == "active" else None
        self._poll(f"unit {unit}", check, timeout)

    def _listening_cmd(self, port: int) -> str:
        if self.guest_os() == "OpenBSD":
            return f"netstat -an -p tcp | grep -Eq '[.:]{port} +[^ ]+ +LISTEN'"
        # /proc needs nothing installed (no ss/netstat/nc in a minimal image); state 0A = LISTEN
        return (f"grep -Eq '^ *[0-9]+: [0-9A-F]+:{port:04X} [0-9A-F]+:[0-9A-F]+ 0A ' "
                f"/proc/net/tcp /proc/net/tcp6")

    def wait_for_open_port(self, port: int, timeout: float = 300) -> None:
        """Until something in the guest listens on TCP `port`."""
        self.wait_until_succeeds(self._listening_cmd(port), timeout)

    def wait_for_closed_port(self, port: int, timeout: float = 300) -> None:
        self.wait_until_fails(self._listening_cmd(port), timeout)

    # -- files

    def copy_from_vm(self, path: str, dest: str | Path) -> Path:
        """Copy a guest file or directory into local directory `dest`; the local path."""
        p = PurePosixPath(path)
        status, out, err = self.run(f"tar -C '{p.parent}' -cf - '{p.name}'")
        if status != 0:
            raise CommandFailed(f"tar -cf - {path}", status, "", err.decode(errors="replace"))
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(out)) as tar:
            tar.extractall(dest, filter="data")
        return dest / p.name

    def copy_to_vm(self, src: str | Path, guest_dir: str) -> str:
        """Copy a local file or directory into the guest directory `guest_dir`."""
        src = Path(src)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            tar.add(src, arcname=src.name)
        cmd = f"mkdir -p '{guest_dir}' && tar -C '{guest_dir}' -xf -"
        status, _, err = self.run(cmd, stdin=buf.getvalue())
        if status != 0:
            raise CommandFailed(cmd, status, "", err.decode(errors="replace"))
        return str(PurePosixPath(guest_dir) / src.name)

    # -- console and power

    def serial_log(self) -> str:
        return self.qemu.serial_log() if self.qemu is not None else ""

    def shutdown(self, timeout: float = 120) -> bool:
        """Clean ACPI power-off (QMP system_powerdown); True if the guest powered off in time."""
        self.close()
        return self.qemu.powerdown(timeout)


# -- booting with a second chance for the emulator -------------------------------------------

def login_or_reboot(machine: Machine, reboot: Callable[[], Machine], timeout: float,
                    retries: int = 1) -> Machine:
    """`machine.wait_for_ssh(timeout)`; if instead QEMU crashes or the guest kernel panics,
    stop it, keep that boot's serial log beside it (NAME.failed-boot-N.log), say so on stderr
    and wait on `reboot()` (a freshly started Machine), up to `retries` times. The Machine that
    logged in is returned. Why: under TCG on a loaded 2-core CI host we saw this twice (QEMU 7.2
    dying of a general protection fault 1.6 s into a boot; a guest oops in the kernel allocator
    500 s into one), failures of the emulated machine rather than of the image; a failure that
    repeats still fails."""
    for attempt in range(1, retries + 2):
        try:
            machine.wait_for_ssh(timeout)
            return machine
        except (GuestPanicked, QemuCrashed) as failure:
            vm = machine.qemu
            machine.close()
            vm.close()
            if attempt > retries:
                raise
            kept = vm.log_path.with_name(f"{vm.log_path.stem}.failed-boot-{attempt}.log")
            shutil.copyfile(vm.log_path, kept)
            print(f"{machine.name}: the emulated machine failed while booting; booting it once "
                  f"more (that boot's serial log: {kept}):\n{failure}", file=sys.stderr)
            machine = reboot()
    raise AssertionError("unreachable")


@contextmanager
def booted(spec, workdir, key, timeout: float = 600, log_path=None, retries: int = 1,
           verbose: bool = False) -> Iterator[tuple[object, Machine]]:
    """(Qemu, Machine) of `spec` booted and logged in over SSH (see `login_or_reboot`); both
    stopped on leaving, also on failure."""
    from .qemu import Qemu

    started = []

    def start() -> Machine:
        vm = Qemu(spec, workdir, log_path=log_path, verbose=verbose)
        started.append(vm)
        vm.__enter__()
        return Machine(vm, key=key)

    try:
        machine = login_or_reboot(start(), start, timeout, retries)
        with machine:
            yield machine.qemu, machine
    finally:
        for vm in started:
            vm.close()
