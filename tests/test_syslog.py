"""The syslog receiver: the parser on real-world lines, then real senders in network namespaces.

Unit tests feed `parse_syslog` the RFC 5424 and RFC 3164 examples and bytes captured from the
senders a lab runs (util-linux `logger`, busybox syslogd's remote logging, rsyslog templates),
plus garbage. The integration tests run the receiver in its own namespace (tests/syslog_serve.py)
and real peers in others: util-linux `logger -n`, busybox `syslogd -R` fed by `busybox logger`,
a flooding machine next to a well-behaved one, and a fuzzer. The senders at the bottom of this
file (``python tests/test_syslog.py flood|fuzz ...``) run inside a client namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import netlab
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pixiebox.syslog import (
    MAX_TEXT,
    SourceLimiter,
    SyslogMessage,
    SyslogReceiver,
    parse_syslog,
    visible,
)

TESTS_DIR = Path(__file__).resolve().parent
SYSLOG_SERVE = TESTS_DIR / "syslog_serve.py"
THIS = Path(__file__).resolve()

SOURCE = IPv4Address("10.51.4.10")
NOW = datetime(2026, 3, 1, 12, 0, 0)

COLLECTOR_IP = "10.51.4.2"
ALPHA_IP = "10.51.4.10"
BBOX_IP = "10.51.4.11"
FLOOD_IP = "10.51.4.12"
FUZZ_IP = "10.51.4.13"

#: Bytes captured from the real senders (see the integration tests for the same senders live).
LOGGER_3164 = b"<156>Nov 25 22:54:32 vm myapp: hello 3164"
LOGGER_5424 = (
    b'<13>1 2026-11-25T22:54:32.868976+00:00 vm myapp 26824 ID47 [timeQuality tzKnown="1" '
    b'isSynced="0"][exampleSDID@32473 iut="3"] hello sd'
)
BUSYBOX = b"<27>Nov 25 22:55:03 bbapp: busybox says hi\n"
BUSYBOX_RELAYED_PID = b"<133>Nov 25 22:55:03 utilapp[4242]: util-linux logger via /dev/log\n"
RSYSLOG_RFC3339 = b"<30>2024-03-01T10:15:02.123456+01:00 node1 systemd[1]: Started kubelet.service."
RSYSLOG_PROTOCOL23 = (
    b"<30>1 2024-03-01T10:15:02.123456+01:00 node1 kubelet 812 - - "
    b'E0301 10:15:02.1 812 "Failed to get node" err="node \\"c1\\" not found"\n'
)


def parse(data: bytes, **kwargs: Any) -> SyslogMessage:
    return parse_syslog(data, SOURCE, now=NOW, **kwargs)


# --------------------------------------------------------------------------- RFC 5424


def test_rfc5424_example_1_bom_and_no_structured_data() -> None:
    """RFC 5424 6.5 example 1."""
    m = parse(
        b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - "
        b"\xef\xbb\xbf'su root' failed for lonvick on /dev/pts/8"
    )
    assert m.format == "rfc5424"
    assert (m.facility, m.severity) == (4, 2)  # auth.crit
    assert (m.facility_name, m.severity_name) == ("auth", "crit")
    assert m.timestamp == datetime(2003, 10, 11, 22, 14, 15, 3000, tzinfo=UTC)
    assert (m.hostname, m.app, m.procid, m.msgid) == ("mymachine.example.com", "su", None, "ID47")
    assert m.structured_data is None
    assert m.text == "'su root' failed for lonvick on /dev/pts/8"
    assert m.source == SOURCE


def test_rfc5424_example_2_offset_and_microseconds() -> None:
    m = parse(
        b"<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - "
        b"%% It's time to make the do-nuts."
    )
    assert (m.facility, m.severity) == (20, 5)  # local4.notice
    assert m.timestamp == datetime(2003, 8, 24, 5, 14, 15, 3, tzinfo=timezone(timedelta(hours=-7)))
    assert (m.hostname, m.app, m.procid, m.msgid) == ("192.0.2.1", "myproc", "8710", None)
    assert m.text == "%% It's time to make the do-nuts."
    assert m.line == "myproc[8710]: %% It's time to make the do-nuts."


def test_rfc5424_example_3_structured_data_then_message() -> None:
    m = parse(
        b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 "
        b'[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"] '
        b"\xef\xbb\xbfAn application event log entry..."
    )
    assert m.app == "evntslog"
    assert m.structured_data == (
        '[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"]'
    )
    assert m.text == "An application event log entry..."


def test_rfc5424_example_4_structured_data_only() -> None:
    m = parse(
        b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 "
        b'[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"]'
        b'[examplePriority@32473 class="high"]'
    )
    assert m.format == "rfc5424"
    assert m.structured_data is not None
    assert m.structured_data.endswith('[examplePriority@32473 class="high"]')
    assert m.text == ""
    assert m.line == "evntslog"


def test_rfc5424_escaped_brackets_and_quotes_inside_structured_data() -> None:
    m = parse(b'<14>1 - host app - - [x@1 a="b\\]c" d="e\\"] f"][y@1 g="["] the message')
    assert m.structured_data == '[x@1 a="b\\]c" d="e\\"] f"][y@1 g="["]'
    assert m.text == "the message"
    assert (m.timestamp, m.procid, m.msgid) == (None, None, None)


def test_rfc5424_unterminated_structured_data_keeps_everything_as_text() -> None:
    m = parse(b'<14>1 - host app - - [x@1 a="never closed] message')
    assert m.format == "rfc5424"
    assert m.structured_data is None
    assert m.text == '[x@1 a="never closed] message'


def test_logger_rfc5424_as_captured() -> None:
    m = parse(LOGGER_5424)
    assert m.format == "rfc5424"
    assert (m.facility, m.severity, m.app, m.procid, m.msgid) == (1, 5, "myapp", "26824", "ID47")
    assert m.structured_data == '[timeQuality tzKnown="1" isSynced="0"][exampleSDID@32473 iut="3"]'
    assert m.text == "hello sd"


def test_rsyslog_protocol23_format() -> None:
    m = parse(RSYSLOG_PROTOCOL23)
    assert m.format == "rfc5424"
    assert m.timestamp == datetime(
        2024, 3, 1, 10, 15, 2, 123456, tzinfo=timezone(timedelta(hours=1))
    )
    assert (m.hostname, m.app, m.procid) == ("node1", "kubelet", "812")
    assert m.text == 'E0301 10:15:02.1 812 "Failed to get node" err="node \\"c1\\" not found"'


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("-", None),
        ("2003-10-11T22:14:15Z", datetime(2003, 10, 11, 22, 14, 15, tzinfo=UTC)),
        ("2003-10-11T22:14:15.123456789Z", datetime(2003, 10, 11, 22, 14, 15, 123456, tzinfo=UTC)),
        ("2003-10-11T22:14:15", datetime(2003, 10, 11, 22, 14, 15)),  # naive: as sent
        ("2003-10-11T23:59:60Z", None),  # RFC 5424 6.2.3.1: no leap seconds
        ("2003-02-30T10:00:00Z", None),
        ("2003-10-11T22:14:15+25:00", None),
        ("2003-10-11T22:14:15.Z", None),
    ],
)
def test_rfc5424_timestamps(stamp: str, expected: datetime | None) -> None:
    m = parse(f"<14>1 {stamp} host app - - - text".encode())
    assert m.format == "rfc5424"
    assert m.timestamp == expected
    assert m.text == "text"


# --------------------------------------------------------------------------- RFC 3164


def test_rfc3164_example_1() -> None:
    """RFC 3164 5.4 example 1."""
    m = parse(b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8")
    assert m.format == "rfc3164"
    assert (m.facility, m.severity) == (4, 2)
    assert m.timestamp == datetime(2025, 10, 11, 22, 14, 15)  # the year before NOW's
    assert (m.hostname, m.app, m.procid, m.msgid) == ("mymachine", "su", None, None)
    assert m.text == "'su root' failed for lonvick on /dev/pts/8"


def test_rfc3164_example_2_no_pri_no_header_is_raw() -> None:
    m = parse(b"Use the BFG!")
    assert m.format == "raw"
    assert (m.facility, m.severity, m.timestamp, m.hostname, m.app) == (None,) * 5
    assert m.text == "Use the BFG!"


def test_rfc3164_example_3_what_follows_the_host_is_content() -> None:
    """RFC 3164 5.4 example 3: "CST" is taken as the host, the rest is the message."""
    m = parse(
        b"<165>Aug 24 05:34:00 CST 1987 mymachine myproc[10]: %% It's time to make the do-nuts."
    )
    assert m.format == "rfc3164"
    assert m.timestamp == datetime(2025, 8, 24, 5, 34)
    assert m.hostname == "CST"
    assert m.app is None
    assert m.text == "1987 mymachine myproc[10]: %% It's time to make the do-nuts."


def test_rfc3164_example_4_unrecognised_timestamp_is_content() -> None:
    m = parse(
        b"<0>1990 Oct 22 10:52:01 TZ-6 scapegoat.dmz.example.org 10.1.2.3 sched[0]: "
        b"That's All Folks!"
    )
    assert m.format == "rfc3164"
    assert (m.facility, m.severity, m.timestamp, m.hostname, m.app) == (0, 0, None, None, None)
    assert m.text.startswith("1990 Oct 22 10:52:01 TZ-6")


def test_rfc3164_space_padded_day_and_ip_hostname() -> None:
    m = parse(b"<13>Feb  5 17:32:18 10.0.0.99 Use the BFG!")
    assert m.timestamp == datetime(2026, 2, 5, 17, 32, 18)
    assert (m.hostname, m.app, m.text) == ("10.0.0.99", None, "Use the BFG!")


def test_logger_rfc3164_as_captured() -> None:
    m = parse(LOGGER_3164)
    assert m.format == "rfc3164"
    assert (m.facility, m.severity) == (19, 4)  # local3.warning
    assert m.timestamp == datetime(2025, 11, 25, 22, 54, 32)
    assert (m.hostname, m.app, m.text) == ("vm", "myapp", "hello 3164")


def test_busybox_remote_logging_has_no_hostname() -> None:
    m = parse(BUSYBOX)
    assert m.format == "rfc3164"
    assert (m.facility, m.severity) == (3, 3)  # daemon.err
    assert (m.hostname, m.app, m.procid) == (None, "bbapp", None)
    assert m.text == "busybox says hi"  # the trailing newline is framing


def test_busybox_relaying_a_tag_with_pid() -> None:
    m = parse(BUSYBOX_RELAYED_PID)
    assert (m.hostname, m.app, m.procid) == (None, "utilapp", "4242")
    assert m.text == "util-linux logger via /dev/log"


def test_rsyslog_rfc3339_template() -> None:
    m = parse(RSYSLOG_RFC3339)
    assert m.format == "rfc3164"
    assert m.timestamp == datetime(
        2024, 3, 1, 10, 15, 2, 123456, tzinfo=timezone(timedelta(hours=1))
    )
    assert (m.hostname, m.app, m.procid) == ("node1", "systemd", "1")
    assert m.line == "systemd[1]: Started kubelet.service."


def test_missing_pri_with_a_timestamp_is_still_rfc3164() -> None:
    m = parse(b"Mar  1 10:15:02 node1 sshd[612]: Accepted publickey for root")
    assert m.format == "rfc3164"
    assert (m.facility, m.severity) == (None, None)
    assert (m.hostname, m.app, m.procid) == ("node1", "sshd", "612")


def test_pri_and_tag_without_timestamp() -> None:
    m = parse(b"<12>kernel: Out of memory: Killed process 812 (kubelet)")
    assert (m.format, m.severity, m.timestamp, m.hostname) == ("rfc3164", 4, None, None)
    assert (m.app, m.text) == ("kernel", "Out of memory: Killed process 812 (kubelet)")


def test_a_url_is_not_a_tag() -> None:
    m = parse(b"<14>Mar  1 10:15:02 node1 http://example.com/ is down")
    assert (m.hostname, m.app, m.text) == ("node1", None, "http://example.com/ is down")


@pytest.mark.parametrize(
    ("stamp", "now", "expected"),
    [
        ("Dec 31 23:59:59", datetime(2026, 1, 1, 0, 0, 5), datetime(2025, 12, 31, 23, 59, 59)),
        ("Jan  1 00:00:01", datetime(2025, 12, 31, 23, 59, 58), datetime(2026, 1, 1, 0, 0, 1)),
        ("Feb 29 12:00:00", datetime(2025, 3, 1), datetime(2024, 2, 29, 12)),
        ("Feb 30 12:00:00", datetime(2025, 3, 1), None),
        ("Mar 01 12:00:00.250", datetime(2025, 3, 1), datetime(2025, 3, 1, 12, 0, 0, 250000)),
        ("Mar 20 12:00:00", datetime(2025, 3, 1), datetime(2025, 3, 20, 12)),  # a clock ahead
        ("Aug 24 05:34:00", datetime(2026, 3, 1), datetime(2025, 8, 24, 5, 34)),
    ],
)
def test_rfc3164_year_is_the_latest_not_far_ahead(
    stamp: str, now: datetime, expected: datetime | None
) -> None:
    m = parse_syslog(f"<13>{stamp} host app: x".encode(), SOURCE, now=now)
    assert (m.format, m.timestamp, m.hostname, m.app) == ("rfc3164", expected, "host", "app")


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<",
        b"<13",
        b"<13>",
        b"<abc>text",
        b"<192>out of range",
        b"<1234>too long",
        b"<-1>negative",
        b"<13>1",
        b"<13>1 ",
        b"<13>1 - - - - -",
        b"\x00\x00\x00",
        b"\xff" * 100,
        b"<13>" + b"[" * 70000,
        b"<13>1 - h a - - " + b"[" * 70000,
        b'<13>1 - h a - - [x a="' + b"\\" * 70000,
        b"<13>Jan  1 00:00:00 " + b" " * 70000,
        b"<13>1 " + b"a " * 35000,
    ],
)
def test_garbage_never_raises(data: bytes) -> None:
    m = parse(data)
    assert m.format in ("rfc5424", "rfc3164", "raw")
    assert len(m.text) <= MAX_TEXT
    assert_printable(m)


def test_invalid_pri_is_no_pri() -> None:
    m = parse(b"<192>Oct 11 22:14:15 host app: hi")
    assert m.format == "raw"  # RFC 3164 4.3.3: the whole datagram is content
    assert m.text == "<192>Oct 11 22:14:15 host app: hi"


def test_non_utf8_text_is_kept_visible() -> None:
    m = parse(b"<14>Oct 11 22:14:15 host app: caf\xe9 cr\xe8me \xc3\xa9t\xc3\xa9")
    assert m.text == "caf\\xe9 cr\\xe8me été"
    m = parse(b"<14>1 - h\xffst app - - - \xfe\xff")
    assert (m.hostname, m.text) == ("h\\xffst", "\\xfe\\xff")


def test_control_characters_are_made_visible() -> None:
    m = parse(
        b"<14>Oct 11 22:14:15 host app: red \x1b[31mALERT\x1b[0m\r\nforged: line\tand "
        b"\xc2\x9b2J \xe2\x80\xaeevil\x00end\n"
    )
    assert m.text == (
        "red \\x1b[31mALERT\\x1b[0m\\r\\nforged: line\\tand \\u009b2J \\u202eevil\\x00end"
    )
    assert visible("a\u2028b\x7f", 100) == "a\\u2028b\\x7f"


def test_text_is_bounded() -> None:
    m = parse(b"<14>Oct 11 22:14:15 host app: " + b"x" * 100_000)
    assert len(m.text) == MAX_TEXT
    assert m.text.endswith("x…")
    exact = parse(b"<14>Oct 11 22:14:15 host app: " + b"y" * MAX_TEXT)
    assert exact.text == "y" * MAX_TEXT
    escaped = parse(b"<14>Oct 11 22:14:15 host app: " + b"\x01" * MAX_TEXT)
    assert escaped.text == "\\x01" * ((MAX_TEXT - 1) // 4) + "…"  # cut between escapes
    short = parse(b"<14>x: " + b"z" * 50, max_text=10)
    assert short.text == "zzzzzzzzz…"


def test_header_fields_are_bounded() -> None:
    m = parse(b"<14>1 - " + b"h" * 400 + b" " + b"a" * 100 + b" " + b"p" * 200 + b" m" * 1 + b" -")
    assert m.format == "rfc5424"
    assert m.hostname is not None and len(m.hostname) == 255
    assert m.app is not None and len(m.app) == 48
    assert m.procid is not None and len(m.procid) == 128


def assert_printable(m: SyslogMessage) -> None:
    for value in (m.text, m.hostname, m.app, m.procid, m.msgid, m.structured_data):
        if value is None:
            continue
        for char in value:
            assert unicodedata.category(char) != "Cc", (char, value)
            assert char not in "\u2028\u2029\u202e\u2066\ufeff", (char, value)


SAMPLES = [
    LOGGER_3164,
    LOGGER_5424,
    BUSYBOX,
    BUSYBOX_RELAYED_PID,
    RSYSLOG_RFC3339,
    RSYSLOG_PROTOCOL23,
    b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - \xef\xbb\xbf'su root'",
    b'<165>1 2003-10-11T22:14:15.003Z m evntslog - ID47 [ex@32473 iut="3" a="\\]"] msg',
    b"<0>Oct 22 10:52:01 host sched[0]: That's All Folks!",
]


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """A real line, cut, spliced and sprinkled with hostile bytes."""
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "truncate", "duplicate"]))
        if action == "insert":
            data[at:at] = draw(
                st.one_of(
                    st.binary(max_size=8),
                    st.sampled_from([b" ", b"<", b">", b"[", b"]", b'"', b"\\", b"-", b":",
                                     b"\xef\xbb\xbf", b"\n", b"\x00", b"<191>", b"1 "]),
                )
            )  # fmt: skip
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 10))]
        elif action == "truncate":
            del data[at:]
        else:
            data[at:at] = data[: draw(st.integers(0, 40))]
    return bytes(data)


def check_invariants(m: SyslogMessage) -> None:
    assert m.format in ("rfc5424", "rfc3164", "raw")
    assert m.source == SOURCE
    assert (m.facility is None) == (m.severity is None)
    assert m.facility is None or 0 <= m.facility <= 23
    assert m.severity is None or 0 <= m.severity <= 7
    assert m.timestamp is None or isinstance(m.timestamp, datetime)
    assert len(m.text) <= MAX_TEXT
    for value, limit in ((m.hostname, 255), (m.app, 48), (m.procid, 128), (m.msgid, 32)):
        assert value is None or (0 < len(value) <= limit and " " not in value)
    if m.format == "raw":
        assert (m.hostname, m.app, m.procid, m.msgid, m.timestamp) == (None,) * 5
    assert_printable(m)
    assert isinstance(m.line, str)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=3000), mangled()))
def test_fuzz_parse_never_raises(data: bytes) -> None:
    check_invariants(parse(data))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=600))
def test_fuzz_text_after_a_valid_header(text: str) -> None:
    for header in ("<14>1 - host app - - - ", "<14>Oct 11 22:14:15 host app[1]: ", "<14>"):
        m = parse((header + text).encode("utf-8", "surrogatepass"))
        check_invariants(m)
        assert m.format != "raw"


# --------------------------------------------------------------------------- rate limit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drop_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pixiebox.syslog"]


def test_token_bucket_burst_then_rate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "pixiebox.syslog")
    clock = FakeClock()
    limiter = SourceLimiter(10.0, 20, clock=clock, describe=lambda ip: f"c1 ({ip})")
    assert [limiter.take("10.0.0.5") for _ in range(25)] == [True] * 20 + [False] * 5
    assert limiter.take("10.0.0.6")  # another machine has its own bucket
    clock.now += 0.5  # 5 tokens back
    assert [limiter.take("10.0.0.5") for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 100
    assert sum(limiter.take("10.0.0.5") for _ in range(100)) == 20  # refilled to the burst only
    assert drop_warnings(caplog) == [
        "syslog: c1 (10.0.0.5) sends more than 10 lines/s (bursts of 20); dropping its excess "
        "lines (counted, reported once a minute)"
    ]


def test_drops_are_logged_once_a_minute_per_source(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "pixiebox.syslog")
    clock = FakeClock()
    limiter = SourceLimiter(1.0, 1, clock=clock)
    for _ in range(1000):
        limiter.take("10.0.0.5")
    assert len(drop_warnings(caplog)) == 1  # the first drop, at once
    clock.now += 30
    limiter.report()
    for _ in range(500):
        limiter.take("10.0.0.5")
    assert len(drop_warnings(caplog)) == 1  # within the minute: counted only
    clock.now += 30
    limiter.report()
    assert drop_warnings(caplog)[1] == (
        "syslog: dropped 1497 lines from 10.0.0.5 in the last 60 s (over 1 lines/s)"
    )
    clock.now += 60
    limiter.report()  # a quiet minute: nothing to say, and the source is forgotten
    assert len(drop_warnings(caplog)) == 2
    assert len(limiter) == 0
    limiter.take("10.0.0.5")
    limiter.take("10.0.0.5")
    assert len(drop_warnings(caplog)) == 3  # a new flood is reported at once again


def test_limiter_table_stays_bounded_under_spoofed_sources() -> None:
    clock = FakeClock()
    limiter = SourceLimiter(1.0, 2, clock=clock, max_sources=100)
    for i in range(20_000):
        limiter.take(str(IPv4Address(0x0A000000 + i)))
        assert len(limiter) <= 100
    # A newcomer still gets its own burst, and no more.
    assert [limiter.take("10.99.0.1") for _ in range(3)] == [True, True, False]


def test_limiter_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="positive"):
        SourceLimiter(0.0, 10)
    with pytest.raises(ValueError, match="at least 1"):
        SyslogReceiver(lambda m: None, burst=0)


def test_receiver_counts_and_survives_a_failing_callback(caplog: pytest.LogCaptureFixture) -> None:
    def broken(message: SyslogMessage) -> None:
        raise RuntimeError("the store is gone")

    receiver = SyslogReceiver(broken, rate_per_source=1.0, burst=3)
    for data in (LOGGER_5424, BUSYBOX, b"junk", b"<13>x: over the burst"):
        receiver.handle(data, "10.0.0.5")
    assert receiver.stats == {
        "received": 4,
        "rfc5424": 1,
        "rfc3164": 1,
        "raw": 1,
        "failed": 3,
        "dropped_rate": 1,
    }
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1  # once a minute, not once a line


def test_receiver_on_loopback() -> None:
    """start/close on a real socket: lines arrive, close frees the port, restart is refused."""

    async def scenario() -> tuple[list[SyslogMessage], int]:
        got: list[SyslogMessage] = []
        receiver = SyslogReceiver(got.append, listen_ip="127.0.0.1", port=0)
        await receiver.start()
        port = receiver.port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for data in (LOGGER_3164, BUSYBOX, b"\xff\x00garbage"):
                sock.sendto(data, ("127.0.0.1", port))
            for _ in range(200):
                if len(got) == 3:
                    break
                await asyncio.sleep(0.01)
        # Another receiver on the same port fails loudly instead of sharing it.
        other = SyslogReceiver(got.append, listen_ip="127.0.0.1", port=port)
        with pytest.raises(OSError, match=r"syslog cannot listen on 127\.0\.0\.1"):
            await other.start()
        receiver.close()
        receiver.close()
        with pytest.raises(RuntimeError):
            await receiver.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", port))  # free again
        return got, port

    got, _ = asyncio.run(scenario())
    assert [m.format for m in got] == ["rfc3164", "rfc3164", "raw"]
    assert all(m.source == IPv4Address("127.0.0.1") for m in got)
    assert got[2].text == "\\xff\\x00garbage"


# --------------------------------------------------------------------------- the lab


@dataclass
class Server:
    host: netlab.Host
    proc: subprocess.Popen[bytes]
    log: Path
    events_path: Path
    stats_path: Path
    port: int

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text().split("\n")[:-1]  # the last may be incomplete
        return [json.loads(line) for line in lines if line.strip()]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 10.0
    ) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for event in self.events():
                if predicate(event):
                    return event
            assert self.proc.poll() is None, f"syslog_serve.py exited:\n{self.log_text()[-3000:]}"
            return None

        return netlab.wait_until(find, timeout, 0.05, what)

    def wait_text(self, text: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.wait_event(lambda e: e["text"] == text, f"a message {text!r}", timeout)

    def stats(self) -> dict[str, int]:
        """The receiver's counters, asked for with SIGUSR1."""
        self.stats_path.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR1)
        netlab.wait_until(self.stats_path.exists, 10.0, 0.05, "stats written")
        return dict(json.loads(self.stats_path.read_text()))

    def stop(self) -> str:
        """SIGTERM; the server's output, checked for a clean exit."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(15) == 0, self.log_text()[-3000:]
        text = self.log_text()
        assert "SYSLOG stopped: sockets left 0" in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        return text


def start_server(host: netlab.Host, work: Path, *extra: str, port: int = 514) -> Server:
    stem = f"syslog-{port}"
    log = host.log_path(stem)
    events, stats = work / f"{stem}.events.jsonl", work / f"{stem}.stats.json"
    argv = [sys.executable, str(SYSLOG_SERVE), "--port", str(port), "--interface", host.iface,
            "--events", str(events), "--stats", str(stats), *extra]  # fmt: skip
    proc = host.popen(argv, log)

    def ready() -> bool:
        text = log.read_text(errors="replace") if log.exists() else ""
        if proc.poll() is not None:
            raise AssertionError(f"syslog_serve.py exited ({proc.returncode}):\n{text[-3000:]}")
        return "SYSLOG listening" in text

    netlab.wait_until(ready, 15.0, 0.05, "syslog_serve.py ready")
    return Server(host, proc, log, events, stats, port)


@dataclass
class SyslogLab:
    server: Server
    collector: netlab.Host
    alpha: netlab.Host
    bbox: netlab.Host
    flood: netlab.Host
    fuzz: netlab.Host
    work: Path

    def logger(self, *args: str, host: netlab.Host | None = None) -> None:
        """util-linux logger over UDP to the collector."""
        argv = ["logger", "-n", COLLECTOR_IP, "-P", "514", "-d", *args]
        (host or self.alpha).run(argv, timeout=15.0)


def prerequisites() -> None:
    problem = netlab.prerequisite_problem(("logger", "busybox", "unshare", "mount"))
    if problem:
        if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
            pytest.fail(f"CI=true but a syslog test prerequisite is missing: {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyslogLab]:
    prerequisites()
    work = tmp_path_factory.mktemp("syslog")
    with netlab.Segment(work / "segment") as segment:
        collector = segment.add_host("collector", ip=f"{COLLECTOR_IP}/24")
        alpha = segment.add_host("alpha", ip=f"{ALPHA_IP}/24")
        bbox = segment.add_host("bbox", ip=f"{BBOX_IP}/24")
        flood = segment.add_host("flood", ip=f"{FLOOD_IP}/24")
        fuzz = segment.add_host("fuzz", ip=f"{FUZZ_IP}/24")
        server = start_server(collector, work)  # the defaults: 200 lines/s, bursts of 400
        yield SyslogLab(server, collector, alpha, bbox, flood, fuzz, work)
        server.stop()
        names = [h.name for h in segment.hosts] + [segment.switch.name]
    leftovers = set(names) & set(netlab.list_namespaces())
    assert not leftovers, f"namespaces left behind: {leftovers}"


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    started = time.monotonic()
    yield
    assert time.monotonic() - started < 90, "a syslog test took over 90 s"


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def unique(label: str) -> str:
    return f"{label} {os.urandom(4).hex()}"


# --------------------------------------------------------------------------- real senders


def test_util_linux_logger_rfc3164(lab: SyslogLab) -> None:
    text = unique("disk sda: 3 bad sectors")
    lab.logger("--rfc3164", "-t", "smartd", "-p", "daemon.warning", text)
    event = lab.server.wait_text(text)
    assert event["source"] == ALPHA_IP
    assert event["format"] == "rfc3164"
    assert (event["app"], event["facility"], event["severity"]) == ("smartd", 3, 4)
    assert event["hostname"] == socket.gethostname().split(".")[0]
    sent = datetime.fromisoformat(event["timestamp"])
    assert abs(sent - datetime.now()) < timedelta(minutes=5)


def test_util_linux_logger_rfc5424(lab: SyslogLab) -> None:
    text = unique("kubelet: node c1 registered")
    lab.logger(
        "--rfc5424", "-i", "-t", "kubelet", "-p", "user.err", "--msgid", "NODE1",
        "--sd-id", "origin@32473", "--sd-param", 'role="worker"', text,
    )  # fmt: skip
    event = lab.server.wait_text(text)
    assert event["source"] == ALPHA_IP
    assert event["format"] == "rfc5424"
    assert (event["app"], event["msgid"], event["facility"], event["severity"]) == (
        "kubelet", "NODE1", 1, 3,
    )  # fmt: skip
    assert event["procid"].isdigit()
    assert '[origin@32473 role="worker"]' in event["structured_data"]
    sent = datetime.fromisoformat(event["timestamp"])
    assert sent.tzinfo is not None
    assert abs(sent - datetime.now(UTC)) < timedelta(minutes=5)
    assert event["line"] == f"kubelet[{event['procid']}]: {text}"


def test_logger_lines_from_stdin_are_separate_messages(lab: SyslogLab) -> None:
    marker = unique("stdin")
    lines = [f"{marker} line {i}" for i in range(5)]
    lab.alpha.run(
        ["logger", "-n", COLLECTOR_IP, "-P", "514", "-d", "--rfc5424", "-t", "multi"],
        input="\n".join(lines) + "\n",
    )
    for line in lines:
        assert lab.server.wait_text(line)["app"] == "multi"


def test_control_characters_from_a_real_sender_are_visible(lab: SyslogLab) -> None:
    marker = unique("colour")
    lab.logger("--rfc3164", "-t", "tty", f"{marker} \x1b[31mred\x1b[0m")
    event = lab.server.wait_text(f"{marker} \\x1b[31mred\\x1b[0m")
    assert event["source"] == ALPHA_IP


BUSYBOX_SCRIPT = r"""
set -eu
# A private /dev so that busybox syslogd's /dev/log never replaces the host's.
mkdir -p "$WORK/hostdev"
mount --bind /dev "$WORK/hostdev"
mount -t tmpfs -o size=64k,mode=755 pxbdev /dev
for node in null zero urandom; do
    : > "/dev/$node"
    mount --bind "$WORK/hostdev/$node" "/dev/$node"
