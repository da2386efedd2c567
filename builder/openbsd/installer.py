"""Drive OpenBSD's installer over the serial console with pexpect.

The driver answers the three questions the response file cannot (`boot>`, the
`(I)nstall, (U)pgrade, (A)utoinstall or (S)hell?` prompt and `Response file location?`), follows
the autoinstall's output, recognises the end (`CONGRATULATIONS!`) and turns every failure the
installer prints into a named error that carries the installer's own words and the tail of its
output. It never sleeps: it waits on the console with a stall timeout (no output at all for that
long is an error) and an overall deadline.

`console` is anything with pexpect's spawn interface (`expect`, `sendline`, `before`, `after`,
`match`): the QEMU serial console (builder.qemu.SerialConsole) or, in tests, a process that
plays a recorded transcript.
"""
from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field

import pexpect

from ..errors import BuildError

TAIL_LINES = 40


class InstallerError(BuildError):
    """The installer stopped. `words`: the installer's message; `tail`: its last output lines."""

    what = "the OpenBSD installer failed"

    def __init__(self, words: str, tail: str = ""):
        self.words = words.strip()
        self.tail = tail
        super().__init__(f"{self.what}: {self.words}" + (f"\n--- installer output (last lines) ---\n{tail}"
                                                        if tail else ""))


class UnansweredQuestion(InstallerError):
    what = "install.conf has no answer for an installer question"


class FetchFailed(InstallerError):
    what = "the installer could not fetch a file from the build's HTTP server"


class ChecksumFailed(InstallerError):
    what = "a set failed the installer's signature/checksum verification"


class InstallSiteFailed(InstallerError):
    what = "install.site failed inside the installer"


class InstallFailed(InstallerError):
    what = "the OpenBSD autoinstall failed"


class InstallerStalled(InstallerError):
    what = "the OpenBSD installer printed nothing for too long"


class InstallerExited(InstallerError):
    what = "the console closed before the install finished"


# What the installer prints (install.sub 1.1292 / dot.profile 1.52), in the order checked.
# Each failure pattern only records its cause; the install has really failed once the autoinstall
# wrapper prints "failed; check /tmp/ai/ai.log" (or an err_exit message that ends the run).
P_BOOT = r"boot> ?$"
P_MENU = r"\(I\)nstall, \(U\)pgrade, \(A\)utoinstall or \(S\)hell\? ?$"
P_RESPONSE = r"Response file location\?( \[[^\]\r\n]*\])? ?$"
P_DONE = r"CONGRATULATIONS! Your OpenBSD install has been successfully completed!"
P_FAILED = r"failed; check /tmp/ai/ai\.log"
P_LINE = r"[^\r\n]*[\r\n]"   # a line, or a progress-bar update ending in CR: output is activity

CAUSES: list[tuple[str, type[InstallerError]]] = [
    (r'Question has no answer in response file: "[^"\r\n]*"', UnansweredQuestion),
    (r"Question has no answer in response file\.", UnansweredQuestion),      # releases before 6.x
    (r"No response file found; non-interactive mode aborted\.", FetchFailed),
    (r"No autopartitioning template found\.", FetchFailed),
    (r"Fetching of \S+ failed\. Continue anyway\? \[no\] no", FetchFailed),
    (r"Cannot fetch SHA256\.sig\. Continue without verification\? \[no\] no", FetchFailed),
    (r"Looked at \S+ and found no .*sets", FetchFailed),
    (r"Checksum test for \S+ failed\. Continue anyway\? \[no\] no", ChecksumFailed),
    (r"Signature check of SHA256\.sig failed\. Continue without verification\? \[no\] no", ChecksumFailed),
    (r"Unverified sets: [^\r\n]*\. Continue without verification\? \[no\] no", ChecksumFailed),
    (r"Unable to get a verified list of distribution sets\.", ChecksumFailed),
    (r"[^\r\n]*\. Continue without verification\? \[no\] no", ChecksumFailed),
    (r"install\.site failed", InstallSiteFailed),
    (r"Installation of \S+ failed\. Continue anyway\? \[no\] no", InstallFailed),
    (r"Autopartitioning failed\.", InstallFailed),
    (r"'[^'\r\n]*' is not a valid (choice|hostname|timezone)[^\r\n]*", InstallFailed),
    (r"https not supported on this platform\.", InstallFailed),
]
# Lines worth remembering as context for a later failure (ftp's own error words).
P_FTP_ERROR = re.compile(r"ftp: [^\r\n]+")


@dataclass
class InstallResult:
    answered: list[tuple[str, str]] = field(default_factory=list)   # (prompt, what we sent)
    output_tail: str = ""


class _Tail:
    """The last lines of console output, for error messages. A CR without LF overwrites the
    line (ftp's progress bars), as on a terminal."""

    def __init__(self, n: int = TAIL_LINES):
        self.lines: collections.deque[str] = collections.deque(maxlen=n)
        self.partial = ""

    @staticmethod
    def _visible(line: str) -> str:
        line = line.rstrip("\r")
        return line.rsplit("\r", 1)[-1]

    def feed(self, text: str) -> None:
        self.partial += text
        *complete, self.partial = self.partial.split("\n")
        for line in complete:
            line = self._visible(line)
            if line.strip():
                self.lines.append(line)

    def text(self) -> str:
        last = self._visible(self.partial)
        return "\n".join(list(self.lines) + ([last] if last.strip() else []))


def _as_text(x) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    return x if isinstance(x, str) else ""


