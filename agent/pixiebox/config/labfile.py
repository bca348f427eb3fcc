"""Changing lab.toml without losing anything the user wrote.

lab.toml is the user's file: enrolling a machine (`pixiebox enroll`, the API, `[boot] unknown =
"enroll"`) or changing one must leave every comment, blank line, key order, quoting style and
line ending outside the edited text byte-for-byte as it was. So edits are made on the text, as
insertions and replacements at positions found by a small scanner of the file's statements;
values are rendered by tomlkit. tomlkit's own document editing is not used for placement:
appending to an array of tables moves the comments that lead the next table, writes "\\n" into
a CRLF file and glues the new header to a last line without a newline.

Every edit is checked before anything is written: the edited text must parse to the same data
as before plus exactly the change, and the whole file must pass `check_config`, so a duplicate
MAC, name or address is refused with the messages `pixiebox check` gives. Writes are atomic
(temp file, fsync, rename, fsync of the directory) and serialised by a lock file next to
lab.toml, so two enrollments at once both land.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import itertools
import os
import re
import tempfile
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path, PurePath
from typing import Any, Literal, NoReturn

import tomlkit

from pixiebox.config import (
    LabConfig,
    Loc,
    MachineSection,
    Problem,
    check_config,
    format_problem,
    normalize_mac,
)

MACHINE_KEYS: tuple[str, ...] = tuple(MachineSection.model_fields)  # name, mac, ip, image, power
_MAC_HINT = 'write six hex pairs, e.g. "f4:4d:30:64:7a:3a" (dashes and dots also work)'


@dataclass(frozen=True)
class Enrollment:
    name: str
    mac: str
    ip: IPv4Address | None
    line: int  # the line of the new [[machines]] header (of the new entry in `machines = [...]`)


class EnrollError(Exception):
    """The change was refused and nothing was written; `problems` says why, each with its key
    path, a hint and (when it is in the file as it is) a line, like `pixiebox check`."""

    def __init__(self, problems: list[Problem], path: Path | None = None) -> None:
        self.problems = problems
        self.path = path
        where = path if path is not None else Path("lab.toml")
        super().__init__("\n".join(format_problem(where, p) for p in problems))


# --- choosing names and addresses ---------------------------------------------------------


def next_free_name(config: LabConfig, prefix: str = "node") -> str:
    """prefix1, prefix2, … : the first one no machine has."""
    used = {machine.name for machine in config.machines}
    number = 1
    while f"{prefix}{number}" in used:
        number += 1
    return f"{prefix}{number}"


def next_free_ip(config: LabConfig, used: Iterable[IPv4Address] = ()) -> IPv4Address | None:
    """The lowest host address of [network] subnet that nothing else has: not the network or
    broadcast address, the gateway, the server, the pool, a machine's ip, nor one of `used`
    (the leases handed out). None when there is none, or no subnet is configured."""
    network = config.network
    subnet = network.subnet
    if subnet is None:
        return None
    taken = {int(address) for address in used}
    taken |= {int(m.ip) for m in config.machines if m.ip is not None}
    taken |= {int(a) for a in (network.gateway, network.server_ip) if a is not None}
    pool = network.pool
    candidate = int(subnet.network_address) + 1
    last = int(subnet.broadcast_address) - 1
    while candidate <= last:
        if pool is not None and int(pool.first) <= candidate <= int(pool.last):
            candidate = int(pool.last) + 1
        elif candidate in taken:
            candidate += 1
        else:
            return IPv4Address(candidate)
    return None


# --- the public edits ----------------------------------------------------------------------


def enroll(
    path: Path,
    mac: str,
    name: str | None = None,
    ip: str | None = None,
    *,
    image: str | None = None,
    power: dict[str, object] | None = None,
) -> Enrollment:
    """Add a machine to lab.toml: a `[[machines]]` block after the last one (or at the end of
    the file), or an entry at the end of `machines = [...]`. The name defaults to the next free
    nodeN; the MAC may be spelled any usual way. Raises EnrollError (nothing written) when the
    resulting file would not pass `pixiebox check`."""
    target = _target(path)
    with _refusals(target), _locked(target):
        text, before = _read(target)
        config, data = _valid_original(target, text)
        index = len(config.machines)
        try:
            canonical_mac = normalize_mac(mac)
        except ValueError as exc:
            raise EnrollError([Problem(("machines", index, "mac"), str(exc), _MAC_HINT)]) from None
        wanted = name.strip().lower() if name is not None and name.strip() else None
        fields: dict[str, object] = {
            "name": wanted or next_free_name(config),
            "mac": canonical_mac,
        }
        if ip is not None:
            fields["ip"] = str(ip).strip()
        if image is not None:
            fields["image"] = image
        if power is not None:
            fields["power"] = power
        values = _toml_fields(fields, ("machines", index))
        plan = _plan_enroll(text, _scan_checked(text, data), values)
        candidate = plan.apply(text)
        machines = data.get("machines", [])
        _verify(candidate, {**data, "machines": [*machines, values]})
        _commit(target, text, candidate, before, plan)
        line = candidate.count("\n", 0, plan.anchor) + 1
    address = IPv4Address(str(values["ip"])) if "ip" in values else None
    return Enrollment(str(values["name"]), canonical_mac, address, line)


def update_machine(path: Path, mac_or_name: str, **changes: object) -> None:
    """Change keys of one machine (found by MAC, any spelling, or by name): a value replaces
    the old one in place, a key it lacks is added among its keys, None removes the key. The
    rest of the file is kept byte-for-byte; the result must pass `pixiebox check`."""
    target = _target(path)
    with _refusals(target), _locked(target):
        text, before = _read(target)
        config, data = _valid_original(target, text)
        index = _find_machine(config, mac_or_name)
        unknown = [key for key in changes if key not in MACHINE_KEYS]
        if unknown:
            raise EnrollError(
                [
                    Problem(
                        ("machines", index, key),
                        f"unknown key {key!r}",
                        f"known keys here: {', '.join(MACHINE_KEYS)}",
                    )
                    for key in unknown
                ]
            )
        if not changes:
            return
        fields: dict[str, object] = {}
        for key, value in changes.items():
            if value is None:
                continue
            if key == "name" and isinstance(value, str):
                value = value.strip().lower()
            elif key == "mac":
                try:
                    value = normalize_mac(value)
                except ValueError as exc:
                    raise EnrollError(
                        [Problem(("machines", index, "mac"), str(exc), _MAC_HINT)]
                    ) from None
            fields[key] = value
        values = _toml_fields(fields, ("machines", index))
        removed = {key for key, value in changes.items() if value is None}
        plan = _plan_update(text, _scan_checked(text, data), index, values, removed)
        candidate = plan.apply(text)
        if candidate == text:
            return  # e.g. removing a key the machine does not have
        machines = list(data["machines"])
        entry = {k: v for k, v in machines[index].items() if k not in removed}
        machines[index] = {**entry, **values}
        _verify(candidate, {**data, "machines": machines})
        _commit(target, text, candidate, before, plan)


# --- reading, checking, writing ------------------------------------------------------------


def _target(path: Path | str) -> Path:
    """The file itself: a symlinked lab.toml is written through, not replaced by a file."""
    return Path(os.path.realpath(path))


@contextlib.contextmanager
def _refusals(target: Path) -> Iterator[None]:
    """EnrollErrors that name the file they are about."""
    try:
        yield
    except EnrollError as exc:
        if exc.path is not None:
            raise
        raise EnrollError(exc.problems, target) from exc.__cause__


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """An exclusive flock on `.lab.toml.lock` for read-check-write (flock works on a read-only
    descriptor, so a lock file created by another user still serves)."""
    try:
        fd = os.open(lock_path(target), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _os_error("cannot lock", target, exc) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _os_error(what: str, target: Path, exc: OSError) -> EnrollError:
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


def _read(target: Path) -> tuple[str, os.stat_result]:
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
        raise _os_error("cannot read", target, exc) from exc
    try:
        return raw.decode("utf-8"), stat
    except UnicodeDecodeError as exc:
        raise EnrollError([Problem((), f"cannot read {target}: {exc}")]) from None


def _valid_original(target: Path, text: str) -> tuple[LabConfig, dict[str, Any]]:
    """The config as it is: a file that does not pass `pixiebox check` is not edited."""
    config, problems = check_config(target)
    errors = [p for p in problems if p.severity == "error"]
    if config is None or errors:
        raise EnrollError(
            [
                *errors,
                Problem(
                    (),
                    f"{target.name} has errors already; nothing was changed",
                    f"fix them first (pixiebox check --config {target})",
                ),
            ]
        )
    return config, tomllib.loads(text)


def _find_machine(config: LabConfig, mac_or_name: str) -> int:
    try:
        mac: str | None = normalize_mac(mac_or_name)
    except ValueError:
        mac = None
    name = mac_or_name.strip().lower()
    for index, machine in enumerate(config.machines):
        if machine.mac == mac or machine.name == name:
            return index
    known = ", ".join(m.name for m in config.machines) or "none"
    raise EnrollError(
        [Problem(("machines",), f"no machine {mac_or_name!r} in lab.toml", f"machines: {known}")]
    )


def _verify(candidate: str, expected: dict[str, Any]) -> None:
    """The edited text means exactly the old data plus the change, nothing else."""
    try:
        data = tomllib.loads(candidate)
    except tomllib.TOMLDecodeError:
        data = None
    if data != expected:
        raise EnrollError(
            [
                Problem(
                    ("machines",),
                    "cannot make this change without altering other parts of lab.toml; "
                    "nothing was changed",
                    "edit lab.toml by hand (pixiebox check verifies it)",
                )
            ]
        )


def _commit(target: Path, text: str, candidate: str, before: os.stat_result, plan: _Plan) -> None:
    """Check the candidate in a temp file beside lab.toml, then rename it over lab.toml.

    The temp file is written, flushed and fsynced with the original's mode and owner before
    the rename, and the directory is fsynced after it: a crash leaves the old or the new file,
    never a part of one. The temp file is removed on any failure."""
    directory = target.parent
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise _os_error("cannot write beside", target, exc) from exc
    temp = Path(temp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as file:
                _copy_owner_and_mode(file.fileno(), before)
                file.write(candidate.encode("utf-8"))
                file.flush()
                os.fsync(file.fileno())
            config, problems = check_config(temp)
            errors = [p for p in problems if p.severity == "error"]
            if config is None or errors:
                raise EnrollError([plan.locate(p, text, candidate) for p in errors])
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
            raise _os_error("cannot write", target, exc) from exc
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


# --- rendering values ----------------------------------------------------------------------


def _plain(value: object, loc: Loc) -> object:
    """The TOML value of a Python one (addresses and paths as strings)."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, IPv4Address | PurePath):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, (*loc, str(k))) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, (*loc, i)) for i, v in enumerate(value)]
    raise EnrollError([Problem(loc, f"{value!r} cannot be written to lab.toml")])


