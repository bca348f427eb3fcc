"""Issue 13 item 7: the DNS parsers an outsider reaches, fuzzed (hypothesis).

Every query (UDP or TCP, from anyone on the LAN) goes through `DnsServer.answer`: the fast path
walks the question by hand, the slow path parses with dnslib (whose exceptions on hostile input
the server counts as malformed: its own rule, server.py), then the forwarder matches upstream
answers with `wire.answers`. Anything else escaping is caught by the server's last resort,
counted as "failed" and logged with a traceback: that is a bug, and these tests fail on it.

Queries are built byte by byte (names of every length, label counts, cases, EDNS versions,
opcodes, extra sections), then cut and flipped; dnslib, an independent parser, cross-checks
the question the server reads and the replies it writes.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network

from dnslib import DNSRecord  # type: ignore[import-untyped]
from fuzzing import fuzz, log_records
from hypothesis import given
from hypothesis import strategies as st
from pixiebox.dns import DnsServer
from pixiebox.dns.forward import Forward
from pixiebox.dns.wire import answers, question_end, split, truncated, wire

DOMAIN = "lab.internal"
RECORDS = {"c1": IPv4Address("10.53.0.31"), "pixiebox": IPv4Address("10.53.0.2")}
LAB_CLIENT = ("10.53.0.66", 5353)
OUTSIDER = ("192.0.2.5", 5353)
#: RFC 1035 section 2.3.4: a name is at most 255 octets on the wire.
MAX_NAME = 255


def server() -> DnsServer:
    networks = [IPv4Network("10.53.0.0/24")]
    return DnsServer(
        domain=DOMAIN,
        records=lambda: RECORDS,
        upstreams=[IPv4Address("10.53.0.1")],
        forward_for=lambda: networks,
    )


# --------------------------------------------------------------------------- strategies

_known_labels = st.sampled_from(
    [b"c1", b"C1", b"pixiebox", b"lab", b"LAB", b"internal", b"in-addr", b"arpa", b"31", b"0"]
)
_label = st.one_of(
    _known_labels,
    _known_labels,
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_ *", min_size=1, max_size=63).map(str.encode),
    st.binary(min_size=1, max_size=63),
    st.binary(min_size=50, max_size=63),  # five of these make a name over 255 octets
    st.just(b"a.b"),  # a dot inside a label
)
_lab_names = st.sampled_from(
    [
        [b"c1", b"lab", b"internal"],
        [b"C1", b"LAB", b"internal"],
        [b"pixiebox", b"lab", b"internal"],
        [b"lab", b"internal"],
        [b"31", b"0", b"53", b"10", b"in-addr", b"arpa"],
        [b"example", b"com"],
        [],
    ]
)
_names = st.one_of(
    _lab_names,
    _lab_names,
    st.lists(_label, max_size=8).map(lambda labels: [*labels, b"lab", b"internal"]),
    st.lists(_label, max_size=8),
)


def opt_record(draw: st.DrawFn) -> tuple[bytes, bool]:
    """An EDNS OPT pseudo-record (RFC 6891 6.1.2), version and lengths sometimes wrong; and
    whether its RDLENGTH is right."""
    size = draw(st.sampled_from([0, 512, 1232, 4096, 65535]))
    version = draw(st.sampled_from([0, 0, 0, 1, 255]))
    flags = draw(st.sampled_from([0, 0x8000, 0xFFFF]))
    rdata = draw(st.sampled_from([b"", b"\x00\x0a\x00\x08" + bytes(8), b"\x00"]))
    error = draw(st.sampled_from([0, 0, 0, 1, -1]))
    rdlength = max(len(rdata) + error, 0)
    head = b"\x00\x00\x29" + struct.pack("!HBBHH", size, 0, version, flags, rdlength)
    return head + rdata, rdlength == len(rdata)


@st.composite
def queries(draw: st.DrawFn, *, plain: bool = False) -> tuple[bytes, bool]:
    """(the query, whether it is well formed as built: uncompressed, lengths right).
    `plain`: one question of class IN for a lab name, as stub resolvers send them."""
    labels = draw(_lab_names if plain else _names)
    qid = draw(st.integers(0, 0xFFFF))
    usual = st.sampled_from([0x0100, 0x0000, 0x0110, 0x0120])  # RD, none, RD+CD, RD+AD
    flags = draw(usual if plain else st.one_of(usual, usual, st.integers(0, 0xFFFF)))
    qtype = draw(st.sampled_from([1, 28, 12, 6, 2, 16, 255, 0, 41, 65535]))
    qclass = 1 if plain else draw(st.sampled_from([1, 1, 1, 1, 1, 3, 255, 254, 0]))
    question = wire(labels) + struct.pack("!HH", qtype, qclass)
    extra_questions = 0 if plain else int(draw(st.integers(0, 5)) == 0)
    opt, opt_fits = opt_record(draw) if draw(st.booleans()) else (b"", True)
    answer = b""
    if not plain and draw(st.integers(0, 5)) == 0:  # an answer RR, compressed onto the name
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes(4)
    body = question + (b"\xc0\x0c" + question[-4:]) * extra_questions + answer + opt
    counts = struct.pack("!HHHH", 1 + extra_questions, 1 if answer else 0, 0, 1 if opt else 0)
    data = bytearray(struct.pack("!HH", qid, flags) + counts + body)
    actions = ["keep"] * 4 + ["flip", "cut", "count", "append"]
    action = "keep" if plain else draw(st.sampled_from(actions))
    if action == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif action == "cut":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif action == "count":
        at = draw(st.sampled_from([4, 6, 8, 10]))
        data[at : at + 2] = struct.pack("!H", draw(st.integers(0, 0xFFFF)))
    elif action == "append":
        data += draw(st.binary(min_size=1, max_size=20))
    # dnslib (the cross-check) refuses labels that are not UTF-8; RFC 1035 allows any octet.
    name_fits = len(wire(labels)) <= MAX_NAME and all(
        len(label) <= 63 and utf8(label) for label in labels
    )
    return bytes(data), action == "keep" and name_fits and opt_fits


def utf8(label: bytes) -> bool:
    try:
        label.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --------------------------------------------------------------------------- what is asserted


def udp_limit(data: bytes) -> int:
    """The largest UDP answer the client takes: 512, or its EDNS size (RFC 6891 6.2.5)."""
    try:
        request = DNSRecord.parse(data)
    except Exception:
        return 512
    opt = next((rr for rr in request.ar if rr.rtype == 41), None)
    return 512 if opt is None else max(512, int(opt.rclass))


def check_answer(dns: DnsServer, data: bytes, source: tuple[str, int], tcp: bool) -> None:
    with log_records() as seen:
        result = dns.answer(data, source, tcp=tcp)
    assert dns.stats["failed"] == 0 and not seen.with_traceback(), seen.text()
    if result is None:
        return
    if isinstance(result, Forward):
        # Only a lab client's query leaves, with its question as the client sent it.
        assert source == LAB_CLIENT
        end = question_end(data)
        assert end is not None and result.question == data[12:end].lower()
        assert len(result.question) - 4 <= MAX_NAME
        assert [label.lower() for label in result.request.q.qname.label] == split(
            result.question[:-4]
        )
        return
    assert isinstance(result, bytes)
    reply = DNSRecord.parse(result)  # what we send is DNS, whatever came in
    assert result[:2] == data[:2] and reply.header.qr == 1
    for question in reply.questions:
        assert len(wire(question.qname.label)) <= MAX_NAME
    if not tcp:
        # No amplification: at most what the client can take, or no larger than its query.
        assert len(result) <= max(udp_limit(data), len(data)), (len(result), len(data))


# --------------------------------------------------------------------------- the tests


@fuzz(600)
@given(
    st.one_of(
        queries().map(lambda q: q[0]),
        queries().map(lambda q: q[0]),
        queries(plain=True).map(lambda q: q[0]),
        st.binary(max_size=300),
    ),
    st.sampled_from([LAB_CLIENT, OUTSIDER]),
    st.booleans(),
)
def test_any_query_is_answered_forwarded_or_dropped(
    data: bytes, source: tuple[str, int], tcp: bool
) -> None:
    check_answer(server(), data, source, tcp)


@fuzz(300)
@given(st.one_of(queries(), queries(plain=True)))
def test_the_question_is_read_as_dnslib_reads_it(built: tuple[bytes, bool]) -> None:
    """Cross-check of the hand-written walk (fast path, question_end, split) with dnslib, and
    of the fast path's pre-packed answers with dnslib's packing of the same answer."""
    data, well_formed = built
    if not well_formed:
        return
    request = DNSRecord.parse(data)
    end = question_end(data)
    assert end is not None
    assert split(data[12 : end - 4]) == list(request.q.qname.label)
    assert struct.unpack("!HH", data[end - 4 : end]) == (request.q.qtype, request.q.qclass)
    dns = server()
    fast = dns._fast(data)
    if fast is None:
        return
    slow = dns._slow(data, LAB_CLIENT, False)
    assert isinstance(slow, bytes)
    ours, theirs = DNSRecord.parse(fast), DNSRecord.parse(slow)
    assert ours.header == theirs.header
    assert (ours.questions, ours.rr, ours.auth) == (theirs.questions, theirs.rr, theirs.auth)
    assert [str(rr) for rr in ours.ar] == [str(rr) for rr in theirs.ar]


def test_every_truncation_of_a_query_with_edns() -> None:
    data = (
        struct.pack("!6H", 0x4242, 0x0100, 1, 0, 0, 1)
        + wire([b"c1", b"lab", b"internal"])
        + b"\x00\x01\x00\x01"
        + b"\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00"
    )
    dns = server()
    for cut in range(len(data) + 1):
        for source in (LAB_CLIENT, OUTSIDER):
            check_answer(dns, data[:cut], source, tcp=False)
    assert dns.stats["answered"] >= 2  # the whole query, from each source


@st.composite
def upstream_answers(draw: st.DrawFn) -> tuple[bytes, int, bytes]:
    """(datagram, the query's ID, its question): an answer, a spoof, or noise."""
    question = wire([b"example", b"com"]) + b"\x00\x01\x00\x01"
    qid = draw(st.integers(0, 0xFFFF))
    flags = draw(st.sampled_from([0x8180, 0x8183, 0x8182, 0x8385, 0x0100, 0x8000]))
    qdcount = draw(st.sampled_from([1, 1, 0, 2]))
    echoed = draw(st.sampled_from([question, question.upper(), question[:-1] + b"\x03", b""]))
    their_id = draw(st.sampled_from([qid, qid ^ 1]))
    data = struct.pack("!6H", their_id, flags, qdcount, 1, 0, 0) + echoed
    data += draw(st.binary(max_size=30))
    return data[: draw(st.integers(0, len(data)))], qid, question


@fuzz(300)
@given(upstream_answers())
def test_upstream_answers_are_matched_without_failing(built: tuple[bytes, int, bytes]) -> None:
    data, qid, question = built
    if not answers(data, qid, question):
        return
    # The forwarder reads the flags and splices the client's ID on: a header must be there.
    assert len(data) >= 12 and data[:2] == qid.to_bytes(2, "big") and data[2] & 0x80
    reply = b"\x12\x34" + data[2:]
    cut = truncated(reply, question)
    assert cut[2] & 0x02 and cut[12:] == question
