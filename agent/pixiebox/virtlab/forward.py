"""A TCP forwarder from the host's loopback into a lab namespace: how `pixiebox demo` lets the
host's browser open the dashboard of an agent that listens inside a network namespace.

A socket belongs, for life, to the network namespace of the thread that created it, whichever
thread uses it later; setns(2) moves only the calling thread. So one thread creates the listening
socket on 127.0.0.1 in the host's namespace, then enters the agent's namespace and runs an
asyncio loop there: the connections it accepts come from the host, and the upstream socket it
creates for each one is born in the agent's namespace, where the API answers on 127.0.0.1.
Nothing is added to the host's network (no veth, route or firewall rule to leave behind if the
demo dies), only this one port is reachable, and it goes away with the demo's process.

Loopback only, on purpose: the dashboard's reads are open to whoever reaches its listener, and
the agent sees every forwarded connection as coming from its own 127.0.0.1. Another machine on
the host's network must not get that; a person on another machine uses `ssh -L`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import threading

#: Linux's CLONE_NEWNET (sched.h), for setns(2).
_CLONE_NEWNET = 0x40000000
#: The dashboard's usual port, tried first so the URL is the one the README shows.
DEFAULT_PORT = 8080
_CHUNK = 1 << 16


def enter_namespace(name: str) -> None:
    """Move the calling thread into the network namespace `ip netns` calls `name`. setns(2)
    moves only the calling thread, and the threads it starts are born there (Python 3.11 has no
    os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{name}", "rb") as handle:
        if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"cannot enter network namespace {name}: {os.strerror(error)}")


def loopback_listener(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:`port` in the calling thread's namespace; when that port
    is taken (another program, a second demo), on a free one the kernel picks. `port` 0: any."""
    for candidate in dict.fromkeys((port, 0)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", candidate))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE and candidate != 0:
                continue
            raise
        sock.listen(64)
        return sock
    raise OSError(errno.EADDRINUSE, "no free port on 127.0.0.1")


class Forwarder:
    """127.0.0.1:<port> on the host → `target`:`target_port` as seen from namespace
    `namespace` (its own 127.0.0.1 by default, or an address it reaches, such as the appliance
    VM's from the demo's laptop namespace)."""

    def __init__(
        self,
        namespace: str,
        target_port: int,
        port: int = DEFAULT_PORT,
        target: str = "127.0.0.1",
    ) -> None:
        self.namespace = namespace
        self.target = target
        self.target_port = target_port
        self._listener = loopback_listener(port)
        self.port: int = self._listener.getsockname()[1]
        self._ready = threading.Event()
        self._failed: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="demo-dashboard", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> Forwarder:
        """Start forwarding; raises OSError when the namespace cannot be entered."""
        self._thread.start()
        self._ready.wait(10)
        if self._failed or not self._ready.is_set():
            self.close()
            raise OSError(self._failed[0] if self._failed else "the forwarder did not start")
        return self

    def close(self) -> None:
        """Stop listening and drop every forwarded connection (before the namespace goes: this
        thread, while it lives, is in it)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(10)
        self._listener.close()

    # -- the forwarding thread, in the agent's namespace ------------------------------------

    def _run(self) -> None:
        try:
            enter_namespace(self.namespace)
            asyncio.run(self._serve())
        except OSError as exc:
            self._failed.append(str(exc))
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        connections: set[asyncio.Task[None]] = set()

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                connections.add(task)
            try:
                await self._forward(reader, writer)
            finally:
                if task is not None:
                    connections.discard(task)

        server = await asyncio.start_server(accepted, sock=self._listener)
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for task in list(connections):
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        # Made here, by this thread: in the agent's namespace. An IP literal, so no resolver
        # thread is involved (it would be born in the namespace and outlive nothing, but why).
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        try:
            await loop.sock_connect(upstream, (self.target, self.target_port))
            up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        except OSError:
            upstream.close()
            writer.close()  # the agent is not (or no longer) listening: the browser sees a reset
            return
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                end.close()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until end of file, then half-close the other side (a request body's end reaches the
    agent; the server-sent event stream stays open as long as both ends want it)."""
    try:
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError):
        sink.close()
