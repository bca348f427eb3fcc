"""DNS on the wire: the RFC numbers the server speaks, names as bytes, and replies built by dnslib.

Byte-level helpers that both the lab zone and the forwarder need: they work on messages as
received, because an answer is matched to its query, and a packed answer spliced onto it, byte
for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dnslib import EDNS0, DNSHeader, DNSRecord  # type: ignore[import-untyped]

DNS_PORT = 53
#: The UDP size offered in our EDNS OPT: 1232 avoids IP fragmentation (DNS flag day 2020).
EDNS_UDP_SIZE = 1232
#: RFC 1035 section 4.2.1: the UDP limit for a client without EDNS (RFC 6891 section 6.2.5).
CLASSIC_UDP_SIZE = 512

# RFC 1035 section 3.2.2/3.2.4 and RFC 6891 (OPT): the types and class the server names.
TYPE_A, TYPE_SOA, TYPE_PTR, TYPE_AAAA, TYPE_OPT, TYPE_ANY = 1, 6, 12, 28, 41, 255
CLASS_IN = 1
# RFC 1035 and RFC 6891 RCODEs.
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16  # extended RCODE 1 in the OPT record (RFC 6891 section 6.1.3)

#: Header bytes 4..10 of a plain query: one question, no answer or authority records.
ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"
# Our OPT record (RFC 6891 section 6.1.2): root name, type 41, our UDP size, extended RCODE 0,
# version 0; the DO bit is copied from the query (RFC 3225 section 3), no options.
_OPT_HEAD = b"\x00\x00\x29" + EDNS_UDP_SIZE.to_bytes(2, "big") + b"\x00\x00"
OPT_PLAIN = _OPT_HEAD + b"\x00\x00\x00\x00"
OPT_DO = _OPT_HEAD + b"\x80\x00\x00\x00"


def wire(labels: Sequence[bytes]) -> bytes:
    """A name in wire format (RFC 1035 section 3.1), uncompressed."""
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\0"


def split(name: bytes) -> list[bytes]:
    """The labels of an uncompressed wire-format name."""
    labels = []
    i = 0
    while name[i]:
        labels.append(name[i + 1 : i + 1 + name[i]])
        i += 1 + name[i]
    return labels


def question_end(data: bytes) -> int | None:
    """The offset just past the first question of a DNS message, if it is a plain one.

    Only uncompressed names are accepted: a query's first name has nothing before it to point
    at (RFC 1035 section 4.1.4), and label types other than 0 are obsolete (RFC 6891 5)."""
    size = len(data)
    i = 12
    while i < size:
        length = data[i]
        if not length:
            end = i + 5  # the root label, QTYPE, QCLASS
            return end if end <= size else None
        if length > 63:
            return None
        i += length + 1
    return None


def answers(data: bytes, qid: int, question: bytes) -> bool:
    """Is `data` an answer to the query with this ID and question section?"""
    if len(data) < 12 or int.from_bytes(data[:2], "big") != qid or not data[2] & 0x80:
        return False
    qdcount = int.from_bytes(data[4:6], "big")
    if qdcount == 0:
        # FORMERR, NOTIMP and REFUSED may come without the question (RFC 1035 4.1.1).
        return data[3] & 0x0F != NOERROR
    return qdcount == 1 and data[12 : 12 + len(question)].lower() == question


def truncated(data: bytes, question: bytes) -> bytes:
    """`data` cut to its header and question with TC set: "ask again over TCP" (RFC 1035
    section 4.2.1, RFC 7766 section 5)."""
    return data[:2] + bytes((data[2] | 0x02, data[3])) + b"\x00\x01" + bytes(6) + question


def opt_of(request: Any) -> Any:
    """The OPT pseudo-record of a dnslib query, or None."""
    return next((rr for rr in request.ar if rr.rtype == TYPE_OPT), None)


def udp_size(opt: Any) -> int:
    """How large a UDP answer the client takes (RFC 6891 section 6.2.5: never below 512)."""
    return CLASSIC_UDP_SIZE if opt is None else max(CLASSIC_UDP_SIZE, int(opt.rclass))


def empty_reply(request: Any, rcode: int, opt: Any) -> Any:
    """An empty reply to `request` (dnslib), with our OPT if it had one (RFC 6891 7)."""
    header = request.header
    reply = DNSRecord(
        DNSHeader(
            id=header.id,
            qr=1,
            opcode=header.opcode,
            aa=1,
            rd=header.rd,
            ra=1,
            cd=header.cd,
            rcode=rcode & 0x0F,
        ),
        questions=list(request.questions),
    )
    if opt is not None:
        reply.add_ar(
            EDNS0(
                udp_len=EDNS_UDP_SIZE,
                ext_rcode=rcode >> 4,
                flags="do" if opt.ttl & 0x8000 else "",
            )
        )
    return reply


def error_reply(request: Any, rcode: int, opt: Any) -> bytes:
    """An error answer to `request`, packed: not authoritative, nothing but the question."""
    reply = empty_reply(request, rcode, opt)
    reply.header.aa = 0
    return bytes(reply.pack())