def _toml_fields(fields: dict[str, object], loc: Loc) -> dict[str, Any]:
    return {key: _plain(value, (*loc, key)) for key, value in fields.items()}


def _render(value: object, padded: bool = True) -> str:
    """A value as TOML text; tables inline, `{ driver = "wol" }` like the example."""
    if isinstance(value, dict):
        if not value:
            return "{}"
        inner = ", ".join(
            f"{tomlkit.key(k).as_string()} = {_render(v, padded)}" for k, v in value.items()
        )
        return f"{{ {inner} }}" if padded else f"{{{inner}}}"
    if isinstance(value, list):
        return "[" + ", ".join(_render(v, padded) for v in value) + "]"
    return tomlkit.item(value).as_string()


def _key_value(key: str, value: object) -> str:
    return f"{tomlkit.key(key).as_string()} = {_render(value)}"


def _ordered(values: dict[str, Any]) -> list[tuple[str, Any]]:
    return sorted(values.items(), key=lambda item: MACHINE_KEYS.index(item[0]))


def _enrolled_comment() -> str:
    return f"# enrolled by pixiebox on {datetime.date.today().isoformat()}"


# --- a scanner of TOML statements with their positions -------------------------------------


class _ScanError(Exception):
    pass


@dataclass
class _Value:
    start: int
    end: int
    kind: Literal["scalar", "array", "table"]
    items: list[_Value] = field(default_factory=list)  # array elements
    commas: list[int | None] = field(default_factory=list)  # just after each element's comma
    entries: list[_Entry] = field(default_factory=list)  # inline-table keys


