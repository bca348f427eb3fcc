"""What an outsider can make the agent hold, bounded: connections per source address and in
total, the process's open-file limit, accept(2) running out of descriptors, and log lines.

Every listener of the agent is reachable from the lab segment, which is usually a home LAN, and
TCP lets any host there hold a connection (a file descriptor) for as long as it likes, open as
many as it likes, and make the server log something for each. These are the shared pieces the
TCP servers (boot HTTP, the API, DNS over TCP) build their limits from.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import resource
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

from pixiebox.net.udp import bind_socket

log = logging.getLogger("pixiebox.net")

#: Seconds between two lines of one kind from a LogLimiter.
LOG_EVERY = 10.0
#: accept(2) errors that mean "out of descriptors or kernel memory", not "this connection".
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: The context message asyncio gives its exception handler for them (selector_events.py).
ACCEPT_EXHAUSTED = "socket.accept() out of system resource"
#: asyncio pauses a listener this long after such an error (asyncio.constants); a second error
#: sooner than this is still the same wake-up of the accept loop.
_SAME_WAKEUP = 0.5
#: Under the total cap, a connection that has not finished its request for this long may be
#: closed for a newcomer: a real client sends its request within milliseconds of connecting.
EVICT_WAITING_AFTER = 1.0
#: Where Linux keeps the largest RLIMIT_NOFILE a process may have (when the hard limit is
#: "unlimited", the soft limit cannot be set to that).
NR_OPEN = Path("/proc/sys/fs/nr_open")


# --------------------------------------------------------------------------- log lines


class Quota:
    """At most `burst` admissions per key in each `period` seconds, and how many were left out
    in between. The one rate limit for what an outsider can cause at will (log lines, events,
    refusals): without a bound, a flood writes as many lines as packets to the journal of an
    appliance whose disk is a USB stick. Keys are a fixed few (a kind and reason of the code,
    never a client's address, which can be forged at will), so the table stays small."""

    def __init__(
        self,
        burst: int = 20,
        period: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.period = period
        self._clock = clock
        # key: (the period's start, admitted in it, left out since the last admission)
        self._keys: dict[str, tuple[float, int, int]] = {}

    def admit(self, key: str) -> int | None:
        """None: leave this one out; else how many of this key were left out before it."""
        now = self._clock()
        start, admitted, left_out = self._keys.get(key, (-math.inf, 0, 0))
        if now - start >= self.period:
            start, admitted = now, 0
        if admitted >= self.burst:
            self._keys[key] = (start, admitted, left_out + 1)
            return None
        self._keys[key] = (start, admitted + 1, 0)
        return left_out


class LogLimiter:
    """At most one log line per kind every `every` seconds (a `Quota` of one); lines in between
    are counted, and the count rides on the next line of that kind. For lines an outsider can
    cause at will: a refused connection, a bad request, a timeout."""

    def __init__(
        self,
        logger: logging.Logger,
        every: float = LOG_EVERY,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self._quota = Quota(1, every, clock)
        #: Lines not logged, by kind, since the start (for tests and metrics).
        self.unsaid: Counter[str] = Counter()

    def log(
        self, kind: str, level: int, message: str, *args: object, exc_info: bool = False
    ) -> bool:
        """Log `message % args` unless a line of `kind` was logged less than `every` seconds
        ago (then count it); True if it was logged."""
        left_out = self._quota.admit(kind)
        if left_out is None:
            self.unsaid[kind] += 1
            return False
        if left_out:
            message += " (%d more like this since the last such line, not logged)"
            args = (*args, left_out)
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True


# --------------------------------------------------------------------------- open files


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; (soft, hard) afterwards.

    The soft limit is 1024 by default (systemd's DefaultLimitNOFILE for services, and most
    shells), kept that low only for programs that still use select(2); the agent uses epoll,
    and every TCP connection, TFTP transfer, file being sent and database handle is a
    descriptor, so 1024 is what a few hundred slow connections exhaust. The hard limit is the
    operator's (the appliance's unit sets LimitNOFILE=)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(NR_OPEN.read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.debug("the open-file limit stays %d: %s", soft, exc)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.debug("open-file limit: %d (hard limit %d)", soft, hard)
    return soft, hard


class GuardedListener(socket.socket):
    """A listening TCP socket whose accept() ends asyncio's accept loop at the first "out of
    descriptors" of a wake-up.

    asyncio (3.11, BaseSelectorEventLoop._accept_connection) calls accept() up to `backlog`
    times per wake-up. On EMFILE/ENFILE it reports to the exception handler and pauses the
    listener for a second, but it does not leave that loop: with uvicorn's backlog of 2048
    that is 2048 reports (each a traceback in the log) and 2048 timers a second per listener,
    the storm issue 13 measured. Raising ConnectionAbortedError, which asyncio takes as
    "nothing left to accept", for the rest of the wake-up leaves one report and one pause a
    second; `quiet_accept_errors` turns the report into a rate-limited line. Connections keep
    waiting in the kernel's backlog meanwhile and are accepted once descriptors are free."""

    _exhausted_at: float | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in EXHAUSTED:
                raise
            now = time.monotonic()
            if self._exhausted_at is not None and now - self._exhausted_at < _SAME_WAKEUP:
                raise ConnectionAbortedError(exc.errno, exc.strerror) from None
            self._exhausted_at = now
            raise


def tcp_listener(host: str, port: int, device: str | None = None) -> GuardedListener:
    """A bound, non-blocking TCP socket (not yet listening), SO_REUSEADDR set; `device`
    confines it to one interface (SO_BINDTODEVICE)."""
    sock = GuardedListener(socket.AF_INET, socket.SOCK_STREAM)
    return bind_socket(sock, host, port, device=device, reuse=True)


#: One line every LOG_EVERY seconds for every listener of the process together: running out of
#: descriptors is one condition of the process, whichever socket notices it.
accept_log = LogLimiter(log)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Have `loop` log asyncio's "socket.accept() out of system resource" reports as one
    rate-limited line without a traceback, and hand every other report to the handler it had.
    Idempotent."""
    previous = loop.get_exception_handler()
    if getattr(previous, "pixiebox_accept_filter", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_EXHAUSTED:
            if previous is None:
                loop.default_exception_handler(context)
            else:
                previous(loop, context)
            return
        exc = context.get("exception")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = "?"
        sock = context.get("socket")
        if sock is not None:
            try:
                host, port = sock.getsockname()[:2]
                where = f"{host}:{port}"
            except (OSError, ValueError):
                pass
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        accept_log.log(
            "accept-exhausted",
            logging.ERROR,
            "out of file descriptors: cannot accept connections on %s (%s); new connections "
            "wait and are accepted once some close (open-file limit %d: raise LimitNOFILE= of "
            "the service, or look for a client holding many connections)",
            where,
            reason,
            soft,
        )

    handler.pixiebox_accept_filter = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


# --------------------------------------------------------------------------- connections


class Evictable(Protocol):
    def evict(self) -> None:
        """Close this connection now (the gate has already forgotten it)."""


C = TypeVar("C", bound=Evictable)
Refusal = Literal["source", "total"]


class ConnectionGate(Generic[C]):
    """The connections of one server, counted per source address and in total, and which of
    them may be closed to make room for a new one.

    A connection is, at any time, *busy* (a request is being read or answered, or a file
    sent: never closed for room), *waiting* (connected or finished a request, and its next
    request has not fully arrived) or *idle* (answered at least once and nothing of its next
    request has come: an HTTP keep-alive or a DNS client between queries). Over the per-source
    cap the newcomer may take the place of that source's oldest idle connection, else it is
    refused: a source only ever competes with itself. Over the total cap it may take the
    place of anyone's oldest idle connection, else of the connection that has been waiting
    longest (at least EVICT_WAITING_AFTER), else it is refused: many sources each holding
    connections that never finish a request (slowloris) then churn among themselves instead
    of locking out a real client, which sends its request at once."""

    def __init__(
        self,
        total: int,
        per_source: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        evict_waiting_after: float = EVICT_WAITING_AFTER,
    ) -> None:
        if total < 1 or per_source < 1:
            raise ValueError("connection limits must be at least 1")
        self.total = total
        self.per_source = per_source
        self.clock = clock
        self.evict_waiting_after = evict_waiting_after
        self._source: dict[C, str] = {}
        self._count: Counter[str] = Counter()
        # Insertion order is age order: a connection is moved to the end when it changes state.
        self._idle: dict[C, float] = {}
        self._waiting: dict[C, float] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._source)

    def count(self, source: str) -> int:
        return self._count[source]

    def admit(self, conn: C, source: str) -> Refusal | None:
        """Count `conn` (a new connection from `source`, waiting for its first request),
        closing another to make room if one may be closed; else the cap it is over."""
        victim: C | None
        if self._count[source] >= self.per_source:
            victim = next((c for c in self._idle if self._source[c] == source), None)
            if victim is None:
                return "source"
        elif len(self._source) >= self.total:
            victim = next(iter(self._idle), None)
            if victim is None:
                oldest = next(iter(self._waiting.items()), None)
                if oldest is not None and self.clock() - oldest[1] >= self.evict_waiting_after:
                    victim = oldest[0]
            if victim is None:
                return "total"
        else:
            victim = None
        if victim is not None:
            self.release(victim)
            self.evicted += 1
            victim.evict()
        self._source[conn] = source
        self._count[source] += 1
        self._waiting[conn] = self.clock()
        return None

    def waiting(self, conn: C) -> None:
        """`conn` waits for (the rest of) its next request."""
        if conn in self._source:
            self._idle.pop(conn, None)
            self._waiting.pop(conn, None)
            self._waiting[conn] = self.clock()

    def idle(self, conn: C) -> None:
        """`conn` was answered and nothing of its next request has come."""
        if conn in self._source:
            self._waiting.pop(conn, None)
            self._idle.pop(conn, None)
            self._idle[conn] = self.clock()

    def busy(self, conn: C) -> None:
        """`conn` has a whole request: it is being answered."""
        self._idle.pop(conn, None)
        self._waiting.pop(conn, None)

    def release(self, conn: C) -> None:
        """`conn` is closed (or closing). Idempotent."""
        source = self._source.pop(conn, None)
        self._idle.pop(conn, None)
        self._waiting.pop(conn, None)
        if source is not None:
            self._count[source] -= 1
            if self._count[source] <= 0:
                del self._count[source]
