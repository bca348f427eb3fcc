"""The text edits that enroll or change a machine in lab.toml, planned on the file's statements.

Each edit is a list of replacements (start, end, new text) of the original text, placed by the
TOML scanner (tomlscan.py), so that everything outside them stays byte-for-byte: comments,
blank lines, key order, quoting, CRLF line endings. Values are rendered by tomlkit in the style
the file already uses (padded braces, one entry a line). tomlkit's own document editing is not
used for placement: appending to an array of tables moves the comments that lead the next table,
writes "\\n" into a CRLF file and glues the new header to a last line without a newline.
"""

from __future__ import annotations

import datetime
import itertools
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import PurePath
from typing import Any, NoReturn

import tomlkit

from pixiebox.config.problems import EnrollError, Problem
from pixiebox.config.schema import MachineSection
from pixiebox.config.tomlscan import Loc, ScanError, Statement, Value, scan

#: The keys of a machine, in the order an enrollment writes them.
MACHINE_KEYS: tuple[str, ...] = tuple(MachineSection.model_fields)  # name, mac, ip, image, power


# --- rendering values --------------------------------------------------------------------------


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


def toml_fields(fields: dict[str, object], loc: Loc) -> dict[str, Any]:
    """The new keys as the data tomllib will read back, to compare the edited file against."""
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


# --- where the machines are written ---------------------------------------------------------


@dataclass
class Layout:
    """Where the machines are written: [[machines]] blocks or one `machines = [...]`."""

    statements: list[Statement]
    blocks: list[list[Statement]]  # each [[machines]] with its keys and sub-tables
    inline: Statement | None  # the `machines = [...]` statement


def _layout_of(text: str) -> Layout:
    statements = scan(text)
    blocks: list[list[Statement]] = []
    inline: Statement | None = None
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
    return Layout(statements, blocks, inline)


def machines_layout(text: str, data: dict[str, Any]) -> Layout:
    """The layout, if it accounts for exactly the machines tomllib sees."""
    try:
        layout = _layout_of(text)
    except ScanError:
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
class Plan:
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


def plan_enroll(text: str, layout: Layout, values: dict[str, Any]) -> Plan:
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
    return Plan([(offset, offset, block)], anchor=offset + len(header))


def _end_of_block(layout: Layout, block: list[Statement]) -> int:
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


def _plan_inline_append(text: str, array: Value, values: dict[str, Any]) -> Plan:
    """A new inline table at the end of `machines = [...]`, in the array's style: one entry a
    line (with the dated comment line above it), or all on one line (where a comment cannot
    go, so there is none); a trailing comma, and spaces inside the braces, as the last entry."""
    tables = [item for item in array.items if item.kind == "table"]
    padded = not tables or text[tables[-1].start + 1 : tables[-1].start + 2] in (" ", "\t")
    element = _render(dict(_ordered(values)), padded)
    nl = _newline_of(text)
    items, commas = array.items, array.commas
    closing = array.end - 1

    def insert(offset: int, new: str) -> Plan:
        return Plan([(offset, offset, new)], anchor=offset + new.rindex(element))

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


def _refuse_inline(text: str, array: Value, why: str) -> NoReturn:
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


def plan_update(
    text: str, layout: Layout, index: int, values: dict[str, Any], removed: set[str]
) -> Plan:
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
    return Plan(sorted(edits, key=lambda edit: (edit[0], edit[1])))


def _plan_update_inline(text: str, table: Value, values: dict[str, Any], removed: set[str]) -> Plan:
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
    return Plan(edits)
