"""Progress.run stops a tool together with everything the tool started (mmdebstrap's apt, dpkg...)
when the build is interrupted: the tool runs in its own process group, which gets SIGTERM and,
after a grace period, SIGKILL. Real processes: a shell script whose background `sleep` plays the
grandchild, run by Progress in a separate Python process that is sent SIGTERM like a build."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder import paths
from builder.errors import BuildError
from builder.progress import Progress

# What a build does: SIGTERM unwinds like Ctrl-C (builder.build._sigterm_as_interrupt).
RUNNER = r"""
import signal, sys
from builder.progress import Progress
def interrupt(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, interrupt)
try:
    Progress(out=sys.stderr).run(["sh", sys.argv[1]], grace=float(sys.argv[2]))
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""

# {setup} runs first; the shell then starts a grandchild and waits for it. "$$ $!": the
# shell's pid (its group's id when it leads its own group) and the grandchild's.
CHILD = """{setup}
sleep 300 &
echo "$$ $!" > {pids}.tmp && mv {pids}.tmp {pids}
wait
"""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a pid, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[2])


def _running_in_group(pgid: int) -> list[int]:
    """Pids of live (not zombie) processes in process group `pgid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st and st[1] == pgid and st[0] != "Z":
                out.append(int(entry.name))
    return out


def _interrupt_while_running(tmp_path: Path, setup: str, grace: float) -> tuple[int, int, str]:
    """Run the child script under Progress in a runner process, SIGTERM the runner once the
    grandchild exists. Returns (child's process group, grandchild pid, runner's output)."""
    pids = tmp_path / "pids"
    script = tmp_path / "child.sh"
    script.write_text(CHILD.format(setup=setup, pids=pids))
    env = {**os.environ, "PYTHONPATH": str(paths.ROOT)}
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(script), str(grace)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    grandchild = None
    try:
        end = time.monotonic() + 60
        while not pids.exists():
            assert runner.poll() is None, runner.communicate()[0]
            assert time.monotonic() < end, "the child script never started its grandchild"
            time.sleep(0.05)
        shell, grandchild = map(int, pids.read_text().split())
        pgid = _stat(grandchild)[1]
        # the tool leads its own process group, which its children share
        assert pgid == shell and pgid != os.getpgrp()
        runner.send_signal(signal.SIGTERM)
        out, _ = runner.communicate(timeout=120)
        return pgid, grandchild, out
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        if grandchild and _stat(grandchild) and _stat(grandchild)[0] != "Z":
            os.kill(grandchild, signal.SIGKILL)     # leave nothing behind, whatever failed


def test_interrupt_stops_the_tool_and_its_children(tmp_path):
    marker = tmp_path / "got-sigterm"
    # the tool is asked first (SIGTERM): it may clean up before it goes
    pgid, grandchild, out = _interrupt_while_running(
        tmp_path, f"trap 'echo yes > {marker}; exit 143' TERM", grace=30)
    assert "interrupted" in out, out
    assert marker.read_text() == "yes\n"
    assert _running_in_group(pgid) == []
    assert _stat(grandchild) is None or _stat(grandchild)[0] == "Z"


def test_children_ignoring_sigterm_get_sigkill_after_the_grace_period(tmp_path):
    # `trap '' TERM`: the shell and the sleep it starts ignore SIGTERM
    pgid, grandchild, out = _interrupt_while_running(tmp_path, "trap '' TERM", grace=1)
    assert "interrupted" in out, out
    assert _running_in_group(pgid) == []
    assert _stat(grandchild) is None or _stat(grandchild)[0] == "Z"


def test_a_failing_tool_names_the_stage_and_shows_its_last_lines(tmp_path):
    progress = Progress(out=open(os.devnull, "w"))
    with progress.stage("base layer"), pytest.raises(BuildError) as e:
        progress.run(["sh", "-c", "echo first; echo last words >&2; exit 3"])
    assert "base layer: sh failed (exit status 3)" in str(e.value)
    assert str(e.value).endswith("first\nlast words")
