"""What the API and the CLI show of power: an action's outcome, a machine's last known power
state, and how a link of a power chain is named in sentences.

Apart from the action runner (controller.py) so that the machine views can show power without
loading the drivers or the runner.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel

from pixiebox.config import MachineSection, PowerSection
from pixiebox.core.lifecycle import MachineState
from pixiebox.power.base import PowerAction, PowerState
from pixiebox.store.state import MachineRecord

#: Lifecycle states in which a machine is drawing power.
RUNNING = frozenset({MachineState.BOOTING, MachineState.UP, MachineState.JOINED})


class PowerOutcome(BaseModel):
    """The answer of POST /api/v1/machines/{key}/power: what was seen, not what was sent."""

    machine: str
    mac: str
    action: PowerAction
    outcome: Literal["ok", "failed"]
    #: True when nothing had to be done (asked `on`, it was up already).
    already: bool = False
    #: The drivers tried, in order ("wol", "tasmota at 10.0.0.5").
    drivers: list[str]
    seconds: float
    #: The power state seen at the end.
    state: PowerState
    message: str


class PowerView(BaseModel):
    """A machine's last known power state, for the machine views."""

    state: PowerState = PowerState.UNKNOWN
    since: float | None = None
    #: How it is known ("tasmota at 10.0.0.5 reads off", "from its events: up").
    detail: str = ""


def describe_spec(spec: PowerSection) -> str:
    """How events name a link of a chain: "tasmota at 10.0.0.5", "qemu at /run/vm1.qmp"."""
    options = spec.options()
    for key in ("host", "address", "qmp"):
        value = options.get(key)
        if isinstance(value, str) and value:
            return f"{spec.driver} at {value}"
    for request in options.values():  # the http driver: on = { url = "..." }, ...
        if isinstance(request, dict) and isinstance(request.get("url"), str):
            host = urlsplit(request["url"]).hostname  # never a password from the URL
            if host:
                return f"{spec.driver} at {host}"
    return spec.driver


def no_power_message(machine: MachineSection) -> str:
    return (
        f'{machine.name} has no power control: add power = {{ driver = "wol" }} (or ssh, '
        "tasmota, shelly, http, redfish, ipmi, qemu) to its [[machines]] entry in lab.toml"
    )


def derived_power(record: MachineRecord | None) -> PowerView:
    """What a machine's events say about its power, when no driver has read it."""
    if record is None or not record.state:
        return PowerView()
    state = MachineState(record.state)
    if state in RUNNING:
        return PowerView(state=PowerState.ON, since=record.state_since,
                         detail=f"from its events: {state}")  # fmt: skip
    if state is MachineState.OFF:
        return PowerView(state=PowerState.OFF, since=record.state_since,
                         detail="from its events: off (powered off, or silent)")  # fmt: skip
    return PowerView()
