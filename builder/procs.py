"""Never leave a child QEMU (or a temp dir) behind: cleanup on exit, Ctrl-C and SIGTERM.

Objects with a `.cleanup()` method register themselves with `track(obj)` and `untrack(obj)`
when done. On normal exit (atexit), SIGTERM, SIGHUP and SIGINT every tracked object is
cleaned up, then the signal is passed on to whatever handler was there before (so SIGINT
still raises KeyboardInterrupt and SIGTERM still terminates the process with its usual
status). Children started with `child_preexec` also get SIGKILL from the kernel if we die
without a chance to clean up (SIGKILL, crash).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import threading
import time

_lock = threading.RLock()
_tracked: list = []
_previous: dict[int, object] = {}
_installed = False

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def track(obj) -> None:
    """Clean up `obj` (anything with .cleanup()) if the process exits or is signalled."""
    with _lock:
        _install()
        _tracked.append(obj)


def untrack(obj) -> None:
    with _lock:
        if obj in _tracked:
            _tracked.remove(obj)


def cleanup_all() -> None:
    with _lock:
        objs = list(reversed(_tracked))
        _tracked.clear()
    for obj in objs:
        try:
            obj.cleanup()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def _on_signal(signum, frame):
    cleanup_all()
    prev = _previous.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)  # e.g. default_int_handler -> KeyboardInterrupt
        return
    if prev == signal.SIG_IGN:
        return
    # SIG_DFL: restore it and re-deliver, so the exit status says "killed by SIGTERM".
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install() -> None:
    global _installed
    if _installed:
        return
    atexit.register(cleanup_all)
    if threading.current_thread() is threading.main_thread():
        for sig in HANDLED:
            prev = signal.getsignal(sig)
            if prev is _on_signal:
                continue
            _previous[sig] = prev
            signal.signal(sig, _on_signal)
    _installed = True


_PR_SET_PDEATHSIG = 1


def child_preexec() -> None:
    """preexec_fn for children: own process group, SIGKILL when the parent thread dies."""
    os.setpgrp()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a child's whole process group (it leads its own, see child_preexec)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process (zombies included) is still in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a child started with `child_preexec` and everything it started in its process
    group (e.g. mmdebstrap's apt and dpkg): SIGTERM to the group, SIGKILL to whatever is still
    there after `grace` seconds. Reaps the child."""
    kill_group(proc.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    # the group's id stays reserved while the group has members, so polling it is safe
    while time.monotonic() < end and (proc.poll() is None or group_alive(proc.pid)):
        time.sleep(0.05)
    kill_group(proc.pid, signal.SIGKILL)
    proc.wait()
