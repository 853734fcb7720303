"""Child processes that die with their parent, and whether a recorded process still runs.

No prefect or mlflow import: the CLI uses this before it imports either. Linux details (prctl, /proc)
degrade to no-ops elsewhere.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket

_PR_SET_PDEATHSIG = 1


def _libc_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the parent's normal exit paths still stop the child
        return None


# resolved here, in the parent: the forked child only calls it (no dynamic loading between fork and exec)
_PRCTL = _libc_prctl()


def die_with_parent() -> None:
    """For `subprocess.Popen(preexec_fn=...)`: the kernel sends SIGTERM to the child when the thread that
    started it dies, kill -9 included, so no server or launcher outlives the `stage1` that started it."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None when it does not exist. Together
    with the pid it names one process: pids are reused, start times are not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing parenthesis
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, start_time: str | None) -> bool:
    """Whether the process recorded as (pid, start_time) still runs on this machine (zombies count as dead)."""
    if pid <= 0:
        return False
    if os.path.isdir("/proc"):
        now = process_start_time(pid)
        if now is None or (start_time is not None and now != start_time):
            return False
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                state = fh.read().decode(errors="replace").rsplit(")", 1)[-1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_process() -> dict[str, str | int | None]:
    """What a record needs to tell later whether this process is still alive."""
    return {"pid": os.getpid(), "pid_start": process_start_time(os.getpid()), "host": socket.gethostname()}
