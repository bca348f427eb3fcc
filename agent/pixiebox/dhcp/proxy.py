"""ProxyDHCP: boot information only, never an address.

The home router keeps handing out addresses; we answer PXE clients' DISCOVER on port 67 with an
offer that has yiaddr 0.0.0.0 and the boot file, and their follow-up REQUEST on port 4011 (PXE
spec 2.1 "ProxyDHCP"; UEFI ROMs and iPXE ask there, docs/firmware-quirks.md#3 and #8). Plain DHCP
clients never hear from us, which is what makes this mode safe on any LAN.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

from pixiebox.core.decision import Silence
from pixiebox.core.evidence import Source
from pixiebox.core.inventory import BootBackend
from pixiebox.dhcp.codec import MessageType, Packet
from pixiebox.dhcp.policy import (
    BootPolicy,
    NotABootRequest,
    add_boot_options,
    boot_client,
    boot_fields,
)
from pixiebox.events import Kind
from pixiebox.net.limits import LogLimiter

log = logging.getLogger("pixiebox.dhcp")

PXE_PORT = 4011
_ZERO = IPv4Address(0)


class ProxyHandler:
    mode: str = "proxy"
    ports: tuple[int, ...] = (67, PXE_PORT)

    def __init__(self, inventory: BootBackend, policy: BootPolicy) -> None:
        self.inventory = inventory
        self.policy = policy
        #: Lines about strangers: anyone on the LAN can send DISCOVERs from as many random MACs
        #: as the link carries, and each would be a line in the journal.
        self.said = LogLimiter(log)
        self._enrolled = self._macs()

    @property
    def server_ip(self) -> IPv4Address:
        return self.policy.server_ip

    def flush(self) -> None:
        """Nothing to commit: proxy mode hands out no leases."""

    def reload(self) -> None:
        """Every answer asks the inventory; only the set of enrolled MACs is kept here."""
        self._enrolled = self._macs()

    def _macs(self) -> frozenset[str]:
        return frozenset(machine.mac for machine in self.inventory.config.machines)

    def held_addresses(self) -> set[IPv4Address]:
        return set()  # the router's leases, not ours

    def known(self, mac: str) -> bool:
        return mac in self._enrolled

    def _say(self, mac: str, kind: str, message: str, *args: object) -> None:
        """An info line about `mac`: as it is for an enrolled machine, rate-limited per `kind`
        for a stranger (net.limits.LogLimiter)."""
        if mac in self._enrolled:
            log.info(message, *args)
        else:
            self.said.log(kind, logging.INFO, message, *args)

    def _overheard(self, request: Packet) -> None:
        """A REQUEST names the address its client takes (option 50 while selecting the router's
        offer, ciaddr when renewing or asking on port 4011): in proxy mode this is how the
        router's lease becomes known here."""
        ip = request.requested_ip or (request.ciaddr if request.ciaddr != _ZERO else None)
        if ip is not None and ip != _ZERO:
            self.inventory.learn(request.mac, ip, Source.DHCP_REQUEST)

    def handle(self, request: Packet, port: int) -> Packet | None:
        kind = request.message_type
        if kind is MessageType.REQUEST:
            self._overheard(request)
        if port == PXE_PORT:
            if kind not in (MessageType.REQUEST, MessageType.INFORM):
                return None
            answer = MessageType.ACK
        elif kind is MessageType.DISCOVER:
            answer = MessageType.OFFER
        elif kind is MessageType.REQUEST and request.server_id == self.server_ip:
            # Some ROMs send the ProxyDHCP request to port 67 with our server identifier
            # instead of to 4011 (PXE spec allows either).
            answer = MessageType.ACK
        else:
            return None
        try:
            client = boot_client(request)
        except NotABootRequest as why:
            self._say(request.mac, "not-a-boot-request",
                      "%s asked to boot but is not answered: %s", request.mac, why)  # fmt: skip
            return None
        if client is None:
            return None  # a plain DHCP client: the router's business, not ours
        decision = self.inventory.decide(
            client.mac, client.arch, loaders=self.policy.loaders(client)
        )
        self.inventory.seen(client.mac, client.arch)
        if decision.silent is Silence.UNKNOWN_IGNORED:
            return None
        boot_file = self.policy.boot_file(client, decision)
        if boot_file is None:
            return None
        reply = request.reply(answer)
        if port == PXE_PORT:
            reply.ciaddr = request.ciaddr
        add_boot_options(reply, client, boot_file, self.server_ip, proxy=True)
        how = "script URL" if client.ipxe else "boot file"
        firmware = "iPXE" if client.ipxe else client.arch.label
        self._say(
            client.mac, f"proxy-{answer.name}",
            "%s (%s) asked to boot; sent proxy %s with %s %s; next it should fetch it",
            decision.who, firmware, answer.name, how, boot_file.name,
        )  # fmt: skip
        event_kind = Kind.DHCP_OFFER if answer is MessageType.OFFER else Kind.DHCP_ACK
        self.inventory.record(
            client.mac, event_kind, f"{firmware} asked to boot (port {port}); sent a proxy "
            f"{answer.name} with {how} {boot_file.name}",
            fields=boot_fields(self.mode, port, client, boot_file),
        )  # fmt: skip
        return reply
