"""Each machine's state and event log: discovered → enrolled → booting → up → joined → off.

Every protocol step (DHCP offer, TFTP file, iPXE script, kernel, initrd), the OS's phone-home,
power actions and syslog lines become events with a time, a kind and a plain sentence; the state
follows from them. Subscribers (the API's server-sent events, the demo's live view) get each event
as it happens. Silence past `off_after` marks a machine off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from enum import StrEnum

from pixiebox.events import BOOT_CHAIN, Event, Fields, Kind
from pixiebox.store.state import MachineRecord, StateStore

log = logging.getLogger("pixiebox.core.lifecycle")


class MachineState(StrEnum):
    DISCOVERED = "discovered"
    ENROLLED = "enrolled"
    BOOTING = "booting"
    UP = "up"
    JOINED = "joined"
    OFF = "off"


#: Where each kind of event moves a machine; kinds not listed leave the state alone.
_TRANSITIONS: dict[str, MachineState] = {
    **dict.fromkeys(BOOT_CHAIN, MachineState.BOOTING),
    Kind.OS_UP: MachineState.UP,
    Kind.OS_JOINED: MachineState.JOINED,
    Kind.MACHINE_OFF: MachineState.OFF,
}
#: States a silent machine is taken out of.
_ALIVE = frozenset({MachineState.BOOTING, MachineState.UP, MachineState.JOINED})
#: A slow SSE client must not hold memory: past this many queued events it misses the oldest.
SUBSCRIBER_QUEUE = 1000


class Lifecycle:
    def __init__(self, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._boot_started: dict[str, float] = {}
        #: Seconds from a machine's first boot request to its OS phoning home (recent boots).
        self.boot_durations: collections.deque[float] = collections.deque(maxlen=1000)

    def record(
        self,
        mac: str,
        kind: Kind,
        message: str,
        *,
        ip: str | None = None,
        fields: Fields | None = None,
    ) -> Event:
        """Add an event to `mac`'s log, move its state, and tell the subscribers. `message` is
        for people; `fields` carry the facts code reads (pixiebox.events.KINDS)."""
        now = self._clock()
        self._store.touch(mac, now, ip)
        target = _TRANSITIONS.get(kind)
        if target is not None:
            current = self._store.machine_record(mac)
            if current is None or current.state != target:
                self._store.set_state(mac, target, now)
                if target is MachineState.BOOTING:
                    self._boot_started[mac] = now
                elif target is MachineState.UP and mac in self._boot_started:
                    took = now - self._boot_started.pop(mac)
                    self.boot_durations.append(took)
                    # The boot's length is a fact of the os.up event (KINDS), not only a metric.
                    fields = {**(fields or {}), "boot_seconds": round(took, 1)}
        event = self._store.add_event(mac, kind, message, now, fields)
        self._publish(event)
        return event

    def note(self, mac: str, kind: Kind, message: str, fields: Fields | None = None) -> Event:
        """An event in `mac`'s log that says nothing about the machine itself (a refusal of
        its secrets to someone else): neither its state nor when it was last heard changes.
        `mac` "" is the lab's own log (a refusal no machine can be named for)."""
        event = self._store.add_event(mac, kind, message, self._clock(), fields)
        self._publish(event)
        return event

    def _publish(self, event: Event) -> None:
        for queue in list(self._subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    def discovered(self, mac: str, message: str, fields: Fields | None = None) -> None:
        """An unknown machine showed up for the first time."""
        self._store.set_state(mac, MachineState.DISCOVERED, self._clock())
        self.record(mac, Kind.MACHINE_DISCOVERED, message, fields=fields)

    def state_of(self, record: MachineRecord | None, enrolled: bool) -> MachineState:
        if record is None or not record.state:
            return MachineState.ENROLLED if enrolled else MachineState.DISCOVERED
        state = MachineState(record.state)
        if state is MachineState.DISCOVERED and enrolled:
            return MachineState.ENROLLED
        return state

    def records(self) -> dict[str, MachineRecord]:
        return self._store.machine_records()

    def events(self, mac: str | None = None, after: int = 0, limit: int = 500) -> list[Event]:
        return self._store.events(mac, after, limit)

    @contextlib.asynccontextmanager
    async def subscription(self) -> AsyncIterator[asyncio.Queue[Event]]:
        queue: asyncio.Queue[Event] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def mark_silent(self, off_after: float, names: Callable[[str], str] = str) -> list[str]:
        """Machines alive but silent for `off_after` seconds are now `off`; their MACs."""
        now = self._clock()
        silent = [
            record for record in self._store.machine_records().values()
            if record.state in _ALIVE and now - record.last_seen > off_after
        ]  # fmt: skip
        for record in silent:
            minutes = (now - record.last_seen) / 60
            self.record(
                record.mac, Kind.MACHINE_OFF,
                f"silent for {minutes:.0f} min after it was {record.state}; shown as off "
                "(powered off, or it crashed: look at its console)",
                fields={"cause": "silence", "silent_for": round(now - record.last_seen),
                        "was": record.state},
            )  # fmt: skip
            log.info("%s has been silent for %.0f min; shown as off", names(record.mac), minutes)
        return [record.mac for record in silent]

    async def watch_silence(self, off_after: Callable[[], float], names: Callable[[str], str],
                            every: float = 30.0) -> None:  # fmt: skip
        while True:
            await asyncio.sleep(every)
            try:
                self.mark_silent(off_after(), names)
            except Exception:
                log.exception("checking for silent machines failed")


def last_of(events: Iterable[Event], kinds: frozenset[str]) -> Event | None:
    found = None
    for event in events:
        if event.kind in kinds:
            found = event
    return found
