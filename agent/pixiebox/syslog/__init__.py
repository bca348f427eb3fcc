"""The machines' syslog: UDP datagrams on port 514 become messages of the machine that sent them.

The OSIE forwards its journal here, so a machine that fails to join Kubernetes says why in its
own event log instead of on a screen nobody is looking at. Each datagram is one message (RFC 5426
3.1); octet-counted framing (RFC 6587) exists only on TCP and is not spoken here.

Two formats are on the wire: RFC 5424 (rsyslog, util-linux `logger --rfc5424`, journald
forwarders) and the older BSD format described by RFC 3164, in the shapes real senders produce:
with and without a hostname (busybox syslogd's remote logging omits it), with RFC 3339 instead of
"Mmm dd hh:mm:ss" timestamps (rsyslog's forward templates), without a PRI. Anything else is kept
as a "raw" line: a machine's words are never thrown away because they are badly framed.

The senders are not trusted: text is decoded leniently, control characters are made visible (a
log line must not rewrite the dashboard's terminal or forge a second line), every field is
bounded, and each source has a token bucket so that a machine logging in a loop cannot flood the
agent or its storage. What is dropped is counted and logged, at most once per source per minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import IPv4Address
from typing import Literal

log = logging.getLogger("pixiebox.syslog")

SYSLOG_PORT = 514
#: Characters of message text kept; a longer message ends in "…".
MAX_TEXT = 2048
#: Bytes of a datagram decoded: room for the longest header and MAX_TEXT characters of UTF-8
#: (RFC 5426 3.2 lets a receiver truncate), so a 64 KiB datagram costs no more than this.
MAX_DATAGRAM = 16384
#: Seconds between two "lines were dropped" log lines for one source.
DROP_REPORT_INTERVAL = 60.0
#: Sources tracked by the rate limiter at once; a lab has a few dozen machines, and spoofed
#: source addresses must not grow the table without bound.
MAX_SOURCES = 16384
#: Receive buffer asked of the kernel: a machine's journal arrives in a burst at boot.
RECEIVE_BUFFER = 1 << 20

Format = Literal["rfc5424", "rfc3164", "raw"]

FACILITY_NAMES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news",
    "uucp", "cron", "authpriv", "ftp", "ntp", "security", "console", "solaris-cron",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)  # fmt: skip
SEVERITY_NAMES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")

# Field bounds of RFC 5424 6.2 (hostname, app-name, procid, msgid), also applied to RFC 3164.
_MAX_HOSTNAME = 255
_MAX_APP = 48
_MAX_PROCID = 128
_MAX_MSGID = 32
_MAX_SD = 2048


@dataclass(frozen=True, slots=True)
class SyslogMessage:
    """One syslog line of one machine, every text field printable and bounded."""

    source: IPv4Address
    facility: int | None  # from PRI; None when absent
    severity: int | None
    timestamp: datetime | None  # as sent: aware when the sender gave an offset, else naive
    hostname: str | None
    app: str | None
    procid: str | None
    msgid: str | None
    text: str
    format: Format
    #: RFC 5424 structured data as sent ("[id k=\"v\"]..."), None when absent or RFC 3164.
    structured_data: str | None = None

    @property
    def severity_name(self) -> str | None:
        return None if self.severity is None else SEVERITY_NAMES[self.severity]

    @property
    def facility_name(self) -> str | None:
        return None if self.facility is None else FACILITY_NAMES[self.facility]

    @property
    def line(self) -> str:
        """The message as a syslog file shows it: "sshd[612]: Accepted publickey for root"."""
        if self.app is None:
            return self.text
        tag = self.app if self.procid is None else f"{self.app}[{self.procid}]"
        return f"{tag}: {self.text}" if self.text else tag


# --------------------------------------------------------------------------- text


def _visible_table() -> dict[str, str]:
    table = {chr(c): f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
    table |= {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
    # C1 controls (0x9b is a terminal's CSI), line/paragraph separators, bidi overrides that
    # make a line read differently from what it says, and a stray BOM: shown, not obeyed.
    hidden = (
        *range(0x80, 0xA0), 0x200E, 0x200F, 0x2028, 0x2029,
        *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF,
    )  # fmt: skip
    table |= {chr(c): f"\\u{c:04x}" for c in hidden}
    return table


_VISIBLE = _visible_table()
_HIDDEN = re.compile("|".join(map(re.escape, _VISIBLE)))


def _escape(m: re.Match[str]) -> str:
    return _VISIBLE[m.group()]


def visible(text: str, limit: int) -> str:
    """`text` with control characters escaped, at most `limit` characters ("…" if cut)."""
    if limit < 1:
        return ""
    # Escaping never shortens, so cutting first bounds the work for a 64 KiB datagram.
    text = text[: limit + 1]
    shown = _HIDDEN.sub(_escape, text)
    if len(shown) <= limit:
        return shown
    # Cut between escapes, never inside one ("\\x1" would read as something else): keep the
    # longest prefix whose escaped form leaves room for the ellipsis.
    room, grown = limit - 1, 0
    for m in _HIDDEN.finditer(text):
        if m.start() + grown >= room:
            break
        width = len(_VISIBLE[m.group()])
        if m.start() + grown + width > room:
            return _HIDDEN.sub(_escape, text[: m.start()]) + "…"
        grown += width - 1
    return _HIDDEN.sub(_escape, text[: room - grown]) + "…"


def _field(token: str | None, limit: int) -> str | None:
    """A header field: None for the RFC 5424 NILVALUE "-" or an empty token."""
    if not token or token == "-":
        return None
    return visible(token, limit)


def _message_text(text: str) -> str:
    # Senders end lines with "\n" (busybox), "\r\n" or a C string's NUL: framing, not content.
    return text.rstrip("\r\n\x00\t ")


# --------------------------------------------------------------------------- timestamps

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?([Zz]|[+-]\d\d:\d\d)?"
)
#: How far ahead of the receiver's clock an RFC 3164 timestamp may be before it is last year's.
_FUTURE_TOLERANCE = timedelta(days=31)
#: RFC 3164 4.1.2 "Mmm dd hh:mm:ss", the day space-padded ("Feb  5"); some senders add
#: milliseconds or zero-pad the day.
_BSD_TIMESTAMP = re.compile(r"([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?")


def _rfc3339(token: str) -> datetime | None:
    """An RFC 3339 timestamp (RFC 5424 6.2.3), None if it names no real instant.

    The offset is optional here: rsyslog templates and scripts send local times without one,
    and those are returned naive, as sent."""
    m = _RFC3339.fullmatch(token)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction, offset = m.group(7), m.group(8)
    tz: timezone | None = None
    if offset in ("Z", "z"):
        tz = UTC
    elif offset is not None:
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            return None
        sign = -1 if offset[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        # Second 60 is refused: RFC 5424 6.2.3.1 forbids leap seconds.
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        return None


def _bsd_time(m: re.Match[str], now: datetime) -> datetime | None:
    """An RFC 3164 timestamp has no year: the latest one that does not put it more than a month
    ahead of `now` (a December line read in January is last year's; a machine whose clock runs a
    little ahead stays in the year it meant)."""
    month = _MONTHS[m.group(1)]
    day, hour, minute, second = (int(g) for g in m.groups()[1:5])
    micro = int((m.group(6) or "0").ljust(6, "0"))
    latest = now.replace(tzinfo=None) + _FUTURE_TOLERANCE
    for year in range(now.year + 1, now.year - 8, -1):  # back to a leap year for Feb 29
        with contextlib.suppress(ValueError):
            candidate = datetime(year, month, day, hour, minute, second, micro)
            if candidate <= latest:
                return candidate
    return None


# --------------------------------------------------------------------------- parsing

_PRI = re.compile(r"<(\d{1,3})>")
#: RFC 5424 6: VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID [SP rest].
_RFC5424_HEADER = re.compile(
    r"([1-9]\d{0,2}) (-|\d{4}-\d\d-\d\d[Tt]\S*) (\S+) (\S+) (\S+) (\S+)(?: (.*))?", re.DOTALL
)
_ISO_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[Tt]\S+")  # up to the next space
#: RFC 3164 4.1.3 TAG: "name:", "name[pid]:" or "name[pid]" before the content.
_TAG = re.compile(r"([^\s\[\]:]{1,48})(?:\[([^\s\[\]]{0,128})\]:?|:)(?: |\Z)")


def _split_structured_data(rest: str) -> tuple[str | None, str]:
    """(structured data, MSG) of what follows the RFC 5424 header (6.3).

    A bracket inside a quoted PARAM-VALUE is escaped with a backslash (6.3.3), so elements are
    scanned, not split on "]". Unterminated or absent data leaves everything to MSG."""
    if rest == "-" or rest.startswith("- "):
        return None, rest[2:]
    if not rest.startswith("["):
        return None, rest
    end, length = 0, len(rest)
    while end < length and rest[end] == "[":
        i, quoted = end + 1, False
        while i < length:
            char = rest[i]
            if quoted and char == "\\":
                i += 2
                continue
            if char == '"':
                quoted = not quoted
            elif char == "]" and not quoted:
                break
            i += 1
        if i >= length:
            return None, rest
        end = i + 1
    message = rest[end:]
    return rest[:end], message[1:] if message.startswith(" ") else message


def _parse_rfc5424(m: re.Match[str], pri: int, source: IPv4Address, max_text: int) -> SyslogMessage:
    _, stamp, hostname, app, procid, msgid, rest = m.groups()
    structured, message = _split_structured_data(rest or "")
    # RFC 5424 6.4: a UTF-8 MSG starts with a BOM.
    message = message.removeprefix("\ufeff")
    return SyslogMessage(
        source=source,
        facility=pri >> 3,
        severity=pri & 7,
        timestamp=None if stamp == "-" else _rfc3339(stamp),
        hostname=_field(hostname, _MAX_HOSTNAME),
        app=_field(app, _MAX_APP),
        procid=_field(procid, _MAX_PROCID),
        msgid=_field(msgid, _MAX_MSGID),
        text=visible(_message_text(message), max_text),
        format="rfc5424",
        structured_data=_field(structured, _MAX_SD),
    )


def _parse_bsd(
    rest: str, pri: int | None, source: IPv4Address, now: datetime, max_text: int
) -> SyslogMessage | None:
    """RFC 3164 and its variants; None when there is neither a PRI nor a timestamp."""
    timestamp: datetime | None = None
    has_time = False
    bsd = _BSD_TIMESTAMP.match(rest)
    if bsd is not None and bsd.group(1) in _MONTHS and rest[bsd.end() : bsd.end() + 1] in ("", " "):
        timestamp, has_time, rest = _bsd_time(bsd, now), True, rest[bsd.end() + 1 :]
    elif (iso := _ISO_TIMESTAMP.match(rest)) is not None:
        # rsyslog's RFC3339 templates: the RFC 3164 layout with an RFC 3339 timestamp.
        timestamp = _rfc3339(iso.group())
        if timestamp is not None:
            has_time, rest = True, rest[iso.end() + 1 :]
    if pri is None and not has_time:
        return None
    hostname: str | None = None
    tag = _TAG.match(rest)
    # RFC 3164 4.1.2: HOSTNAME follows the TIMESTAMP. busybox syslogd and `logger` to a socket
    # send none: a first word shaped like a TAG ("sshd[612]:") is the TAG, not a host.
    if has_time and tag is None and rest:
        hostname, _, rest = rest.partition(" ")
        tag = _TAG.match(rest)
    app = procid = None
    if tag is not None:
        app, procid = tag.group(1), tag.group(2)
        rest = rest[tag.end() :]
    return SyslogMessage(
        source=source,
        facility=None if pri is None else pri >> 3,
        severity=None if pri is None else pri & 7,
        timestamp=timestamp,
        hostname=_field(hostname, _MAX_HOSTNAME),
        app=_field(app, _MAX_APP),
        procid=_field(procid, _MAX_PROCID),
        msgid=None,
        text=visible(_message_text(rest), max_text),
        format="rfc3164",
    )


def parse_syslog(
    data: bytes, source: IPv4Address, *, max_text: int = MAX_TEXT, now: datetime | None = None
) -> SyslogMessage:
    """One datagram as a message; never raises: what cannot be parsed is a "raw" message.

    `now` (local time, default the clock) gives RFC 3164 timestamps their missing year."""
    # Invalid UTF-8 (RFC 5424 6.4 allows any encoding without a BOM) stays visible as \\xNN.
    decoded = _message_text(data[:MAX_DATAGRAM].decode("utf-8", "backslashreplace"))
    try:
        pri: int | None = None
        rest = decoded
        m = _PRI.match(decoded)
        # RFC 5424 6.2.1 / RFC 3164 4.3.3: PRIVAL is 0..191; anything else is no PRI at all.
        if m is not None and int(m.group(1)) <= 191:
            pri, rest = int(m.group(1)), decoded[m.end() :]
            header = _RFC5424_HEADER.fullmatch(rest)
            if header is not None:
                return _parse_rfc5424(header, pri, source, max_text)
        parsed = _parse_bsd(rest, pri, source, now or datetime.now(), max_text)
        if parsed is not None:
            return parsed
    except Exception:  # a parser bug must not cost the line: keep it raw
        log.debug("syslog datagram from %s not parsed", source, exc_info=True)
    return SyslogMessage(
        source=source,
        facility=None,
        severity=None,
        timestamp=None,
        hostname=None,
        app=None,
        procid=None,
        msgid=None,
        text=visible(_message_text(decoded), max_text),
        format="raw",
    )


# --------------------------------------------------------------------------- rate limit


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    #: Dropped since the last report; the report window runs while `report_due` is set.
    unreported: int = 0
    report_due: float | None = None


class SourceLimiter:
    """A token bucket per source address: `rate` lines a second, bursts of `burst`.

    The first drop from a source is logged at once; drops after it are counted and logged as one
    line when the source's minute is up, so a looping machine costs one log line a minute."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        describe: Callable[[IPv4Address], str] = str,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"syslog rate per source must be positive, not {rate!r}")
        if burst < 1:
            raise ValueError(f"syslog burst must be at least 1, not {burst!r}")
        self.rate = float(rate)
        self.burst = int(burst)
        self.describe = describe
        self.clock = clock
        self.max_sources = max_sources
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, source: str) -> bool:
        """Spend one token of `source`'s bucket: True if the line may pass."""
        now = self.clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._make_room(now)
            bucket = self._buckets[source] = _Bucket(float(self.burst), now)
        else:
            refill = (now - bucket.updated) * self.rate
            bucket.tokens = min(float(self.burst), bucket.tokens + refill)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        bucket.unreported += 1
        if bucket.report_due is None:
            log.warning(
                "syslog: %s sends more than %g lines/s (bursts of %d); dropping its excess lines "
                "(counted, reported once a minute)",
                self._name(source),
                self.rate,
                self.burst,
            )
            bucket.unreported = 0
            bucket.report_due = now + DROP_REPORT_INTERVAL
        return False

    def report(self, *, final: bool = False) -> None:
        """Log the drops of each source whose minute is up (all of them if `final`), and forget
        sources that have been quiet long enough to have a full bucket again."""
        now = self.clock()
        for source, bucket in list(self._buckets.items()):
            if bucket.report_due is not None and (final or now >= bucket.report_due):
                if bucket.unreported:
                    log.warning(
                        "syslog: dropped %d lines from %s in the last %.0f s (over %g lines/s)",
                        bucket.unreported,
                        self._name(source),
                        now - bucket.report_due + DROP_REPORT_INTERVAL,
                        self.rate,
                    )
                    bucket.unreported = 0
                    bucket.report_due = now + DROP_REPORT_INTERVAL
                else:
                    bucket.report_due = None
            if bucket.report_due is None and self._full(bucket, now):
                del self._buckets[source]

    def _full(self, bucket: _Bucket, now: float) -> bool:
        return bucket.tokens + (now - bucket.updated) * self.rate >= self.burst

    def _make_room(self, now: float) -> None:
        """Forget idle sources, then the oldest: a quarter of the table at once, so a flood of
        spoofed addresses costs O(1) per datagram."""
        for source, bucket in list(self._buckets.items()):
            if bucket.report_due is None and self._full(bucket, now):
                del self._buckets[source]
        excess = len(self._buckets) - (self.max_sources * 3) // 4
        for source in list(self._buckets)[: max(excess, 0)]:
            del self._buckets[source]

    def _name(self, source: str) -> str:
        try:
            return self.describe(IPv4Address(source))
        except Exception:
            return source


