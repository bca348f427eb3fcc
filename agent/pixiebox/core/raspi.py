"""The Raspberry Pi's network boot, as the protocols see it: which DHCP client is a Pi, what its
TFTP requests name, and where its firmware files are.

The Pi does not boot like a PC. Its boot ROM (Pi 3) or EEPROM boot loader (Pi 4, 5) asks DHCP
as "PXEClient:Arch:00000:UNDI:002001", option 93 = 0, like a BIOS PC, but boots only when the
offer's option 43 carries the "Raspberry Pi Boot" menu entry (docs/firmware-quirks.md#26, #28);
then it fetches the VideoCore firmware (start4.elf, fixup4.dat: Debian's raspi-firmware
package), `config.txt`, the device tree, `cmdline.txt`, the kernel and the initramfs over TFTP,
every name under a directory named after its serial number (`TFTP_PREFIX`, 8 lower-case hex
digits; or its MAC as `dc-a6-32-01-36-c2/`), and never runs iPXE (#27, #28). This module only
reads names and directories; boot.raspi renders config.txt and cmdline.txt from the decision.

Imports core.firmware, core.oui and core.trixie; nothing else of pixiebox.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pixiebox.core.firmware import ArchInfo, Firmware
from pixiebox.core.oui import is_raspberry_pi_mac
from pixiebox.core.trixie import trixie_root

#: What a Pi is to the decision: an arm64 machine (the Pi 3, 4 and 5 run 64-bit kernels; the
#: image's arm64 build is what it boots) whose first file is the VideoCore firmware. 41 is
#: IANA's "arm rpiboot" processor architecture type, the code smee forces for a Pi's MAC
#: (smee/internal/dhcp/dhcp.go `Arch`); no Pi sends it. Not in core.firmware's table: that is
#: keyed by what firmware sends in option 93, and its loaders are iPXE builds.
RASPI_ARCH = ArchInfo(41, "arm64", Firmware.RASPBERRY_PI, "start4.elf", in_debian_package=False)

#: The option 97 of the Pi 3 boot ROM before the 3B+: a constant, 16 bytes of 0x44
#: (raspberrypi/documentation boot-net.adoc, "DHCP UUID constant"). That ROM also needs three
#: spaces after "Raspberry Pi Boot" ("an error calculating the string length"), which is how
#: DHCP tells it from the later loaders that match the string exactly.
OLD_ROM_UUID = b"\x00" + b"\x44" * 16
#: The Pi 4/5 EEPROM's option 97 (`DHCP_OPTION97`, eeprom-bootloader.adoc): type 0, then the
#: FourCC "RPi4" or "RPi5" (0x34695052, 0x35695052), the board revision, the MAC's low 4 bytes
#: and the serial number. The bytes' order is not documented: both are accepted.
_FOURCCS = (b"RPi4", b"RPi5", b"4iPR", b"5iPR")


def is_raspberry_pi(mac: str, uuid: bytes | None) -> bool:
    """Whether the DHCP client `mac` (option 97 `uuid`) is a Raspberry Pi: by its OUI, as smee
    does, or by the FourCC a Pi 4/5 puts in option 97 (a Pi whose MAC_ADDRESS was changed)."""
    if is_raspberry_pi_mac(mac):
        return True
    return uuid is not None and len(uuid) == 17 and uuid[1:5] in _FOURCCS


@dataclass(frozen=True, slots=True)
class RaspiPath:
    """A TFTP name as a Pi's boot loader asks for it: `<prefix>/<name>`."""

    #: The serial number (8 or 16 lower-case hex digits) when the prefix is one.
    serial: str | None
    #: The MAC (colon-separated) when the prefix is the MAC (TFTP_PREFIX=2).
    mac: str | None
    #: The name under the prefix ("start4.elf", "config.txt", "osie-arm64/vmlinuz").
    name: str


_SERIAL = re.compile(r"([0-9a-f]{8}(?:[0-9a-f]{8})?)/(.+)")
_MAC_PREFIX = re.compile(r"((?:[0-9a-f]{2}-){5}[0-9a-f]{2})/(.+)")


def parse_path(path: str) -> RaspiPath | None:
    """`path` (normalised: no leading `/`) as a Pi's request, None when it has no Pi prefix.

    The Pi 4/5 EEPROM's TFTP_PREFIX is the serial number by default, or the MAC written with
    dashes (eeprom-bootloader.adoc `TFTP_PREFIX`); a custom `TFTP_PREFIX_STR` is not
    recognised. The firmware writes both in lower case."""
    match = _SERIAL.fullmatch(path)
    if match:
        return RaspiPath(match.group(1), None, match.group(2))
    match = _MAC_PREFIX.fullmatch(path)
    if match:
        return RaspiPath(None, match.group(1).replace("-", ":"), match.group(2))
    return None


