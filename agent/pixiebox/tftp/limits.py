"""What a TFTP client may cost the server, and who gives way when the server is full.

A TFTP transfer costs the server two sockets and a file descriptor until it ends, and it starts
with one datagram whose source address and port anyone on the LAN can forge. A flood of
requests that are never acknowledged (half-open transfers) once held every descriptor for 25
minutes (a client-chosen RFC 2349 timeout of 255 s, six tries); a real client then got "server
error". Hence:

- `TftpLimits`: transfers in total and per source address, the largest timeout a client may
  ask for, and how long a transfer may hear nothing from its client ([tftp] in lab.toml);
- `Admission`: which transfer gives way to a new request when a limit is reached. A half-open
  transfer (its client never acknowledged anything) is ended first, the oldest one first: a
  forged request cannot acknowledge what it never receives, while a real client acknowledges
  within a round trip, so a flood of forged requests only ever displaces its own, and a real
  client is never locked out. Transfers that are progressing are never ended for a newcomer:
  with no half-open one to end, the newcomer is told "server busy" and asks again later, as
  firmware does;
- log lines and events of one kind are admitted under a `net.limits.Quota` (transfers.py), so
  that what an outsider can cause per datagram (refusals, "not found", evictions) never becomes
  a log storm.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

#: The server's own resend timeout, kept when a client asks for none or for too long a one.
RESEND_AFTER = 1.0


class TftpSection(Protocol):
    """[tftp] as config.schema reads it (this package does not import config)."""

    @property
    def max_transfers(self) -> int: ...
    @property
    def max_transfers_per_client(self) -> int: ...
    @property
    def max_client_timeout(self) -> int: ...
    @property
    def idle_timeout(self) -> int: ...


@dataclass(frozen=True)
class TftpLimits:
    """[tftp] in lab.toml (config.schema.TftpSection): the agent passes them in."""

    max_transfers: int = 256
    max_transfers_per_client: int = 8
    #: The largest RFC 2349 `timeout` acknowledged; a larger one is left out of the OACK and
    #: the server keeps RESEND_AFTER.
    max_client_timeout: float = 5.0
    #: A transfer that heard nothing from its client for this long is ended.
    idle_timeout: float = 10.0

    def __post_init__(self) -> None:
        # Values lab.toml's schema lets through that would stop TFTP altogether.
        object.__setattr__(self, "max_transfers", max(1, self.max_transfers))
        object.__setattr__(self, "max_transfers_per_client", max(1, self.max_transfers_per_client))
        object.__setattr__(self, "idle_timeout", max(RESEND_AFTER, float(self.idle_timeout)))

    @classmethod
    def of(cls, section: TftpSection) -> TftpLimits:
        return cls(
            max_transfers=section.max_transfers,
            max_transfers_per_client=section.max_transfers_per_client,
            max_client_timeout=float(section.max_client_timeout),
            idle_timeout=float(section.idle_timeout),
        )


Client = tuple[str, int]


class Full(Exception):
    """No transfer may give way to a new request: it gets ERROR 0 "server busy". `limit` is
    the lab.toml key that was reached."""

    def __init__(self, limit: str, why: str) -> None:
        super().__init__(why)
        self.limit = limit
        self.why = why


class Admission:
    """The transfers under way by client address: how many per source address, and which
    ones never heard from their client (in the order they started)."""

    def __init__(self, limits: TftpLimits) -> None:
        self.limits = limits
        self._per_ip: Counter[str] = Counter()
        self._total = 0
        # Insertion-ordered: the first key is the oldest half-open transfer.
        self._half_open: dict[Client, None] = {}

    def __len__(self) -> int:
        return self._total

    def half_open(self) -> int:
        return len(self._half_open)

    def make_room(self, ip: str) -> Client | None:
        """Whether a new transfer from `ip` fits: None, or the client address of the transfer
        to end for it; Full when none may be ended."""
        limits = self.limits
        if self._per_ip[ip] >= limits.max_transfers_per_client:
            for client in self._half_open:
                if client[0] == ip:
                    return client
            raise Full(
                "max_transfers_per_client",
                f"{ip} already has {limits.max_transfers_per_client} transfers under way "
                "([tftp] max_transfers_per_client), each acknowledging",
            )
        if len(self) >= limits.max_transfers:
            for client in self._half_open:
                return client
            raise Full(
                "max_transfers",
                f"{limits.max_transfers} transfers are under way ([tftp] max_transfers), "
                "each acknowledging",
            )
        return None

    def oldest_half_open(self) -> Client | None:
        return next(iter(self._half_open), None)

    def started(self, client: Client) -> None:
        self._total += 1
        self._per_ip[client[0]] += 1
        self._half_open[client] = None

    def heard(self, client: Client) -> None:
        """The client acknowledged something: no longer half-open."""
        self._half_open.pop(client, None)

    def ended(self, client: Client) -> None:
        self._total -= 1
        self._half_open.pop(client, None)
        ip = client[0]
        left = self._per_ip[ip] - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            del self._per_ip[ip]  # no entry kept for an address that has no transfer