@dataclass
class _Entry:
    key: tuple[str, ...]
    start: int  # where the key starts
    value: _Value


@dataclass
class _Statement:
    kind: Literal["header", "keyvalue", "comment", "blank"]
    start: int  # the start of its first line
    end: int  # after its last newline (or the end of the text)
    table: tuple[str, ...]  # a header's own path; else the table it is in
    array: bool = False  # a [[header]]
    entry: _Entry | None = None


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DATETIME = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:\d{2})?(?![\w:])"
)
_SCALAR = re.compile(r"[^\s,\]\}#]+")


class _Scanner:
    """Statements (headers, key = value, comments, blank lines) of a TOML text with offsets.
    It runs only on text that tomllib accepted, so it does not diagnose errors."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def statements(self) -> list[_Statement]:
        try:
            return self._statements()
        except (IndexError, ValueError) as exc:
            raise _ScanError(str(exc)) from None

    def _statements(self) -> list[_Statement]:
        text = self.text
        found: list[_Statement] = []
        table: tuple[str, ...] = ()
        while self.pos < len(text):
            start = self.pos
            self._spaces()
            char = text[self.pos : self.pos + 1]
            if char in ("", "\r", "\n"):
                self._newline()
                found.append(_Statement("blank", start, self.pos, table))
            elif char == "#":
                self._end_of_line()
                found.append(_Statement("comment", start, self.pos, table))
            elif char == "[":
                array = text.startswith("[[", self.pos)
                self.pos += 2 if array else 1
                table = self._key()
                self._spaces()
                self._expect("]]" if array else "]")
                self._end_of_line()
                found.append(_Statement("header", start, self.pos, table, array))
            else:
                entry = self._entry()
                self._end_of_line()
                found.append(_Statement("keyvalue", start, self.pos, table, entry=entry))
        return found

    def _spaces(self) -> None:
        while self.text.startswith((" ", "\t"), self.pos):
            self.pos += 1

    def _newline(self) -> None:
        if self.text.startswith("\r\n", self.pos):
            self.pos += 2
        elif self.text.startswith("\n", self.pos):
            self.pos += 1
        elif self.pos < len(self.text):
            raise _ScanError(f"expected the end of the line at offset {self.pos}")

    def _end_of_line(self) -> None:
        """Trailing spaces, an optional comment and the newline."""
        self._spaces()
        if self.text.startswith("#", self.pos):
            end = self.text.find("\n", self.pos)
            self.pos = len(self.text) if end < 0 else end
            if self.text[self.pos - 1 : self.pos] == "\r":
                self.pos -= 1
        self._newline()

    def _gaps(self) -> None:
        """Spaces, newlines and comments inside an array or inline table."""
        while True:
            self._spaces()
            if self.text.startswith("#", self.pos):
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif self.text.startswith(("\r\n", "\n"), self.pos):
                self._newline()
            else:
                return

    def _expect(self, token: str) -> None:
        if not self.text.startswith(token, self.pos):
            raise _ScanError(f"expected {token!r} at offset {self.pos}")
        self.pos += len(token)

    def _key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self._spaces()
            start = self.pos
            char = self.text[self.pos]
            if char == '"':
                self._basic_string()
                parts.append(tomllib.loads(f"k = {self.text[start : self.pos]}")["k"])
            elif char == "'":
                self._literal_string()
                parts.append(self.text[start + 1 : self.pos - 1])
            else:
                match = _BARE_KEY.match(self.text, self.pos)
                if match is None:
                    raise _ScanError(f"expected a key at offset {self.pos}")
                parts.append(match.group())
                self.pos = match.end()
            self._spaces()
            if not self.text.startswith(".", self.pos):
                return tuple(parts)
            self.pos += 1

    def _entry(self) -> _Entry:
        start = self.pos
        key = self._key()
        self._spaces()
        self._expect("=")
        self._spaces()
        return _Entry(key, start, self._value())

    def _basic_string(self) -> None:
        index = self.pos + 1
        while self.text[index] != '"':
            index += 2 if self.text[index] == "\\" else 1
        self.pos = index + 1

    def _literal_string(self) -> None:
        self.pos = self.text.index("'", self.pos + 1) + 1

    def _multiline_string(self, quote: str) -> None:
        index = self.pos + 3
        while True:
            if quote == '"""' and self.text[index] == "\\":
                index += 2
            elif self.text.startswith(quote, index):
                run = 3  # up to two quotes may end the content
                while run < 5 and self.text[index + run : index + run + 1] == quote[0]:
                    run += 1
                self.pos = index + run
                return
            else:
                index += 1

    def _value(self) -> _Value:
        start = self.pos
        text = self.text
        if text.startswith(('"""', "'''"), start):
            self._multiline_string(text[start : start + 3])
        elif text.startswith('"', start):
            self._basic_string()
        elif text.startswith("'", start):
            self._literal_string()
        elif text.startswith("[", start):
            return self._array()
        elif text.startswith("{", start):
            return self._inline_table()
        else:
            match = _DATETIME.match(text, start) or _SCALAR.match(text, start)
            if match is None:
                raise _ScanError(f"expected a value at offset {start}")
            self.pos = match.end()
        return _Value(start, self.pos, "scalar")

    def _array(self) -> _Value:
        value = _Value(self.pos, self.pos, "array")
        self.pos += 1
        while True:
            self._gaps()
            if self.text.startswith("]", self.pos):
                break
            value.items.append(self._value())
            value.commas.append(None)
            self._gaps()
            if not self.text.startswith(",", self.pos):
                break
            self.pos += 1
            value.commas[-1] = self.pos
        self._expect("]")
        value.end = self.pos
        return value

    def _inline_table(self) -> _Value:
        value = _Value(self.pos, self.pos, "table")
        self.pos += 1
        while True:
            self._gaps()
            if self.text.startswith("}", self.pos):
                break
            value.entries.append(self._entry())
            self._gaps()
            if not self.text.startswith(",", self.pos):
                break
            self.pos += 1
        self._expect("}")
        value.end = self.pos
        return value


