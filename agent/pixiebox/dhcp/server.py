"""The DHCP server: sockets on one interface, decode, ask the mode's handler, send the reply.

Thin on purpose: policy lives in the handlers and the inventory. A malformed, truncated or
hostile packet is counted and logged at debug level and never stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Protocol

from pixiebox.dhcp.codec import (
    BOOTREQUEST,
    DecodeError,
    EncodeError,
    MessageType,
    Packet,
    decode,
    encode,
)

log = logging.getLogger("pixiebox.dhcp")

SERVER_PORT = 67
CLIENT_PORT = 68
_BROADCAST = "255.255.255.255"
_ZERO = IPv4Address(0)


class Handler(Protocol):
    @property
    def mode(self) -> str: ...
    @property
    def ports(self) -> tuple[int, ...]: ...

    def handle(self, request: Packet, port: int) -> Packet | None: ...


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
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # linux/socket.h; Python 3.11 lacks it


def open_socket(interface: str, port: int) -> socket.socket:
    """A UDP socket that hears broadcasts on `interface` only and can send them there."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        # Bound to the device: a DHCP server must not answer on the appliance's other networks.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except OSError:  # not root (CAP_NET_ADMIN): as much as rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Listener:
    """One port's socket, read straight from the event loop's selector.

    Not an asyncio datagram endpoint, which takes a selector wake-up, a recvfrom and a protocol
    call per datagram: this reads up to BATCH datagrams per wake-up, answers them, lets the
    handler commit what they changed (`flush`: the leases of the ACKs), and only then sends the
    replies, so an ACK never leaves before its lease is on disk and a boot storm costs one
    commit per batch."""

    BATCH = 64  # then the loop gets a turn: HTTP, TFTP, DNS, signals

    def __init__(self, server: DhcpServer, sock: socket.socket, port: int) -> None:
        self.server = server
        self.sock = sock
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock, answer, port = self.sock, self.server.answer, self.port
        replies: list[tuple[bytes, tuple[str, int]]] = []
        for _ in range(self.BATCH):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("DHCP receive failed on port %d: %s", port, exc)
                break
            reply = answer(data, port, addr)
            if reply is not None:
                replies.append(reply)
        if not replies:
            return
        self.server.flush()
        for payload, destination in replies:
            try:
                sock.sendto(payload, destination)
            except (BlockingIOError, InterruptedError):
                # Send buffer full: lost like any datagram; the client asks again.
                self.server.stats["send_dropped"] += 1
            except OSError as exc:
                log.debug("DHCP reply to %s:%d not sent: %s", *destination, exc)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class DhcpServer:
    def __init__(self, handler: Handler, interface: str) -> None:
        self.handler = handler
        self.interface = interface
        self.stats: Counter[str] = Counter()
        #: Requests by DHCP message type (DISCOVER, REQUEST, ...), for /metrics.
        self.by_type: Counter[str] = Counter()
        self._listeners: list[_Listener] = []
        self._flush: Callable[[], None] | None = getattr(handler, "flush", None)

    async def start(self) -> None:
        for port in self.handler.ports:
            sock = open_socket(self.interface, port)
            try:
                self._listeners.append(_Listener(self, sock, port))
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

    def flush(self) -> None:
        """Commit what the answered requests changed (the handler's leases), before sending."""
        if self._flush is None:
            return
        try:
            self._flush()
        except Exception:
            self.stats["failed"] += 1
            log.exception("DHCP state could not be saved")

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
