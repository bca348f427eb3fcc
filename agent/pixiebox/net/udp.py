"""UDP sockets for the protocol servers, and the batched listener that DHCP, DNS and syslog share;
also the binding every listening socket of the agent goes through, TCP ones (net.limits) too.

The servers differ only in the options their sockets need (DHCP hears broadcasts and must not
share its port with another network; syslog must fail rather than share port 514 with rsyslog)
and in what they do with a datagram; the reading loop is the same and is the servers' hot path.

Imports nothing of pixiebox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

#: A datagram's peer as recvfrom gives it for AF_INET.
Address = tuple[str, int]

#: linux/socket.h; Python 3.11's socket module lacks the name.
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: Large enough for any UDP datagram over IPv4.
_MAX_DATAGRAM = 65535

log = logging.getLogger("pixiebox.net")

_Socket = TypeVar("_Socket", bound=socket.socket)


def udp_socket(
    port: int,
    *,
    address: str = "0.0.0.0",
    device: str | None = None,
    broadcast: bool = False,
    receive_buffer: int | None = None,
    force_buffer: bool = False,
    reuse: bool = False,
) -> socket.socket:
    """A bound, non-blocking UDP socket; closed again if any step fails, and the error raised.

    `device` (SO_BINDTODEVICE) confines the socket to one interface: a server on the lab
    interface must not answer, or be written to from, the appliance's other networks, and a
    socket bound to 0.0.0.0 (as DHCP's must be, to hear broadcasts) hears them all.
    `broadcast` allows sending to 255.255.255.255 (SO_BROADCAST). `receive_buffer` is asked of
    the kernel, which caps it at net.core.rmem_max; with `force_buffer` root (CAP_NET_ADMIN)
    gets past that cap (SO_RCVBUFFORCE) and anyone else as much as the cap allows. `reuse` sets
    SO_REUSEADDR; on a UDP socket it also lets another socket that sets it bind the same port,
    so a server that must not share its port unnoticed (syslog beside rsyslog) leaves it off
    and fails to bind."""
    return bind_socket(
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP),
        address,
        port,
        device=device,
        broadcast=broadcast,
        receive_buffer=receive_buffer,
        force_buffer=force_buffer,
        reuse=reuse,
    )


def bind_socket(
    sock: _Socket,
    address: str,
    port: int,
    *,
    device: str | None = None,
    broadcast: bool = False,
    receive_buffer: int | None = None,
    force_buffer: bool = False,
    reuse: bool = False,
) -> _Socket:
    """`sock` with the options udp_socket() describes, bound and non-blocking; closed again if
    any step fails, and the error raised (a server that retries its bind must not leak a
    descriptor each time)."""
    try:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if broadcast:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if receive_buffer is not None:
            set_receive_buffer(sock, receive_buffer, force=force_buffer)
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def set_receive_buffer(sock: socket.socket, size: int, *, force: bool = False) -> None:
    """Ask for a receive buffer of `size` bytes; best effort, never raises."""
    if force:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size)
            return
        except OSError:  # not root (CAP_NET_ADMIN): as much as rmem_max allows
            pass
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


class DatagramListener:
    """A bound non-blocking UDP socket, read straight from the event loop's selector.

    Not an asyncio datagram endpoint, which takes a selector wake-up, a recvfrom and a protocol
    call per datagram (it capped a DNS benchmark at ~10,000 queries/s where this loop does more
    than twice that on the same machine): each wake-up reads up to `batch` datagrams, calling
    `on_datagram(data, source)` for each, then `after_batch()` once (DHCP commits the leases of
    the batch's ACKs there, then sends the replies, so an ACK never leaves before its lease is
    on disk and a boot storm costs one commit per batch). After `batch` datagrams the loop gets
    a turn: HTTP, TFTP, the other servers, signals.

    `stats` is the server's counter: "send_dropped" counts replies lost to a full send buffer.
    `on_error` hears a failed receive (else it is logged at debug level); the socket stays in
    use, as with an asyncio endpoint. `name` says whose socket it is in log lines."""

    def __init__(
        self,
        sock: socket.socket,
        on_datagram: Callable[[bytes, Address], None],
        *,
        batch: int,
        stats: Counter[str],
        name: str,
        after_batch: Callable[[], None] | None = None,
        on_error: Callable[[OSError], None] | None = None,
        logger: logging.Logger = log,
    ) -> None:
        if batch < 1:
            raise ValueError(f"a listener reads at least one datagram per wake-up, not {batch}")
        self.sock = sock
        self.on_datagram = on_datagram
        self.batch = batch
        self.stats = stats
        self.name = name
        self.after_batch = after_batch
        self.on_error = on_error
        self.log = logger
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        recvfrom, received = self.sock.recvfrom, self.on_datagram
        try:
            for _ in range(self.batch):
                try:
                    data, source = recvfrom(_MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if self.on_error is not None:
                        self.on_error(exc)
                    else:
                        self.log.debug("%s: receive failed: %s", self.name, exc)
                    break
                received(data, source)
        finally:
            if self.after_batch is not None:
                self.after_batch()

    def send(self, data: bytes, destination: Address) -> None:
        """Send one datagram now; one that cannot be sent is lost like any datagram, and the
        client asks again (DHCP and DNS clients retransmit)."""
        if self.sock.fileno() < 0:
            return  # closed meanwhile (a forwarded DNS answer arriving after close())
        try:
            self.sock.sendto(data, destination)
        except (BlockingIOError, InterruptedError):
            self.stats["send_dropped"] += 1  # the send buffer is full
        except OSError as exc:
            self.log.debug("%s: datagram to %s:%d not sent: %s", self.name, *destination, exc)

    def close(self) -> None:
        """Stop reading and close the socket: the port is free when this returns."""
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
