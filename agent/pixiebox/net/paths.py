"""Names a client sends, mapped onto a served directory: the one confinement rule for TFTP and
boot HTTP.

A client names a file relative to a served directory, the *root*. The name is split on `/`;
empty and `.` segments are dropped, so a leading `/` names the root (firmware asks for
`/ipxe.efi`), never the disk's `/`, and `//` is a client joining URLs carelessly, not an
escape. A `..` segment is refused outright, even one that would stay inside: no boot loader
needs it, and refusing it needs no look at the disk. A NUL cannot be in a file name.

The symlink rule, the same for both protocols: **a link is followed only when the file it
finally leads to is inside the root's real path.** It is checked twice: os.path.realpath
before opening catches a link leaving the root even when its target is missing, and
/proc/self/fd after opening names the file actually opened, so a link swapped in between the
two is caught too (stat_file, for a server that opens by path, hands out the resolved path,
with no link left in it to swap). Why this rule, and not "never follow" or "follow any": lab
assets are built with links that stay inside (`current -> vmlinuz-6.1`, a release directory
linked in), while a link out of the root (`passwd -> /etc/passwd`) is the classic way a
writable asset directory leaks the server's own files. Before, boot HTTP's /ipxe/ followed any
link in the assets' ipxe/ directory while TFTP refused one leading out of it; the stricter
rule now holds for both.

One exception, which the caller declares (core.firmware.Assets.places marks Debian's ipxe
directory) and this module never guesses: a *package directory* (`packaged=True`), written
only by the package manager, e.g. /usr/lib/ipxe, whose ipxe.efi is a link to /boot/ipxe.efi.
There links may lead anywhere readable; the name itself must still stay inside (no `..`).

A refusal carries a short `reason` code and a `detail` for the server's log (it may name server
paths). Neither goes to the client: TFTP and HTTP tell it only "not found" or "access denied"
(SECURITY.md).

Imports nothing of pixiebox.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: no-name: nothing left after dropping `/`, `.`; climbs-out: a `..` segment or a NUL;
#: outside: a link leads out of the root; not-a-file: a directory, FIFO, device...;
#: unreadable: permission denied or another open error.
Reason = Literal["no-name", "climbs-out", "outside", "not-a-file", "unreadable"]


class PathRefused(Exception):
    """A name that may not be served: `reason` (see Reason), `detail` for the log; `target`
    is the real path it led to and `error` the system's word (strerror), when there are any."""

    def __init__(
        self, reason: Reason, detail: str, *, target: str | None = None, error: str = ""
    ) -> None:
        super().__init__(detail)
        self.reason: Reason = reason
        self.detail = detail
        self.target = target
        self.error = error


def split(name: str) -> list[str]:
    """`name`'s segments, empty and `.` ones dropped, as a file system would: for comparing
    names (a config's path with a requested one), never for opening (that is `segments`)."""
    return [part for part in name.split("/") if part not in ("", ".")]


def segments(name: str) -> list[str]:
    """The path segments of a client's `name`, or PathRefused (no-name, climbs-out)."""
    parts = split(name)
    if ".." in parts:
        raise PathRefused("climbs-out", "the path contains '..'")
    if any("\0" in part for part in parts):
        raise PathRefused("climbs-out", "the path contains a NUL byte")
    if not parts:
        raise PathRefused("no-name", "the name is empty or a directory")
    return parts


def inside(path: str, directory: str) -> bool:
    """`path` is `directory` or under it (both absolute and normalised)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def resolve(root: Path | str, name: str, *, packaged: bool = False) -> str:
    """The real path `name` leads to under `root` (the file need not exist), or PathRefused.

    With `packaged`, links are not resolved: only the name is held to the root."""
    parts = segments(name)
    base = os.path.realpath(root)
    joined = os.path.join(base, *parts)
    real = os.path.normpath(joined) if packaged else os.path.realpath(joined)
    if not inside(real, base):
        detail = f"{'/'.join(parts)} leads outside {base} (to {real})"
        raise PathRefused("outside", detail, target=real)
    return real


@dataclass(frozen=True, slots=True)
class Place:
    """A directory boot files are looked up in. A name under `prefix` ("ipxe/") is looked up
    here without it, any other name as it is: "ipxe/undionly.kpxe" and "undionly.kpxe" both
    find `directory`/undionly.kpxe. `packaged`: a package directory (see the module's
    symlink rule)."""

    directory: Path
    prefix: str = ""
    packaged: bool = False

    def relative(self, name: str) -> str:
        stripped = self.prefix.strip("/")
        if stripped and name.startswith(stripped + "/"):
            return name[len(stripped) + 1 :]
        return name


def candidates(places: Sequence[Place], name: str) -> Iterator[tuple[Place, str]]:
    """Where `name` is looked for, in order: each place with the name relative to it. The
    first place that has the file, or refuses it, decides; a refusal does not fall through to
    the next place (a link out of the root must not turn into "served from elsewhere")."""
    for place in places:
        yield place, place.relative(name)


@dataclass(slots=True)
class Opened:
    """A regular file opened for reading (blocking, close-on-exec): its descriptor, size and
    the path as it was named under the root, for log lines."""

    fd: int
    size: int
    path: str


def open_file(root: Path | str, name: str, *, packaged: bool = False) -> Opened | None:
    """`name` under `root` opened for reading; None when there is no such file, PathRefused
    when it may not be served (see the module's symlink rule)."""
    real = resolve(root, name, packaged=packaged)
    shown = os.path.join(root, *segments(name))
    try:
        # O_NONBLOCK: a FIFO planted in the root must not hang the server on open.
        fd = os.open(real, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError as exc:
        detail = f"{shown} is not readable"
        raise PathRefused("unreadable", detail, target=real, error=exc.strerror or "") from None
    except OSError as exc:
        detail = f"{shown} cannot be opened: {exc.strerror}"
        raise PathRefused("unreadable", detail, target=real, error=exc.strerror or "") from None
    try:
        if not packaged:
            with contextlib.suppress(FileNotFoundError):  # no /proc: the realpath check stands
                opened = os.readlink(f"/proc/self/fd/{fd}")
                base = os.path.realpath(root)
                if not inside(opened, base):
                    detail = f"{shown} leads outside {base} (to {opened})"
                    raise PathRefused("outside", detail, target=opened)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PathRefused("not-a-file", f"{shown} is not a regular file", target=real)
        # A regular file never blocks; callers read it at offsets (os.preadv, sendfile).
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return Opened(fd, info.st_size, shown)


def stat_file(
    root: Path | str, name: str, *, packaged: bool = False
) -> tuple[Path, os.stat_result | None]:
    """The real path of `name` under `root` and its stat, None when there is no such file; for
    a server that opens by path (boot HTTP's FileResponse). PathRefused as for open_file."""
    real = resolve(root, name, packaged=packaged)
    try:
        result = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        return Path(real), None
    except OSError as exc:
        detail = f"{real} cannot be read: {exc.strerror}"
        raise PathRefused("unreadable", detail, target=real, error=exc.strerror or "") from None
    if not stat.S_ISREG(result.st_mode):
        raise PathRefused("not-a-file", f"{real} is not a regular file", target=real)
    return Path(real), result


def printable(name: str) -> str:
    """A name a client sent, safe for one log line: undecodable bytes and control characters
    escaped, so a requested path cannot forge a second log line or drive the terminal that
    shows the journal."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
