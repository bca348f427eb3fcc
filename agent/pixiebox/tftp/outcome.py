"""What became of a TFTP request: the TftpEvent the agent records, and the log's sentences.

The sentences are worded from the event alone, so what a person reads and what code reads
(kind, reason, bytes...) cannot drift apart. Sizes are binary (core.wording.size).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pixiebox.core.wording import size as size_text
from pixiebox.net.limits import Quota

log = logging.getLogger("pixiebox.tftp")

EventKind = Literal["sent", "aborted", "refused", "not_found"]


@dataclass(frozen=True)
class TftpEvent:
    """The outcome of one request, for the agent's event log.

    `path` is the requested name relative to the root (after `\\` → `/` and dropping a leading
    `/`), or the name as sent when it could not be made one. `size` is the file's size when it
    was found.

    `reason` is a short code, empty for a plain "sent":
    - sent: "no-last-ack" (all blocks sent, the last ACK never came: docs/firmware-quirks.md#18);
    - aborted: "size-probe" (UEFI's tsize query, normal), "peer-error" (the client sent an
      ERROR), "timeout" (no ACK, or nothing at all for [tftp] idle_timeout), "gone" (its port
      closed, or the socket failed), "stopping" (the agent stopped; the client got ERROR 0),
      "evicted" (it had acknowledged nothing and gave way to a new request at a [tftp] limit:
      tftp.limits), "read-error", "socket-error", "internal-error";
    - refused: "read-only" (an upload), "mail-mode", "busy" (a [tftp] limit reached and no
      half-open transfer to end for it), and net.paths' codes: "climbs-out" (`..`), "outside"
      (a link leading out of the root), "no-name", "not-a-file", "unreadable";
    - not_found: "not-found", or "expected-miss" for files firmware asks for first and is fine
      without (autoexec.ipxe, bootsig.bin).
    `detail` says it for people (the client's error text, the places looked in, where a link
    led); it may name server paths, so it goes to the log and the event only: the client's
    ERROR packet carries packets.CLIENT_TEXT's words for its code, nothing else. `bytes` is
    the file's size for sent, else what the client acknowledged before it stopped; `seconds`
    how long the transfer ran; `blksize` the negotiated block size (0: no transfer began)."""

    kind: EventKind
    client_ip: str
    client_port: int
    path: str
    size: int | None
    reason: str = ""
    detail: str = ""
    bytes: int = 0
    seconds: float = 0.0
    blksize: int = 0


def next_step(path: str) -> str:
    """What a client does after fetching `path`, for the log line of a finished transfer."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith((".kpxe", ".kkpxe", ".pxe")) or (
        name.endswith(".efi") and ("ipxe" in name or name.startswith("snp"))
    ):
        return "next it should ask DHCP again as iPXE"
    if name == "pxelinux.0":
        return "next it should fetch its pxelinux.cfg file"
    if path.lower().startswith("pxelinux.cfg/"):
        return "next it should fetch the kernel and initrd the file names"
    return "next the client runs or reads it"


def _quota(level: int, left_out: int | None) -> tuple[int, str]:
    """A line's level and note under tftp.limits.Quota: `left_out` None means this one is
    over its kind's quota (debug level only); a count, how many were, since the last one."""
    if left_out is None:
        return logging.DEBUG, ""
    return level, f" ({left_out} more like it since, at debug level)" if left_out else ""


def log_finished(event: TftpEvent, who: str, level: int, left_out: int | None = 0) -> None:
    """The one line for a transfer that began (sent or aborted)."""
    level, more = _quota(level, left_out)
    size = size_text(event.size or 0)
    if event.kind == "sent":
        note = f" ({event.detail})" if event.detail else ""
        log.log(
            level,
            "%s fetched %s (%s) over TFTP in %.1f s%s; %s%s",
            who,
            event.path,
            size,
            event.seconds,
            note,
            next_step(event.path),
            more,
        )
    elif event.reason == "size-probe":
        log.log(
            level,
            "%s asked for the size of %s (%s) over TFTP: %s (docs/firmware-quirks.md#17); it "
            "should ask for the file again%s",
            who,
            event.path,
            size,
            event.detail,
            more,
        )
    else:
        log.log(
            level,
            "%s stopped fetching %s over TFTP after %s of %s: %s; other transfers carry on, "
            "and the machine starts over if it asks again%s",
            who,
            event.path,
            size_text(event.bytes),
            size,
            event.detail,
            more,
        )


def log_refused(
    event: TftpEvent, who: str, code: int, *, upload: bool, left_out: int | None = 0
) -> None:
    level, more = _quota(logging.WARNING, left_out)
    action = "tried to upload" if upload else "asked for"
    log.log(
        level,
        "%s %s %s over TFTP: refused, %s; it got ERROR %d%s",
        who,
        action,
        event.path,
        event.detail,
        code,
        more,
    )


def log_busy(event: TftpEvent, who: str, left_out: int | None) -> None:
    level, more = _quota(logging.WARNING, left_out)
    log.log(
        level,
        "%s asked for %s over TFTP: no room, %s; it got ERROR 0 (server busy) and should ask "
        "again%s",
        who,
        event.path,
        event.detail,
        more,
    )


def log_not_found(event: TftpEvent, who: str, looked: list[str], left_out: int | None = 0) -> None:
    if event.reason == "expected-miss":
        log.debug(
            "%s asked for %s over TFTP: none here, normal: %s",
            event.client_ip,
            event.path,
            event.detail,
        )
        return
    level, more = _quota(logging.WARNING, left_out)
    log.log(
        level,
        "%s asked for %s over TFTP: not found (looked in %s); it got 'file not found' and "
        "will try its next boot option or give up%s",
        who,
        event.path,
        ", ".join(looked),
        more,
    )


class Outbox:
    """Outcomes on their way to `on_event` (the agent's event log): delivered on the next turn
    of `loop` (set once the server runs), off the packet path, or at once by `deliver()` (a
    stop: the agent closes its store right after).

    What a forged datagram can cause (any outcome but a sent file or a stop), each with its
    event in a machine's log (the one whose address was forged), is emitted a few per period
    per kind and reason (a Quota); the rest are counted in `stats["events_left_out"]`."""

    def __init__(self, on_event: Callable[[TftpEvent], None] | None, stats: Counter[str]) -> None:
        self.on_event = on_event
        self.stats = stats
        self.loop: asyncio.AbstractEventLoop | None = None
        self._quota = Quota()
        self._queued: list[TftpEvent] = []

    def emit(self, event: TftpEvent, reason: str | None = None) -> None:
        """Queue `event`. `reason`: its quota key's, when not the event's own."""
        loop = self.loop
        if self.on_event is None or loop is None or loop.is_closed():
            return
        key = event.reason if reason is None else reason
        limited = event.kind != "sent" and key != "stopping"
        if limited and self._quota.admit(f"{event.kind}:{key}") is None:
            self.stats["events_left_out"] += 1
            return
        self._queued.append(event)
        if len(self._queued) == 1:
            loop.call_soon(self.deliver)

    def deliver(self) -> None:
        events, self._queued = self._queued, []
        if self.on_event is None:
            return
        for event in events:
            try:
                self.on_event(event)
            except Exception:
                log.exception("the TFTP event handler failed on %s", event)
