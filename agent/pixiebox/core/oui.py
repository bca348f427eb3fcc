"""Who made a network card, from its MAC's OUI (the IEEE registry that netaddr ships and keeps
up to date), so a discovered machine reads "NVIDIA" rather than just 00:04:4b:…"""

from __future__ import annotations

import functools

from netaddr import EUI, AddrFormatError, NotRegisteredError


@functools.lru_cache(maxsize=4096)
def vendor_of(mac: str) -> str | None:
    """The registered organisation of `mac`'s OUI; None for locally administered or unknown
    prefixes (QEMU's 52:54:00, randomised MACs)."""
    try:
        org: str = EUI(mac).oui.registration().org
    except (NotRegisteredError, AddrFormatError, IndexError, ValueError):
        return None
    return org.strip() or None


#: Raspberry Pi Foundation / Raspberry Pi (Trading) Ltd / Raspberry Pi Ltd OUIs. The Pi's boot
#: loaders say "PXEClient:Arch:00000" like a BIOS PC (docs/firmware-quirks.md#26, #28: the Pi 5
#: sends option 93 = 0), so the MAC is how a Pi is told apart, as Tinkerbell's smee does
#: (smee/internal/dhcp/dhcp.go `IsRaspberryPI`: the first five), with 2c:cf:67 (Pi 5 era) added.
RASPBERRY_PI_OUIS = frozenset(
    {"b8:27:eb", "dc:a6:32", "e4:5f:01", "28:cd:c1", "2c:cf:67", "d8:3a:dd"}
)


def is_raspberry_pi_mac(mac: str) -> bool:
    """Whether `mac` (lower case, colon-separated, as pixiebox normalises MACs) has a
    Raspberry Pi OUI."""
    return mac[:8].lower() in RASPBERRY_PI_OUIS
