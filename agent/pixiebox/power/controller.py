"""Verified power actions: a power action is done when its result is *seen*, not when a packet
or an HTTP call was sent.

- `on` is seen as the OS phoning home after the action started ([power] verify_on = "ping":
  or the machine answering ping), within [power] on_timeout;
- `off` as the driver reading the power off, where it can (a plug's relay, a BMC, QMP), else as
  silence: no DHCP, boot request, phone-home, syslog line or ping answer for [power] off_settle
  seconds, within [power] off_timeout;
- `cycle` as a fresh phone-home after the cycle was sent; a chain without a driver that can
  cycle (or whose cycles were not seen) is switched off and on again instead.

A machine's `power` may chain drivers (chain.py): an action not seen within its timeout is
tried with the next driver of the chain that can do it, graceful ones (ssh) first for `off`, so
that the hard cut of a plug only comes after the OS had its chance to stop. Every step is an
event in the machine's log: `power.on`, `power.off` or `power.cycle` (the sub-action the step
belongs to: the off and on of a cycle done as off-then-on are `power.off` and `power.on`) with
the fields driver, outcome (asked, sent, failed, done, timeout, nothing-to-do) and reason, and a
sentence for people ("power on by wol sent; waiting up to 5m for it to phone home"). An off
that is seen is also `machine.off` (cause = power), which moves the machine's state.

Concurrent actions on one machine are refused, not queued: a second request gets PowerBusy
(HTTP 409) naming the action in progress. Queuing would run contradictory requests (`on` then
`off`) one after the other minutes later, long after whoever sent them stopped waiting; a
refusal tells them at once, and the running action's events show its progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Literal

from pixiebox.config import MachineSection
from pixiebox.core import wording
from pixiebox.core.inventory import Inventory
from pixiebox.core.lifecycle import MachineState
from pixiebox.events import FieldValue, Kind
from pixiebox.power.base import PowerAction, PowerState, PowerTarget
from pixiebox.power.chain import DriverFactory, Failure, Link, make_links
from pixiebox.power.verify import Pinger, Watch, ping
from pixiebox.power.views import PowerOutcome, PowerView, derived_power, no_power_message
from pixiebox.store.identity import IdentityError, IdentityStore
from pixiebox.store.state import MachineRecord

log = logging.getLogger("pixiebox.power")

#: The `outcome` field of power.on / power.off / power.cycle events.
Outcome = Literal["asked", "sent", "failed", "done", "timeout", "nothing-to-do"]


class PowerBusy(Exception):
    """Another power action on the same machine is in progress; the message names it."""


class NoPowerControl(Exception):
    """The machine has no `power` in lab.toml; the message says how to add it."""


@dataclass
class _Run:
    """One action on one machine: its context, the drivers tried, what is seen of it."""

    machine: MachineSection
    action: PowerAction
    target: PowerTarget
    links: list[Link]
    watch: Watch
    started: float = field(default_factory=time.monotonic)
    used: list[str] = field(default_factory=list)

    @property
    def mac(self) -> str:
        return self.machine.mac

    def use(self, link: Link) -> None:
        if link.label not in self.used:
            self.used.append(link.label)


@dataclass
class _Result:
    ok: bool
    state: PowerState
    message: str
    already: bool = False


class PowerController:
    """Runs verified power actions, one at a time per machine."""

    def __init__(
        self,
        inventory: Inventory,
        *,
        subnet: IPv4Network | None = None,
        identities: IdentityStore | None = None,
        driver_factory: DriverFactory | None = None,
        pinger: Pinger = ping,
        verbose: bool = True,
    ) -> None:
        self.inventory = inventory
        self._subnet = subnet
        self._identities = identities
        self._factory = driver_factory
        self._ping = pinger
        self._locks: dict[str, asyncio.Lock] = {}
        self._running: dict[str, tuple[PowerAction, float]] = {}
        self._known: dict[str, PowerView] = {}
        self._tasks: set[asyncio.Task[PowerOutcome]] = set()
        self._verbose = verbose

    # -- what the views show --------------------------------------------------------------

    def power_of(self, mac: str, record: MachineRecord | None) -> PowerView:
        """The last known power state: a driver's reading or a verified action, unless the
        machine's events since say otherwise (it phoned home after it was switched off)."""
        known = self._known.get(mac)
        derived = derived_power(record)
        if known is None:
            return derived
        if derived.since is not None and known.since is not None and derived.since > known.since:
            return derived
        return known

    def busy(self, mac: str) -> str | None:
        """What is running on `mac` ("on, for 12 s"), or None."""
        running = self._running.get(mac)
        if running is None:
            return None
        action, since = running
        return f"power {action} started {time.monotonic() - since:.0f} s ago"

    # -- running an action ----------------------------------------------------------------

    async def act(
        self, machine: MachineSection, action: PowerAction, *, timeout: float | None = None
    ) -> PowerOutcome:
        """Do `action` on `machine` and see it done. `timeout` replaces [power] on_timeout and
        off_timeout for each attempt.

        Raises NoPowerControl (no `power` in lab.toml) or PowerBusy (an action is running)."""
        if not machine.power_chain():
            raise NoPowerControl(no_power_message(machine))
        busy = self.busy(machine.mac)
        if busy is not None:
            raise PowerBusy(
                f"{machine.name} is busy: {busy} and is not finished; try again when it is "
                f"(pixiebox events {machine.name} --follow shows its progress)"
            )
        # Marked busy before the task starts, so a second request in the same loop turn is
        # refused too; the lock is what keeps two runs apart should that ever slip.
        self._running[machine.mac] = (action, time.monotonic())
        task = asyncio.create_task(self._locked(machine, action, timeout))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A client that gives up waiting must not cut an action in half (a plug switched off
        # but not on again): the action finishes and its outcome is in the machine's events.
        return await asyncio.shield(task)

    async def _locked(
        self, machine: MachineSection, action: PowerAction, timeout: float | None
    ) -> PowerOutcome:
        lock = self._locks.setdefault(machine.mac, asyncio.Lock())
        try:
            async with lock, self.inventory.lifecycle.subscription() as queue:
                target = self._target(machine)
                watch = Watch(machine.mac, target.ip, queue, self._ping)
                run = _Run(machine, action, target, [], watch)
                run.links = make_links(machine, target, self._factory)
                try:
                    result = await self._dispatch(run, timeout)
                except Exception as exc:  # a driver bug must not leave the action unreported
                    log.exception("power %s of %s failed", action, machine.name)
                    result = _Result(False, PowerState.UNKNOWN,
                                     f"power {action} failed: internal error ({exc})")  # fmt: skip
                    if action is PowerAction.STATUS:
                        self.inventory.record(machine.mac, Kind.POWER_STATUS, result.message,
                                              fields={"state": PowerState.UNKNOWN})  # fmt: skip
                    else:
                        kind = _KIND_OF[action]
                        self._step(run, kind, "failed", result.message, reason="internal-error")
        finally:
            self._running.pop(machine.mac, None)
        seconds = round(time.monotonic() - run.started, 1)
        if result.state is not PowerState.UNKNOWN:
            self._known[machine.mac] = PowerView(state=result.state, since=time.time(),
                                                 detail=result.message)  # fmt: skip
        outcome = PowerOutcome(
            machine=machine.name, mac=machine.mac, action=action,
            outcome="ok" if result.ok else "failed", already=result.already,
            drivers=run.used, seconds=seconds, state=result.state, message=result.message,
        )  # fmt: skip
        log.info("power %s of %s: %s (%s s)", action, self.inventory.name_of(machine.mac),
                 result.message, seconds)  # fmt: skip
        return outcome

    async def _dispatch(self, run: _Run, timeout: float | None) -> _Result:
        settings = self.inventory.config.power
        on_timeout = float(timeout if timeout is not None else settings.on_timeout)
        off_timeout = float(timeout if timeout is not None else settings.off_timeout)
        if run.action is PowerAction.ON:
            return await self._on(run, on_timeout)
        if run.action is PowerAction.OFF:
            return await self._off(run, off_timeout)
        if run.action is PowerAction.CYCLE:
            return await self._cycle(run, on_timeout, off_timeout)
        return await self._status(run)

    # -- the chain and the log ------------------------------------------------------------

    def _target(self, machine: MachineSection) -> PowerTarget:
        config = self.inventory.config
        record = self.inventory.lifecycle.records().get(machine.mac)
        ip = machine.ip
        if ip is None and record is not None and record.ip:
            with contextlib.suppress(ValueError):
                ip = IPv4Address(record.ip)
        subnet = config.network.subnet or self._subnet
        host_key = None
        if self._identities is not None and any(
            spec.driver == "ssh" for spec in machine.power_chain()
        ):
            try:
                host_key = self._identities.for_machine(machine.mac).ssh_host_public
            except IdentityError as exc:
                log.warning("%s: no known SSH host key for power over SSH: %s", machine.name, exc)
        return PowerTarget(
            name=machine.name, mac=machine.mac, ip=ip, interface=config.network.interface,
            broadcast=subnet.broadcast_address if subnet is not None else None,
            state_dir=config.state.dir, ssh_host_public=host_key,
        )  # fmt: skip

    def _step(
        self,
        run: _Run,
        kind: Kind,
        outcome: Outcome,
        message: str,
        *,
        link: Link | None = None,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        """One step of the action in the machine's log (kind power.on, power.off or
        power.cycle; its fields as pixiebox.events.KINDS documents them)."""
        fields: dict[str, FieldValue] = {"outcome": outcome}
        if link is not None:
            fields["driver"] = link.spec.driver
        if reason is not None:
            fields["reason"] = reason
        if detail is not None:
            fields["detail"] = detail
        self.inventory.record(run.mac, kind, message, fields=fields)

    def _seen_off(self, run: _Run, how: str) -> None:
        """The machine is off and a power action saw it: its state moves to off."""
        was = self._lifecycle_state(run.mac)
        fields: dict[str, FieldValue] = {"cause": "power"}
        if was is not None:
            fields["was"] = was.value
        self.inventory.record(run.mac, Kind.MACHINE_OFF, f"off: {how}", fields=fields)

    def _failed(self, run: _Run, kind: Kind, link: Link, failure: Failure, then: str) -> None:
        action = _ACTION_OF[kind]
        self._step(run, kind, "failed", f"power {action} by {link.label} failed: "
                   f"{failure.detail}; {then}", link=link, reason=failure.reason,
                   detail=failure.detail)  # fmt: skip

    async def _send(self, run: _Run, link: Link, action: PowerAction) -> Failure | None:
        run.use(link)
        return await link.send(action)

    async def _watts(self, link: Link) -> str:
        """ ", 0.0 W" from a plug with an energy sensor, else ""."""
        watts = await link.watts()
        return f", {watts:.1f} W" if watts is not None else ""

    async def _reading(self, run: _Run) -> tuple[PowerState, str]:
        """The first definite reading of the chain: (state, "tasmota at 10.0.0.5 reads on")."""
        for link in run.links:
            state = await link.read()
            if state is not PowerState.UNKNOWN:
                return state, f"{link.label} reads {state}"
        return PowerState.UNKNOWN, ""

    def _lifecycle_state(self, mac: str) -> MachineState | None:
        record = self.inventory.lifecycle.records().get(mac)
        return MachineState(record.state) if record is not None and record.state else None

    @staticmethod
    def _next(links: list[Link], index: int) -> str:
        rest = links[index + 1 :]
        return f"trying {rest[0].label}" if rest else "no other driver to try"

    # -- waiting for what is seen ---------------------------------------------------------

    def _by_ping(self, run: _Run) -> bool:
        return self.inventory.config.power.verify_on == "ping" and run.target.ip is not None

    async def _seen_up(self, run: _Run, since: float, deadline: float) -> bool:
        return await run.watch.seen_up(since, deadline, self._by_ping(run))

    def _up_wording(self, run: _Run) -> str:
        if self._by_ping(run):
            return f"to answer ping at {run.target.ip}"
        return "for it to phone home"

    # -- on -------------------------------------------------------------------------------

    async def _already_on(self, run: _Run) -> str | None:
        """Why `on` has nothing to do ("already on (tasmota reads on) and up"), or None."""
        if self._lifecycle_state(run.mac) not in (MachineState.UP, MachineState.JOINED):
            return None
        state, how = await self._reading(run)
        if state is PowerState.ON:
            return f"already on ({how}) and {self._lifecycle_state(run.mac)}"
        if state is PowerState.OFF:
            return None
        if run.target.ip is not None:
            if await run.watch.answers():
                return f"already on: it answers ping at {run.target.ip}"
            return None
        state_now = self._lifecycle_state(run.mac)
        return f"already {state_now} (from its events; nothing can read its power)"

    async def _on(self, run: _Run, timeout: float) -> _Result:
        on = Kind.POWER_ON
        already = await self._already_on(run)
        if already is not None:
            self._step(run, on, "nothing-to-do", f"power on asked: {already}; nothing to do",
                       reason="already-on")  # fmt: skip
            return _Result(True, PowerState.ON, already, already=True)
        if self._lifecycle_state(run.mac) is MachineState.BOOTING:
            # Booting already (someone pressed its button): sending `on` again could only hurt
            # (a plug cycled in the middle of a boot), so give that boot its time first.
            state, how = await self._reading(run)
            if state is not PowerState.OFF:
                sent = time.time()
                reading = f" ({how})" if how else ""
                wait = f"waiting up to {wording.timeout(timeout)} {self._up_wording(run)}"
                self._step(run, on, "asked", f"power on asked while it is booting{reading}; "
                           f"{wait}", reason="booting")  # fmt: skip
                if await self._seen_up(run, sent, time.monotonic() + timeout):
                    message = f"up {time.time() - sent:.0f} s later (it was booting already)"
                    self._step(run, on, "done", message, reason="booting")
                    return _Result(True, PowerState.ON, message)
        links = [link for link in run.links if link.can(PowerAction.ON)]
        if not links:
            return self._cannot(run, PowerAction.ON)
        for index, link in enumerate(links):
            sent = time.time()
            action = PowerAction.ON
            # A plug whose relay is on while the machine is not up (its OS was shut down over
            # SSH, or it hung) must cut the power and give it back: `on` would change nothing.
            if (
                link.driver is not None and not link.graceful and link.can(PowerAction.CYCLE)
                and await link.read() is PowerState.ON
            ):  # fmt: skip
                action = PowerAction.CYCLE
            failure = await self._send(run, link, action)
            if failure is not None:
                self._failed(run, on, link, failure, self._next(links, index))
                continue
            waiting = f"waiting up to {wording.timeout(timeout)} {self._up_wording(run)}"
            if action is PowerAction.CYCLE:
                self._step(run, on, "sent", f"power on by {link.label} cycled (it read on, but "
                           f"the machine was not up); {waiting}", link=link,
                           reason="relay-on")  # fmt: skip
            else:
                self._step(run, on, "sent", f"power on by {link.label} sent; {waiting}",
                           link=link)  # fmt: skip
            if await self._seen_up(run, sent, time.monotonic() + timeout):
                seconds = time.time() - sent
                message = f"up {seconds:.0f} s after power on by {link.label}"
                self._step(run, on, "done", message, link=link)
                return _Result(True, PowerState.ON, message)
            self._step(run, on, "timeout", f"not up after {wording.timeout(timeout)}; "
                       f"{self._next(links, index)}", link=link, reason="not-up")  # fmt: skip
        message = (f"power on failed: not up after trying {', '.join(run.used)}; "
                   f"pixiebox doctor {run.machine.name} tells how far it got")  # fmt: skip
        self._step(run, on, "failed", message, reason="not-up")
        return _Result(False, PowerState.UNKNOWN, message)

    def _cannot(self, run: _Run, action: PowerAction) -> _Result:
        chain = ", ".join(link.label for link in run.links)
        message = (f"no driver of {run.machine.name}'s power chain ({chain}) can {action} it; "
                   "add one that can to its power list in lab.toml")  # fmt: skip
        self._step(run, _KIND_OF[action], "failed", message, reason="no-driver")
        return _Result(False, PowerState.UNKNOWN, message)

    # -- off ------------------------------------------------------------------------------

    async def _off(self, run: _Run, timeout: float) -> _Result:
        off = Kind.POWER_OFF
        state, how = await self._reading(run)
        if state is PowerState.OFF:
            message = f"already off ({how})"
            if self._lifecycle_state(run.mac) is not MachineState.OFF:
                self._step(run, off, "nothing-to-do", f"power off asked: {message}",
                           reason="already-off")  # fmt: skip
                self._seen_off(run, how)
            else:
                self._step(run, off, "nothing-to-do", f"power off asked: {message}; nothing "
                           "to do", reason="already-off")  # fmt: skip
            return _Result(True, PowerState.OFF, message, already=True)
        # Graceful drivers first (the OS shuts down cleanly), then the hard cut; otherwise in
        # the order of lab.toml (sorted() is stable).
        links = sorted((link for link in run.links if link.can(PowerAction.OFF)),
                       key=lambda link: not link.graceful)  # fmt: skip
        if not links:
            return self._cannot(run, PowerAction.OFF)
        settle = float(self.inventory.config.power.off_settle)
        for index, link in enumerate(links):
            failure = await self._send(run, link, PowerAction.OFF)
            if failure is not None:
                self._failed(run, off, link, failure, self._next(links, index))
                continue
            seen = await self._wait_off(run, link, timeout, settle)
            if seen is not None:
                message = f"powered off by {link.label} ({seen})"
                self._step(run, off, "done", message, link=link)
                self._seen_off(run, f"powered off by {link.label}")
                return _Result(True, PowerState.OFF, message)
            self._step(run, off, "timeout", f"still on {wording.timeout(timeout)} after power "
                       f"off by {link.label}; {self._next(links, index)}", link=link,
                       reason="still-on")  # fmt: skip
        message = f"power off failed: still on after trying {', '.join(run.used)}"
        self._step(run, off, "failed", message, reason="still-on")
        return _Result(False, PowerState.ON, message)

    async def _wait_off(self, run: _Run, link: Link, timeout: float, settle: float) -> str | None:
        """How the machine was seen off after `link` switched it off, or None."""
        deadline = time.monotonic() + timeout
        waiting = f"power off by {link.label} sent; waiting up to {wording.timeout(timeout)}"
        if link.reads_status and await link.read() is not PowerState.UNKNOWN:
            self._step(run, Kind.POWER_OFF, "sent", f"{waiting} for {link.label} to read it "
                       "off", link=link)  # fmt: skip

            async def reads_off() -> bool:
                return await link.read() is PowerState.OFF

            if await run.watch.until(deadline, lambda e: False, reads_off):
                return f"it reads off{await self._watts(link)}"
            return None
        where = f" and no ping answer at {run.target.ip}" if run.target.ip else ""
        self._step(run, Kind.POWER_OFF, "sent", f"{waiting} for {wording.timeout(settle)} of "
                   f"silence (no boot request, phone-home or syslog{where})",
                   link=link)  # fmt: skip
        if await run.watch.silent(deadline, settle):
            return f"silent for {wording.timeout(settle)}{where}"
        return None

    # -- cycle ----------------------------------------------------------------------------

    async def _cycle(self, run: _Run, on_timeout: float, off_timeout: float) -> _Result:
        cycle = Kind.POWER_CYCLE
        links = [link for link in run.links if link.can(PowerAction.CYCLE)]
        timeout = on_timeout + off_timeout
        for index, link in enumerate(links):
            then = (self._next(links, index) if index + 1 < len(links)
                    else "switching it off and on instead")  # fmt: skip
            sent = time.time()
            failure = await self._send(run, link, PowerAction.CYCLE)
            if failure is not None:
                self._failed(run, cycle, link, failure, then)
                continue
            self._step(run, cycle, "sent", f"power cycle by {link.label} sent; waiting up to "
                       f"{wording.timeout(timeout)} {self._up_wording(run)} again",
                       link=link)  # fmt: skip
            if await self._seen_up(run, sent, time.monotonic() + timeout):
                message = f"back up {time.time() - sent:.0f} s after power cycle by {link.label}"
                self._step(run, cycle, "done", message, link=link)
                return _Result(True, PowerState.ON, message)
            self._step(run, cycle, "timeout", f"not back up {wording.timeout(timeout)} after "
                       f"power cycle by {link.label}; {then}", link=link,
                       reason="not-up")  # fmt: skip
        # Off then on: their steps are power.off and power.on events.
        off = await self._off(run, off_timeout)
        if not off.ok:
            return _Result(False, off.state, f"power cycle failed: {off.message}")
        on = await self._on(run, on_timeout)
        if not on.ok:
            return _Result(False, on.state, f"power cycle failed: off, then {on.message}")
        return _Result(True, PowerState.ON, f"power cycled: {off.message}; then {on.message}")

    # -- status ---------------------------------------------------------------------------

    async def _status(self, run: _Run) -> _Result:
        # No event: reading the power says nothing new about the machine, and an event would
        # count as its being heard from (it would never be marked off as silent).
        problems = []
        for link in run.links:
            if link.driver is not None and not link.reads_status:
                continue
            if link.driver is not None:
                run.use(link)
            state = await link.status()
            if isinstance(state, Failure):
                problems.append(state.detail)
                continue
            if state is not PowerState.UNKNOWN:
                return _Result(True, state, f"{state} ({link.label} reads {state})")
        record = self.inventory.lifecycle.records().get(run.mac)
        derived = derived_power(record)
        note = f" ({'; '.join(problems)})" if problems else ""
        if await run.watch.answers():
            return _Result(True, PowerState.ON, f"on (it answers ping at {run.target.ip}){note}")
        if derived.state is not PowerState.UNKNOWN:
            message = f"{derived.state} ({derived.detail}; no driver can read it){note}"
            return _Result(True, derived.state, message)
        message = f"unknown: no driver can read it and nothing was heard from it{note}"
        return _Result(False, PowerState.UNKNOWN, message)

    async def close(self) -> None:
        """Cancel the actions still running (the agent is stopping)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


#: The event kind of each action's steps.
_KIND_OF = {PowerAction.ON: Kind.POWER_ON, PowerAction.OFF: Kind.POWER_OFF,
            PowerAction.CYCLE: Kind.POWER_CYCLE}  # fmt: skip
_ACTION_OF = {kind: action for action, kind in _KIND_OF.items()}
