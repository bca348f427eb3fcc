"""The TFTP engine: the request port, and what a request becomes, on the agent's asyncio loop.

It knows no files, as pixiecore's TFTP engine knows only a handler: a `Handler` (tftp.files)
turns a requested name into a `Source`, an open file descriptor and its size, or raises
Refused / NotFound; the transfer itself is tftp.transfers', the sockets tftp.sockets'.
Read-only: an upload is refused.

RFC 1350 with option negotiation (RFC 2347): blksize (RFC 2348), tsize and timeout (RFC 2349)
and windowsize (RFC 7440, only when the client asks; EDK2 does, tftp-hpa and iPXE do not).
What a request may cost is tftp.limits': a request beyond a limit ends a half-open transfer or
is told "server busy".
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections.abc import Callable
from typing import Protocol

from pixiebox.net.paths import printable
from pixiebox.tftp.lent import LendingTransfers
from pixiebox.tftp.limits import Full, TftpLimits
from pixiebox.tftp.outcome import TftpEvent, log_busy, log_not_found, log_refused
from pixiebox.tftp.packets import (
    BUSY,
    ERR_ACCESS,
    ERR_ILLEGAL,
    ERR_NOT_FOUND,
    ERR_UNDEFINED,
    WRQ,
    Refused,
    parse_request,
)
from pixiebox.tftp.sockets import PKTINFO, open_listener, pktinfo_local_ip
from pixiebox.tftp.transfers import Source

log = logging.getLogger("pixiebox.tftp")

TFTP_PORT = 69


class NotFound(Exception):
    """No file by the requested name: `path` as normalised, the places `looked` in, and why
    that is normal (`expected`) when firmware asks for it only in case it exists."""

    def __init__(self, path: str, looked: list[str], expected: str | None = None) -> None:
        super().__init__(", ".join(looked))
        self.path = path
        self.looked = looked
        self.expected = expected


class Handler(Protocol):
    """What the engine asks for the file behind a request."""

    #: The places files come from, for the log line when serving starts.
    where: str

    def open(self, name: str, client_ip: str) -> tuple[str, Source]:
        """(`name` as a path relative to the root, the open file), or Refused / NotFound."""
        ...


class TftpEngine(LendingTransfers):
    """Serves what `handler` opens, read-only over TFTP, until `close()`.

    Everything runs on the event loop that ran `start()`: `on_event` is called there, once per
    request outcome, and `close()` must be called there too. `limits`: [tftp] in lab.toml."""

    def __init__(
        self,
        handler: Handler,
        *,
        listen_ip: str = "0.0.0.0",
        port: int = TFTP_PORT,
        interface: str | None = None,
        on_event: Callable[[TftpEvent], None] | None = None,
        describe: Callable[[str], str] = str,
        limits: TftpLimits | None = None,
    ) -> None:
        super().__init__(
            interface=interface,
            on_event=on_event,
            describe=describe,
            limits=limits or TftpLimits(),
        )
        self.handler = handler
        self.listen_ip = listen_ip
        self.port = port
        self._sock: socket.socket | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket and start serving; returns once requests are being received."""
        if self._closed or self._loop is not None:
            raise RuntimeError("a TFTP server starts once and cannot restart after close()")
        self._sock = open_listener(self.listen_ip, self.port, self.interface)
        self.port = self._sock.getsockname()[1]
        self._loop = self._outbox.loop = loop = asyncio.get_running_loop()
        self._now = loop.time  # the clock of loop.call_at, which runs the resend timers
        try:
            self._epoll = select.epoll()
            loop.add_reader(self._epoll.fileno(), self._pump)
            loop.add_reader(self._sock.fileno(), self._on_request)
        except BaseException:
            self._closed = True
            self._release()
            raise
        log.info(
            "TFTP listening on %s:%d%s, read-only, serving %s",
            self.listen_ip,
            self.port,
            f" ({self.interface})" if self.interface else "",
            self.handler.where,
        )

    def close(self) -> None:
        """Stop serving: no request is read any more, every transfer under way is ended with an
        ERROR to its client (abort_all) and its outcome handed to `on_event` before this
        returns, and every socket and file is closed."""
        if self._closed:
            return
        self._closed = True
        if self._sock is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())  # no new transfer from here on
        try:
            self.abort_all()
        finally:
            self._release()

    async def aclose(self) -> None:
        """close(), for the agent's shutdown (contextlib.AsyncExitStack.push_async_callback):
        the agent awaits it before it closes the store that the final events go to."""
        self.close()

    def _release(self) -> None:
        loop = self._loop if self._loop is not None and not self._loop.is_closed() else None
        if self._sock is not None:
            if loop is not None:
                loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._epoll is not None:
            if loop is not None:
                loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    # -- requests --------------------------------------------------------------------

    def _on_request(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(64):  # bounded, so transfers under way get their turn
            try:
                data, ancdata, _, (ip, port) = sock.recvmsg(2048, socket.CMSG_SPACE(PKTINFO.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("TFTP request socket: %s", exc)
                return
            try:
                self._request(data, ip, port, pktinfo_local_ip(ancdata) or self.listen_ip)
            except Exception:
                # Whatever one request does, the other machines keep booting.
                self.stats["internal_error"] += 1
                log.exception("TFTP internal error on a request from %s; serving on", ip)

    def _request(self, data: bytes, ip: str, port: int, local_ip: str) -> None:
        existing = self._transfers.get((ip, port))
        if existing is not None:
            # Its transfer may have ended already, with the packet saying so still queued
            # (EDK2's ERROR 8 before it asks again from the same port: docs/firmware-quirks.md#17).
            for _ in range(4):
                if existing.done:
                    break
                self._on_readable(existing, self._now())
            if not existing.done:
                log.debug("%s:%d repeated its request; its transfer answers it", ip, port)
                return
        try:
            opcode, raw_name, mode, options = parse_request(data)
        except ValueError as exc:
            self.stats["malformed"] += 1
            log.debug("malformed TFTP request from %s:%d (%d bytes): %s", ip, port, len(data), exc)
            return
        shown = printable(raw_name)
        if opcode == WRQ:
            read_only = Refused(ERR_ACCESS, "this boot server is read-only", reason="read-only")
            self._refuse(ip, port, local_ip, shown, read_only, upload=True)
            return
        if mode == "mail":  # RFC 1350's third mode, obsolete
            mail = Refused(ERR_ILLEGAL, "mail mode is not served", reason="mail-mode")
            self._refuse(ip, port, local_ip, shown, mail)
            return
        try:
            # Before the file is opened: a flood beyond the limits costs no open() each.
            victim = self._admission.make_room(ip)
        except Full as full:
            self._busy(ip, port, local_ip, shown, full)
            return
        try:
            path, source = self.handler.open(raw_name, ip)
        except Refused as refused:
            self._refuse(ip, port, local_ip, shown, refused)
            return
        except NotFound as missing:
            self._not_found(ip, port, local_ip, missing)
            return
        try:
            if victim is not None:
                limit = "its address's" if victim[0] == ip else "the server's"
                self._evict(self._transfers[victim], f"{limit} transfers were at their limit")
            self._begin(ip, port, local_ip, printable(path), source, options)
        except BaseException:
            source.close()
            raise

    def _refuse(
        self,
        ip: str,
        port: int,
        local_ip: str,
        path: str,
        refused: Refused,
        *,
        upload: bool = False,
    ) -> None:
        self.stats["refused"] += 1
        code = refused.code
        # Only the code's fixed words (packets.CLIENT_TEXT): the reason stays in the log line
        # and the event, never in the packet.
        self._send_error(ip, port, local_ip, code)
        event = TftpEvent("refused", ip, port, path, None, refused.reason, refused.why)
        left_out = self._quota("refused", refused.reason)
        log_refused(event, self._who(ip, left_out), code, upload=upload, left_out=left_out)
        self._outbox.emit(event)

    def _busy(self, ip: str, port: int, local_ip: str, path: str, full: Full) -> None:
        """A limit is reached and no half-open transfer may end for this request: ERROR 0
        "server busy" (it asks again, as firmware does after an error)."""
        self.stats["busy"] += 1
        self._send_error(ip, port, local_ip, ERR_UNDEFINED, BUSY)
        event = TftpEvent("refused", ip, port, path, None, "busy", full.why)
        left_out = self._quota("refused", "busy")
        log_busy(event, self._who(ip, left_out), left_out)
        self._outbox.emit(event)

    def _not_found(self, ip: str, port: int, local_ip: str, missing: NotFound) -> None:
        self.stats["not_found"] += 1
        self._send_error(ip, port, local_ip, ERR_NOT_FOUND)
        path = printable(missing.path)
        if missing.expected is not None:
            event = TftpEvent("not_found", ip, port, path, None, "expected-miss", missing.expected)
        else:
            where = ", ".join(missing.looked)
            event = TftpEvent("not_found", ip, port, path, None, "not-found", f"not in {where}")
        left_out = self._quota("not_found", event.reason)
        log_not_found(event, self._who(ip, left_out), missing.looked, left_out)
        self._outbox.emit(event)
