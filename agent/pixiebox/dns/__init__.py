"""DNS for the lab: `<machine>.<domain>` and its reverse record answered here, the rest forwarded.

So nobody has to read the home router's client list to learn which address a node got. The
appliance is authoritative (AA set) for the lab domain: A for a known name, PTR for its
address, NODATA (NOERROR, no answer, SOA in authority: RFC 2308 section 2.2) for another type
of a known name, NXDOMAIN with the SOA (RFC 2308 section 2.1) for an unknown name under the
domain. Everything else, including reverse names of addresses no machine has, goes to the
upstream resolvers in order, over UDP, and over TCP for TCP clients and truncated answers
(RFC 7766 section 5); when every upstream fails the client gets SERVFAIL instead of silence.

dnslib (pinned in pyproject.toml) is only the codec: parse, reply, pack. The sockets are the
asyncio loop's; no threads. Lab-name answers are packed once per change of the records and
served from bytes: a query for a known name is matched on its raw question (walked, lowercased)
and answered by splicing the client's ID, flags and question onto the packed answer, because a
dnslib parse + pack per query (~140 us) alone would cap the server well below what a lab asks.
Anything unusual (a second question, an EDNS version we do not speak, a name we do not hold)
takes the dnslib path, which gives the same answers.

A malformed packet is counted and logged at debug level and never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from dnslib import (  # type: ignore[import-untyped]
    EDNS0,
    PTR,
    RR,
    SOA,
    A,
    DNSHeader,
    DNSLabel,
    DNSRecord,
)

log = logging.getLogger("pixiebox.dns")

DNS_PORT = 53
#: Forwarded queries in flight at once; past this a query is answered SERVFAIL at once, so a
#: flood (or a dead upstream) costs a bounded number of sockets and tasks.
MAX_FORWARDS = 256
#: Unknown lab names whose NXDOMAIN is kept packed (until the records change): bounded, as
#: anyone can ask for any number of names.
NEGATIVE_CACHE = 4096
#: TCP clients served at once (RFC 7766 section 6.2.2: servers limit connections).
MAX_TCP_CLIENTS = 64
#: Seconds an idle TCP connection is kept (RFC 7766 section 6.2.3: a few seconds is enough).
TCP_IDLE = 10.0
#: The UDP size offered in our EDNS OPT: 1232 avoids IP fragmentation (DNS flag day 2020).
EDNS_UDP_SIZE = 1232
#: RFC 1035 section 4.2.1: the UDP limit for a client without EDNS (RFC 6891 section 6.2.5).
CLASSIC_UDP_SIZE = 512

# RFC 1035 section 3.2.2/3.2.4 and RFC 6891 (OPT), RFC 1035/6891 RCODEs.
_A, _SOA, _PTR, _AAAA, _OPT, _ANY = 1, 6, 12, 28, 41, 255
_IN = 1
_NOERROR, _FORMERR, _SERVFAIL, _NXDOMAIN, _NOTIMP, _REFUSED = 0, 1, 2, 3, 4, 5
_BADVERS = 16  # extended RCODE 1 in the OPT record (RFC 6891 section 6.1.3)
_SOA_TIMES = (3600, 600, 86400)  # refresh, retry, expire: no secondaries ever use them

# Header bytes 4..10 of a plain query: one question, no answer or authority records.
_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"
# Our OPT record (RFC 6891 section 6.1.2): root name, type 41, our UDP size, extended RCODE 0,
# version 0; the DO bit is copied from the query (RFC 3225 section 3), no options.
_OPT_HEAD = b"\x00\x00\x29" + EDNS_UDP_SIZE.to_bytes(2, "big") + b"\x00\x00"
_OPT_PLAIN = _OPT_HEAD + b"\x00\x00\x00\x00"
_OPT_DO = _OPT_HEAD + b"\x80\x00\x00\x00"


def _wire(labels: Sequence[bytes]) -> bytes:
    """A name in wire format (RFC 1035 section 3.1), uncompressed."""
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\0"


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


@dataclass(frozen=True, slots=True)
class _Packed:
    """An answer packed once: header bytes 3 and 6..11, and everything after the question."""

    flags: int  # header byte 3 without RA/CD: the RCODE
    counts: bytes  # QDCOUNT, ANCOUNT, NSCOUNT (ARCOUNT is set per query)
    tail: bytes


@dataclass(frozen=True, slots=True)
class _Name:
    """What the fast path knows about one name: answers by QTYPE, and for any other type."""

    by_type: Mapping[int, _Packed]
    other: _Packed


@dataclass
class _Zone:
    """The lab's names as built from one view of the records."""

    serial: int
    apex: tuple[bytes, ...]  # the domain's labels, lowercased
    names: dict[bytes, IPv4Address] = field(default_factory=dict)  # wire name → address
    reverse: dict[bytes, list[tuple[bytes, ...]]] = field(default_factory=dict)  # PTR → names
    empty: set[bytes] = field(default_factory=set)  # empty non-terminals (RFC 8020)
    fast: dict[bytes, _Name] = field(default_factory=dict)  # lowercased wire name → answers
    negative: int = 0  # NXDOMAIN answers added to `fast` since the zone was built


