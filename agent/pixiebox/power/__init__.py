"""Power control: drivers, and actions verified by what the machine does.

Drivers, one module each behind `base.PowerDriver`: wol, ssh, redfish, ipmi, tasmota, shelly,
http (generic plugs), qemu. `make_driver` builds the driver of one `power = { driver = ... }`
entry of lab.toml from that entry's option model (pixiebox.config.power_options), the same model
`pixiebox check` validates it with (`spec_problems`), so the check and the driver never disagree.
The action runner: `controller` (one action per machine at a time, chains tried in order, every
step a power.* event), `chain` (the links of a machine's chain), `verify` (on = a phone-home,
off = a reading or silence), `views` (what the API shows); `lab` is `pixiebox lab up|down`.

May import pixiebox.config, core, events, store (the ssh driver's key file) and doctor (the
verdict for stragglers of `lab up`); pixiebox.config never imports this package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from pixiebox.config import PowerSection
from pixiebox.config.power_options import driver_options
from pixiebox.config.problems import driver_option_problems, spec_problems
from pixiebox.power.base import (
    PowerAction,
    PowerDriver,
    PowerError,
    PowerState,
    PowerTarget,
)


def _builders() -> dict[str, Callable[[PowerTarget, Any], PowerDriver]]:
    # Imported on first use, not with this package: the drivers load sushy, pyghmi, asyncssh
    # and qemu.qmp, which every CLI command (they import pixiebox.client.follow) would pay for.
    from pixiebox.power.http import HttpDriver
    from pixiebox.power.ipmi import IpmiDriver
    from pixiebox.power.qemu import QemuDriver
    from pixiebox.power.redfish import RedfishDriver
    from pixiebox.power.shelly import ShellyDriver
    from pixiebox.power.ssh import SshDriver
    from pixiebox.power.tasmota import TasmotaDriver
    from pixiebox.power.wol import WolDriver

    return {
        "wol": WolDriver,
        "ssh": SshDriver,
        "redfish": RedfishDriver,
        "ipmi": IpmiDriver,
        "tasmota": TasmotaDriver,
        "shelly": ShellyDriver,
        "http": HttpDriver,
        "qemu": QemuDriver,
    }


def make_driver(spec: PowerSection, target: PowerTarget) -> PowerDriver:
    """The driver for one power entry; PowerError (naming the machine) for a bad entry."""
    try:
        options = driver_options(spec)
    except ValidationError as exc:
        problems = "; ".join(
            f"{key or 'power'}: {message}" for key, message, _ in driver_option_problems(spec, exc)
        )
        raise PowerError(
            f"{spec.driver} power of {target.name} ({target.mac}) is misconfigured in lab.toml: "
            f"{problems} (run pixiebox check)"
        ) from None
    return _builders()[spec.driver](target, options)


__all__ = [
    "PowerAction",
    "PowerDriver",
    "PowerError",
    "PowerSection",
    "PowerState",
    "PowerTarget",
    "make_driver",
    "spec_problems",
]
