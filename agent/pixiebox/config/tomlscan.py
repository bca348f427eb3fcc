"""Where things are in a TOML text: its statements with their offsets, and the line of each key.

tomllib parses but forgets positions, and two jobs need them: `pixiebox check` says on which
line a problem is (an error that says "machines[3].mac" without a line makes people count
`[[machines]]` blocks by hand), and the lab.toml editor (labfile.py) inserts and replaces text
at exact offsets so that every comment and blank line stays as the user wrote it. Both use the
one scanner here. It runs on text that tomllib accepted, so it finds positions and does not
diagnose errors.

Imports nothing of pixiebox.
"""

from __future__ import annotations

import bisect
import re
import tomllib
from dataclasses import dataclass, field
from typing import Literal

#: A key path in a TOML document: table and key names, and the index of an array element
#: (`("machines", 3, "mac")` is the mac of the fourth [[machines]]).
Loc = tuple[str | int, ...]


class ScanError(Exception):
    pass


@dataclass
class Value:
    start: int
    end: int
    kind: Literal["scalar", "array", "table"]
    items: list[Value] = field(default_factory=list)  # array elements
    commas: list[int | None] = field(default_factory=list)  # just after each element's comma
    entries: list[Entry] = field(default_factory=list)  # inline-table keys


@dataclass
class Entry:
    key: tuple[str, ...]
    start: int  # where the key starts
    value: Value


@dataclass
class Statement:
    kind: Literal["header", "keyvalue", "comment", "blank"]
    start: int  # the start of its first line
    end: int  # after its last newline (or the end of the text)
    table: tuple[str, ...]  # a header's own path; else the table it is in
    array: bool = False  # a [[header]]
    entry: Entry | None = None


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DATETIME = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:\d{2})?(?![\w:])"
)
_SCALAR = re.compile(r"[^\s,\]\}#]+")


