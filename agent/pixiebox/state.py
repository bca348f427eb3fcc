"""What the agent learns at run time: machines that asked to boot, and DHCP leases.

lab.toml stays the source of truth for enrolled machines; this store keeps what must survive a
restart or a power cut (a lease handed out must never be handed to another MAC after a crash).
SQLite in WAL mode with synchronous=NORMAL: a committed lease survives an agent crash, and one
commit per ACK stays far below the DHCP hot path's budget.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS machines (
    mac TEXT PRIMARY KEY,
    arch TEXT NOT NULL DEFAULT '',
    firmware TEXT NOT NULL DEFAULT '',
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    ip TEXT PRIMARY KEY,
    mac TEXT NOT NULL,
    expires REAL NOT NULL,
    state TEXT NOT NULL  -- 'bound' (ACKed), 'released', 'declined'
);
CREATE INDEX IF NOT EXISTS leases_by_mac ON leases (mac);
"""


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

    def active(self, now: float) -> bool:
        return self.state == "bound" and self.expires > now


class StateStore:
    """One SQLite database file under [state] dir."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "pixiebox.db"
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # machines seen on the wire

    def record_seen(
        self, mac: str, arch: str | None, firmware: str | None, now: float | None = None
    ) -> bool:
        """Note that `mac` asked to boot; True when it was never seen before. An arch or
        firmware of None keeps what was recorded (the asking protocol could not tell)."""
        now = time.time() if now is None else now
        cursor = self._db.execute(
            "INSERT INTO machines (mac, arch, firmware, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (mac) DO NOTHING",
            (mac, arch or "", firmware or "", now, now),
        )
        if cursor.rowcount:
            return True
        self._db.execute(
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

    # leases

    def leases(self) -> Iterator[Lease]:
        for ip, mac, expires, state in self._db.execute(
            "SELECT ip, mac, expires, state FROM leases"
        ):
            yield Lease(IPv4Address(ip), mac, expires, state)

    def save_lease(self, lease: Lease) -> None:
        self._db.execute(
            "INSERT INTO leases (ip, mac, expires, state) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (ip) DO UPDATE SET mac = excluded.mac, expires = excluded.expires, "
            "state = excluded.state",
            (str(lease.ip), lease.mac, lease.expires, lease.state),
        )
