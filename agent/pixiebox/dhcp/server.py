"""The DHCP server: sockets on one interface, decode, ask the mode's handler, send the reply.

Thin on purpose: policy lives in the handlers and the inventory. A malformed, truncated or
hostile packet is counted and logged at debug level and never stops the server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections import Counter
from ipaddress import IPv4Address
from typing import Protocol, cast

from .codec import BOOTREQUEST, DecodeError, EncodeError, MessageType, Packet, decode, encode

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


def open_socket(interface: str, port: int) -> socket.socket:
    """A UDP socket that hears broadcasts on `interface` only and can send them there."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        # Bound to the device: a DHCP server must not answer on the appliance's other networks.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, server: DhcpServer, port: int) -> None:
        self.server = server
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.answer(data, self.port, addr)
        if reply is not None and self.transport is not None:
            payload, destination = reply
            self.transport.sendto(payload, destination)

    def error_received(self, exc: Exception) -> None:
        log.debug("DHCP socket error on port %d: %s", self.port, exc)


class DhcpServer:
    def __init__(self, handler: Handler, interface: str) -> None:
        self.handler = handler
        self.interface = interface
        self.stats: Counter[str] = Counter()
        #: Requests by DHCP message type (DISCOVER, REQUEST, ...), for /metrics.
        self.by_type: Counter[str] = Counter()
        self._transports: list[asyncio.DatagramTransport] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for port in self.handler.ports:
            sock = open_socket(self.interface, port)
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Endpoint, self, port), sock=sock
            )
            self._transports.append(transport)
        log.info(
            "DHCP (%s mode) listening on %s, UDP %s",
            self.handler.mode,
            self.interface,
            ", ".join(map(str, self.handler.ports)),
        )

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        self._transports.clear()

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
