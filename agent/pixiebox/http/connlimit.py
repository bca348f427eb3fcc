"""Connection limits of the agent's HTTP servers (boot HTTP and the API), in uvicorn's protocol.

uvicorn (0.54, the httptools protocol the agent runs) has none of what a server on a home LAN
needs against a slow or hostile client, which is why they are added here, per connection:

- **No timeout for the request head.** `timeout_keep_alive` runs only between requests and
  stops at the first byte of the next one, so a client that connects and sends nothing, or one
  header line every few seconds (slowloris), holds its connection and descriptor forever.
  Here the whole head must arrive within `header_timeout` of the connection opening or of the
  previous response's end. A response being sent (a 300 MB initrd to a slow client) is never
  under that clock: it starts only once the response is complete.
- **No limit on the head's size.** `h11_max_incomplete_event_size` is for the h11 protocol
  only; httptools (llhttp) buffers a header of any length. Here the bytes of a head are counted
  as they arrive, and past `max_header_bytes` the answer is 431 and the connection is closed,
  without reading the rest.
- **No cap per source, and a total cap that reads first.** `limit_concurrency` answers 503
  only after reading a whole request head, counts every client together and logs a warning per
  refusal. Here a new connection over `max_connections_per_source` or `max_connections` is
  answered 503 the moment it is accepted, without reading from it, unless an idle keep-alive
  connection (or, over the total cap, one stuck in its head) can be closed to make room
  (`net.limits.ConnectionGate`).

Refusals, timeouts and bad requests are logged at most once every ten seconds per kind, with a
count of those not logged (`net.limits.LogLimiter`): a flood must not become a log flood.

A server may also give its state a `fast` answer (`FastAnswer`): a GET it can answer from what
it already has (boot HTTP: a machine's iPXE script fetched again, http.script_cache) is then
answered here, as soon as its head is complete, without a request cycle, a task and the ASGI
application, which is most of what such a request costs (bench/RESULTS.md: 71 % of the agent's
time for script requests was in Starlette and uvicorn's request cycle). Everything above still
applies to it: it is answered only once its head passed the size limit and the header clock,
and the connection is counted and idles like any other.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import httptools
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from pixiebox.config.schema import HttpSection
from pixiebox.net.limits import ConnectionGate, LogLimiter, Refusal

log = logging.getLogger("pixiebox.http")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """[http] header_timeout, max_header_bytes, max_connections, max_connections_per_source."""

    header_timeout: float = 10.0
    max_header_bytes: int = 16384
    max_connections: int = 512
    max_connections_per_source: int = 64

    @classmethod
    def of(cls, section: HttpSection) -> HttpLimits:
        return cls(
            header_timeout=float(section.header_timeout),
            max_header_bytes=section.max_header_bytes,
            max_connections=section.max_connections,
            max_connections_per_source=section.max_connections_per_source,
        )


def _answer(status: bytes, text: str, extra: bytes = b"") -> bytes:
    body = text.encode()
    return b"".join(
        (
            b"HTTP/1.1 ",
            status,
            b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n",
            extra,
            b"\r\n",
            body,
        )
    )


_BUSY = _answer(
    b"503 Service Unavailable",
    "Too many connections are open; try again in a few seconds.\n",
    b"retry-after: 5\r\n",
)
_TOO_BIG = _answer(b"431 Request Header Fields Too Large", "The request head is too large.\n")
_TIMEOUT = _answer(b"408 Request Timeout", "The request head did not arrive in time.\n")


#: (request target as sent, client address) → the header lines (`name: value` CRLF each, as
#: uvicorn writes them) and body of a 200 answer to a GET of it, or None: the application
#: answers. Called on the event loop, from the protocol, for every GET request.
FastAnswer = Callable[[bytes, str], tuple[bytes, bytes] | None]

_OK = STATUS_LINE[200]
_CLOSE = b"connection: close\r\n"


class _NobodyWaits:
    def set(self) -> None:
        return None


class _Answered:
    """Stands in for uvicorn's request cycle once the protocol answered a request itself: a
    complete response (its body, if any, is ignored; a disconnect has nothing to wake)."""

    response_complete = True
    disconnected = False
    keep_alive = True
    message_event = _NobodyWaits()


_ANSWERED = cast(RequestResponseCycle, _Answered())


class LimitedState(ServerState):
    """uvicorn's state shared by one server's connections, plus its limits, the gate that
    counts its connections and what they were refused (`stats`, for metrics and tests)."""

    def __init__(self, limits: HttpLimits, name: str) -> None:
        super().__init__()
        self.limits = limits
        self.name = name
        self.gate: ConnectionGate[LimitedProtocol] = ConnectionGate(
            limits.max_connections, limits.max_connections_per_source
        )
        self.said = LogLimiter(log)
        self.stats: Counter[str] = Counter()
        #: GETs answered without the application (see the module's doc); None: none are.
        self.fast: FastAnswer | None = None

    def refused(self, source: str, over: Refusal) -> None:
        self.stats[f"refused_{over}"] += 1
        cap = (
            f"{self.limits.max_connections_per_source} per source address "
            "([http] max_connections_per_source)"
            if over == "source"
            else f"{self.limits.max_connections} in total ([http] max_connections)"
        )
        self.said.log(
            f"refused-{over}",
            logging.WARNING,
            "%s refused a connection from %s: over the cap of %s, with none idle to close",
            self.name,
            source,
            cap,
        )


Phase = Literal["head", "idle", "answer"]


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of its server's LimitedState (none when
    the state is uvicorn's own)."""

    _limited: LimitedState | None = None
    _refused = False
    _source = "?"
    #: "head": reading a request head (the header clock runs once armed); "answer": a whole
    #: head has come and the request is being answered; "idle": keep-alive, nothing new yet.
    _phase: Phase = "head"
    #: Bytes read are a request head's (counted against max_header_bytes): from the start, and
    #: from the end of each request on (a pipelined or later one), until its head is complete.
    _in_head = True
    _head_bytes = 0
    _tail = b""
    _served = 0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        state = self.server_state
        if isinstance(state, LimitedState):
            self._limited = state
            peer = transport.get_extra_info("peername")
            self._source = str(peer[0]) if peer else "?"
            over = state.gate.admit(self, self._source)
            if over is not None:
                # Not uvicorn's connection at all: answered and closed before anything is read.
                self._refused = True
                self.transport = transport
                transport.write(_BUSY)
                transport.close()
                state.refused(self._source, over)
                return
        super().connection_made(transport)
        self._arm_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_clock()
        state = self._limited
        if state is not None:
            state.gate.release(self)
        super().connection_lost(exc)

    def evict(self) -> None:
        """Closed to make room for a newcomer (ConnectionGate): idle, or stuck in its head."""
        state = self._limited
        if state is not None:
            state.stats["evicted"] += 1
        self._stop_head_clock()
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        state = self._limited
        if state is not None and self._in_head:
            if self._phase == "idle":
                self._phase = "head"
                state.gate.waiting(self)
            if self._head_too_big(data, state.limits.max_header_bytes):
                state.stats["head_too_big"] += 1
                state.said.log(
                    "head-too-big",
                    logging.WARNING,
                    "%s: %s sent a request head over %d bytes ([http] max_header_bytes); "
                    "answered 431 and closed",
                    state.name,
                    self._source,
                    state.limits.max_header_bytes,
                )
                # Mid-answer (a pipelined head), a 431 would land inside the body being sent.
                self._close_with(_TOO_BIG if self._phase != "answer" else b"")
                return
        # uvicorn's own data_received, with its warning for a bad request rate-limited.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._say("invalid", "%s: invalid HTTP request from %s; answered 400")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _unsupported_upgrade_warning(self) -> None:
        self._say("upgrade", "%s: %s asked for a protocol upgrade, which is not served")

    def _say(self, kind: str, message: str) -> None:
        state = self._limited
        if state is None:
            self.logger.warning(message, "HTTP", self._source)
            return
        state.stats[kind] += 1
        state.said.log(kind, logging.WARNING, message, state.name, self._source)

    def _head_too_big(self, data: bytes, limit: int) -> bool:
        """Count `data` into the head being read; True if the head is over `limit` bytes.

        Cheap on the common path (a sum); past the limit the chunk is searched for the head's
        end, since it may end well inside the limit with a body (or a pipelined request) after
        it. Bytes of a pipelined request that arrive in the same read as the end of the one
        before are not counted: one read (at most 256 KiB, asyncio's) of slack, no more."""
        seen = self._head_bytes + len(data)
        if seen > limit:
            window = self._tail + data
            ends = [i + n for i, n in ((window.find(b"\r\n\r\n"), 4), (window.find(b"\n\n"), 2))
                    if i >= 0]  # fmt: skip
            if not ends or self._head_bytes - len(self._tail) + min(ends) > limit:
                return True
        self._head_bytes = seen
        self._tail = data[-3:]
        return False

    def on_headers_complete(self) -> None:
        self._phase = "answer"
        self._in_head = False
        self._head_bytes = 0
        self._tail = b""
        self._stop_head_clock()
        state = self._limited
        if state is not None:
            state.gate.busy(self)
            if state.fast is not None and self._answer_fast(state.fast):
                return
        super().on_headers_complete()

    def _answer_fast(self, fast: FastAnswer) -> bool:
        """Answer this request from `fast` if it has the answer; False: uvicorn runs it.

        Only a plain GET with nothing before it still being answered (a pipelined request
        waits its turn in uvicorn's queue) and while the client reads what it is sent (else
        uvicorn's cycle waits for the transport to drain). The bytes are uvicorn's for the
        same response: status line, its default headers (Date), the answer's, `connection:
        close` when the connection ends with it (HTTP/1.0, or the client asked), the body."""
        parser = self.parser
        cycle = self.cycle
        if (
            parser.get_method() != b"GET"
            or (cycle is not None and not cycle.response_complete)
            or self.pipeline
            or self.flow.write_paused
            or parser.should_upgrade()
        ):
            return False
        try:
            found = fast(self.url, self._source)
        except Exception:
            # Raised inside the parser's callback it would become a 400 "invalid request":
            # the application answers instead (and reports what is wrong its own way).
            state = self._limited
            if state is not None:
                state.said.log("fast-failed", logging.ERROR, "%s: answering %r at once failed",
                               state.name, self.url[:200], exc_info=True)  # fmt: skip
            return False
        if found is None:
            return False
        head, body = found
        keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
        defaults = b"".join(
            [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        )
        head = self._fast_head(_OK + defaults + head + (b"" if keep_alive else _CLOSE))
        self.cycle = _ANSWERED
        self.transport.write(head + b"\r\n" + body)
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()
        return True

    def _fast_head(self, head: bytes) -> bytes:
        """The head of a fast answer as this protocol writes heads (a subclass may respell)."""
        return head

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # What follows on this connection is the next request's head (pipelined or later);
        # its bytes count against the size limit, its clock starts when this answer is done.
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._served += 1
        if self.transport.is_closing() or self.timeout_keep_alive_task is None:
            return  # closing, or a pipelined request is already being answered
        self._phase = "idle" if self._head_bytes == 0 else "head"
        state = self._limited
        if state is not None:
            if self._phase == "idle":
                state.gate.idle(self)
            else:
                state.gate.waiting(self)
        self._arm_head_clock()

    def _arm_head_clock(self) -> None:
        state = self._limited
        if state is None:
            return
        self._stop_head_clock()
        if self._phase == "answer":
            self._phase = "head"
        self._head_timer = self.loop.call_later(state.limits.header_timeout, self._head_late)

    def _stop_head_clock(self) -> None:
        timer, self._head_timer = self._head_timer, None
        if timer is not None:
            timer.cancel()

    def _head_late(self) -> None:
        self._head_timer = None
        state = self._limited
        if state is None or self._phase == "answer" or self.transport.is_closing():
            return
        if self._served and self._head_bytes == 0:
            # A keep-alive connection that simply asked nothing more: not worth a line.
            self.transport.close()
            return
        state.stats["head_timeout"] += 1
        state.said.log(
            "head-timeout",
            logging.WARNING,
            "%s: %s sent no complete request head within %g s ([http] header_timeout); closed",
            state.name,
            self._source,
            state.limits.header_timeout,
        )
        if self._head_bytes:
            self._close_with(_TIMEOUT)
        else:
            self.transport.close()

    def _close_with(self, answer: bytes) -> None:
        self._stop_head_clock()
        if answer:
            self.transport.write(answer)
        self.transport.close()
        state = self._limited
        if state is not None:
            state.gate.release(self)
