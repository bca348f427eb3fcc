#!/usr/bin/env python3
"""Forge DHCP client messages for the lease-holder tests (run inside a network namespace).

Independent of pixiebox's codec, like pxeclient.py (whose capture it reuses): a host on the lab
LAN can put any chaddr and client identifier in a message, and this is how.

    dhcpforge.py decline --mac M --requested-ip A --server-id S [--client-id HEX]
    dhcpforge.py release --mac M --ciaddr A [--server-id S] [--client-id HEX]
    dhcpforge.py lease   --mac M [--client-id HEX]       DISCOVER, then REQUEST the offer
    dhcpforge.py renew   --mac M --ciaddr A [--client-id HEX]

Every message is a broadcast frame (Ethernet source: --ether-src, by default the interface's own
MAC, as a host that forges only the DHCP fields sends it) from ciaddr (else 0.0.0.0):68 to
255.255.255.255:67. ``renew`` is a REQUEST with ciaddr and no server identifier (RFC 2131 4.3.2
REBINDING), which the server ACKs or NAKs. The BOOTREPLYs with the message's xid are captured for
--timeout seconds and printed as one JSON object: {"replies": [...]}, each in pxeclient's form.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import struct
import sys
from typing import Any

from pxeclient import MAGIC, Collector  # also quiets scapy and sets its conf
from scapy.arch import get_if_hwaddr
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.sendrecv import sendp

DISCOVER, OFFER, REQUEST, DECLINE, RELEASE = 1, 2, 3, 4, 7
ZERO = "0.0.0.0"


def option(code: int, value: bytes) -> bytes:
    return bytes([code, len(value)]) + value


def message(
    kind: int,
    mac: str,
    *,
    xid: int,
    ciaddr: str = ZERO,
    requested_ip: str | None = None,
    server_id: str | None = None,
    client_id: bytes | None = None,
) -> bytes:
    chaddr = bytes.fromhex(mac.replace(":", ""))
    header = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1, 1, 6, 0, xid, 0, 0x8000,  # BOOTREQUEST, Ethernet, broadcast flag
        ipaddress.IPv4Address(ciaddr).packed, bytes(4), bytes(4), bytes(4),
        chaddr.ljust(16, b"\0"), bytes(64), bytes(128),
    )  # fmt: skip
    options = [option(53, bytes([kind]))]
    if requested_ip is not None:
        options.append(option(50, ipaddress.IPv4Address(requested_ip).packed))
    if server_id is not None:
        options.append(option(54, ipaddress.IPv4Address(server_id).packed))
    if client_id is not None:
        options.append(option(61, client_id))
    options.append(option(55, bytes([1, 3, 6, 15, 51, 54])))
    return (header + MAGIC + b"".join(options) + b"\xff").ljust(300, b"\0")


def exchange(args: argparse.Namespace, payload: bytes, xid: int, src: str) -> list[dict[str, Any]]:
    frame = (
        Ether(src=args.ether_src, dst="ff:ff:ff:ff:ff:ff")
        / IP(src=src, dst="255.255.255.255", ttl=64)
        / UDP(sport=68, dport=67)
        / Raw(payload)
    )
    with Collector(args.iface, xid, args.timeout) as collector:
        sendp(frame, iface=args.iface, verbose=False)
        collector.wait()
    return collector.replies


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    xid = random.Random(os.urandom(8)).getrandbits(32)
    cid = bytes.fromhex(args.client_id) if args.client_id is not None else None
    mac = args.mac
    if args.mode == "decline":
        payload = message(DECLINE, mac, xid=xid, client_id=cid, requested_ip=args.requested_ip,
                          server_id=args.server_id)  # fmt: skip
        return exchange(args, payload, xid, ZERO)
    if args.mode == "release":
        payload = message(RELEASE, mac, xid=xid, client_id=cid, ciaddr=args.ciaddr,
                          server_id=args.server_id)  # fmt: skip
        return exchange(args, payload, xid, args.ciaddr)
    if args.mode == "renew":
        payload = message(REQUEST, mac, xid=xid, client_id=cid, ciaddr=args.ciaddr)
        return exchange(args, payload, xid, args.ciaddr)
    replies = exchange(args, message(DISCOVER, mac, xid=xid, client_id=cid), xid, ZERO)
    offers = [r for r in replies if r["message_type"] == OFFER]
    if not offers:
        return replies
    offer = offers[0]
    server = str(ipaddress.IPv4Address(bytes.fromhex(offer["options"]["54"])))
    request = message(REQUEST, mac, xid=xid, client_id=cid, requested_ip=offer["yiaddr"],
                      server_id=server)  # fmt: skip
    return replies + exchange(args, request, xid, ZERO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=["decline", "release", "lease", "renew"])
    parser.add_argument("--iface", default="eth0")
    parser.add_argument("--mac", required=True, help="chaddr")
    parser.add_argument("--ether-src", help="Ethernet source (default: the interface's MAC)")
    parser.add_argument("--client-id", help="option 61 as hex")
    parser.add_argument("--ciaddr", default=ZERO)
    parser.add_argument("--requested-ip")
    parser.add_argument("--server-id")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.ether_src is None:
        args.ether_src = get_if_hwaddr(args.iface)
    if args.mode == "decline" and not (args.requested_ip and args.server_id):
        parser.error("decline needs --requested-ip and --server-id (RFC 2131 4.3.3)")
    if args.mode in ("release", "renew") and args.ciaddr == ZERO:
        parser.error(f"{args.mode} needs --ciaddr")
    json.dump({"replies": run(args)}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
