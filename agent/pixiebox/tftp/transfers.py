"""The transfers under way: windows, timers and resends, the protocol of pixiebox.tftp. A
lockstep transfer's steady state (an ACK, the next block) is lent to a thread once its client is
heard (tftp.lent); everything else about it happens here.

Why not a library: tftpy 0.8.7 (used here before) builds packet objects, re-parses options and
goes through a state object for every block. Measured over veth on a 2-core machine it took
1.5x tftpd-hpa's time for one 1 MiB download and 2.8x with 20 at once, and moved 0.44x
dnsmasq's MiB/s to 20 clients; its own `listen()` also died on one malformed request. A lab
boots all at once, so the hot path is written out here, small: DATA is a header packed in front
of a block already read ahead (one os.preadv per 64 KiB) and one send; an ACK is four bytes read
into a reused buffer; resend timeouts are one lazily re-armed timer per transfer, not one per
packet; and all transfer sockets sit in one epoll set of their own that the event loop watches
as a single file (see _pump). A transfer is handed a `Source` (an open file descriptor and a
size) and knows nothing of where it came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import struct
import time
from collections import Counter
from collections.abc import Callable

from pixiebox.core.wording import size as size_text
from pixiebox.core.wording import span
from pixiebox.net.limits import Quota
from pixiebox.tftp.limits import RESEND_AFTER, Admission, Client, TftpLimits
from pixiebox.tftp.outcome import EventKind, Outbox, TftpEvent, log_finished
from pixiebox.tftp.packets import (
    ACK,
    BUSY,
    DATA,
    DEFAULT_BLKSIZE,
    ERR_UNDEFINED,
    ERR_UNKNOWN_TID,
    ERROR,
    STOPPING,
    error_packet,
    negotiate,
    oack_packet,
    parse_reply,
)
from pixiebox.tftp.sockets import reply_socket, transfer_sockets
from pixiebox.tftp.transfer import INBUF, Source, Transfer, only_last_ack_missing

log = logging.getLogger("pixiebox.tftp")

__all__ = ["RESENDS", "RESEND_AFTER", "Source", "Transfer", "Transfers"]

#: Unanswered resends before a transfer is given up (RESEND_AFTER, or the client's timeout,
#: apart; TftpLimits.idle_timeout ends it sooner).
RESENDS = 5
#: socket() and bind() failing for want of descriptors or memory: a half-open transfer gives
#: way (limits.Admission) and the request is tried once more.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_DATA_HEADER = struct.Struct("!HH")
#: A received datagram's first four bytes as one word, compared with Transfer.expect.
_WORD = struct.Struct("!I").unpack_from
_ACK_WORD = ACK << 16
#: Bytes read ahead per transfer with one os.preadv (at least one block).
_READ_AHEAD = 64 * 1024
#: Transfer sockets handled per epoll_wait, and the longest the loop is kept before DHCP and
#: HTTP on the same loop get their turn.
_BATCH = 64
_PUMP_SECONDS = 0.005


class Transfers:
    """The transfers under way, on one event loop (set by the subclass's start()).

    `on_event` is called on that loop, once per outcome; `describe(ip)` names the client in log
    lines ("c1 (f4:4d:…, 10.0.0.5)" rather than a bare address). Outcomes an outsider can
    cause by the datagram (anything but a sent file or a stop) are logged and emitted within a
    Quota per kind and reason; the rest of them go to the debug log only."""

    def __init__(
        self,
        *,
        interface: str | None,
        on_event: Callable[[TftpEvent], None] | None,
        describe: Callable[[str], str],
        limits: TftpLimits,
    ) -> None:
        self.interface = interface
        self.describe = describe
        self.limits = limits
        self.stats: Counter[str] = Counter()
        self._transfers: dict[Client, Transfer] = {}
        self._admission = Admission(limits)
        self._log_quota = Quota()
        self._outbox = Outbox(on_event, self.stats)
        # Transfer sockets sit in an epoll set of their own, which the event loop watches as one
        # file: one wake-up then serves every transfer with an ACK waiting, instead of the
        # loop's selector bookkeeping and a callback handle per socket.
        self._epoll: select.epoll | None = None
        self._by_fd: dict[int, Transfer] = {}
        self._strays: dict[int, Transfer] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._now: Callable[[], float] = time.monotonic

    def _send_error(
        self, ip: str, port: int, local_ip: str, code: int, text: str | None = None
    ) -> None:
        try:
            with reply_socket(local_ip, self.interface) as sock:
                sock.sendto(error_packet(code, text), (ip, port))
        except OSError as exc:
            log.debug("TFTP error to %s:%d not sent: %s", ip, port, exc)

    def _quota(self, kind: str, reason: str) -> int | None:
        """Whether an outcome's log line is at its level (how many like it were logged at
        debug level only before it) or, None, at debug level only: see Quota."""
        if kind == "sent" or reason == "stopping":
            return 0  # a file sent is worth its line; a stop ends at most max_transfers
        return self._log_quota.admit(f"{kind}:{reason}")

    def _who(self, ip: str, left_out: int | None) -> str:
        # A line at debug level only (over its quota) is not worth describe()'s lookups.
        return ip if left_out is None else self.describe(ip)

    def _begin(
        self,
        ip: str,
        port: int,
        local_ip: str,
        path: str,
        source: Source,
        requested: dict[str, str],
    ) -> None:
        loop = self._loop
        epoll = self._epoll
        assert loop is not None and epoll is not None
        try:
            try:
                sockets = transfer_sockets(local_ip, (ip, port), self.interface)
            except OSError as exc:
                oldest = self._admission.oldest_half_open()
                if exc.errno not in _EXHAUSTED or oldest is None:
                    raise
                # Out of descriptors (a lower RLIMIT_NOFILE than the limits assume): a
                # half-open transfer gives way, as when a limit is reached.
                self._evict(self._transfers[oldest], "the server ran out of sockets")
                sockets = transfer_sockets(local_ip, (ip, port), self.interface)
        except OSError as exc:
            source.close()
            self.stats["socket_error"] += 1
            left_out = self._quota("aborted", "socket-error")
            log.log(
                logging.DEBUG if left_out is None else logging.WARNING,
                "%s asked for %s over TFTP: cannot answer it: %s; it got ERROR 0 (%s)%s",
                ip,
                path,
                exc,
                BUSY,
                f" ({left_out} more like it since, at debug level)" if left_out else "",
            )
            self._send_error(ip, port, local_ip, ERR_UNDEFINED, BUSY)
            detail = f"socket error: {exc}"
            self._outbox.emit(
                TftpEvent("aborted", ip, port, path, source.size, "socket-error", detail)
            )
            return
        sock, stray = sockets.sock, sockets.stray
        accepted, timeout = negotiate(
            requested, source.size, sockets.mtu, max_timeout=self.limits.max_client_timeout
        )
        blksize = int(accepted.get("blksize", DEFAULT_BLKSIZE))
        chunk = max(1, _READ_AHEAD // blksize)
        now = self._now()
        transfer = Transfer(
            sock=sock,
            stray=stray,
            client=(ip, port),
            source=source,
            path=path,
            options=requested,
            oack=oack_packet(accepted) if accepted else None,
            blksize=blksize,
            window=int(accepted.get("windowsize", 1)),
            timeout=timeout or RESEND_AFTER,
            started=now,
            blocks=source.size // blksize + 1,
            # A half-open transfer reads one block (a flood of them costs little memory); the
            # read-ahead begins once the client is heard from (_read_ahead).
            buf=memoryview(bytearray(4 + blksize)),
            chunk=chunk,
            heard_at=now,
        )
        try:
            epoll.register(sock.fileno(), select.EPOLLIN)
            epoll.register(stray.fileno(), select.EPOLLIN)
        except BaseException:
            with contextlib.suppress(OSError):
                epoll.unregister(sock.fileno())
            sock.close()
            stray.close()
            raise
        self._by_fd[sock.fileno()] = transfer
        self._strays[stray.fileno()] = transfer
        self._transfers[(ip, port)] = transfer
        self._admission.started((ip, port))
        log.debug(
            "%s:%d asked for %s (%s, from %s); options asked %s, acknowledged %s",
            ip,
            port,
            path,
            size_text(source.size),
            source.where,
            requested or "none",
            accepted or "none",
        )
        if transfer.oack is not None:
            self._send_oack(transfer)  # the client answers with ACK 0 (RFC 2347)
        else:
            transfer.acked = 0  # plain RFC 1350: DATA 1 answers the request
            self._send_window(transfer, self._now())
        if not transfer.done:
            self._arm(transfer)

    def _arm(self, transfer: Transfer) -> None:
        """The transfer's one timer, at its resend deadline or the end of its idle time."""
        assert self._loop is not None
        t = transfer
        when = min(t.deadline, t.heard_at + self.limits.idle_timeout)
        t.timer = self._loop.call_at(when, self._on_timer, t)

    def _send_oack(self, transfer: Transfer) -> None:
        assert transfer.oack is not None and self._loop is not None
        transfer.deadline = self._now() + transfer.timeout
        try:
            transfer.sock.send(transfer.oack)
        except BlockingIOError:
            pass  # as if lost: the timer sends it again
        except OSError as exc:
            self._socket_error(transfer, exc)

    def _send_window(self, transfer: Transfer, now: float) -> None:
        """Send the blocks after `transfer.sent` up to a window past the last acknowledged one.

        Lockstep (RFC 1350) is a window of 1. Only the timer ever sends a block again: answering
        a duplicate ACK with DATA would double every packet from then on (the Sorcerer's
        Apprentice bug, RFC 1123 section 4.2.3.1)."""
        t = transfer
        last = min(t.acked + t.window, t.blocks)
        block = t.sent + 1
        blksize = t.blksize
        while block <= last:
            slot = block - t.first
            if not 0 <= slot < t.valid:
                if not self._read_ahead(t, block):
                    return
                slot = 0
                last = min(last, t.blocks)  # the file may have shrunk
            start = slot * blksize
            _DATA_HEADER.pack_into(t.buf, start, DATA, block & 0xFFFF)
            size = min(blksize, t.source.size - (block - 1) * blksize)
            try:
                t.sock.send(t.buf[start : start + 4 + size])
            except BlockingIOError:
                break  # send buffer full: as if lost, the timer sends it again
            except OSError as exc:
                self._socket_error(t, exc)
                return
            t.sent = block
            block += 1
        t.deadline = now + t.timeout
        # Lockstep takes the fast path (_on_readable); before the client is heard, not.
        lockstep = t.window == 1 and t.heard and t.sent == t.acked + 1
        t.expect = _ACK_WORD | (t.sent & 0xFFFF) if lockstep else -1

    def _read_ahead(self, transfer: Transfer, block: int) -> bool:
        """Read up to `chunk` blocks from `block` on into the buffer; False if the transfer
        ended instead."""
        t = transfer
        chunk = t.chunk if t.heard else 1
        if len(t.buf) < 4 + chunk * t.blksize:
            t.buf = memoryview(bytearray(4 + chunk * t.blksize))
        offset = (block - 1) * t.blksize
        wanted = max(0, min(chunk * t.blksize, t.source.size - offset))
        assert t.source.fd is not None
        try:
            got = os.preadv(t.source.fd, [t.buf[4 : 4 + wanted]], offset) if wanted else 0
        except OSError as exc:
            self._finish(
                t, "aborted", "read-error", f"reading the file failed: {exc}", logging.WARNING
            )
            return False
        if got < wanted:
            # The file shrank while being sent (replaced in place): end with what is there,
            # as tftpd-hpa does; the client sees a short file, not a hang.
            log.warning("%s shrank while being sent over TFTP; sent as it is", t.path)
            t.source.size = offset + got
            t.blocks = t.source.size // t.blksize + 1
        t.first = block
        t.valid = min(chunk, t.blocks - block + 1)
        return True

    def _pump(self) -> None:
        """Serve the transfer sockets with something to read (an ACK, mostly, or a queued
        error), then look again, for up to `_PUMP_SECONDS`.

        Looking again is what makes lockstep fast: sending DATA wakes the client, which
        usually ACKs before the send returns, and taking that ACK here costs one epoll_wait(0)
        instead of a round through the event loop per block. The time bound keeps DHCP and
        HTTP on the same loop served while twenty transfers keep every round busy."""
        epoll = self._epoll
        if epoll is None:
            return
        by_fd = self._by_fd
        until = self._now() + _PUMP_SECONDS
        while True:
            events = epoll.poll(0, _BATCH)
            if not events:
                return
            now = self._now()  # once per round: resend deadlines need no finer clock
            if now >= until:
                return  # the loop calls again while a socket is still readable
            for fd, _ in events:
                transfer = by_fd.get(fd)
                if transfer is None:
                    transfer = self._strays.get(fd)
                    if transfer is not None:
                        self._on_stray(transfer)
                    continue
                try:
                    self._on_readable(transfer, now)
                except Exception:
                    # Whatever one transfer does, the other machines keep booting.
                    self.stats["internal_error"] += 1
                    log.exception("TFTP internal error in the transfer of %s", transfer.path)
                    self._finish(
                        transfer, "aborted", "internal-error", "internal error", logging.ERROR
                    )
            if self._epoll is None:
                return

    def _on_readable(self, transfer: Transfer, now: float) -> None:
        """One datagram from the client. One per call: lockstep rarely has a second queued,
        and _pump comes back while the socket stays readable."""
        t = transfer
        if t.done:
            return
        try:
            n = t.sock.recv_into(t.inbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._socket_error(t, exc)
            return
        t.heard_at = now
        if n >= 4 and _WORD(t.inbuf)[0] == t.expect:
            # Lockstep, the ACK of the block just sent: one comparison for the opcode, block,
            # window and half-open checks (Transfer.expect).
            t.expect = -1
            t.acked = t.sent
            t.resends = 0
            if t.acked >= t.blocks:
                self._finish(t, "sent", "", "", logging.INFO)
            else:
                self._go_on(t, now)
            return
        self._on_datagram(t, n, now)

    def _on_datagram(self, transfer: Transfer, n: int, now: float) -> None:
        """A datagram of `n` bytes in the transfer's inbuf that is not the lockstep ACK."""
        t = transfer
        data = t.inbuf
        if n >= 4 and data[1] == ACK and data[0] == 0:
            # Which of the blocks in flight it acknowledges; anything else (a duplicate, or
            # an ACK from before a rewind) is ignored.
            ahead = ((data[2] << 8 | data[3]) - t.acked) & 0xFFFF
            if 0 < ahead <= t.sent - t.acked:
                t.acked += ahead
                t.resends = 0
                if not t.heard:
                    t.heard = True
                    self._admission.heard(t.client)
                if t.acked >= t.blocks:
                    self._finish(t, "sent", "", "", logging.INFO)
                    return
                if t.sent != t.acked:
                    # RFC 7440 section 4: an ACK short of the window's end means the blocks
                    # after it were lost; the next window starts right after it.
                    t.sent = t.acked
                    t.valid = 0  # their headers overwrote the read-ahead: read it again
                self._go_on(t, now)
            elif ahead == 0 and t.window > 1 and t.sent > t.acked and t.rewound != t.acked:
                # RFC 7440 section 4: the client saw a gap right after the block it
                # acknowledged before (or its timer ran out): the window again from there,
                # once per block, so repeats of that ACK cannot multiply the windows. In
                # lockstep a repeated ACK stays ignored (the Sorcerer's Apprentice bug).
                t.rewound = t.acked
                t.sent = t.acked
                t.valid = 0
                self._send_window(t, now)
            return
        reply = parse_reply(bytes(data[:n]))
        if reply is not None and reply[0] == ERROR:
            self._peer_error(t, reply[1], reply[2])
        else:
            log.debug("%s:%d sent an unexpected %d-byte packet; ignored", *t.client, n)

    def _go_on(self, transfer: Transfer, now: float) -> None:
        """Every block sent is acknowledged: the next ones (tftp.lent hands lockstep
        transfers to worker threads from here)."""
        self._send_window(transfer, now)

    def _on_stray(self, transfer: Transfer) -> None:
        """RFC 1350 section 4: a packet from another TID is answered with ERROR 5 and does not
        disturb the transfer."""
        try:
            _, source = transfer.stray.recvfrom(INBUF)
        except OSError:  # nothing after all, or an ICMP error about an earlier ERROR 5
            return
        log.debug(
            "a packet from %s:%d reached the transfer of %s to %s:%d; it got ERROR 5",
            *source,
            transfer.path,
            *transfer.client,
        )
        with contextlib.suppress(OSError):
            transfer.stray.sendto(error_packet(ERR_UNKNOWN_TID), source)

    def _socket_error(self, transfer: Transfer, exc: OSError) -> None:
        """A send or receive failed: on the connected socket that is about the client."""
        if isinstance(exc, ConnectionRefusedError):
            if only_last_ack_missing(transfer):
                # docs/firmware-quirks.md#18 again: it took the last block without a word and left.
                reason = "no ACK for the last block; the client has closed its port"
                self._finish(transfer, "sent", "no-last-ack", reason, logging.INFO)
                return
            self._vanished(transfer, "gone", "its port is closed (ICMP port unreachable)")
        else:
            self._vanished(transfer, "gone", f"the socket failed: {exc.strerror or exc}")

    def _on_timer(self, transfer: Transfer) -> None:
        """Runs at the transfer's deadline, which each send pushes back: one timer per
        transfer, re-armed here rather than replaced on every packet."""
        t = transfer
        t.timer = None
        loop = self._loop
        if t.done or loop is None:
            return
        now = self._now()
        idle = now - t.heard_at >= self.limits.idle_timeout
        if not idle and now < t.deadline:
            self._arm(t)
            return
        if idle or t.resends >= RESENDS:
            if only_last_ack_missing(t):
                # Every block went out; the ACK of the last one never came. Windows clients
                # never send it (docs/firmware-quirks.md#18): done, not failed.
                self._finish(t, "sent", "no-last-ack", "no ACK for the last block", logging.INFO)
            else:
                said = "no ACK" if t.heard else "no answer to the first packet"
                why = f"{said} for {span(now - t.heard_at)}"
                self._vanished(t, "timeout", f"{why} ([tftp] idle_timeout)" if idle else why)
            return
        t.resends += 1
        log.debug(
            "%s:%d: no ACK after block %d of %s in %g s; resending (%d of %d)",
            *t.client,
            t.acked,
            t.path,
            t.timeout,
            t.resends,
            RESENDS,
        )
        if t.acked < 0:
            self._send_oack(t)
        else:
            t.sent = t.acked  # the whole window again, from the first unacknowledged block
            t.valid = 0
            self._send_window(t, now)
        if not t.done:
            self._arm(t)

    def _peer_error(self, transfer: Transfer, code: int, message: str) -> None:
        said = f"ERROR {code}{f' ({message})' if message else ''}"
        if transfer.acked < 0 and "tsize" in transfer.options:
            # EDK2 asks with tsize=0 only to learn the size, aborts our OACK with ERROR 8 and
            # asks again (docs/firmware-quirks.md#17, pin/tftp#125, EDK2 PxeBcMtftp.c): normal.
            reason = f"it sent {said} once it knew the size, as UEFI firmware does"
            self._finish(transfer, "aborted", "size-probe", reason, logging.DEBUG)
        else:
            self._finish(transfer, "aborted", "peer-error", f"the client sent {said}", logging.INFO)

    def _vanished(self, transfer: Transfer, reason: str, why: str) -> None:
        detail = f"the client went away: {why}"
        self._finish(transfer, "aborted", reason, detail, logging.WARNING)

    def _finish(
        self,
        transfer: Transfer,
        kind: EventKind,
        reason: str,
        detail: str,
        level: int,
    ) -> None:
        if transfer.done:
            return
        transfer.done = True
        if self._transfers.get(transfer.client) is transfer:
            del self._transfers[transfer.client]
            self._admission.ended(transfer.client)
        if transfer.timer is not None:
            transfer.timer.cancel()
            transfer.timer = None
        if transfer.lent:
            # Only abort_all ends a lent transfer, after recalling it; one that did not come
            # back keeps its socket and file, which its thread may still use.
            log.error("TFTP: the transfer of %s did not come back from its thread", transfer.path)
        try:
            for sock, table in ((transfer.sock, self._by_fd), (transfer.stray, self._strays)):
                fd = sock.fileno()
                if table.get(fd) is transfer:
                    del table[fd]
                    if self._epoll is not None:
                        self._epoll.unregister(fd)
        finally:
            # Whatever happened, no socket or file stays open (unless a thread has them).
            transfer.stray.close()
            if not transfer.lent:
                transfer.sock.close()
                transfer.source.close()
        acked = transfer.bytes_acked
        self.stats[kind] += 1
        self.stats["bytes"] += acked
        event = TftpEvent(
            kind,
            *transfer.client,
            transfer.path,
            transfer.source.size,
            reason,
            detail,
            # Sent: every block went out, even when the last ACK did not come (quirk #18).
            bytes=transfer.source.size if kind == "sent" else acked,
            seconds=self._now() - transfer.started,
            blksize=transfer.blksize,
        )
        # Half-open transfers are what a forged request makes: counted apart, so a flood of
        # them (even ended by a stop) neither storms the log nor silences a real client's.
        key = reason if transfer.heard else f"{reason}:half-open"
        left_out = self._quota(kind, key)
        log_finished(event, self._who(transfer.client[0], left_out), level, left_out)
        self._outbox.emit(event, key)

    def _evict(self, transfer: Transfer, why: str) -> None:
        """End a half-open transfer to make room (limits.Admission); its client, if it is
        one, is told "server busy" and may ask again."""
        self.stats["evicted"] += 1
        with contextlib.suppress(OSError):
            transfer.sock.send(error_packet(ERR_UNDEFINED, BUSY))
        detail = f"ended to make room: {why}; it had acknowledged nothing"
        self._finish(transfer, "aborted", "evicted", detail, logging.INFO)

    def abort_all(self) -> None:
        """End every transfer under way, each client told so (RFC 1350: an ERROR ends a
        transfer; code 0, STOPPING), and hand every outcome to `on_event` before returning:
        the agent closes its store right after."""
        for transfer in list(self._transfers.values()):
            with contextlib.suppress(OSError):
                transfer.sock.send(error_packet(ERR_UNDEFINED, STOPPING))
            self._finish(
                transfer, "aborted", "stopping", "the TFTP server is stopping", logging.INFO
            )
        self._outbox.deliver()