@dataclass(slots=True)
class _Forward:
    """A query to pass upstream, as the client sent it."""

    data: bytes
    request: Any  # dnslib DNSRecord
    question: bytes  # the question section, lowercased: what an upstream answer must echo
    udp_size: int  # what the client can take over UDP


class _UdpListener:
    """The clients' UDP socket, read straight from the event loop's selector.

    Not an asyncio datagram endpoint: that one takes a selector wake-up, a recvfrom and a
    protocol call per datagram, and capped a lab-name benchmark at ~10,000 queries/s where
    this loop (up to BATCH datagrams per wake-up, replies sent at once) does more than twice
    that on the same machine. Same loop, no threads."""

    BATCH = 64  # then the loop gets a turn: TCP clients, upstream answers, signals

    def __init__(self, server: DnsServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self.sock
        answer = self.server.answer
        zone: _Zone | None = None
        for _ in range(self.BATCH):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("DNS UDP receive failed: %s", exc)
                return
            # The records are read once per batch, not per query: the datagrams of one wake-up
            # arrived at the same moment, and reading a lab's records costs as much as
            # answering (a benchmark showed a third of the time in records()).
            if zone is None:
                zone = self.server._current()
            result = answer(data, addr, zone=zone)
            if result is None:
                continue
            if isinstance(result, bytes):
                self.send(result, addr)
            else:
                self.server._spawn_forward(result, self, addr)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.sock.fileno() < 0:
            return  # closed meanwhile
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            # The send buffer is full: this answer is lost like any datagram, and the client
            # asks again.
            self.server.stats["send_dropped"] += 1
        except OSError as exc:
            log.debug("DNS answer to %s:%d not sent: %s", *addr, exc)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class _UpstreamEndpoint(asyncio.DatagramProtocol):
    """One forwarded query's socket: accepts only the answer to that query.

    A fresh socket (random source port) and a random ID per query, and an answer must echo
    both and the question, so an off-path spoofer has to guess all three (RFC 5452)."""

    def __init__(self, waiter: asyncio.Future[bytes], qid: int, question: bytes) -> None:
        self.waiter = waiter
        self.qid = qid
        self.question = question

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.waiter.done() and _answers(data, self.qid, self.question):
            self.waiter.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on the connected socket: the upstream is down, try the next.
        if not self.waiter.done():
            self.waiter.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("socket closed"))


def _answers(data: bytes, qid: int, question: bytes) -> bool:
    """Is `data` an answer to the query with this ID and question section?"""
    if len(data) < 12 or int.from_bytes(data[:2], "big") != qid or not data[2] & 0x80:
        return False
    qdcount = int.from_bytes(data[4:6], "big")
    if qdcount == 0:
        # FORMERR, NOTIMP and REFUSED may come without the question (RFC 1035 4.1.1).
        return data[3] & 0x0F != _NOERROR
    return qdcount == 1 and data[12 : 12 + len(question)].lower() == question


def _truncated(data: bytes, question: bytes) -> bytes:
    """`data` cut to its header and question with TC set: "ask again over TCP" (RFC 1035
    section 4.2.1, RFC 7766 section 5)."""
    return data[:2] + bytes((data[2] | 0x02, data[3])) + b"\x00\x01" + bytes(6) + question


