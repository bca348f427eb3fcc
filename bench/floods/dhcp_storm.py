"""A DHCP storm: PXE DHCPDISCOVERs from many random MACs, each MAC once.

Every MAC a DHCP server has not seen is a new client to remember; a server that keeps a record
(and an event log) for each grows without bound, and one that lists them all to a dashboard
pays for that on the loop that answers DHCP (issue 13: 20,000 MACs, 20,066 machine rows).

    python3 bench/floods/dhcp_storm.py --iface eth0 --count 20000 --rate 2000

Each DISCOVER is a broadcast frame from 0.0.0.0:68 to 255.255.255.255:67 with a random locally
administered unicast MAC in chaddr (and, unless --ether-src own, as the Ethernet source, as a
forger would), the options of a PXE ROM (53, 55, 57, 60 PXEClient, 93 --arch, 94, 97 a random
UUID), a fresh xid. BOOTREPLYs with the storm's xids are counted while it runs and for
--settle seconds after: `offers` (message type OFFER; a proxy DHCP server answers PXE clients
with those) and `replies` (all of them).

Built by hand here, independent of pixiebox's codec (like tests/pxeclient.py). Bounded in
count (--count <= 100,000) and time (--max-seconds); nothing but DISCOVERs is sent. Prints
one JSON object: sent, send_errors, offers, replies, seconds, rate (DISCOVERs a second
achieved). Needs a raw socket (root in a network namespace); standard library only.
"""

from __future__ import annotations

import argparse
import json
import random
import select
import socket
import struct
import sys
import time

MAX_COUNT = 100_000
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
MAGIC = b"\x63\x82\x53\x63"
DISCOVER, OFFER = 1, 2
# A PXE 2.1 ROM's parameter request list (option 55).
PRL = bytes([1, 2, 3, 4, 5, 6, 11, 12, 13, 15, 16, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50,
             51, 54, 58, 59, 60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135])  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--iface", default="eth0", help="the interface to send on")
    parser.add_argument("--count", type=int, default=20_000, help=f"DISCOVERs (<= {MAX_COUNT})")
    parser.add_argument(
        "--rate", type=float, default=2000.0, help="DISCOVERs a second (0: no pause)"
    )
    parser.add_argument("--arch", type=int, default=0, help="option 93 (0: BIOS, 7: x86-64 UEFI)")
    parser.add_argument(
        "--ether-src", choices=("random", "own"), default="random",
        help="Ethernet source: the forged MAC (default) or the interface's own",
    )  # fmt: skip
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to count late replies")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop sending after this")
    parser.add_argument("--seed", type=int, help="for the same MACs and xids again")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= MAX_COUNT:
        parser.error(f"--count must be from 1 to {MAX_COUNT}")
    if args.rate < 0 or args.max_seconds <= 0 or not 0 <= args.settle <= 60:
        parser.error("--rate >= 0, --max-seconds > 0 and --settle from 0 to 60")
    if not 0 <= args.arch <= 0xFFFF:
        parser.error("--arch must be from 0 to 65535")
    return args


def random_macs(rng: random.Random, count: int) -> list[bytes]:
    """`count` distinct locally administered unicast MACs (never a real vendor's)."""
    seen: set[bytes] = set()
    while len(seen) < count:
        raw = bytearray(rng.randbytes(6))
        raw[0] = (raw[0] & 0xFC) | 0x02
        seen.add(bytes(raw))
    return list(seen)


def _option(code: int, value: bytes) -> bytes:
    return bytes([code, len(value)]) + value


def discover(mac: bytes, xid: int, arch: int, uuid: bytes) -> bytes:
    """The BOOTP/DHCP payload of one PXE DHCPDISCOVER (RFC 2131, RFC 4578)."""
    header = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1, 1, 6, 0, xid, 0, 0x8000,  # BOOTREQUEST, Ethernet, broadcast flag
        bytes(4), bytes(4), bytes(4), bytes(4), mac.ljust(16, b"\0"), bytes(64), bytes(128),
    )  # fmt: skip
    options = b"".join((
        _option(53, bytes([DISCOVER])),
        _option(57, (1260).to_bytes(2, "big")),
        _option(55, PRL),
        _option(60, f"PXEClient:Arch:{arch:05d}:UNDI:002001".encode()),
        _option(93, arch.to_bytes(2, "big")),
        _option(94, bytes([1, 2, 1])),
        _option(97, b"\0" + uuid),
    ))  # fmt: skip
    return header + MAGIC + options + b"\xff"


