"""The installer driver against transcripts of OpenBSD autoinstalls (tests/data/openbsd/transcripts,
written from install.sub's own strings; see the README there). The console is a STAND-IN process
(tests/openbsd_transcript_player.py) on a pty via pexpect.spawn, which stops at each prompt and
waits for the driver's answer like the installer's `read`."""
from __future__ import annotations

import sys
from pathlib import Path

import pexpect
import pytest

from builder.errors import BuildError
from builder.openbsd import installer

HERE = Path(__file__).parent
TRANSCRIPTS = HERE / "data" / "openbsd" / "transcripts"
URL = "http://10.0.2.100/install.conf"
BOOT = "boot tftp:/bsd.rd"


@pytest.fixture
def play(tmp_path):
    spawned = []

    def start(name: str):
        log = tmp_path / f"{name}.answers"
        child = pexpect.spawn(sys.executable, [str(HERE / "openbsd_transcript_player.py"),
                                               str(TRANSCRIPTS / name), str(log)],
                              echo=False, encoding="utf-8", codec_errors="replace", timeout=30)
        spawned.append(child)
        return child, log

    yield start
    for child in spawned:
        child.close(force=True)


def drive(child, **kw):
    return installer.drive_install(child, URL, boot_commands=(BOOT,), stall_timeout=kw.pop("stall", 20), **kw)


def test_happy_path_answers_the_three_console_questions_and_ends(play):
    child, log = play("happy.txt")
    result = drive(child)
    assert [a for _, a in result.answered] == [BOOT, "a", URL]
    assert log.read_text().splitlines() == [BOOT, "a", URL]
    assert "mkmailimage: install.site done" in result.output_tail
    # progress bars redraw with CR: the tail keeps what a terminal would show
    assert "Installing base78.tgz   100%" in result.output_tail and " 41% " not in result.output_tail


@pytest.mark.parametrize("name, error, words", [
    ("unanswered.txt", installer.UnansweredQuestion, 'Question has no answer in response file: "password for root account?"'),
    ("checksum.txt", installer.ChecksumFailed, "Checksum test for base78.tgz failed. Continue anyway? [no] no"),
    ("fetch.txt", installer.FetchFailed, "Fetching of base78.tgz failed. Continue anyway? [no] no "
                                         "(ftp: Error retrieving http://10.0.2.100/pub/OpenBSD/7.8/amd64/base78.tgz: 404 Not Found)"),
    ("installsite.txt", installer.InstallSiteFailed, "install.site failed"),
    ("truncated.txt", installer.InstallerExited, "end of console output without CONGRATULATIONS!"),
])
def test_failures_become_named_errors_with_the_installers_words(play, name, error, words):
    child, log = play(name)
    with pytest.raises(error) as e:
        drive(child)
    assert isinstance(e.value, BuildError)
    assert e.value.words == words
    assert e.value.tail and words.split(" (")[0].split("[")[0][:30] in (e.value.tail + e.value.words)
    # it never answered the first menu a second time after the failure
    assert log.read_text().splitlines().count("a") <= 1


def test_installsite_failure_keeps_pkg_adds_words_in_the_tail(play):
    child, _ = play("installsite.txt")
    with pytest.raises(installer.InstallSiteFailed) as e:
        drive(child)
    assert "dovecot-2.3.21.1p0v0.tgz: Signature check failed" in e.value.tail


def test_silence_is_a_stall_not_a_hang(play, tmp_path):
    # A transcript that stops at a question the driver does not answer: the stand-in waits forever.
    t = tmp_path / "silent.txt"
    t.write_text((TRANSCRIPTS / "happy.txt").read_text().split("Terminal type?")[0]
                 + "Which disk is the root disk? ('?' for details) \n@@READ\n")
    child = pexpect.spawn(sys.executable, [str(HERE / "openbsd_transcript_player.py"), str(t),
                                           str(tmp_path / "a.log")], echo=False, encoding="utf-8")
    try:
        with pytest.raises(installer.InstallerStalled, match="no output for 2 s"):
            installer.drive_install(child, URL, boot_commands=(BOOT,), stall_timeout=2)
    finally:
        child.close(force=True)


def test_first_boot_marker_and_failed_checks(tmp_path):
    ok = tmp_path / "ok.txt"
    ok.write_text("starting network daemons: sshd smtpd.\nmkmailimage-firstboot: ok smtpd -n\n"
                  "mkmailimage-firstboot: done\n")
    child = pexpect.spawn("cat", [str(ok)], echo=False, encoding="utf-8")   # STAND-IN console
    assert "ok smtpd -n" in installer.wait_first_boot(child, "mkmailimage-firstboot: done", stall_timeout=20)
    bad = tmp_path / "bad.txt"
    bad.write_text("mkmailimage-firstboot: FAIL doveconf -n\nmkmailimage-firstboot: failed\n")
    child = pexpect.spawn("cat", [str(bad)], echo=False, encoding="utf-8")
    with pytest.raises(installer.InstallFailed, match="doveconf -n"):
        installer.wait_first_boot(child, "mkmailimage-firstboot: done", stall_timeout=20)


def test_a_refused_boot_command_gets_the_next_one_then_an_error(tmp_path):
    t = tmp_path / "boot.txt"
    t.write_text(">> OpenBSD/amd64 PXEBOOT 3.67\nboot> \n@@READ\ncannot open tftp:/bsd.rd: No such file or directory\n"
                 "boot> \n@@READ\ncannot open tftp:/bsd: No such file or directory\nboot> \n@@READ\n")
    log = tmp_path / "a.log"
    child = pexpect.spawn(sys.executable, [str(HERE / "openbsd_transcript_player.py"), str(t), str(log)],
                          echo=False, encoding="utf-8")
    try:
        with pytest.raises(installer.InstallFailed, match="the boot loader asked 3 times"):
            installer.drive_install(child, URL, boot_commands=("boot tftp:/bsd.rd", "boot"), stall_timeout=20)
    finally:
        child.close(force=True)
    assert log.read_text().splitlines() == ["boot tftp:/bsd.rd", "boot"]
