"""Run one QEMU guest: disks, firmware, NICs, a serial console pexpect can drive, QMP.

Interface (stable; other modules rely on it):

    from builder.qemu import Qemu, QemuSpec, Disk, Nic
    spec = QemuSpec(
        disks=[Disk("img.qcow2", snapshot=True)],   # or plain paths; format guessed from suffix
        blank_disks=["4G"],                         # extra empty qcow2 disks in the run dir
        firmware="bios",                            # or "uefi" (OVMF, private copy of the vars)
        kernel=None, initrd=None, append=None,      # direct kernel boot
        memory=1024, smp=2,
        forwards={22: None, 587: 10587},            # guest port -> host port (None: pick free)
        nics=[Nic(mac="52:54:00:00:01:02", kind="dgram", local_port=p1, remote_port=p2)],
        reboot_shutdown=True,                       # -action reboot=shutdown (installers)
    )
    with Qemu(spec, workdir, log_path=workdir / "serial.log", verbose=False) as vm:
        vm.serial.expect("login:", timeout=120)     # pexpect spawn API (expect, sendline, before)
        vm.expect("login:", timeout=120)            # same, but QemuError with the log tail
        vm.qmp_status()                             # "running", "paused", "shutdown" ...
        vm.host_port(22)                            # host port forwarded to guest port 22
        vm.powerdown(timeout=60)                    # ACPI power button; True if it exited cleanly
        vm.wait_exit(timeout)                       # QEMU's exit status (installers power off)
    # leaving the block: QEMU is gone (QMP quit, then SIGKILL of its process group) and the
    # private run dir (sockets, OVMF vars, blank disks) is deleted.

The serial console is ALWAYS logged by QEMU itself (chardev logfile=) to `log_path`
(default: workdir/NAME-serial.log), so the log survives even if Python dies. verbose=True
also streams it to stdout. A reader thread drains the console all the time, so a guest
never stalls on a full serial buffer when nobody calls expect().

Networking: the first NIC is user-mode with restrict=on: the guest reaches nothing, the host
reaches the guest through `forwards` (bound to 127.0.0.1). `guestfwd` maps an address the
guest may connect to (e.g. "10.0.2.100:80") onto a QEMU chardev such as
"cmd:nc 127.0.0.1 8000" (one process per connection) -- the only way out under restrict=on.
Extra NICs (`Nic`) connect guests to each other over 127.0.0.1: kind "dgram" (QEMU 7.2
-netdev dgram, UDP point-to-point: local_port/remote_port), "stream" (TCP, `listen=True`
on one side), "socket-udp" (legacy -netdev socket udp=/localaddr=). `dgram_pair()` makes two
matching dgram NICs. Every NIC has a fixed MAC so guests can match interfaces by MAC.

Cleanup: every Qemu is registered with builder.procs, so exit, Ctrl-C, SIGTERM and SIGHUP
kill QEMU and remove the run dir; QEMU also dies with its parent (PR_SET_PDEATHSIG). Note
that PDEATHSIG fires when the *thread* that started QEMU ends: start a VM from a thread
that outlives its use (normally the main thread).
"""
from __future__ import annotations

import asyncio
import codecs
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pexpect
from pexpect.spawnbase import SpawnBase
from qemu.qmp import QMPClient

from . import procs
from .accel import QEMU, Accel, detect_accel
from .errors import BuildError

# qemu.qmp logs every failed connection attempt at ERROR; we retry and raise our own errors.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

OVMF_PAIRS = [  # (code, vars template), newest layout first
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
]
USER_MAC = "52:54:00:12:34:56"
START_TIMEOUT = 60.0  # generous: the build machine may be loaded


class QemuError(BuildError):
    """QEMU failed to start, died, or did not do what was asked in time."""


# ---------------------------------------------------------------- spec


