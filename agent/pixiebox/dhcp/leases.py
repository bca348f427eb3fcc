"""Who holds which address: reservations from lab.toml, leases on disk, and an optional pool.

Kept in memory for the hot path and written through to the state store on every change, so a
restarted agent knows every address it handed out and never gives a leased one to another MAC
(the DHCP server commits them, `flush`, before it sends the ACKs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from ipaddress import IPv4Address

from pixiebox.config import IPRange, MachineSection
from pixiebox.store.state import Lease, StateStore

#: How long an offered address is held for the client that was offered it (RFC 2131 4.3.1
#: "the server SHOULD reserve the offered address"), so two clients discovering at once never
#: get the same one.
OFFER_HOLD = 30.0
#: How long an address a client DECLINEd (someone else uses it, RFC 2131 4.3.3) stays out of use.
DECLINE_QUARANTINE = 600.0


@dataclass(slots=True)
class _Offer:
    mac: str
    until: float


class AddressBook:
    def __init__(self, store: StateStore, pool: IPRange | None) -> None:
        self._store = store
        self.pool = pool
        self._by_ip: dict[IPv4Address, Lease] = {}
        self._by_mac: dict[str, Lease] = {}
        self._offers: dict[IPv4Address, _Offer] = {}
        for lease in sorted(store.leases(), key=lambda lease: lease.expires):
            self._by_ip[lease.ip] = lease
            if lease.mac:
                self._by_mac[lease.mac] = lease
        # Never-leased pool addresses, in order: handed out before reusing expired ones, which
        # keeps a returning machine's old address free for it as long as possible.
        self._fresh: dict[IPv4Address, None] = dict.fromkeys(
            ip for ip in (pool or ()) if ip not in self._by_ip
        )
        self._reserved: set[IPv4Address] = set()

    def set_reservations(self, machines: list[MachineSection]) -> None:
        self._reserved = {m.ip for m in machines if m.ip is not None}

    def held(self) -> set[IPv4Address]:
        """Addresses bound or quarantined now (not to be reserved for another machine)."""
        now = time.time()
        return {ip for ip, lease in self._by_ip.items() if lease.expires > now}

    def lease_of(self, mac: str) -> Lease | None:
        return self._by_mac.get(mac)

    def _available(self, ip: IPv4Address, mac: str, now: float) -> bool:
        if self.pool is None or ip not in self.pool or ip in self._reserved:
            return False
        lease = self._by_ip.get(ip)
        if (
            lease is not None
            and lease.mac != mac
            and lease.expires > now
            and lease.state in ("bound", "declined")
        ):
            return False
        offer = self._offers.get(ip)
        return offer is None or offer.mac == mac or offer.until <= now

    def _pick(self, mac: str, requested: IPv4Address | None, now: float) -> IPv4Address | None:
        previous = self._by_mac.get(mac)
        if previous is not None and self._available(previous.ip, mac, now):
            return previous.ip
        if requested is not None and self._available(requested, mac, now):
            return requested
        while self._fresh:
            ip = next(iter(self._fresh))
            del self._fresh[ip]
            if self._available(ip, mac, now):
                return ip
        reusable = [lease for lease in self._by_ip.values() if self._available(lease.ip, mac, now)]
        return min(reusable, key=lambda lease: lease.expires).ip if reusable else None

    def offer(
        self,
        mac: str,
        machine: MachineSection | None,
        requested: IPv4Address | None,
        now: float | None = None,
    ) -> IPv4Address | None:
        """The address to offer `mac`: its reservation, else (with a pool) its previous
        address, the one it asks for, a fresh one, or the longest-expired one."""
        if machine is not None and machine.ip is not None:
            return machine.ip
        now = time.time() if now is None else now
        ip = self._pick(mac, requested, now)
        if ip is not None:
            self._offers[ip] = _Offer(mac, now + OFFER_HOLD)
        return ip

    def may_hold(self, mac: str, machine: MachineSection | None, ip: IPv4Address) -> bool:
        """Whether `mac` may have `ip` (decides ACK or NAK for a REQUEST)."""
        if machine is not None and machine.ip is not None:
            return ip == machine.ip
        return self._available(ip, mac, time.time())

    def bind(self, mac: str, ip: IPv4Address, lease_time: int) -> Lease:
        now = time.time()
        previous = self._by_mac.get(mac)
        if previous is not None and previous.ip != ip and previous.state == "bound":
            self._save(Lease(previous.ip, mac, now, "released"))
        lease = Lease(ip, mac, now + lease_time, "bound")
        self._save(lease)
        self._offers.pop(ip, None)
        self._fresh.pop(ip, None)
        return lease

    def release(self, mac: str, ip: IPv4Address) -> bool:
        lease = self._by_ip.get(ip)
        if lease is None or lease.mac != mac or lease.state != "bound":
            return False
        self._save(Lease(ip, mac, time.time(), "released"))
        return True

    def decline(self, mac: str, ip: IPv4Address) -> None:
        self._offers.pop(ip, None)
        self._fresh.pop(ip, None)
        self._save(Lease(ip, "", time.time() + DECLINE_QUARANTINE, "declined"))
        self._by_mac.pop(mac, None)

    def flush(self) -> None:
        """Commit the leases saved in this loop turn (see state.StateStore)."""
        self._store.flush()

    def _save(self, lease: Lease) -> None:
        self._store.save_lease(lease)
        self._by_ip[lease.ip] = lease
        if lease.mac:
            self._by_mac[lease.mac] = lease
