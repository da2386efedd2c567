"""Build progress: one line per stage with elapsed seconds, tool output streamed with -v.

Every external tool a build runs goes through `Progress.run`, so a failure names the stage and
shows the tool's last lines, and `-v` shows everything as it happens."""
from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import time

from . import procs
from .errors import BuildError


class Progress:
    def __init__(self, verbose: bool = False, out=None):
        self.verbose = verbose
        self.out = out or sys.stderr
        self.start = time.monotonic()
        self.stage_name: str | None = None
        self.timings: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", file=self.out, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = ""):
        """`with progress.stage("base layer"):` prints the stage and, at the end, its duration."""
        self.stage_name = name
        t0 = time.monotonic()
        self.say(f"{name}{': ' + detail if detail else ''} ...")
        try:
            yield self
        except BaseException:
            self.say(f"{name}: failed after {time.monotonic() - t0:.1f}s")
            raise
        took = time.monotonic() - t0
        self.timings[name] = round(took, 1)
        self.say(f"{name}: done in {took:.1f}s")

    def run(self, cmd: list[str], *, env: dict | None = None, input: bytes | None = None,
            what: str | None = None, cwd=None, grace: float = 10.0) -> str:
        """Run a tool; stream its output with -v, keep the last lines for the error message.
        The tool runs in its own process group; on Ctrl-C, SIGTERM or any error while it runs,
        the whole group gets SIGTERM and, `grace` seconds later, SIGKILL: helpers it started
        (mmdebstrap's apt, dpkg, ...) do not outlive the build."""
        what = what or f"{self.stage_name or 'build'}: {os.path.basename(cmd[0])}"
        full_env = {**os.environ, **(env or {})}
        tail: collections.deque[str] = collections.deque(maxlen=40)
        lines: list[str] = []
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                preexec_fn=procs.child_preexec)
        try:
            if input is not None:
                proc.stdin.write(input)
                proc.stdin.close()
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                tail.append(line)
                lines.append(line)
                if self.verbose:
                    print(f"    {line}", file=self.out, flush=True)
            rc = proc.wait()
        except BaseException:
            # Ctrl-C or SIGTERM: neither the tool nor its children may outlive the build
            procs.stop_group(proc, grace)
            raise
        if rc != 0:
            raise BuildError(f"{what} failed (exit status {rc}): {' '.join(cmd[:6])}"
                             f"{' ...' if len(cmd) > 6 else ''}\n" + "\n".join(tail))
        return "\n".join(lines)