class Scanner:
    """Statements (headers, key = value, comments, blank lines) of a TOML text with offsets.
    It runs only on text that tomllib accepted, so it does not diagnose errors."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.found: list[Statement] = []  # so far: what a caller gets of text it cannot follow

    def statements(self) -> list[Statement]:
        try:
            return self._statements()
        except (IndexError, ValueError) as exc:
            raise ScanError(str(exc)) from None

    def _statements(self) -> list[Statement]:
        text = self.text
        found = self.found
        table: tuple[str, ...] = ()
        while self.pos < len(text):
            start = self.pos
            self._spaces()
            char = text[self.pos : self.pos + 1]
            if char in ("", "\r", "\n"):
                self._newline()
                found.append(Statement("blank", start, self.pos, table))
            elif char == "#":
                self._end_of_line()
                found.append(Statement("comment", start, self.pos, table))
            elif char == "[":
                array = text.startswith("[[", self.pos)
                self.pos += 2 if array else 1
                table = self._key()
                self._spaces()
                self._expect("]]" if array else "]")
                self._end_of_line()
                found.append(Statement("header", start, self.pos, table, array))
            else:
                entry = self._entry()
                self._end_of_line()
                found.append(Statement("keyvalue", start, self.pos, table, entry=entry))
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
            raise ScanError(f"expected the end of the line at offset {self.pos}")

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
            raise ScanError(f"expected {token!r} at offset {self.pos}")
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
                    raise ScanError(f"expected a key at offset {self.pos}")
                parts.append(match.group())
                self.pos = match.end()
            self._spaces()
            if not self.text.startswith(".", self.pos):
                return tuple(parts)
            self.pos += 1

    def _entry(self) -> Entry:
        start = self.pos
        key = self._key()
        self._spaces()
        self._expect("=")
        self._spaces()
        return Entry(key, start, self._value())

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

    def _value(self) -> Value:
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
                raise ScanError(f"expected a value at offset {start}")
            self.pos = match.end()
        return Value(start, self.pos, "scalar")

    def _array(self) -> Value:
        value = Value(self.pos, self.pos, "array")
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

    def _inline_table(self) -> Value:
        value = Value(self.pos, self.pos, "table")
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


def scan(text: str) -> list[Statement]:
    """Every statement of `text`, in order; ScanError on text this scanner cannot follow."""
    return Scanner(text).statements()


# --- lines of keys ---------------------------------------------------------------------------


def key_lines(text: str) -> dict[Loc, int]:
    """Line numbers of the tables and keys of a TOML text, by key path.

    An array of tables is at its first block (so `[[machine]]`, an unknown key, has a line);
    a key inside an inline table or an array is at the line where that element starts. On
    text the scanner cannot follow, the lines of the statements before that point. A BOM
    (as `pixiebox check` reads a file a Windows editor saved) is no line of its own."""
    text = text.removeprefix("\ufeff")
    scanner = Scanner(text)
    try:
        statements = scanner.statements()
    except ScanError:
        statements = scanner.found
    newlines = [offset for offset, char in enumerate(text) if char == "\n"]

    def line_of(offset: int) -> int:
        return bisect.bisect_left(newlines, offset) + 1

    lines: dict[Loc, int] = {}

    def nested(path: Loc, value: Value) -> None:
        for index, item in enumerate(value.items):
            lines.setdefault((*path, index), line_of(item.start))
            nested((*path, index), item)
        for entry in value.entries:
            lines.setdefault((*path, *entry.key), line_of(entry.start))
            nested((*path, *entry.key), entry.value)

    array_counts: dict[Loc, int] = {}  # by resolved path: the blocks of each array so far

    def resolve(names: tuple[str, ...]) -> Loc:
        """A header's path with the current element of each array of tables it is under:
        `[machines.power]` after the third `[[machines]]` is ("machines", 2, "power")."""
        path: Loc = ()
        for name in names:
            path = (*path, name)
            if path in array_counts:
                path = (*path, array_counts[path] - 1)
        return path

    table: Loc = ()
    for statement in statements:
        if statement.kind == "header":
            number = line_of(statement.start)
            if statement.array:
                path = resolve(statement.table[:-1]) + statement.table[-1:]
                index = array_counts.get(path, 0)
                array_counts[path] = index + 1
                lines.setdefault(path, number)
                table = (*path, index)
            else:
                table = resolve(statement.table)
            lines.setdefault(table, number)
        elif statement.kind == "keyvalue" and statement.entry is not None:
            entry = statement.entry
            lines.setdefault((*table, *entry.key), line_of(entry.start))
            nested((*table, *entry.key), entry.value)
    return lines


def line_for(lines: dict[Loc, int], loc: Loc) -> int | None:
    """The line of the longest prefix of loc that the file has (a missing key → its table)."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


# --- nesting, before parsing -----------------------------------------------------------------

# What can hide a bracket: comments and the four kinds of string (multi-line first, so that
# `"""` is not read as an empty string and a quote). An unterminated string matches nothing
# here and its brackets count; tomllib rejects that file anyway.
_HIDING = re.compile(
    r"""\#[^\n]*|\"\"\"(?:\\.|[^\\])*?\"\"\"|'''.*?'''|"(?:\\.|[^"\\\n])*"|'[^'\n]*'|[\[\]{}]""",
    re.DOTALL,
)


def too_deep(text: str, limit: int) -> int | None:
    """The line where arrays and inline tables (and table headers) nest more than `limit`
    deep, or None.

    tomllib parses arrays and inline tables recursively: `a = [[[[...` 10,000 deep raises
    RecursionError, not TOMLDecodeError (and this module's Scanner recurses the same way).
    Counting brackets outside comments and strings is linear and cannot recurse, so a file is
    measured before anything parses it."""
    depth = 0
    for match in _HIDING.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > limit:
                return text.count("\n", 0, match.start()) + 1
        elif token in ("]", "}"):
            depth = max(depth - 1, 0)
    return None
