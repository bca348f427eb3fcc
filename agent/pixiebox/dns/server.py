"""The DNS server: its UDP and TCP sockets, and which way each query goes.

A query for a known lab name is matched on its raw question (walked, lowercased) and answered
by splicing the client's ID, flags and question onto an answer the zone packed in advance,
because a dnslib parse + pack per query (~140 us) alone would cap the server well below what a
lab asks. Anything unusual (a second question, an EDNS version we do not speak, a name we do
not hold) takes the dnslib path, which gives the same answers, or is forwarded.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from dnslib import DNSRecord  # type: ignore[import-untyped]

from pixiebox.dns.forward import MAX_FORWARDS, Forward, Forwarder, ForwardFor
from pixiebox.dns.wire import (
    BADVERS,
    CLASS_IN,
    DNS_PORT,
    FORMERR,
    NOTIMP,
    NXDOMAIN,
    ONE_QUESTION,
    OPT_DO,
    OPT_PLAIN,
    REFUSED,
    TYPE_OPT,
    empty_reply,
    error_reply,
    question_end,
    truncated,
    udp_size,
    wire,
)
from pixiebox.dns.zone import LabNames, Zone, domain_labels
from pixiebox.net.limits import ConnectionGate, LogLimiter, quiet_accept_errors, tcp_listener
from pixiebox.net.udp import Address, DatagramListener, udp_socket

log = logging.getLogger("pixiebox.dns")

#: TCP clients served at once (RFC 7766 section 6.2.2: servers limit connections).
MAX_TCP_CLIENTS = 64
#: TCP connections one source address may hold ([dns] tcp_connections_per_source): a resolver
#: needs one or two; without a bound one neighbour holds all MAX_TCP_CLIENTS.
TCP_PER_SOURCE = 8
#: Seconds an idle TCP connection is kept, and a query given to arrive whole once begun (RFC
#: 7766 section 6.2.3: servers time idle connections out, "a few seconds" suffices).
TCP_IDLE = 10.0
#: Room in the kernel for a burst of queries while the loop is busy.
RECEIVE_BUFFER = 1 << 20
#: Datagrams read per wake-up; then the loop gets a turn: TCP clients, upstream answers, signals.
BATCH = 64


class DnsServer:
    """Answers `<name>.<domain>` from `records()` to anyone, and forwards the rest to
    `upstreams` for sources in `forward_for()` only (REFUSED for any other: no open resolver).

    `records()` is called for every query (it is the inventory's current view, cheap) and maps
    short names ("c1", the appliance's own name) to addresses; answers are rebuilt only when
    what it returns has other contents (a new mapping, or the same dict changed in place).
    `port` 0 picks a free port (the same one for UDP and TCP); `port` holds it after start().
    `max_forwards` bounds forwarded queries in flight; `upstream_port` is where upstreams listen.
    `forward_for()` is read whenever a query would be forwarded (the current lab.toml's list,
    so a reload applies at once); an empty list forwards for nobody.
    """

    def __init__(
        self,
        *,
        domain: str,
        records: Callable[[], Mapping[str, IPv4Address]],
        upstreams: Sequence[IPv4Address],
        forward_for: Callable[[], Sequence[IPv4Network]],
        listen_ip: str = "0.0.0.0",
        port: int = DNS_PORT,
        interface: str | None = None,
        timeout: float = 2.0,
        ttl: int = 60,
        max_forwards: int = MAX_FORWARDS,
        upstream_port: int = DNS_PORT,
        tcp_per_source: int = TCP_PER_SOURCE,
        tcp_idle: float = TCP_IDLE,
    ) -> None:
        labels = domain_labels(domain)
        if timeout <= 0 or ttl < 0 or max_forwards < 1 or tcp_per_source < 1 or tcp_idle <= 0:
            raise ValueError(
                "timeout, max_forwards and the TCP limits must be positive, ttl not negative"
            )
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
        self.names = LabNames(labels, records, ttl)
        self.forward_for = ForwardFor(forward_for)
        self.forwarder = Forwarder(
            self.upstreams,
            stats=self.stats,
            timeout=timeout,
            max_forwards=max_forwards,
            port=upstream_port,
        )
        self._tcp_clients: set[asyncio.Task[Any]] = set()
        self.tcp_idle = tcp_idle
        # RFC 7766 section 6.2.2: limits per client and in total; the idle (between queries)
        # are closed first to make room (section 6.2.3: under pressure, close idle ones).
        self._tcp_gate: ConnectionGate[_TcpClient] = ConnectionGate(
            MAX_TCP_CLIENTS, min(tcp_per_source, MAX_TCP_CLIENTS)
        )
        self._said = LogLimiter(log)
        self._udp: DatagramListener | None = None
        self._tcp: asyncio.Server | None = None
        self._batch_zone: Zone | None = None

    # -- sockets ---------------------------------------------------------------------

    async def start(self) -> None:
        udp = udp_socket(
            self.port,
            address=self.listen_ip,
            device=self.interface,
            receive_buffer=RECEIVE_BUFFER,
        )
        try:
            port = udp.getsockname()[1]
            tcp = self._tcp_socket(port)
        except OSError:
            udp.close()
            raise
        try:
            self._udp = DatagramListener(
                udp,
                self._received,
                batch=BATCH,
                stats=self.stats,
                name="DNS UDP",
                after_batch=self._batch_done,
                logger=log,
            )
        except BaseException:
            udp.close()
            tcp.close()
            raise
        try:
            quiet_accept_errors(asyncio.get_running_loop())
            self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp, backlog=128)
        except BaseException:
            tcp.close()
            await self.close()
            raise
        self.port = port
        upstreams = ", ".join(map(str, self.upstreams)) or "nowhere (no upstreams)"
        clients = ", ".join(map(str, self.forward_for.current())) or "nobody"
        log.info(
            "DNS for *.%s on %s%s port %d (UDP, TCP); other names are forwarded to %s for "
            "clients in %s (REFUSED for others)",
            self.domain,
            self.listen_ip,
            f"%{self.interface}" if self.interface else "",
            port,
            upstreams,
            clients,
        )

    def _tcp_socket(self, port: int) -> socket.socket:
        # accept(2) out of descriptors: one rate-limited line, no storm (net.limits).
        return tcp_listener(self.listen_ip, port, self.interface)

    async def close(self) -> None:
        """Stop listening, drop queries in flight and TCP clients. Idempotent."""
        listener, self._udp = self._udp, None
        if listener is not None:
            listener.close()
        server, self._tcp = self._tcp, None
        if server is not None:
            server.close()
        tasks = [*self.forwarder.tasks, *self._tcp_clients]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        await asyncio.sleep(0)  # the TCP clients' transports close their sockets now

    # -- UDP clients -----------------------------------------------------------------

    def _received(self, data: bytes, addr: Address) -> None:
        # The records are read once per batch, not per query: the datagrams of one wake-up
        # arrived at the same moment, and reading a lab's records costs as much as answering
        # (a benchmark showed a third of the time in records()).
        zone = self._batch_zone
        if zone is None:
            zone = self._batch_zone = self.names.current()
        result = self.answer(data, addr, zone=zone)
        if result is None:
            return
        listener = self._udp
        if listener is None:
            return  # closed by this very batch
        if isinstance(result, bytes):
            listener.send(result, addr)
        else:
            self.forwarder.spawn(result, listener.send, addr)

    def _batch_done(self) -> None:
        self._batch_zone = None

    # -- answering -------------------------------------------------------------------

    def answer(
        self, data: bytes, source: Address, *, tcp: bool = False, zone: Zone | None = None
    ) -> bytes | Forward | None:
        """The reply to one query, a Forward to send upstream, or None to drop it. `zone`: the
        records as just read (else they are read now)."""
        try:
            reply = self._fast(data, zone)
            if reply is not None:
                self.stats["answered"] += 1
                return reply
            return self._slow(data, source, tcp)
        except Exception:
            # Whatever a packet does to us, the server keeps answering the next one; a packet
            # that does it once can be sent a million times, hence one traceback per 10 s.
            self.stats["failed"] += 1
            self._said.log(
                "failed",
                logging.ERROR,
                "DNS query from %s:%d (%d bytes) could not be handled",
                *source,
                len(data),
                exc_info=True,
            )
            return None

    def _current(self) -> Zone:
        return self.names.current()

    def _fast(self, data: bytes, zone: Zone | None = None) -> bytes | None:
        """The answer to a plain query for a lab name, from bytes packed in advance, or None.

        Plain: QR=0, opcode QUERY, one question of class IN, no answer or authority records
        and at most an EDNS version-0 OPT record; anything else goes the dnslib way."""
        size = len(data)
        if size < 17 or data[2] & 0xF8 or data[4:10] != ONE_QUESTION:
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
        if end > size or data[i + 3] != 0 or data[i + 4] != CLASS_IN:
            return None
        name = (zone or self.names.current()).fast.get(data[12 : i + 1].lower())
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
            opt = OPT_DO if data[end + 7] & 0x80 else OPT_PLAIN
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

    def _slow(self, data: bytes, source: Address, tcp: bool) -> bytes | Forward | None:
        try:
            request = DNSRecord.parse(data)
        except Exception as exc:
            # Anything dnslib cannot parse (its DNSError and whatever else it raises on hostile
            # input: the parse has no side effects) is a malformed packet, not our failure.
            self.stats["malformed"] += 1
            log.debug("malformed DNS packet from %s:%d (%d bytes): %s", *source, len(data), exc)
            return None
        if any(len(wire(q.qname.label)) > 255 for q in request.questions):
            # RFC 1035 section 2.3.4; dnslib parses such names but cannot pack them back.
            self.stats["malformed"] += 1
            log.debug("DNS query from %s:%d names a name over 255 octets", *source)
            return None
        header = request.header
        if header.qr:
            self.stats["ignored"] += 1  # an answer sent to us: never answer one (no loops)
            log.debug("DNS response from %s:%d ignored", *source)
            return None
        opt = next((rr for rr in request.ar if rr.rtype == TYPE_OPT), None)
        if header.opcode != 0:
            return self._reject(request, NOTIMP, opt, "notimp")
        if len(request.questions) != 1:
            return self._reject(request, FORMERR, opt, "formerr")
        if opt is not None and (opt.ttl >> 16) & 0xFF != 0:
            return self._reject(request, BADVERS, opt, "badvers")
        question = request.q
        labels = tuple(label.lower() for label in question.qname.label)
        zone = self.names.current()
        local = self.names.authoritative(zone, labels, question.qtype, question.qclass)
        if local is not None:
            rcode, answers, authority = local
            if rcode == NXDOMAIN:
                self.names.remember_nxdomain(zone, labels)
            reply = empty_reply(request, rcode, opt)
            reply.add_answer(*answers)
            reply.add_auth(*authority)
            self.stats["answered"] += 1
            packed = bytes(reply.pack())
            end = question_end(data)
            if not tcp and end is not None and len(packed) > udp_size(opt):
                return truncated(packed, data[12:end])
            return packed
        if not self.forward_for.allows(source[0]):
            # Not the lab's name, and not a lab client: recursion is refused (RFC 1035 section
            # 4.1.1, RCODE 5), no open resolver. The reply is no larger than the query, so a
            # spoofed source gains no amplification from it.
            self.forward_for.refused(source[0], str(question.qname))
            return self._reject(request, REFUSED, opt, "refused")
        end = question_end(data)
        if end is None:
            # A compressed or odd question name: no client sends one, and an upstream's answer
            # could not be matched to it byte for byte.
            return self._reject(request, FORMERR, opt, "formerr")
        return Forward(data, request, data[12:end].lower(), udp_size(opt))

    def _reject(self, request: Any, rcode: int, opt: Any, stat: str) -> bytes:
        self.stats[stat] += 1
        log.debug("DNS query %d answered %s", request.header.id, stat.upper())
        return error_reply(request, rcode, opt)

    # -- TCP clients -----------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername") or ("?", 0)
        client = _TcpClient(writer)
        over = self._tcp_gate.admit(client, str(peer[0])) if task is not None else "total"
        if over is not None:
            self.stats["tcp_refused"] += 1
            self._said.log(  # the designed outcome, counted in stats: not a warning
                f"tcp-refused-{over}",
                logging.INFO,
                "DNS over TCP: refused a connection from %s, over the cap of %s",
                peer[0],
                f"{self._tcp_gate.per_source} per source address ([dns] tcp_connections_per_source)"
                if over == "source"
                else f"{MAX_TCP_CLIENTS} in total",
            )
            writer.transport.abort()  # nothing is read, nothing to say
            return
        assert task is not None
        self._tcp_clients.add(task)
        try:
            # RFC 7766 section 6.2.1: several queries per connection, answered in order here.
            while True:
                prefix = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle)
                self._tcp_gate.busy(client)
                data = await asyncio.wait_for(
                    reader.readexactly(int.from_bytes(prefix, "big")), self.tcp_idle
                )
                result = self.answer(data, peer, tcp=True)
                if result is None:
                    return  # malformed: the connection is no longer trusted to be in sync
                reply = (
                    result
                    if isinstance(result, bytes)
                    else await self.forwarder.forward(result, tcp=True)
                )
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
                self._tcp_gate.idle(client)
        except (EOFError, TimeoutError, OSError):
            pass  # the client closed, went idle or away, or was closed to make room
        finally:
            self._tcp_gate.release(client)
            self._tcp_clients.discard(task)
            writer.close()


class _TcpClient:
    """One DNS-over-TCP connection, as the connection gate sees it."""

    __slots__ = ("writer",)

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def evict(self) -> None:
        # The handler's read ends with EOF (IncompleteReadError) and it cleans up.
        self.writer.close()
