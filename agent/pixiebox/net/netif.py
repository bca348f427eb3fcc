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
    except (OSError, ValueError):  # ValueError: a NUL in the name (lab.toml: "eth\u0000")
        return None
    mac: str | None = None
    addresses: list[IPv4Interface] = []
    for address in psutil.net_if_addrs().get(name, []):
        if address.family == socket.AF_INET and address.netmask:
            addresses.append(IPv4Interface(f"{address.address}/{address.netmask}"))
        elif address.family == psutil.AF_LINK and address.address:
            mac = address.address.lower()
    return InterfaceInfo(name, index, mac, tuple(addresses))


#: /proc/net/arp's flag for a resolved entry (ATF_COM, linux/if_arp.h). An entry still being
#: resolved, or whose resolution failed, lacks it and shows the all-zero MAC.
_ATF_COM = 0x2
_NO_MAC = "00:00:00:00:00:00"


def neighbour_mac(
    ip: str, arp_table: Path = Path("/proc/net/arp"), *, device: str | None = None
) -> str | None:
    """The MAC the kernel last saw at `ip` on a directly attached network (the ARP cache).

    In proxy mode the router, not us, hands out addresses; a machine fetching a file over TFTP
    is then known to us only by its address, and the ARP cache is where its MAC is. `device`
    counts only entries on that interface: an address on another network the appliance is on
    (a management LAN) is not a machine of the lab, however its MAC looks."""
    try:
        text = arp_table.read_text()
    except OSError:
        return None
    return arp_lookup(text, ip, device)


def arp_lookup(text: str, ip: str, device: str | None = None) -> str | None:
    """The MAC of `ip` in the text of /proc/net/arp, complete entries only, on `device` if
    given. Columns: IP address, HW type, Flags, HW address, Mask, Device."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 6 or fields[0] != ip:
            continue
        if device is not None and fields[5] != device:
            continue
        try:
            flags = int(fields[2], 16)
        except ValueError:
            continue
        mac = fields[3].lower()
        if flags & _ATF_COM and mac != _NO_MAC:
            return mac
    return None
