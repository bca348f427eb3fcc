"""Verified power actions: a power action is done when its result is *seen*, not when a packet
or an HTTP call was sent.

- `on` is seen as the OS phoning home after the action started ([power] verify_on = "ping":
  or the machine answering ping), within [power] on_timeout;
- `off` as the driver reading the power off, where it can (a plug's relay, a BMC, QMP), else as
  silence: no DHCP, boot request, phone-home, syslog line or ping answer for [power] off_settle
  seconds, within [power] off_timeout;
- `cycle` as a fresh phone-home after the cycle was sent; a chain without a driver that can
  cycle (or whose cycles were not seen) is switched off and on again instead.

A machine's `power` may chain drivers: an action not seen within its timeout is tried with the
next driver of the chain that can do it, graceful ones (ssh) first for `off`, so that the hard
cut of a plug only comes after the OS had its chance to stop. Every attempt and the outcome are
events in the machine's log, in sentences ("power on by wol sent; waiting up to 5m for it to
phone home", "not up after 5m; trying tasmota at 10.0.0.5").

Concurrent actions on one machine are refused, not queued: a second request gets PowerBusy
(HTTP 409) naming the action in progress. Queuing would run contradictory requests (`on` then
`off`) one after the other minutes later, long after whoever sent them stopped waiting; a
refusal tells them at once, and the running action's events show its progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Literal
from urllib.parse import urlsplit

import icmplib  # type: ignore[import-untyped]
from pydantic import BaseModel

from pixiebox.config import MachineSection, PowerSection
from pixiebox.core.inventory import Inventory
from pixiebox.core.lifecycle import MachineState
from pixiebox.power.base import PowerAction, PowerDriver, PowerError, PowerState, PowerTarget
from pixiebox.store.identity import IdentityError, IdentityStore
from pixiebox.store.state import Event, MachineRecord

log = logging.getLogger("pixiebox.power")

#: Bound on one driver call. Drivers bound their own network exchanges; this only keeps a
#: driver that hangs from holding its machine's lock forever.
CALL_TIMEOUT = 90.0
#: Seconds between reads of a driver's status, or pings, while waiting for a state.
POLL = 2.0
#: Seconds one ping waits for its answer.
PING_WAIT = 1.0
#: Event kinds that are not traffic from the machine itself (they do not break its silence).
_NOT_TRAFFIC = frozenset({"power", "off", "enrolled", "discovered"})
#: Lifecycle states in which a machine is drawing power.
_RUNNING = frozenset({MachineState.BOOTING, MachineState.UP, MachineState.JOINED})

DriverFactory = Callable[[PowerSection, PowerTarget], PowerDriver]
Pinger = Callable[[IPv4Address], Awaitable[bool]]


class PowerBusy(Exception):
    """Another power action on the same machine is in progress; the message names it."""


class NoPowerControl(Exception):
    """The machine has no `power` in lab.toml; the message says how to add it."""


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


def minutes(seconds: float) -> str:
    """ "5m", "90s", "1m30s": how timeouts read in event sentences."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    return f"{seconds // 60}m{seconds % 60}s" if seconds % 60 else f"{seconds // 60}m"


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


async def ping(address: IPv4Address) -> bool:
    """True when `address` answers one ICMP echo within PING_WAIT seconds."""
    try:
        host = await icmplib.async_ping(
            str(address), count=1, timeout=PING_WAIT, privileged=os.geteuid() == 0
        )
    except (icmplib.ICMPLibError, OSError) as exc:
        log.debug("ping %s: %s", address, exc)
        return False
    return bool(host.is_alive)


def derived_power(record: MachineRecord | None) -> PowerView:
    """What a machine's events say about its power, when no driver has read it."""
    if record is None or not record.state:
        return PowerView()
    state = MachineState(record.state)
    if state in _RUNNING:
        return PowerView(state=PowerState.ON, since=record.state_since,
                         detail=f"from its events: {state}")  # fmt: skip
    if state is MachineState.OFF:
        return PowerView(state=PowerState.OFF, since=record.state_since,
                         detail="from its events: off (powered off, or silent)")  # fmt: skip
    return PowerView()


@dataclass
class _Link:
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


@dataclass
class _Run:
    """One action on one machine: its context, the drivers tried, its event subscription."""

    machine: MachineSection
    action: PowerAction
    target: PowerTarget
    links: list[_Link]
    queue: asyncio.Queue[Event]
    started: float = field(default_factory=time.monotonic)
    used: list[str] = field(default_factory=list)

    @property
    def mac(self) -> str:
        return self.machine.mac

    def use(self, link: _Link) -> None:
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
                run = _Run(machine, action, self._target(machine), [], queue)
                run.links = self._links(machine, run.target)
                try:
                    result = await self._dispatch(run, timeout)
                except Exception as exc:  # a driver bug must not leave the action unreported
                    log.exception("power %s of %s failed", action, machine.name)
                    result = _Result(False, PowerState.UNKNOWN,
                                     f"power {action} failed: internal error ({exc})")  # fmt: skip
                    self._event(run, result.message)
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

    # -- the chain ------------------------------------------------------------------------

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

    def _links(self, machine: MachineSection, target: PowerTarget) -> list[_Link]:
        factory = self._factory
        if factory is None:
            from pixiebox.power import (
                make_driver,  # the drivers import heavy libraries; load them on use
            )

            factory = make_driver
        links = []
        for spec in machine.power_chain():
            label = describe_spec(spec)
            try:
                links.append(_Link(spec, label, factory(spec, target)))
            except PowerError as exc:
                links.append(_Link(spec, label, None, str(exc)))
        return links

    def _event(self, run: _Run, message: str, kind: str = "power") -> None:
        self.inventory.record(run.mac, kind, message)

    async def _call(self, run: _Run, link: _Link, action: PowerAction) -> str | None:
        """Send `action` through `link`; None when sent, else why it could not be."""
        run.use(link)
        if link.driver is None:
            return f"{link.label} cannot be used: {link.problem}"
        calls = {PowerAction.ON: link.driver.on, PowerAction.OFF: link.driver.off,
                 PowerAction.CYCLE: link.driver.cycle}  # fmt: skip
        try:
            await asyncio.wait_for(calls[action](), CALL_TIMEOUT)
        except PowerError as exc:
            return str(exc)
        except TimeoutError:
            return f"{link.label} did not finish sending power {action} in {CALL_TIMEOUT:g} s"
        return None

    async def _read(self, link: _Link) -> PowerState:
        """`link`'s reading of the power; UNKNOWN when it cannot tell (or failed to)."""
        if link.driver is None or not link.reads_status:
            return PowerState.UNKNOWN
        try:
            return await asyncio.wait_for(link.driver.status(), CALL_TIMEOUT)
        except (PowerError, TimeoutError) as exc:
            log.info("reading the power of %s through %s: %s", link.driver, link.label, exc)
            return PowerState.UNKNOWN

    async def _watts(self, link: _Link) -> str:
        """ ", 0.0 W" from a plug with an energy sensor (the drivers' optional power_watts)."""
        reader = getattr(link.driver, "power_watts", None)
        if reader is None:
            return ""
        try:
            watts = await asyncio.wait_for(reader(), CALL_TIMEOUT)
        except (PowerError, TimeoutError):
            return ""
        return f", {watts:.1f} W" if isinstance(watts, int | float) else ""

    async def _reading(self, run: _Run) -> tuple[PowerState, str]:
        """The first definite reading of the chain: (state, "tasmota at 10.0.0.5 reads on")."""
        for link in run.links:
            state = await self._read(link)
            if state is not PowerState.UNKNOWN:
                return state, f"{link.label} reads {state}"
        return PowerState.UNKNOWN, ""

    def _lifecycle_state(self, mac: str) -> MachineState | None:
        record = self.inventory.lifecycle.records().get(mac)
        return MachineState(record.state) if record is not None and record.state else None

    @staticmethod
    def _next(links: list[_Link], index: int) -> str:
        rest = links[index + 1 :]
        return f"trying {rest[0].label}" if rest else "no other driver to try"

    # -- waiting for what is seen ---------------------------------------------------------

    async def _wait(
        self,
        run: _Run,
        deadline: float,
        seen: Callable[[Event], bool],
        poll: Callable[[], Awaitable[bool]] | None = None,
    ) -> bool:
        """Until an event of the machine is `seen`, or `poll` answers True (asked every POLL
        seconds), or the monotonic `deadline`."""
        next_poll = time.monotonic()
        while True:
            if poll is not None and time.monotonic() >= next_poll:
                if await poll():
                    return True
                next_poll = time.monotonic() + POLL
            now = time.monotonic()
            if now >= deadline:
                return False
            wait = deadline - now if poll is None else min(deadline, next_poll) - now
            try:
                event = await asyncio.wait_for(run.queue.get(), max(wait, 0.0))
            except TimeoutError:
                continue
            if event.mac == run.mac and seen(event):
                return True

    async def _silent(self, run: _Run, deadline: float, settle: float) -> bool:
        """True once the machine sent nothing and answered no ping for `settle` seconds."""
        ip = run.target.ip
        quiet_since = time.monotonic()
        next_ping = quiet_since
        while True:
            now = time.monotonic()
            if now - quiet_since >= settle:
                return True
            if now >= deadline:
                return False
            if ip is not None and now >= next_ping:
                if await self._ping(ip):
                    quiet_since = time.monotonic()
                next_ping = time.monotonic() + POLL
            wake = min(quiet_since + settle, deadline, next_ping if ip is not None else math.inf)
            try:
                event = await asyncio.wait_for(run.queue.get(), max(wake - time.monotonic(), 0.0))
            except TimeoutError:
                continue
            if event.mac == run.mac and event.kind not in _NOT_TRAFFIC:
                quiet_since = time.monotonic()

    async def _seen_up(self, run: _Run, since: float, deadline: float) -> bool:
        """A phone-home after the wall-clock time `since` (or, with verify_on = "ping", a ping
        answer) before `deadline`."""
        ip = run.target.ip
        by_ping = self.inventory.config.power.verify_on == "ping" and ip is not None

        async def answers() -> bool:
            return ip is not None and await self._ping(ip)

        return await self._wait(
            run, deadline, lambda e: e.kind == "phone-home" and e.time >= since,
            answers if by_ping else None,
        )  # fmt: skip

    def _up_wording(self, run: _Run) -> str:
        if self.inventory.config.power.verify_on == "ping" and run.target.ip is not None:
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
            if await self._ping(run.target.ip):
                return f"already on: it answers ping at {run.target.ip}"
            return None
        state_now = self._lifecycle_state(run.mac)
        return f"already {state_now} (from its events; nothing can read its power)"

    async def _on(self, run: _Run, timeout: float) -> _Result:
        already = await self._already_on(run)
        if already is not None:
            self._event(run, f"power on asked: {already}; nothing to do")
            return _Result(True, PowerState.ON, already, already=True)
        if self._lifecycle_state(run.mac) is MachineState.BOOTING:
            # Booting already (someone pressed its button): sending `on` again could only hurt
            # (a plug cycled in the middle of a boot), so give that boot its time first.
            state, how = await self._reading(run)
            if state is not PowerState.OFF:
                sent = time.time()
                reading = f" ({how})" if how else ""
                wait = f"waiting up to {minutes(timeout)} {self._up_wording(run)}"
                self._event(run, f"power on asked while it is booting{reading}; {wait}")
                if await self._seen_up(run, sent, time.monotonic() + timeout):
                    message = f"up {time.time() - sent:.0f} s later (it was booting already)"
                    self._event(run, message)
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
                link.driver is not None and not link.driver.graceful
                and PowerAction.CYCLE in link.driver.actions
                and await self._read(link) is PowerState.ON
            ):  # fmt: skip
                action = PowerAction.CYCLE
            problem = await self._call(run, link, action)
            if problem is not None:
                self._event(run, f"power on by {link.label} failed: {problem}; "
                            f"{self._next(links, index)}")  # fmt: skip
                continue
            how = "cycled (it read on, but the machine was not up)" if action is PowerAction.CYCLE \
                else "sent"  # fmt: skip
            self._event(run, f"power on by {link.label} {how}; waiting up to {minutes(timeout)} "
                        f"{self._up_wording(run)}")  # fmt: skip
            if await self._seen_up(run, sent, time.monotonic() + timeout):
                seconds = time.time() - sent
                message = f"up {seconds:.0f} s after power on by {link.label}"
                self._event(run, message)
                return _Result(True, PowerState.ON, message)
            self._event(run, f"not up after {minutes(timeout)}; {self._next(links, index)}")
        message = (f"power on failed: not up after trying {', '.join(run.used)}; "
                   f"pixiebox doctor {run.machine.name} tells how far it got")  # fmt: skip
        self._event(run, message)
        return _Result(False, PowerState.UNKNOWN, message)

    def _cannot(self, run: _Run, action: PowerAction) -> _Result:
        chain = ", ".join(link.label for link in run.links)
        message = (f"no driver of {run.machine.name}'s power chain ({chain}) can {action} it; "
                   "add one that can to its power list in lab.toml")  # fmt: skip
        self._event(run, message)
        return _Result(False, PowerState.UNKNOWN, message)

    # -- off ------------------------------------------------------------------------------

    async def _off(self, run: _Run, timeout: float) -> _Result:
        state, how = await self._reading(run)
        if state is PowerState.OFF:
            message = f"already off ({how})"
            if self._lifecycle_state(run.mac) is not MachineState.OFF:
                self._event(run, f"power off asked: {message}", kind="off")
            else:
                self._event(run, f"power off asked: {message}; nothing to do")
            return _Result(True, PowerState.OFF, message, already=True)
        # Graceful drivers first (the OS shuts down cleanly), then the hard cut; otherwise in
        # the order of lab.toml (sorted() is stable).
        links = sorted(
            (link for link in run.links if link.can(PowerAction.OFF)),
            key=lambda link: not (link.driver is not None and link.driver.graceful),
        )
        if not links:
            return self._cannot(run, PowerAction.OFF)
        settle = float(self.inventory.config.power.off_settle)
        for index, link in enumerate(links):
            problem = await self._call(run, link, PowerAction.OFF)
            if problem is not None:
                self._event(run, f"power off by {link.label} failed: {problem}; "
                            f"{self._next(links, index)}")  # fmt: skip
                continue
            seen = await self._seen_off(run, link, timeout, settle)
            if seen is not None:
                message = f"powered off by {link.label} ({seen})"
                self._event(run, message, kind="off")
                return _Result(True, PowerState.OFF, message)
            self._event(run, f"still on {minutes(timeout)} after power off by {link.label}; "
                        f"{self._next(links, index)}")  # fmt: skip
        message = f"power off failed: still on after trying {', '.join(run.used)}"
        self._event(run, message)
        return _Result(False, PowerState.ON, message)

    async def _seen_off(self, run: _Run, link: _Link, timeout: float, settle: float) -> str | None:
        """How the machine was seen off after `link` switched it off, or None."""
        deadline = time.monotonic() + timeout
        if link.reads_status and await self._read(link) is not PowerState.UNKNOWN:
            self._event(run, f"power off by {link.label} sent; waiting up to {minutes(timeout)} "
                        f"for {link.label} to read it off")  # fmt: skip

            async def reads_off() -> bool:
                return await self._read(link) is PowerState.OFF

            if await self._wait(run, deadline, lambda e: False, reads_off):
                return f"it reads off{await self._watts(link)}"
            return None
        where = f" and no ping answer at {run.target.ip}" if run.target.ip else ""
        self._event(run, f"power off by {link.label} sent; waiting up to {minutes(timeout)} for "
                    f"{minutes(settle)} of silence (no boot request, phone-home or "
                    f"syslog{where})")  # fmt: skip
        if await self._silent(run, deadline, settle):
            return f"silent for {minutes(settle)}{where}"
        return None

    # -- cycle ----------------------------------------------------------------------------

    async def _cycle(self, run: _Run, on_timeout: float, off_timeout: float) -> _Result:
        links = [link for link in run.links if link.can(PowerAction.CYCLE)]
        timeout = on_timeout + off_timeout
        for index, link in enumerate(links):
            then = (self._next(links, index) if index + 1 < len(links)
                    else "switching it off and on instead")  # fmt: skip
            sent = time.time()
            problem = await self._call(run, link, PowerAction.CYCLE)
            if problem is not None:
                self._event(run, f"power cycle by {link.label} failed: {problem}; {then}")
                continue
            self._event(run, f"power cycle by {link.label} sent; waiting up to "
                        f"{minutes(timeout)} {self._up_wording(run)} again")  # fmt: skip
            if await self._seen_up(run, sent, time.monotonic() + timeout):
                message = f"back up {time.time() - sent:.0f} s after power cycle by {link.label}"
                self._event(run, message)
                return _Result(True, PowerState.ON, message)
            self._event(run, f"not back up {minutes(timeout)} after power cycle by "
                        f"{link.label}; {then}")  # fmt: skip
        off = await self._off(run, off_timeout)
        if not off.ok:
            return _Result(False, off.state, f"power cycle failed: {off.message}")
        on = await self._on(run, on_timeout)
        if not on.ok:
            return _Result(False, on.state, f"power cycle failed: off, then {on.message}")
        return _Result(True, PowerState.ON, f"power cycled: {off.message}; then {on.message}")

    # -- status ---------------------------------------------------------------------------

    async def _status(self, run: _Run) -> _Result:
        problems = []
        for link in run.links:
            if link.driver is None:
                problems.append(f"{link.label} cannot be used: {link.problem}")
                continue
            if not link.reads_status:
                continue
            run.use(link)
            try:
                state = await asyncio.wait_for(link.driver.status(), CALL_TIMEOUT)
            except PowerError as exc:
                problems.append(str(exc))
                continue
            except TimeoutError:
                problems.append(f"{link.label} did not answer in {CALL_TIMEOUT:g} s")
                continue
            if state is not PowerState.UNKNOWN:
                return _Result(True, state, f"{state} ({link.label} reads {state})")
        record = self.inventory.lifecycle.records().get(run.mac)
        derived = derived_power(record)
        note = f" ({'; '.join(problems)})" if problems else ""
        if run.target.ip is not None and await self._ping(run.target.ip):
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
