"""The doctor as the API serves it: the JSON report, its query parameters, and the answer
for a machine Pixiebox knows nothing about."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from pixiebox.config import normalize_mac
from pixiebox.doctor.render import timeline
from pixiebox.doctor.verdict import DEFAULT_BOOT_TIMEOUT, DEFAULT_SETTLE, Diagnosis
from pixiebox.store.state import EVENTS_PER_MACHINE

#: Events the API reads for a diagnosis: all a machine keeps.
EVENTS = EVENTS_PER_MACHINE


class DoctorReport(BaseModel):
    """GET /api/v1/machines/{key}/doctor"""

    machine: str
    mac: str
    state: str
    ok: bool
    #: Still booting within the doctor's waits: the verdict is progress, not a failure.
    waiting: bool = False
    verdict: str
    #: The verdict's likely cause as a code, for programs: "secure-boot" (x86-64 UEFI firmware
    #: refused iPXE: set secure_boot in lab.toml), where the signed chain stopped
    #: ("shim-no-grub", "shim-refused-grub", "grub-no-config", "grub-no-kernel",
    #: "kernel-refused"); null when the verdict names none.
    cause: str | None = None
    timeline: list[str]


#: The doctor route's query parameters, for the OpenAPI document.
QUERY_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": "number", "minimum": 0},
        "description": what,
    }
    for name, what in (
        (
            "boot_timeout",
            "seconds after the kernel and initrd were sent before a missing phone-home counts "
            f"as a failure (default {DEFAULT_BOOT_TIMEOUT:g})",
        ),
        (
            "settle",
            "seconds without the next boot step before a step counts as stalled "
            f"(default {DEFAULT_SETTLE:g})",
        ),
    )
]


def report(diagnosis: Diagnosis, mac: str) -> DoctorReport:
    return DoctorReport(
        machine=diagnosis.machine,
        mac=mac,
        state=diagnosis.state,
        ok=diagnosis.ok,
        waiting=diagnosis.waiting,
        verdict=diagnosis.verdict,
        cause=diagnosis.cause,
        timeline=timeline(diagnosis),
    )


def seconds_parameter(query: Mapping[str, str], key: str, default: float) -> float:
    """A non-negative number of seconds from a query string; ValueError says what is wrong."""
    raw = query.get(key)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key} must be a number of seconds, not {raw!r}") from None
    if not 0 <= value < 10**7:
        raise ValueError(f"{key} must be a number of seconds from 0 to 9999999, not {raw!r}")
    return value


def unknown_machine(key: str) -> str:
    """The answer for a name or MAC Pixiebox knows nothing about."""
    try:
        mac = normalize_mac(key)
    except ValueError:
        return f"no machine named or with MAC {key!r} (pixiebox machines lists them)"
    return (
        f"Pixiebox has never heard from {mac} and it is not in lab.toml: is it set to boot from "
        "the network (PXE) first, and on the same LAN as the appliance's interface?"
    )
