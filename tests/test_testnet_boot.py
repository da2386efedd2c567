"""The test network's boot wait: a guest kernel panic while booting is named at once, gets
exactly one more boot from a fresh start, and the panic's serial log is kept.

Real QEMU and real kernel panics; the one stand-in (named here): the peers boot the tiny
busybox/dropbear guest instead of built mail images, because only the boot-and-wait logic is
under test and a mail image cannot be made to panic on demand. The panic is the kernel's own
"VFS: Unable to mount root fs" from an initramfs whose init does not exist."""
from __future__ import annotations

import pytest

from builder.machine import GuestPanicked, Machine
from builder.qemu import Qemu
from builder.testnet import TestNetwork

pytestmark = pytest.mark.vm

PANICS = " rdinit=/nonexistent root=/dev/nonexistent"


class TinyGuestNetwork(TestNetwork):
    """TestNetwork whose peers boot the tiny guest; `panicking_boots` of them panic first."""

    def __init__(self, tiny_guest, key, public, workdir, panicking_boots):
        super().__init__([None, None], ["unused-a", "unused-b"], workdir, key)
        self.tiny_guest, self.public = tiny_guest, public
        self.boots = 0
        self.panicking_boots = panicking_boots

    def _boot(self, peer):
        self.boots += 1
        spec = self.tiny_guest.ssh_spec(self.public, peer.spec.domain,
                                        PANICS if self.boots <= self.panicking_boots else "")
        peer.vm = Qemu(spec, self.workdir, log_path=self.workdir / f"{peer.spec.domain}.serial.log")
        self._stack.append(peer.vm)
        peer.vm.__enter__()
        peer.machine = Machine(peer.vm, key=self.ssh_key, name=peer.spec.domain)
        return peer.machine


def test_a_boot_panic_is_retried_once_and_its_log_kept(tiny_guest, tmp_path, ssh_key, capfd):
    key, public = ssh_key
    net = TinyGuestNetwork(tiny_guest, key, public, tmp_path, panicking_boots=1)
    try:
        net._boot(net.a)
        net._wait_for_login(net.a)
        assert net.a.machine.succeed("echo up").strip() == "up"
    finally:
        net.__exit__(None, None, None)
    assert net.boots == 2
    kept = tmp_path / "a.test.serial.failed-boot-1.log"
    assert "Kernel panic - not syncing: VFS: Unable to mount root fs" in kept.read_text(errors="replace")
    assert "Kernel panic" not in (tmp_path / "a.test.serial.log").read_text(errors="replace")
    err = capfd.readouterr().err
    assert "a.test: the emulated machine failed while booting; booting it once more" in err
    assert "the guest kernel panicked while waiting for SSH" in err


def test_a_second_boot_panic_fails(tiny_guest, tmp_path, ssh_key):
    key, public = ssh_key
    net = TinyGuestNetwork(tiny_guest, key, public, tmp_path, panicking_boots=2)
    try:
        net._boot(net.a)
        with pytest.raises(GuestPanicked, match="a.test: the guest kernel panicked while waiting for SSH"):
            net._wait_for_login(net.a)
    finally:
        net.__exit__(None, None, None)
    assert net.boots == 2
    assert not net.a.vm.alive()
