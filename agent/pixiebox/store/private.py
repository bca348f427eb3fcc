"""Files that hold the lab's state and secrets: 0600, in directories 0700, whatever the umask.

The appliance's unit runs the agent with UMask=0077, but the agent also runs outside it (a
laptop, a container, a test, `sh -c 'umask 000; ...'`), where SQLite alone makes its database
0644 and `mkdir` makes 0777 directories. What these files hold is not for other local users:
the state database has every machine's addresses and log lines, the identity store each node's
SSH host key and k3s node password, the k3s agent token joins any host to the cluster, the API
token changes the lab, the power key logs in as root on every node. So:

- a file is created with O_CREAT and mode 0600 (a umask can only narrow that) and then set to
  exactly 0600 (a umask such as 0277 narrows it too far for the agent itself);
- a directory the agent makes for them is 0700, and so is every missing parent it makes on the
  way; a parent that exists already is left as it is, since it may be shared (/var/lib, the
  directory that also holds the served assets);
- an existing file or directory with another mode is set back, with a warning, when the agent
  opens it: a copy, an archive or a restore from backup loosens modes without anyone noticing.

One module for every writer (store.state, store.identity, the API token, the power key, the
appliance's authorized_keys), so the rule cannot drift between copies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger("pixiebox.store.private")

DIR_MODE = 0o700
FILE_MODE = 0o600


def tighten(path: Path, mode: int) -> None:
    """Set `path`'s permission bits to exactly `mode` if they are anything else (someone
    loosened them), saying so in the log."""
    current = stat.S_IMODE(path.stat().st_mode)
    if current != mode:
        os.chmod(path, mode)
        log.warning("%s had mode %o; set it to %o (it holds the lab's state or secrets)",
                    path, current, mode)  # fmt: skip


def tighten_if_present(path: Path, mode: int = FILE_MODE) -> None:
    """`tighten`, for a file that may not exist (SQLite's -wal and -shm between runs)."""
    with contextlib.suppress(FileNotFoundError):
        tighten(path, mode)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: Path, *, tighten_existing: bool = True) -> Path:
    """`path` as a directory only its owner may enter: made 0700 with any missing parents
    (each 0700 too, each made durable in its parent), an existing one set back to 0700 unless
    `tighten_existing` is False (for a directory a file of ours merely lives in, such as the
    one [api] token_file names, which may be shared)."""
    missing: list[Path] = []
    current = path
    while not current.exists() and current.parent != current:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # another writer made it meanwhile
        os.chmod(directory, DIR_MODE)  # mkdir's mode is filtered by the umask
        with contextlib.suppress(OSError):
            _fsync_dir(directory.parent)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    if tighten_existing:
        tighten(path, DIR_MODE)
    return path


def private_file(path: Path) -> bool:
    """Make `path` an empty 0600 file unless it exists (then set it back to 0600): for a file
    another library fills, such as SQLite, which would otherwise create it 0644. True when this
    call created it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        tighten(path, FILE_MODE)
        return False
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return True


def _write_temp(path: Path, text: str) -> Path:
    """`text` in a new 0600 file beside `path`, fsynced; its name."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # O_CREAT's mode is filtered by the umask
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return temp


def create_file_once(path: Path, text: str) -> bool:
    """Write `text` to `path` unless it exists: whole or not at all, mode 0600.

    True when this call created the file, False when another writer got there first (then
    theirs stands: a secret handed out once must never change)."""
    temp = _write_temp(path, text)
    try:
        try:
            os.link(temp, path)  # unlike rename, never replaces an existing file
        except FileExistsError:
            return False
        except OSError:
            # A file system without hard links: rename, which the store's lock serialises
            # within this agent (and only one agent owns a state directory).
            if path.exists():
                return False
            os.replace(temp, path)
        _fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def replace_file(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically, mode 0600 from the first byte: never a moment in
    which another user could open it (a file written first and chmodded after can be opened,
    and the descriptor kept, in between)."""
    temp = _write_temp(path, text)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):
        _fsync_dir(path.parent)
