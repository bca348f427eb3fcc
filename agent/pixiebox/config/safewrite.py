"""Reading and replacing lab.toml safely: a lock, a stamp, an atomic rename.

Writes are atomic (temp file with the original's mode and owner, fsync, rename, fsync of the
directory: a crash leaves the old file or the new one, never a part of one) and serialised by a
lock file next to lab.toml, so two enrollments at once both land. A file changed by someone
else between the read and the rename (an editor saving) wins: nothing is written over it.

Modes (issue 12): lab.toml is the user's file, so an edit keeps the mode and owner it has; the
temp file is made 0600 by mkstemp and given them before a byte is written, so it is never
looser than the original meanwhile. Nothing here creates lab.toml (a missing file is an
error), so there is no new file whose mode to choose; the user decides who may read it (on the
appliance it lies on the stick's FAT partition, whose mount options set the modes). The lock
file holds nothing and is made at most 0644 on purpose: flock works on a read-only descriptor,
so a lock file made by root can still serve a user's `pixiebox enroll`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pixiebox.config.problems import EnrollError, Problem


def real_path(path: Path | str) -> Path:
    """The file itself: a symlinked lab.toml is written through, not replaced by a file."""
    return Path(os.path.realpath(path))


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """An exclusive flock on `.lab.toml.lock` for read-check-write (flock works on a read-only
    descriptor, so a lock file created by another user still serves)."""
    try:
        fd = os.open(lock_path(target), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise os_error("cannot lock", target, exc) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def os_error(what: str, target: Path, exc: OSError) -> EnrollError:
    reason = exc.strerror or str(exc)
    return EnrollError(
        [
            Problem(
                (),
                f"{what} {target}: {reason}",
                "check the permissions of the file and its directory",
            )
        ]
    )


@dataclass(frozen=True)
class _Stamp:
    device: int
    inode: int
    size: int
    mtime_ns: int


def _stamp(stat: os.stat_result) -> _Stamp:
    return _Stamp(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def read(target: Path) -> tuple[str, os.stat_result]:
    """The text exactly as stored (no newline translation) and the stat it was read at."""
    try:
        with open(target, "rb") as file:
            stat = os.fstat(file.fileno())
            raw = file.read()
    except FileNotFoundError:
        raise EnrollError(
            [Problem((), f"no such file: {target}", "pass --config PATH or set PIXIEBOX_CONFIG")]
        ) from None
    except OSError as exc:
        raise os_error("cannot read", target, exc) from exc
    try:
        return raw.decode("utf-8"), stat
    except UnicodeDecodeError as exc:
        raise EnrollError([Problem((), f"cannot read {target}: {exc}")]) from None


def replace_checked(
    target: Path, candidate: str, before: os.stat_result, check: Callable[[Path], None]
) -> None:
    """Write `candidate` to a temp file beside `target`, have `check` read it there (it raises
    EnrollError to refuse), then rename it over `target` unless `target` changed since it was
    read (`before`, from `read`).

    The temp file is written, flushed and fsynced with the original's mode and owner before
    the rename, and the directory is fsynced after it: a crash leaves the old or the new file,
    never a part of one. The temp file is removed on any failure."""
    directory = target.parent
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise os_error("cannot write beside", target, exc) from exc
    temp = Path(temp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as file:
                _copy_owner_and_mode(file.fileno(), before)
                file.write(candidate.encode("utf-8"))
                file.flush()
                os.fsync(file.fileno())
            check(temp)
            try:
                now = _stamp(os.stat(target))
            except FileNotFoundError:
                now = None
            if now != _stamp(before):
                raise EnrollError(
                    [
                        Problem(
                            (),
                            f"{target} was changed by someone else meanwhile; nothing was written",
                            "try again",
                        )
                    ]
                )
            os.replace(temp, target)
        except OSError as exc:
            raise os_error("cannot write", target, exc) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    _fsync_directory(directory)


def _copy_owner_and_mode(fd: int, stat: os.stat_result) -> None:
    os.fchmod(fd, stat.st_mode & 0o7777)
    if (stat.st_uid, stat.st_gid) == (os.geteuid(), os.getegid()):
        return
    try:
        os.fchown(fd, stat.st_uid, stat.st_gid)
    except PermissionError:
        # Not root: keep at least the group when we are in it.
        with contextlib.suppress(PermissionError):
            os.fchown(fd, -1, stat.st_gid)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable. The new file is in place already: a filesystem that cannot
    sync a directory is no reason to report the change as failed."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
