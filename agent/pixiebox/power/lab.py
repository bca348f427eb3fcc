"""`lab up` and `lab down`: the whole lab on and off, with a readiness report.

Done in the agent (POST /api/v1/lab/up, /lab/down) rather than in the CLI: the agent holds each
machine's power lock and its event log, so the whole-lab action is one call for a script or the
dashboard too, and it finishes (and is logged) even when the terminal that started it closes.
The CLI follows it live through the event stream.

`up` switches machines on one after another, [power] stagger seconds apart (a rack of NUCs
drawing their inrush current at once can trip a household fuse), each a verified `on` with its
chain; the report gives each machine's time from power-on to `up` (and to `joined` when a
Kubernetes server is configured), and for stragglers the boot doctor's verdict. `down` switches
them all off at once, graceful drivers first.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pixiebox.config import MachineSection
from pixiebox.core.lifecycle import MachineState
from pixiebox.doctor.machine import diagnose_machine
from pixiebox.power.base import PowerAction
from pixiebox.power.controller import PowerBusy, PowerController
from pixiebox.power.views import PowerOutcome

#: Seconds between looks at the lifecycle while waiting for machines to join Kubernetes.
JOIN_POLL = 1.0

LabResult = Literal["up", "already up", "off", "already off", "failed", "busy", "skipped"]


class LabRequest(BaseModel):
    """The body of POST /api/v1/lab/up and /lab/down (every key optional)."""

    model_config = ConfigDict(extra="forbid")

    #: Seconds between two machines' power-on (default [power] stagger); `up` only.
    stagger: float | None = Field(default=None, ge=0, le=3600)
    #: Seconds each attempt may take (default [power] on_timeout / off_timeout).
    timeout: float | None = Field(default=None, gt=0, le=86400)


class LabMachine(BaseModel):
    name: str
    mac: str
    result: LabResult
    #: Seconds from its power action to `up` (lab up) or to seen off (lab down).
    seconds: float | None = None
    #: Seconds from its power-on to its Kubernetes node being Ready.
    joined_seconds: float | None = None
    drivers: list[str] = []
    message: str
    #: For a machine that did not come up: the boot doctor's verdict.
    diagnosis: str | None = None


class LabReport(BaseModel):
    action: Literal["up", "down"]
    #: True when every machine with power control ended up as asked.
    ok: bool
    seconds: float
    machines: list[LabMachine]


def _skipped(machine: MachineSection) -> LabMachine:
    return LabMachine(
        name=machine.name, mac=machine.mac, result="skipped",
        message='no power control: skipped (add power = { driver = "..." } in lab.toml)',
    )  # fmt: skip


def _from_outcome(outcome: PowerOutcome, action: Literal["up", "down"]) -> LabMachine:
    if outcome.outcome == "ok":
        done: LabResult = "up" if action == "up" else "off"
        result: LabResult = "already up" if outcome.already and action == "up" else (
            "already off" if outcome.already else done)  # fmt: skip
    else:
        result = "failed"
    return LabMachine(
        name=outcome.machine, mac=outcome.mac, result=result,
        seconds=None if outcome.already or outcome.outcome != "ok" else outcome.seconds,
        drivers=outcome.drivers, message=outcome.message,
    )  # fmt: skip


async def _guarded(
    controller: PowerController,
    machine: MachineSection,
    action: PowerAction,
    timeout: float | None,
    kind: Literal["up", "down"],
) -> LabMachine:
    try:
        outcome = await controller.act(machine, action, timeout=timeout)
    except PowerBusy as exc:
        return LabMachine(name=machine.name, mac=machine.mac, result="busy", message=str(exc))
    return _from_outcome(outcome, kind)


def _diagnose(controller: PowerController, machine: MachineSection, boot_timeout: float) -> str:
    inventory = controller.inventory
    record = inventory.lifecycle.records().get(machine.mac)
    state = inventory.lifecycle.state_of(record, enrolled=True)
    found = diagnose_machine(
        inventory, machine.mac, state=state, name=machine.name, enrolled=True, now=time.time(),
        boot_timeout=boot_timeout,
    )  # fmt: skip
    return found.verdict


async def _wait_joined(
    controller: PowerController, reports: list[LabMachine], started: float, deadline: float
) -> None:
    """Fill in each `up` machine's time to `joined`, waiting for it until `deadline`."""
    lifecycle = controller.inventory.lifecycle
    waiting = {r.mac: r for r in reports if r.result in ("up", "already up")}
    while waiting:
        records = lifecycle.records()
        for mac, report in list(waiting.items()):
            record = records.get(mac)
            if record is not None and record.state == MachineState.JOINED:
                if report.result == "up":
                    report.joined_seconds = round(max(record.state_since - started, 0.0), 1)
                del waiting[mac]
        if not waiting or time.monotonic() >= deadline:
            return
        await asyncio.sleep(JOIN_POLL)


async def lab_up(
    controller: PowerController, stagger: float | None = None, timeout: float | None = None
) -> LabReport:
    config = controller.inventory.config
    stagger = float(config.power.stagger if stagger is None else stagger)
    per_machine = float(config.power.on_timeout if timeout is None else timeout)
    started, wall = time.monotonic(), time.time()
    order: list[MachineSection] = []
    skipped: dict[str, LabMachine] = {}
    tasks: dict[str, asyncio.Task[LabMachine]] = {}
    for machine in config.machines:
        if not machine.power_chain():
            skipped[machine.mac] = _skipped(machine)
            order.append(machine)
            continue
        if tasks and stagger > 0:
            # Wait for the stagger, unless the last one needed no power at all (already up,
            # or it failed at once): then nothing is drawing an inrush current.
            await asyncio.wait([list(tasks.values())[-1]], timeout=stagger)
        order.append(machine)
        tasks[machine.mac] = asyncio.create_task(
            _guarded(controller, machine, PowerAction.ON, timeout, "up")
        )
    if tasks:
        await asyncio.wait(tasks.values())
    reports = [skipped[m.mac] if m.mac in skipped else tasks[m.mac].result() for m in order]
    for report in reports:
        if report.result == "failed":
            machine = next(m for m in order if m.mac == report.mac)
            report.diagnosis = _diagnose(controller, machine, per_machine)
    if config.kubernetes.server:
        await _wait_joined(controller, reports, wall, started + per_machine)
    powered = [r for r in reports if r.result != "skipped"]
    ok = bool(powered) and all(r.result in ("up", "already up") for r in powered)
    return LabReport(action="up", ok=ok, seconds=round(time.monotonic() - started, 1),
                     machines=reports)  # fmt: skip


async def lab_down(controller: PowerController, timeout: float | None = None) -> LabReport:
    config = controller.inventory.config
    started = time.monotonic()
    powered = [m for m in config.machines if m.power_chain()]
    results = await asyncio.gather(
        *(_guarded(controller, m, PowerAction.OFF, timeout, "down") for m in powered)
    )
    by_mac = {r.mac: r for r in results}
    reports = [by_mac.get(m.mac) or _skipped(m) for m in config.machines]
    ok = bool(results) and all(r.result in ("off", "already off") for r in results)
    return LabReport(action="down", ok=ok, seconds=round(time.monotonic() - started, 1),
                     machines=reports)  # fmt: skip
