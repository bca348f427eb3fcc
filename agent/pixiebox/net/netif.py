"""What the appliance's own network interfaces look like (names, MACs, IPv4 addresses)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path

import psutil


@dataclass(frozen=True, slots=True)
class InterfaceInfo:
    name: str
    index: int
    mac: str | None
    addresses: tuple[IPv4Interface, ...]

    @property
    def primary(self) -> IPv4Interface | None:
        return self.addresses[0] if self.addresses else None


def interface_names() -> list[str]:
    return sorted(name for _, name in socket.if_nameindex())


def interface_info(name: str) -> InterfaceInfo | None:
    """The interface called `name` in this network namespace, or None if there is none."""
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        return None
    mac: str | None = None
    addresses: list[IPv4Interface] = []
    for address in psutil.net_if_addrs().get(name, []):
        if address.family == socket.AF_INET and address.netmask:
            addresses.append(IPv4Interface(f"{address.address}/{address.netmask}"))
        elif address.family == psutil.AF_LINK and address.address:
            mac = address.address.lower()
    return InterfaceInfo(name, index, mac, tuple(addresses))


def neighbour_mac(ip: str, arp_table: Path = Path("/proc/net/arp")) -> str | None:
    """The MAC the kernel last saw at `ip` on a directly attached network (the ARP cache).

    In proxy mode the router, not us, hands out addresses; a machine fetching a file over TFTP
    is then known to us only by its address, and the ARP cache is where its MAC is."""
    try:
        lines = arp_table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # IP address, HW type, Flags, HW address, Mask, Device; flags 0x0 = incomplete entry.
        if len(fields) >= 4 and fields[0] == ip and fields[2] != "0x0":
            return fields[3].lower()
    return None
