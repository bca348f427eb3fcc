"""What every verdict needs besides the events, and what a verdict is.

Shared by the general verdicts (verdict) and the Secure Boot ones (secure_boot), so neither
imports the other's private parts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pixiebox.core.lifecycle import MachineState


@dataclass(frozen=True)
class Context:
    """The machine and the doctor's settings, as `diagnose` was asked."""

    name: str
    mac: str
    state: MachineState
    now: float
    mode: str
    enrolled: bool
    boot_timeout: float
    settle: float
    http_port: int
    #: Whether lab.toml sends this machine the signed chain now (x86-64 UEFI, `secure_boot`);
    #: None when the caller did not say. Its last boot may predate a change of lab.toml.
    signed_chain: bool | None = None


@dataclass(frozen=True)
class Said:
    """A verdict: the sentence, whether the boot reached the OS (None: still within the
    doctor's waits), and a machine-readable cause (Diagnosis.cause) when it names one."""

    text: str
    ok: bool | None
    cause: str | None = None


def clock(timestamp: float, now: float) -> str:
    """A time in a verdict: the time of day within the last 20 hours, else the date too."""
    local = time.localtime(timestamp)
    if now - timestamp < 20 * 3600:
        return time.strftime("%H:%M:%S", local)
    return time.strftime("%Y-%m-%d %H:%M:%S", local)