@dataclass
class _Layout:
    """Where the machines are written: [[machines]] blocks or one `machines = [...]`."""

    statements: list[_Statement]
    blocks: list[list[_Statement]]  # each [[machines]] with its keys and sub-tables
    inline: _Statement | None  # the `machines = [...]` statement


def _scan(text: str) -> _Layout:
    statements = _Scanner(text).statements()
    blocks: list[list[_Statement]] = []
    inline: _Statement | None = None
    in_block = False
    for statement in statements:
        if statement.kind == "header":
            if statement.table == ("machines",) and statement.array:
                blocks.append([statement])
                in_block = True
                continue
            in_block = statement.table[:1] == ("machines",) and bool(blocks)
        if in_block and statement.kind in ("header", "keyvalue"):
            blocks[-1].append(statement)
        entry = statement.entry
        if entry is not None and statement.table == () and entry.key == ("machines",):
            inline = statement
    return _Layout(statements, blocks, inline)


def _scan_checked(text: str, data: dict[str, Any]) -> _Layout:
    """The layout, if it accounts for exactly the machines tomllib sees."""
    try:
        layout = _scan(text)
    except _ScanError:
        layout = None
    count = len(data.get("machines", []))
    if layout is not None:
        inline = layout.inline.entry.value if layout.inline and layout.inline.entry else None
        if inline is None and len(layout.blocks) == count:
            return layout
        if inline is not None and inline.kind == "array" and len(inline.items) == count:
            return layout
    raise EnrollError(
        [
            Problem(
                ("machines",),
                "cannot find where the machines are written in lab.toml; nothing was changed",
                "write them as [[machines]] blocks like the example",
            )
        ]
    )


