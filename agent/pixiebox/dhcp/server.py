"""The DHCP server: sockets on one interface, decode, ask the mode's handler, send the reply.

Thin on purpose: policy lives in the handlers and the inventory. A malformed, truncated or
hostile packet is counted and logged at debug level and never stops the server. When more
requests arrive than it can answer, the lab's own machines are answered first and strangers'
requests are shed (dhcp.triage).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Protocol

from pixiebox.config.values import unicast_mac_problem
from pixiebox.core import wording
from pixiebox.dhcp.codec import (
    BOOTREQUEST,
    DecodeError,
    EncodeError,
    MessageType,
    Packet,
    decode,
    encode,
)
from pixiebox.dhcp.triage import Triage
from pixiebox.net.limits import LogLimiter
from pixiebox.net.udp import Address, DatagramListener, udp_socket

log = logging.getLogger("pixiebox.dhcp")

SERVER_PORT = 67
CLIENT_PORT = 68
_BROADCAST = "255.255.255.255"
_ZERO = IPv4Address(0)


class Handler(Protocol):
    """A DHCP mode (proxy, reservation, full): everything the server and the agent ask of one."""

    @property
    def mode(self) -> str: ...
    @property
    def ports(self) -> tuple[int, ...]: ...

    def handle(self, request: Packet, port: int) -> Packet | None: ...

    def flush(self) -> None:
        """Commit what the handled requests changed (leases), before their replies are sent."""

    def reload(self) -> None:
        """lab.toml was swapped in (on the event loop): re-read what the mode derives from it."""

    def held_addresses(self) -> set[IPv4Address]:
        """Addresses this mode has leased out or quarantined (none in proxy mode)."""

    def known(self, mac: str) -> bool:
        """Whether `mac` is one of the lab's (enrolled, or holding a lease of this mode's): its
        requests are answered before strangers' and never shed (dhcp.triage). Called for
        every datagram, so a dictionary lookup, nothing more."""


def reply_destination(
    request: Packet, reply: Packet, port: int, source: tuple[str, int]
) -> tuple[str, int]:
    """Where a reply goes (RFC 2131 4.1).

    Relayed requests go back to the relay's server port. Otherwise a client that has an address
    (ciaddr: renewing, INFORM, the PXE port-4011 request) gets unicast, and everything else is
    broadcast on the interface: unicasting to yiaddr would need an ARP entry the client cannot
    answer for yet, and every client accepts the broadcast."""
    if port != SERVER_PORT:
        return source
    if request.giaddr != _ZERO:
        return (str(request.giaddr), SERVER_PORT)
    if reply.message_type is MessageType.NAK:
        return (_BROADCAST, CLIENT_PORT)
    if request.ciaddr != _ZERO:
        return (str(request.ciaddr), CLIENT_PORT)
    return (_BROADCAST, CLIENT_PORT)


#: Receive buffer asked for (root may exceed net.core.rmem_max). The server empties it at every
#: wake-up and sorts what it read (dhcp.triage), so it only has to hold what arrives while the
#: loop is busy elsewhere (an fsync, a large API page): a lab powering on at once sends
#: thousands of DISCOVERs within a second, and a datagram the kernel drops is lost at random,
#: the lab's own machines' too (RFC 2131 4.1: their retransmission comes 4 s later). Its depth
#: no longer makes answers stale: strangers are answered newest first, and shed after
#: triage.SHED_AFTER.
RECEIVE_BUFFER = 4 << 20
#: Datagrams read per wake-up at most (reading and sorting one costs microseconds; answering
#: one, a millisecond): enough to empty the buffer above in a few wake-ups.
DRAIN = 4096
#: Urgent requests (the lab's machines) answered per loop turn at most: a lab of thousands
#: powering on at once is answered in order, the loop getting its turns in between.
URGENT_BATCH = 64
#: Strangers' requests answered per loop turn at most, and the time they may take: then the loop
#: gets a turn (HTTP, TFTP, DNS, signals, and the next read, where the lab's machines are
#: found). The time is what a lab machine's request waits at most behind strangers' (a
#: stranger's answer takes about half a millisecond here); each turn costs a commit.
BATCH = 32
TURN_SECONDS = 0.005


class _Port:
    """One port's socket: what it reads goes to the server's triage; replies leave through it."""

    def __init__(self, server: DhcpServer, sock: socket.socket, port: int) -> None:
        self.port = port
        triage = server.triage
        put = triage.put

        def received(data: bytes, source: Address) -> None:
            put(self, data, source)

        self.listener = DatagramListener(
            sock,
            received,
            batch=DRAIN,
            stats=server.stats,
            name=f"DHCP port {port}",
            after_batch=server.work,
            logger=log,
        )

    def close(self) -> None:
        self.listener.close()


class DhcpServer:
    def __init__(self, handler: Handler, interface: str) -> None:
        self.handler = handler
        self.interface = interface
        self.stats: Counter[str] = Counter()
        #: Requests by DHCP message type (DISCOVER, REQUEST, ...), for /metrics.
        self.by_type: Counter[str] = Counter()
        self._listeners: list[_Port] = []
        self._flush: Callable[[], None] = handler.flush
        self.triage: Triage[_Port] = Triage(handler.known)
        self._said = LogLimiter(log)
        self._shed_unsaid = 0
        self._again: asyncio.Handle | None = None

    async def start(self) -> None:
        for port in self.handler.ports:
            # Bound to the device: a DHCP server must not answer on the appliance's other
            # networks; broadcast, as a client without an address can hear nothing else.
            sock = udp_socket(
                port,
                device=self.interface,
                broadcast=True,
                receive_buffer=RECEIVE_BUFFER,
                force_buffer=True,
                reuse=True,
            )
            try:
                self._listeners.append(_Port(self, sock, port))
            except BaseException:
                sock.close()
                raise
        log.info(
            "DHCP (%s mode) listening on %s, UDP %s",
            self.handler.mode,
            self.interface,
            ", ".join(map(str, self.handler.ports)),
        )

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        if self._again is not None:
            self._again.cancel()
            self._again = None
        self.triage.urgent.clear()
        while self.triage.next_stranger() is not None:
            pass

    def work(self) -> None:
        """One turn: answer urgent requests (the lab's machines, exchanges in progress), the
        oldest first, up to URGENT_BATCH, and send those replies; then strangers' requests,
        newest first, up to BATCH or TURN_SECONDS; shed those that waited too long
        (dhcp.triage). Each group's replies leave only once the handler committed what it
        changed (`flush`: an ACK's lease is on stable storage first; one commit and one fsync
        per group, not per lease), and a group whose commit failed is not answered: its
        clients ask again."""
        self._again = None
        triage = self.triage
        urgent = triage.take_urgent(URGENT_BATCH)
        if urgent:
            self._send(
                [(port, self.answer(data, port.port, source)) for port, data, source in urgent]
            )
        triage.shed_stale()
        replies: list[tuple[_Port, tuple[bytes, Address] | None]] = []
        deadline = time.monotonic() + TURN_SECONDS
        while len(replies) < BATCH:
            stranger = triage.next_stranger()
            if stranger is None:
                break
            port, data, source = stranger
            replies.append((port, self.answer(data, port.port, source)))
            if time.monotonic() >= deadline:
                break
        self._send(replies)
        shed = triage.shed - self.stats["shed"]
        self.stats["shed"] = triage.shed
        if shed:
            self._tell_shed(shed)
        self.stats["dropped"] = triage.dropped
        if len(triage) and self._listeners:
            self._again = asyncio.get_running_loop().call_soon(self.work)

    def _send(self, replies: list[tuple[_Port, tuple[bytes, Address] | None]]) -> None:
        if not any(reply is not None for _, reply in replies):
            return
        if not self.flush():
            return  # an ACK whose lease may not be stored is not sent: its client asks again
        for port, reply in replies:
            if reply is not None:
                port.listener.send(*reply)

    def _tell_shed(self, shed: int) -> None:
        self._shed_unsaid += shed
        if self._said.log(
            "shed",
            logging.WARNING,
            "DHCP overloaded: %d requests from unknown machines were dropped unanswered (waited "
            "over %s, or too many queued) while the lab's machines were answered first; a host "
            "on the lab LAN may be flooding DHCPDISCOVERs (/metrics: "
            'pixiebox_dhcp_packets_total{outcome="shed"})',
            self._shed_unsaid,
            wording.span(self.triage.shed_after),
        ):
            self._shed_unsaid = 0

    def flush(self) -> bool:
        """Commit what the answered requests changed (the handler's leases), before sending;
        False when that failed (the store said why and tries again), and the batch's replies
        must then not leave."""
        try:
            self._flush()
        except sqlite3.Error:
            self.stats["unsaved"] += 1
            return False
        except Exception:
            self.stats["unsaved"] += 1
            log.exception("DHCP state could not be saved")
            return False
        return True

    def answer(
        self, data: bytes, port: int, source: tuple[str, int]
    ) -> tuple[bytes, tuple[str, int]] | None:
        """The encoded reply to one datagram and where to send it, or None."""
        try:
            request = decode(data)
            kind = request.message_type
            if request.op != BOOTREQUEST or kind is None:
                self.stats["ignored"] += 1
                return None
            problem = request.htype == 1 and unicast_mac_problem(request.chaddr[:6].hex(":"))
            if problem:
                # A group or zero chaddr is no card's (forged or broken): no machine record,
                # no lease, no boot file; debug only, so a flood of them cannot fill the log.
                self.stats["not-unicast"] += 1
                log.debug("DHCP %s from %s:%d not answered: %s", kind.name, *source, problem)
                return None
            self.by_type[kind.name] += 1
            reply = self.handler.handle(request, port)
            if reply is None:
                self.stats["unanswered"] += 1
                return None
            if reply.message_type is MessageType.OFFER:
                self.triage.offered(request.chaddr[:6])
            payload = encode(reply)
        except (DecodeError, EncodeError) as exc:
            self.stats["malformed"] += 1
            log.debug("malformed DHCP packet from %s:%d (%d bytes): %s", *source, len(data), exc)
            return None
        except Exception:
            # Whatever a packet does to a handler, the lab keeps booting.
            self.stats["failed"] += 1
            log.exception("DHCP packet from %s:%d could not be handled", *source)
            return None
        self.stats["answered"] += 1
        return payload, reply_destination(request, reply, port, source)
