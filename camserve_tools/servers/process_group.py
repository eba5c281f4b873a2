"""A server as one process group: started in a session of its own, its pid in a pid file, stopped by that pid.

Every launcher here (TorchServe, KServe's model server, the KServe front, each Ray node) starts its server this way,
so that one signal to the group reaches the server and every process it forked (TorchServe's Python workers), and
nothing else on the machine: nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

# How often a stop looks whether the group is gone.
POLL_S = 0.25
# After SIGKILL the kernel ends the group at once; this only bounds the wait for it.
KILL_WAIT_S = 10.0


def start_in_own_session(
    command: Sequence[str], *, env: dict[str, str], cwd: Path, log: Path, pid_file: Path | None = None
) -> subprocess.Popen:
    """`command` in a new session (its own process group, led by it), stdout and stderr appended to `log`; its pid
    written to `pid_file`, so that another process (`make stop`) can stop it later."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    if pid_file is not None:
        pid_file.write_text(str(process.pid))
    return process


def recorded_pid(process: subprocess.Popen | None, pid_file: Path) -> int | None:
    """The group to stop: the process this object started, else the one its pid file names, else None."""
    if process is not None:
        return process.pid
    if pid_file.exists():
        return int(pid_file.read_text())
    return None


def signal_group(group: int, signum: int) -> bool:
    """`signum` to every process of `group`; False when no process of it is left (0 only asks)."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    return True


def _wait_for_exit(group: int, process: subprocess.Popen | None, timeout: float) -> bool:
    """Until no process of `group` is left, at most `timeout` s; whether it is gone. Its leader, when this process
    started it, is reaped on the way: a zombie leader would still count as a member of its group."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None:
            process.poll()
        else:
            with contextlib.suppress(ChildProcessError):  # the leader is not a child of this process
                os.waitpid(group, os.WNOHANG)
        if not signal_group(group, 0):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)


def stop_group(group: int, process: subprocess.Popen | None = None, grace: float = 30.0) -> None:
    """SIGTERM to the group, SIGKILL to whatever of it is left after `grace` s; returns once every process of the
    group is gone (a server still winding down could otherwise write into a run dir being reused)."""
    if signal_group(group, signal.SIGTERM) and not _wait_for_exit(group, process, grace):
        signal_group(group, signal.SIGKILL)
        _wait_for_exit(group, process, KILL_WAIT_S)
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=KILL_WAIT_S)


def stop_recorded(process: subprocess.Popen | None, pid_file: Path, grace: float = 30.0) -> bool:
    """Stop the group of `process` (or of the pid in `pid_file`) and remove the pid file; False when there was none."""
    group = recorded_pid(process, pid_file)
    if group is None:
        return False
    stop_group(group, process, grace)
    pid_file.unlink(missing_ok=True)
    return True


def signal_processes(processes: list[psutil.Process], signum: int, timeout: float) -> list[psutil.Process]:
    """`signum` to each of `processes`, by pid (servers that leave their session, like Ray's workers, are found
    otherwise and stopped this way); then wait up to `timeout` s, reaping those that are ours. Those still alive."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive
