"""Each machine's state and event log: discovered → enrolled → booting → up → joined → off.

Every protocol step (DHCP offer, TFTP file, iPXE script, kernel, initrd), the OS's phone-home,
power actions and syslog lines become events with a time, a kind and a plain sentence; the state
follows from them. Subscribers (the API's server-sent events, the demo's live view) get each event
as it happens. Silence past `off_after` marks a machine off.

The machines not in lab.toml ("discovered") are bounded here, in one place, because any device
on the LAN can ask to boot with any MAC and each one costs a record, an event log, a boot-time
entry: at most [boot] max_discovered are kept, and one not heard from for [boot]
forget_discovered_after is forgotten (`Roster`). Their leases stay (a lease is a promise), and
machines in lab.toml are never forgotten.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from enum import StrEnum
from itertools import islice

from pixiebox.core import wording
from pixiebox.events import BOOT_CHAIN, Event, Fields, FieldValue, Kind
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

#: Kinds that show a machine got past DHCP: it fetched a boot file after the DHCP answer, or its
#: OS runs. A MAC merely asking for an address (a storm, a phone) has none of these, so the cap
#: forgets those first; a machine that really booted is kept longer.
PAST_DHCP = frozenset(
    {
        Kind.TFTP_SENT,
        Kind.HTTP_SCRIPT,
        Kind.HTTP_PXELINUX,
        Kind.HTTP_KERNEL,
        Kind.HTTP_INITRD,
        Kind.METADATA_SENT,
        Kind.OS_UP,
        Kind.OS_JOINED,
        Kind.SYSLOG,
    }
)
#: Seconds between two lab-log events (and log lines) about forgetting, per reason: a storm of
#: 20,000 MACs says so once a minute with a count, not 20,000 times.
FORGET_QUIET = 60.0
#: Machines forgotten per loop turn by the periodic pass (each costs three indexed DELETEs): a
#: large backlog (a store from before the cap, a lowered cap) is worked off between DHCP batches.
FORGET_BATCH = 100


class Roster:
    """The discovered machines whose records the store keeps, each with when it was last heard
    from, the least recently heard first: those that never got past DHCP, and those that did.

    In memory so that choosing whom to forget costs O(1) per new MAC on the DHCP path, not a
    query; rebuilt from the store at start (`Lifecycle.bound`). Used from the event loop only."""

    def __init__(self) -> None:
        self._dhcp_only: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._booted: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._dhcp_only) + len(self._booted)

    def __contains__(self, mac: object) -> bool:
        return mac in self._dhcp_only or mac in self._booted

    def heard(self, mac: str, now: float, past_dhcp: bool, *, refresh: bool = True) -> bool:
        """`mac` was heard from at `now` (`past_dhcp`: with a step after DHCP); True when it is
        new here. `refresh` False (a silence noticed by the agent itself) adds an unknown MAC
        but does not make a known one look recent."""
        if mac in self._booted:
            if refresh:
                self._booted[mac] = now
                self._booted.move_to_end(mac)
            return False
        known = self._dhcp_only.get(mac)
        if known is not None and not refresh:
            return False
        if known is not None and not past_dhcp:
            self._dhcp_only[mac] = now
            self._dhcp_only.move_to_end(mac)
            return False
        self._dhcp_only.pop(mac, None)
        (self._booted if past_dhcp else self._dhcp_only)[mac] = now
        return known is None

    def drop(self, mac: str) -> None:
        self._dhcp_only.pop(mac, None)
        self._booted.pop(mac, None)

    def first_to_go(self, spare: str | None = None) -> str | None:
        """Whom the cap forgets next: the least recently heard machine that never got past
        DHCP, else the least recently heard of all; never `spare` (the one just heard: it would
        be recorded again by its own next event, and the cap overrun by one)."""
        for book in (self._dhcp_only, self._booted):
            for mac in islice(book, 2):
                if mac != spare:
                    return mac
        return None

    def stale(self, before: float) -> str | None:
        """The least recently heard machine when it was last heard before `before`."""
        heads = [(seen, mac) for book in (self._dhcp_only, self._booted)
                 for mac, seen in islice(book.items(), 1)]  # fmt: skip
        if not heads:
            return None
        seen, mac = min(heads)
        return mac if seen < before else None


class Lifecycle:
    def __init__(self, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._subscribers: set[asyncio.Queue[Event]] = set()
        #: When each machine's boot began; a forgotten machine's entry goes with it (`_forget`).
        self._boot_started: dict[str, float] = {}
        #: Seconds from a machine's first boot request to its OS phoning home (recent boots).
        self.boot_durations: collections.deque[float] = collections.deque(maxlen=1000)
        #: The discovered machines kept (see the module's doc); `bound` sets the limits.
        self.roster = Roster()
        self.max_discovered = 1000
        self.forget_after = 7 * 86400.0
        self._enrolled: Callable[[str], bool] = lambda mac: False
        #: Reason → machines forgotten since the last lab event about it, and when that was.
        self._forgotten: dict[str, int] = {}
        self._told: dict[str, float] = {}
        #: When the cap last made room (`under_pressure`).
        self._crowded: float | None = None

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
        self._heard(mac, now, kind)
        self._store.touch(mac, now, ip)
        if kind == Kind.OS_UP:
            # What the OS says of Secure Boot, from its latest "up" only (http.phonehome): an
            # OS that says nothing this boot clears what an earlier one said.
            self._store.set_secure_boot(mac, str((fields or {}).get("secure_boot") or ""))
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
        now = self._clock()
        self._heard(mac, now, Kind.MACHINE_DISCOVERED)
        self._store.set_state(mac, MachineState.DISCOVERED, now)
        self.record(mac, Kind.MACHINE_DISCOVERED, message, fields=fields)

    # -- the bound on discovered machines (the module's doc)

    def bound(
        self,
        enrolled: Callable[[str], bool],
        max_discovered: int,
        forget_after: float,
        *,
        load: bool = False,
    ) -> None:
        """Set the limits ([boot] max_discovered, forget_discovered_after) and what counts as
        enrolled (never forgotten); `load`: rebuild the roster from the store (at start). A
        store over the cap is brought under it by `forget_some`, a batch per loop turn."""
        self._enrolled = enrolled
        self.max_discovered = max_discovered
        self.forget_after = float(forget_after)
        if load:
            self.roster = Roster()
            for mac, seen, past in self._store.machines_by_last_seen(PAST_DHCP):
                if mac and not enrolled(mac):
                    self.roster.heard(mac, seen, past)

    def enrolled_now(self, macs: Iterable[str]) -> None:
        """`macs` are in lab.toml now (a reload): never forgotten from here on."""
        for mac in macs:
            self.roster.drop(mac)

    def unenrolled(self, macs: Iterable[str]) -> None:
        """`macs` left lab.toml (a reload): those with a record are discovered machines now,
        bounded like the others."""
        for mac, record in self._store.machine_records_of(list(macs)).items():
            self.roster.heard(mac, record.last_seen, record.state in _PAST_DHCP_STATES)

    def heard(self, mac: str) -> None:
        """`mac` asked to boot (core.inventory.seen): it is recent, and if it is new and the
        cap is reached, another discovered machine is forgotten to make room."""
        self._heard(mac, self._clock(), None)

    def under_pressure(self) -> bool:
        """Whether the cap made room in the last FORGET_QUIET seconds (a flood of new MACs):
        the inventory then logs new ones in the minute's summary, not one line each."""
        return self._crowded is not None and self._clock() - self._crowded < FORGET_QUIET

    def _heard(self, mac: str, now: float, kind: Kind | None) -> None:
        if not mac or self._enrolled(mac):
            return
        past = kind in PAST_DHCP
        if not self.roster.heard(mac, now, past, refresh=kind is not Kind.MACHINE_OFF):
            return
        if len(self.roster) > self.max_discovered:
            # One out per one in: the DHCP path pays two statements, never a sweep; a larger
            # excess (a lowered cap, an old store) is the periodic pass's (forget_some).
            first = self.roster.first_to_go(spare=mac)
            if first is not None:
                self._forget(first, "cap", now)

    def _forget(self, mac: str, reason: str, now: float) -> None:
        if reason == "cap":
            self._crowded = now
        self._store.forget_machine(mac)
        self.roster.drop(mac)
        self._boot_started.pop(mac, None)
        self._forgotten[reason] = self._forgotten.get(reason, 0) + 1
        self._tell(reason, now)

    def _tell(self, reason: str, now: float) -> None:
        """One lab-log event and log line for the machines forgotten for `reason` since the
        last one, FORGET_QUIET seconds apart at most."""
        count = self._forgotten.get(reason, 0)
        told = self._told.get(reason)
        if not count or (told is not None and now - told < FORGET_QUIET):
            return
        self._forgotten[reason] = 0
        self._told[reason] = now
        plural = "machine" if count == 1 else "machines"
        if reason == "cap":
            message = (
                f"forgot {count} discovered {plural} to stay within [boot] max_discovered = "
                f"{self.max_discovered} (the least recently heard first, those that never got "
                "past DHCP before any other): many MACs are asking to boot, a flood of DHCP "
                "requests? Leases stay; machines in lab.toml are never forgotten"
            )
            log.warning("%s", message)
        else:
            message = (
                f"forgot {count} discovered {plural} not heard from for "
                f"{wording.timeout(self.forget_after)} ([boot] forget_discovered_after); "
                "their leases stay"
            )
            log.info("%s", message)
        fields: dict[str, FieldValue] = {
            "reason": reason,
            "count": count,
            "max_discovered": self.max_discovered,
            "forget_after": round(self.forget_after),
        }
        self.note("", Kind.MACHINE_FORGOTTEN, message, fields)

    def forget_some(self, batch: int = FORGET_BATCH) -> int:
        """Forget up to `batch` discovered machines: those past the cap, then those not heard
        from for forget_after; report what is due (`_tell`). Returns how many were forgotten."""
        now = self._clock()
        done = 0
        while done < batch and len(self.roster) > self.max_discovered:
            first = self.roster.first_to_go()
            if first is None:
                break
            self._forget(first, "cap", now)
            done += 1
        while done < batch:
            stale = self.roster.stale(now - self.forget_after)
            if stale is None:
                break
            self._forget(stale, "age", now)
            done += 1
        for reason in ("cap", "age"):
            self._tell(reason, now)
        return done

    def state_of(self, record: MachineRecord | None, enrolled: bool) -> MachineState:
        if record is None or not record.state:
            return MachineState.ENROLLED if enrolled else MachineState.DISCOVERED
        state = MachineState(record.state)
        if state is MachineState.DISCOVERED and enrolled:
            return MachineState.ENROLLED
        return state

    def records(self) -> dict[str, MachineRecord]:
        """Every machine's record: a walk of the table (a page of the API reads `page`)."""
        return self._store.machine_records()

    def record_of(self, mac: str) -> MachineRecord | None:
        return self._store.machine_record(mac)

    def records_of(self, macs: Iterable[str]) -> dict[str, MachineRecord]:
        return self._store.machine_records_of(list(macs))

    def page(
        self,
        after: tuple[float, str] | None,
        limit: int,
        exclude: Collection[str],
        states: Collection[str] | None,
    ) -> list[MachineRecord]:
        """Machines in (first_seen, MAC) order after `after`, without `exclude`, of the stored
        `states` when given (store.machine_page: an index walk of the page only)."""
        return self._store.machine_page(after, limit, exclude=exclude, states=states)

    def count(self, exclude: Collection[str], states: Collection[str] | None) -> int:
        return self._store.machine_count(exclude=exclude, states=states)

    def stored_states(self, exclude: Collection[str]) -> dict[str, int]:
        """Stored state → how many machines (without `exclude`) have it."""
        return self._store.state_counts(exclude=exclude)

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
        strangers = 0
        for record in silent:
            minutes = (now - record.last_seen) / 60
            self.record(
                record.mac, Kind.MACHINE_OFF,
                f"silent for {minutes:.0f} min after it was {record.state}; shown as off "
                "(powered off, or it crashed: look at its console)",
                fields={"cause": "silence", "silent_for": round(now - record.last_seen),
                        "was": record.state},
            )  # fmt: skip
            if self._enrolled(record.mac) or len(silent) <= 10:
                log.info("%s has been silent for %.0f min; shown as off", names(record.mac),
                         minutes)  # fmt: skip
            else:
                strangers += 1
        if strangers:
            # The MACs of a DHCP storm all fall silent together: one line, not one each (their
            # machine.off events say who).
            log.info("%d discovered machines have been silent for %s; shown as off", strangers,
                     wording.span(off_after))  # fmt: skip
        return [record.mac for record in silent]

    async def watch_silence(self, off_after: Callable[[], float], names: Callable[[str], str],
                            every: float = 30.0) -> None:  # fmt: skip
        """Every `every` seconds, mark silent machines off; between, forget discovered machines
        due (forget_some) in batches, one per loop turn so DHCP is answered between them, at
        least every tenth of forget_after (a short one, as in tests, is kept to)."""
        loop = asyncio.get_running_loop()
        silence_due = loop.time() + every
        while True:
            try:
                while self.forget_some() >= FORGET_BATCH:
                    await asyncio.sleep(0)
            except Exception:
                log.exception("forgetting discovered machines failed")
            await asyncio.sleep(min(every, max(1.0, self.forget_after / 10)))
            if loop.time() < silence_due:
                continue
            silence_due = loop.time() + every
            try:
                self.mark_silent(off_after(), names)
            except Exception:
                log.exception("checking for silent machines failed")


#: Stored states that show a machine got past DHCP (a machine leaving lab.toml: its events are
#: not read for that).
_PAST_DHCP_STATES = frozenset({MachineState.UP, MachineState.JOINED})


def last_of(events: Iterable[Event], kinds: frozenset[str]) -> Event | None:
    found = None
    for event in events:
        if event.kind in kinds:
            found = event
    return found