def _checksum(data: bytes) -> int:
    total = sum(int.from_bytes(data[at : at + 2], "big") for at in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frame(ether_src: bytes, payload: bytes) -> bytes:
    """Ethernet broadcast, IPv4 0.0.0.0 → 255.255.255.255, UDP 68 → 67 (no UDP checksum:
    RFC 768 allows 0 over IPv4)."""
    udp = struct.pack("!HHHH", 68, 67, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes(4), b"\xff" * 4)  # fmt: skip
    ip = ip[:10] + _checksum(ip).to_bytes(2, "big") + ip[12:]
    return b"\xff" * 6 + ether_src + ETH_P_IP.to_bytes(2, "big") + ip + udp


def reply_of(data: bytes, xids: set[int]) -> tuple[int, int] | None:
    """(xid, DHCP message type) of a BOOTREPLY to one of `xids` in an Ethernet frame, else
    None (type 0 for a reply without option 53)."""
    if len(data) < 14 + 20 + 8 + 240 or data[12:14] != b"\x08\x00":
        return None
    ihl = (data[14] & 0x0F) * 4
    if data[14 + 9] != 17:
        return None
    udp = 14 + ihl
    if int.from_bytes(data[udp + 2 : udp + 4], "big") != 68:
        return None
    bootp = data[udp + 8 :]
    if len(bootp) < 240 or bootp[0] != 2 or bootp[236:240] != MAGIC:
        return None
    xid = int.from_bytes(bootp[4:8], "big")
    if xid not in xids:
        return None
    at = 240
    while at + 1 < len(bootp) and bootp[at] != 255:
        if bootp[at] == 0:
            at += 1
            continue
        length = bootp[at + 1]
        if bootp[at] == 53 and length == 1 and at + 2 < len(bootp):
            return xid, bootp[at + 2]
        at += 2 + length
    return xid, 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    macs = random_macs(rng, args.count)
    first_xid = rng.randrange(1 << 31)
    xids = {(first_xid + index) & 0xFFFFFFFF for index in range(args.count)}
    sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sender.bind((args.iface, 0))
    own = sender.getsockname()[4]
    listener = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    listener.bind((args.iface, 0))
    listener.setblocking(False)
    answered: dict[int, int] = {}  # xid → message type of its first reply
    replies = 0

    def drain(wait: float) -> None:
        nonlocal replies
        deadline = time.monotonic() + wait
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            ready, _, _ = select.select([listener], [], [], left)
            if not ready:
                return
            for _ in range(256):
                try:
                    data, address = listener.recvfrom(2048)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING:
                    continue
                reply = reply_of(data, xids)
                if reply is not None:
                    replies += 1
                    answered.setdefault(*reply)
            if time.monotonic() >= deadline:
                return

    sent = errors = 0
    start = time.monotonic()
    for index, mac in enumerate(macs):
        now = time.monotonic()
        if now - start > args.max_seconds:
            break
        if args.rate > 0:
            due = start + index / args.rate
            if due > now:
                drain(due - now)
        elif index % 64 == 0:
            drain(0.0)
        payload = discover(mac, (first_xid + index) & 0xFFFFFFFF, args.arch, rng.randbytes(16))
        try:
            sender.send(frame(mac if args.ether_src == "random" else own, payload))
            sent += 1
        except OSError:
            errors += 1  # a full send queue: counted, not retried (the rate is the test's)
    sending = time.monotonic() - start
    drain(args.settle)
    offers = sum(1 for kind in answered.values() if kind == OFFER)
    print(json.dumps({
        "sent": sent, "send_errors": errors, "offers": offers, "replies": replies,
        "seconds": round(time.monotonic() - start, 2),
        "rate": round(sent / sending, 1) if sending > 0 else None,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
