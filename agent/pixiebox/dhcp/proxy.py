"""ProxyDHCP: boot information only, never an address.

The home router keeps handing out addresses; we answer PXE clients' DISCOVER on port 67 with an
offer that has yiaddr 0.0.0.0 and the boot file, and their follow-up REQUEST on port 4011 (PXE
spec 2.1 "ProxyDHCP"; UEFI ROMs and iPXE ask there, FIRMWARE-QUIRKS #3 and #8). Plain DHCP
clients never hear from us, which is what makes this mode safe on any LAN.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

from pixiebox.core.inventory import Inventory
from pixiebox.dhcp.codec import MessageType, Packet
from pixiebox.dhcp.policy import BootPolicy, NotABootRequest, add_boot_options, boot_client

log = logging.getLogger("pixiebox.dhcp")

PXE_PORT = 4011


class ProxyHandler:
    mode: str = "proxy"
    ports: tuple[int, ...] = (67, PXE_PORT)

    def __init__(self, inventory: Inventory, policy: BootPolicy) -> None:
        self.inventory = inventory
        self.policy = policy

    @property
    def server_ip(self) -> IPv4Address:
        return self.policy.server_ip

    def handle(self, request: Packet, port: int) -> Packet | None:
        kind = request.message_type
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
            log.info("%s asked to boot but is not answered: %s", request.mac, why)
            return None
        if client is None:
            return None  # a plain DHCP client: the router's business, not ours
        verdict = self.inventory.boot_verdict(client.mac, client.arch)
        if verdict.action == "ignore":
            return None
        boot_file = self.policy.boot_file(client, verdict.who)
        if boot_file is None:
            return None
        reply = request.reply(answer)
        if port == PXE_PORT:
            reply.ciaddr = request.ciaddr
        add_boot_options(reply, client, boot_file, self.server_ip, proxy=True)
        how = "script URL" if client.ipxe else "boot file"
        firmware = "iPXE" if client.ipxe else client.arch.label
        log.info(
            "%s (%s) asked to boot; sent proxy %s with %s %s; next it should fetch it",
            verdict.who, firmware, answer.name, how, boot_file.name,
        )  # fmt: skip
        self.inventory.record(
            client.mac, "dhcp", f"{firmware} asked to boot (port {port}); sent a proxy "
            f"{answer.name} with {how} {boot_file.name}",
        )  # fmt: skip
        return reply
