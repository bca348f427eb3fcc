"""GET /api/v1/settings: lab.toml as the agent last loaded it, secrets hidden, with what
`pixiebox check` says about the file on disk now.

Reads are open to whoever reaches the API (SECURITY.md), and lab.toml may hold a BMC or smart
plug password, an HTTP power driver's Authorization header, or a URL with a password in it. So
every secret-looking value is replaced by "(hidden)" before the text leaves, found with the
project's one TOML scanner (config.tomlscan: each key's value with its offsets, inside inline
tables and arrays too), and the replacement keeps the value's line breaks, so the line numbers
of the findings still point at the right lines. Text the scanner cannot follow (it only runs on
text tomllib accepted, so this is a bug, not an attack) is hidden line by line instead.

The text shown is the one the agent runs with (kept at load and reload), the findings are about
the file now: after a hand edit without a reload, the two differ, and that is what the owner
needs to see.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from pixiebox.config import Problem, check_config
from pixiebox.config.problems import format_loc
from pixiebox.config.tomlscan import Entry, ScanError, Value, scan

HIDDEN = '"(hidden)"'
#: A key whose value is a secret: a password, token, secret or private key material. Not the
#: `*_file` keys, which name where a secret is kept (a path is not the secret).
_SECRET_KEY = re.compile(
    r"(password|passwd|passphrase|secret|token|private_key|privkey|api_key|apikey|community"
    r"|credentials?)(?<!_file)$",
    re.IGNORECASE,
)
#: Keys whose every value may carry a credential (the http power driver's request headers).
_SECRET_TABLES = frozenset({"headers"})
#: A URL with a password in it: scheme://user:password@host.
_URL_PASSWORD = re.compile(r"://[^/@\s\"']*:[^/@\s\"']*@")


@dataclass(frozen=True)
class LabText:
    """lab.toml as the agent loaded it (the agent keeps it at start and at each reload)."""

    path: Path
    text: str
    loaded_at: float


class FindingView(BaseModel):
    """One of `pixiebox check`'s problems, in its words: `message` and `hint` are what check
    prints for it, `key` the key path it prints, `line` the line in the file on disk."""

    severity: Literal["error", "warning"]
    line: int | None
    key: str | None
    message: str
    hint: str = ""


class SettingsView(BaseModel):
    path: str
    loaded_at: float
    text: str
    findings: list[FindingView]


def _secret_key(key: tuple[str, ...], inside: tuple[str, ...]) -> bool:
    return bool(key) and (
        _SECRET_KEY.search(key[-1]) is not None
        or any(part in _SECRET_TABLES for part in (*inside, *key[:-1]))
    )


def _spans(value: Value, key: tuple[str, ...], inside: tuple[str, ...], text: str
           ) -> list[tuple[int, int]]:  # fmt: skip
    """The offsets of the secret values in `value`, reached under the key path `key`."""
    if value.kind == "table":
        spans: list[tuple[int, int]] = []
        for entry in value.entries:
            spans += _entry_spans(entry, (*inside, *key), text)
        return spans
    if value.kind == "array":
        return [span for item in value.items for span in _spans(item, key, inside, text)]
    if _secret_key(key, inside) or _URL_PASSWORD.search(text[value.start : value.end]):
        return [(value.start, value.end)]
    return []


def _entry_spans(entry: Entry, inside: tuple[str, ...], text: str) -> list[tuple[int, int]]:
    return _spans(entry.value, entry.key, inside, text)


def _hide_lines(text: str) -> str:
    """Fallback: every line that names a secret-looking key or holds a URL password."""
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        key = line.split("=", 1)[0].strip().strip("\"'")
        if "=" in line and (_SECRET_KEY.search(key) or _URL_PASSWORD.search(line)):
            ending = line[len(line.rstrip("\r\n")) :]
            lines[index] = f"{line.split('=', 1)[0]}= {HIDDEN}{ending}"
    return "".join(lines)


def hide_secrets(text: str) -> str:
    """`text` with every secret value replaced by "(hidden)", each line where it was."""
    try:
        statements = scan(text)
    except ScanError:
        return _hide_lines(text)
    spans: list[tuple[int, int]] = []
    for statement in statements:
        if statement.entry is not None:
            spans += _entry_spans(statement.entry, statement.table, text)
    for start, end in sorted(spans, reverse=True):
        breaks = text[start:end].count("\n")  # a multi-line string keeps its lines
        text = text[:start] + HIDDEN + "\n" * breaks + text[end:]
    return text


def finding(problem: Problem) -> FindingView:
    key = format_loc(problem.loc) if problem.loc else None
    return FindingView(severity=problem.severity, line=problem.line, key=key,
                       message=problem.message, hint=problem.hint)  # fmt: skip


def settings(loaded: LabText) -> SettingsView:
    """Reads the file (check_config): call it off the event loop."""
    _, problems = check_config(loaded.path)
    return SettingsView(
        path=str(loaded.path),
        loaded_at=loaded.loaded_at,
        text=hide_secrets(loaded.text),
        findings=[finding(p) for p in problems],
    )
