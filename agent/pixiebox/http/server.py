"""The boot HTTP server: uvicorn inside the agent's asyncio loop, with zero-copy file sends.

Kernels and initrds are tens to hundreds of megabytes and a lab boots many machines at once, so
they must not pass through Python buffers. Starlette's FileResponse sends the ASGI message
`http.response.pathsend` (ASGI "Path Send" extension) instead of body chunks when the server
lists that extension in `scope["extensions"]`; uvicorn does not, so this module adds it:

- `PathsendProtocol` is uvicorn's httptools protocol that advertises the extension in every
  HTTP scope;
- `_PathsendCycle` answers the message with `loop.sendfile(transport, file)`, which on the stdlib
  selector loop is os.sendfile(2) straight from the page cache to the socket. Everything else
  (status line, headers, keep-alive, HEAD, 304, Range responses, which FileResponse streams as
  ordinary body chunks) stays uvicorn's own code.

uvloop (present in the venv as uvicorn's optional speed-up) does not implement loop.sendfile at
all (uvloop 0.23 inherits AbstractEventLoop.sendfile, which raises NotImplementedError), so the
extension is advertised only on the stdlib selector loop, which the agent runs (asyncio.run);
on any other loop FileResponse streams in chunks as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import Mapping
from typing import Any, cast

import uvicorn
from starlette.types import ASGIApp
from uvicorn._types import ASGIApplication, ASGISendEvent
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
from uvicorn.server import ServerState

from pixiebox.http.connlimit import FastAnswer, HttpLimits, LimitedProtocol, LimitedState
from pixiebox.net.limits import quiet_accept_errors, tcp_listener

log = logging.getLogger("pixiebox.http")

PATHSEND = "http.response.pathsend"
#: How long stop() lets transfers in flight finish before cutting them off (and then waits for
#: the cut ones to wind up).
GRACEFUL_STOP_SECONDS = 3.0


class ClientGone(ConnectionError):
    """The client went away before a file was fully sent. An OSError, which is what the ASGI
    HTTP spec (2.4) has send() raise on a closed connection; the app catches it to log the
    broken-off download."""


def sendfile_supported(loop: asyncio.AbstractEventLoop) -> bool:
    """True when `loop.sendfile` is os.sendfile, not a copy or NotImplementedError."""
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop) and hasattr(
        os, "sendfile"
    )


class _HeadFirst:
    """Stands in for the transport while uvicorn writes a response: holds the status line and
    headers and sends them with the first piece of body, in one send(2) and one TCP segment
    instead of two. An iPXE script is one small body, so this halves the system calls of the
    hot path (a benchmark of script requests spent 29 % of the agent's time in those writes).
    Everything else goes to the real transport."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.head = b""

    def write(self, data: bytes) -> None:
        if self.head:
            data, self.head = self.head + data, b""
        self.transport.write(data)

    def release(self) -> None:
        """Send the held head now (before a sendfile, a close, or when no body came)."""
        if self.head:
            data, self.head = self.head, b""
            self.transport.write(data)

    def close(self) -> None:
        self.release()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _PathsendCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, plus the `http.response.pathsend` message, and the
    head of each response sent together with its body (see _HeadFirst)."""

    _held: _HeadFirst | None = None

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == PATHSEND:
            self._release()
            await self._send_path(str(cast(Mapping[str, Any], message)["path"]))
            return
        if message["type"] == "http.response.start" and not self.response_started:
            real = self.transport
            head = _HeadFirst(real)
            self.transport = cast(asyncio.Transport, _Capture(head))
            try:
                await super().send(message)
            finally:
                self.transport = real
            self._held = head
            return
        held = self._held
        if held is None:
            await super().send(message)
            return
        # The first body message: uvicorn's own code writes it (Content-Length accounting,
        # chunk framing, HEAD, keep-alive or close) through the held head.
        self._held = None
        real = self.transport
        self.transport = cast(asyncio.Transport, held)
        try:
            await super().send(message)
        finally:
            self.transport = real
            held.release()

    def _release(self) -> None:
        held = self._held
        self._held = None
        if held is not None:
            held.release()

    async def _send_path(self, path: str) -> None:
        if not self.response_started or self.response_complete:
            raise RuntimeError(f"unexpected ASGI message {PATHSEND!r} outside a response body")
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected or self.transport.is_closing():
            raise ClientGone(f"the client closed the connection before {path} was sent")
        if self.chunked_encoding:
            # FileResponse always sets Content-Length; chunk framing around sendfile is not
            # worth having for a case that does not occur.
            raise RuntimeError(f"{PATHSEND} needs a Content-Length response")
        length = 0 if self.scope["method"] == "HEAD" else self.expected_content_length
        if length:
            if length > _BIG_SEND:
                _deepen_send_buffer(self.transport)
            with open(path, "rb") as file:
                try:
                    sent = await asyncio.get_running_loop().sendfile(
                        self.transport, file, 0, length
                    )
                except (OSError, RuntimeError) as exc:
                    # Reset or broken pipe mid-file: the transport does not notice by itself
                    # (it stopped reading while the kernel sent), so close it here, and mark the
                    # cycle now: connection_lost only runs on the next loop iteration, after the
                    # app has already returned.
                    self.disconnected = True
                    self.transport.abort()
                    raise ClientGone(f"sending {path} failed: {exc}") from exc
            if sent != length:
                self.transport.abort()
                raise RuntimeError(f"{path} shrank while being sent ({sent} of {length} bytes)")
        self.expected_content_length = 0
        # The empty final body runs uvicorn's own completion: keep-alive or close, pipelining.
        await super().send({"type": "http.response.body", "body": b"", "more_body": False})


#: Header names GRUB's HTTP client matches case-sensitively ("Content-Length: ", GRUB 2.12
#: grub-core/net/http.c), and uvicorn writes in lower case. Without a length it knows, GRUB under
#: Secure Boot refuses to verify the kernel ("big file signature isn't implemented yet";
#: docs/firmware-quirks.md#36). HTTP header names are case-insensitive (RFC 9110 5.1), so the
#: canonical spelling costs no other client anything.
_CANONICAL_NAMES = ((b"\r\ncontent-length: ", b"\r\nContent-Length: "),
                    (b"\r\ntransfer-encoding: ", b"\r\nTransfer-Encoding: "))  # fmt: skip


def _canonical_head(head: bytes) -> bytes:
    for lower, canonical in _CANONICAL_NAMES:
        head = head.replace(lower, canonical, 1)
    return head


class _Capture:
    """The transport as uvicorn's `http.response.start` sees it: the head it writes is held
    (with the header names GRUB needs spelled canonically)."""

    def __init__(self, held: _HeadFirst) -> None:
        self.held = held

    def write(self, data: bytes) -> None:
        self.held.head += _canonical_head(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.held.transport, name)


#: Files larger than this get a deeper socket send buffer (kernels and initrds, not scripts).
_BIG_SEND = 1 << 20
#: The send buffer asked for them. The event loop's sendfile runs one os.sendfile per time the
#: socket is writable, each a turn of the Python loop (a wake-up, add/remove of the writer);
#: the default buffer starts at 16 KiB and grows, so a 100 MiB initrd takes many turns; it
#: reached ~0.75x nginx's MiB/s without this and ~0.85x with it (bench/RESULTS.md).
_SEND_BUFFER = 4 << 20
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # linux/socket.h; Python 3.11 lacks it


def _deepen_send_buffer(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, _SEND_BUFFER)
    except OSError:  # not root: as much as net.core.wmem_max allows
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)


class PathsendProtocol(LimitedProtocol):
    """uvicorn's httptools protocol (with the connection limits of http.connlimit) whose HTTP
    scopes carry the pathsend extension."""

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        self._pathsend = (
            sendfile_supported(self.loop) and transport.get_extra_info("sslcontext") is None
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._pathsend:
            self.scope["extensions"] = {PATHSEND: {}}

    def _fast_head(self, head: bytes) -> bytes:
        return _canonical_head(head)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        # uvicorn builds the cycle inline here and only schedules its task, which has not run
        # yet; giving the new cycle our class before it starts is the one hook it offers
        # without copying this method.
        cycle = self.cycle
        if type(cycle) is RequestResponseCycle:
            cycle.__class__ = _PathsendCycle


def _fast_answer_of(app: ASGIApp) -> FastAnswer | None:
    """The fast answer a Starlette app offers in `app.state.fast_answer` (boot_app), if any."""
    state = getattr(app, "state", None)
    fast = getattr(state, "fast_answer", None) if state is not None else None
    return cast(FastAnswer, fast) if callable(fast) else None


def listening_socket(host: str, port: int, device: str | None = None) -> socket.socket:
    """A listening TCP socket on host:port. `device` (SO_BINDTODEVICE) confines it to one
    interface: boot HTTP hands out machines' secrets by source address, so it must accept
    connections only from the lab segment, not from a routed or management network that can
    reach the appliance's addresses (Linux accepts a packet for any local address on any
    interface; binding an address alone does not stop that)."""
    sock = tcp_listener(host, port, device)  # accept(2) out of descriptors: net.limits
    try:
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


class BootHttpServer:
    """uvicorn serving `app` on host:port inside the running loop.

    Not `uvicorn.Server.serve()`: that installs SIGINT/SIGTERM handlers and owns the loop, and the
    agent owns both, and not `Server.shutdown()` either: after its grace period it cancels the
    request tasks, which uvicorn logs as "Exception in ASGI application" for every transfer cut
    short. start() binds and returns; stop() lets transfers finish for a few seconds, then cuts
    them off at the socket."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        pathsend: bool = True,
        device: str | None = None,
        loopback: bool = False,
        limits: HttpLimits | None = None,
        name: str = "boot HTTP",
        fast: FastAnswer | None = None,
    ) -> None:
        """`pathsend=False` leaves the extension out (files are then copied through Python),
        for comparisons. `device` confines the host:port socket to one interface (see
        listening_socket); `loopback` also listens on 127.0.0.1 at the same port (the API: the
        appliance's own CLI reaches it there while its lab address is bound to the lab
        interface). `limits`: the [http] connection limits (http.connlimit), for all its
        sockets together; `name` says which server in their log lines. `fast`: GETs answered
        without the application (http.connlimit's FastAnswer); by default the app's own
        `state.fast_answer` when it has one (boot_app: repeated iPXE script fetches)."""
        self.app = app
        self.host = host
        self.port = port
        self.pathsend = pathsend
        self.device = device
        self.loopback = loopback
        self.limits = limits or HttpLimits()
        self.name = name
        self.fast = fast if fast is not None else _fast_answer_of(app)
        #: Connections refused, evicted, timed out, by kind (LimitedState.stats).
        self.stats: Counter[str] = Counter()
        self._server: uvicorn.Server | None = None
        self._sockets: list[socket.socket] = []
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = uvicorn.Config(
            cast(ASGIApplication, self.app),
            host=self.host,
            port=self.port,
            http=PathsendProtocol if self.pathsend else LimitedProtocol,
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        state = LimitedState(self.limits, self.name)
        state.stats = self.stats
        state.fast = self.fast
        server.server_state = state
        quiet_accept_errors(asyncio.get_running_loop())
        # Our own socket: a port in use or port 80 without privileges becomes an OSError for
        # the agent to explain, instead of uvicorn's sys.exit().
        self._sockets = [listening_socket(self.host, self.port, self.device)]
        try:
            if self.loopback:
                self._sockets.append(listening_socket("127.0.0.1", self.bound_port))
            await server.startup(sockets=self._sockets)
        except BaseException:
            for sock in self._sockets:
                sock.close()
            self._sockets = []
            raise
        self._server = server
        # main_loop refreshes the Date header once a second and returns on should_exit.
        self._ticker = asyncio.create_task(server.main_loop(), name="boot-http-ticker")
        if self.pathsend and not sendfile_supported(asyncio.get_running_loop()):
            log.warning(
                "this event loop has no native sendfile; boot files are copied through Python"
            )
        log.info("HTTP listening on %s", ", ".join(self.addresses))

    @property
    def addresses(self) -> list[str]:
        """Where it listens, as "host:port" or "host:port%device" (for the log)."""
        found = []
        for sock in self._sockets:
            host, port = sock.getsockname()[:2]
            device = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
            name = device.rstrip(b"\0").decode()
            found.append(f"{host}:{port}{f'%{name}' if name else ''}")
        return found

    @property
    def bound_port(self) -> int:
        if not self._sockets:
            return self.port
        return int(self._sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, let transfers in flight finish for GRACEFUL_STOP_SECONDS, then cut
        them off (the machines' iPXE scripts retry)."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.should_exit = True
        if self._ticker is not None:
            await self._ticker
            self._ticker = None
        for listener in server.servers:
            listener.close()
        state = server.server_state
        for connection in list(state.connections):
            connection.shutdown()  # idle keep-alive connections close now, busy ones when done
        if not await _settled(state, GRACEFUL_STOP_SECONDS):
            log.info("stopping: cutting off %d unfinished transfer(s)", len(state.tasks))
            for connection in list(state.connections):
                _cut(connection.transport)
            if not await _settled(state, GRACEFUL_STOP_SECONDS):
                for task in list(state.tasks):
                    task.cancel()
        for connection in list(state.connections):
            connection.transport.abort()
        for listener in server.servers:
            await listener.wait_closed()
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        log.info("%s stopped", self.name)


async def _settled(state: ServerState, timeout: float) -> bool:
    """Wait until no request is running and no connection is open; False on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while state.tasks or state.connections:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _cut(transport: asyncio.Transport) -> None:
    """End a connection mid-transfer without leaving a sendfile waiting forever.

    shutdown(2) makes the kernel fail the next send with EPIPE, which ends an os.sendfile in
    progress through its normal error path (ClientGone) and a streamed response through
    uvicorn's; closing the socket instead would leave the sendfile's writer callback registered
    on a dead descriptor (selector_events: the transport does not own the socket meanwhile)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        transport.abort()
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