done
busybox syslogd -n -R "$COLLECTOR:514" &
syslogd=$!
trap 'kill "$syslogd" 2>/dev/null || true' EXIT
i=0
while [ ! -S /dev/log ] && [ "$i" -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
[ -S /dev/log ] || { echo "busybox syslogd did not create /dev/log"; exit 1; }
busybox logger -t bbapp -p daemon.err "$MARKER from busybox logger"
logger -i -t utilapp -p local0.notice "$MARKER from util-linux logger via /dev/log"
sleep 1
"""


def test_busybox_syslogd_remote_logging(lab: SyslogLab) -> None:
    marker = unique("osie")
    workdir = lab.work / "bbox"
    workdir.mkdir(exist_ok=True)
    script = f"WORK={workdir}; COLLECTOR={COLLECTOR_IP}; MARKER='{marker}'\n{BUSYBOX_SCRIPT}"
    host_dev_log = os.path.lexists("/dev/log")
    # unshare: a mount namespace of its own even if `ip netns exec` stopped making one.
    lab.bbox.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    first = lab.server.wait_text(f"{marker} from busybox logger")
    assert first["source"] == BBOX_IP
    assert first["format"] == "rfc3164"
    assert (first["hostname"], first["app"], first["procid"]) == (None, "bbapp", None)
    assert (first["facility"], first["severity"]) == (3, 3)
    assert abs(datetime.fromisoformat(first["timestamp"]) - datetime.now()) < timedelta(minutes=5)
    second = lab.server.wait_text(f"{marker} from util-linux logger via /dev/log")
    assert second["source"] == BBOX_IP
    assert (second["hostname"], second["app"]) == (None, "utilapp")
    assert second["procid"].isdigit()
    assert (second["facility"], second["severity"]) == (16, 5)
    assert os.path.lexists("/dev/log") == host_dev_log  # the host's /dev untouched


def test_only_the_lab_interface_is_heard(lab: SyslogLab) -> None:
    """SO_BINDTODEVICE: a line sent on the collector's own loopback never arrives."""
    hidden, marker = unique("from loopback"), unique("after loopback")
    lab.collector.run(
        ["logger", "-n", "127.0.0.1", "-P", "514", "-d", "--rfc5424", hidden], timeout=15.0
    )
    lab.logger("--rfc5424", marker)
    lab.server.wait_text(marker)
    assert not [e for e in lab.server.events() if e["text"] == hidden]


def test_a_flood_is_limited_and_others_still_get_through(lab: SyslogLab) -> None:
    before = lab.server.stats()
    seconds, rate = 2.0, 5000
    started = time.monotonic()
    flooder = lab.flood.popen(
        [sys.executable, str(THIS), "flood", COLLECTOR_IP, "514", "--rate", str(rate),
         "--seconds", str(seconds)],
        lab.flood.log_path("flood"),
    )  # fmt: skip
    lab.server.wait_event(lambda e: e["source"] == FLOOD_IP, "the flood begins")
    marker = unique("well-behaved")
    lines = [f"{marker} {i}" for i in range(10)]
    lab.alpha.run(
        ["logger", "-n", COLLECTOR_IP, "-P", "514", "-d", "--rfc5424", "-t", "calm"],
        input="\n".join(lines) + "\n",
    )
    assert flooder.wait(30) == 0, last_line(lab.flood.segment.log_of(flooder))
    elapsed = time.monotonic() - started
    sent = int(json.loads(last_line(lab.flood.segment.log_of(flooder)))["sent"])
    assert sent >= rate * seconds * 0.9
    for line in lines:
        lab.server.wait_text(line)

    time.sleep(0.3)  # the last flood datagrams in the socket buffer
    after = lab.server.stats()
    flooded = [e for e in lab.server.events() if e["source"] == FLOOD_IP]
    dropped = after.get("dropped_rate", 0) - before.get("dropped_rate", 0)
    # The default bucket: bursts of 400, then 200 lines/s.
    assert 400 <= len(flooded) <= 400 + 200 * elapsed + 50
    assert dropped >= sent - len(flooded) - sent // 10  # the kernel may drop a few itself
    accepted = sum(after.get(f, 0) - before.get(f, 0) for f in ("rfc5424", "rfc3164", "raw"))
    assert accepted == len(flooded) + len(lines)
    assert after["received"] - before["received"] == accepted + dropped
    assert all(e["app"] == "flooder" and e["severity"] == 6 for e in flooded)
    warnings = re.findall(r"WARNING pixiebox\.syslog: .*", lab.server.log_text())
    assert [w for w in warnings if FLOOD_IP in w] == [
        f"WARNING pixiebox.syslog: syslog: machine at {FLOOD_IP} sends more than 200 lines/s "
        "(bursts of 400); dropping its excess lines (counted, reported once a minute)"
    ]
    assert not [w for w in warnings if ALPHA_IP in w]


def test_random_packets_leave_it_receiving(lab: SyslogLab) -> None:
    """Thousands of hostile datagrams, unlimited by rate so that every one is parsed."""
    server = start_server(
        lab.collector, lab.work, "--rate", "1000000", "--burst", "1000000", port=1514
    )
    count = 5000
    result = lab.fuzz.run(
        [sys.executable, str(THIS), "fuzz", COLLECTOR_IP, "1514", "--count", str(count),
         "--seed", "1514"],
        timeout=60.0,
    )  # fmt: skip
    assert json.loads(result.stdout)["sent"] == count
    marker = unique("still here")
    lab.fuzz.run(
        ["logger", "-n", COLLECTOR_IP, "-P", "1514", "-d", "--rfc3164", "-t", "ok", marker]
    )
    event = server.wait_text(marker)
    assert (event["source"], event["app"]) == (FUZZ_IP, "ok")
    stats = server.stats()
    # UDP: a loaded machine may drop a few in the kernel; every one that arrived was handled.
    assert stats["received"] >= count * 0.95
    parsed = stats.get("rfc5424", 0) + stats.get("rfc3164", 0) + stats.get("raw", 0)
    assert parsed == stats["received"]
    assert stats.get("failed", 0) == 0
    assert stats.get("raw", 0) > 0 and stats.get("rfc3164", 0) > 0 and stats.get("rfc5424", 0) > 0
    for event in server.events():
        assert len(event["text"]) <= MAX_TEXT
        assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e]", event["text"])
    server.stop()
    assert lab.server.proc.poll() is None


