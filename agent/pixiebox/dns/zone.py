"""The lab's zone: `<machine>.<domain>` and the reverse names of their addresses, with answers
packed in advance.

Built from one view of the records (short name → address) and rebuilt only when that view's
contents change. Every name and type the fast path serves is packed here once, with dnslib, so a
query for a known name costs a dictionary lookup and a splice instead of a parse and a pack.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from dnslib import PTR, RR, SOA, A, DNSLabel, DNSRecord  # type: ignore[import-untyped]

from pixiebox.dns.wire import (
    CLASS_IN,
    NOERROR,
    NXDOMAIN,
    REFUSED,
    TYPE_A,
    TYPE_AAAA,
    TYPE_ANY,
    TYPE_PTR,
    TYPE_SOA,
    empty_reply,
    split,
    wire,
)

log = logging.getLogger("pixiebox.dns")

#: Unknown lab names whose NXDOMAIN is kept packed (until the records change): bounded, as
#: anyone can ask for any number of names.
NEGATIVE_CACHE = 4096
_SOA_TIMES = (3600, 600, 86400)  # refresh, retry, expire: no secondaries ever use them


@dataclass(frozen=True, slots=True)
class Packed:
    """An answer packed once: header bytes 3 and 6..11, and everything after the question."""

    flags: int  # header byte 3 without RA/CD: the RCODE
    counts: bytes  # QDCOUNT, ANCOUNT, NSCOUNT (ARCOUNT is set per query)
    tail: bytes


@dataclass(frozen=True, slots=True)
class Name:
    """What the fast path knows about one name: answers by QTYPE, and for any other type."""

    by_type: Mapping[int, Packed]
    other: Packed


@dataclass
class Zone:
    """The lab's names as built from one view of the records."""

    serial: int
    apex: tuple[bytes, ...]  # the domain's labels, lowercased
    names: dict[bytes, IPv4Address] = field(default_factory=dict)  # wire name → address
    reverse: dict[bytes, list[tuple[bytes, ...]]] = field(default_factory=dict)  # PTR → names
    empty: set[bytes] = field(default_factory=set)  # empty non-terminals (RFC 8020)
    fast: dict[bytes, Name] = field(default_factory=dict)  # lowercased wire name → answers
    negative: int = 0  # NXDOMAIN answers added to `fast` since the zone was built


def domain_labels(domain: str) -> tuple[bytes, ...]:
    """The lowercased labels of `domain`; ValueError when it cannot hold names of machines."""
    labels = tuple(domain.strip().rstrip(".").lower().encode("ascii").split(b"."))
    if not all(0 < len(label) <= 63 for label in labels) or len(wire(labels)) > 200:
        raise ValueError(f"not a usable DNS domain: {domain!r}")
    return labels


