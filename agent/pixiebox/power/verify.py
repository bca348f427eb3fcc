"""How a power action is seen done: the machine's own events (read by kind, never by message),
its answers to ping, and its silence.

`on` is seen as a phone-home (`os.up`) after the action started, or with [power] verify_on =
"ping" as a ping answer; `off`, without a driver that reads the power, as silence: no event
that is traffic from the machine and no ping answer for [power] off_settle seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

import icmplib  # type: ignore[import-untyped]

from pixiebox.events import Event, Kind

log = logging.getLogger("pixiebox.power")

#: Seconds between reads of a driver's status, or pings, while waiting for a state.
POLL = 2.0
#: Seconds one ping waits for its answer.
PING_WAIT = 1.0
#: Event kinds that are not traffic from the machine itself (they do not break its silence):
#: what the agent says about it, not what it sent.
NOT_TRAFFIC = frozenset(
    {Kind.POWER_ON, Kind.POWER_OFF, Kind.POWER_CYCLE, Kind.POWER_STATUS, Kind.MACHINE_OFF,
     Kind.MACHINE_ENROLLED, Kind.MACHINE_DISCOVERED}
)  # fmt: skip

Pinger = Callable[[IPv4Address], Awaitable[bool]]


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


@dataclass
class Watch:
    """What is seen of one machine during one power action: its events (`queue`, a lifecycle
    subscription) and its ping answers at `ip`."""

    mac: str
    ip: IPv4Address | None
    queue: asyncio.Queue[Event]
    pinger: Pinger = ping

    async def answers(self) -> bool:
        return self.ip is not None and await self.pinger(self.ip)

    async def until(
        self,
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
                event = await asyncio.wait_for(self.queue.get(), max(wait, 0.0))
            except TimeoutError:
                continue
            if event.mac == self.mac and seen(event):
                return True

    async def silent(self, deadline: float, settle: float) -> bool:
        """True once the machine sent nothing and answered no ping for `settle` seconds."""
        quiet_since = time.monotonic()
        next_ping = quiet_since
        while True:
            now = time.monotonic()
            if now - quiet_since >= settle:
                return True
            if now >= deadline:
                return False
            if self.ip is not None and now >= next_ping:
                if await self.pinger(self.ip):
                    quiet_since = time.monotonic()
                next_ping = time.monotonic() + POLL
            wake = min(quiet_since + settle, deadline,
                       next_ping if self.ip is not None else math.inf)  # fmt: skip
            try:
                event = await asyncio.wait_for(self.queue.get(), max(wake - time.monotonic(), 0))
            except TimeoutError:
                continue
            if event.mac == self.mac and event.kind not in NOT_TRAFFIC:
                quiet_since = time.monotonic()

    async def seen_up(self, since: float, deadline: float, by_ping: bool) -> bool:
        """A phone-home after the wall-clock time `since` (or, `by_ping`, a ping answer)
        before the monotonic `deadline`."""
        return await self.until(
            deadline, lambda e: e.kind == Kind.OS_UP and e.time >= since,
            self.answers if by_ping and self.ip is not None else None,
        )  # fmt: skip