# --------------------------------------------------------------------------- senders


def _flood(args: argparse.Namespace) -> dict[str, Any]:
    """`rate` datagrams a second for `seconds`, paced in 10 ms batches."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    batch = max(1, int(args.rate / 100))
    sent, started = 0, time.monotonic()
    total = int(args.rate * args.seconds)
    while sent < total:
        for _ in range(min(batch, total - sent)):
            sock.sendto(f"<14>flooder[{os.getpid()}]: flood line {sent}".encode(), args.target)
            sent += 1
        pause = started + sent / args.rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return {"sent": sent, "seconds": time.monotonic() - started}


def _fuzz_packets(rng: random.Random, count: int) -> Iterator[bytes]:
    tokens = [b"<", b">", b"<13>", b"<191>", b"<192>", b"1 ", b"- ", b"[", b"]", b'"', b"\\",
              b"=", b" ", b":", b"\n", b"\x00", b"\xef\xbb\xbf", b"\xff", b"\x1b[2J",
              b"Jan  1 00:00:00 ", b"2024-02-30T25:61:61Z ", b"app[", b"]:"]  # fmt: skip
    for i in range(count):
        kind = i % 4
        if kind == 0:
            yield rng.randbytes(rng.randrange(0, 1400))
        elif kind == 1:
            yield b"".join(rng.choice(tokens) for _ in range(rng.randrange(1, 60)))
        elif kind == 2:
            data = bytearray(rng.choice(SAMPLES))
            for _ in range(rng.randrange(1, 8)):
                at = rng.randrange(0, len(data) + 1)
                data[at:at] = rng.choice(tokens)
                if rng.random() < 0.3 and data:
                    del data[rng.randrange(0, len(data))]
            yield bytes(data)
        elif i % 400 == 3:
            yield rng.choice(SAMPLES)[:30] + rng.choice([b"[", b"x", b" "]) * 60000
        else:
            yield rng.choice(SAMPLES)[: rng.randrange(0, 200)]


def _fuzz(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent, started = 0, time.monotonic()
    for packet in _fuzz_packets(rng, args.count):
        sock.sendto(packet, args.target)
        sent += 1
        if sent % 50 == 0:  # 2500 datagrams/s: a fuzz, not a flood
            time.sleep(max(0.0, started + sent / 2500 - time.monotonic()))
    return {"sent": sent}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="syslog test senders")
    sub = parser.add_subparsers(dest="command", required=True)
    flood = sub.add_parser("flood")
    flood.add_argument("--rate", type=float, default=5000.0)
    flood.add_argument("--seconds", type=float, default=2.0)
    fuzz = sub.add_parser("fuzz")
    fuzz.add_argument("--count", type=int, default=5000)
    fuzz.add_argument("--seed", type=int, default=0)
    for command in (flood, fuzz):
        command.add_argument("server")
        command.add_argument("port", type=int)
    args = parser.parse_args(argv)
    args.target = (args.server, args.port)
    result = _flood(args) if args.command == "flood" else _fuzz(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