# --- planning edits ------------------------------------------------------------------------


@dataclass
class _Plan:
    """Replacements (start, end, new text) of the original text, in order, not overlapping;
    `anchor` is where the added machine starts in the new text (for its line number)."""

    edits: list[tuple[int, int, str]]
    anchor: int = 0

    def apply(self, text: str) -> str:
        parts: list[str] = []
        position = 0
        for start, end, new in self.edits:
            parts += [text[position:start], new]
            position = end
        parts.append(text[position:])
        return "".join(parts)

    def original_offset(self, offset: int) -> int | None:
        """Where a position of the new text was in the old one (None: in new text)."""
        shift = 0
        for start, end, new in self.edits:
            if offset < start + shift:
                break
            if offset < start + shift + len(new):
                return None
            shift += len(new) - (end - start)
        return offset - shift

    def locate(self, problem: Problem, text: str, candidate: str) -> Problem:
        """A problem of the candidate with the line it has in the file as it is (none when the
        line is new)."""
        if problem.line is None:
            return problem
        lines = candidate.splitlines(keepends=True)
        offset = sum(len(line) for line in lines[: problem.line - 1])
        original = self.original_offset(offset)
        line = None if original is None else text.count("\n", 0, original) + 1
        return Problem(problem.loc, problem.message, problem.hint, problem.severity, line)