class _Watch:
    """console.expect with a stall timeout (no output for that long) and an overall deadline;
    everything the console printed goes into `tail`. Shared by the install and first-boot loops."""

    def __init__(self, console, patterns: list, stall_timeout: float, deadline: float, during: str):
        self.console, self.patterns = console, patterns
        self.stall_timeout, self.deadline, self.during = stall_timeout, deadline, during
        self.end = time.monotonic() + deadline
        self.tail = _Tail()

    def expect(self) -> int:
        """Index of the pattern that matched; raises InstallerStalled past the deadline. The
        caller handles pexpect.EOF/TIMEOUT itself (see `stalled`)."""
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise InstallerStalled(f"{self.during} did not finish within {self.deadline:g} s", self.tail.text())
        self.timeout = min(self.stall_timeout, remaining)
        i = self.console.expect(self.patterns, timeout=self.timeout)
        ended = self.patterns[i] in (pexpect.EOF, pexpect.TIMEOUT)
        self.tail.feed(_as_text(self.console.before) + ("" if ended else _as_text(self.console.after)))
        return i

    def stalled(self) -> InstallerStalled:
        return InstallerStalled(f"no output for {self.timeout:g} s during {self.during}", self.tail.text())


def drive_install(console, response_url: str, *, boot_commands: tuple[str, ...] = ("boot",),
                  stall_timeout: float = 900, deadline: float = 4 * 3600) -> InstallResult:
    """Run an OpenBSD autoinstall to the end. Returns on `CONGRATULATIONS!`; raises an
    InstallerError subclass on anything else (failure, stall, console closed).
    `boot_commands`: what to type at the n-th `boot>` prompt (a failed boot prompts again)."""
    patterns = [P_DONE, P_FAILED] + [c for c, _ in CAUSES] + [P_BOOT, P_MENU, P_RESPONSE,
                                                               pexpect.EOF, pexpect.TIMEOUT, P_LINE]
    i_done, i_failed = 0, 1
    i_cause0 = 2
    i_boot = i_cause0 + len(CAUSES)
    i_menu, i_response, i_eof, i_timeout, i_line = range(i_boot + 1, i_boot + 6)

    watch = _Watch(console, patterns, stall_timeout, deadline, "the install")
    tail = watch.tail
    result = InstallResult()
    cause: InstallerError | None = None
    ftp_error = ""
    boots = menus = 0

    def answer(prompt: str, text: str) -> None:
        console.sendline(text)
        result.answered.append((prompt, text))

    while True:
        i = watch.expect()
        if i == i_line:
            m = P_FTP_ERROR.search(_as_text(console.before) + _as_text(console.after))
            if m:
                ftp_error = m.group(0)
            continue
        if i == i_done:
            result.output_tail = tail.text()
            return result
        if i == i_failed:
            if cause is not None:
                raise type(cause)(cause.words, tail.text())
            raise InstallFailed(_as_text(console.after) + (f" ({ftp_error})" if ftp_error else ""), tail.text())
        if i_cause0 <= i < i_boot:
            words = _as_text(console.after).strip()
            if ftp_error and CAUSES[i - i_cause0][1] is FetchFailed:
                words += f" ({ftp_error})"
            # Remember the cause; the autoinstall wrapper then prints "failed; check ...".
            cause = CAUSES[i - i_cause0][1](words)
            continue
        if i == i_boot:
            boots += 1
            if boots > len(boot_commands):
                raise InstallFailed(f"the boot loader asked {boots} times; none of "
                                    f"{', '.join(boot_commands)} booted the installer", tail.text())
            answer("boot>", boot_commands[boots - 1])
        elif i == i_menu:
            menus += 1
            if cause is not None:
                raise type(cause)(cause.words, tail.text())
            if menus > 1:
                raise InstallFailed("the installer returned to its first menu", tail.text())
            answer("(I)nstall, (U)pgrade, (A)utoinstall or (S)hell?", "a")
        elif i == i_response:
            if any(p.startswith("Response file location") for p, _ in result.answered):
                raise FetchFailed(f"{response_url} could not be fetched (asked for the response file again)",
                                  tail.text())
            answer("Response file location?", response_url)
        elif i == i_eof:
            if cause is not None:
                raise type(cause)(cause.words, tail.text())
            raise InstallerExited("end of console output without CONGRATULATIONS!", tail.text())
        elif i == i_timeout:
            if cause is not None:
                raise type(cause)(cause.words, tail.text())
            raise watch.stalled()


def wait_first_boot(console, done_marker: str, *, stall_timeout: float = 900,
                    deadline: float = 3600) -> str:
    """Follow the installed system's first boot until firstboot.sh prints `done_marker`.
    Its FAIL lines (a daemon's config check) become an InstallFailed naming the check."""
    failed: list[str] = []
    patterns = [re.escape(done_marker), r"mkmailimage-firstboot: FAIL [^\r\n]*",
                r"mkmailimage-firstboot: failed", pexpect.EOF, pexpect.TIMEOUT, P_LINE]
    watch = _Watch(console, patterns, stall_timeout, deadline, "the first boot")
    while True:
        i = watch.expect()
        if i == 0:
            return watch.tail.text()
        if i == 1:
            failed.append(_as_text(console.after).split("FAIL", 1)[1].strip())
        elif i == 2:
            raise InstallFailed("first boot checks failed: " + "; ".join(failed), watch.tail.text())
        elif i == 3:
            raise InstallerExited("the VM stopped during its first boot", watch.tail.text())
        elif i == 4:
            raise watch.stalled()
