"""Transfers whose steady state is lent to worker threads (tftp.lending): the TFTP engine's
base. The protocol stays in tftp.transfers; this class only decides when a transfer is handed
over, and goes on from what the thread did when it comes back.
"""

from __future__ import annotations

import functools
import logging
import os
import select

from pixiebox.tftp.lending import Lender, Returned, Status
from pixiebox.tftp.transfer import Transfer
from pixiebox.tftp.transfers import Transfers, log

#: Blocks left to send from which a lockstep transfer is lent to a worker thread; fewer go
#: from the loop: a boot menu or a pxelinux file is a block or two, and handing one over costs
#: a thread's start and a wake-up each way.
LEND_FROM = 4


class LendingTransfers(Transfers):
    """Transfers (see there), with lockstep ones lent to worker threads once their client is
    heard: at most one thread per transfer the limits admit."""

    @functools.cached_property
    def _lender(self) -> Lender:
        return Lender(self._given_back)

    def _go_on(self, transfer: Transfer, now: float) -> None:
        """Every block sent is acknowledged: the next ones. A lockstep transfer with the
        client heard is lent to a worker thread from its first ACK on, unless so few blocks
        are left that handing it over costs more."""
        t = transfer
        if t.window == 1 and t.heard and t.blocks - t.sent >= LEND_FROM:
            self._lend(t)
        else:
            self._send_window(t, now)

    def _lend(self, transfer: Transfer) -> None:
        """Hand the transfer's steady state to a worker thread (tftp.lending): its socket
        leaves the epoll set and its timer is cancelled until it is given back."""
        t = transfer
        assert self._epoll is not None and self._loop is not None
        try:
            self._lender.lend(t, self._loop)
        except (RuntimeError, MemoryError) as exc:
            # No thread could be started (the system's limit on threads, or memory): this
            # transfer goes on from the loop, as all did before the threads.
            self.stats["not_lent"] += 1
            log.warning("TFTP: %s goes on from the event loop: no thread for it: %s", t.path, exc)
            self._send_window(t, self._now())
            return
        fd = t.sock.fileno()
        self._epoll.unregister(fd)
        del self._by_fd[fd]
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        self.stats["lent"] += 1

    def _given_back(self, transfer: Transfer, back: Returned | BaseException) -> None:
        """The worker thread is done with the transfer: go on from what it did."""
        t = transfer
        if t.done or self._epoll is None:
            return
        fd = t.sock.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._by_fd[fd] = t
        now = self._now()
        if isinstance(back, BaseException):
            self.stats["internal_error"] += 1
            log.error("TFTP internal error in the transfer of %s", t.path, exc_info=back)
            self._finish(t, "aborted", "internal-error", "internal error", logging.ERROR)
            return
        if back.acked > t.acked:
            t.acked = back.acked
            t.resends = 0
        t.heard_at = max(t.heard_at, back.heard)
        t.sent = back.sent
        t.valid = 0  # its blocks were read into the thread's own buffer
        t.deadline = now + t.timeout
        status = back.status
        if status is Status.TIMEOUT:
            t.deadline = now
            self._on_timer(t)  # resends, or gives up; arms the timer again
            return
        if status is Status.DATAGRAM:
            self._on_datagram(t, back.value, now)
        elif status is Status.SOCKET_ERROR:
            self._socket_error(t, OSError(back.value, os.strerror(back.value)))
        elif status is Status.ALL_ACKED:
            self._finish(t, "sent", "", "", logging.INFO)
        else:  # a full send buffer or a short read: as if here, from the block after `sent`
            self._send_window(t, now)
        if not t.done and t.timer is None and not t.lent:
            self._arm(t)

    def abort_all(self) -> None:
        """Transfers.abort_all, once the lent transfers are back from their threads (their
        sockets shut down for reading: tftp.lending)."""
        self._lender.recall()
        super().abort_all()
