"""The doctor asked about one machine of the running lab (the API, `lab up`): its events and
what lab.toml says of it, handed to the pure `diagnose` in one place, so that every caller
gives the same verdict for the same machine."""

from __future__ import annotations

from pixiebox.config import split_listen
from pixiebox.core.decision import Chain
from pixiebox.core.firmware import arch_info
from pixiebox.core.inventory import Inventory
from pixiebox.core.lifecycle import MachineState
from pixiebox.doctor.report import EVENTS
from pixiebox.doctor.verdict import DEFAULT_SETTLE, Diagnosis, diagnose

#: x86-64 UEFI (option 93 = 7): the only firmware lab.toml's secure_boot sends the signed chain.
_X86_64_UEFI = arch_info(7)


def diagnose_machine(
    inventory: Inventory,
    mac: str,
    *,
    state: MachineState,
    name: str,
    enrolled: bool,
    now: float,
    boot_timeout: float,
    settle: float = DEFAULT_SETTLE,
) -> Diagnosis:
    """`diagnose` for `mac` under the current lab.toml: its DHCP mode, boot HTTP port, and
    whether it is already sent the signed chain (then a machine refusing iPXE only needs a
    power-cycle, not the setting)."""
    config = inventory.config
    signed = inventory.decide(mac, _X86_64_UEFI).chain is Chain.SIGNED
    return diagnose(
        inventory.lifecycle.events(mac, limit=EVENTS), state=state, now=now,
        boot_timeout=boot_timeout, mode=config.network.dhcp_mode, name=name, settle=settle,
        enrolled=enrolled, http_port=split_listen(config.http.listen)[1], signed_chain=signed,
    )  # fmt: skip
