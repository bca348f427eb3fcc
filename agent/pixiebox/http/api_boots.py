"""A machine's boots as the dashboard draws them: each boot attempt as a stage bar (DHCP →
loader → script → kernel → initrd → OS → up → joined) with times and bytes, the lab's latest
round as a timeline, and what a machine was given (image, addresses, which secrets and when).

The attempts are the doctor's (`doctor.split_attempts`), so the stage bar and `pixiebox doctor`
never disagree about where one boot ends and the next begins; every stage is read from event
kinds and fields (pixiebox.events.KINDS), never from a message. Secrets appear by name only:
a metadata.sent event lists what was released and to which address, never a value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel

from pixiebox.doctor import DEFAULT_BOOT_TIMEOUT, DEFAULT_SETTLE, split_attempts
from pixiebox.doctor.attempts import (
    DHCP_REQUESTS,
    ipxe_asked,
    is_loader,
    number,
    signed_step,
    start_of,
    text,
    tftp_failure_matters,
)
from pixiebox.events import Event, Kind

Stage = Literal["dhcp", "loader", "script", "kernel", "initrd", "os", "up", "joined"]
#: The boot chain's order, as the stage bar shows it.
STAGES: tuple[Stage, ...] = ("dhcp", "loader", "script", "kernel", "initrd", "os", "up", "joined")
Outcome = Literal["up", "joined", "failed", "booting"]

#: A lab-up round: the machines' latest boots that began within this long of the newest one.
#: `lab up` staggers power-ons by seconds; a boot an hour apart is another round.
ROUND = 3600.0
#: How far before a boot's first DHCP request a power action counts as its start.
POWER_LEAD = 120.0

#: metadata.sent's secret names (KINDS) as people say them.
SECRET_WORDS = {
    "ssh-host-key": "ssh host key",
    "node-password": "node password",
    "k3s-token": "cluster token",
    "telemetry-token": "telemetry token",
}
#: Secret releases shown for one machine, newest kept.
MAX_SECRETS = 100


class StageView(BaseModel):
    stage: Stage
    at: float
    bytes: int | None = None
    failed: bool = False


class BootView(BaseModel):
    started: float
    ended: float | None
    outcome: Outcome
    seconds_to_up: float | None
    stages: list[StageView]


class SecretView(BaseModel):
    what: str
    when: float
    to: str


class GivenView(BaseModel):
    image: str | None
    kernel: str | None
    initrd: str | None
    ip: str | None
    gateway: str | None
    dns: list[str]
    secrets: list[SecretView]


class TimelineMachine(BaseModel):
    mac: str
    name: str | None
    boot: BootView | None


class TimelineView(BaseModel):
    since: float | None
    all_up_seconds: float | None
    machines: list[TimelineMachine]


def _basename(path: str | None) -> str:
    return (path or "").rstrip("/").rsplit("/", 1)[-1]


class _Bar:
    """The stages one attempt reached, built event by event."""

    def __init__(self) -> None:
        self.stages: dict[Stage, StageView] = {}
        self.kernel = ""
        self.initrds: set[str] = set()

    def reach(self, stage: Stage, event: Event, size: float | None = None, *, failed: bool = False
              ) -> None:  # fmt: skip
        view = self.stages.get(stage)
        if view is None:
            view = self.stages[stage] = StageView(stage=stage, at=event.time)
        if size is not None:
            view.bytes = (view.bytes or 0) + int(size)  # initrds add up
        # A step that failed and then went through within the same attempt (iPXE retries a
        # broken download) is done, not failed.
        view.failed = failed

    def has(self, stage: Stage) -> bool:
        return stage in self.stages

    def file_stage(self, path: str | None) -> Stage:
        """Which download a file of the boot's script is: its kernel, an initrd, or (not
        named by the script) the next one the chain expects."""
        name = _basename(path)
        if name and name == self.kernel:
            return "kernel"
        if name and name in self.initrds:
            return "initrd"
        return "initrd" if self.has("kernel") else "kernel"

    def add(self, event: Event) -> None:
        kind = event.kind
        if kind in DHCP_REQUESTS:
            self.reach("dhcp", event)
            if ipxe_asked(event):
                self.reach("loader", event)  # iPXE is running: its loader was fetched
        elif kind == Kind.DHCP_REFUSED or kind == Kind.BOOT_IGNORED:
            self.reach("dhcp", event, failed=True)
        elif kind == Kind.TFTP_SENT and signed_step(event) == "grub-config":
            # The signed chain's script: GRUB's grub.cfg-<mac> (docs/firmware-quirks.md#33).
            self.reach("script", event, number(event, "bytes"))
        elif kind == Kind.TFTP_SENT:
            if is_loader(event) is not False or not self.has("script"):
                self.reach("loader", event, number(event, "bytes"))
            else:  # U-Boot: the kernel and initrd its pxelinux file names, over TFTP
                self.reach(self.file_stage(text(event, "file")), event, number(event, "bytes"))
        elif kind == Kind.TFTP_FAILED:
            if tftp_failure_matters(event):
                self.reach("loader" if not self.has("script") else "kernel", event, failed=True)
        elif kind in (Kind.HTTP_SCRIPT, Kind.HTTP_PXELINUX):
            self.reach("script", event)
            self.kernel = _basename(text(event, "kernel"))
            self.initrds = {_basename(p) for p in (text(event, "initrds") or "").split(",") if p}
        elif kind == Kind.HTTP_KERNEL:
            self.reach("kernel", event, number(event, "bytes"))
        elif kind == Kind.HTTP_INITRD:
            self.reach("initrd", event, number(event, "bytes"))
        elif kind == Kind.HTTP_FAILED:
            stage: Stage = "script" if event.get("reason") == "no-image" else "kernel"
            if stage == "kernel":
                stage = self.file_stage(text(event, "file"))
            self.reach(stage, event, failed=True)
        elif kind == Kind.METADATA_SENT or (kind == Kind.SYSLOG and self.has("kernel")):
            self.reach("os", event)
        elif kind == Kind.SECRET_REFUSED and event.get("secret") == "metadata":
            self.reach("os", event, failed=True)
        elif kind == Kind.OS_UP:
            self.reach("up", event)
        elif kind == Kind.OS_JOINED:
            self.reach("joined", event)


def boot_view(attempt: Sequence[Event], *, latest: bool, now: float) -> BootView:
    """One attempt. It failed when a step failed, the machine went off or started over
    before it was up, or (the latest) it has been silent longer than the doctor waits."""
    bar = _Bar()
    went_off = False
    for event in attempt:
        bar.add(event)
        went_off = went_off or (event.kind == Kind.MACHINE_OFF and not bar.has("up"))
    started = start_of(attempt).time
    stages = [bar.stages[s] for s in STAGES if s in bar.stages]
    up, joined = bar.stages.get("up"), bar.stages.get("joined")
    last = attempt[-1].time
    silent = now - last > (DEFAULT_BOOT_TIMEOUT if bar.has("kernel") else DEFAULT_SETTLE)
    outcome: Outcome
    ended: float | None
    if joined is not None or up is not None:
        outcome = "joined" if joined is not None else "up"
        ended = joined.at if joined is not None else up.at if up is not None else None
    elif any(s.failed for s in stages) or went_off or not latest or silent:
        outcome, ended = "failed", last
    else:
        outcome, ended = "booting", None
    seconds_to_up = None
    if up is not None:
        up_event = next(e for e in attempt if e.kind == Kind.OS_UP)
        seconds_to_up = number(up_event, "boot_seconds") or round(up.at - started, 1)
    return BootView(started=started, ended=ended, outcome=outcome,
                    seconds_to_up=seconds_to_up, stages=stages)  # fmt: skip


def boots(events: Sequence[Event], limit: int, now: float) -> list[BootView]:
    """The last `limit` boot attempts of a machine's log, oldest first."""
    _, attempts = split_attempts(events)
    count = len(attempts)
    return [
        boot_view(attempt, latest=index == count - 1, now=now)
        for index, attempt in enumerate(attempts)
        if index >= count - limit
    ]


