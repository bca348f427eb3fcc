"""The TFTP engine's sockets: the request port, and the two sockets of each transfer.

Every transfer has its own port (RFC 1350 section 4: the server's TID) with two sockets on it:
one connect()ed to the client, which carries the transfer with plain send/recv (no address to
build or parse per packet, a cached route, ICMP "port unreachable" from a client that went away
reported as ECONNREFUSED), and one unconnected beside it (SO_REUSEPORT), to which the kernel
hands only datagrams from anyone else: RFC 1350 wants those answered with ERROR 5 while the
transfer goes on, and a connected socket alone would never see them.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

# Linux constants Python 3.11's socket module lacks (linux/in.h).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IP_MTU = getattr(socket, "IP_MTU", 14)
PKTINFO = struct.Struct("=i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_EADDRINUSE = 98


class TransferSockets(NamedTuple):
    sock: socket.socket  # connected to the client
    stray: socket.socket  # the same port, unconnected: gets datagrams from anyone else
    mtu: int | None  # the route's MTU towards the client


def open_listener(listen_ip: str, port: int, interface: str | None) -> socket.socket:
    """The request port, non-blocking, reporting each request's local address (IP_PKTINFO)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        if interface:
            # Only machines on the lab interface may fetch boot files.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        # No SO_REUSEADDR: with another TFTP server (tftpd-hpa, dnsmasq) on the port, fail
        # here instead of sharing the port and losing half the requests to it.
        sock.bind((listen_ip, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = (
            " (another TFTP server, e.g. tftpd-hpa or dnsmasq, is running?)"
            if exc.errno == _EADDRINUSE
            else ""
        )
        raise OSError(exc.errno, f"TFTP cannot listen on {listen_ip}:{port}: {exc}{hint}") from exc
    return sock


def pktinfo_local_ip(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    """The local address a request was sent to (ip(7) IP_PKTINFO ipi_spec_dst).

    Replies must come from it: a client checks that the answer comes from the server it asked,
    and an appliance may have several addresses on the lab interface."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= PKTINFO.size:
            _, spec_dst, _ = PKTINFO.unpack_from(data)
            return socket.inet_ntoa(spec_dst)
    return None


def reply_socket(local_ip: str, interface: str | None) -> socket.socket:
    """A socket for one client: a new port (RFC 1350 TID) on the address it asked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind((local_ip, 0))
    except OSError:
        sock.close()
        raise
    return sock


def transfer_sockets(
    local_ip: str, client: tuple[str, int], interface: str | None
) -> TransferSockets:
    """The connected socket of a transfer, its stray catcher on the same port, and the
    route's MTU towards the client (IP_MTU needs a connected socket)."""
    sock = reply_socket(local_ip, interface)  # bound without SO_REUSEPORT: a port nobody has
    try:
        # Only now may a second socket share the port, and only one of this user's.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        stray = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    except BaseException:
        sock.close()
        raise
    try:
        stray.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if interface:
            stray.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        stray.bind(sock.getsockname())
        stray.setblocking(False)
        # connect() only after the stray socket made the port a SO_REUSEPORT group: connecting
        # a socket of a group marks the group "has connections", and only then does a kernel
        # before 6.13 (trixie's 6.12, the appliance's) weigh the connected socket's better
        # match instead of handing the client's ACKs to the group (the stray socket), which
        # answered every transfer's first ACK with ERROR 5. 6.13+ finds connected UDP sockets
        # by their 4-tuple first, so the order did not matter on newer hosts.
        sock.connect(client)
        mtu: int | None = sock.getsockopt(socket.IPPROTO_IP, _IP_MTU)
    except BaseException:
        stray.close()
        sock.close()
        raise
    return TransferSockets(sock, stray, mtu)
