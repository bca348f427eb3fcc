"""How the agent knows that an address belongs to a MAC: typed evidence, with its source and time.

Metadata (secrets), DNS names, the machine a TFTP or syslog client is taken for, the phone-home:
all ask "who is at this address". The answer is only as good as what it rests on, so each piece
of knowledge says where it came from:

- `lease`: this agent granted `mac` a lease on `ip` (reservation or full mode);
- `dhcp-request`: a DHCP REQUEST from `mac` named `ip` (proxy mode: the router grants the
  lease, we overhear the broadcast, or a PXE ROM asks on port 4011 from its new address);
- `neighbour`: the kernel's neighbour (ARP) entry for `ip` on the lab's segment says `mac`;
- `phone-home`: the booted OS of a machine already bound to `ip` reported from it;
- `reservation`: lab.toml gives `mac` the fixed `ip`.

What a client merely *names* is not evidence: anyone can fetch /boot/<another mac>.ipxe or
pxelinux.cfg/01-<another mac>. The security rules (who gets a machine's secrets) weigh these
sources; this module only keeps them.

A leaf of the core: imports nothing of pixiebox.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address


class Source(StrEnum):
    """Where a piece of address evidence came from (the module docstring says what each means)."""

    LEASE = "lease"
    DHCP_REQUEST = "dhcp-request"
    NEIGHBOUR = "neighbour"
    PHONE_HOME = "phone-home"
    RESERVATION = "reservation"


@dataclass(frozen=True, slots=True)
class AddressEvidence:
    """`mac` is at `ip`, known from `source` at `time` (seconds since the epoch)."""

    mac: str
    ip: IPv4Address
    source: Source
    time: float


#: Addresses remembered at most. A proxy-mode agent overhears every DHCP REQUEST on the LAN and
#: a REQUEST may name any address, so the book is bounded; past this the oldest entry goes.
MAX_ADDRESSES = 65536


class EvidenceBook:
    """The latest evidence for each address; a MAC is at one address, its latest.

    In memory only: after a restart, lab.toml's reservations and the kernel's neighbour table
    answer until the machines' next DHCP requests. Used from the event loop only."""

    def __init__(self, clock: Callable[[], float] = time.time, limit: int = MAX_ADDRESSES) -> None:
        self._clock = clock
        self._limit = limit
        self._by_ip: dict[IPv4Address, AddressEvidence] = {}
        self._by_mac: dict[str, AddressEvidence] = {}

    def add(
        self, mac: str, ip: IPv4Address, source: Source, now: float | None = None
    ) -> AddressEvidence:
        """Note that `mac` is at `ip`; it replaces what was known about `ip`."""
        evidence = AddressEvidence(mac, ip, source, self._clock() if now is None else now)
        moved = self._by_mac.get(mac)
        if moved is not None and moved.ip != ip and self._by_ip.get(moved.ip) is moved:
            # One address per MAC: the lab interface of a machine has one, and the old one is
            # free for the next machine (who is there now must not be answered with `mac`).
            del self._by_ip[moved.ip]
        old = self._by_ip.pop(ip, None)
        if old is not None:
            self._forget_mac(old)
        elif len(self._by_ip) >= self._limit:
            self._forget_mac(self._by_ip.pop(next(iter(self._by_ip))))
        self._by_ip[ip] = evidence  # re-inserted: the dict's order is the order of updates
        self._by_mac[mac] = evidence
        return evidence

    def _forget_mac(self, old: AddressEvidence) -> None:
        if self._by_mac.get(old.mac) is old:
            del self._by_mac[old.mac]

    def now(self) -> float:
        """The book's clock (what `time` of its evidence is measured by)."""
        return self._clock()

    def at(self, ip: IPv4Address) -> AddressEvidence | None:
        """The latest evidence about who is at `ip`."""
        return self._by_ip.get(ip)

    def of(self, mac: str) -> AddressEvidence | None:
        """The latest evidence of where `mac` is."""
        return self._by_mac.get(mac)

    def latest(self) -> Iterator[AddressEvidence]:
        """Each MAC's latest address (one entry per MAC)."""
        return iter(self._by_mac.values())

    def __len__(self) -> int:
        return len(self._by_ip)