def began(events: Sequence[Event], boot: BootView) -> float:
    """When a boot began: the power action just before its first DHCP request, if any."""
    powered = [
        e.time
        for e in events
        if e.kind in (Kind.POWER_ON, Kind.POWER_CYCLE)
        and boot.started - POWER_LEAD <= e.time <= boot.started
    ]
    return min(powered, default=boot.started)


def timeline(machines: Sequence[tuple[str, str | None, Sequence[Event]]], now: float
             ) -> TimelineView:  # fmt: skip
    """Every machine's latest boot, and the time from the first power-on (or DHCP request) of
    the current round to the last `up`; null while a boot of the round is not up, or while a
    machine of the lab has not booted in this round (a machine that never came is not "all up")."""
    rows: list[TimelineMachine] = []
    starts: list[tuple[float, BootView]] = []
    for mac, name, events in machines:
        latest = boots(events, 1, now)
        boot = latest[-1] if latest else None
        rows.append(TimelineMachine(mac=mac, name=name, boot=boot))
        if boot is not None:
            starts.append((began(events, boot), boot))
    if not starts:
        return TimelineView(since=None, all_up_seconds=None, machines=rows)
    newest = max(start for start, _ in starts)
    round_ = [(start, boot) for start, boot in starts if start >= newest - ROUND]
    since = min(start for start, _ in round_)
    all_up = None
    everyone = len(round_) == len(rows)
    if everyone and all(boot.outcome in ("up", "joined") for _, boot in round_):
        ups = [s.at for _, boot in round_ for s in boot.stages if s.stage == "up"]
        all_up = round(max(ups) - since, 1) if ups else None
    return TimelineView(since=since, all_up_seconds=all_up, machines=rows)


def given(
    events: Sequence[Event],
    *,
    image: str | None,
    ip: str | None,
    gateway: str | None,
    dns: list[str],
) -> GivenView:
    """What the machine was handed: its last script's image, kernel and initrds (else the
    image lab.toml gives it), its address, and every release of its secrets (by name)."""
    kernel = initrd = None
    for event in reversed(events):
        if event.kind in (Kind.HTTP_SCRIPT, Kind.HTTP_PXELINUX):
            image = text(event, "image") or image
            kernel = text(event, "kernel")
            initrd = text(event, "initrds")
            break
    released: list[SecretView] = []
    for event in events:
        if event.kind != Kind.METADATA_SENT:
            continue
        to = text(event, "ip") or ""
        for name in (text(event, "secrets") or "").split(","):
            if name.strip():
                what = SECRET_WORDS.get(name.strip(), name.strip())
                released.append(SecretView(what=what, when=event.time, to=to))
    return GivenView(image=image, kernel=kernel, initrd=initrd, ip=ip, gateway=gateway, dns=dns,
                     secrets=released[-MAX_SECRETS:])  # fmt: skip
