"""What a Raspberry Pi fetches over TFTP, from the one boot decision.

A Pi's boot loader has no HTTP and runs no iPXE (docs/firmware-quirks.md#27, #28): it asks TFTP
for every file under its serial number (`<serial>/start4.elf`, `<serial>/config.txt`, ...), so
the boot configuration iPXE would get as a script is rendered here as the two files the Pi's
firmware reads:

- `config.txt`: 64-bit mode, the serial console, and the kernel and initramfs the image names
  (its arm64 build: core.decision), which the firmware then fetches under the same prefix;
- `cmdline.txt`: the kernel command line the iPXE script would give (boot.ipxe_script
  `kernel_arguments`), with the boot token only for the proven owner, settled by boot.claim as
  for U-Boot's and GRUB's MAC-named files.

The firmware files (start4.elf, fixup4.dat, ...) come from Debian's raspi-firmware
(core.raspi), the device trees from [boot] assets/raspi/ or the image's `fdtdir`, the kernel
and initrds from [boot] assets: the prefix is only the Pi's way of asking, and the machine is
the one the evidence shows at the asking address (or the MAC a `dc-a6-32-..` prefix names).
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address
from pathlib import Path

from pixiebox.boot.claim import claim
from pixiebox.boot.ipxe_script import kernel_arguments
from pixiebox.config import ImageSection
from pixiebox.core.decision import BootImage, Silence
from pixiebox.core.inventory import Inventory
from pixiebox.core.raspi import RASPI_ARCH, RaspiPath, firmware_file, parse_path
from pixiebox.core.urls import BootUrls
from pixiebox.events import FieldValue, Kind

log = logging.getLogger("pixiebox.boot.raspi")

#: What the Pi's firmware reads as its configuration and as the kernel's command line.
CONFIG = "config.txt"
CMDLINE = "cmdline.txt"
#: The Pi 3 ROM's first request, without a prefix (raspberrypi/documentation boot-net.adoc).
BOOTCODE = "bootcode.bin"
#: config_txt boot.adoc: `initramfs` and `ramfsfile` lines longer than this may be cut.
LINE_LIMIT = 80

#: A file on disk for TFTP: a directory and the name under it (tftp.files opens it under
#: net.paths' rule), or the content of a generated file.
Served = bytes | tuple[Path, str]


def _word(text: str) -> str:
    """A lab.toml value as one config.txt word: the firmware splits on spaces and lines."""
    return "".join(text.split())


def config_txt(image: BootImage, serial: str | None) -> str:
    """The config.txt that boots `image` on a Pi: the firmware reads the kernel and initramfs
    named here under its TFTP prefix (boot.adoc `kernel`, `initramfs ... followkernel`), and
    `upstream_kernel=1` makes it load the mainline device tree names (bcm2711-rpi-4-b.dtb) that
    Debian's kernels ship, as Debian's own raspi-firmware configuration does."""
    section = image.section
    build = f" ({image.arch} build)" if image.arch else ""
    lines = [
        f"# Pixiebox config.txt for the Raspberry Pi {serial or ''}".rstrip()
        + f": image {image.name}{build}",
        "# Every file below is fetched over TFTP under this file's directory.",
        "arm_64bit=1",
        "enable_uart=1",
        "upstream_kernel=1",
        f"kernel={_word(section.kernel)}",
    ]
    if section.initrd:
        lines.append(f"initramfs {','.join(_word(i) for i in section.initrd)} followkernel")
    if section.fdt.strip():
        lines.append(f"device_tree={_word(section.fdt)}")
    long = [line for line in lines[2:] if len(line) > LINE_LIMIT]
    if long:
        log.warning(
            "[images.%s]: config.txt line %r is longer than the Raspberry Pi firmware's %d "
            "characters; shorten the paths", image.name, long[0], LINE_LIMIT,
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def cmdline_txt(
    urls: BootUrls,
    section: ImageSection,
    *,
    mac: str | None,
    name: str | None,
    token: str | None,
) -> str:
    """The kernel command line, one line: the iPXE script's (kernel_arguments) and the CPU as
    pxelinux gives it; without a MAC (nothing ties the address to a machine) only the image's
    own arguments and where the appliance is."""
    if mac is None:
        args = [" ".join(section.cmdline.split())] if section.cmdline.strip() else []
        args.append(f"pixiebox.url={urls.base}")
    else:
        args = kernel_arguments(urls, section, mac=mac, name=name, token=token)
        if not any(arg.startswith("pixiebox.arch=") for arg in args):
            args.append(f"pixiebox.arch={RASPI_ARCH.cpu}")
    return " ".join(args) + "\n"


def raspi_file(inventory: Inventory, urls: BootUrls, path: str, client_ip: str) -> Served | None:
    """What TFTP sends for `path` (normalised) from `client_ip`, when it is a Pi's request;
    None for "not found" (and for anything that is not a Pi's)."""
    assets = inventory.config.boot.assets
    parsed = parse_path(path)
    if parsed is None:
        return firmware_file(assets, BOOTCODE) if path == BOOTCODE else None
    try:
        ip: IPv4Address | None = IPv4Address(client_ip)
    except ValueError:
        ip = None
    mac = parsed.mac or (inventory.mac_at(ip) if ip is not None else None)
    if parsed.name == CMDLINE:
        return _cmdline(inventory, urls, parsed, path, mac, ip)
    verdict = inventory.decide(mac, RASPI_ARCH)
    if verdict.silent is Silence.UNKNOWN_IGNORED:
        log.debug("%s asked for %s: not answered ([boot] unknown = ignore)", verdict.who, path)
        return None
    image = verdict.image
    if parsed.name == CONFIG:
        if image is None:
            log.error("%s asked for %s, but lab.toml has no [images.%s]", verdict.who, path,
                      verdict.image_name)  # fmt: skip
            return None
        log.info("%s fetched %s; next: kernel %s over TFTP", verdict.who, path, image.kernel)
        return config_txt(image, parsed.serial).encode()
    return on_disk(assets, image.section if image is not None else None, parsed.name)


def on_disk(assets: Path, section: ImageSection | None, name: str) -> tuple[Path, str] | None:
    """Where `name` (under the Pi's prefix) is: [boot] assets (the kernel, the initrds, a
    `device_tree` file), the firmware directories (start4.elf, overlays/, device trees put
    there), then the image's `fdtdir`, flat or in Debian's broadcom/ subdirectory (where
    linux-image-arm64 keeps the Pi's .dtb files)."""
    if (assets / name).is_file():
        return assets, name
    found = firmware_file(assets, name)
    if found is not None:
        return found
    fdtdir = section.fdtdir.strip().strip("/") if section is not None else ""
    if fdtdir and name.endswith((".dtb", ".dtbo")):
        for candidate in (f"{fdtdir}/{name}", f"{fdtdir}/broadcom/{name}"):
            if (assets / candidate).is_file():
                return assets, candidate
    return None


def _cmdline(
    inventory: Inventory,
    urls: BootUrls,
    parsed: RaspiPath,
    path: str,
    mac: str | None,
    ip: IPv4Address | None,
) -> bytes | None:
    if mac is None:
        # Nothing ties the address to a machine (no lease, no DHCP request, no neighbour
        # entry): the image's command line without a token, recorded nowhere.
        image = inventory.decide(None, RASPI_ARCH).image
        if image is None:
            return None
        log.info("%s fetched %s; no evidence says which machine it is: no boot token",
                 ip, path)  # fmt: skip
        return cmdline_txt(urls, image.section, mac=None, name=None, token=None).encode()
    got = claim(inventory, mac, ip, RASPI_ARCH, path, strict=False)
    found = got.image
    if found is None:
        return None
    if got.proven:
        log.info("%s fetched %s; next: kernel %s over TFTP", got.verdict.who, path, found.kernel)
        fields: dict[str, FieldValue] = {"file": path, "image": found.name, "kernel": found.kernel}
        serial = ""
        if parsed.serial is not None:
            fields["serial"] = parsed.serial
            serial = f" (Raspberry Pi serial {parsed.serial})"
        inventory.record(mac, Kind.HTTP_PXELINUX, f"fetched its {CMDLINE} over TFTP{serial} for "
                         f"image {found.name}", ip, fields)  # fmt: skip
    text = cmdline_txt(urls, found.section, mac=mac, name=got.name, token=got.token)
    return text.encode()
