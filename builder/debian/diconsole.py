"""Reading the Debian installer's serial console (text frontend, inside GNU screen).

`watch(console, ...)` follows the installer until QEMU exits and turns what it shows into
progress lines and named errors:

- every question the preseed left open shows as a prompt ending in
  `Prompt: '?' for help, default=N>` (or a note's `[Press enter to continue]`): the build stops
  at once with the question's own title and text (PreseedUnansweredQuestion), or, when the
  question is the installer's "download failed" screen, with the URLs that failed
  (InstallerDownloadFailed);
- stage names with percentages ("Loading additional components ... 40%") are reported;
- a kernel panic, a silent installer and an overall deadline end the build too.
"""
from __future__ import annotations

import re
import time
from collections import deque
from typing import Callable

import pexpect

from ..errors import BuildError

PROMPT_RE = re.compile(r"Prompt: '\?' for help[^>\r\n]*>|\[Press enter to continue\]")
PANIC_RE = re.compile(r"Kernel panic - not syncing: [^\r\n]*")
ANSI_RE = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[()][0-9A-Za-z]|[=>78DEHM])")
# GNU screen's status line: "[   (1*installer)  2 shell  3 shell  4- log  ][ Nov 22  3:55 ]"
SCREEN_STATUS_RE = re.compile(r"\[[^\[\]\n]*\([-\d]\*[^)\n]*\)[^\[\]\n]*\]\[[^\[\]\n]*\]")
KERNEL_LINE_RE = re.compile(r"^\[\s*\d+\.\d+\] ")
KERNEL_TROUBLE_RE = re.compile(r"panic|Oops|BUG|RIP:|Call Trace|segfault|I/O error")
SCREENRC_NOISE = "/etc/screenrc:"
PROGRESS_RE = re.compile(r"^(?P<title>\S[^\r\n]*?)\s+\.\.\.(?:\s*\d+%\.\.\.)*\s*(?P<pct>\d+)%\s*$")
DOWNLOAD_WORDS = ("failed to download", "downloading a file failed", "failed to load installer component",
                  "retrieving", "bad archive mirror", "failed to retrieve", "could not be retrieved",
                  "apt configuration problem", "download failed")
TAIL_LINES = 40


class InstallerError(BuildError):
    """The Debian installer stopped; carries its own words and the end of the console."""

    def __init__(self, message: str, tail: str = ""):
        self.words = message
        self.tail = tail
        super().__init__(message + (f"\n--- installer console (last lines) ---\n{tail}" if tail else ""))


class PreseedUnansweredQuestion(InstallerError):
    """The installer asked a question the preseed does not answer."""


class InstallerDownloadFailed(InstallerError):
    """The installer could not download a file (installer component, package, preseed, overlay)."""


class InstallerCrashed(InstallerError):
    """The installer's kernel panicked."""


class InstallerStalled(InstallerError):
    """No console output for too long, or the overall time limit passed."""


class LateCommandFailed(InstallerError):
    """The preseed's late command (laying in the site overlay) failed."""


class InstallerExited(InstallerError):
    """QEMU exited before the installation was complete."""


def clean(text: str) -> str:
    """Console text without terminal escapes, screen's status line or carriage returns."""
    text = ANSI_RE.sub("", text)
    text = SCREEN_STATUS_RE.sub("\n", text)
    return text.replace("\r", "")


def question_text(screen: str) -> str:
    """The question on screen before a prompt: its title (underlined with dashes) and body."""
    lines = [l.rstrip() for l in clean(screen).split("\n")]
    lines = [l for l in lines if l.strip() and not PROMPT_RE.search(l)]
    start = 0
    for i in range(len(lines) - 1, 0, -1):
        if re.fullmatch(r"-{3,}", lines[i].strip()):
            start = i - 1
            break
    else:
        start = max(0, len(lines) - 12)
    body = [l for l in lines[start:] if not re.fullmatch(r"-{3,}", l.strip())]
    return "\n".join(body).strip()


def is_download_failure(question: str) -> bool:
    q = question.lower()
    return any(w in q for w in DOWNLOAD_WORDS)


