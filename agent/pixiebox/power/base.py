"""The one small interface every power driver implements, and what it is told about its target.

A driver only *sends* an action (a magic packet, an HTTP call, a QMP command) and raises
PowerError when that fails; whether the machine really came up or went down is seen by the
controller (phone-home, silence, a plug's power reading), because a sent packet proves nothing:
a NUC with Wake-on-LAN disabled in its BIOS ignores it silently.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


class PowerAction(StrEnum):
    ON = "on"
    OFF = "off"
    CYCLE = "cycle"
    STATUS = "status"


class PowerState(StrEnum):
    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"


class PowerError(Exception):
    """A sentence a user can act on: which driver, which machine, what failed (unreachable plug
    at 10.0.0.5: connection refused)."""


@dataclass(frozen=True)
class PowerTarget:
    """Who is being powered."""

    name: str
    mac: str
    ip: IPv4Address | None
    interface: str  # the lab interface ([network] interface)
    broadcast: IPv4Address | None  # lab subnet broadcast, for wol
    state_dir: Path  # [state] dir, for the appliance's power ssh key
    ssh_host_public: str | None  # the machine's stable host key (identity store), for known_hosts


@runtime_checkable
class PowerDriver(Protocol):
    name: str  # "wol", ...
    actions: frozenset[PowerAction]  # what it can do
    graceful: bool  # ssh True (OS shutdown), a plug False (hard cut)

    async def on(self) -> None: ...
    async def off(self) -> None: ...
    async def cycle(self) -> None: ...
    async def status(self) -> PowerState: ...  # UNKNOWN when the driver cannot tell


ALL_ACTIONS = frozenset(PowerAction)


class BaseDriver:
    """Shared plumbing: the error sentence and refusing actions a driver cannot do."""

    name: str = ""
    actions: frozenset[PowerAction] = ALL_ACTIONS
    graceful: bool = False

    def __init__(self, target: PowerTarget) -> None:
        self.target = target

    def error(self, what: str) -> PowerError:
        """`{driver} power of {machine}: {what}`: the form every driver's errors take."""
        return PowerError(f"{self.name} power of {self.target.name} ({self.target.mac}): {what}")

    def cannot(self, action: PowerAction) -> PowerError:
        can = ", ".join(a.value for a in PowerAction if a in self.actions)
        return self.error(
            f"the {self.name} driver cannot {action.value} a machine (it can: {can}); "
            "chain another driver for that action"
        )

    async def on(self) -> None:
        raise self.cannot(PowerAction.ON)

    async def off(self) -> None:
        raise self.cannot(PowerAction.OFF)

    async def cycle(self) -> None:
        raise self.cannot(PowerAction.CYCLE)

    async def status(self) -> PowerState:
        return PowerState.UNKNOWN

    async def bounded(self, awaitable: Awaitable[T], what: str, timeout: float) -> T:
        """`awaitable`, or PowerError naming `what` if it takes longer than `timeout`."""
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError:
            raise self.error(f"{what}: no answer within {timeout:g} s") from None


def read_secret(inline: str | None, file: Path | None, what: str) -> str | None:
    """A password given inline or in a file (kept out of lab.toml); None when neither is set.

    Raises PowerError naming the file when it cannot be read."""
    if file is None:
        return inline
    try:
        return file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PowerError(
            f"{what}: cannot read password_file {file}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def describe(exc: BaseException) -> str:
    """A short reason from an OS/network exception ("connection refused", "timed out")."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()  # asyncio's own strerror names no reason
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip()
    return text or type(exc).__name__
