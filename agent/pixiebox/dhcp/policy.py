"""PXE policy: is this a boot request, from which firmware, and which file does it get?

Shared by the three DHCP modes; each mode decides about addresses, this decides about booting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Address

from pixiebox.core.decision import BootDecision, Chain, LoaderCheck
from pixiebox.core.firmware import ArchInfo, Assets, Firmware, arch_info
from pixiebox.core.raspi import (
    OLD_ROM_UUID,
    RASPI_ARCH,
    firmware_file,
    is_raspberry_pi,
    missing_firmware_hint,
)
from pixiebox.core.urls import BootUrls
from pixiebox.dhcp.codec import DecodeError, Opt, Packet, encode_suboptions
from pixiebox.events import FieldValue

log = logging.getLogger("pixiebox.dhcp")

PXE_CLIENT = "PXEClient"
HTTP_CLIENT = "HTTPClient"
IPXE_USER_CLASS = "iPXE"

#: Option 43, PXE sub-option 6 (PXE_DISCOVERY_CONTROL) = 8: "boot the file in this offer, no
#: boot-server discovery, no menu". Sent to BIOS ROMs only: many UEFI ROMs ignore a proxy offer
#: that carries it and only boot after asking on port 4011 (docs/firmware-quirks.md#3).
PXE_SKIP_DISCOVERY = encode_suboptions({6: b"\x08"})


def raspi_option43(uuid: bytes | None) -> bytes:
    """Option 43 for a Raspberry Pi, which boots only when it finds the "Raspberry Pi Boot" menu
    entry (docs/firmware-quirks.md#26, #28: the Pi 4/5 EEPROM's `PXE_OPTION43` default): as the
    reply in raspberrypi/documentation boot-net.adoc carries it, PXE_DISCOVERY_CONTROL 3,
    PXE_MENU_PROMPT (timeout 0, "PXE") and PXE_BOOT_MENU with one item (type 0, that
    description); the Pi 3 ROM before the 3B+ (its constant option 97) needs three spaces after
    the string."""
    text = b"Raspberry Pi Boot" + (b"   " if uuid == OLD_ROM_UUID else b"")
    menu = b"\x00\x00" + bytes((len(text),)) + text
    return encode_suboptions({6: b"\x03", 10: b"\x00PXE", 9: menu})


class NotABootRequest(Exception):
    """The packet is well formed but asks for nothing we boot (the reason says why)."""


@dataclass(frozen=True, slots=True)
class BootClient:
    """What a DHCP request tells about the firmware that sent it."""

    mac: str
    arch: ArchInfo
    arch_code: int | None
    ipxe: bool  # user class "iPXE": already running iPXE, give it the script
    http_boot: bool  # UEFI HTTP boot (vendor class "HTTPClient")
    uuid: bytes | None  # option 97, echoed back (RFC 4578 2.3)


def boot_client(packet: Packet) -> BootClient | None:
    """The boot client behind a request, None for plain DHCP clients (a laptop, the OSIE's own
    dhclient), and NotABootRequest for PXE clients we cannot serve.

    Raises DecodeError for malformed PXE options."""
    vendor = packet.vendor_class or ""
    user_classes = packet.user_classes
    arches = packet.client_arches
    ipxe = IPXE_USER_CLASS in user_classes
    if not (vendor.startswith((PXE_CLIENT, HTTP_CLIENT, "U-Boot")) or ipxe or arches):
        return None
    uuid = packet.client_uuid
    # docs/firmware-quirks.md#1: some ROMs omit 97 (accept), but a present one must be RFC 4578's 17
    # bytes with type 0, otherwise echoing it back confuses the very ROM that sent it.
    if uuid is not None and (len(uuid) != 17 or uuid[0] != 0):
        raise DecodeError(f"option 97 (client UUID) is malformed: {uuid.hex()}")
    code = arches[0] if arches else None
    info = arch_info(code)
    if info is None:
        raise NotABootRequest(f"client architecture {code} is not one Pixiebox can boot")
    if code in (None, 0) and not ipxe and is_raspberry_pi(packet.mac, uuid):
        # A Pi's boot loader says "BIOS PC" (docs/firmware-quirks.md#26, #28); a Pi running
        # UEFI firmware sends 11 and gets arm64 iPXE like any arm64 UEFI machine.
        info = RASPI_ARCH
    return BootClient(
        mac=packet.mac,
        arch=info,
        arch_code=code,
        ipxe=ipxe,
        http_boot=vendor.startswith(HTTP_CLIENT) or info.firmware is Firmware.UEFI_HTTP,
        uuid=uuid,
    )


@dataclass(frozen=True, slots=True)
class BootFile:
    """The first thing a client loads: a TFTP path or, for iPXE and HTTP boot, a URL."""

    name: str
    vendor_class: str  # what the reply's option 60 says (PXE spec / UEFI HTTP boot spec)


@dataclass(frozen=True, slots=True)
class BootPolicy:
    assets: Assets
    urls: BootUrls

    @property
    def server_ip(self) -> IPv4Address:
        return self.urls.server_ip

    def has_loader(self, name: str) -> bool:
        return self.assets.loader_file(name) is not None

    def loaders(self, client: BootClient) -> LoaderCheck | None:
        """What the boot decision checks loaders with: nothing for a client already running
        iPXE (it gets its script, not a loader)."""
        if client.ipxe:
            return None
        return (
            self.has_raspi_firmware
            if client.arch.firmware is Firmware.RASPBERRY_PI
            else self.has_loader
        )

    def has_raspi_firmware(self, name: str) -> bool:
        return firmware_file(self.assets.root, name) is not None

    def boot_file(self, client: BootClient, decision: BootDecision) -> BootFile | None:
        """The file for this client as `decision` (asked with `loaders(client)`) resolves it, or
        None (with a log line naming the file to add) when its loader is not on this appliance."""
        if client.ipxe:
            # iPXE is already running: sending it iPXE again would loop, so it gets its script.
            return BootFile(self.urls.script(client.mac), PXE_CLIENT)
        info = client.arch
        loader = decision.loader
        if info.firmware is Firmware.RASPBERRY_PI:
            # No boot file: the Pi fetches its firmware by fixed names under its serial number
            # (docs/firmware-quirks.md#27, #28), as smee sends it none.
            if loader is not None:
                return BootFile("", PXE_CLIENT)
            log.warning(
                "%s (a Raspberry Pi) asked to boot, but its firmware (%s) is not on this "
                "appliance; not answering it so that it moves on to its next boot device; to "
                "boot it, %s",
                decision.who,
                info.loader,
                missing_firmware_hint(self.assets.root),
            )
            return None
        if loader is None and decision.chain is Chain.SIGNED:
            # Not iPXE instead: with Secure Boot on the firmware refuses it
            # (docs/firmware-quirks.md#33); silence lets it try its next boot device.
            log.warning(
                "%s (%s) asked to boot with Secure Boot (lab.toml secure_boot), but the signed "
                "chain is not on this appliance; not answering it so that it moves on to its "
                "next boot device; to boot it, %s",
                decision.who,
                info.label,
                self.assets.missing_signed_hint(),
            )
            return None
        if loader is None:
            log.warning(
                "%s (%s) asked to boot, but %s is missing; not answering it so that it "
                "moves on to its next boot device; to boot it, %s",
                decision.who,
                info.label,
                info.loader,
                self.assets.missing_loader_hint(info),
            )
            return None
        if loader.fallback:
            log.info(
                "%s reports %s; %s is not in the assets, so it gets %s (most machines that "
                "report this are x86-64 UEFI); add %s for genuine 32-bit UEFI",
                decision.who,
                info.label,
                loader.wanted,
                loader.file,
                loader.wanted,
            )
        # The signed chain is TFTP only (core.firmware.signed_chain_fits: shim fetches GRUB by
        # TFTP from the boot file's server and directory).
        signed = decision.chain is Chain.SIGNED
        if client.http_boot and info.firmware is not Firmware.UBOOT and not signed:
            return BootFile(self.urls.ipxe_binary(loader.file), HTTP_CLIENT)
        return BootFile(loader.file, PXE_CLIENT)


def boot_fields(
    mode: str, port: int, client: BootClient, boot_file: BootFile, ip: IPv4Address | None = None
) -> dict[str, FieldValue]:
    """The facts of an answer with boot information: a dhcp.offer or dhcp.ack event's fields."""
    fields: dict[str, FieldValue] = {
        "mode": mode,
        "port": port,
        "firmware": "iPXE" if client.ipxe else str(client.arch.firmware),
        "arch": client.arch.cpu,
        "ipxe": client.ipxe,
        "boot_file": boot_file.name,
    }
    if ip is not None:
        fields["ip"] = str(ip)
    return fields


def add_boot_options(
    reply: Packet, client: BootClient, boot_file: BootFile, server_ip: IPv4Address, *, proxy: bool
) -> None:
    """Put the boot information into a reply, where every firmware looks for it.

    The boot server and file go in the fixed siaddr/sname/file fields, never in overloaded
    options (docs/firmware-quirks.md#15); siaddr and option 54 are always set or PXE ROMs go looking
    for a boot server on port 4011 (#2)."""
    reply.siaddr = server_ip
    reply.sname = str(server_ip).encode()
    reply.file = boot_file.name.encode()
    reply.options[Opt.SERVER_ID] = server_ip.packed
    if client.uuid is not None:
        reply.options[Opt.CLIENT_UUID] = client.uuid
    if proxy or boot_file.vendor_class == HTTP_CLIENT:
        # The PXE spec wants a ProxyDHCP server to identify itself as "PXEClient"; UEFI HTTP boot
        # only accepts offers saying "HTTPClient".
        reply.options[Opt.VENDOR_CLASS] = boot_file.vendor_class.encode()
    if proxy and client.arch.firmware is Firmware.BIOS and not client.ipxe:
        reply.options[Opt.VENDOR_SPECIFIC] = PXE_SKIP_DISCOVERY
    if client.arch.firmware is Firmware.RASPBERRY_PI:
        # In every mode: the documented reply (boot-net.adoc) says "PXEClient" and carries the
        # menu the Pi looks for (docs/firmware-quirks.md#26).
        reply.options[Opt.VENDOR_CLASS] = PXE_CLIENT.encode()
        reply.options[Opt.VENDOR_SPECIFIC] = raspi_option43(client.uuid)
