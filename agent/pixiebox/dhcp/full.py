"""Full mode: reservation mode plus a dynamic pool for every other machine.

The appliance is then the segment's only DHCP server (the rogue-DHCP guard checks that first),
so unknown machines and enrolled machines without an `ip` get pool addresses whose leases
survive restarts (see leases.AddressBook).
"""

from __future__ import annotations

from pixiebox.config import MachineSection
from pixiebox.dhcp.reservation import ReservationHandler


class FullHandler(ReservationHandler):
    mode: str = "full"

    def serves(self, mac: str, machine: MachineSection | None) -> bool:
        return True