#: What the Pi's boot loaders ask for and boot fine without, answered "not found" at once and
#: logged at debug level (tftp.files): the Pi 3 ROM's bootsig.bin (docs/firmware-quirks.md#27;
#: tftp.files has it already); the Pi 4 EEPROM's self-update and recovery probes
#: (`ENABLE_SELF_UPDATE`, eeprom-bootloader.adoc); start4.elf's optional files; and the
#: "upstream/" directory the firmware tries first under `upstream_kernel=1` (config_txt
#: boot.adoc, `os_prefix`), which it drops when the kernel is not there.
EXPECTED_MISSES = {
    "pieeprom.sig": "the Pi 4/5 boot loader looks for an EEPROM update",
    "pieeprom.upd": "the Pi 4/5 boot loader looks for an EEPROM update",
    "recover4.elf": "the Pi 4 boot loader looks for a recovery program",
    "recovery.elf": "the Pi 4 boot loader looks for a recovery program",
    "recovery.bin": "the Pi 4 boot loader looks for a recovery program",
    "dt-blob.bin": "the Pi firmware looks for an optional pin configuration",
    "overlays/overlay_map.dtb": "the Pi firmware looks for its overlay map",
    "overlays/hat_map.dtb": "the Pi firmware looks for its HAT map",
    "overlays/readme": "the Pi firmware tests whether overlays are under os_prefix",
}
UPSTREAM_PREFIX = "upstream/"


def expected_miss(path: str) -> str | None:
    """Why it is normal that `path` (a Pi's request, prefix included) is not found, or None."""
    parsed = parse_path(path)
    if parsed is None:
        return None
    if parsed.name.startswith(UPSTREAM_PREFIX):
        return (
            "the Pi firmware tries upstream/ first (upstream_kernel=1, docs/firmware-quirks.md#28)"
        )
    why = EXPECTED_MISSES.get(parsed.name.lower())
    return f"{why} (docs/firmware-quirks.md#28)" if why is not None else None


# -- the firmware files

#: Under [boot] assets: the user's own firmware files and device trees, looked at first.
ASSETS_DIR = "raspi"
#: Debian's raspi-firmware package, installed (non-free-firmware; the appliance).
SYSTEM_DIR = Path("/usr/lib/raspi-firmware")
#: Where that package keeps them, in build.sh's unpacked copy (image/trixie.txt).
PACKAGE_DIR = "usr/lib/raspi-firmware"
PACKAGE = "raspi-firmware"


def firmware_dirs(assets: Path) -> list[Path]:
    """Where a Pi's firmware files are looked for, in order: [boot] assets/raspi/ (the user's
    files win: a newer start4.elf, the board's .dtb files), Debian's raspi-firmware installed,
    then the copy `./build.sh trixie` unpacked (image/trixie.txt; a bookworm host has no
    non-free-firmware in its apt sources). Only directories that exist."""
    dirs = [assets / ASSETS_DIR, SYSTEM_DIR]
    unpacked = trixie_root(PACKAGE)
    if unpacked is not None and (unpacked / ".unpacked").is_file():
        dirs.append(unpacked / PACKAGE_DIR)
    return [d for d in dirs if d.is_dir()]


def firmware_file(assets: Path, name: str) -> tuple[Path, str] | None:
    """The firmware directory that has `name` (a plain name, or `overlays/x.dtbo`), and the name
    in it; None when none has it. The caller opens it under net.paths' rule."""
    for directory in firmware_dirs(assets):
        if (directory / name).is_file():
            return directory, name
    return None


def missing_firmware_hint(assets: Path) -> str:
    """What to do when no firmware directory has start4.elf."""
    return (
        f"run sudo ./build.sh trixie (it unpacks Debian's raspi-firmware), install the "
        f"raspi-firmware package (Debian non-free-firmware), or copy start4.elf and fixup4.dat "
        f"to {assets / ASSETS_DIR}"
    )


__all__ = [
    "ASSETS_DIR",
    "EXPECTED_MISSES",
    "OLD_ROM_UUID",
    "RASPI_ARCH",
    "RaspiPath",
    "expected_miss",
    "firmware_dirs",
    "firmware_file",
    "is_raspberry_pi",
    "missing_firmware_hint",
    "parse_path",
]
