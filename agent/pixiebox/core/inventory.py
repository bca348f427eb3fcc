"""The lab as the protocols see it: who a MAC is, what it boots, and who is at an address.

Every protocol asks here instead of carrying its own copy of the policy: `decide` (the one boot
decision, core.decision, read from the current lab.toml), `seen` (a machine asked to boot: recorded
for `pixiebox machines`, and an unknown one announced once in words a person understands), and
the address evidence (core.evidence: `learn`, `mac_at`, `dns_records`).

lab.toml is swapped in whole (`reload`, on the event loop): the config and its MAC index are one
`LabView`, replaced in one assignment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Protocol

from pixiebox.config import LabConfig, MachineSection
from pixiebox.core import wording
from pixiebox.core.decision import BootDecision, LabView, LoaderCheck, decide
from pixiebox.core.evidence import MAX_ADDRESSES, AddressEvidence, EvidenceBook, Source
from pixiebox.core.firmware import ArchInfo
from pixiebox.core.lifecycle import Lifecycle
from pixiebox.core.oui import vendor_of
from pixiebox.events import Fields, FieldValue, Kind
from pixiebox.net.netif import neighbour_mac
from pixiebox.store.state import StateStore

log = logging.getLogger("pixiebox.core.inventory")


class BootBackend(Protocol):
    """What a boot protocol handler needs (Tinkerbell smee's backend): the decision, telling that
    a machine was seen or an address learned, and its events. `Inventory` is the real one; tests
    drive handlers with a small fake."""

    @property
    def config(self) -> LabConfig: ...

    def decide(
        self, mac: str | None, arch: ArchInfo | None, *, loaders: LoaderCheck | None = None
    ) -> BootDecision: ...

    def seen(self, mac: str, arch: ArchInfo | None) -> bool: ...

    def learn(self, mac: str, ip: IPv4Address, source: Source) -> None: ...

    def record(
        self,
        mac: str,
        kind: Kind,
        message: str,
        ip: IPv4Address | None = None,
        fields: Fields | None = None,
    ) -> None: ...


#: Seconds a neighbour entry read from the kernel is trusted without reading it again.
NEIGHBOUR_FRESH = 5.0


class Inventory:
    def __init__(self, config: LabConfig, store: StateStore) -> None:
        self._store = store
        self.lifecycle = Lifecycle(store)
        #: Called with the MAC of an unknown machine seen for the first time under
        #: [boot] unknown = "enroll" (the agent adds it to lab.toml).
        self.on_unknown: Callable[[str], object] | None = None
        #: Who is at which address, learned at run time (leases, requests, neighbours).
        self.evidence = EvidenceBook()
        #: Addresses the neighbour table had no entry for, and when it was read (see
        #: learn_neighbour): a client off the segment must not cost a read per request either.
        self._no_neighbour: dict[IPv4Address, float] = {}
        self._lab = LabView.of(config)

    @property
    def lab(self) -> LabView:
        """The current lab.toml with its indexes (one consistent snapshot)."""
        return self._lab

    @property
    def config(self) -> LabConfig:
        return self._lab.config

    def reload(self, config: LabConfig) -> None:
        """Swap in a newly validated lab.toml (enrollment, SIGHUP). Call it on the event loop:
        the protocols read the lab there."""
        self._lab = LabView.of(config)

    def record(
        self,
        mac: str,
        kind: Kind,
        message: str,
        ip: IPv4Address | None = None,
        fields: Fields | None = None,
    ) -> None:
        """An event in `mac`'s log (see lifecycle): its kind and facts, and a sentence."""
        self.lifecycle.record(
            mac, kind, message, ip=str(ip) if ip is not None else None, fields=fields
        )

    def name_of(self, mac: str) -> str:
        """How a log line names `mac`: "c1 (mac)" when enrolled, else "unknown machine mac"."""
        machine = self._lab.by_mac.get(mac)
        return wording.machine(mac, machine.name if machine else None)

    def who_is(self, mac: str) -> MachineSection | None:
        return self._lab.by_mac.get(mac)

    def machines(self) -> list[MachineSection]:
        return list(self._lab.config.machines)

    # -- the boot decision

    def decide(
        self, mac: str | None, arch: ArchInfo | None, *, loaders: LoaderCheck | None = None
    ) -> BootDecision:
        """The boot decision for `mac` under the current lab.toml (core.decision.decide)."""
        return decide(self._lab, mac, arch, loaders=loaders)

    def seen(self, mac: str, arch: ArchInfo | None) -> bool:
        """Record that `mac` asked to boot; True the first time.

        `arch` is None when the asking protocol cannot tell (an HTTP script fetch): what DHCP
        recorded from option 93 then stands.

        The first time an unknown machine shows up, one log line and a machine.discovered event
        say what it is, what happens next and how to enroll it (the user should never have to
        dig a MAC out of "unexpected end of JSON input"); under [boot] unknown = "enroll" the
        agent is told to enroll it."""
        lab = self._lab
        if arch is None:
            first_time = self._store.record_seen(mac, None, None)
        else:
            first_time = self._store.record_seen(mac, arch.cpu, str(arch.firmware))
        if not first_time or mac in lab.by_mac:
            return first_time
        decision = decide(lab, mac, arch)
        vendor = vendor_of(mac)
        label = arch.label if arch is not None else "firmware not reported"
        if vendor:
            label = f"{label}, {vendor}"
        policy = lab.config.boot.unknown
        if policy == "ignore":
            message = (
                f"unknown machine {mac} ({label}) asked to boot; not answering it because "
                f'[boot] unknown = "ignore"; enroll it with: {wording.enroll_hint(mac)}'
            )
        else:
            message = (
                f"unknown machine {mac} ({label}) asked to boot; recorded as discovered; booting "
                f"the default image {lab.config.boot.image!r}; enroll it with: "
                f"{wording.enroll_hint(mac)}"
            )
        facts: dict[str, FieldValue] = {
            "arch": arch.cpu if arch is not None else None,
            "firmware": str(arch.firmware) if arch is not None else None,
            "vendor": vendor,
            "policy": policy,
            "image": decision.image_name,
        }
        log.info("%s", message)
        self.lifecycle.discovered(
            mac, message, {key: value for key, value in facts.items() if value is not None}
        )
        if policy == "enroll" and self.on_unknown is not None:
            self.on_unknown(mac)
        return first_time

    # -- address evidence

    def learn(self, mac: str, ip: IPv4Address, source: Source) -> None:
        """Evidence that `mac` is at `ip` (core.evidence says which sources count)."""
        self.evidence.add(mac, ip, source)

    def learn_neighbour(self, ip: IPv4Address) -> str | None:
        """Read the kernel's neighbour entry for `ip` (a client on the lab's segment that just
        talked to us has one) and keep it as evidence; the MAC it names, or None.

        A neighbour entry read less than NEIGHBOUR_FRESH seconds ago is taken as it is: the
        neighbour table is a file to read and parse (/proc/net/arp), which cost the iPXE script
        endpoint a third of its requests per second when read on every request (bench/)."""
        now = self.evidence.now()
        known = self.evidence.at(ip)
        fresh = known is not None and now - known.time < NEIGHBOUR_FRESH
        if known is not None and fresh and known.source is Source.NEIGHBOUR:
            return known.mac
        if now - self._no_neighbour.get(ip, -NEIGHBOUR_FRESH) < NEIGHBOUR_FRESH:
            return None
        mac = neighbour_mac(str(ip))
        if mac is not None:
            self._no_neighbour.pop(ip, None)
            self.evidence.add(mac, ip, Source.NEIGHBOUR)
        else:
            if len(self._no_neighbour) >= MAX_ADDRESSES:
                self._no_neighbour.clear()
            self._no_neighbour[ip] = now
        return mac

    def evidence_at(self, ip: IPv4Address) -> AddressEvidence | None:
        """The best evidence of who is at `ip`: a reservation in lab.toml, else the latest
        learned, else the kernel's neighbour entry (kept from then on)."""
        lab = self._lab
        reserved = lab.by_ip.get(ip)
        if reserved is not None:
            # The time a reservation was known from is not kept: 0 says "always".
            return AddressEvidence(reserved, ip, Source.RESERVATION, 0.0)
        learned = self.evidence.at(ip)
        if learned is None and self.learn_neighbour(ip) is not None:
            learned = self.evidence.at(ip)
        return learned

    def mac_at(self, ip: IPv4Address) -> str | None:
        """The MAC at `ip` by the best evidence (see evidence_at)."""
        evidence = self.evidence_at(ip)
        return evidence.mac if evidence is not None else None

    def dns_records(
        self, appliance: tuple[str, IPv4Address] | None = None
    ) -> dict[str, IPv4Address]:
        """Short name → address for DNS: reservations, then enrolled machines' latest learned
        addresses (in proxy mode the router hands them out: this is how `c1.lab.internal` finds
        a node without the router's client list), and the appliance itself."""
        lab = self._lab
        records: dict[str, IPv4Address] = {}
        for evidence in self.evidence.latest():
            machine = lab.by_mac.get(evidence.mac)
            if machine is not None:
                records[machine.name] = evidence.ip
        for machine in lab.config.machines:
            if machine.ip is not None:
                records[machine.name] = machine.ip
        if appliance is not None:
            records.setdefault(appliance[0], appliance[1])
        return records

    def describe_address(self, ip: IPv4Address) -> str:
        """How log lines name whoever is at `ip`: "c1 (mac, 10.0.0.5)" or just the address."""
        mac = self.mac_at(ip)
        if mac is None:
            return str(ip)
        machine = self._lab.by_mac.get(mac)
        return wording.machine(mac, machine.name if machine else None, ip)