# --------------------------------------------------------------------------- receiver


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, receiver: SyslogReceiver) -> None:
        self.receiver = receiver

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.receiver.handle(data, str(addr[0]))

    def error_received(self, exc: Exception) -> None:
        self.receiver.stats["socket_errors"] += 1
        log.debug("syslog socket error: %s", exc)


class SyslogReceiver:
    """Receives syslog over UDP until `close()`, calling `on_message` once per accepted line.

    `on_message` runs on the event loop that ran `start()`; it maps the source address to a
    machine. `describe(ip)` names a source in the agent's own log lines ("c1 (10.0.0.5)").
    `stats` counts "received" datagrams, accepted ones by format ("rfc5424", "rfc3164", "raw"),
    "dropped_rate" (over a source's rate), "failed" (on_message raised), "socket_errors"."""

    def __init__(
        self,
        on_message: Callable[[SyslogMessage], None],
        *,
        listen_ip: str = "0.0.0.0",
        port: int = SYSLOG_PORT,
        interface: str | None = None,
        rate_per_source: float = 200.0,
        burst: int = 400,
        describe: Callable[[IPv4Address], str] = str,
    ) -> None:
        self.on_message = on_message
        self.listen_ip = listen_ip
        self.port = port
        self.interface = interface
        self.stats: Counter[str] = Counter()
        self.limiter = SourceLimiter(rate_per_source, burst, describe=describe)
        self._transport: asyncio.DatagramTransport | None = None
        self._sock: socket.socket | None = None
        self._housekeeping: asyncio.TimerHandle | None = None
        self._started = False
        self._closed = False
        self._last_failure_log = float("-inf")

    async def start(self) -> None:
        """Bind the socket; returns once datagrams are being received."""
        if self._started or self._closed:
            raise RuntimeError("a SyslogReceiver starts once and cannot restart after close()")
        self._started = True
        loop = asyncio.get_running_loop()
        sock = self._open_socket()
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Endpoint(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transport, self._sock = transport, sock
        self.port = sock.getsockname()[1]
        self._schedule_housekeeping(loop)
        log.info(
            "syslog listening on %s:%d/udp%s, %g lines/s per machine (bursts of %d)",
            self.listen_ip,
            self.port,
            f" ({self.interface})" if self.interface else "",
            self.limiter.rate,
            self.limiter.burst,
        )

    def close(self) -> None:
        """Stop receiving: the port is free when this returns; unreported drops are logged."""
        if self._closed:
            return
        self._closed = True
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._sock is not None:
            # The transport closes its socket on the loop's next turn; a caller that restarts
            # the receiver (a changed config) must find the port free at once.
            self._sock.close()
            self._sock = None
        self.limiter.report(final=True)

    def handle(self, data: bytes, source: str) -> SyslogMessage | None:
        """One datagram from `source`: the accepted message, or None if rate-limited."""
        self.stats["received"] += 1
        if not self.limiter.take(source):
            self.stats["dropped_rate"] += 1
            return None
        try:
            message = parse_syslog(data, IPv4Address(source))
        except ValueError:  # not an IPv4 source: cannot happen on an AF_INET socket
            self.stats["failed"] += 1
            return None
        self.stats[message.format] += 1
        try:
            self.on_message(message)
        except Exception:
            self.stats["failed"] += 1
            # A broken callback would fail for every line: one traceback a minute says enough.
            now = time.monotonic()
            if now - self._last_failure_log >= DROP_REPORT_INTERVAL:
                self._last_failure_log = now
                log.exception("syslog line from %s could not be recorded", source)
        return message

    def _open_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            if self.interface:
                # Only the lab's machines may write to their event logs, not another network's.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
            with contextlib.suppress(OSError):  # capped by net.core.rmem_max: best effort
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            # No SO_REUSEADDR: with rsyslog already on the port, fail here rather than share it.
            sock.bind((self.listen_ip, self.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            hint = " (rsyslog or another syslog server is running?)" if exc.errno == 98 else ""
            raise OSError(
                exc.errno, f"syslog cannot listen on {self.listen_ip}:{self.port}: {exc}{hint}"
            ) from exc
        return sock

    def _schedule_housekeeping(self, loop: asyncio.AbstractEventLoop) -> None:
        def tick() -> None:
            if self._closed:
                return
            try:
                self.limiter.report()
            finally:
                self._schedule_housekeeping(loop)

        self._housekeeping = loop.call_later(5.0, tick)


__all__ = [
    "FACILITY_NAMES",
    "MAX_TEXT",
    "SEVERITY_NAMES",
    "SYSLOG_PORT",
    "SourceLimiter",
    "SyslogMessage",
    "SyslogReceiver",
    "parse_syslog",
    "visible",
]
