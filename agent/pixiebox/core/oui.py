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
