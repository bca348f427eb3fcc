"""Is another DHCP server already answering on this segment?

Run before answering in reservation or full mode: two DHCP servers on one household LAN hand out
conflicting addresses and break it for everyone. We broadcast a DISCOVER the way a client does
and listen for offers on a packet socket, which also tells the other server's MAC (its offer may
be broadcast or unicast to our MAC, and may come from a host that has no route back to us).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from ipaddress import IPv4Address

from pixiebox.dhcp.codec import (
    BOOTREPLY,
    BOOTREQUEST,
    DecodeError,
    MessageType,
    Opt,
    Packet,
    decode,
    encode,
)

_ETH_P_IP = 0x0800
_PACKET_OUTGOING = 4
_IP_HEADER = struct.Struct("!BBHHHBBH4s4s")
_UDP_HEADER = struct.Struct("!HHHH")


@dataclass(frozen=True, slots=True)
class OtherServer:
    ip: IPv4Address
    mac: str
    offered: IPv4Address


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    checksum: int = ~total & 0xFFFF
    return checksum


def _discover_frame(mac: bytes, xid: int) -> bytes:
    packet = Packet(
        op=BOOTREQUEST,
        xid=xid,
        chaddr=mac,
        flags=0x8000,
        options={
            Opt.MESSAGE_TYPE: bytes((MessageType.DISCOVER,)),
            Opt.PARAMETER_REQUEST_LIST: bytes((1, 3, 6, 54)),
        },
    )
    payload = encode(packet)
    udp = _UDP_HEADER.pack(68, 67, 8 + len(payload), 0) + payload  # checksum 0: RFC 768 "none"
    ip = _IP_HEADER.pack(0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes(4), b"\xff" * 4)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return b"\xff" * 6 + mac + struct.pack("!H", _ETH_P_IP) + ip + udp


def _offer_in(frame: bytes, xid: int) -> OtherServer | None:
    if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[14 + 9] != 17:
        return None
    udp = 14 + ihl
    if struct.unpack_from("!H", frame, udp + 2)[0] != 68:
        return None
    try:
        packet = decode(frame[udp + 8 :])
        if packet.op != BOOTREPLY or packet.xid != xid:
            return None
        source = packet.server_id or IPv4Address(frame[14 + 12 : 14 + 16])
    except DecodeError:
        return None
    return OtherServer(source, frame[6:12].hex(":"), packet.yiaddr)


def find_other_dhcp_servers(interface: str, mac: str, listen: float) -> list[OtherServer]:
    """Every DHCP server that answers a DISCOVER on `interface` within `listen` seconds.

    Blocking; run it in a thread. Needs CAP_NET_RAW (the agent runs as root or with that cap)."""
    xid = int.from_bytes(os.urandom(4), "big")
    own_mac = bytes.fromhex(mac.replace(":", ""))
    found: dict[tuple[IPv4Address, str], OtherServer] = {}
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_IP)) as sock:
        sock.bind((interface, _ETH_P_IP))
        frame = _discover_frame(own_mac, xid)
        deadline = time.monotonic() + listen
        # Two DISCOVERs, like a real client retrying, in case the first one is lost.
        resend_at = time.monotonic() + listen / 2
        sock.send(frame)
        while (now := time.monotonic()) < deadline:
            if resend_at and now >= resend_at:
                sock.send(frame)
                resend_at = 0.0
            ready, _, _ = select.select([sock], [], [], min(0.1, deadline - now))
            if not ready:
                continue
            data, address = sock.recvfrom(4096)
            if address[2] == _PACKET_OUTGOING:
                continue
            other = _offer_in(data, xid)
            if other is not None:
                found.setdefault((other.ip, other.mac), other)
    return list(found.values())
