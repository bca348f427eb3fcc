"""Who holds which address: reservations from lab.toml, leases on disk, and an optional pool.

Kept in memory for the hot path and written through to the state store on every change, so a
restarted agent knows every address it handed out and never gives a leased one to another MAC
(the DHCP server commits them, `flush`, before it sends the ACKs).

A lease changes hands only by its holder's word. A DHCPDECLINE (RFC 2131 4.3.3: "the client
has discovered some other means that the suggested network address is already in use") and a
DHCPRELEASE (4.3.4: "the client relinquishes its lease") are messages about one client's own
lease, and DHCP carries no proof of who sent them: anyone on the segment can put any chaddr in
a packet. So they are honoured only when they name the lease's holder: the chaddr it was bound
to and, when the holder sent a client identifier (option 61, which RFC 2131 4.2 makes the
lease's key when present), that same identifier. Anything else leaves the lease as it is; before
this rule one spoofed DECLINE took a machine's address away and its next renewal was NAKed.

Declined addresses are quarantined for a while and bounded in number (DECLINE_QUARANTINE,
DECLINE_LIMIT), so the declines of a misbehaving segment cannot keep a pool, the table or the
log growing forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from pixiebox.config import IPRange, MachineSection
from pixiebox.store.state import Lease, StateStore

#: How long an offered address is held for the client that was offered it (RFC 2131 4.3.1
#: "the server SHOULD reserve the offered address"), so two clients discovering at once never
#: get the same one.
OFFER_HOLD = 30.0
#: How long an address a client DECLINEd (another host answered its ARP probe, RFC 2131 4.3.3)
#: stays out of use: 10 minutes, dnsmasq's choice (DECLINE_BACKOFF). RFC 2131 names no time.
#: Not the lease time: that says how long a client may keep an address, nothing about how long
#: the host squatting on it stays (1 h by default, days in some labs, which would take a pool
#: address out of use for that long on one client's word). The squatter is usually a device with
#: a static address that stays; offering the address again every 10 minutes costs the next
#: client one DECLINE and its ARP probe (seconds) if it is still there, and gets the address
#: back into use soon after it left.
DECLINE_QUARANTINE = 600.0
#: At most this many addresses are quarantined at once, and at most a quarter of the pool
#: (decline_limit): a segment full of conflicting hosts (or one client declining whatever it is
#: offered) then keeps three quarters of the pool offerable, and the quarantine table stays
#: small. When the bound is reached the oldest quarantine ends first: the address declined
#: longest ago is the likeliest to be free by now. 64 is far more genuine conflicts than a lab
#: segment has; without a pool (reservation mode) only reserved addresses can be declined.
DECLINE_LIMIT = 64


def decline_limit(pool: IPRange | None) -> int:
    """How many addresses may be quarantined at once with this pool (see DECLINE_LIMIT)."""
    if pool is None:
        return DECLINE_LIMIT
    return min(DECLINE_LIMIT, max(1, len(pool) // 4))


@dataclass(slots=True)
class _Offer:
    mac: str
    until: float


class AddressBook:
    """`quarantine` and `limit` (how long a declined address stays out of use, and how many may
    be at once) default to DECLINE_QUARANTINE and decline_limit(pool); `clock` to time.time.
    Tests pass their own."""

    def __init__(
        self,
        store: StateStore,
        pool: IPRange | None,
        *,
        quarantine: float | None = None,
        limit: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.pool = pool
        self.quarantine = DECLINE_QUARANTINE if quarantine is None else quarantine
        self.limit = decline_limit(pool) if limit is None else max(1, limit)
        self._clock = clock
        self._by_ip: dict[IPv4Address, Lease] = {}
        self._by_mac: dict[str, Lease] = {}
        self._offers: dict[IPv4Address, _Offer] = {}
        #: Quarantined addresses and when their quarantine ends, oldest decline first.
        self._quarantined: dict[IPv4Address, float] = {}
        now = clock()
        for lease in sorted(store.leases(), key=lambda lease: lease.expires):
            if lease.state == "declined":
                if lease.expires <= now:
                    store.delete_lease(lease.ip)  # ran out while the agent was stopped
                    continue
                self._quarantined[lease.ip] = lease.expires
            self._by_ip[lease.ip] = lease
            if lease.mac:
                self._by_mac[lease.mac] = lease
        # Never-leased pool addresses, in order: handed out before reusing expired ones, which
        # keeps a returning machine's old address free for it as long as possible.
        self._fresh: dict[IPv4Address, None] = dict.fromkeys(
            ip for ip in (pool or ()) if ip not in self._by_ip
        )
        self._reserved: set[IPv4Address] = set()
        self._make_room(now, self.limit)  # a database from before the bound, or a smaller pool

    def set_reservations(self, machines: list[MachineSection]) -> None:
        self._reserved = {m.ip for m in machines if m.ip is not None}

    def held(self) -> set[IPv4Address]:
        """Addresses bound or quarantined now (not to be reserved for another machine)."""
        now = self._clock()
        return {ip for ip, lease in self._by_ip.items() if lease.expires > now}

    def lease_of(self, mac: str) -> Lease | None:
        return self._by_mac.get(mac)

    def lease_at(self, ip: IPv4Address) -> Lease | None:
        return self._by_ip.get(ip)

    def quarantined(self) -> dict[IPv4Address, float]:
        """Addresses out of use after a DECLINE, and when each is free again."""
        now = self._clock()
        return {ip: until for ip, until in self._quarantined.items() if until > now}

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
        now = self._clock() if now is None else now
        ip = self._pick(mac, requested, now)
        if ip is not None:
            self._offers[ip] = _Offer(mac, now + OFFER_HOLD)
        return ip

    def may_hold(self, mac: str, machine: MachineSection | None, ip: IPv4Address) -> bool:
        """Whether `mac` may have `ip` (decides ACK or NAK for a REQUEST)."""
        if machine is not None and machine.ip is not None:
            return ip == machine.ip
        return self._available(ip, mac, self._clock())

    def bind(self, mac: str, ip: IPv4Address, lease_time: int, client_id: str = "") -> Lease:
        """`ip` is `mac`'s for `lease_time` seconds. `client_id`: its option 61 as hex ("" when
        it sent none), which a DECLINE or RELEASE must then repeat (holds)."""
        now = self._clock()
        previous = self._by_mac.get(mac)
        if previous is not None and previous.ip != ip and previous.state == "bound":
            self._save(Lease(previous.ip, mac, now, "released", previous.client_id))
        lease = Lease(ip, mac, now + lease_time, "bound", client_id)
        self._save(lease)
        self._offers.pop(ip, None)
        self._fresh.pop(ip, None)
        return lease

    def holds(self, mac: str, ip: IPv4Address, client_id: str) -> Lease | None:
        """The lease on `ip` when a message with this chaddr (`mac`) and client identifier
        (`client_id`, hex, "" for none) comes from its holder (RFC 2131 4.2: the client
        identifier, when the client sent one, else chaddr, names a lease's client; both must
        match here, as leases are keyed by MAC); else None."""
        lease = self._by_ip.get(ip)
        if lease is None or lease.state != "bound" or lease.mac != mac:
            return None
        if lease.client_id and lease.client_id != client_id:
            return None
        return lease

    def not_holder(self, mac: str, ip: IPv4Address, client_id: str) -> str:
        """Why a DECLINE or RELEASE from `mac` for `ip` does not come from its holder, in
        words for the log (the caller has checked `holds`)."""
        lease = self._by_ip.get(ip)
        now = self._clock()
        if lease is None or lease.state == "released" or not lease.expires > now:
            return f"{ip} is not leased to anyone"
        if lease.state == "declined":
            return f"{ip} is quarantined after a DECLINE"
        if lease.mac != mac:
            return f"{ip} is leased to {lease.mac}"
        if lease.client_id != client_id:
            sent = f"client identifier {client_id}" if client_id else "no client identifier"
            return f"the lease of {ip} has client identifier {lease.client_id}, this one {sent}"
        return f"{ip} is not leased to {mac}"

    def release(self, mac: str, ip: IPv4Address, client_id: str = "") -> bool:
        """RFC 2131 4.3.4: the holder gives `ip` back; False (nothing changes) when `mac` and
        `client_id` are not its holder's (holds)."""
        lease = self.holds(mac, ip, client_id)
        if lease is None:
            return False
        self._save(Lease(ip, mac, self._clock(), "released", lease.client_id))
        return True

    def decline(self, mac: str, ip: IPv4Address, client_id: str = "") -> bool:
        """RFC 2131 4.3.3: the holder found `ip` in use by another host (its ARP probe was
        answered); `ip` is kept out of use for `quarantine` seconds. False (nothing changes)
        when `mac` and `client_id` are not its holder's or the lease has run out: a DECLINE
        follows an ACK at once, and anyone can send one naming any address."""
        now = self._clock()
        lease = self.holds(mac, ip, client_id)
        if lease is None or not lease.active(now):
            return False
        self._make_room(now, self.limit - 1)
        self._offers.pop(ip, None)
        self._fresh.pop(ip, None)
        if self._by_mac.get(mac) is lease:
            del self._by_mac[mac]
        until = now + self.quarantine
        self._save(Lease(ip, "", until, "declined"))
        self._quarantined[ip] = until
        return True

    def _make_room(self, now: float, keep: int) -> None:
        """End the quarantines that ran out, then the oldest until at most `keep` are left."""
        for ip in [ip for ip, until in self._quarantined.items() if until <= now]:
            self._free(ip)
        while len(self._quarantined) > keep:
            self._free(next(iter(self._quarantined)))

    def _free(self, ip: IPv4Address) -> None:
        """A quarantine ends: the address is forgotten, and offered again after the fresh ones
        (the squatter may still be there: a never-used address is the better bet)."""
        del self._quarantined[ip]
        self._by_ip.pop(ip, None)
        self._store.delete_lease(ip)
        if self.pool is not None and ip in self.pool:
            self._fresh[ip] = None

    def flush(self) -> None:
        """Commit the leases saved in this loop turn (see state.StateStore)."""
        self._store.flush()

    def _save(self, lease: Lease) -> None:
        self._store.save_lease(lease)
        self._by_ip[lease.ip] = lease
        if lease.mac:
            self._by_mac[lease.mac] = lease
        if lease.state != "declined":
            self._quarantined.pop(lease.ip, None)  # bound again once its quarantine ran out
