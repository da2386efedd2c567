"""The build's first-boot check: boot the fresh image once (on a throw-away overlay, so the
published image stays pristine) and wait until the mail services answer on their ports
through QEMU's host forwards: SMTP banners on 25 and 587, TLS + banner on 465, TLS + IMAP
greeting on 993. Reports the seconds from power-on to each, and fails with the serial log's tail."""
from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from ..errors import BuildError
from ..progress import Progress

TIMEOUT = 900.0
CHECKS = {25: ("plain", b"220"), 587: ("plain", b"220"), 465: ("tls", b"220"), 993: ("tls", b"* OK")}


def _answers(port: int, how: str, greeting: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            # OpenSMTPD looks the client's address up before its banner; with no route to the
            # internet (test networks) unbound takes a while to give up
            s.settimeout(120)
            if how == "tls":
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE      # self-signed at first boot
                s = ctx.wrap_socket(s)
            return s.recv(256).startswith(greeting)
    except (OSError, ssl.SSLError):
        return False


def boot_check(image: Path, serial_log: Path, progress: Progress, firmware: str = "bios",
               timeout: float = TIMEOUT) -> dict:
    from ..qemu import Disk, Qemu, QemuSpec
    spec = QemuSpec(disks=[Disk(image, format="raw", snapshot=True)], firmware=firmware,
                    memory=2048, name="firstboot-check", forwards={p: None for p in CHECKS})
    with Qemu(spec, serial_log.parent, log_path=serial_log, verbose=progress.verbose) as vm:
        progress.say(f"first-boot check: {vm.accel.reason}")
        t0 = time.monotonic()
        ready: dict[int, float] = {}
        while len(ready) < len(CHECKS):
            if time.monotonic() - t0 > timeout:
                tail = "\n".join(serial_log.read_text(errors="replace").splitlines()[-25:])
                missing = ", ".join(str(p) for p in CHECKS if p not in ready)
                raise BuildError(f"first-boot check: ports {missing} did not answer within "
                                 f"{timeout:.0f}s; serial console tail:\n{tail}")
            if not vm.alive():
                raise BuildError("first-boot check: QEMU exited before the services were up")
            for port, (how, greeting) in CHECKS.items():
                if port not in ready and _answers(vm.host_port(port), how, greeting):
                    ready[port] = round(time.monotonic() - t0, 1)
                    progress.say(f"first-boot check: port {port} answers after {ready[port]}s")
            time.sleep(2)
        vm.powerdown(timeout=60)
    return {"firmware": firmware, "accel": vm.accel.name, "ready_seconds": ready,
            "all_ready_seconds": max(ready.values())}
