"""The DHCP server: sockets on one interface, decode, ask the mode's handler, send the reply.

Thin on purpose: policy lives in the handlers and the inventory. A malformed, truncated or
hostile packet is counted and logged at debug level and never stops the server.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Protocol

from pixiebox.config.values import unicast_mac_problem
from pixiebox.dhcp.codec import (
    BOOTREQUEST,
    DecodeError,
    EncodeError,
    MessageType,
    Packet,
    decode,
    encode,
)
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


#: Receive buffer asked for (root may exceed net.core.rmem_max): a lab powering on at once sends
#: thousands of DISCOVERs within a second, and a datagram the kernel drops costs the client a
#: retransmission seconds later (RFC 2131 4.1: 4 s, then 8 s ...). About a second of requests at
#: this server's rate (~800 datagrams), not more: a deeper queue only holds requests whose
#: clients have given up by the time they are read (perfdhcp, which waits 1 s, saw every answer
#: come too late once a 4 MiB queue had filled).
RECEIVE_BUFFER = 1 << 20
#: Datagrams read per wake-up; then the loop gets a turn: HTTP, TFTP, DNS, signals.
BATCH = 64


class _Port:
    """One port's listener. A batch's replies wait until the handler has committed what the
    batch changed (`flush`: the leases of the ACKs; the COMMIT fsyncs, store.state), so an ACK
    never leaves before its lease is on stable storage, and a boot storm costs one commit and
    one fsync per batch, not per lease. A batch whose commit failed is not answered."""

    def __init__(self, server: DhcpServer, sock: socket.socket, port: int) -> None:
        self.answer = server.answer
        self.flush = server.flush
        self.port = port
        self.replies: list[tuple[bytes, Address]] = []
        self.listener = DatagramListener(
            sock,
            self.received,
            batch=BATCH,
            stats=server.stats,
            name=f"DHCP port {port}",
            after_batch=self.send_replies,
            logger=log,
        )

    def received(self, data: bytes, source: Address) -> None:
        reply = self.answer(data, self.port, source)
        if reply is not None:
            self.replies.append(reply)

    def send_replies(self) -> None:
        if not self.replies:
            return
        replies, self.replies = self.replies, []
        if not self.flush():
            return  # an ACK whose lease may not be stored is not sent: its client asks again
        send = self.listener.send
        for payload, destination in replies:
            send(payload, destination)

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