@dataclass
class Disk:
    path: str | Path
    format: str | None = None        # "qcow2" / "raw"; None: from the file suffix
    snapshot: bool = False           # writes go to a throw-away overlay (-snapshot per drive)
    readonly: bool = False
    interface: str = "virtio"        # -drive if=...: virtio, ide, none ...
    media: str = "disk"              # or "cdrom"

    def qemu_format(self) -> str:
        if self.format:
            return self.format
        return "qcow2" if str(self.path).endswith(".qcow2") else "raw"


@dataclass
class Nic:
    mac: str
    kind: str = "dgram"              # dgram | stream | socket-udp
    local_port: int | None = None    # dgram/socket-udp: our UDP port
    remote_port: int | None = None   # dgram/socket-udp: the peer's UDP port; stream: TCP port
    listen: bool = False             # stream: be the server side
    host: str = "127.0.0.1"
    model: str = "virtio-net-pci"

    def netdev(self, ident: str) -> str:
        h = self.host
        if self.kind == "dgram":
            return (f"dgram,id={ident},local.type=inet,local.host={h},local.port={self.local_port},"
                    f"remote.type=inet,remote.host={h},remote.port={self.remote_port}")
        if self.kind == "stream":
            return (f"stream,id={ident},server={'on' if self.listen else 'off'},"
                    f"addr.type=inet,addr.host={h},addr.port={self.remote_port}")
        if self.kind == "socket-udp":
            return f"socket,id={ident},udp={h}:{self.remote_port},localaddr={h}:{self.local_port}"
        raise QemuError(f"Nic.kind: unknown kind {self.kind!r} (dgram, stream, socket-udp)")


