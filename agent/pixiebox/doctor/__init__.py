"""`pixiebox doctor`: why did (or didn't) a machine boot?

Reads a machine's event log (see lifecycle) the way someone who knows PXE would: splits it into
boot attempts, finds how far the last attempt got, and says in plain words what happened, the
likely cause and what to do next. Pure logic, no I/O: the API hands in the events and the clock.

A boot attempt starts at a boot request ("dhcp") after a quiet gap, after the machine was up or
off, or when a machine that had already got further (its script, kernel…) asks from the start
again. Only the last attempt decides the verdict; an older, failed one is history.
"""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from pixiebox.config import normalize_mac
from pixiebox.core.lifecycle import MachineState
from pixiebox.store.state import EVENTS_PER_MACHINE, Event

#: Seconds after the kernel and initrd were sent without a phone-home before the OS is called
#: failed to start (the API's and the CLI's --boot-timeout overrides it).
DEFAULT_BOOT_TIMEOUT = 300.0
#: Seconds after a boot step without the next one before that step is called stalled (a PXE
#: ROM, iPXE and the script each take the next step within a few seconds).
DEFAULT_SETTLE = 30.0
#: A boot request after this much silence starts a new attempt (a power cycle, a retry).
ATTEMPT_GAP = 120.0
#: Events the API reads for a diagnosis: all a machine keeps.
EVENTS = EVENTS_PER_MACHINE
#: How many attempts a Diagnosis keeps (the last one decides; the one before is context).
KEPT_ATTEMPTS = 2
#: "discovered"/"enrolled" events this close before a boot request belong to its attempt.
_LEAD_IN = 5.0
#: Timeline lines shown per attempt; the middle of a longer one is elided.
_TIMELINE_LINES = 30

#: Kinds that are a step of a network boot (they can open an attempt).
_CHAIN = frozenset({"dhcp", "tftp", "script", "kernel", "initrd", "pxelinux", "ignored"})
#: Kinds after which a new boot request is a new attempt.
_ENDS = frozenset({"phone-home", "joined", "off"})
#: The iPXE builds a firmware fetches first (undionly.kpxe, ipxe.efi, snp.efi, …).
_LOADER = re.compile(r"\.(efi|kpxe|kkpxe|pxe)$", re.IGNORECASE)
_URL = re.compile(r"https?://[^\s;,)]+")
_TFTP_PATH = re.compile(r"^fetched (?P<path>.+) over TFTP")
_TFTP_ERROR = re.compile(r"^TFTP (?P<path>[^:]+): (?P<reason>.*)$")
_NEXT_KERNEL = re.compile(r"next: kernel (?P<kernel>\S+)")
_BOOT_FILE = re.compile(r"with (?:boot file|script URL) (?P<file>\S+)")


@dataclass(frozen=True)
class Diagnosis:
    machine: str
    state: str
    #: The last boot attempts (at most KEPT_ATTEMPTS), oldest first; each oldest event first.
    attempts: list[list[Event]]
    #: Plain English: what happened, the likely cause, what to do.
    verdict: str
    #: True only when the last boot reached the OS (it is up or joined).
    ok: bool


class DoctorReport(BaseModel):
    """GET /api/v1/machines/{key}/doctor"""

    machine: str
    mac: str
    state: str
    ok: bool
    verdict: str
    timeline: list[str]


#: The doctor route's query parameters, for the OpenAPI document.
QUERY_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": "number", "minimum": 0},
        "description": what,
    }
    for name, what in (
        (
            "boot_timeout",
            "seconds after the kernel and initrd were sent before a missing phone-home counts "
            f"as a failure (default {DEFAULT_BOOT_TIMEOUT:g})",
        ),
        (
            "settle",
            "seconds without the next boot step before a step counts as stalled "
            f"(default {DEFAULT_SETTLE:g})",
        ),
    )
]


def report(diagnosis: Diagnosis, mac: str) -> DoctorReport:
    return DoctorReport(
        machine=diagnosis.machine,
        mac=mac,
        state=diagnosis.state,
        ok=diagnosis.ok,
        verdict=diagnosis.verdict,
        timeline=timeline(diagnosis),
    )


def seconds_parameter(query: Mapping[str, str], key: str, default: float) -> float:
    """A non-negative number of seconds from a query string; ValueError says what is wrong."""
    raw = query.get(key)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key} must be a number of seconds, not {raw!r}") from None
    if not 0 <= value < 10**7:
        raise ValueError(f"{key} must be a number of seconds from 0 on, not {raw!r}")
    return value


