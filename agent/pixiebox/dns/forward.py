"""Forwarding: names that are not the lab's go to the upstream resolvers, in order.

Over UDP, and over TCP for TCP clients and for answers an upstream truncated (RFC 7766 section
5); an upstream that fails, refuses or does not answer within the timeout passes the query to
the next one, and when every upstream fails the client gets SERVFAIL instead of silence. The
number of queries in flight is bounded, so a flood (or a dead upstream) costs a bounded number
of sockets and tasks.

Only for sources in `forward_for` (`ForwardFor`, the lab's subnet unless lab.toml's `[dns]
forward_for` says otherwise): anyone else who reaches the server gets REFUSED for a name that
is not the lab's. A resolver that recurses for any source is an open resolver: a routed host
(another VLAN, a VPN, a port forward gone wrong) could use the appliance to resolve, to probe
what the upstream answers, or to reflect traffic at a spoofed address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pixiebox.dns.wire import (
    DNS_PORT,
    NOTIMP,
    REFUSED,
    SERVFAIL,
    answers,
    error_reply,
    opt_of,
    truncated,
)
from pixiebox.net.udp import Address

log = logging.getLogger("pixiebox.dns")

#: Forwarded queries in flight at once; past this a query is answered SERVFAIL at once, so a
#: flood (or a dead upstream) costs a bounded number of sockets and tasks.
MAX_FORWARDS = 256
#: One log line per refused source per this many seconds: a refusal is not an event of its own
#: (a flood of queries would fill the log and the event table), the first one a minute is.
REFUSAL_LOG_EVERY = 60.0
#: Sources whose last refusal line is remembered; a flood from more (spoofed) addresses than
#: this within REFUSAL_LOG_EVERY costs no more memory, and gets one summary line a minute.
REFUSAL_LOG_SOURCES = 1024


@dataclass(slots=True)
class Forward:
    """A query to pass upstream, as the client sent it."""

    data: bytes
    request: Any  # dnslib DNSRecord
    question: bytes  # the question section, lowercased: what an upstream answer must echo
    udp_size: int  # what the client can take over UDP


class ForwardFor:
    """Which sources may have names forwarded: `networks()` is read on every refusal check (it is
    the current lab.toml's list, so a reload applies at once) and compiled again only when what
    it returns changes. Refusals are logged at most once per source per REFUSAL_LOG_EVERY."""

    def __init__(
        self,
        networks: Callable[[], Sequence[IPv4Network]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.networks = networks
        self.clock = clock
        self._current: tuple[IPv4Network, ...] = ()
        self._masks: tuple[tuple[int, int], ...] = ()
        #: source -> when its last line was logged; oldest line first (insertion order).
        self._logged: dict[str, float] = {}
        self._summary_at: float | None = None

    def current(self) -> tuple[IPv4Network, ...]:
        networks = tuple(self.networks())
        if networks != self._current:
            self._current = networks
            self._masks = tuple((int(n.network_address), int(n.netmask)) for n in networks)
        return self._current

    def allows(self, host: str) -> bool:
        """May `host` (the source address of a query) have a name forwarded?"""
        self.current()
        try:
            address = int(IPv4Address(host))
        except ValueError:
            return False
        return any(address & mask == network for network, mask in self._masks)

    def refused(self, host: str, name: str) -> None:
        """Log the refusal of `name` for `host`, unless `host` had its line within the minute."""
        now = self.clock()
        logged = self._logged
        # Forget lines older than the window, oldest first (insertion order is logging order).
        while logged:
            oldest = next(iter(logged))
            if now - logged[oldest] < REFUSAL_LOG_EVERY:
                break
            del logged[oldest]
        if host in logged:
            return  # counted in the server's stats; its line was logged within the minute
        if len(logged) >= REFUSAL_LOG_SOURCES:
            if self._summary_at is None or now - self._summary_at >= REFUSAL_LOG_EVERY:
                self._summary_at = now
                log.warning(
                    "DNS: refusing to forward names for more than %d sources a minute (a flood, "
                    "perhaps from spoofed addresses); for a minute, refusals for further "
                    "sources are only counted (outcome 'refused' of pixiebox_dns_queries)",
                    REFUSAL_LOG_SOURCES,
                )
            return
        logged[host] = now
        allowed = ", ".join(map(str, self.current())) or "nowhere"
        log.warning(
            "DNS: refused to forward %s for %s: the appliance resolves other names only for "
            "%s (lab names are still answered). If %s should use it as its resolver, add its "
            "network to [dns] forward_for in lab.toml; further refusals for %s are logged at "
            "most once a minute",
            name,
            host,
            allowed,
            host,
            host,
        )


class _UpstreamEndpoint(asyncio.DatagramProtocol):
    """One forwarded query's socket: accepts only the answer to that query.

    A fresh socket (random source port) and a random ID per query, and an answer must echo
    both and the question, so an off-path spoofer has to guess all three (RFC 5452)."""

    def __init__(self, waiter: asyncio.Future[bytes], qid: int, question: bytes) -> None:
        self.waiter = waiter
        self.qid = qid
        self.question = question

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.waiter.done() and answers(data, self.qid, self.question):
            self.waiter.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on the connected socket: the upstream is down, try the next.
        if not self.waiter.done():
            self.waiter.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("socket closed"))


class Forwarder:
    """Asks `upstreams` (at `port`) what the lab zone does not answer; counts into `stats`.

    `max_forwards` bounds the queries in flight; `timeout` is per upstream."""

    def __init__(
        self,
        upstreams: Sequence[IPv4Address],
        *,
        stats: Counter[str],
        timeout: float,
        max_forwards: int = MAX_FORWARDS,
        port: int = DNS_PORT,
    ) -> None:
        self.upstreams = tuple(upstreams)
        self.stats = stats
        self.timeout = timeout
        self.max_forwards = max_forwards
        self.port = port
        self.in_flight = 0
        #: The tasks of forwarded UDP queries, cancelled when the server closes.
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, job: Forward, send: Callable[[bytes, Address], None], addr: Address) -> None:
        """Forward a UDP client's query in a task; `send` gets its answer (or SERVFAIL)."""
        # The slot is taken here, not in the task: a burst arrives before any task runs.
        if not self._reserve():
            send(self._busy(job), addr)
            return

        async def forward() -> None:
            send(await self._forwarded(job, tcp=False), addr)

        task = asyncio.get_running_loop().create_task(forward())
        self.tasks.add(task)
        task.add_done_callback(self._release)

    async def forward(self, job: Forward, *, tcp: bool) -> bytes:
        """The upstreams' answer to `job` with the client's ID, or SERVFAIL; never raises."""
        if not self._reserve():
            return self._busy(job)
        try:
            return await self._forwarded(job, tcp)
        finally:
            self.in_flight -= 1

    def _reserve(self) -> bool:
        if self.in_flight >= self.max_forwards:
            return False
        self.in_flight += 1
        return True

    def _release(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.in_flight -= 1

    def _busy(self, job: Forward) -> bytes:
        self.stats["busy"] += 1
        log.debug("DNS: %d queries already forwarded; SERVFAIL", self.in_flight)
        return error_reply(job.request, SERVFAIL, opt_of(job.request))

    async def _forwarded(self, job: Forward, tcp: bool) -> bytes:
        try:
            answer = await self._ask_upstreams(job, tcp)
        except Exception:
            self.stats["failed"] += 1
            log.exception("DNS forwarding failed")
            answer = None
        if answer is None:
            self.stats["servfail"] += 1
            return error_reply(job.request, SERVFAIL, opt_of(job.request))
        self.stats["forwarded"] += 1
        reply = job.data[:2] + answer[2:]
        if not tcp and len(reply) > job.udp_size:
            self.stats["truncated"] += 1
            return truncated(reply, job.data[12 : 12 + len(job.question)])
        return reply

    async def _ask_upstreams(self, job: Forward, tcp: bool) -> bytes | None:
        """The first usable answer from the upstreams, in order (or the last refusal)."""
        last: bytes | None = None
        for upstream in self.upstreams:
            where = f"{upstream}:{self.port}"
            try:
                if tcp:
                    answer = await self._ask_tcp(upstream, job)
                else:
                    answer = await self._ask_udp(upstream, job)
                    if answer[2] & 0x02:
                        # Truncated (RFC 1035 section 4.2.1): the whole answer over TCP, or
                        # the truncated one, on which the client retries over TCP itself.
                        self.stats["upstream_truncated"] += 1
                        with contextlib.suppress(OSError, TimeoutError, EOFError):
                            answer = await self._ask_tcp(upstream, job)
            except (OSError, TimeoutError, EOFError) as exc:
                self.stats["upstream_failed"] += 1
                log.debug("DNS upstream %s failed: %s", where, exc or type(exc).__name__)
                continue
            if answer[3] & 0x0F in (SERVFAIL, REFUSED, NOTIMP):
                # This upstream cannot or will not answer; another one might (dnsmasq does the
                # same in strict order).
                self.stats["upstream_refused"] += 1
                last = answer
                continue
            return answer
        return last

    async def _ask_udp(self, upstream: IPv4Address, job: Forward) -> bytes:
        loop = asyncio.get_running_loop()
        qid = secrets.randbits(16)
        waiter: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UpstreamEndpoint(waiter, qid, job.question),
            remote_addr=(str(upstream), self.port),
            family=socket.AF_INET,
        )
        try:
            transport.sendto(qid.to_bytes(2, "big") + job.data[2:])
            return await asyncio.wait_for(waiter, self.timeout)
        finally:
            transport.close()

    async def _ask_tcp(self, upstream: IPv4Address, job: Forward) -> bytes:
        qid = secrets.randbits(16)
        query = job.data

        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection(str(upstream), self.port)
            try:
                # RFC 1035 section 4.2.2 / RFC 7766 section 8: a two-byte length first.
                writer.write(len(query).to_bytes(2, "big") + qid.to_bytes(2, "big") + query[2:])
                await writer.drain()
                size = int.from_bytes(await reader.readexactly(2), "big")
                answer = await reader.readexactly(size)
            finally:
                writer.close()
            if not answers(answer, qid, job.question):
                raise ConnectionError("the TCP answer does not match the query")
            return answer

        return await asyncio.wait_for(exchange(), self.timeout)