@dataclass
class QemuSpec:
    disks: list = field(default_factory=list)          # Disk or path
    blank_disks: list[str] = field(default_factory=list)  # sizes ("4G"): new qcow2 disks
    firmware: str = "bios"                             # bios (SeaBIOS) | uefi (OVMF)
    uefi_vars: str | Path | None = None                # persistent vars file, created from the
                                                       # template if missing (default: private copy)
    kernel: str | Path | None = None
    initrd: str | Path | None = None
    append: str | None = None
    memory: int = 1024                                 # MiB
    smp: int = 2
    machine: str = "q35"
    user_net: bool = True
    user_mac: str = USER_MAC
    forwards: dict[int, int | None] = field(default_factory=dict)  # guest TCP port -> host port
    guestfwd: dict[str, str] = field(default_factory=dict)  # "10.0.2.100:80" -> chardev spec
    tftp: str | Path | None = None                     # user net: built-in TFTP root (netboot)
    bootfile: str | None = None                        # user net: DHCP boot file name
    nics: list[Nic] = field(default_factory=list)
    reboot_shutdown: bool = False                      # guest reboot ends QEMU (installers)
    name: str = "vm"
    extra_args: list[str] = field(default_factory=list)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 right now (the kernel's pick; races are retried by Qemu)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dgram_pair(mac_a: str, mac_b: str) -> tuple[Nic, Nic]:
    """Two NICs joined by a UDP point-to-point link on 127.0.0.1 (QEMU -netdev dgram)."""
    pa, pb = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    while pb == pa:
        pb = free_port(socket.SOCK_DGRAM)
    return (Nic(mac_a, "dgram", local_port=pa, remote_port=pb),
            Nic(mac_b, "dgram", local_port=pb, remote_port=pa))


# ---------------------------------------------------------------- serial console


class SerialConsole(SpawnBase):
    """pexpect over the guest's serial socket. A thread drains it into a queue (never stalls
    the guest) and, in verbose mode, echoes it to stdout."""

    def __init__(self, sock: socket.socket, verbose: bool = False, timeout: float = 60):
        super().__init__(timeout=timeout, encoding="utf-8", codec_errors="replace")
        self.sock = sock
        self.verbose = verbose
        self.crlf = "\r\n"
        self.linesep = "\r"          # a serial console wants Enter, i.e. CR
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._eof = False
        self._echo_decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.closed = False
        self._thread = threading.Thread(target=self._pump, daemon=True, name="serial-reader")
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._queue.put(None)
                return
            if self.verbose:
                sys.stdout.write(self._echo_decoder.decode(data))
                sys.stdout.flush()
            self._queue.put(data)

    def read_nonblocking(self, size=1, timeout=-1):
        if self._eof:
            self.flag_eof = True
            raise pexpect.EOF("serial console closed (QEMU exited)")
        if timeout == -1:
            timeout = self.timeout
        try:
            chunks = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            raise pexpect.TIMEOUT("no serial output") from None
        while True:  # take what else is already there
            try:
                chunks.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if None in chunks:
            chunks = chunks[:chunks.index(None)]
            self._eof = True
        text = self._decoder.decode(b"".join(chunks), final=self._eof)
        if not text and self._eof:
            self.flag_eof = True
            raise pexpect.EOF("serial console closed (QEMU exited)")
        self._log(text, "read")
        return text

    def send(self, s) -> int:
        s = self._coerce_send_string(s)
        self._log(s, "send")
        data = self._encoder.encode(s, final=False)
        self.sock.sendall(data)
        return len(data)

    def sendline(self, s="") -> int:
        return self.send(s) + self.send(self.linesep)

    def write(self, s) -> None:
        self.send(s)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    def isalive(self) -> bool:
        return not self._eof


# ---------------------------------------------------------------- QMP


def qmp_call(sock_path: str, cmd: str, args: dict | None = None, timeout: float = 10) -> object:
    """One QMP command over a fresh connection (qemu.qmp's asyncio client, run to completion)."""
    async def run():
        client = QMPClient("mkmailimage")
        await asyncio.wait_for(client.connect(sock_path), timeout)
        try:
            return await asyncio.wait_for(client.execute(cmd, args), timeout)
        finally:
            await client.disconnect()
    return asyncio.run(run())


# ---------------------------------------------------------------- the VM


class Qemu:
    """A running QEMU guest; see the module docstring. Use as a context manager."""

    def __init__(self, spec: QemuSpec, workdir: str | Path, log_path: str | Path | None = None,
                 verbose: bool = False, accel: Accel | None = None):
        self.spec = spec
        self.workdir = Path(workdir)
        self.log_path = Path(log_path) if log_path else self.workdir / f"{spec.name}-serial.log"
        self.verbose = verbose
        self.accel = accel or detect_accel()
        self.rundir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.serial: SerialConsole | None = None
        self.ports: dict[int, int] = {}
        self.cmdline: list[str] = []
        self._stderr_path: Path | None = None
        self._closed = False

    # -- context manager

    def __enter__(self) -> "Qemu":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- life cycle

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Short path under /tmp: unix socket paths must stay below 108 bytes.
        tag = "".join(c if c.isalnum() or c in ".-_" else "_" for c in self.spec.name[:12])
        self.rundir = Path(tempfile.mkdtemp(prefix=f"mkmi-{tag}-"))
        procs.track(self)
        self._prepare_files()
        for attempt in range(5):
            self._pick_ports()
            self.cmdline = self._command()
            err = self._launch()
            if err is None:
                return
            auto_ports = any(h is None for h in self.spec.forwards.values())
            if auto_ports and "host forwarding rule" in err:
                continue  # another process took a port between our pick and QEMU's bind
            raise QemuError(f"QEMU ({self.spec.name}) failed to start: {err}")
        raise QemuError(f"QEMU ({self.spec.name}) failed to start: {err}")

    def _prepare_files(self) -> None:
        for i, size in enumerate(self.spec.blank_disks):
            path = self.rundir / f"blank{i}.qcow2"
            res = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size],
                                 capture_output=True, text=True)
            if res.returncode:
                raise QemuError(f"blank_disks[{i}]={size!r}: qemu-img: {res.stderr.strip()}")
        if self.spec.firmware == "uefi":
            _, vars_template = self._ovmf()
            target = Path(self.spec.uefi_vars or self.rundir / "OVMF_VARS.fd")
            if not target.exists():   # a persistent vars file starts from the template too
                shutil.copyfile(vars_template, target)

    def _ovmf(self) -> tuple[str, str]:
        for code, vars_template in OVMF_PAIRS:
            if os.path.exists(code) and os.path.exists(vars_template):
                return code, vars_template
        raise QemuError("firmware=uefi: OVMF not found: install the Debian package 'ovmf'")

    def _pick_ports(self) -> None:
        self.ports = {g: (h or free_port()) for g, h in self.spec.forwards.items()}

    def _command(self) -> list[str]:
        s, run = self.spec, self.rundir
        log = str(self.log_path).replace(",", ",,")
        cmd = [QEMU, "-name", s.name, *self.accel.args, "-machine", s.machine,
               "-m", str(s.memory), "-smp", str(s.smp), "-nodefaults", "-display", "none",
               "-chardev", f"socket,id=ser0,path={run}/serial.sock,server=on,wait=on,"
                           f"logfile={log},logappend=off",
               "-serial", "chardev:ser0",
               "-qmp", f"unix:{run}/qmp.sock,server=on,wait=off",
               "-device", "virtio-rng-pci"]   # entropy for sshd/gpg at first boot
        if s.reboot_shutdown:
            cmd += ["-action", "reboot=shutdown"]
        if s.firmware == "uefi":
            code, _ = self._ovmf()
            vars_file = s.uefi_vars or run / "OVMF_VARS.fd"
            cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}"]
        elif s.firmware != "bios":
            raise QemuError(f"firmware: {s.firmware!r} is not 'bios' or 'uefi'")
        for d in s.disks:
            d = d if isinstance(d, Disk) else Disk(d)
            if not Path(d.path).exists():
                raise QemuError(f"disk {d.path}: no such file")
            opt = f"file={str(d.path).replace(',', ',,')},format={d.qemu_format()},if={d.interface},media={d.media}"
            if d.snapshot:
                opt += ",snapshot=on"
            if d.readonly:
                opt += ",readonly=on"
            cmd += ["-drive", opt]
        for i in range(len(s.blank_disks)):
            cmd += ["-drive", f"file={run}/blank{i}.qcow2,format=qcow2,if=virtio"]
        if s.kernel:
            cmd += ["-kernel", str(s.kernel)]
            if s.initrd:
                cmd += ["-initrd", str(s.initrd)]
            if s.append:
                cmd += ["-append", s.append]
        if s.user_net:
            user = "user,id=user0,restrict=on"
            for guest, host in self.ports.items():
                user += f",hostfwd=tcp:127.0.0.1:{host}-:{guest}"
            if s.tftp:
                user += f",tftp={str(s.tftp).replace(',', ',,')}"
            if s.bootfile:
                user += f",bootfile={s.bootfile.replace(',', ',,')}"
            for target, chardev in s.guestfwd.items():
                user += f",guestfwd=tcp:{target}-{chardev.replace(',', ',,')}"
            cmd += ["-netdev", user, "-device", f"virtio-net-pci,netdev=user0,mac={s.user_mac}"]
        for i, nic in enumerate(s.nics):
            cmd += ["-netdev", nic.netdev(f"net{i + 1}"),
                    "-device", f"{nic.model},netdev=net{i + 1},mac={nic.mac}"]
        return cmd + list(s.extra_args)

    def _launch(self) -> str | None:
        """Start QEMU and attach the serial console. None on success, else QEMU's error."""
        for name in ("serial.sock", "qmp.sock"):
            (self.rundir / name).unlink(missing_ok=True)
        self._stderr_path = self.rundir / "qemu.stderr"
        with open(self._stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.cmdline, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, preexec_fn=procs.child_preexec)
        deadline = time.monotonic() + START_TIMEOUT
        sock_path = str(self.rundir / "serial.sock")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.stderr_tail() or f"exit status {self.proc.returncode}"
            if os.path.exists(sock_path):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(sock_path)
                except OSError:
                    sock.close()
                else:
                    self.serial = SerialConsole(sock, verbose=self.verbose)
                    break
            time.sleep(0.02)
        # QEMU blocked on the serial socket until we connected; devices and netdevs (hostfwd
        # ports) come after. QMP answering means the machine really exists.
        while self.serial is not None and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.serial.close()
                self.serial = None
                return self.stderr_tail() or f"exit status {self.proc.returncode}"
            try:
                qmp_call(str(self.rundir / "qmp.sock"), "query-status", timeout=5)
                return None
            except Exception:  # noqa: BLE001 - not listening yet / QEMU exiting
                time.sleep(0.05)
        self._kill()
        return f"QEMU did not come up within {START_TIMEOUT:g} s: {self.stderr_tail()}"

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            text = self._stderr_path.read_text(errors="replace") if self._stderr_path else ""
        except OSError:
            return ""
        said = [l for l in text.strip().splitlines()
                if l and "info: QEMU waiting for connection" not in l]   # our serial socket's
        return " | ".join(said[-lines:])

    # -- queries and control

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def host_port(self, guest_port: int) -> int:
        """The 127.0.0.1 port forwarded to `guest_port` (declared in spec.forwards)."""
        try:
            return self.ports[guest_port]
        except KeyError:
            raise QemuError(f"guest port {guest_port} is not forwarded "
                            f"(spec.forwards has {sorted(self.ports)})") from None

    def qmp(self, cmd: str, args: dict | None = None, timeout: float = 10) -> object:
        if not self.alive():
            raise QemuError(f"QMP {cmd}: QEMU ({self.spec.name}) is not running")
        return qmp_call(str(self.rundir / "qmp.sock"), cmd, args, timeout)

    def qmp_status(self) -> str:
        """QEMU's run state: "running", "paused", "shutdown", ..."""
        return self.qmp("query-status")["status"]

    def expect(self, pattern, timeout: float = 60) -> int:
        """serial.expect(pattern) with errors a user can act on: QemuError naming the pattern,
        the VM and the last console lines when it times out or QEMU exits first."""
        try:
            return self.serial.expect(pattern, timeout=timeout)
        except pexpect.TIMEOUT:
            raise QemuError(f"{self.spec.name}: {pattern!r} did not appear on the serial "
                            f"console within {timeout:g} s; last lines "
                            f"({self.log_path}):\n{self.log_tail()}") from None
        except pexpect.EOF:
            self._kill()
            raise QemuError(f"{self.spec.name}: QEMU exited (status {self.proc.returncode}) "
                            f"before {pattern!r} appeared; {self.stderr_tail()}; last lines "
                            f"({self.log_path}):\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.serial_log().splitlines()[-lines:])

    def wait_exit(self, timeout: float | None = None) -> int:
        """Wait for QEMU to exit (guest powered off); its exit status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise QemuError(f"QEMU ({self.spec.name}) still running after {timeout:g} s; "
                            f"serial log: {self.log_path}") from None

    def powerdown(self, timeout: float = 60) -> bool:
        """ACPI power button, then wait. True if the guest powered off by itself in time;
        otherwise QEMU is told to quit (and killed if it won't) and False is returned."""
        if not self.alive():
            return True
        try:
            self.qmp("system_powerdown")
            self.proc.wait(timeout)
            return True
        except (subprocess.TimeoutExpired, QemuError, OSError, asyncio.TimeoutError):
            pass
        except Exception:  # qemu.qmp connection errors when QEMU exits under us
            if not self.alive():
                return True
        self.quit()
        return False

    def quit(self, timeout: float = 10) -> None:
        """Stop QEMU now (QMP quit: disks flushed), killing it if that does not work."""
        if self.alive():
            try:
                self.qmp("quit", timeout=timeout)
            except Exception:  # noqa: BLE001 - QEMU closes the socket as it quits
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill()

    def _kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            procs.kill_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
        procs.kill_group(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Stop QEMU if still running and remove every temporary file. Idempotent."""
        if self._closed:
            return
        try:
            self.quit()
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Hard stop (signal-handler safe: no QMP) and removal of the run dir."""
        self._closed = True
        self._kill()
        if self.serial is not None:
            self.serial.close()
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
        procs.untrack(self)

    def serial_log(self) -> str:
        """Everything the guest wrote to its serial console so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
