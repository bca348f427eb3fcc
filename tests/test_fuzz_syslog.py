"""Issue 13 item 7: the syslog parser an outsider reaches, fuzzed (hypothesis).

Every datagram on port 514 goes through `parse.parse_syslog`, which never raises: what it
cannot read is kept as a "raw" line. Its last resort (`except Exception`, logged at debug with
the traceback) would also hide a parser bug, so these tests watch that log line too: a message
that only parses because the fallback caught a crash fails here. Then the agent's recorder
reads `line`, `severity_name`, `facility_name` and redacts the line: those are exercised too.

Lines are built in the shapes real senders use (RFC 5424 with structured data, RFC 3164 with
and without hostname, RFC 3339 timestamps, no PRI), with fields at and past their bounds, then
cut, spliced and sprinkled with control characters and invalid UTF-8.
"""

from __future__ import annotations

import logging
from datetime import datetime
from ipaddress import IPv4Address

from fuzzing import fuzz, log_records
from hypothesis import given
from hypothesis import strategies as st
from pixiebox.core.trust import redact
from pixiebox.syslog.parse import MAX_TEXT, SyslogMessage, parse_syslog

SOURCE = IPv4Address("10.0.0.31")
#: The receiver's clock, fixed so that a run is reproducible; New Year's Eve and a leap day
#: are where year-less RFC 3164 timestamps turn.
NOW = [datetime(2026, 12, 31, 23, 59, 59), datetime(2028, 2, 29, 12), datetime(2027, 1, 1)]

_good_pri = st.integers(0, 191).map(lambda n: f"<{n}>")
_pri = st.one_of(
    _good_pri,
    _good_pri,
    _good_pri,
    st.sampled_from(["", "<192>", "<999>", "<-1>", "<>", "<1", "<0013>", "<\u0661>"]),
)
_rfc3339 = st.one_of(
    st.sampled_from(
        [
            "2003-10-11T22:14:15.003Z",
            "2026-12-31T23:59:60Z",  # a leap second: RFC 5424 forbids it
            "0001-01-01T00:00:00-23:59",
            "9999-12-31T23:59:59.999999999+23:59",
            "2026-02-30T00:00:00Z",
            "2026-01-01T24:00:00+24:00",
            "2026-01-01t00:00:00z",
            "2026-01-01T00:00:00",
            "-",
        ]
    ),
    st.builds(
        "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}{}".format,
        st.integers(0, 9999),
        st.integers(0, 13),
        st.integers(0, 32),
        st.integers(0, 25),
        st.integers(0, 61),
        st.integers(0, 61),
        st.sampled_from(["", "Z", "+01:00", "-99:99", ".5Z", ".1234567890"]),
    ),
)
_bsd_time = st.builds(
    "{} {:>2} {:02d}:{:02d}:{:02d}{}".format,
    st.sampled_from(["Jan", "Feb", "Dec", "Foo", "jan"]),
    st.integers(0, 32),
    st.integers(0, 25),
    st.integers(0, 61),
    st.integers(0, 61),
    st.sampled_from(["", ".123", ".1234567"]),
)
_word = st.one_of(
    st.sampled_from(["-", "host", "node-07.lab.internal", "sshd", "kernel", "ID47", "1234"]),
    st.text(min_size=1, max_size=10).map(lambda t: "_".join(t.split()) or "_"),
    st.sampled_from(["h" * 256, "a" * 49, "p" * 129, "m" * 33]),  # one past each bound
)
_sd = st.sampled_from(
    [
        "-",
        '[exampleSDID@32473 iut="3" eventSource="Application"]',
        '[a x="\\]"][b y="\\"q\\""]',
        '[unterminated x="1"',
        '[a x="]"]',
        "[]",
    ]
)
_text = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "\ufeffBOM text",
            "line\nforged second line",
            "\x1b[2J\x1b]0;title\x07",
            "\u202eevil\u202c",
            "token=abc password=hunter2 k3s_token=K10::server:secret",
            "x" * (MAX_TEXT + 10),
        ]
    ),
)


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    shape = draw(st.sampled_from(["5424", "5424", "3164", "3164-iso", "nopri", "text"]))
    pri = draw(_pri)
    if shape == "5424":
        version = draw(st.sampled_from(["1", "1", "2", "0", "1000"]))
        words = [draw(_word) for _ in range(4)]
        line = f"{pri}{version} {draw(_rfc3339)} {' '.join(words)} {draw(_sd)} {draw(_text)}"
    elif shape == "3164":
        host = draw(st.sampled_from(["host ", "", "sshd[612]: "]))
        tag = draw(st.sampled_from(["sshd[612]: ", "kernel: ", "app[]: ", "x[", ""]))
        line = f"{pri}{draw(_bsd_time)} {host}{tag}{draw(_text)}"
    elif shape == "3164-iso":
        line = f"{pri}{draw(_rfc3339)} {draw(_word)} {draw(_word)}: {draw(_text)}"
    elif shape == "nopri":
        line = f"{draw(_bsd_time)} {draw(_word)} {draw(_text)}"
    else:
        line = f"{pri}{draw(_text)}"
    data = bytearray(line.encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "truncate"]))
        if action == "insert":
            extra = st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\r\n", b" ", b"<", b"[", b'"'])
            data[at:at] = draw(st.one_of(extra, st.binary(max_size=4)))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


def check(message: SyslogMessage) -> None:
    assert message.format in ("rfc5424", "rfc3164", "raw")
    assert message.source == SOURCE
    assert (message.facility is None) == (message.severity is None)
    if message.facility is not None:
        assert 0 <= message.facility <= 23 and message.facility_name is not None
        assert message.severity is not None and message.severity_name is not None
    assert len(message.text) <= MAX_TEXT
    for value, limit in (
        (message.hostname, 255),
        (message.app, 48),
        (message.procid, 128),
        (message.msgid, 32),
    ):
        assert value is None or 0 < len(value) <= limit
    # One log line: nothing that starts a second one or drives the dashboard's terminal.
    shown = message.line
    for text in (shown, message.structured_data or ""):
        assert not any(c in text for c in "\n\r\x1b\x00\u202e\u2028"), text
    redact(shown)


@fuzz(1000)
@given(st.one_of(lines(), lines(), st.binary(max_size=400)), st.sampled_from(NOW))
def test_any_datagram_is_a_message_and_no_parser_bug_is_hidden(data: bytes, now: datetime) -> None:
    with log_records("pixiebox.syslog", logging.DEBUG) as seen:
        message = parse_syslog(data, SOURCE, now=now)
    assert not seen.with_traceback(), seen.text()
    check(message)


def test_every_truncation_of_real_lines() -> None:
    real = [
        b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473"
        b' iut="3" eventSource="Application" eventID="1011"] \xef\xbb\xbfAn application event',
        b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8",
        b"<30>2026-03-01T10:00:00+01:00 node-07 systemd[1]: Started k3s.",
        b"<13>Feb 29 00:00:00 busybox: leap day",
    ]
    with log_records("pixiebox.syslog", logging.DEBUG) as seen:
        for line in real:
            for cut in range(len(line) + 1):
                for now in NOW:
                    check(parse_syslog(line[:cut], SOURCE, now=now))
    assert not seen.with_traceback(), seen.text()
