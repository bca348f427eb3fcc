"""A diagnosis as text: each kept attempt's timeline ("+0.0s dhcp.offer …"), then the verdict.

The timeline shows each event's kind and its message for people; times are relative to the
attempt's first boot request, so two boots line up. `render_text` takes plain values so the CLI
prints the API's JSON the same way the agent would print a Diagnosis.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Sequence

from pixiebox.doctor.attempts import CHAIN, start_of
from pixiebox.doctor.verdict import Diagnosis
from pixiebox.events import Event, Kind

#: Timeline lines shown per attempt; the middle of a longer one is elided.
TIMELINE_LINES = 30
#: Width of the kind column: the boot chain's kinds line up, longer ones push the text on.
_KIND_WIDTH = 12


def _attempt_lines(attempt: list[Event]) -> list[str]:
    start = start_of(attempt).time
    lines: list[str] = []
    index = 0
    while index < len(attempt):
        event = attempt[index]
        offset = event.time - start
        sign = "+" if offset >= 0 else "-"
        stamp = f"{sign}{abs(offset):.1f}s"
        if event.kind == Kind.SYSLOG:
            # A booting OS logs hundreds of lines: one line says how many and the last.
            run = index
            while run < len(attempt) and attempt[run].kind == Kind.SYSLOG:
                run += 1
            count = run - index
            if count > 1:
                last = attempt[run - 1].message
                kind = str(Kind.SYSLOG)
                lines.append(f"  {stamp:>9} {kind:<{_KIND_WIDTH}} {count} lines, the last: {last}")
                index = run
                continue
        lines.append(f"  {stamp:>9} {event.kind:<{_KIND_WIDTH}} {event.message}")
        index += 1
    if len(lines) > TIMELINE_LINES:
        head, tail = TIMELINE_LINES - 6, 5
        elided = len(lines) - head - tail
        lines = [*lines[:head], f"  {'':>9} … {elided} more events …", *lines[-tail:]]
    return lines


def timeline(diagnosis: Diagnosis) -> list[str]:
    """The kept attempts as text lines, times relative to each attempt's first boot request."""
    lines: list[str] = []
    count = len(diagnosis.attempts)
    for number, attempt in enumerate(diagnosis.attempts, 1):
        if not attempt:
            continue
        start = start_of(attempt).time
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
        which = "last boot attempt" if number == count else "the attempt before"
        if not any(e.kind in CHAIN for e in attempt):
            which = "events (no boot attempt)"
        lines.append(f"{which}, from {stamp}:")
        lines += _attempt_lines(attempt)
    return lines


def render_text(machine: str, state: str, lines: Sequence[str], verdict: str, ok: bool) -> str:
    """What `pixiebox doctor` prints (from a Diagnosis or from the API's JSON)."""
    head = f"{machine}: {state}"
    body = list(lines) or ["no events recorded for it"]
    mark = "OK" if ok else "PROBLEM"
    wrapped = textwrap.fill(
        verdict,
        width=96,
        initial_indent=f"{mark}: ",
        subsequent_indent="    ",
        break_on_hyphens=False,  # "power-cycle" stays one word
    )
    return "\n".join([head, *body, "", wrapped])


def render(d: Diagnosis) -> str:
    """A timeline (relative times "+0.0s dhcp.offer …") of the last attempt(s), then the
    verdict."""
    return render_text(d.machine, d.state, timeline(d), d.verdict, d.ok)
