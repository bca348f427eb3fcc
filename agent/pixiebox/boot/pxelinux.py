"""pxelinux.cfg files for U-Boot boards, answered the same way over TFTP and HTTP.

U-Boot's `pxe get` (docs/firmware-quirks.md#30: U-Boot ignores proxy offers, so these boards run in
reservation or full mode) asks for pxelinux.cfg/<uuid>, then 01-<mac>, then the address in hex
ever shorter, then `default`. The MAC file is where a board is recognised and recorded; the others
are answered "not found" at once so the board gets there quickly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from ipaddress import IPv4Address

from pixiebox.boot.claim import claim
from pixiebox.boot.grub_cfg import GRUB_DIR, grub_for
from pixiebox.boot.ipxe_script import pxelinux_config
from pixiebox.boot.raspi import Served, raspi_file
from pixiebox.config import normalize_mac
from pixiebox.core.firmware import ArchInfo, Firmware, known_arches
from pixiebox.core.inventory import Inventory
from pixiebox.core.urls import BootUrls
from pixiebox.events import Fields, Kind

log = logging.getLogger("pixiebox.boot.pxelinux")

PXELINUX_DIR = "pxelinux.cfg/"
_MAC_FILE = re.compile(r"01-([0-9a-fA-F]{2}(?:-[0-9a-fA-F]{2}){5})")
#: U-Boot's option-93 codes by CPU (docs/firmware-quirks.md#30: 21 armv7, 22 armv8).
_UBOOT_BY_CPU = {info.cpu: info for info in known_arches() if info.firmware is Firmware.UBOOT}


def board_arch(inventory: Inventory, mac: str) -> ArchInfo | None:
    """The U-Boot firmware of the board `mac`, as DHCP recorded it a moment before it asked for
    its pxelinux.cfg (which names no architecture: docs/firmware-quirks.md#30); None when
    nothing was recorded, and the decision then boots the base image. Never a fixed guess: an
    armv7 board (a Jetson TK1) handed an arm64 kernel would not start, and `seen` would record
    the wrong CPU."""
    cpu = inventory.recorded_cpu(mac)
    return _UBOOT_BY_CPU.get(cpu) if cpu is not None else None


def pxelinux_for(
    inventory: Inventory,
    urls: BootUrls,
    file: str,
    ip: IPv4Address | None,
    emit: Callable[[Kind, str, str, Fields], None] | None = None,
    *,
    strict: bool = True,
) -> str | None:
    """The pxelinux.cfg/`file` a board at `ip` should get, or None for "not found".
    `emit(kind, mac, message, fields)` hears of a board recognised (boot HTTP's events).
    `strict`: False over TFTP, where the kernel may have no neighbour entry for the board yet
    (core.inventory `prove`)."""
    describe = inventory.describe_address(ip) if ip is not None else "a U-Boot board"
    match = _MAC_FILE.fullmatch(file)
    if match:
        mac: str | None = normalize_mac(match.group(1))
    elif file == "default":
        mac = inventory.mac_at(ip) if ip is not None else None
    else:
        log.debug("%s asked for pxelinux.cfg/%s: not served", describe, file)
        return None
    if mac is None:
        # `default` from an address no MAC is known for: the fallback for a board whose MAC file
        # was not answered; it cannot be recorded.
        # No MAC, so no recorded architecture: the base image.
        image = inventory.decide(None, None).image
        if image is None:  # unknown machines ignored, or no such image
            log.info("%s asked for pxelinux.cfg/default; not answered", describe)
            return None
        log.info(
            "%s fetched pxelinux.cfg/default; next: kernel %s of the default image %s",
            describe, image.kernel, image.name,
        )  # fmt: skip
        return pxelinux_config(urls, image.section, mac=None, name=None, image_name=image.name)
    arch = board_arch(inventory, mac)
    got = claim(inventory, mac, ip, arch, PXELINUX_DIR + file, strict=strict)
    if got.ignored and emit is not None:
        emit(Kind.BOOT_IGNORED, mac, "not booted ([boot] unknown = ignore)",
             {"reason": "unknown-ignored", "protocol": "http"})  # fmt: skip
    found = got.image
    if found is None:
        return None
    if got.proven:
        if len(found.initrd) > 1:
            log.warning(
                "[images.%s] has %d initrds, but U-Boot loads one: concatenate them into one"
                " file for %s", found.name, len(found.initrd), got.verdict.who,
            )  # fmt: skip
        log.info("%s fetched pxelinux.cfg/%s; next: kernel %s over TFTP", got.verdict.who, file,
                 found.kernel)  # fmt: skip
        if emit is not None:
            served = {"file": PXELINUX_DIR + file, "image": found.name, "kernel": found.kernel}
            emit(Kind.HTTP_PXELINUX, mac, f"fetched its pxelinux.cfg for image {found.name}",
                 served)  # fmt: skip
    return pxelinux_config(
        urls, found.section, mac=mac, name=got.name, image_name=found.name, token=got.token,
        arch=arch.cpu if arch is not None else None,
    )  # fmt: skip


def tftp_generator(inventory: Inventory, urls: BootUrls) -> Callable[[str, str], Served | None]:
    """The TFTP server's hook for files on no disk: pxelinux.cfg/* for U-Boot, grub/* for the
    signed chain's GRUB (boot.grub_cfg), a Raspberry Pi's `<serial>/...` (boot.raspi)."""

    def generate(path: str, client_ip: str) -> Served | None:
        if not path.startswith((PXELINUX_DIR, GRUB_DIR)):
            return raspi_file(inventory, urls, path, client_ip)
        try:
            ip: IPv4Address | None = IPv4Address(client_ip)
        except ValueError:
            ip = None
        if path.startswith(GRUB_DIR):
            text = grub_for(inventory, urls, path, ip)
        else:
            text = pxelinux_for(inventory, urls, path.removeprefix(PXELINUX_DIR), ip, strict=False)
        return None if text is None else text.encode()

    return generate