def _newline_of(text: str) -> str:
    first = text.find("\n")
    return "\r\n" if first > 0 and text[first - 1] == "\r" else "\n"


def _line_start(text: str, offset: int) -> int:
    return text.rfind("\n", 0, offset) + 1


def _line_end(text: str, offset: int) -> int:
    """The offset after the newline of the line holding `offset` (or the end of the text)."""
    end = text.find("\n", offset)
    return len(text) if end < 0 else end + 1


def _line_number(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _plan_enroll(text: str, layout: _Layout, values: dict[str, Any]) -> _Plan:
    if layout.inline is not None and layout.inline.entry is not None:
        return _plan_inline_append(text, layout.inline.entry.value, values)
    nl = _newline_of(text)
    offset = _end_of_block(layout, layout.blocks[-1]) if layout.blocks else len(text)
    before = text[:offset]
    if not before.strip():
        lead = ""
    elif not before.endswith("\n"):
        lead = nl + nl
    elif not text[_line_start(text, offset - 1) : offset].strip():
        lead = ""  # a blank line is there already
    else:
        lead = nl
    header = lead + _enrolled_comment() + nl
    block = header + "[[machines]]" + nl
    block += "".join(_key_value(key, value) + nl for key, value in _ordered(values))
    return _Plan([(offset, offset, block)], anchor=offset + len(header))


def _end_of_block(layout: _Layout, block: list[_Statement]) -> int:
    """After a [[machines]] block's last key (and the comment lines right below it, unless
    they lead into the next table or key)."""
    last = block[-1]
    statements = layout.statements
    position = statements.index(last) + 1
    end = last.end
    run_end = end
    while position < len(statements) and statements[position].kind == "comment":
        run_end = statements[position].end
        position += 1
    following = statements[position] if position < len(statements) else None
    if following is None or following.kind == "blank":
        end = run_end
    return end


def _plan_inline_append(text: str, array: _Value, values: dict[str, Any]) -> _Plan:
    """A new inline table at the end of `machines = [...]`, in the array's style: one entry a
    line (with the dated comment line above it), or all on one line (where a comment cannot
    go, so there is none); a trailing comma, and spaces inside the braces, as the last entry."""
    tables = [item for item in array.items if item.kind == "table"]
    padded = not tables or text[tables[-1].start + 1 : tables[-1].start + 2] in (" ", "\t")
    element = _render(dict(_ordered(values)), padded)
    nl = _newline_of(text)
    items, commas = array.items, array.commas
    closing = array.end - 1

    def insert(offset: int, new: str) -> _Plan:
        return _Plan([(offset, offset, new)], anchor=offset + new.rindex(element))

    if "\n" not in text[array.start : array.end]:
        if not items:
            return insert(array.start + 1, element)
        separator = ", "
        if len(items) > 1 and commas[0] is not None:
            separator = "," + text[commas[0] : items[1].start]
        if commas[-1] is not None:  # [{...}, {...},]
            return insert(commas[-1], separator[1:] + element + ",")
        return insert(items[-1].end, separator + element)
    comment = _enrolled_comment()
    if not items:
        start = _line_start(text, closing)
        if text[start:closing].strip():
            _refuse_inline(text, array, "its closing bracket shares a line with other text")
        indent = text[start:closing] + "    "
        return insert(start, f"{indent}{comment}{nl}{indent}{element},{nl}")
    last = items[-1]
    line = text[_line_start(text, last.start) : last.start]
    pad = line[: len(line) - len(line.lstrip(" \t"))]
    comma = commas[-1]
    if comma is not None:
        rest = text[comma : _line_end(text, comma)].strip()
        if not rest or rest.startswith("#"):  # the next entry goes on the next line
            return insert(_line_end(text, comma), f"{pad}{comment}{nl}{pad}{element},{nl}")
        return insert(comma, f"{nl}{pad}{comment}{nl}{pad}{element},")
    if "#" in text[last.end : closing]:
        why = "its last entry has no comma after it but a comment, which would then follow"
        _refuse_inline(text, array, why + " the new entry")
    return insert(last.end, f",{nl}{pad}{comment}{nl}{pad}{element}")


def _refuse_inline(text: str, array: _Value, why: str) -> NoReturn:
    raise EnrollError(
        [
            Problem(
                ("machines",),
                f"cannot add to machines = [...] without rewriting part of it: {why}",
                'add a "," after its last entry, or write the machines as [[machines]] blocks',
                line=_line_number(text, array.start),
            )
        ]
    )


def _plan_update(
    text: str, layout: _Layout, index: int, values: dict[str, Any], removed: set[str]
) -> _Plan:
    inline = layout.inline
    count_inline = len(inline.entry.value.items) if inline is not None and inline.entry else 0
    if inline is not None and inline.entry is not None and index < count_inline:
        return _plan_update_inline(text, inline.entry.value.items[index], values, removed)
    block = layout.blocks[index - count_inline]
    header = block[0]
    own = [s for s in block if s.kind == "keyvalue" and s.table == ("machines",)]
    edits: list[tuple[int, int, str]] = []
    additions: dict[int, list[str]] = {}
    nl = _newline_of(text)
    for key in sorted({*values, *removed}, key=MACHINE_KEYS.index):
        written = [s for s in own if s.entry is not None and s.entry.key[:1] == (key,)]
        tables = [s for s in block if s.kind == "header" and s.table[:2] == ("machines", key)]
        dotted = [s for s in written if s.entry is not None and len(s.entry.key) > 1]
        if tables or dotted:
            raise EnrollError(
                [
                    Problem(
                        ("machines", index, key),
                        f"{key} of this machine is written as a table or dotted keys, "
                        "which cannot be edited in place",
                        "edit it by hand",
                        line=_line_number(text, (tables or dotted)[0].start),
                    )
                ]
            )
        statement = written[0] if written else None
        if key in removed:
            if statement is not None:
                edits.append((statement.start, statement.end, ""))
            continue
        rendered = _render(values[key])
        if statement is not None and statement.entry is not None:
            value = statement.entry.value
            edits.append((value.start, value.end, rendered))
            continue
        earlier = [
            s
            for s in own
            if s.entry is not None
            and s.entry.key[0] in MACHINE_KEYS
            and MACHINE_KEYS.index(s.entry.key[0]) < MACHINE_KEYS.index(key)
        ]
        if earlier:
            offset = earlier[-1].end
        elif own:
            offset = own[0].start
        else:
            offset = header.end
        line = _key_value(key, values[key]) + nl
        if offset == len(text) and not text.endswith("\n"):
            line = nl + line.removesuffix(nl)
        additions.setdefault(offset, []).append(line)
    edits += [(offset, offset, "".join(lines)) for offset, lines in additions.items()]
    return _Plan(sorted(edits, key=lambda edit: (edit[0], edit[1])))


def _plan_update_inline(
    text: str, table: _Value, values: dict[str, Any], removed: set[str]
) -> _Plan:
    padded = text[table.start + 1 : table.start + 2] in (" ", "\t")
    entries = table.entries
    edits: list[tuple[int, int, str]] = []
    added: list[str] = []
    for key in sorted({*values, *removed}, key=MACHINE_KEYS.index):
        position = next((i for i, e in enumerate(entries) if e.key == (key,)), None)
        if any(len(e.key) > 1 and e.key[0] == key for e in entries):
            raise EnrollError(
                [
                    Problem(
                        ("machines",),
                        f"{key} is written as dotted keys, which this cannot edit",
                        "edit it by hand",
                    )
                ]
            )
        if key in removed:
            if position is None:
                continue
            if position > 0:
                edits.append((entries[position - 1].value.end, entries[position].value.end, ""))
            elif len(entries) > 1:
                edits.append((entries[0].start, entries[1].start, ""))
            else:
                edits.append((entries[0].start, entries[0].value.end, ""))
            continue
        if position is not None:
            value = entries[position].value
            edits.append((value.start, value.end, _render(values[key], padded)))
        else:
            added.append(f", {tomlkit.key(key).as_string()} = {_render(values[key], padded)}")
    if added:
        end = entries[-1].value.end
        edits.append((end, end, "".join(added)))
    edits.sort(key=lambda edit: (edit[0], edit[1]))
    for (_, first_end, _), (second_start, _, _) in itertools.pairwise(edits):
        if second_start < first_end:
            raise EnrollError(
                [Problem(("machines",), "these changes overlap", "make them one at a time")]
            )
    return _Plan(edits)
