"""Helper commands for the virtual lab: run one bounded, kill a process group, poll for a
condition, find a tool in the sbin directories.

Every command runs in its own session so that a timeout kills the whole tree it started (``ip
netns exec`` forks the real program; killing only the leader would leave it running inside a
namespace that then cannot be deleted).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Seconds between SIGTERM and SIGKILL when stopping a process group.
KILL_GRACE = 3.0
#: Default bound for one helper command (ip, sysctl, ss, ...).
COMMAND_TIMEOUT = 15.0


class CommandError(subprocess.CalledProcessError):
    """A helper command failed; ``str()`` includes its output."""

    def __str__(self) -> str:
        out = (self.stdout or "").strip()
        err = (self.stderr or "").strip()
        return f"{super().__str__()}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"


# --------------------------------------------------------------------------- processes


def run_command(
    argv: Sequence[str],
    *,
    timeout: float = COMMAND_TIMEOUT,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a new session, captured, text mode, killed as a group on timeout."""
    args = [str(a) for a in argv]
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        kill_process_group(proc)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr) from exc
    except BaseException:
        kill_process_group(proc)
        raise
    result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, args, stdout, stderr)
    return result


def kill_process_group(proc: subprocess.Popen[Any], grace: float = KILL_GRACE) -> int | None:
    """SIGTERM the process group led by ``proc``, wait ``grace`` s, then SIGKILL it.

    Only signals the group while the leader has not been reaped (so the group id
    cannot have been recycled).  Returns the exit status, or None if it never died.
    """
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.1,
    message: str = "",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError (with ``message``) once ``timeout`` seconds have passed.
    Exceptions raised by the predicate propagate.
    """
    interval = max(interval, 0.01)
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    value = predicate()
    if value:
        return value
    raise AssertionError(f"timed out after {timeout:g}s waiting: {message or predicate!r}")


def tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return data[-limit:].decode("utf-8", "replace")


def tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for base in ("/usr/sbin", "/sbin", "/usr/bin"):
        candidate = Path(base, name)
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(name)
