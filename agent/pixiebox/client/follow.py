"""What `pixiebox power` and `pixiebox lab up|down` show while the agent works: the machines'
events as they happen (read from the agent's event stream in a background thread while the
blocking API call runs), a live table, and the final report."""

from __future__ import annotations

import contextlib
import queue
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar
from urllib.parse import quote

from pixiebox.client.api import ApiClient, ApiRefused, ApiUnreachable
from pixiebox.events import BOOT_CHAIN, Kind

T = TypeVar("T")

#: How long to wait for the event stream to be live before sending the action anyway.
CONNECT_WAIT = 5.0
#: How often the live table is redrawn while nothing happens (its seconds keep counting).
TICK = 0.5


class Follower:
    """The agent's events (of one MAC, or all) from a background thread."""

    def __init__(self, client: ApiClient, mac: str | None = None) -> None:
        self.client = client
        self.path = "/api/v1/events" + (f"?mac={quote(mac)}" if mac else "")
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for event in self.client.stream(self.path, self.connected):
                self.events.put(event)
        except (ApiUnreachable, ApiRefused, OSError, ValueError):
            pass  # the live view is a nicety: the action's answer still comes
        finally:
            self.connected.set()

    def start(self) -> Follower:
        self._thread.start()
        self.connected.wait(CONNECT_WAIT)
        return self

    def run_while(
        self,
        call: Callable[[], T],
        on_event: Callable[[dict[str, Any]], None],
        tick: Callable[[], None] = lambda: None,
    ) -> T:
        """`call()` in a worker thread; meanwhile each event goes to `on_event` and `tick`
        runs every TICK seconds. Returns what `call` returned (or raises what it raised)."""
        outcome: list[T] = []
        failure: list[BaseException] = []

        def work() -> None:
            try:
                outcome.append(call())
            except BaseException as exc:  # handed to the main thread
                failure.append(exc)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while worker.is_alive():
            with contextlib.suppress(queue.Empty):
                on_event(self.events.get(timeout=TICK))
            tick()
        # Events the agent sent before its answer may still be on their way in the stream.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                on_event(self.events.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                break
        if failure:
            raise failure[0]
        return outcome[0]


def event_line(event: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    who = event.get("name") or event["mac"]
    return f"{stamp} {who:<17} {event['kind']:<10} {event['message']}"


# --------------------------------------------------------------------------- lab up / down


class LiveTable:
    """Each machine's state during `lab up`/`lab down`: a redrawn table on a terminal, a line
    per change otherwise (logs, CI)."""

    def __init__(self, machines: list[dict[str, Any]], action: str, stream: IO[str] = sys.stdout):
        self.action = action
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.rows: dict[str, dict[str, Any]] = {}
        for machine in machines:
            self.rows[machine["mac"]] = {
                "name": machine.get("name") or machine["mac"],
                "state": "waiting" if machine.get("power_control") else "skipped",
                "seconds": None,
                "note": "" if machine.get("power_control") else "no power control: skipped",
            }
        self._drawn = 0

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _set(self, row: dict[str, Any], state: str, note: str, done: bool = False) -> None:
        changed = row["state"] != state
        row["state"], row["note"] = state, note
        if done:
            row["seconds"] = time.monotonic() - self.started
        if changed and not self.tty:
            elapsed = time.monotonic() - self.started
            detail = f" ({note})" if note else ""
            self._print(f"[{elapsed:6.1f}s] {row['name']}: {state}{detail}")

    def event(self, event: dict[str, Any]) -> None:
        row = self.rows.get(event["mac"])
        if row is None or row["state"] == "skipped":
            return
        kind, message = event["kind"], event["message"]
        if kind in (Kind.POWER_ON, Kind.POWER_OFF, Kind.POWER_CYCLE):
            state = "powering on" if self.action == "up" else "powering off"
            if row["state"] not in ("booting", "up", "joined", "off"):
                self._set(row, state, message)
            else:
                row["note"] = message
        elif kind in BOOT_CHAIN:
            self._set(row, "booting", kind)
        elif kind == Kind.OS_UP:
            self._set(row, "up", message, done=row["seconds"] is None or self.action == "up")
        elif kind == Kind.OS_JOINED:
            self._set(row, "joined", message)
        elif kind == Kind.MACHINE_OFF:
            self._set(row, "off", message, done=self.action == "down")

    def draw(self) -> None:
        if not self.tty:
            return
        elapsed = time.monotonic() - self.started
        lines = [f"lab {self.action}: {elapsed:5.0f} s",
                 f"{'NAME':<16} {'STATE':<13} {'TIME':>7}  NOTE"]  # fmt: skip
        for row in self.rows.values():
            seconds = f"{row['seconds']:6.1f}s" if row["seconds"] is not None else f"{'.':>7}"
            lines.append(f"{row['name']:<16} {row['state']:<13} {seconds}  {row['note'][:60]}")
        text = "\n".join(lines)
        if self._drawn:
            text = f"\033[{self._drawn}F\033[J" + text
        self._print(text)
        self._drawn = len(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def render_report(report: dict[str, Any]) -> str:
    """The readiness report of `lab up` (or what is off after `lab down`)."""
    up = report["action"] == "up"
    machines = report["machines"]
    powered = [m for m in machines if m["result"] != "skipped"]
    wanted = ("up", "already up") if up else ("off", "already off")
    good = [m for m in powered if m["result"] in wanted]
    word = "up" if up else "off"
    lines = [f"lab {report['action']}: {len(good)} of {len(powered)} machine(s) with power "
             f"control {word} after {report['seconds']:.1f} s"]  # fmt: skip
    header = ("NAME", "RESULT", "TO UP" if up else "TO OFF",
              *(("TO JOINED",) if up else ()), "POWER BY")  # fmt: skip
    rows = [header]
    for m in machines:
        row = [m["name"], m["result"], _seconds(m.get("seconds"))]
        if up:
            row.append(_seconds(m.get("joined_seconds")))
        row.append(", ".join(m.get("drivers") or []) or "-")
        rows.append(tuple(row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    trouble = [m for m in powered if m not in good]
    if trouble:
        lines.append("")
        lines.append("stragglers:" if up else "not off:")
        for m in trouble:
            lines.append(textwrap.fill(f"{m['name']}: {m['message']}", width=100,
                                       initial_indent="  ", subsequent_indent="    "))  # fmt: skip
            if m.get("diagnosis"):
                lines.append(textwrap.fill(f"doctor: {m['diagnosis']}", width=100,
                                           initial_indent="    ", subsequent_indent="      ",
                                           break_on_hyphens=False))  # fmt: skip
    skipped = [m["name"] for m in machines if m["result"] == "skipped"]
    if skipped:
        lines.append("")
        lines.append(f"no power control: skipped: {', '.join(skipped)}")
    return "\n".join(lines)
