"""The one question every protocol asks: who is this MAC, and what should it boot?

DHCP, TFTP and HTTP all ask here instead of carrying their own copy of the policy, so "an
unknown machine boots the default image under unknown = discover" is decided in one place, logged
once in words a person understands, and recorded for `pixiebox machines`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Literal

from pixiebox.config import LabConfig, MachineSection
from pixiebox.core.firmware import ArchInfo
from pixiebox.core.lifecycle import Lifecycle
from pixiebox.core.oui import vendor_of
from pixiebox.net.netif import neighbour_mac
from pixiebox.store.state import StateStore

log = logging.getLogger("pixiebox.core.inventory")


@dataclass(frozen=True, slots=True)
class BootVerdict:
    """The answer for one machine: boot `image`, or stay silent and why."""

    mac: str
    machine: MachineSection | None  # None: not in lab.toml
    action: Literal["boot", "ignore"]
    image: str | None

    @property
    def known(self) -> bool:
        return self.machine is not None

    @property
    def who(self) -> str:
        """How log lines name the machine: by its name when enrolled, else by its MAC."""
        return (
            f"{self.machine.name} ({self.mac})" if self.machine else f"unknown machine {self.mac}"
        )


class Inventory:
    def __init__(self, config: LabConfig, store: StateStore) -> None:
        self._store = store
        self.lifecycle = Lifecycle(store)
        #: Called with the MAC of an unknown machine seen for the first time under
        #: [boot] unknown = "enroll" (the agent adds it to lab.toml).
        self.on_unknown: Callable[[str], object] | None = None
        self._by_mac: dict[str, MachineSection] = {}
        # Learned at run time: in proxy mode the router hands out addresses, so the first
        # request that names a MAC (the iPXE script URL) is where we learn a machine's IP.
        self._mac_by_ip: dict[IPv4Address, str] = {}
        self.config = config
        self.reload(config)

    def reload(self, config: LabConfig) -> None:
        """Swap in a newly validated lab.toml (enrollment, SIGHUP)."""
        self.config = config
        self._by_mac = {machine.mac: machine for machine in config.machines}

    def record(self, mac: str, kind: str, message: str, ip: IPv4Address | None = None) -> None:
        """An event in `mac`'s log (see lifecycle): what happened, as a sentence."""
        self.lifecycle.record(mac, kind, message, ip=str(ip) if ip is not None else None)

    def name_of(self, mac: str) -> str:
        """How a log line names `mac`: "c1 (mac)" when enrolled, else "unknown machine mac"."""
        machine = self._by_mac.get(mac)
        return f"{machine.name} ({mac})" if machine else f"unknown machine {mac}"

    def who_is(self, mac: str) -> MachineSection | None:
        return self._by_mac.get(mac)

    def note_address(self, mac: str, ip: IPv4Address) -> None:
        """Remember that `mac` currently uses `ip` (seen in a lease or a request)."""
        self._mac_by_ip[ip] = mac

    def mac_at(self, ip: IPv4Address) -> str | None:
        """The MAC last seen at `ip`: reserved addresses first, then what was learned."""
        for machine in self.config.machines:
            if machine.ip == ip:
                return machine.mac
        learned = self._mac_by_ip.get(ip)
        if learned is None:
            learned = neighbour_mac(str(ip))
            if learned is not None:
                self._mac_by_ip[ip] = learned
        return learned

    def dns_records(
        self, appliance: tuple[str, IPv4Address] | None = None
    ) -> dict[str, IPv4Address]:
        """Short name → address for DNS: reservations, then addresses learned at run time (in
        proxy mode the router hands them out: this is how `c1.lab.internal` finds a node
        without the router's client list), and the appliance itself."""
        records: dict[str, IPv4Address] = {}
        for ip, mac in self._mac_by_ip.items():
            machine = self._by_mac.get(mac)
            if machine is not None:
                records[machine.name] = ip
        for machine in self.config.machines:
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
        machine = self._by_mac.get(mac)
        return f"{machine.name} ({mac}, {ip})" if machine else f"unknown machine {mac} ({ip})"

    def machines(self) -> list[MachineSection]:
        return list(self.config.machines)

    def boot_verdict(self, mac: str, arch: ArchInfo | None) -> BootVerdict:
        """Decide for a machine that asked to boot, recording it as seen.

        `arch` is None when the asking protocol cannot tell (an HTTP script fetch): what DHCP
        recorded from option 93 then stands.

        Unknown machines follow [boot] unknown; the first time one shows up, one log line says
        what it is, what happens next and how to enroll it (the user should never have to dig a
        MAC out of "unexpected end of JSON input")."""
        machine = self._by_mac.get(mac)
        if arch is None:
            first_time = self._store.record_seen(mac, None, None)
            label = "firmware not reported"
        else:
            first_time = self._store.record_seen(mac, arch.cpu, str(arch.firmware))
            label = arch.label
        vendor = vendor_of(mac)
        if vendor:
            label = f"{label}, {vendor}"
        policy = self.config.boot.unknown
        if machine is not None:
            return BootVerdict(mac, machine, "boot", machine.image or self.config.boot.image)
        if policy == "ignore":
            if first_time:
                message = (
                    f"unknown machine {mac} ({label}) asked to boot; not answering it because "
                    f'[boot] unknown = "ignore"; enroll it with: pixiebox enroll {mac} --name NAME'
                )
                log.info("%s", message)
                self.lifecycle.discovered(mac, message)
            return BootVerdict(mac, None, "ignore", None)
        if first_time:
            message = (
                f"unknown machine {mac} ({label}) asked to boot; recorded as discovered; booting "
                f"the default image {self.config.boot.image!r}; enroll it with: "
                f"pixiebox enroll {mac} --name NAME"
            )
            log.info("%s", message)
            self.lifecycle.discovered(mac, message)
            if policy == "enroll" and self.on_unknown is not None:
                self.on_unknown(mac)
        return BootVerdict(mac, None, "boot", self.config.boot.image)
