"""A machine's power chain: its `power = [...]` entries of lab.toml, each with its driver, and
the bounded calls the action runner makes through them.

A driver that could not be built (a bad entry) stays in the chain as a link without a driver:
it is still "tried", so that its problem shows in the machine's events instead of the entry
silently doing nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pixiebox.config import MachineSection, PowerSection
from pixiebox.power.base import PowerAction, PowerDriver, PowerError, PowerState, PowerTarget
from pixiebox.power.views import describe_spec

log = logging.getLogger("pixiebox.power")

#: Bound on one driver call. Drivers bound their own network exchanges; this only keeps a
#: driver that hangs from holding its machine's lock forever.
CALL_TIMEOUT = 90.0

DriverFactory = Callable[[PowerSection, PowerTarget], PowerDriver]


@dataclass(frozen=True)
class Failure:
    """Why a driver call did not go out: `reason` for code (events' `reason` field), `detail`
    for people (the driver's own sentence)."""

    reason: str  # unusable, driver-error, no-answer
    detail: str


@dataclass
class Link:
    """One entry of a machine's power chain, with its driver (None: it could not be made)."""

    spec: PowerSection
    label: str
    driver: PowerDriver | None
    problem: str = ""

    def can(self, action: PowerAction) -> bool:
        # A driver that could not be made is still "tried", so its problem shows in the log.
        return self.driver is None or action in self.driver.actions

    @property
    def reads_status(self) -> bool:
        return self.driver is not None and PowerAction.STATUS in self.driver.actions

    @property
    def graceful(self) -> bool:
        return self.driver is not None and self.driver.graceful

    async def send(self, action: PowerAction) -> Failure | None:
        """Send `action` (on, off or cycle); None when sent."""
        if self.driver is None:
            return Failure("unusable", f"{self.label} cannot be used: {self.problem}")
        calls = {PowerAction.ON: self.driver.on, PowerAction.OFF: self.driver.off,
                 PowerAction.CYCLE: self.driver.cycle}  # fmt: skip
        try:
            await asyncio.wait_for(calls[action](), CALL_TIMEOUT)
        except PowerError as exc:
            return Failure("driver-error", str(exc))
        except TimeoutError:
            return Failure(
                "no-answer",
                f"{self.label} did not finish sending power {action} in {CALL_TIMEOUT:g} s",
            )
        return None

    async def status(self) -> PowerState | Failure:
        """The driver's reading, or why there is none (it cannot read: UNKNOWN)."""
        if self.driver is None:
            return Failure("unusable", f"{self.label} cannot be used: {self.problem}")
        if not self.reads_status:
            return PowerState.UNKNOWN
        try:
            return await asyncio.wait_for(self.driver.status(), CALL_TIMEOUT)
        except PowerError as exc:
            return Failure("driver-error", str(exc))
        except TimeoutError:
            return Failure("no-answer", f"{self.label} did not answer in {CALL_TIMEOUT:g} s")

    async def read(self) -> PowerState:
        """The driver's reading; UNKNOWN when it cannot tell (or failed to)."""
        if self.driver is None or not self.reads_status:
            return PowerState.UNKNOWN
        state = await self.status()
        if isinstance(state, Failure):
            log.info("reading the power of %s through %s: %s", self.driver, self.label,
                     state.detail)  # fmt: skip
            return PowerState.UNKNOWN
        return state

    async def watts(self) -> float | None:
        """A plug's energy sensor reading (the drivers' optional power_watts), or None."""
        reader = getattr(self.driver, "power_watts", None)
        if reader is None:
            return None
        try:
            watts = await asyncio.wait_for(reader(), CALL_TIMEOUT)
        except (PowerError, TimeoutError):
            return None
        return float(watts) if isinstance(watts, int | float) else None


def make_links(
    machine: MachineSection, target: PowerTarget, factory: DriverFactory | None = None
) -> list[Link]:
    """`machine`'s power chain with its drivers, in the order of lab.toml."""
    if factory is None:
        from pixiebox.power import make_driver  # the drivers import heavy libraries

        factory = make_driver
    links = []
    for spec in machine.power_chain():
        label = describe_spec(spec)
        try:
            links.append(Link(spec, label, factory(spec, target)))
        except PowerError as exc:
            links.append(Link(spec, label, None, str(exc)))
    return links
