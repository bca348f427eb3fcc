"""Reservation mode: full DHCP (RFC 2131), but only for machines in lab.toml, at their fixed IP.

For firmware that ignores proxy offers (U-Boot on ARM boards, docs/firmware-quirks.md#30; old EDK2,
#6; laptops that never merge two offers, #7): they need one server that gives both the address
and the boot file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pixiebox.config import MachineSection
from pixiebox.core import wording
from pixiebox.core.decision import Silence
from pixiebox.core.evidence import Source
from pixiebox.core.inventory import Inventory
from pixiebox.dhcp.codec import MessageType, Opt, Packet
from pixiebox.dhcp.leases import AddressBook
from pixiebox.dhcp.policy import (
    BootClient,
    BootFile,
    BootPolicy,
    NotABootRequest,
    add_boot_options,
    boot_client,
    boot_fields,
)
from pixiebox.events import FieldValue, Kind

log = logging.getLogger("pixiebox.dhcp")

_ZERO = IPv4Address(0)


@dataclass(frozen=True, slots=True)
class BootAnswer:
    """The boot part of a lease reply: nothing for plain DHCP clients, a file for boot clients,
    or `silent` when [boot] unknown = "ignore" says not to answer at all."""

    client: BootClient | None = None
    file: BootFile | None = None
    silent: bool = False

    @property
    def note(self) -> str:
        return f" with boot file {self.file.name}" if self.file else ""


_LOGGED_ONCE_LIMIT = 4096


class ReservationHandler:
    mode: str = "reservation"
    ports: tuple[int, ...] = (67,)

    def __init__(
        self, inventory: Inventory, policy: BootPolicy, book: AddressBook, subnet: IPv4Network
    ) -> None:
        self.inventory = inventory
        self.policy = policy
        self.book = book
        self.subnet = subnet
        self._told: set[str] = set()
        book.set_reservations(inventory.machines())

    @property
    def server_ip(self) -> IPv4Address:
        return self.policy.server_ip

    def reload(self) -> None:
        self.book.set_reservations(self.inventory.machines())

    def held_addresses(self) -> set[IPv4Address]:
        """Addresses leased or quarantined now: not to be reserved for another machine."""
        return self.book.held()

    def flush(self) -> None:
        """Commit the leases bound since the last call: the server calls it before it sends."""
        self.book.flush()

    # -- what differs between reservation and full mode

    def serves(self, mac: str, machine: MachineSection | None) -> bool:
        """Whether this mode hands `mac` an address at all."""
        if machine is None:
            self._tell_once(
                mac,
                f"unknown machine {mac} asked for an address; reservation mode answers only "
                f"machines in lab.toml; enroll it with: "
                f"pixiebox enroll {mac} --name NAME --ip ADDRESS",
            )
            return False
        if machine.ip is None:
            self._tell_once(
                mac,
                f"{machine.name} ({mac}) asked for an address but has no ip in lab.toml; "
                f'reservation mode cannot answer it; add ip = "..." to its [[machines]] entry',
            )
            return False
        return True

    def _tell_once(self, mac: str, message: str) -> None:
        if mac in self._told:
            return
        if len(self._told) >= _LOGGED_ONCE_LIMIT:
            self._told.clear()
        self._told.add(mac)
        log.info("%s", message)

    # -- RFC 2131 4.3

    def handle(self, request: Packet, port: int) -> Packet | None:
        kind = request.message_type
        mac = request.mac
        machine = self.inventory.who_is(mac)
        if kind is MessageType.DISCOVER:
            return self._discover(request, mac, machine)
        if kind is MessageType.REQUEST:
            return self._request(request, mac, machine)
        if kind is MessageType.RELEASE:
            if request.server_id in (None, self.server_ip) and self.book.release(
                mac, request.ciaddr
            ):
                log.info("%s released %s", self._who(mac, machine), request.ciaddr)
                self._record(mac, BootAnswer(), f"released {request.ciaddr}", request.ciaddr,
                             "released")  # fmt: skip
            return None
        if kind is MessageType.DECLINE:
            declined = request.requested_ip
            if request.server_id == self.server_ip and declined is not None:
                self.book.decline(mac, declined)
                log.warning(
                    "%s declined %s: another host on the LAN is using that address; it is "
                    "taken out of use for 10 minutes; find that host",
                    self._who(mac, machine),
                    declined,
                )
                self._record(mac, BootAnswer(), f"declined {declined}: another host uses it",
                             declined, "declined")  # fmt: skip
            return None
        if kind is MessageType.INFORM:
            return self._inform(request, mac, machine)
        return None

    def _discover(self, request: Packet, mac: str, machine: MachineSection | None) -> Packet | None:
        boot = self._boot(request)
        if boot.silent:
            return None
        if not self.serves(mac, machine):
            return None
        ip = self.book.offer(mac, machine, request.requested_ip)
        if ip is None:
            log.warning(
                "%s asked for an address but the pool %s is exhausted; it gets no answer; "
                "enlarge [network] pool",
                self._who(mac, machine),
                self.book.pool,
            )
            return None
        reply = self._lease_reply(request, MessageType.OFFER, ip, machine)
        self._add_boot(reply, boot)
        log.info("%s asked for an address; offered %s%s", self._who(mac, machine), ip, boot.note)
        self._record(mac, boot, f"asked for an address; offered {ip}{boot.note}", ip, "offered")
        return reply

    def _request(self, request: Packet, mac: str, machine: MachineSection | None) -> Packet | None:
        server_id = request.server_id
        if server_id is not None and server_id != self.server_ip:
            return None  # SELECTING another server's offer
        ip = request.requested_ip or (request.ciaddr if request.ciaddr != _ZERO else None)
        if ip is None:
            return None
        if not self.serves(mac, machine):
            # RFC 2131 4.3.2: no record of this client, so stay silent (unless the address is
            # plainly on the wrong network, which any authoritative server must NAK).
            return (
                self._nak(request, f"{ip} is not on this network")
                if ip not in self.subnet
                else None
            )
        if ip not in self.subnet or not self.book.may_hold(mac, machine, ip):
            return self._nak(request, f"{ip} is not yours; ask again (DHCPDISCOVER)")
        boot = self._boot(request)
        lease_time = self.inventory.config.network.lease_time
        self.book.bind(mac, ip, lease_time)
        self.inventory.learn(mac, ip, Source.LEASE)
        reply = self._lease_reply(request, MessageType.ACK, ip, machine)
        self._add_boot(reply, boot)
        state = "renewed" if request.ciaddr != _ZERO else "bound"
        log.info("%s %s %s for %ss%s", self._who(mac, machine), state, ip, lease_time, boot.note)
        self._record(mac, boot, f"{state} {ip} for {lease_time}s{boot.note}", ip, state)
        return reply

    def _inform(self, request: Packet, mac: str, machine: MachineSection | None) -> Packet | None:
        # RFC 2131 4.3.5: the client has an address already and wants only the options.
        if request.ciaddr not in self.subnet:
            return None
        reply = request.reply(MessageType.ACK)
        reply.ciaddr = request.ciaddr
        self._network_options(reply, machine)
        return reply

    def _nak(self, request: Packet, why: str) -> Packet:
        reply = request.reply(MessageType.NAK)
        reply.options[Opt.SERVER_ID] = self.server_ip.packed
        reply.options[Opt.MESSAGE] = why.encode()
        if request.giaddr != _ZERO:
            reply.flags |= 0x8000  # RFC 2131 4.3.2: relays must broadcast a NAK
        log.info(
            "%s: sent NAK: %s", self._who(request.mac, self.inventory.who_is(request.mac)), why
        )
        return reply

    # -- building replies

    def _lease_reply(
        self, request: Packet, kind: MessageType, ip: IPv4Address, machine: MachineSection | None
    ) -> Packet:
        reply = request.reply(kind)
        reply.yiaddr = ip
        lease_time = self.inventory.config.network.lease_time
        reply.options[Opt.SERVER_ID] = self.server_ip.packed
        reply.options[Opt.LEASE_TIME] = lease_time.to_bytes(4, "big")
        # RFC 2131 4.4.5 defaults: renew at half the lease, rebind at 7/8.
        reply.options[Opt.RENEWAL_TIME] = (lease_time // 2).to_bytes(4, "big")
        reply.options[Opt.REBINDING_TIME] = (lease_time * 7 // 8).to_bytes(4, "big")
        self._network_options(reply, machine)
        return reply

    def _network_options(self, reply: Packet, machine: MachineSection | None) -> None:
        config = self.inventory.config
        reply.options[Opt.SERVER_ID] = self.server_ip.packed
        reply.options[Opt.SUBNET_MASK] = self.subnet.netmask.packed
        reply.options[Opt.BROADCAST_ADDRESS] = self.subnet.broadcast_address.packed
        if config.network.gateway is not None:
            reply.options[Opt.ROUTER] = config.network.gateway.packed
        # The appliance answers the lab's names and forwards the rest to [network] dns.
        reply.options[Opt.DNS_SERVERS] = self.server_ip.packed
        reply.options[Opt.DOMAIN_NAME] = config.lab.domain.encode()
        if machine is not None:
            reply.options[Opt.HOSTNAME] = machine.name.encode()

    def _boot(self, request: Packet) -> BootAnswer:
        try:
            client = boot_client(request)
        except NotABootRequest as why:
            log.info("%s asked to boot but gets no boot file: %s", request.mac, why)
            return BootAnswer()
        if client is None:
            return BootAnswer()
        decision = self.inventory.decide(
            client.mac, client.arch, loaders=self.policy.loaders(client)
        )
        self.inventory.seen(client.mac, client.arch)
        if decision.silent is Silence.UNKNOWN_IGNORED:
            return BootAnswer(silent=True)
        return BootAnswer(client, self.policy.boot_file(client, decision))

    def _record(
        self, mac: str, boot: BootAnswer, message: str, ip: IPv4Address, action: str
    ) -> None:
        """`action`: offered, bound, renewed, released or declined."""
        # A boot client's request is a step of the boot chain; a plain lease (the booted OS
        # renewing) must not make an `up` machine look like it is booting again.
        fields: dict[str, FieldValue]
        if boot.client is not None and boot.file is not None:
            kind = Kind.DHCP_OFFER if action == "offered" else Kind.DHCP_ACK
            fields = boot_fields(self.mode, 67, boot.client, boot.file, ip)
        else:
            kind = Kind.DHCP_LEASE
            fields = {"action": action, "ip": str(ip)}
            if action in ("bound", "renewed"):
                fields["lease_time"] = self.inventory.config.network.lease_time
        # An offer is not the machine's address yet: only a bound lease says where it is.
        held = None if action in ("offered", "released", "declined") else ip
        self.inventory.record(mac, kind, message, held, fields)

    def _add_boot(self, reply: Packet, boot: BootAnswer) -> None:
        if boot.client is not None and boot.file is not None:
            add_boot_options(reply, boot.client, boot.file, self.server_ip, proxy=False)

    @staticmethod
    def _who(mac: str, machine: MachineSection | None) -> str:
        return wording.machine(mac, machine.name if machine else None)
