"""A lockstep transfer lent to the native loop (`lockstep.c`) in a worker thread, and given back.

Why threads: a lockstep transfer's time is its round trips, one per block. Served from the
event loop, every client waited on one core and on the interpreter's ~2 us per block; with 20
clients that took 1.5-1.9x as long as tftpd-hpa, which forks per client (bench/RESULTS.md,
issue 17). Lent out, each transfer's steady state runs in its own thread with the GIL released,
as tftpd-hpa's processes do, in C, with two system calls per block, on the CPU its client's
packets come in on (lockstep.c says why).

What a lent transfer may touch, so that only the event loop mutates shared state: the worker
thread is given the transfer's socket and file descriptors, its `inbuf` and its sizes, read on
the loop when it is lent, and nothing else; tftp.lent takes the socket out of the epoll set
and cancels the transfer's timer before lending, and touches none of them until
`on_return` runs on the loop with what happened (`Returned`). To stop a lent transfer the loop
shuts its socket down for reading, which wakes the thread's recv (Linux returns 0 on a UDP
socket shut down for reading) and leaves the socket able to send the client its ERROR
(`recall`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pixiebox.tftp.lockstep as lockstep
from pixiebox.tftp.transfer import Transfer


class Status(enum.IntEnum):
    """Why the native loop gave a transfer back (the enum in lockstep.c)."""

    ALL_ACKED = 0  # the client acknowledged the last block: the file is sent
    TIMEOUT = 1  # no datagram within the transfer's timeout after block `sent`
    DATAGRAM = 2  # something other than the expected ACK: `value` bytes in the inbuf
    SOCKET_ERROR = 3  # `value` is the errno of the failed send or recv
    SEND_BLOCKED = 4  # the send buffer was full: as if that block were lost
    READ_SHORT = 5  # the file gave less than its size said (shrank, or a read error)


@dataclass(frozen=True, slots=True)
class Returned:
    """What the native loop did: blocks up to `acked` were acknowledged, up to `sent` sent;
    `heard` is when the client was last heard (the loop's clock), 0.0 if not while lent."""

    status: Status
    acked: int
    sent: int
    value: int
    heard: float


OnReturn = Callable[[Transfer, Returned | BaseException], None]


class Lender:
    """The worker threads: one per lent transfer, started when it is lent and ended when it
    is given back. A pool would save a thread's start (tens of microseconds) per transfer but
    queues the work before it has a thread: when the system refuses one, a queued transfer
    could run later on a socket the loop had already closed. Started here, a refused thread
    raises before anything runs, and the transfer goes on from the loop."""

    def __init__(self, on_return: OnReturn) -> None:
        self._on_return = on_return
        self._lent: dict[concurrent.futures.Future[Returned], Transfer] = {}

    def lend(self, transfer: Transfer, loop: asyncio.AbstractEventLoop) -> None:
        """Send the blocks after `transfer.sent` from a worker thread; `on_return` then runs
        on `loop` with what happened (or the exception the thread raised). Raises
        RuntimeError when no thread can be started, with nothing lent."""
        t = transfer
        assert t.source.fd is not None and not t.lent
        future: concurrent.futures.Future[Returned] = concurrent.futures.Future()
        args = (t.sock.fileno(), t.source.fd, t.inbuf, t.sent + 1, t.source.size, t.blksize,
                t.timeout)  # fmt: skip

        def work() -> None:  # the worker thread: it sees `args`, read above, and nothing else
            try:
                status, acked, sent, value, heard = lockstep.lockstep(*args)
                future.set_result(Returned(Status(status), acked, sent, value, heard))
            except BaseException as exc:  # handed to the loop, which ends the transfer
                future.set_exception(exc)

        def given_back(done: concurrent.futures.Future[Returned]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is gone
                loop.call_soon_threadsafe(self._given_back, done)

        future.add_done_callback(given_back)
        threading.Thread(target=work, name="pixiebox-tftp", daemon=True).start()
        t.lent = True
        self._lent[future] = t

    def _given_back(self, future: concurrent.futures.Future[Returned]) -> None:
        transfer = self._lent.pop(future, None)
        if transfer is None:
            return  # recalled: its end was already seen to
        transfer.lent = False
        try:
            returned: Returned | BaseException = future.result()
        except Exception as exc:
            returned = exc
        self._on_return(transfer, returned)

    def recall(self, wait: float = 2.0) -> None:
        """Shut down for reading the sockets of the lent transfers, and wait (at most `wait`
        seconds) for them to come back; their `on_return` is then not called. One still lent
        after that keeps `lent` set: its socket and file must stay open, the thread may still
        use them."""
        out = dict(self._lent)
        for transfer in out.values():
            with contextlib.suppress(OSError):
                transfer.sock.shutdown(socket.SHUT_RD)
        done, _ = concurrent.futures.wait(out, timeout=wait)
        for future in done:
            del self._lent[future]
            out[future].lent = False