class Progress:
    """Turns the installer's "Title ... 10%... 20%" lines into one report per stage step."""

    def __init__(self, report: Callable[[str], None], step: int = 10):
        self.report = report
        self.step = step
        self.line = ""
        self.title: str | None = None
        self.last_pct = -1

    def feed(self, text: str) -> None:
        parts = text.split("\n")
        for i, part in enumerate(parts):
            self.line += part
            self._look(self.line)
            if i < len(parts) - 1:
                self.line = ""

    def _look(self, line: str) -> None:
        m = PROGRESS_RE.match(line.strip())
        if not m:
            return
        title, pct = m.group("title").strip(), int(m.group("pct"))
        if title != self.title:
            self.title, self.last_pct = title, -self.step   # a new stage is always shown
        if pct >= self.last_pct + self.step or (pct == 100 and self.last_pct != 100):
            self.last_pct = pct
            self.report(f"installer: {title} {pct}%")


def watch(console, *, report: Callable[[str], None] = print,
          failed_downloads: Callable[[], list[str]] = lambda: [],
          late_status: Callable[[], str | None] = lambda: None,
          stall_timeout: float = 1200, deadline: float = 4 * 3600) -> None:
    """Follow the installer on `console` (pexpect-like) until QEMU exits after a complete
    install. `failed_downloads()` lists URLs the build's servers could not deliver;
    `late_status()` is "ok", "failed:<step>" or None (late command not run yet)."""
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    screen = ""              # the recent console text (holds the current question)
    pending = ""             # console text of the line not yet complete
    progress = Progress(report)
    # a line end or a percentage also returns, so progress is reported as it happens
    patterns = [PROMPT_RE, PANIC_RE, pexpect.EOF, pexpect.TIMEOUT, re.compile(r"\d%|\n")]
    while True:
        left = deadline - (time.monotonic() - started)
        if left <= 0:
            raise InstallerStalled(f"the installer did not finish within {deadline / 60:.0f} minutes",
                                   _tail(tail))
        i = console.expect(patterns, timeout=min(stall_timeout, left))
        chunk = _text(console.before) + (_text(console.after) if i in (0, 1, 4) else "")
        screen = (screen + chunk)[-20000:]
        progress.feed(clean(chunk))
        pending += chunk
        if "\n" in pending or i != 4:
            done, _, pending = pending.rpartition("\n") if i == 4 else (pending, "", "")
            tail.extend(l for l in clean(done).split("\n") if _worth_showing(l, progress))
        if i == 4:
            continue
        if i == 0:
            _question(screen, tail, failed_downloads, late_status)
        elif i == 1:
            raise InstallerCrashed(f"the installer's kernel panicked: {console.after.strip()}", _tail(tail))
        elif i == 2:
            status = late_status()
            if status == "ok":
                report("installer: finished, machine powered off")
                return
            if status and status.startswith("failed"):
                raise LateCommandFailed(f"the late command failed ({status.partition(':')[2]}); "
                                        "QEMU exited", _tail(tail))
            failed = failed_downloads()
            if failed:
                raise InstallerDownloadFailed("the installer stopped after failed downloads: "
                                              + ", ".join(failed), _tail(tail))
            raise InstallerExited("QEMU exited before the installation finished "
                                  "(the late command never reported)", _tail(tail))
        elif i == 3 and time.monotonic() - started < deadline:
            raise InstallerStalled(f"no installer output for {stall_timeout / 60:.0f} minutes "
                                   f"(last stage: {progress.title or 'none'})", _tail(tail))


def _question(screen, tail, failed_downloads, late_status) -> None:
    question = question_text(screen)
    status = late_status()
    if status and status.startswith("failed"):
        raise LateCommandFailed(f"the late command failed ({status.partition(':')[2]}); the installer asks:\n"
                                f"{question}", _tail(tail))
    failed = failed_downloads()
    if is_download_failure(question) or (failed and "preseed" in question.lower()):
        urls = "\n".join(f"  {u}" for u in failed) or "  (no failed request was seen by the build's servers)"
        raise InstallerDownloadFailed(f"the installer could not download what it needs; it asks:\n"
                                      f"{question}\nfailed downloads:\n{urls}", _tail(tail))
    raise PreseedUnansweredQuestion(f"the preseed does not answer this installer question:\n{question}",
                                    _tail(tail))


def _worth_showing(line: str, progress: Progress) -> bool:
    """Lines for the error's console tail: the installer's own words; of the kernel's, only
    those about a crash (its boot messages would push the installer's out of the tail)."""
    if not line.strip() or line.startswith(SCREENRC_NOISE):
        return False
    return not KERNEL_LINE_RE.match(line) or bool(KERNEL_TROUBLE_RE.search(line))


def _text(x) -> str:
    return x if isinstance(x, str) else ""


def _tail(tail) -> str:
    return "\n".join(tail)