class DnsServer:
    """Answers `<name>.<domain>` from `records()` and forwards the rest to `upstreams`.

    `records()` is called for every query (it is the inventory's current view, cheap) and maps
    short names ("c1", the appliance's own name) to addresses; answers are rebuilt only when
    what it returns has other contents (a new mapping, or the same dict changed in place).
    `port` 0 picks a free port (the same one for UDP and TCP); `port` holds it after start().
    `max_forwards` bounds forwarded queries in flight; `upstream_port` is where upstreams listen.
    """

    def __init__(
        self,
        *,
        domain: str,
        records: Callable[[], Mapping[str, IPv4Address]],
        upstreams: Sequence[IPv4Address],
        listen_ip: str = "0.0.0.0",
        port: int = DNS_PORT,
        interface: str | None = None,
        timeout: float = 2.0,
        ttl: int = 60,
        max_forwards: int = MAX_FORWARDS,
        upstream_port: int = DNS_PORT,
    ) -> None:
        labels = tuple(domain.strip().rstrip(".").lower().encode("ascii").split(b"."))
        if not all(0 < len(label) <= 63 for label in labels) or len(_wire(labels)) > 200:
            raise ValueError(f"not a usable DNS domain: {domain!r}")
        if timeout <= 0 or ttl < 0 or max_forwards < 1:
            raise ValueError("timeout and max_forwards must be positive, ttl not negative")
        self.domain = b".".join(labels).decode()
        self.records = records
        self.upstreams = tuple(IPv4Address(ip) for ip in upstreams)
        self.listen_ip = listen_ip
        self.port = port
        self.interface = interface
        self.timeout = timeout
        self.ttl = ttl
        self.max_forwards = max_forwards
        self.upstream_port = upstream_port
        self.stats: Counter[str] = Counter()
        self._apex = labels
        self._snapshot: dict[str, IPv4Address] = {}
        self._zone = self._build({}, serial=0)
        self._records_failing = False
        self._forwarding = 0
        self._tasks: set[asyncio.Task[None]] = set()  # forwarded UDP queries
        self._tcp_clients: set[asyncio.Task[Any]] = set()
        self._udp: _UdpListener | None = None
        self._tcp: asyncio.Server | None = None

    # -- sockets ---------------------------------------------------------------------

    async def start(self) -> None:
        udp = self._socket(socket.SOCK_DGRAM, self.port)
        try:
            port = udp.getsockname()[1]
            tcp = self._socket(socket.SOCK_STREAM, port)
        except OSError:
            udp.close()
            raise
        try:
            self._udp = _UdpListener(self, udp)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        try:
            self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp, backlog=128)
        except BaseException:
            tcp.close()
            await self.close()
            raise
        self.port = port
        upstreams = ", ".join(map(str, self.upstreams)) or "nowhere (no upstreams)"
        log.info(
            "DNS for *.%s on %s%s port %d (UDP, TCP); other names are forwarded to %s",
            self.domain,
            self.listen_ip,
            f"%{self.interface}" if self.interface else "",
            port,
            upstreams,
        )

    def _socket(self, kind: int, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, kind)
        try:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            else:
                # Room for a burst of queries while the loop is busy.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            if self.interface:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
            sock.bind((self.listen_ip, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def close(self) -> None:
        """Stop listening, drop queries in flight and TCP clients. Idempotent."""
        listener, self._udp = self._udp, None
        if listener is not None:
            listener.close()
        server, self._tcp = self._tcp, None
        if server is not None:
            server.close()
        tasks = [*self._tasks, *self._tcp_clients]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        await asyncio.sleep(0)  # the TCP clients' transports close their sockets now

    # -- answering -------------------------------------------------------------------

    def answer(
        self, data: bytes, source: tuple[str, int], *, tcp: bool = False, zone: _Zone | None = None
    ) -> bytes | _Forward | None:
        """The reply to one query, a _Forward to send upstream, or None to drop it. `zone`: the
        records as just read (else they are read now)."""
        try:
            reply = self._fast(data, zone)
            if reply is not None:
                self.stats["answered"] += 1
                return reply
            return self._slow(data, source, tcp)
        except Exception:
            # Whatever a packet does to us, the server keeps answering the next one.
            self.stats["failed"] += 1
            log.exception(
                "DNS query from %s:%d (%d bytes) could not be handled", *source, len(data)
            )
            return None

    def _fast(self, data: bytes, zone: _Zone | None = None) -> bytes | None:
        """The answer to a plain query for a lab name, from bytes packed in advance, or None.

        Plain: QR=0, opcode QUERY, one question of class IN, no answer or authority records
        and at most an EDNS version-0 OPT record; anything else goes the dnslib way."""
        size = len(data)
        if size < 17 or data[2] & 0xF8 or data[4:10] != _ONE_QUESTION:
            return None
        i = 12
        while True:
            if i >= size:
                return None
            length = data[i]
            if not length:
                break
            if length > 63:
                return None
            i += length + 1
        end = i + 5
        if end > size or data[i + 3] != 0 or data[i + 4] != _IN:
            return None
        name = (zone or self._current()).fast.get(data[12 : i + 1].lower())
        if name is None:
            return None
        arcount = (data[10] << 8) | data[11]
        if arcount == 0:
            if end != size:
                return None
            opt = b""
        elif arcount == 1:
            # The OPT record (RFC 6891 section 6.1.2): root name, type 41, size, ext RCODE,
            # version, flags, RDLENGTH, options; version 0 only (else BADVERS, the slow path).
            if (
                size < end + 11
                or data[end] != 0
                or data[end + 1 : end + 3] != b"\x00\x29"
                or data[end + 6] != 0
                or size != end + 11 + ((data[end + 9] << 8) | data[end + 10])
            ):
                return None
            opt = _OPT_DO if data[end + 7] & 0x80 else _OPT_PLAIN
        else:
            return None
        packed = name.by_type.get((data[i + 1] << 8) | data[i + 2], name.other)
        # QR, AA and the client's RD; RA (we recurse, through the upstreams), the client's
        # CD (RFC 4035 section 3.1.6) and the RCODE.
        flags = bytes((0x84 | (data[2] & 0x01), 0x80 | (data[3] & 0x10) | packed.flags))
        return b"".join(
            (
                data[:2],
                flags,
                packed.counts,
                b"\x00\x01" if opt else b"\x00\x00",
                data[12:end],
                packed.tail,
                opt,
            )
        )

    def _slow(self, data: bytes, source: tuple[str, int], tcp: bool) -> bytes | _Forward | None:
        try:
            request = DNSRecord.parse(data)
        except Exception as exc:
            # Anything dnslib cannot parse (its DNSError and whatever else it raises on hostile
            # input: the parse has no side effects) is a malformed packet, not our failure.
            self.stats["malformed"] += 1
            log.debug("malformed DNS packet from %s:%d (%d bytes): %s", *source, len(data), exc)
            return None
        if any(len(_wire(q.qname.label)) > 255 for q in request.questions):
            # RFC 1035 section 2.3.4; dnslib parses such names but cannot pack them back.
            self.stats["malformed"] += 1
            log.debug("DNS query from %s:%d names a name over 255 octets", *source)
            return None
        header = request.header
        if header.qr:
            self.stats["ignored"] += 1  # an answer sent to us: never answer one (no loops)
            log.debug("DNS response from %s:%d ignored", *source)
            return None
        opt = next((rr for rr in request.ar if rr.rtype == _OPT), None)
        if header.opcode != 0:
            return self._reject(request, _NOTIMP, opt, "notimp")
        if len(request.questions) != 1:
            return self._reject(request, _FORMERR, opt, "formerr")
        if opt is not None and (opt.ttl >> 16) & 0xFF != 0:
            return self._reject(request, _BADVERS, opt, "badvers")
        question = request.q
        labels = tuple(label.lower() for label in question.qname.label)
        zone = self._current()
        local = self._authoritative(zone, labels, question.qtype, question.qclass)
        if local is not None:
            rcode, answers, authority = local
            wire = _wire(labels)
            if rcode == _NXDOMAIN and zone.negative < NEGATIVE_CACHE and wire not in zone.fast:
                # The same answer for every type: packed once, the next query is a fast one.
                zone.negative += 1
                zone.fast[wire] = _Name({}, self._pack_one(zone, labels, _A))
            reply = self._reply(request, rcode, opt)
            reply.add_answer(*answers)
            reply.add_auth(*authority)
            self.stats["answered"] += 1
            packed = bytes(reply.pack())
            end = question_end(data)
            if not tcp and end is not None and len(packed) > _udp_size(opt):
                return _truncated(packed, data[12:end])
            return packed
        end = question_end(data)
        if end is None:
            # A compressed or odd question name: no client sends one, and an upstream's answer
            # could not be matched to it byte for byte.
            return self._reject(request, _FORMERR, opt, "formerr")
        return _Forward(data, request, data[12:end].lower(), _udp_size(opt))

    def _reply(self, request: Any, rcode: int, opt: Any) -> Any:
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

    def _reject(self, request: Any, rcode: int, opt: Any, stat: str) -> bytes:
        self.stats[stat] += 1
        log.debug("DNS query %d answered %s", request.header.id, stat.upper())
        return self._error(request, rcode, opt)

    def _error(self, request: Any, rcode: int, opt: Any) -> bytes:
        reply = self._reply(request, rcode, opt)
        reply.header.aa = 0
        return bytes(reply.pack())

    def _authoritative(
        self, zone: _Zone, labels: tuple[bytes, ...], qtype: int, qclass: int
    ) -> tuple[int, list[Any], list[Any]] | None:
        """(RCODE, answers, authority) when the name is ours to answer, else None."""
        apex = zone.apex
        wire = _wire(labels)
        if labels[-len(apex) :] == apex and len(labels) >= len(apex):
            if qclass not in (_IN, _ANY):
                return _REFUSED, [], []
            qname = DNSLabel(labels)
            address = zone.names.get(wire)
            if address is not None:
                if qtype in (_A, _ANY):
                    return _NOERROR, [RR(qname, _A, rdata=A(str(address)), ttl=self.ttl)], []
                return _NOERROR, [], [self._soa(zone)]
            if labels == apex:
                if qtype in (_SOA, _ANY):
                    return _NOERROR, [self._soa(zone)], []
                return _NOERROR, [], [self._soa(zone)]
            if wire in zone.empty:
                return _NOERROR, [], [self._soa(zone)]
            return _NXDOMAIN, [], [self._soa(zone)]
        names = zone.reverse.get(wire)
        if names is None or qclass not in (_IN, _ANY):
            return None
        if qtype not in (_PTR, _ANY):
            return _NOERROR, [], []  # not our zone, so no SOA to give
        qname = DNSLabel(labels)
        return _NOERROR, [RR(qname, _PTR, rdata=PTR(DNSLabel(n)), ttl=self.ttl) for n in names], []

    def _soa(self, zone: _Zone) -> Any:
        apex = DNSLabel(zone.apex)
        # MINIMUM is the negative-caching TTL (RFC 2308 section 4); the zone's serial changes
        # whenever the records do.
        times = (zone.serial, *_SOA_TIMES, self.ttl)
        soa = SOA(mname=apex, rname=DNSLabel((b"hostmaster", *zone.apex)), times=times)
        return RR(apex, _SOA, rdata=soa, ttl=self.ttl)

    # -- the records -----------------------------------------------------------------

    def _current(self) -> _Zone:
        """The zone for what records() returns now, rebuilt only when its contents changed.

        Compared with a copy of the last contents, not by identity: an inventory may update
        one dict in place or hand out a new one per call. Two dicts compare in C, and values
        that are the very same objects (a dict updated in place, or rebuilt from the same
        inventory objects) compare by identity, so an unchanged view costs little per query."""
        try:
            records = self.records()
            if records != self._snapshot:
                self._zone = self._build(records, serial=self._zone.serial + 1)
                self._snapshot = dict(records)
            self._records_failing = False
        except Exception:
            if not self._records_failing:
                log.exception("the lab's DNS records could not be read; answering from the last")
            self._records_failing = True
        return self._zone

    def _build(self, records: Mapping[str, IPv4Address], serial: int) -> _Zone:
        # The SOA serial grows with each change (RFC 1982 arithmetic is never needed here).
        zone = _Zone(serial=max(serial, int(time.time())) & 0xFFFFFFFF, apex=self._apex)
        for short, value in sorted(records.items()):
            try:
                name = tuple(str(short).strip().rstrip(".").lower().encode("ascii").split(b"."))
                address = IPv4Address(value)
            except (UnicodeError, ValueError) as exc:
                log.warning("no DNS name for machine %r (%s): %s", short, value, exc)
                continue
            labels = name + self._apex
            wire = _wire(labels)
            if not all(0 < len(label) <= 63 for label in name) or len(wire) > 255:
                log.warning("no DNS name for machine %r: not a valid DNS name", short)
                continue
            if wire in zone.names:
                log.warning("machine name %r is used twice (names are case-insensitive)", short)
                continue
            zone.names[wire] = address
            reverse = _wire(tuple(address.reverse_pointer.encode().split(b".")))
            zone.reverse.setdefault(reverse, []).append(labels)
            for depth in range(1, len(name)):  # "a.b" makes "b.<domain>" exist, empty
                zone.empty.add(_wire(labels[depth:]))
        zone.empty.difference_update(zone.names)
        self._pack_fast(zone)
        log.debug("DNS zone %s: %d names (serial %d)", self.domain, len(zone.names), zone.serial)
        return zone

    def _pack_fast(self, zone: _Zone) -> None:
        """Pack the answer for every name and type the fast path serves, with dnslib.

        Packed for a lowercase question at offset 12 (no OPT); a client's question has the
        same length, so the compression pointers in the tail stay right with its bytes."""
        wanted: list[tuple[tuple[bytes, ...], tuple[int, ...]]] = [
            (zone.apex, (_SOA, _ANY)),
            *((tuple(_split(wire)), (_A, _ANY)) for wire in zone.names),
            *((tuple(_split(wire)), (_PTR, _ANY)) for wire in zone.reverse),
            *((tuple(_split(wire)), ()) for wire in zone.empty),
        ]
        for labels, types in wanted:
            by_type = {qtype: self._pack_one(zone, labels, qtype) for qtype in types}
            # Any other type gets what AAAA gets: NODATA (its tail does not name the type).
            zone.fast[_wire(labels)] = _Name(by_type, self._pack_one(zone, labels, _AAAA))

    def _pack_one(self, zone: _Zone, labels: tuple[bytes, ...], qtype: int) -> _Packed:
        local = self._authoritative(zone, labels, qtype, _IN)
        assert local is not None
        rcode, answers, authority = local
        request = DNSRecord.question(DNSLabel(labels))
        request.q.qtype = qtype
        request.header.rd = 0
        reply = self._reply(request, rcode, None)
        reply.add_answer(*answers)
        reply.add_auth(*authority)
        data = bytes(reply.pack())
        end = 12 + len(_wire(labels)) + 4
        return _Packed(flags=data[3] & 0x0F, counts=data[4:10], tail=data[end:])

    # -- forwarding ------------------------------------------------------------------

    def _spawn_forward(self, job: _Forward, listener: _UdpListener, addr: tuple[str, int]) -> None:
        # The slot is taken here, not in the task: a burst arrives before any task runs.
        if not self._reserve():
            listener.send(self._busy(job), addr)
            return

        async def forward() -> None:
            listener.send(await self._forwarded(job, tcp=False), addr)

        task = asyncio.get_running_loop().create_task(forward())
        self._tasks.add(task)
        task.add_done_callback(self._release)

    def _reserve(self) -> bool:
        if self._forwarding >= self.max_forwards:
            return False
        self._forwarding += 1
        return True

    def _release(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._forwarding -= 1

    def _busy(self, job: _Forward) -> bytes:
        self.stats["busy"] += 1
        log.debug("DNS: %d queries already forwarded; SERVFAIL", self._forwarding)
        return self._error(job.request, _SERVFAIL, _opt_of(job.request))

    async def forward(self, job: _Forward, *, tcp: bool) -> bytes:
        """The upstreams' answer to `job` with the client's ID, or SERVFAIL; never raises."""
        if not self._reserve():
            return self._busy(job)
        try:
            return await self._forwarded(job, tcp)
        finally:
            self._forwarding -= 1

    async def _forwarded(self, job: _Forward, tcp: bool) -> bytes:
        try:
            answer = await self._ask_upstreams(job, tcp)
        except Exception:
            self.stats["failed"] += 1
            log.exception("DNS forwarding failed")
            answer = None
        if answer is None:
            self.stats["servfail"] += 1
            return self._error(job.request, _SERVFAIL, _opt_of(job.request))
        self.stats["forwarded"] += 1
        reply = job.data[:2] + answer[2:]
        if not tcp and len(reply) > job.udp_size:
            self.stats["truncated"] += 1
            return _truncated(reply, job.data[12 : 12 + len(job.question)])
        return reply

    async def _ask_upstreams(self, job: _Forward, tcp: bool) -> bytes | None:
        """The first usable answer from the upstreams, in order (or the last refusal)."""
        last: bytes | None = None
        for upstream in self.upstreams:
            where = f"{upstream}:{self.upstream_port}"
            try:
                if tcp:
                    answer = await self._ask_tcp(upstream, job)
                else:
                    answer = await self._ask_udp(upstream, job)
                    if answer[2] & 0x02:
                        # Truncated (RFC 1035 section 4.2.1): the whole answer over TCP, or
                        # the truncated one, on which the client retries over TCP itself.
                        self.stats["upstream_truncated"] += 1
                        with contextlib.suppress(OSError, TimeoutError, EOFError):
                            answer = await self._ask_tcp(upstream, job)
            except (OSError, TimeoutError, EOFError) as exc:
                self.stats["upstream_failed"] += 1
                log.debug("DNS upstream %s failed: %s", where, exc or type(exc).__name__)
                continue
            if answer[3] & 0x0F in (_SERVFAIL, _REFUSED, _NOTIMP):
                # This upstream cannot or will not answer; another one might (dnsmasq does the
                # same in strict order).
                self.stats["upstream_refused"] += 1
                last = answer
                continue
            return answer
        return last

    async def _ask_udp(self, upstream: IPv4Address, job: _Forward) -> bytes:
        loop = asyncio.get_running_loop()
        qid = secrets.randbits(16)
        waiter: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UpstreamEndpoint(waiter, qid, job.question),
            remote_addr=(str(upstream), self.upstream_port),
            family=socket.AF_INET,
        )
        try:
            transport.sendto(qid.to_bytes(2, "big") + job.data[2:])
            return await asyncio.wait_for(waiter, self.timeout)
        finally:
            transport.close()

    async def _ask_tcp(self, upstream: IPv4Address, job: _Forward) -> bytes:
        qid = secrets.randbits(16)
        query = job.data

        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection(str(upstream), self.upstream_port)
            try:
                # RFC 1035 section 4.2.2 / RFC 7766 section 8: a two-byte length first.
                writer.write(len(query).to_bytes(2, "big") + qid.to_bytes(2, "big") + query[2:])
                await writer.drain()
                size = int.from_bytes(await reader.readexactly(2), "big")
                answer = await reader.readexactly(size)
            finally:
                writer.close()
            if not _answers(answer, qid, job.question):
                raise ConnectionError("the TCP answer does not match the query")
            return answer

        return await asyncio.wait_for(exchange(), self.timeout)

    # -- TCP clients -----------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername") or ("?", 0)
        if len(self._tcp_clients) >= MAX_TCP_CLIENTS or task is None:
            self.stats["tcp_refused"] += 1
            writer.close()
            return
        self._tcp_clients.add(task)
        try:
            # RFC 7766 section 6.2.1: several queries per connection, answered in order here.
            while True:
                prefix = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                data = await asyncio.wait_for(
                    reader.readexactly(int.from_bytes(prefix, "big")), TCP_IDLE
                )
                result = self.answer(data, peer, tcp=True)
                if result is None:
                    return  # malformed: the connection is no longer trusted to be in sync
                reply = (
                    result if isinstance(result, bytes) else await self.forward(result, tcp=True)
                )
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (EOFError, TimeoutError, OSError):
            pass  # the client closed, went idle or away
        finally:
            self._tcp_clients.discard(task)
            writer.close()


def _split(wire: bytes) -> list[bytes]:
    labels = []
    i = 0
    while wire[i]:
        labels.append(wire[i + 1 : i + 1 + wire[i]])
        i += 1 + wire[i]
    return labels


def _opt_of(request: Any) -> Any:
    return next((rr for rr in request.ar if rr.rtype == _OPT), None)


def _udp_size(opt: Any) -> int:
    """How large a UDP answer the client takes (RFC 6891 section 6.2.5: never below 512)."""
    return CLASSIC_UDP_SIZE if opt is None else max(CLASSIC_UDP_SIZE, int(opt.rclass))