def unknown_machine(key: str) -> str:
    """The answer for a name or MAC Pixiebox knows nothing about."""
    try:
        mac = normalize_mac(key)
    except ValueError:
        return f"no machine named or with MAC {key!r} (pixiebox machines lists them)"
    return (
        f"Pixiebox has never heard from {mac} and it is not in lab.toml: is it set to boot from "
        "the network (PXE) first, and on the same LAN as the appliance's interface?"
    )


# --------------------------------------------------------------------------- attempts


def _is_ipxe_request(event: Event) -> bool:
    """A boot request from iPXE itself: proxy mode says so, the other modes hand it its script
    URL (/boot/<mac>.ipxe)."""
    return event.kind == "dhcp" and (
        "iPXE asked" in event.message or ".ipxe" in event.message.replace("ipxe.efi", "")
    )


def _tftp_path(event: Event) -> str | None:
    found = _TFTP_PATH.match(event.message)
    return found.group("path") if found else None


def _is_loader(event: Event) -> bool:
    path = _tftp_path(event) if event.kind == "tftp" else None
    return path is not None and _LOADER.search(path) is not None


def _tftp_error(event: Event) -> tuple[str, str] | None:
    """(path, reason) of a TFTP failure that matters; None for the normal ones (a UEFI size
    probe, iPXE looking for autoexec.ipxe)."""
    found = _TFTP_ERROR.match(event.message)
    if found is None:
        return ("?", event.message)
    path, reason = found.group("path"), found.group("reason")
    name = path.rsplit("/", 1)[-1].lower()
    if "as UEFI firmware does" in reason or name in ("autoexec.ipxe", "bootsig.bin"):
        return None
    return path, reason


def _starts_attempt(event: Event, current: list[Event] | None) -> bool:
    if event.kind not in _CHAIN:
        return False
    if current is None or event.time - current[-1].time > ATTEMPT_GAP:
        return True
    if any(e.kind in _ENDS for e in current):
        return True
    if event.kind != "dhcp":
        return False
    # Asking from the start again once past the first steps: the machine started over.
    if any(e.kind in ("script", "kernel", "initrd", "pxelinux", "ignored") for e in current):
        return True
    firmware_again = not _is_ipxe_request(event)
    return firmware_again and any(_is_loader(e) or _is_ipxe_request(e) for e in current)


def split_attempts(events: Sequence[Event]) -> tuple[list[Event], list[list[Event]]]:
    """(events before the first boot attempt, the attempts), everything oldest first."""
    before: list[Event] = []
    attempts: list[list[Event]] = []
    current: list[Event] | None = None
    for event in sorted(events, key=lambda e: (e.time, e.id)):
        if _starts_attempt(event, current):
            # What was recorded just before the request belongs to it ("discovered").
            lead: list[Event] = []
            pool = current if current is not None else before
            while (
                pool
                and pool[-1].kind in ("discovered", "enrolled")
                and (event.time - pool[-1].time <= _LEAD_IN)
            ):
                lead.insert(0, pool.pop())
            current = [*lead, event]
            attempts.append(current)
        elif current is not None:
            current.append(event)
        else:
            before.append(event)
    return before, attempts


# --------------------------------------------------------------------------- wording


