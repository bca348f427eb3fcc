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
from pixiebox.net.limits import LogLimiter, Quota

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

#: Refused DECLINEs and RELEASEs logged (and recorded as events) per REFUSALS_PERIOD seconds at
#: most: anyone on the segment can send them as fast as the link carries them, and neither the
#: log nor the event table may grow with that. The first line after a quiet spell says how many
#: were left out.
REFUSALS_LOGGED = 10
REFUSALS_PERIOD = 60.0


def client_id(request: Packet) -> str:
    """The client identifier (option 61) as hex, "" when the client sent none."""
    return request.options.get(Opt.CLIENT_ID, b"").hex()


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
        self._refusals = Quota(REFUSALS_LOGGED, REFUSALS_PERIOD)
        #: Lines about machines not in lab.toml, per kind (net.limits.LogLimiter): in full mode
        #: anyone on the LAN can cause an offer, a lease and a line from as many random MACs
        #: as the link carries.
        self.said = LogLimiter(log)
        book.set_reservations(inventory.machines())

    @property
    def server_ip(self) -> IPv4Address:
        return self.policy.server_ip

    def reload(self) -> None:
        self.book.set_reservations(self.inventory.machines())

    def held_addresses(self) -> set[IPv4Address]:
        """Addresses leased or quarantined now: not to be reserved for another machine."""
        return self.book.held()

    def known(self, mac: str) -> bool:
        """Enrolled, or holding a lease of ours (a pool client renewing is not a stranger)."""
        if self.inventory.who_is(mac) is not None:
            return True
        lease = self.book.lease_of(mac)
        return lease is not None and lease.state == "bound"

    def flush(self) -> None:
        """Commit the leases bound since the last call: the server calls it before it sends."""
        self.book.flush()

    # -- what differs between reservation and full mode

    def serves(self, mac: str, machine: MachineSection | None) -> bool:
        """Whether this mode hands `mac` an address at all."""
        if machine is None:
            self._tell_once(
                None,
                mac,
                f"unknown machine {mac} asked for an address; reservation mode answers only "
                f"machines in lab.toml; enroll it with: "
                f"pixiebox enroll {mac} --name NAME --ip ADDRESS",
            )
            return False
        if machine.ip is None:
            self._tell_once(
                machine,
                mac,
                f"{machine.name} ({mac}) asked for an address but has no ip in lab.toml; "
                f'reservation mode cannot answer it; add ip = "..." to its [[machines]] entry',
            )
            return False
        return True

    def _tell_once(self, machine: MachineSection | None, mac: str, message: str) -> None:
        if mac in self._told:
            return
        if len(self._told) >= _LOGGED_ONCE_LIMIT:
            self._told.clear()
        self._told.add(mac)
        self._say(machine, "not-served", logging.INFO, "%s", message)

    def _say(
        self, machine: MachineSection | None, kind: str, level: int, message: str, *args: object
    ) -> None:
        """A line about one request: as it is for an enrolled machine, rate-limited per `kind`
        for a stranger, whose MAC anyone can make up."""
        if machine is not None:
            log.log(level, message, *args)
        else:
            self.said.log(kind, level, message, *args)

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
            self._release(request, mac, machine)
            return None
        if kind is MessageType.DECLINE:
            self._decline(request, mac, machine)
            return None
        if kind is MessageType.INFORM:
            return self._inform(request, mac, machine)
        return None

    # A DECLINE or RELEASE reaches a handler only from the lab interface: the server's sockets
    # are bound to it (server.DhcpServer.start, SO_BINDTODEVICE). Within the segment, DHCP has
    # no proof of the sender, so the lease book honours them only from the lease's holder
    # (leases.AddressBook.holds: chaddr and client identifier) and the rest is refused here.

    def _release(self, request: Packet, mac: str, machine: MachineSection | None) -> None:
        """RFC 2131 4.3.4: the client gives its address (ciaddr) back."""
        if request.server_id not in (None, self.server_ip):
            return  # a lease of another server's
        ip = request.ciaddr
        if not self.book.release(mac, ip, client_id(request)):
            self._refuse(request, mac, machine, "RELEASE", ip)
            return
        self._say(machine, "released", logging.INFO, "%s released %s", self._who(mac, machine), ip)
        self._record(mac, BootAnswer(), f"released {ip}", ip, "released")

    def _decline(self, request: Packet, mac: str, machine: MachineSection | None) -> None:
        """RFC 2131 4.3.3: the client found the address it was just given (option 50) in use by
        another host, so the address is quarantined (leases.DECLINE_QUARANTINE)."""
        declined = request.requested_ip
        if request.server_id != self.server_ip or declined is None:
            return  # another server's offer, or no address named (4.3.3 requires both)
        if not self.book.decline(mac, declined, client_id(request)):
            self._refuse(request, mac, machine, "DECLINE", declined)
            return
        log.warning(
            "%s declined %s: another host on the LAN is using that address; it is taken out "
            "of use for %s; find that host",
            self._who(mac, machine),
            declined,
            wording.span(self.book.quarantine),
        )
        self._record(mac, BootAnswer(), f"declined {declined}: another host uses it",
                     declined, "declined")  # fmt: skip

    def _refuse(
        self, request: Packet, mac: str, machine: MachineSection | None, what: str, ip: IPv4Address
    ) -> None:
        """A DECLINE or RELEASE not from the lease's holder: nothing changes, and it is said in
        the log, rate-limited (REFUSALS_LOGGED). It is a dhcp.refused event in the log of the
        machine whose MAC it carries only when the lab knows that MAC (enrolled, or seen before),
        and recorded without touching that machine's state or last-seen time: a forger must not be
        able to create machine records, fill the event table or make a machine look alive."""
        left_out = self._refusals.admit("refusal")
        if left_out is None:
            return
        why = self.book.not_holder(mac, ip, client_id(request))
        verb, clause = ("decline", "4.3.3") if what == "DECLINE" else ("release", "4.3.4")
        sentence = (
            f"ignored a DHCP{what} for {ip} sent with the MAC of {self._who(mac, machine)}: "
            f"{why}; only a lease's holder may {verb} it (RFC 2131 {clause}), so nothing "
            "changes; a host on the lab LAN sent a forged or stale message"
        )
        if left_out:
            sentence += f" ({left_out} more refusals were not logged)"
        log.warning("%s", sentence)
        if self.inventory.knows(mac):
            fields: dict[str, FieldValue] = {"reason": f"{verb}-not-holder", "ip": str(ip)}
            self.inventory.lifecycle.note(mac, Kind.DHCP_REFUSED, sentence, fields)

    def _discover(self, request: Packet, mac: str, machine: MachineSection | None) -> Packet | None:
        boot = self._boot(request)
        if boot.silent:
            return None
        if not self.serves(mac, machine):
            return None
        ip = self.book.offer(mac, machine, request.requested_ip)
        if ip is None:
            self._say(
                machine,
                "pool-exhausted",
                logging.WARNING,
                "%s asked for an address but the pool %s is exhausted; it gets no answer; "
                "enlarge [network] pool",
                self._who(mac, machine),
                self.book.pool,
            )
            return None
        reply = self._lease_reply(request, MessageType.OFFER, ip, machine)
        self._add_boot(reply, boot)
        self._say(machine, "offered", logging.INFO, "%s asked for an address; offered %s%s",
                  self._who(mac, machine), ip, boot.note)  # fmt: skip
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
        self.book.bind(mac, ip, lease_time, client_id(request))
        self.inventory.learn(mac, ip, Source.LEASE)
        reply = self._lease_reply(request, MessageType.ACK, ip, machine)
        self._add_boot(reply, boot)
        state = "renewed" if request.ciaddr != _ZERO else "bound"
        self._say(machine, state, logging.INFO, "%s %s %s for %ss%s",
                  self._who(mac, machine), state, ip, lease_time, boot.note)  # fmt: skip
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
        machine = self.inventory.who_is(request.mac)
        self._say(machine, "nak", logging.INFO, "%s: sent NAK: %s",
                  self._who(request.mac, machine), why)  # fmt: skip
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
            self._say(self.inventory.who_is(request.mac), "not-a-boot-request", logging.INFO,
                      "%s asked to boot but gets no boot file: %s", request.mac, why)  # fmt: skip
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
