"""What the agent learns at run time: machines that asked to boot, their state and event log,
and DHCP leases.

lab.toml stays the source of truth for enrolled machines; this store keeps what must survive a
restart or a power cut (a lease handed out must never be handed to another MAC after a crash).

What is promised: SQLite in WAL mode with synchronous=FULL, so a COMMIT returns only after the
WAL is fsynced (fdatasync). A reply that acknowledges a write leaves only after that COMMIT: a
DHCPACK after its lease (the DHCP server's `flush` before it sends a batch's replies), an iPXE
script or a pxelinux file after its boot token (`committed`, `flush`). An acknowledged lease
therefore survives a power cut, not only an agent crash or kill -9, as far as the storage keeps
what it said it wrote (a stick or card that acknowledges a flush it has only cached can still
lose it). A batch whose COMMIT failed sends no replies: its clients ask again. Events, sightings
and machine states are committed with them, at the latest one loop turn after they happened: a
power cut loses at most the loop turn in progress, whose writes nobody was told about.

The cost is one COMMIT (one fsync) per loop turn that wrote, not one per write: the first write
on a running event loop opens a transaction and the loop commits it on its next turn (`flush`),
so a boot storm pays one fsync per DHCP batch (bench/RESULTS.md, "Issue 13: durable leases");
readers in other processes see the writes a loop turn later. Without a running loop (the CLI,
tests) every statement commits at once; close() commits what is pending, so a clean stop never
loses an acknowledged lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from pixiebox.events import LEGACY_KINDS, Event, Fields
from pixiebox.store.private import private_dir, private_file, tighten_if_present

_SCHEMA = """
CREATE TABLE IF NOT EXISTS machines (
    mac TEXT PRIMARY KEY,
    arch TEXT NOT NULL DEFAULT '',
    firmware TEXT NOT NULL DEFAULT '',
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
-- The API's pages of discovered machines (keyset paging: machine_page) read it in order.
CREATE INDEX IF NOT EXISTS machines_by_first_seen ON machines (first_seen, mac);
CREATE TABLE IF NOT EXISTS leases (
    ip TEXT PRIMARY KEY,
    mac TEXT NOT NULL,
    expires REAL NOT NULL,
    state TEXT NOT NULL  -- 'bound' (ACKed), 'released', 'declined'
);
CREATE INDEX IF NOT EXISTS leases_by_mac ON leases (mac);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mac TEXT NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_mac ON events (mac, id);
CREATE TABLE IF NOT EXISTS boot_tokens (
    mac TEXT PRIMARY KEY,
    digest TEXT NOT NULL,  -- sha256 of the token in the machine's current boot script
    issued REAL NOT NULL
);
"""

#: Columns added after the first release of a table: (table, column, declaration).
_ADDED_COLUMNS = (
    ("machines", "state", "TEXT NOT NULL DEFAULT ''"),
    ("machines", "state_since", "REAL NOT NULL DEFAULT 0"),
    ("machines", "ip", "TEXT NOT NULL DEFAULT ''"),
    ("events", "fields", "TEXT NOT NULL DEFAULT '{}'"),
    # The lease holder's client identifier (option 61, hex; '' when it sent none): RFC 2131
    # 4.3.3 / 4.3.4 honour a DECLINE or RELEASE only from the holder (dhcp.leases).
    ("leases", "client_id", "TEXT NOT NULL DEFAULT ''"),
    # Secure Boot as the OS said at its latest phone-home ('on', 'off'; '' not reported): the
    # machine's own claim (http.phonehome), kept here so a listing reads no events.
    ("machines", "secure_boot", "TEXT NOT NULL DEFAULT ''"),
)

log = logging.getLogger("pixiebox.store.state")

#: A MachineRecord's columns, in its fields' order.
_RECORD_COLUMNS = "mac, arch, firmware, first_seen, last_seen, state, state_since, ip, secure_boot"

#: One encoder for every event's fields: json.dumps would build a new one per event, and a boot
#: storm records two events per DHCP exchange.
_FIELDS_JSON = json.JSONEncoder(separators=(",", ":"))

#: Seconds before a commit that failed (the database busy) is tried again.
RETRY_COMMIT = 0.5
#: Seconds between two log lines about commits that failed (`StateStore._unsaved`).
SAY_UNSAVED_EVERY = 10.0

#: Events kept per machine (and for the lab's own log, MAC ""): enough for many boots'
#: timelines, bounded so that a machine that logs in a loop cannot fill the appliance's USB
#: stick. A hard bound: a log holds between EVENTS_PER_MACHINE - TRIM_EVERY and this many.
EVENTS_PER_MACHINE = 2000

#: A MAC's log is trimmed every this many of its own events (and at its first event since the
#: store opened), so a trim's index walk is paid once per TRIM_EVERY inserts. Counting per MAC
#: matters: a trim keyed on the global event id only ever trimmed the MAC that happened to get
#: the ids divisible by it, and two alternating sources let the other grow without bound.
TRIM_EVERY = 100

#: MACs whose insert count is remembered; past this the counts start over (each MAC is then
#: trimmed at its next event), so a storm of random MACs cannot grow the dict.
_TRIM_COUNTS_MAX = 4096


@dataclass(frozen=True, slots=True)
class MachineRecord:
    """What the store knows of a machine (lab.toml knows the rest)."""

    mac: str
    arch: str
    firmware: str
    first_seen: float
    last_seen: float
    state: str
    state_since: float
    ip: str
    #: "on" or "off" as its OS reported at its latest phone-home "up"; "" not reported.
    secure_boot: str = ""


@dataclass(frozen=True, slots=True)
class SeenMachine:
    mac: str
    arch: str
    firmware: str
    first_seen: float
    last_seen: float


@dataclass(frozen=True, slots=True)
class Lease:
    ip: IPv4Address
    mac: str
    expires: float
    state: str
    #: The holder's client identifier (option 61) as hex, "" when it sent none.
    client_id: str = ""

    def active(self, now: float) -> bool:
        return self.state == "bound" and self.expires > now


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _fail(waiter: asyncio.Future[None], exc: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(exc)


class StateStore:
    """One SQLite database file under [state] dir."""

    def __init__(self, directory: Path) -> None:
        private_dir(directory)  # [state] dir: 0700, whatever the umask (store.private)
        self.path = directory / "pixiebox.db"
        # Made 0600 before SQLite opens it (SQLite would make it 0644), and an existing one set
        # back: SQLite gives its -wal, -shm and -journal files the database file's own mode.
        private_file(self.path)
        for suffix in ("-wal", "-shm", "-journal"):
            tighten_if_present(self.path.with_name(self.path.name + suffix))
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: each COMMIT fsyncs the WAL (NORMAL leaves it to the next checkpoint, and an ACK
        # sent meanwhile could name a lease a power cut then erases: issue 13).
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        for table, column, declaration in _ADDED_COLUMNS:
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
                if (table, column) == ("events", "fields"):
                    self._rename_legacy_kinds()
        # The open transaction of a loop turn (see the module's doc); the lock keeps a worker
        # thread's write from interleaving with opening or committing it.
        self._lock = threading.Lock()
        self._pending = False
        #: Failed commits since the last line about them, and when it was said (`_unsaved`).
        self._failures = 0
        self._said_at = -SAY_UNSAVED_EVERY
        #: Tasks waiting for the open transaction's COMMIT (`committed`).
        self._waiters: list[asyncio.Future[None]] = []
        #: Events added per MAC since its log was last trimmed (`add_event`).
        self._since_trim: dict[str, int] = {}

    def _rename_legacy_kinds(self) -> None:
        """A database from before typed events: its kinds get their dotted names, so the
        doctor and the lifecycle read old boots too (their fields stay empty)."""
        for old, new in LEGACY_KINDS.items():
            self._db.execute("UPDATE events SET kind = ? WHERE kind = ?", (str(new), old))

    def close(self) -> None:
        self.flush()
        self._db.close()

    def _write(self, sql: str, params: tuple[object, ...]) -> sqlite3.Cursor:
        with self._lock:
            if not self._pending:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    return self._db.execute(sql, params)  # no loop here: autocommit
                self._db.execute("BEGIN")
                self._pending = True
                loop.call_soon(self.flush)
            return self._db.execute(sql, params)

    def flush(self) -> None:
        """Commit the writes of this loop turn (a no-op when none are pending)."""
        with self._lock:
            if not self._pending:
                return
            try:
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if not self._db.in_transaction:
                    # SQLite rolled the transaction back (the disk full, an I/O error): its
                    # writes are gone, and whoever waited for them must not reply as if stored.
                    self._unsaved(logging.ERROR, exc, "these writes are lost")
                    self._pending = False
                    waiters, self._waiters = self._waiters, []
                    for waiter in waiters:
                        waiter.get_loop().call_soon_threadsafe(_fail, waiter, exc)
                    raise
                # Another program holds the database past the busy timeout (a backup, the
                # sqlite3 shell): keep the writes and try again shortly.
                self._unsaved(logging.WARNING, exc, "trying again")
                with contextlib.suppress(RuntimeError):
                    asyncio.get_running_loop().call_later(RETRY_COMMIT, self.flush)
                raise
            self._pending = False
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.get_loop().call_soon_threadsafe(_resolve, waiter)

    def _unsaved(self, level: int, exc: Exception, outcome: str) -> None:
        """A failed COMMIT, logged at most once per SAY_UNSAVED_EVERY seconds: each DHCP batch
        tries again, and a full disk must not also fill the log."""
        self._failures += 1
        now = time.monotonic()
        if now - self._said_at < SAY_UNSAVED_EVERY:
            return
        log.log(level, "could not save to %s (%s); %s (%d failed commit(s) since the last line)",
                self.path, exc, outcome, self._failures)  # fmt: skip
        self._said_at, self._failures = now, 0

    async def committed(self) -> None:
        """Return once this loop turn's writes are committed: for a reply that must not leave
        before what it acknowledges is stored. Every request of the turn shares the one COMMIT
        (a flush per request cost the iPXE script endpoint a third of its requests per second,
        bench/)."""
        with self._lock:
            if not self._pending:
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        await waiter

    # machines seen on the wire

    def record_seen(
        self, mac: str, arch: str | None, firmware: str | None, now: float | None = None
    ) -> bool:
        """Note that `mac` asked to boot; True when it was never seen before. An arch or
        firmware of None keeps what was recorded (the asking protocol could not tell)."""
        now = time.time() if now is None else now
        cursor = self._write(
            "INSERT INTO machines (mac, arch, firmware, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (mac) DO NOTHING",
            (mac, arch or "", firmware or "", now, now),
        )
        if cursor.rowcount:
            return True
        self._write(
            "UPDATE machines SET arch = coalesce(?, arch), firmware = coalesce(?, firmware), "
            "last_seen = ? WHERE mac = ?",
            (arch, firmware, now, mac),
        )
        return False

    def seen_machines(self) -> list[SeenMachine]:
        rows = self._db.execute(
            "SELECT mac, arch, firmware, first_seen, last_seen FROM machines ORDER BY first_seen"
        )
        return [SeenMachine(*row) for row in rows]

    def machine_records(self) -> dict[str, MachineRecord]:
        rows = self._db.execute(f"SELECT {_RECORD_COLUMNS} FROM machines")
        return {row[0]: MachineRecord(*row) for row in rows}

    def machine_record(self, mac: str) -> MachineRecord | None:
        row = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} "
            "FROM machines WHERE mac = ?", (mac,),
        ).fetchone()  # fmt: skip
        return None if row is None else MachineRecord(*row)

    def set_state(self, mac: str, state: str, now: float) -> None:
        self._write(
            "INSERT INTO machines (mac, first_seen, last_seen, state, state_since) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (mac) DO UPDATE SET state = excluded.state, "
            "state_since = excluded.state_since",
            (mac, now, now, state, now),
        )

    def touch(self, mac: str, now: float, ip: str | None = None) -> None:
        """`mac` was heard from (at `ip`, when known)."""
        self._write(
            "INSERT INTO machines (mac, first_seen, last_seen, ip) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (mac) DO UPDATE SET last_seen = excluded.last_seen, "
            "ip = CASE WHEN excluded.ip = '' THEN ip ELSE excluded.ip END",
            (mac, now, now, ip or ""),
        )

    def set_secure_boot(self, mac: str, reported: str) -> None:
        """What `mac`'s OS said of Secure Boot at its phone-home "up" ("" when it said nothing)."""
        self._write("UPDATE machines SET secure_boot = ? WHERE mac = ?", (reported, mac))

    # the bounded inventory of discovered machines (core.lifecycle) and the API's pages

    def forget_machine(self, mac: str) -> None:
        """Forget `mac`: its record, its event log and its boot token. Its leases stay: a
        lease is a promise that no other MAC gets the address while it runs."""
        self._write("DELETE FROM machines WHERE mac = ?", (mac,))
        self._write("DELETE FROM events WHERE mac = ?", (mac,))
        self._write("DELETE FROM boot_tokens WHERE mac = ?", (mac,))
        self._since_trim.pop(mac, None)

    def machines_by_last_seen(self, progress: Iterable[str]) -> list[tuple[str, float, bool]]:
        """Every machine as (MAC, last_seen, whether its log holds an event of a kind in
        `progress`), the least recently seen first: what the lifecycle's bound starts from."""
        rows = self._db.execute(
            "SELECT mac, last_seen, EXISTS (SELECT 1 FROM events WHERE events.mac = machines.mac "
            "AND kind IN (SELECT value FROM json_each(?))) FROM machines ORDER BY last_seen",
            (json.dumps(sorted(progress)),),
        )
        return [(str(mac), float(seen), bool(past)) for mac, seen, past in rows]

    def machine_page(
        self,
        after: tuple[float, str] | None,
        limit: int,
        *,
        exclude: Collection[str] = (),
        states: Collection[str] | None = None,
    ) -> list[MachineRecord]:
        """Up to `limit` machines in (first_seen, MAC) order after the key `after`, without the
        MACs in `exclude`, of the stored `states` only when given: a walk of the index from the
        key (keyset paging), never of the whole table; a page stays right while rows come and
        go, which offsets would not."""
        where, params = _machine_filter(exclude, states)
        if after is not None:
            where += " AND (first_seen, mac) > (?, ?)"
            params += after
        rows = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} "
            f"FROM machines WHERE {where} ORDER BY first_seen, mac LIMIT ?", (*params, limit),
        )  # fmt: skip
        return [MachineRecord(*row) for row in rows]

    def machine_count(
        self, *, exclude: Collection[str] = (), states: Collection[str] | None = None
    ) -> int:
        """How many machines machine_page would list, on every page together."""
        where, params = _machine_filter(exclude, states)
        row = self._db.execute(f"SELECT count(*) FROM machines WHERE {where}", params).fetchone()
        return int(row[0])

    def machine_records_of(self, macs: Collection[str]) -> dict[str, MachineRecord]:
        """The records of `macs` that exist (the enrolled machines of lab.toml)."""
        rows = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} "
            "FROM machines WHERE mac IN (SELECT value FROM json_each(?))",
            (json.dumps(list(macs)),),
        )  # fmt: skip
        return {row[0]: MachineRecord(*row) for row in rows}

    def state_counts(self, *, exclude: Collection[str] = ()) -> dict[str, int]:
        """Stored state → how many machines have it, without the MACs in `exclude`."""
        where, params = _machine_filter(exclude, None)
        rows = self._db.execute(
            f"SELECT state, count(*) FROM machines WHERE {where} GROUP BY state", params
        )
        return {str(state): int(count) for state, count in rows}

    # events

    def add_event(
        self, mac: str, kind: str, message: str, now: float, fields: Fields | None = None
    ) -> Event:
        stored = dict(fields or {})
        cursor = self._write(
            "INSERT INTO events (mac, time, kind, message, fields) VALUES (?, ?, ?, ?, ?)",
            (mac, now, kind, message, _FIELDS_JSON.encode(stored) if stored else "{}"),
        )
        event_id = int(cursor.lastrowid or 0)
        count = self._since_trim.get(mac)
        if count is None or count + 1 >= TRIM_EVERY:
            # Keep the newest EVENTS_PER_MACHINE - TRIM_EVERY: the TRIM_EVERY - 1 inserts
            # until the next trim then stay within the bound. The first event of a MAC since
            # the store opened trims too: counts do not survive a restart.
            if count is None and len(self._since_trim) >= _TRIM_COUNTS_MAX:
                self._since_trim.clear()
            self._write(
                "DELETE FROM events WHERE mac = ? AND id < (SELECT id FROM events WHERE mac = ? "
                "ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (mac, mac, EVENTS_PER_MACHINE - TRIM_EVERY - 1),
            )
            self._since_trim[mac] = 0
        else:
            self._since_trim[mac] = count + 1
        return Event(event_id, mac, now, kind, message, stored)

    def events(self, mac: str | None = None, after: int = 0, limit: int = 500) -> list[Event]:
        """Events (oldest first) after id `after`: of one machine, or of all."""
        if mac is None:
            rows = self._db.execute(
                "SELECT id, mac, time, kind, message, fields FROM events WHERE id > ? "
                "ORDER BY id DESC LIMIT ?", (after, limit),
            )  # fmt: skip
        else:
            rows = self._db.execute(
                "SELECT id, mac, time, kind, message, fields FROM events WHERE mac = ? AND id > ? "
                "ORDER BY id DESC LIMIT ?", (mac, after, limit),
            )  # fmt: skip
        return [
            Event(id, mac, time, kind, message, json.loads(fields))
            for id, mac, time, kind, message, fields in reversed(rows.fetchall())
        ]

    # leases

    def leases(self) -> Iterator[Lease]:
        for ip, mac, expires, state, client_id in self._db.execute(
            "SELECT ip, mac, expires, state, client_id FROM leases"
        ):
            yield Lease(IPv4Address(ip), mac, expires, state, client_id)

    def save_lease(self, lease: Lease) -> None:
        self._write(
            "INSERT INTO leases (ip, mac, expires, state, client_id) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (ip) DO UPDATE SET mac = excluded.mac, expires = excluded.expires, "
            "state = excluded.state, client_id = excluded.client_id",
            (str(lease.ip), lease.mac, lease.expires, lease.state, lease.client_id),
        )

    def delete_lease(self, ip: IPv4Address) -> None:
        """Forget `ip` (a quarantine that ran out or made room: dhcp.leases)."""
        self._write("DELETE FROM leases WHERE ip = ?", (str(ip),))

    # boot tokens (core.trust): the digest of each machine's current one

    def save_boot_token(self, mac: str, digest: str, issued: float) -> None:
        self._write(
            "INSERT INTO boot_tokens (mac, digest, issued) VALUES (?, ?, ?) "
            "ON CONFLICT(mac) DO UPDATE SET digest = excluded.digest, issued = excluded.issued",
            (mac, digest, issued),
        )

    def boot_token(self, mac: str) -> tuple[str, float] | None:
        row = self._db.execute(
            "SELECT digest, issued FROM boot_tokens WHERE mac = ?", (mac,)
        ).fetchone()
        return None if row is None else (str(row[0]), float(row[1]))

    def retire_boot_token(self, mac: str) -> None:
        self._write("DELETE FROM boot_tokens WHERE mac = ?", (mac,))


def _machine_filter(
    exclude: Collection[str], states: Collection[str] | None
) -> tuple[str, tuple[object, ...]]:
    """The WHERE clause (and its parameters) of a listing of machines: one JSON parameter per
    set, so a lab.toml of any size fits SQLite's parameter limit."""
    where = "mac NOT IN (SELECT value FROM json_each(?))"
    params: tuple[object, ...] = (json.dumps(list(exclude)),)
    if states is not None:
        where += " AND state IN (SELECT value FROM json_each(?))"
        params += (json.dumps(list(states)),)
    return where, params
