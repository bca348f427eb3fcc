#!/usr/bin/env python3
"""Minimal PXE firmware client for integration tests (run inside a network namespace).

Independent of pixiebox's own DHCP codec: BOOTP/DHCP messages are built and parsed
here by hand; scapy is only used for raw L2 send/capture and Ether/IP/UDP framing.

    pxeclient.py discover    --mac M --arch N [--uuid HEX] [--user-class S] ...
    pxeclient.py request4011 --mac M --arch N --client-ip A --server-ip B [--boot-item T] ...

``discover`` broadcasts one DHCPDISCOVER from 0.0.0.0:68 to 255.255.255.255:67 (the
namespace needs no address).  ``request4011`` sends one DHCPREQUEST with ciaddr set,
unicast from client-ip:src-port to server-ip:4011 through a plain UDP socket (the
address must be configured on the interface).  Both then capture every BOOTREPLY
carrying the request's xid for --timeout seconds and print, on stdout, one JSON
object: {"xid": int, "replies": [...]}, each reply with its L2/L3/L4 addresses,
BOOTP header fields and options as {code: hex}.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import random
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from typing import Any

logging.getLogger("scapy").setLevel(logging.ERROR)

from scapy.config import conf  # noqa: E402
from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Packet, Raw  # noqa: E402
from scapy.sendrecv import AsyncSniffer, sendp  # noqa: E402

conf.checkIPaddr = False
conf.verb = 0

MAGIC = b"\x63\x82\x53\x63"
BOOTP_FIXED = 236
# Parameter request list of a typical PXE 2.1 ROM (Intel), option 55.
DEFAULT_PRL = [*range(1, 7), 11, 12, 13, *range(15, 19), 22, 23, 28, *range(40, 44)]
DEFAULT_PRL += [50, 51, 54, 58, 59, 60, 66, 67, 97, *range(128, 136)]


def _opt(code: int, value: bytes) -> bytes:
    if len(value) > 255:
        raise ValueError(f"option {code} too long")
    return bytes([code, len(value)]) + value


def build_bootrequest(
    *,
    message_type: int,
    xid: int,
    mac: bytes,
    arch: int,
    vendor_class: str,
    uuid: bytes | None,
    user_class: str | None,
    ciaddr: str = "0.0.0.0",
    broadcast: bool = True,
    prl: list[int] | None = None,
    extra_options: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    header = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1,  # op BOOTREQUEST
        1,  # htype ethernet
        6,  # hlen
        0,  # hops
        xid,
        4,  # secs
        0x8000 if broadcast else 0,
        ipaddress.IPv4Address(ciaddr).packed,
        bytes(4),
        bytes(4),
        bytes(4),
        mac.ljust(16, b"\0"),
        bytes(64),
        bytes(128),
    )
    options = [
        _opt(53, bytes([message_type])),
        _opt(55, bytes(DEFAULT_PRL if prl is None else prl)),
        _opt(57, struct.pack("!H", 1464)),
        _opt(60, vendor_class.encode()),
        _opt(93, struct.pack("!H", arch)),
        _opt(94, b"\x01\x02\x01"),  # UNDI 2.1
    ]
    if uuid is not None:
        options.append(_opt(97, b"\x00" + uuid))
    if user_class is not None:
        # Raw string, the way iPXE sends it (not RFC 3004 length-prefixed).
        options.append(_opt(77, user_class.encode()))
    options += [_opt(code, value) for code, value in extra_options]
    msg = header + MAGIC + b"".join(options) + b"\xff"
    return msg.ljust(300, b"\0")  # minimum BOOTP size


def _parse_options(data: bytes, into: dict[int, bytes]) -> None:
    i = 0
    while i < len(data):
        code = data[i]
        if code == 0:
            i += 1
            continue
        if code == 255 or i + 1 >= len(data):
            break
        length = data[i + 1]
        value = data[i + 2 : i + 2 + length]
        into[code] = into.get(code, b"") + value  # RFC 3396 concatenation
        i += 2 + length


def _cstr(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("latin-1")


def parse_bootreply(payload: bytes) -> dict[str, Any] | None:
    if len(payload) < BOOTP_FIXED or payload[0] != 2:
        return None
    xid, _secs, flags = struct.unpack_from("!IHH", payload, 4)
    ciaddr, yiaddr, siaddr, giaddr = (payload[i : i + 4] for i in (12, 16, 20, 24))
    sname, file = payload[44:108], payload[108:BOOTP_FIXED]
    options: dict[int, bytes] = {}
    if payload[BOOTP_FIXED : BOOTP_FIXED + 4] == MAGIC:
        _parse_options(payload[BOOTP_FIXED + 4 :], options)
    overload = options[52][0] if options.get(52) else 0
    if overload & 1:
        _parse_options(file, options)
        file = b""
    if overload & 2:
        _parse_options(sname, options)
        sname = b""
    msgtype = options.get(53, b"")
    return {
        "xid": xid,
        "flags": flags,
        "ciaddr": str(ipaddress.IPv4Address(ciaddr)),
        "yiaddr": str(ipaddress.IPv4Address(yiaddr)),
        "siaddr": str(ipaddress.IPv4Address(siaddr)),
        "giaddr": str(ipaddress.IPv4Address(giaddr)),
        "sname": _cstr(sname),
        "file": _cstr(file),
        "options": {str(code): value.hex() for code, value in sorted(options.items())},
        "message_type": msgtype[0] if msgtype else 0,
    }


class Collector:
    """Captures BOOTREPLYs with a given xid on an interface for a fixed time."""

    def __init__(self, iface: str, xid: int, timeout: float) -> None:
        self.xid = xid
        self.timeout = timeout
        self.replies: list[dict[str, Any]] = []
        self._started = threading.Event()
        self._sniffer = AsyncSniffer(
            iface=iface,
            store=False,
            prn=self._on_packet,
            started_callback=self._started.set,
        )

    def _on_packet(self, pkt: Packet) -> None:
        if Ether not in pkt or IP not in pkt or UDP not in pkt:
            return
        payload = bytes(pkt[UDP].payload)
        reply = parse_bootreply(payload)
        if reply is None or reply["xid"] != self.xid:
            return
        reply.update(
            src_mac=pkt[Ether].src.lower(),
            dst_mac=pkt[Ether].dst.lower(),
            src_ip=pkt[IP].src,
            dst_ip=pkt[IP].dst,
            src_port=int(pkt[UDP].sport),
            dst_port=int(pkt[UDP].dport),
        )
        self.replies.append(reply)

    def __enter__(self) -> Collector:
        self._sniffer.start()
        if not self._started.wait(10.0):
            raise RuntimeError("sniffer did not start")
        return self

    def wait(self) -> None:
        """Collect for ``timeout`` seconds, then stop the capture."""
        self._sniffer.join(self.timeout)  # returns after timeout: nothing stops it earlier
        if self._sniffer.running:
            self._sniffer.stop()

    def __exit__(self, *exc: object) -> None:
        if self._sniffer.running:
            self._sniffer.stop()


def _mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC {mac!r}")
    return raw


def _build_from_args(
    args: argparse.Namespace, xid: int, message_type: int, ciaddr: str, broadcast: bool
) -> bytes:
    extra: list[tuple[int, bytes]] = []
    for spec in args.option:
        code, _, value = spec.partition(":")
        extra.append((int(code), bytes.fromhex(value)))
    if args.boot_item:
        item_type, _, layer = args.boot_item.partition(":")
        # Option 43 with PXE_BOOT_ITEM (71): what a PXE ROM sends to a boot server.
        sub = struct.pack("!BBHH", 71, 4, int(item_type, 0), int(layer or "0", 0))
        extra.append((43, sub + b"\xff"))
    return build_bootrequest(
        message_type=message_type,
        xid=xid,
        mac=_mac_bytes(args.mac),
        arch=args.arch,
        vendor_class=args.vendor_class,
        uuid=bytes.fromhex(args.uuid) if args.uuid else None,
        user_class=args.user_class,
        ciaddr=ciaddr,
        broadcast=broadcast,
        prl=[int(c) for c in args.params.split(",") if c] if args.params is not None else None,
        extra_options=extra,
    )


def discover(args: argparse.Namespace, xid: int) -> list[dict[str, Any]]:
    msg = _build_from_args(args, xid, 1, "0.0.0.0", True)
    frame = (
        Ether(src=args.mac, dst="ff:ff:ff:ff:ff:ff")
        / IP(src="0.0.0.0", dst="255.255.255.255", ttl=64)
        / UDP(sport=68, dport=67)
        / Raw(msg)
    )
    with Collector(args.iface, xid, args.timeout) as collector:
        sendp(frame, iface=args.iface, verbose=False)
        collector.wait()
    return collector.replies


def request4011(args: argparse.Namespace, xid: int) -> list[dict[str, Any]]:
    msg = _build_from_args(args, xid, 3, args.client_ip, False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args.iface.encode())
        sock.bind((args.client_ip, args.src_port))
        with Collector(args.iface, xid, args.timeout) as collector:
            sock.sendto(msg, (args.server_ip, args.server_port))
            collector.wait()
    finally:
        sock.close()
    return collector.replies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=["discover", "request4011"])
    parser.add_argument("--iface", default="eth0")
    parser.add_argument("--mac", required=True)
    parser.add_argument("--arch", type=int, required=True)
    parser.add_argument("--uuid", help="16 bytes as hex (option 97)")
    parser.add_argument("--user-class", help="option 77, sent raw like iPXE")
    parser.add_argument("--vendor-class", help="option 60")
    parser.add_argument("--params", help="option 55 as comma-separated codes")
    parser.add_argument(
        "--option", action="append", default=[], help="extra option CODE:HEX (repeatable)"
    )
    parser.add_argument("--boot-item", help="TYPE[:LAYER]: option 43 PXE_BOOT_ITEM")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--xid", type=lambda s: int(s, 0))
    parser.add_argument("--client-ip")
    parser.add_argument("--server-ip")
    parser.add_argument("--server-port", type=int, default=4011)
    parser.add_argument("--src-port", type=int, default=68)
    args = parser.parse_args(argv)
    if args.vendor_class is None:
        args.vendor_class = f"PXEClient:Arch:{args.arch:05d}:UNDI:003016"
    if args.uuid and len(bytes.fromhex(args.uuid)) != 16:
        parser.error("--uuid must be 16 bytes")
    if args.mode == "request4011" and not (args.client_ip and args.server_ip):
        parser.error("request4011 needs --client-ip and --server-ip")
    xid = args.xid if args.xid is not None else random.Random(os.urandom(8)).getrandbits(32)
    replies = discover(args, xid) if args.mode == "discover" else request4011(args, xid)
    json.dump({"xid": xid, "replies": replies}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