def _span(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _clock(timestamp: float, now: float) -> str:
    local = time.localtime(timestamp)
    if now - timestamp < 20 * 3600:
        return time.strftime("%H:%M:%S", local)
    return time.strftime("%Y-%m-%d %H:%M:%S", local)


def _http_where(events: Sequence[Event], http_port: int) -> tuple[str, str]:
    """(port, base URL) of the appliance's boot HTTP, from a script URL handed out if any."""
    for event in reversed(events):
        for url in _URL.findall(event.message):
            parts = urlsplit(url)
            if parts.hostname:
                port = parts.port or (443 if parts.scheme == "https" else 80)
                return str(port), f"{parts.scheme}://{parts.netloc}/"
    return str(http_port), ""


def _boot_file(events: Sequence[Event]) -> str:
    for event in reversed(events):
        found = _BOOT_FILE.search(event.message)
        if found:
            return found.group("file")
    return ""


def _ignored_verdict(name: str, mac: str, enrolled: bool) -> str:
    if enrolled:
        return (
            f"{name} was ignored as an unknown machine before it was enrolled; it is enrolled "
            "now, so power-cycle it and it will boot."
        )
    return (
        f'{name} is an unknown machine and is ignored by policy ([boot] unknown = "ignore" '
        f"in lab.toml): it was told to move on to its next boot device. To boot it, enroll "
        f"it: pixiebox enroll {mac} --name NAME, then power-cycle it."
    )


# --------------------------------------------------------------------------- diagnose


def diagnose(
    events: Sequence[Event],
    *,
    state: MachineState,
    now: float,
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    mode: str = "proxy",
    name: str,
    settle: float = DEFAULT_SETTLE,
    enrolled: bool | None = None,
    http_port: int = 80,
) -> Diagnosis:
    """What the machine's events say about its last boot.

    `mode` is the DHCP mode (proxy | reservation | full); `settle` how long a boot step may go
    without the next one before it counts as stalled; `boot_timeout` the same after the kernel
    and initrd (the OS must phone home by then); `enrolled` whether lab.toml has the machine
    (default: unless its state is discovered)."""
    if enrolled is None:
        enrolled = state is not MachineState.DISCOVERED
    before, attempts = split_attempts(events)
    kept = attempts[-KEPT_ATTEMPTS:]
    mac = events[0].mac if events else name
    verdict, ok = _verdict(
        before, attempts, state, now, boot_timeout, mode, name, settle, enrolled, http_port, mac
    )
    if not attempts and before:
        kept = [before[-_TIMELINE_LINES:]]
    return Diagnosis(name, str(state), kept, verdict, ok)


def _verdict(
    before: list[Event],
    attempts: list[list[Event]],
    state: MachineState,
    now: float,
    boot_timeout: float,
    mode: str,
    name: str,
    settle: float,
    enrolled: bool,
    http_port: int,
    mac: str,
) -> tuple[str, bool]:
    if not attempts:
        return _without_attempts(before, state, now, mode, name, enrolled, mac)
    attempt = attempts[-1]
    start = next(e for e in attempt if e.kind in _CHAIN)
    since_start = f"{_clock(start.time, now)}, {_span(now - start.time)} ago"
    repeats = _repeats(attempts)
    again = f" This is the {repeats} attempt in a row that stopped there." if repeats else ""

    up = next((e for e in attempt if e.kind == "phone-home"), None)
    if up is not None:
        off = next((e for e in attempt if e.kind == "off" and e.time >= up.time), None)
        took = _span(up.time - start.time)
        if off is not None:
            alive = max((e.time for e in attempt if e.kind != "off"), default=up.time)
            return (
                f"{name} booted ({took} from its first boot request to the OS phoning home, at "
                f"{_clock(up.time, now)}) and went silent at {_clock(alive, now)} "
                f"({_span(now - alive)} ago): it was powered off, or it crashed. If it should "
                "be on, power it on and look at its console.",
                False,
            )
        joined = state is MachineState.JOINED or any(e.kind == "joined" for e in attempt)
        now_what = "it has joined Kubernetes" if joined else "it is up"
        return (
            f"{name} booted fine: the OS phoned home {took} after its first boot request "
            f"({_clock(start.time, now)}); {now_what}.",
            True,
        )

    chain = [e for e in attempt if e.kind in _CHAIN or e.kind in ("tftp-error", "http-error")]
    progress = [e for e in chain if e.kind in _CHAIN]
    last_step = progress[-1]
    after_step = chain[chain.index(last_step) + 1 :]
    failures = [
        e
        for e in after_step
        if e.kind == "http-error" or (e.kind == "tftp-error" and _tftp_error(e) is not None)
    ]
    last = max(e.time for e in chain)
    quiet = now - last
    kinds = {e.kind for e in progress}

    if "ignored" in kinds and last_step.kind == "ignored":
        return _ignored_verdict(name, mac, enrolled), False

    if failures:
        return _failure_verdict(name, failures[-1], now) + again, False

    if "kernel" in kinds or ("pxelinux" in kinds and last_step.kind == "tftp"):
        sent = "kernel and initrd" if "initrd" in kinds or "pxelinux" in kinds else "kernel"
        files = "the kernel and initrd" if sent != "kernel" else "the kernel"
        os_signs = [
            e
            for e in attempt[attempt.index(last_step) + 1 :]
            if e.kind in ("syslog", "metadata", "lease")
        ]
        if quiet < boot_timeout:
            return (
                f"{name} is still booting: {files} were sent {_span(quiet)} ago; the OS should "
                f"phone home soon (doctor waits {_span(boot_timeout)} before calling it "
                "failed). Run it again in a minute.",
                False,
            )
        if os_signs:
            sign = os_signs[0]
            did = {
                "syslog": "sent its first syslog line",
                "metadata": "fetched its metadata",
                "lease": "asked DHCP for its address",
            }[sign.kind]
            return (
                f"{name} received {files} and its OS started (it {did} at "
                f"{_clock(sign.time, now)}), but it never phoned home: the OS's startup stopped "
                f"before that. Read its log: pixiebox events {name}, or look at its console.",
                False,
            )
        no_initrd = (
            ""
            if sent != "kernel"
            else " (it never fetched an initrd: if its image has one, "
            "the iPXE script stopped before it)"
        )
        return (
            f"{name}: {sent} sent, no phone-home after {_span(quiet)}{no_initrd}: the OS failed "
            "to start (or cannot reach the appliance); look at its console." + again,
            False,
        )

    if quiet < settle:
        return (
            f"{name} is booting: its last step ({last_step.kind}: {last_step.message}) was "
            f"{_span(quiet)} ago. Run pixiebox doctor again in a moment.",
            False,
        )

    if "script" in kinds:
        script = next(e for e in reversed(progress) if e.kind == "script")
        found = _NEXT_KERNEL.search(script.message)
        kernel = f" {found.group('kernel')}" if found else ""
        return (
            f"{name} fetched its iPXE script at {_clock(script.time, now)} but never the "
            f"kernel{kernel}: the script stopped before it. Look at the machine's console (the "
            "script says there why it stopped); check that the URL it fetches from is this "
            "appliance ([network] server_ip) and that the machine has enough memory." + again,
            False,
        )

    loader = next((e for e in progress if _is_loader(e)), None)
    ipxe = next((e for e in progress if _is_ipxe_request(e)), None)
    if loader is not None or ipxe is not None:
        port, base = _http_where(progress, http_port)
        where = f" ({base})" if base else ""
        if ipxe is None:
            path = _tftp_path(loader) if loader is not None else "iPXE"
            return (
                f"{name} fetched iPXE but never the script ({path} was sent over TFTP, but iPXE "
                "never asked DHCP for its script either): the firmware may have refused to run "
                "it (Secure Boot on? Debian's iPXE builds are not signed: switch Secure Boot "
                f"off), or HTTP on port {port} of the appliance{where} is unreachable from the "
                "machine (a firewall?). Look at its console, then power-cycle it." + again,
                False,
            )
        return (
            f"{name} fetched iPXE but never the script: HTTP on port {port} of the "
            f"appliance{where} is unreachable from the machine (a firewall?). Check that "
            f"nothing on the appliance or between them blocks TCP port {port} (nft list "
            f"ruleset, iptables -L), then power-cycle it." + again,
            False,
        )

    firmware = [e for e in progress if e.kind == "dhcp"]
    if firmware:
        boot_file = _boot_file(firmware)
        named = f" {boot_file}" if boot_file else ""
        took_no_offer = mode != "proxy" and not any(
            e.message.startswith(("bound", "renewed")) for e in firmware
        )
        other = (
            " It never took the address Pixiebox offered, so another DHCP server most likely "
            "answered it first: switch that one off or let Pixiebox run in proxy mode."
            if took_no_offer
            else ""
        )
        other_server = "another DHCP/PXE server" if mode == "proxy" else "another DHCP server"
        return (
            f"{name} got a DHCP offer ({since_start}) but never asked for the boot "
            f"file{named}: {other_server} may be answering it, or the firmware is set to UEFI "
            "while only BIOS files are served (or the reverse). Check the firmware's boot mode "
            "(UEFI or legacy BIOS) and for other PXE servers on the LAN (a router with network "
            f"boot on, another dnsmasq), then power-cycle it.{other}" + again,
            False,
        )

    return (
        f"{name} stopped after {last_step.kind} ({last_step.message}) at "
        f"{_clock(last_step.time, now)}, {_span(quiet)} ago; look at its console." + again,
        False,
    )


def _failure_verdict(name: str, failure: Event, now: float) -> str:
    at = _clock(failure.time, now)
    if failure.kind == "tftp-error":
        path, reason = _tftp_error(failure) or ("?", failure.message)
        if "not in " in reason or "not found" in reason:
            return (
                f"{name} asked for {path} over TFTP at {at}, but the appliance does not have it "
                f"({reason}): put the file there (for iPXE builds: apt-get install ipxe)."
            )
        return (
            f"{name}'s TFTP download of {path} failed at {at}: {reason}. A flaky link or a "
            "firewall dropping UDP (port 69 and the high ports TFTP answers from) is the usual "
            "cause; power-cycle it to try again."
        )
    message = failure.message
    if message.startswith("broke off"):
        return (
            f"{name} {message} (at {at}): the connection dropped or the machine gave up (out "
            "of memory, a flaky cable or switch port). Check the link and that the file on the "
            "appliance is complete; the script retries, and a power-cycle starts over."
        )
    if "no [images." in message:
        return f"{name} could not be booted (at {at}): {message}."
    return (
        f"{name} could not download a boot file (at {at}): {message}. Put the file in the "
        "appliance's [boot] assets directory or fix the image's paths in lab.toml, then "
        "power-cycle it."
    )


def _without_attempts(
    before: list[Event],
    state: MachineState,
    now: float,
    mode: str,
    name: str,
    enrolled: bool,
    mac: str,
) -> tuple[str, bool]:
    """Verdicts for a machine that never went through a boot Pixiebox answered."""
    kinds = {e.kind for e in before}
    if not before:
        proxy = (
            " (in proxy mode the home router hands out addresses; Pixiebox answers only its "
            "PXE requests)"
            if mode == "proxy"
            else ""
        )
        return (
            f"Pixiebox has never heard from {name}: is it set to boot from the network (PXE) "
            f"first, and on the same LAN as the appliance's interface?{proxy}",
            False,
        )
    if "ignored" in kinds or any(
        e.kind == "discovered" and 'unknown = "ignore"' in e.message for e in before
    ):
        return _ignored_verdict(name, mac, enrolled), False
    up = next((e for e in reversed(before) if e.kind == "phone-home"), None)
    if up is not None and state in (MachineState.UP, MachineState.JOINED):
        return (
            f"{name} is up: its OS phoned home at {_clock(up.time, now)}, without a network "
            "boot Pixiebox saw (it booted from its disk, or before Pixiebox kept its log).",
            True,
        )
    if kinds <= {"lease", "syslog", "enrolled", "discovered", "metadata", "off"} and (
        "lease" in kinds
    ):
        return (
            f"{name} got an address from Pixiebox but never asked to boot from the network: "
            "PXE is off in its firmware, or its boot order puts a disk first. Enable network "
            "boot (PXE) and put it first, then power it on.",
            False,
        )
    last = before[-1]
    if last.kind == "discovered":
        return (
            f"{name} asked to boot at {_clock(last.time, now)} but Pixiebox did not answer "
            "it: the appliance has no boot file for its firmware. The agent's log names the "
            "file to add.",
            False,
        )
    return (
        f"{name} has not booted through Pixiebox; the last it heard was {last.kind} "
        f"({last.message}) at {_clock(last.time, now)}.",
        False,
    )


def _stage(attempt: list[Event]) -> str:
    """How far an attempt got, as a word (to tell attempts that stopped at the same place)."""
    kinds = [e.kind for e in attempt if e.kind in _CHAIN or e.kind in _ENDS]
    for kind in ("phone-home", "initrd", "kernel", "script", "ignored"):
        if kind in kinds:
            return kind
    if any(_is_ipxe_request(e) or _is_loader(e) for e in attempt):
        return "ipxe"
    return "dhcp"


def _repeats(attempts: list[list[Event]]) -> str:
    """'3rd' when the last attempts all stopped where the last one did, else ''."""
    last = _stage(attempts[-1])
    if last == "phone-home":
        return ""
    count = 0
    for attempt in reversed(attempts):
        if _stage(attempt) != last:
            break
        count += 1
    if count < 2:
        return ""
    suffix = "th" if 10 <= count % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(count % 10, "th")
    return f"{count}{suffix}"


# --------------------------------------------------------------------------- render


def _attempt_lines(attempt: list[Event]) -> list[str]:
    start = next((e.time for e in attempt if e.kind in _CHAIN), attempt[0].time)
    lines: list[str] = []
    index = 0
    while index < len(attempt):
        event = attempt[index]
        offset = event.time - start
        sign = "+" if offset >= 0 else "-"
        stamp = f"{sign}{abs(offset):.1f}s"
        if event.kind == "syslog":
            run = index
            while run < len(attempt) and attempt[run].kind == "syslog":
                run += 1
            count = run - index
            if count > 1:
                last = attempt[run - 1].message
                lines.append(f"  {stamp:>9} {'syslog':<11} {count} lines, the last: {last}")
                index = run
                continue
        lines.append(f"  {stamp:>9} {event.kind:<11} {event.message}")
        index += 1
    if len(lines) > _TIMELINE_LINES:
        head, tail = _TIMELINE_LINES - 6, 5
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
        start = next((e.time for e in attempt if e.kind in _CHAIN), attempt[0].time)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
        which = "last boot attempt" if number == count else "the attempt before"
        if not any(e.kind in _CHAIN for e in attempt):
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
    """A timeline (relative times "+0.0s dhcp …") of the last attempt(s), then the verdict."""
    return render_text(d.machine, d.state, timeline(d), d.verdict, d.ok)
