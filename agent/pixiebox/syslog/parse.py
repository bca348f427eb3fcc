"""Syslog datagrams as messages: RFC 5424 and the BSD format (RFC 3164) in the shapes real
senders produce, every text field made printable and bounded.

Two formats are on the wire: RFC 5424 (rsyslog, util-linux `logger --rfc5424`, journald
forwarders) and the older BSD format described by RFC 3164, in the shapes real senders produce:
with and without a hostname (busybox syslogd's remote logging omits it), with RFC 3339 instead of
"Mmm dd hh:mm:ss" timestamps (rsyslog's forward templates), without a PRI. Anything else is kept
as a "raw" line: a machine's words are never thrown away because they are badly framed.

The senders are not trusted: text is decoded leniently, control characters are made visible (a
log line must not rewrite the dashboard's terminal or forge a second line), and every field is
bounded.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import IPv4Address
from typing import Literal

log = logging.getLogger("pixiebox.syslog")

#: Characters of message text kept; a longer message ends in "…".
MAX_TEXT = 2048
#: Bytes of a datagram decoded: room for the longest header and MAX_TEXT characters of UTF-8
#: (RFC 5426 3.2 lets a receiver truncate), so a 64 KiB datagram costs no more than this.
MAX_DATAGRAM = 16384

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
