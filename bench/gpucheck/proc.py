"""Run one command in its own process group, with a timeout that asks before it kills.

Why this shape: a stage that overruns must lose as little as possible. pytest writes its summary,
--durations and junit.xml only when it ends by itself or on KeyboardInterrupt, and the stage
scripts here write their partial JSON on KeyboardInterrupt, so an overrun first gets SIGINT
(to the stage's main process only: pytest-xdist's controller then shuts its workers down itself),
then `grace` seconds, then SIGKILL for the whole process group. Each command runs in a new
session, so its group holds exactly what it started (xdist workers, spawn pools, the target of
compute-sanitizer) and one hang cannot outlive its stage. After the main process exits, whatever
it left behind in its group is killed too: a stray worker would hold the GPU for later stages.

The main process is waited for without being reaped (waitid WNOWAIT) until its group has been
cleaned, so its process id, which is the group id, cannot be reused by an unrelated process in
between.
"""

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

POLL_S = 0.1
# After SIGKILL, how long to wait for the main process to be reaped: a process in an
# uninterruptible driver call (a CUDA context being torn down) dies when the call returns; the
# check must not wait on it forever.
REAP_S = 8.0


@dataclass
class Outcome:
    """How a command ended. returncode is the exit status (negative: killed by that signal)."""

    returncode: Optional[int]
    timed_out: bool
    seconds: float
    signals: List[str] = field(default_factory=list)  # e.g. "SIGINT at 120.0 s"

    @property
    def killed(self) -> bool:
        return any(s.startswith("SIGKILL") for s in self.signals)


def _exited(pid: int) -> bool:
    """Whether the child has exited, leaving it unreaped (a zombie keeps its pid reserved)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # already reaped
        return True
    return info is not None


def _wait_exit(pid: int, seconds: float) -> bool:
    """Poll until the child exits or `seconds` pass; True if it exited."""
    end = time.monotonic() + max(0.0, seconds)
    while True:
        if _exited(pid):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(POLL_S)


def _session_members(sid: int) -> List[int]:
    """Processes of session `sid` (from /proc; empty where there is no /proc)."""
    members = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return members
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and fields[3] == str(sid):   # state ppid pgrp session ...
            members.append(int(name))
    return members


def _kill_group(pgid: int) -> None:
    """SIGKILL the command's process group, and whatever of its session left the group (a
    launcher such as compute-sanitizer may give its target a group of its own; only setsid
    leaves the session, which nothing here does)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group
    for pid in _session_members(pgid):   # the command's pid is its group's and session's id
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run(cmd: Sequence[str], *, timeout: float, grace: float, log_path: str,
        env: Optional[dict] = None, cwd: Optional[str] = None, header: str = "") -> Outcome:
    """Run cmd with stdout and stderr appended to log_path; stop it after `timeout` seconds.

    On timeout: SIGINT to the main process, up to `grace` seconds for it to write what it has,
    then SIGKILL to its process group. If the caller is interrupted (KeyboardInterrupt, or an
    exception raised by a SIGTERM handler) the command is stopped the same way, with a grace of
    at most 5 s, and the exception propagates.
    """
    start = time.monotonic()
    signals: List[str] = []
    with open(log_path, "ab") as log:
        if header:
            log.write(header.encode())
            log.flush()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(grace_s: float) -> None:
        signals.append(f"SIGINT at {time.monotonic() - start:.1f} s")
        try:
            os.kill(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        if not _wait_exit(proc.pid, grace_s):
            signals.append(f"SIGKILL at {time.monotonic() - start:.1f} s")

    def reap() -> Optional[int]:
        try:
            return proc.wait(timeout=REAP_S)
        except subprocess.TimeoutExpired:
            signals.append(f"not reaped {REAP_S:g} s after SIGKILL")
            return None

    timed_out = False
    try:
        if not _wait_exit(proc.pid, timeout):
            timed_out = True
            stop(grace)
    except BaseException:
        try:
            stop(min(grace, 5.0))
        finally:  # a second signal during the grace must not leave the group running
            _kill_group(proc.pid)
            reap()
        raise
    _kill_group(proc.pid)  # leftovers (or, after a refused SIGINT, everything)
    code = reap()
    return Outcome(returncode=code, timed_out=timed_out, seconds=time.monotonic() - start,
                   signals=signals)
