"""The syslog receiver: the UDP socket, and each datagram through the rate limit and the parser."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address

from pixiebox.net.udp import Address, DatagramListener, udp_socket
from pixiebox.syslog.limits import DROP_REPORT_INTERVAL, SourceLimiter
from pixiebox.syslog.parse import SyslogMessage, parse_syslog

log = logging.getLogger("pixiebox.syslog")

SYSLOG_PORT = 514
#: Receive buffer asked of the kernel: a machine's journal arrives in a burst at boot.
RECEIVE_BUFFER = 1 << 20
#: Datagrams read per wake-up. Each accepted line is parsed and recorded as an event; a small
#: batch saves selector wake-ups in a boot's burst and still gives the loop a turn (TFTP, DHCP)
#: well within a millisecond.
BATCH = 16


class SyslogReceiver:
    """Receives syslog over UDP until `close()`, calling `on_message` once per accepted line.

    `on_message` runs on the event loop that ran `start()`; it maps the source address to a
    machine. `describe(ip)` names a source in the agent's own log lines ("c1 (10.0.0.5)").
    `stats` counts "received" datagrams, accepted ones by format ("rfc5424", "rfc3164", "raw"),
    "dropped_rate" (over a source's rate), "failed" (on_message raised), "socket_errors"."""

    def __init__(
        self,
        on_message: Callable[[SyslogMessage], None],
        *,
        listen_ip: str = "0.0.0.0",
        port: int = SYSLOG_PORT,
        interface: str | None = None,
        rate_per_source: float = 200.0,
        burst: int = 400,
        describe: Callable[[IPv4Address], str] = str,
    ) -> None:
        self.on_message = on_message
        self.listen_ip = listen_ip
        self.port = port
        self.interface = interface
        self.stats: Counter[str] = Counter()
        self.limiter = SourceLimiter(rate_per_source, burst, describe=describe)
        self._listener: DatagramListener | None = None
        self._housekeeping: asyncio.TimerHandle | None = None
        self._started = False
        self._closed = False
        self._last_failure_log = float("-inf")

    async def start(self) -> None:
        """Bind the socket; returns once datagrams are being received."""
        if self._started or self._closed:
            raise RuntimeError("a SyslogReceiver starts once and cannot restart after close()")
        self._started = True
        loop = asyncio.get_running_loop()
        sock = self._open_socket()
        try:
            self._listener = DatagramListener(
                sock,
                self._received,
                batch=BATCH,
                stats=self.stats,
                name="syslog",
                on_error=self._receive_failed,
                logger=log,
            )
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._schedule_housekeeping(loop)
        log.info(
            "syslog listening on %s:%d/udp%s, %g lines/s per machine (bursts of %d)",
            self.listen_ip,
            self.port,
            f" ({self.interface})" if self.interface else "",
            self.limiter.rate,
            self.limiter.burst,
        )

    def close(self) -> None:
        """Stop receiving: the port is free when this returns; unreported drops are logged."""
        if self._closed:
            return
        self._closed = True
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        if self._listener is not None:
            # Closed at once, not on the loop's next turn: a caller that restarts the receiver
            # (a changed config) must find the port free.
            self._listener.close()
            self._listener = None
        self.limiter.report(final=True)

    def handle(self, data: bytes, source: str) -> SyslogMessage | None:
        """One datagram from `source`: the accepted message, or None if rate-limited."""
        self.stats["received"] += 1
        if not self.limiter.take(source):
            self.stats["dropped_rate"] += 1
            return None
        try:
            message = parse_syslog(data, IPv4Address(source))
        except ValueError:  # not an IPv4 source: cannot happen on an AF_INET socket
            self.stats["failed"] += 1
            return None
        self.stats[message.format] += 1
        try:
            self.on_message(message)
        except Exception:
            self.stats["failed"] += 1
            # A broken callback would fail for every line: one traceback a minute says enough.
            now = time.monotonic()
            if now - self._last_failure_log >= DROP_REPORT_INTERVAL:
                self._last_failure_log = now
                log.exception("syslog line from %s could not be recorded", source)
        return message

    def _received(self, data: bytes, source: Address) -> None:
        self.handle(data, source[0])

    def _receive_failed(self, exc: OSError) -> None:
        self.stats["socket_errors"] += 1
        log.debug("syslog socket error: %s", exc)

    def _open_socket(self) -> socket.socket:
        try:
            # Bound to the device: only the lab's machines may write to their event logs, not
            # another network's. No SO_REUSEADDR: with rsyslog already on the port, fail here
            # rather than share it. The buffer is capped by net.core.rmem_max: best effort.
            return udp_socket(
                self.port,
                address=self.listen_ip,
                device=self.interface,
                receive_buffer=RECEIVE_BUFFER,
            )
        except OSError as exc:
            hint = " (rsyslog or another syslog server is running?)" if exc.errno == 98 else ""
            raise OSError(
                exc.errno, f"syslog cannot listen on {self.listen_ip}:{self.port}: {exc}{hint}"
            ) from exc

    def _schedule_housekeeping(self, loop: asyncio.AbstractEventLoop) -> None:
        def tick() -> None:
            if self._closed:
                return
            try:
                self.limiter.report()
            finally:
                self._schedule_housekeeping(loop)

        self._housekeeping = loop.call_later(5.0, tick)
