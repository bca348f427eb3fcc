"""Run inside the client namespace: send PXE DHCPDISCOVERs every 20 ms until an OFFER arrives,
then print the CLOCK_MONOTONIC time it arrived (the clock is the same in every network
namespace, so the harness can subtract the time it started the server).

    python bench/probe.py IFACE TIMEOUT
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import time

DISCOVER, OFFER = 1, 2


def discover(mac: bytes, xid: int) -> bytes:
    header = struct.pack(
        "!BBBBIHHIIII16s64s128s",
        1,
        1,
        6,
        0,
        xid,
        0,
        0x8000,
        0,
        0,
        0,
        0,
        mac.ljust(16, b"\0"),
        b"",
        b"",
    )
    vendor = b"PXEClient:Arch:00000:UNDI:002001"
    options = (
        b"\x63\x82\x53\x63"
        + bytes([53, 1, DISCOVER])
        + bytes([93, 2, 0, 0])  # client arch 0: BIOS
        + bytes([94, 3, 1, 2, 1])  # UNDI 2.1
        + bytes([60, len(vendor)])
        + vendor
        + bytes([255])
    )
    return (header + options).ljust(300, b"\0")


def main() -> int:
    iface, timeout = sys.argv[1], float(sys.argv[2])
    mac = bytes([0x02, 0xBE, 0xFF]) + os.urandom(3)
    xid = int.from_bytes(os.urandom(4), "big")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    sock.bind(("0.0.0.0", 68))
    packet = discover(mac, xid)
    deadline = time.monotonic() + timeout
    print("ready", flush=True)
    while time.monotonic() < deadline:
        sock.sendto(packet, ("255.255.255.255", 67))
        ready, _, _ = select.select([sock], [], [], 0.02)
        while ready:
            data = sock.recv(4096)
            arrived = time.monotonic()
            if len(data) > 240 and data[0] == 2 and data[4:8] == xid.to_bytes(4, "big"):
                print(f"offer {arrived:.6f}", flush=True)
                return 0
            ready, _, _ = select.select([sock], [], [], 0)
    print("timeout", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