class LabNames:
    """The zone for what `records()` returns now, and the authoritative answers from it.

    The appliance is authoritative (AA set) for the lab domain: A for a known name, PTR for its
    address, NODATA (NOERROR, no answer, SOA in authority: RFC 2308 section 2.2) for another type
    of a known name, NXDOMAIN with the SOA (RFC 2308 section 2.1) for an unknown name under the
    domain. Reverse names of addresses no machine has are not ours: they are forwarded."""

    def __init__(
        self,
        apex: tuple[bytes, ...],
        records: Callable[[], Mapping[str, IPv4Address]],
        ttl: int,
    ) -> None:
        self.apex = apex
        self.domain = b".".join(apex).decode()
        self.records = records
        self.ttl = ttl
        self._snapshot: dict[str, IPv4Address] = {}
        self._zone = self.build({}, serial=0)
        self._failing = False

    def current(self) -> Zone:
        """The zone for what records() returns now, rebuilt only when its contents changed.

        Compared with a copy of the last contents, not by identity: an inventory may update
        one dict in place or hand out a new one per call. Two dicts compare in C, and values
        that are the very same objects (a dict updated in place, or rebuilt from the same
        inventory objects) compare by identity, so an unchanged view costs little per query."""
        try:
            records = self.records()
            if records != self._snapshot:
                self._zone = self.build(records, serial=self._zone.serial + 1)
                self._snapshot = dict(records)
            self._failing = False
        except Exception:
            if not self._failing:
                log.exception("the lab's DNS records could not be read; answering from the last")
            self._failing = True
        return self._zone

    def authoritative(
        self, zone: Zone, labels: tuple[bytes, ...], qtype: int, qclass: int
    ) -> tuple[int, list[Any], list[Any]] | None:
        """(RCODE, answers, authority) when the name is ours to answer, else None."""
        apex = zone.apex
        name = wire(labels)
        if labels[-len(apex) :] == apex and len(labels) >= len(apex):
            if qclass not in (CLASS_IN, TYPE_ANY):
                return REFUSED, [], []
            qname = DNSLabel(labels)
            address = zone.names.get(name)
            if address is not None:
                if qtype in (TYPE_A, TYPE_ANY):
                    return NOERROR, [RR(qname, TYPE_A, rdata=A(str(address)), ttl=self.ttl)], []
                return NOERROR, [], [self.soa(zone)]
            if labels == apex:
                if qtype in (TYPE_SOA, TYPE_ANY):
                    return NOERROR, [self.soa(zone)], []
                return NOERROR, [], [self.soa(zone)]
            if name in zone.empty:
                return NOERROR, [], [self.soa(zone)]
            return NXDOMAIN, [], [self.soa(zone)]
        names = zone.reverse.get(name)
        if names is None or qclass not in (CLASS_IN, TYPE_ANY):
            return None
        if qtype not in (TYPE_PTR, TYPE_ANY):
            return NOERROR, [], []  # not our zone, so no SOA to give
        qname = DNSLabel(labels)
        ptrs = [RR(qname, TYPE_PTR, rdata=PTR(DNSLabel(n)), ttl=self.ttl) for n in names]
        return NOERROR, ptrs, []

    def soa(self, zone: Zone) -> Any:
        apex = DNSLabel(zone.apex)
        # MINIMUM is the negative-caching TTL (RFC 2308 section 4); the zone's serial changes
        # whenever the records do.
        times = (zone.serial, *_SOA_TIMES, self.ttl)
        soa = SOA(mname=apex, rname=DNSLabel((b"hostmaster", *zone.apex)), times=times)
        return RR(apex, TYPE_SOA, rdata=soa, ttl=self.ttl)

    def remember_nxdomain(self, zone: Zone, labels: tuple[bytes, ...]) -> None:
        """Pack the NXDOMAIN of an unknown lab name, so that the next query for it is a fast one
        (the same answer for every type), up to NEGATIVE_CACHE names per zone."""
        name = wire(labels)
        if zone.negative < NEGATIVE_CACHE and name not in zone.fast:
            zone.negative += 1
            zone.fast[name] = Name({}, self.pack_one(zone, labels, TYPE_A))

    def build(self, records: Mapping[str, IPv4Address], serial: int) -> Zone:
        # The SOA serial grows with each change (RFC 1982 arithmetic is never needed here).
        zone = Zone(serial=max(serial, int(time.time())) & 0xFFFFFFFF, apex=self.apex)
        for short, value in sorted(records.items()):
            try:
                name = tuple(str(short).strip().rstrip(".").lower().encode("ascii").split(b"."))
                address = IPv4Address(value)
            except (UnicodeError, ValueError) as exc:
                log.warning("no DNS name for machine %r (%s): %s", short, value, exc)
                continue
            labels = name + self.apex
            full = wire(labels)
            if not all(0 < len(label) <= 63 for label in name) or len(full) > 255:
                log.warning("no DNS name for machine %r: not a valid DNS name", short)
                continue
            if full in zone.names:
                log.warning("machine name %r is used twice (names are case-insensitive)", short)
                continue
            zone.names[full] = address
            reverse = wire(tuple(address.reverse_pointer.encode().split(b".")))
            zone.reverse.setdefault(reverse, []).append(labels)
            for depth in range(1, len(name)):  # "a.b" makes "b.<domain>" exist, empty
                zone.empty.add(wire(labels[depth:]))
        zone.empty.difference_update(zone.names)
        self._pack_fast(zone)
        log.debug("DNS zone %s: %d names (serial %d)", self.domain, len(zone.names), zone.serial)
        return zone

    def _pack_fast(self, zone: Zone) -> None:
        """Pack the answer for every name and type the fast path serves, with dnslib.

        Packed for a lowercase question at offset 12 (no OPT); a client's question has the
        same length, so the compression pointers in the tail stay right with its bytes."""
        wanted: list[tuple[tuple[bytes, ...], tuple[int, ...]]] = [
            (zone.apex, (TYPE_SOA, TYPE_ANY)),
            *((tuple(split(name)), (TYPE_A, TYPE_ANY)) for name in zone.names),
            *((tuple(split(name)), (TYPE_PTR, TYPE_ANY)) for name in zone.reverse),
            *((tuple(split(name)), ()) for name in zone.empty),
        ]
        for labels, types in wanted:
            by_type = {qtype: self.pack_one(zone, labels, qtype) for qtype in types}
            # Any other type gets what AAAA gets: NODATA (its tail does not name the type).
            zone.fast[wire(labels)] = Name(by_type, self.pack_one(zone, labels, TYPE_AAAA))

    def pack_one(self, zone: Zone, labels: tuple[bytes, ...], qtype: int) -> Packed:
        local = self.authoritative(zone, labels, qtype, CLASS_IN)
        assert local is not None
        rcode, answers, authority = local
        request = DNSRecord.question(DNSLabel(labels))
        request.q.qtype = qtype
        request.header.rd = 0
        reply = empty_reply(request, rcode, None)
        reply.add_answer(*answers)
        reply.add_auth(*authority)
        data = bytes(reply.pack())
        end = 12 + len(wire(labels)) + 4
        return Packed(flags=data[3] & 0x0F, counts=data[4:10], tail=data[end:])
