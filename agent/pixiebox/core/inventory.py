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
from pixiebox.config.values import unicast_mac_problem
from pixiebox.core import wording
from pixiebox.core.decision import BootDecision, LabView, LoaderCheck, decide
from pixiebox.core.evidence import MAX_ADDRESSES, AddressEvidence, EvidenceBook, Source
from pixiebox.core.firmware import ArchInfo
from pixiebox.core.lifecycle import Lifecycle
from pixiebox.core.oui import vendor_of
from pixiebox.core.trust import (
    REFUSAL_WORDS,
    SECRET_WORDS,
    BootTokens,
    LabLink,
    Refusal,
    RefusalNotes,
    Verdict,
)
from pixiebox.events import Fields, FieldValue, Kind
from pixiebox.net.limits import Quota
from pixiebox.net.netif import neighbour_mac
from pixiebox.store.state import StateStore

log = logging.getLogger("pixiebox.core.inventory")


#: New unknown machines logged a minute at most, each on its own line (see `seen`).
DISCOVERED_LINES = 20


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
    def __init__(self, config: LabConfig, store: StateStore, link: LabLink | None = None) -> None:
        """`link`: the lab segment (the agent passes its interface and subnet); by default the
        subnet lab.toml names and neighbour entries on any interface."""
        self._store = store
        self.link = link if link is not None else LabLink(None, config.network.subnet)
        self.lifecycle = Lifecycle(store)
        #: Each machine's current boot token (core.trust).
        self.tokens = BootTokens(store)
        self._refusals = RefusalNotes()
        #: "unknown machine … asked to boot" lines: each new MAC is one until a flood of them
        #: (any device on the LAN can be a new MAC), then DISCOVERED_LINES a minute and a count.
        self._discovered_lines = Quota(DISCOVERED_LINES, 60.0)
        #: The kernel's neighbour entries read lately: address -> (MAC or None, when read).
        self._neighbours: dict[IPv4Address, tuple[str | None, float]] = {}
        #: Called with the MAC of an unknown machine seen for the first time under
        #: [boot] unknown = "enroll" (the agent adds it to lab.toml).
        self.on_unknown: Callable[[str], object] | None = None
        #: Who is at which address, learned at run time (leases, requests, neighbours).
        self.evidence = EvidenceBook()
        self._lab = LabView.of(config)
        # The bound on discovered machines (core.lifecycle): their records, event logs and
        # boot-time entries go together. Address evidence is not part of it: it is bounded by
        # the lab subnet and MAX_ADDRESSES, and a forgotten machine's lease still stands.
        self.lifecycle.bound(
            self._enrolled, config.boot.max_discovered, config.boot.forget_discovered_after,
            load=True,
        )  # fmt: skip

    def _enrolled(self, mac: str) -> bool:
        return mac in self._lab.by_mac

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
        old = self._lab
        self._lab = new = LabView.of(config)
        self.lifecycle.enrolled_now(new.by_mac.keys() - old.by_mac.keys())
        self.lifecycle.unenrolled(old.by_mac.keys() - new.by_mac.keys())
        boot = config.boot
        self.lifecycle.bound(self._enrolled, boot.max_discovered, boot.forget_discovered_after)

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
        """The boot decision for `mac` under the current lab.toml (core.decision.decide); when
        `arch` is None, the image's build is the one for the CPU DHCP recorded for `mac`."""
        return decide(self._lab, mac, arch, loaders=loaders, recorded=self.recorded_cpu)

    def recorded_cpu(self, mac: str) -> str | None:
        """The CPU (ArchInfo.cpu) recorded when `mac` last told it (DHCP option 93), or None."""
        record = self.lifecycle.record_of(mac)
        return record.arch or None if record is not None else None

    def seen(self, mac: str, arch: ArchInfo | None) -> bool:
        """Record that `mac` asked to boot; True the first time.

        `arch` is None when the asking protocol cannot tell (an HTTP script fetch): what DHCP
        recorded from option 93 then stands.

        The first time an unknown machine shows up, one log line and a machine.discovered event
        say what it is, what happens next and how to enroll it (the user should never have to
        dig a MAC out of "unexpected end of JSON input"); under [boot] unknown = "enroll" the
        agent is told to enroll it."""
        if unicast_mac_problem(mac) is not None:
            return False  # a multicast, broadcast or zero MAC is no machine: never recorded
        lab = self._lab
        self.lifecycle.heard(mac)  # at the cap, a new MAC makes room first
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
        # In a flood of new MACs the lifecycle's summary says how many came and went, once a
        # minute; a line for each would be the flood again, in the log. The events stay.
        left_out = None if self.lifecycle.under_pressure() else self._discovered_lines.admit("new")
        if left_out is None:
            log.debug("%s", message)
        elif left_out:
            log.info("%s (and %d more unknown machines before it: pixiebox machines)", message,
                     left_out)  # fmt: skip
        else:
            log.info("%s", message)
        self.lifecycle.discovered(
            mac, message, {key: value for key, value in facts.items() if value is not None}
        )
        if policy == "enroll" and self.on_unknown is not None:
            self.on_unknown(mac)
        return first_time

    # -- address evidence

    def learn(self, mac: str, ip: IPv4Address, source: Source) -> None:
        """Evidence that `mac` is at `ip` (core.evidence says which sources count). An address
        outside the lab subnet is no address of a lab machine: a DHCP REQUEST may name any."""
        if self.link.on_link(ip):
            self.evidence.add(mac, ip, source)

    def neighbour_at(self, ip: IPv4Address) -> str | None:
        """The MAC the kernel's neighbour entry on the lab interface has for `ip` (a client on
        the lab's segment that just talked to us over TCP has one; a routed one never does).

        A read less than NEIGHBOUR_FRESH seconds old is taken as it is, entries and misses alike:
        the neighbour table is a file to read and parse (/proc/net/arp), which cost the iPXE
        script endpoint a third of its requests per second when read on every request (bench/)."""
        now = self.evidence.now()
        cached = self._neighbours.get(ip)
        if cached is not None and now - cached[1] < NEIGHBOUR_FRESH:
            return cached[0]
        mac = neighbour_mac(str(ip), device=self.link.interface)
        if len(self._neighbours) >= MAX_ADDRESSES:
            self._neighbours.clear()
        self._neighbours[ip] = (mac, now)
        return mac

    def learn_neighbour(self, ip: IPv4Address) -> str | None:
        """Read the neighbour entry for `ip` (neighbour_at) and keep it as evidence; its MAC."""
        mac = self.neighbour_at(ip)
        if mac is not None:
            known = self.evidence.at(ip)
            if known is None or known.mac != mac:
                self.evidence.add(mac, ip, Source.NEIGHBOUR)
        return mac

    def evidence_at(self, ip: IPv4Address) -> AddressEvidence | None:
        """The best evidence of who is at `ip`: the kernel's neighbour entry when it has one
        (what is there now: it outranks a reservation, which only says who *should* be there),
        else a reservation in lab.toml, else what was learned (leases, DHCP requests)."""
        if self.learn_neighbour(ip) is not None:
            return self.evidence.at(ip)
        reserved = self._lab.by_ip.get(ip)
        if reserved is not None:
            # The time a reservation was known from is not kept: 0 says "always".
            return AddressEvidence(reserved, ip, Source.RESERVATION, 0.0)
        return self.evidence.at(ip)

    def mac_at(self, ip: IPv4Address) -> str | None:
        """The MAC at `ip` by the best evidence (see evidence_at)."""
        evidence = self.evidence_at(ip)
        return evidence.mac if evidence is not None else None

    # -- who may have a machine's secrets (core.trust, SECURITY.md)

    def prove(
        self, ip: IPv4Address | None, claimed: str | None = None, *, strict: bool = True
    ) -> Verdict:
        """Which machine the evidence says is asking from `ip`, or why none.

        `claimed`: the MAC the request names (a URL, a query), which must be the one found.
        `strict` (TCP requests): the kernel's neighbour entry on the lab interface must name
        the machine; the kernel resolved the peer to answer it, so it has one for any on-link
        client. Not strict (UDP: a TFTP request, a syslog line, to which nothing was sent yet):
        without a neighbour entry, our DHCP evidence or a reservation names it."""
        if ip is None:
            return Verdict(None, Refusal.NO_EVIDENCE)
        if not self.link.on_link(ip):
            return Verdict(None, Refusal.OFF_LINK)
        seen = self.learn_neighbour(ip)
        mac = seen
        if mac is None and not strict:
            evidence = self.evidence_at(ip)
            mac = evidence.mac if evidence is not None else None
        if mac is None:
            return Verdict(None, Refusal.NO_EVIDENCE)
        if claimed is not None and claimed != mac:
            return Verdict(None, Refusal.NOT_OWNER, seen_mac=seen)
        return Verdict(mac, None, seen_mac=seen)

    def knows(self, mac: str) -> bool:
        """Whether `mac` is a machine of the lab: enrolled, or recorded when it asked to boot.
        Events about others (refusals of what a stranger claimed) go to the lab's own log: a
        forger must not be able to create machine records."""
        return mac in self._lab.by_mac or self._store.machine_record(mac) is not None

    def refuse(
        self, about: str | None, secret: str, ip: IPv4Address | None, verdict: Verdict
    ) -> str:
        """Record that `secret` of the machine `about` (None: no machine can be named) was
        refused to `ip` for `verdict.refusal`: a secret.refused event in that machine's log, or
        the lab's ("" MAC) when `about` is no machine the lab knows (a stranger must not be able
        to create machine records), once a minute per refusal; returns the sentence."""
        reason = verdict.refusal or Refusal.NO_EVIDENCE
        known = about is not None and self.knows(about)
        what = SECRET_WORDS.get(secret, secret)
        machine = self._lab.by_mac.get(about) if about else None
        whose = f"{machine.name if machine else about}'s {what}" if known and about else what
        seen = ""
        if reason is Refusal.NOT_OWNER and verdict.seen_mac:
            seen = f" ({verdict.seen_mac})"
        sentence = f"refused {whose} to {ip}: {REFUSAL_WORDS[reason]}{seen}"
        target = about if known and about else ""
        if self._refusals.first_in_a_while(target, str(ip), secret, reason):
            log.warning("%s", sentence)
            fields: dict[str, FieldValue] = {"secret": secret, "ip": str(ip), "reason": str(reason)}
            if verdict.seen_mac:
                fields["seen_mac"] = verdict.seen_mac
            self.lifecycle.note(target, Kind.SECRET_REFUSED, sentence, fields)
        return sentence

    def boot_token_for(
        self, mac: str, ip: IPv4Address | None, *, strict: bool = True
    ) -> str | None:
        """A new boot token for `mac`'s boot when the evidence says `mac` itself is asking from
        `ip` (on-link, its neighbour entry); else None, and the refusal is recorded."""
        verdict = self.prove(ip, mac, strict=strict)
        if not verdict.proven:
            self.refuse(mac, "boot-token", ip, verdict)
            return None
        return self.tokens.issue(mac)

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
