"""TFTP for boot files: read-only, rooted, on the agent's asyncio loop.

RFC 1350 with option negotiation (RFC 2347): blksize (RFC 2348), tsize and timeout (RFC 2349)
and windowsize (RFC 7440, only when the client asks; EDK2 does, tftp-hpa and iPXE do not).

Why not a library: tftpy 0.8.7 (used here before) builds packet objects, re-parses options and
goes through a state object for every block. Measured over veth on a 2-core machine it took
1.5x tftpd-hpa's time for one 1 MiB download and 2.8x with 20 at once, and moved 0.44x
dnsmasq's MiB/s to 20 clients; its own `listen()` also died on one malformed request. A lab
boots all at once, so the hot path is written out here, small: DATA is a header packed in front
of a block already read ahead (one os.preadv per 64 KiB) and one send; an ACK is four bytes read
into a reused buffer; resend timeouts are one lazily re-armed timer per transfer, not one per
packet; and all transfer sockets sit in one epoll set of their own that the event loop watches
as a single file (see _pump).

Every transfer has its own port (RFC 1350 section 4: the server's TID) with two sockets on it:
one connect()ed to the client, which carries the transfer with plain send/recv (no address to
build or parse per packet, a cached route, ICMP "port unreachable" from a client that went away
reported as ECONNREFUSED), and one unconnected beside it (SO_REUSEPORT), to which the kernel
hands only datagrams from anyone else: RFC 1350 wants those answered with ERROR 5 while the
transfer goes on, and a connected socket alone would never see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from pixiebox.tftp.packets import (
    ACK,
    DATA,
    DEFAULT_BLKSIZE,
    ERR_ACCESS,
    ERR_ILLEGAL,
    ERR_NOT_FOUND,
    ERR_UNDEFINED,
    ERR_UNKNOWN_TID,
    ERROR,
    WRQ,
    Refused,
    error_packet,
    negotiate,
    normalise,
    oack_packet,
    parse_reply,
    parse_request,
    printable,
)

log = logging.getLogger("pixiebox.tftp")

TFTP_PORT = 69

#: Seconds before unacknowledged DATA is sent again; a client may ask for another (RFC 2349).
RESEND_AFTER = 1.0
#: Unanswered resends before a transfer is given up.
RESENDS = 5

# Linux constants Python 3.11's socket module lacks (linux/in.h).
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IP_MTU = getattr(socket, "IP_MTU", 14)
_PKTINFO = struct.Struct("=i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_U16 = struct.Struct("!H")
_DATA_HEADER = struct.Struct("!HH")
#: Bytes read ahead per transfer with one os.preadv (at least one block).
_READ_AHEAD = 64 * 1024
#: Transfer sockets handled per epoll_wait, and the longest the loop is kept before DHCP and
#: HTTP on the same loop get their turn.
_BATCH = 64
_PUMP_SECONDS = 0.005
#: Bytes read from a client per datagram: an ACK is 4, an ERROR carries a message; the rest of
#: a longer datagram is dropped by the kernel, which is fine for both.
_INBUF = 516

# Files firmware asks for first and is fine without: answered "not found" at once and logged at
# debug level. iPXE tries autoexec.ipxe (FIRMWARE-QUIRKS #25, tinkerbell/tinkerbell#424); the
# Raspberry Pi 3 ROM needs "file not found" for bootsig.bin (#27, raspberrypi/documentation
# boot-net.adoc), possibly under its <serial>/ prefix.
_EXPECTED_MISSING = {
    "autoexec.ipxe": "iPXE looks for it before running its own script (FIRMWARE-QUIRKS #25)",
    "bootsig.bin": "the Raspberry Pi ROM expects 'file not found' for it (FIRMWARE-QUIRKS #27)",
}

EventKind = Literal["sent", "aborted", "refused", "not_found"]


@dataclass(frozen=True)
class TftpEvent:
    """The outcome of one request, for the agent's event log.

    `path` is the requested name relative to the root (after `\\` → `/` and dropping a leading
    `/`), or the name as sent when it could not be made one. `size` is the file's size when it
    was found."""

    kind: EventKind
    client_ip: str
    client_port: int
    path: str
    size: int | None
    reason: str


class _NotFound(Exception):
    def __init__(self, looked: list[str]) -> None:
        super().__init__(", ".join(looked))
        self.looked = looked


@dataclass
class _Source:
    """An opened file, read with os.preadv (never a Python file object and its buffer copies);
    generated content is put in a memfd so it is read the same way."""

    fd: int | None
    size: int
    where: str

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Sockets(NamedTuple):
    sock: socket.socket
    stray: socket.socket
    mtu: int | None


@dataclass(slots=True, eq=False)
class _Transfer:
    """One read transfer. Blocks are counted from 1 without wrapping; only the wire number is
    taken modulo 2**16 (RFC 1350 has 16 bits; like tftpd-hpa and dnsmasq it wraps to 0, which
    every client we know accepts). Block 0 stands for the OACK, acknowledged with ACK 0."""

    sock: socket.socket  # connected to the client
    stray: socket.socket  # the same port, unconnected: gets datagrams from anyone else
    client: tuple[str, int]
    source: _Source
    path: str
    options: dict[str, str]  # as the client asked
    oack: bytes | None
    blksize: int
    window: int
    timeout: float
    started: float
    blocks: int  # the last block is shorter than blksize, possibly empty (RFC 1350 section 6)
    # Read-ahead: `chunk` blocks read with one os.preadv into buf[4:]. Block `first + i` starts
    # at buf[4 + i * blksize], and its DATA header goes in the 4 bytes before it, over the end
    # of block `first + i - 1`, which by then has been sent (a resend reads afresh).
    buf: memoryview
    chunk: int
    first: int = 0
    valid: int = 0  # blocks in buf from `first` on; 0 when it must be read again
    inbuf: bytearray = field(default_factory=lambda: bytearray(_INBUF))
    acked: int = -1  # the highest block the client acknowledged
    sent: int = 0  # the highest block sent since the last (re)start of the window
    deadline: float = 0.0
    timer: asyncio.TimerHandle | None = None
    resends: int = 0
    rewound: int = -1  # the last block a repeated ACK restarted the window after
    done: bool = False

    @property
    def bytes_acked(self) -> int:
        return min(self.source.size, max(0, self.acked) * self.blksize)


# --------------------------------------------------------------------------- requests


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{round(size / 1024)} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def next_step(path: str) -> str:
    """What a client does after fetching `path`, for the log line of a finished transfer."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith((".kpxe", ".kkpxe", ".pxe")) or (
        name.endswith(".efi") and ("ipxe" in name or name.startswith("snp"))
    ):
        return "next it should ask DHCP again as iPXE"
    if name == "pxelinux.0":
        return "next it should fetch its pxelinux.cfg file"
    if path.lower().startswith("pxelinux.cfg/"):
        return "next it should fetch the kernel and initrd the file names"
    return "next the client runs or reads it"


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _pktinfo_local_ip(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    """The local address a request was sent to (ip(7) IP_PKTINFO ipi_spec_dst).

    Replies must come from it: a client checks that the answer comes from the server it asked,
    and an appliance may have several addresses on the lab interface."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= _PKTINFO.size:
            _, spec_dst, _ = _PKTINFO.unpack_from(data)
            return socket.inet_ntoa(spec_dst)
    return None


def _only_last_ack_missing(transfer: _Transfer) -> bool:
    """Every block went out and only the ACK of the last window is missing."""
    return transfer.sent >= transfer.blocks and transfer.acked >= transfer.blocks - transfer.window


def _generated(content: bytes) -> _Source:
    fd = os.memfd_create("pixiebox-tftp", os.MFD_CLOEXEC)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return _Source(fd, len(content), "generated")


# --------------------------------------------------------------------------- server


class TftpServer:
    """Serves `root` (and `fallback_dirs`) read-only over TFTP until `close()`.

    `fallback_dirs`: (prefix, directory) pairs searched in order when a file is not under
    `root`; a request "ipxe/undionly.kpxe" or "undionly.kpxe" finds directory/undionly.kpxe for
    ("ipxe/", directory). `generate(path, client_ip)` may return the content of a file that is on
    no disk (U-Boot's pxelinux.cfg/01-<mac>), or None. Everything runs on the event loop that ran
    `start()`: `on_event` is called there, once per request outcome, and `close()` must be
    called there too."""

    def __init__(
        self,
        root: Path,
        *,
        listen_ip: str = "0.0.0.0",
        port: int = TFTP_PORT,
        interface: str | None = None,
        fallback_dirs: Sequence[tuple[str, Path]] = (),
        on_event: Callable[[TftpEvent], None] | None = None,
        generate: Callable[[str, str], bytes | None] | None = None,
        describe: Callable[[str], str] = str,
    ) -> None:
        self.root = Path(root)
        # Names the client in log lines ("c1 (f4:4d:…, 10.0.0.5)" rather than a bare address).
        self.describe = describe
        self.listen_ip = listen_ip
        self.port = port
        self.interface = interface
        self.fallback_dirs = [(prefix, Path(directory)) for prefix, directory in fallback_dirs]
        self.on_event = on_event
        self.generate = generate
        self.stats: Counter[str] = Counter()
        self._transfers: dict[tuple[str, int], _Transfer] = {}
        # Transfer sockets sit in an epoll set of their own, which the event loop watches as one
        # file: one wake-up then serves every transfer with an ACK waiting, instead of the
        # loop's selector bookkeeping and a callback handle per socket.
        self._epoll: select.epoll | None = None
        self._by_fd: dict[int, _Transfer] = {}
        self._strays: dict[int, _Transfer] = {}
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._now: Callable[[], float] = time.monotonic
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket and start serving; returns once requests are being received."""
        if self._closed or self._loop is not None:
            raise RuntimeError("a TftpServer starts once and cannot restart after close()")
        if not self.root.is_dir():
            raise FileNotFoundError(f"TFTP root {self.root} is not a directory")
        self._sock = self._open_listener()
        self.port = self._sock.getsockname()[1]
        self._loop = loop = asyncio.get_running_loop()
        self._now = loop.time  # the clock of loop.call_at, which runs the resend timers
        try:
            self._epoll = select.epoll()
            loop.add_reader(self._epoll.fileno(), self._pump)
            loop.add_reader(self._sock.fileno(), self._on_request)
        except BaseException:
            self._closed = True
            self._release()
            raise
        where = [str(self.root), *(f"{d} (as {p or '/'})" for p, d in self.fallback_dirs)]
        log.info(
            "TFTP listening on %s:%d%s, read-only, serving %s",
            self.listen_ip,
            self.port,
            f" ({self.interface})" if self.interface else "",
            ", then ".join(where),
        )

    def close(self) -> None:
        """Stop serving: transfers under way are ended, every socket and file is closed."""
        if self._closed:
            return
        self._closed = True
        for transfer in list(self._transfers.values()):
            self._finish(transfer, "aborted", "the TFTP server is stopping", logging.INFO)
        self._release()

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

    def _open_listener(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            if self.interface:
                # Only machines on the lab interface may fetch boot files.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            # No SO_REUSEADDR: with another TFTP server (tftpd-hpa, dnsmasq) on the port, fail
            # here instead of sharing the port and losing half the requests to it.
            sock.bind((self.listen_ip, self.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            hint = (
                " (another TFTP server, e.g. tftpd-hpa or dnsmasq, is running?)"
                if exc.errno == 98  # EADDRINUSE
                else ""
            )
            raise OSError(
                exc.errno, f"TFTP cannot listen on {self.listen_ip}:{self.port}: {exc}{hint}"
            ) from exc
        return sock

    # -- requests --------------------------------------------------------------------

    def _on_request(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(64):  # bounded, so transfers under way get their turn
            try:
                data, ancdata, _, (ip, port) = sock.recvmsg(2048, socket.CMSG_SPACE(_PKTINFO.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("TFTP request socket: %s", exc)
                return
            try:
                self._request(data, ip, port, _pktinfo_local_ip(ancdata) or self.listen_ip)
            except Exception:
                # Whatever one request does, the other machines keep booting.
                self.stats["internal_error"] += 1
                log.exception("TFTP internal error on a request from %s; serving on", ip)

    def _request(self, data: bytes, ip: str, port: int, local_ip: str) -> None:
        existing = self._transfers.get((ip, port))
        if existing is not None:
            # Its transfer may have ended already, with the packet saying so still queued
            # (EDK2's ERROR 8 before it asks again from the same port: FIRMWARE-QUIRKS #17).
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
            why = "this boot server is read-only"
            self._refuse(ip, port, local_ip, shown, ERR_ACCESS, why, upload=True)
            return
        if mode == "mail":  # RFC 1350's third mode, obsolete
            self._refuse(ip, port, local_ip, shown, ERR_ILLEGAL, "mail mode is not served")
            return
        try:
            path = normalise(raw_name)
            source = self._lookup(path, ip)
        except Refused as refused:
            self._refuse(ip, port, local_ip, shown, refused.code, refused.why)
            return
        except _NotFound as missing:
            self._not_found(ip, port, local_ip, printable(path), missing.looked)
            return
        try:
            self._begin(ip, port, local_ip, printable(path), source, options)
        except BaseException:
            source.close()
            raise

    def _lookup(self, path: str, client_ip: str) -> _Source:
        """Open `path` under the root, else a fallback directory, else generate it."""
        looked: list[str] = []
        for base, relative in self._candidates(path):
            follow = not _inside(os.path.realpath(base), os.path.realpath(self.root))
            source = self._open(base, relative, follow_links=follow)
            if source is not None:
                return source
            looked.append(printable(str(base / relative)))
        if self.generate is not None:
            content = self.generate(path, client_ip)
            if content is not None:
                return _generated(content)
            looked.append("generated files")
        raise _NotFound(looked)

    def _candidates(self, path: str) -> list[tuple[Path, str]]:
        candidates = [(self.root, path)]
        for prefix, directory in self.fallback_dirs:
            stripped = prefix.strip("/")
            if stripped and path.startswith(stripped + "/"):
                candidates.append((directory, path[len(stripped) + 1 :]))
            else:
                candidates.append((directory, path))
        return candidates

    @staticmethod
    def _open(base: Path, relative: str, *, follow_links: bool = False) -> _Source | None:
        """The file `relative` under `base`, None if absent, Refused if it leads elsewhere.

        realpath before opening catches a symlink leaving `base` even when its target is
        missing; /proc/self/fd after opening names the file actually opened, so a link swapped
        in between is caught too.

        Fallback directories are system package directories that only root can write to, and
        Debian's ipxe package itself links /usr/lib/ipxe/ipxe.efi to /boot/ipxe.efi: there the
        links are followed (`follow_links`), and only the requested name must stay inside."""
        full = base / relative
        shown = printable(str(full))
        base_real = os.path.realpath(base)
        real = (
            os.path.normpath(os.path.join(base_real, relative))
            if follow_links
            else (os.path.realpath(full))
        )
        if not _inside(real, base_real):
            raise Refused(ERR_ACCESS, f"{shown} leads outside {base} (to {printable(real)})")
        try:
            # O_NONBLOCK: a FIFO planted in the root must not hang the server on open.
            fd = os.open(full, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError:
            raise Refused(ERR_ACCESS, f"{shown} is not readable") from None
        except OSError as exc:
            raise Refused(ERR_ACCESS, f"{shown} cannot be opened: {exc.strerror}") from None
        try:
            with contextlib.suppress(FileNotFoundError):  # no /proc: the realpath check stands
                opened = os.readlink(f"/proc/self/fd/{fd}")
                if not follow_links and not _inside(opened, base_real):
                    raise Refused(
                        ERR_ACCESS, f"{shown} leads outside {base} (to {printable(opened)})"
                    )
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise Refused(ERR_ACCESS, f"{shown} is not a regular file")
            # A regular file never blocks; os.preadv reads it at an offset, so one fd serves a
            # transfer without a Python file object and its buffer copies.
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return _Source(fd, info.st_size, shown)

    def _reply_socket(self, local_ip: str) -> socket.socket:
        """A socket for one client: a new port (RFC 1350 TID) on the address it asked."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            if self.interface:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
            sock.bind((local_ip, 0))
        except OSError:
            sock.close()
            raise
        return sock

    def _transfer_sockets(self, local_ip: str, client: tuple[str, int]) -> _Sockets:
        """The connected socket of a transfer, its stray catcher on the same port, and the
        route's MTU towards the client (IP_MTU needs a connected socket)."""
        sock = self._reply_socket(local_ip)  # bound without SO_REUSEPORT: a port nobody has
        try:
            # Only now may a second socket share the port, and only one of this user's.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.connect(client)
            sock.setblocking(False)
            mtu: int | None = sock.getsockopt(socket.IPPROTO_IP, _IP_MTU)
            stray = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        except BaseException:
            sock.close()
            raise
        try:
            stray.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if self.interface:
                stray.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
            stray.bind(sock.getsockname())
            stray.setblocking(False)
        except BaseException:
            stray.close()
            sock.close()
            raise
        return _Sockets(sock, stray, mtu)

    def _send_error(self, ip: str, port: int, local_ip: str, code: int, message: str) -> None:
        try:
            with self._reply_socket(local_ip) as sock:
                sock.sendto(error_packet(code, message), (ip, port))
        except OSError as exc:
            log.debug("TFTP error to %s:%d not sent: %s", ip, port, exc)

    def _refuse(
        self,
        ip: str,
        port: int,
        local_ip: str,
        path: str,
        code: int,
        why: str,
        *,
        upload: bool = False,
    ) -> None:
        self.stats["refused"] += 1
        text = f"Access violation: {why}" if code == ERR_ACCESS else f"Illegal operation: {why}"
        self._send_error(ip, port, local_ip, code, text)
        action = "tried to upload" if upload else "asked for"
        log.warning(
            "%s %s %s over TFTP: refused, %s; it got ERROR %d",
            self.describe(ip),
            action,
            path,
            why,
            code,
        )
        self._emit(TftpEvent("refused", ip, port, path, None, why))

    def _not_found(self, ip: str, port: int, local_ip: str, path: str, looked: list[str]) -> None:
        self.stats["not_found"] += 1
        self._send_error(ip, port, local_ip, ERR_NOT_FOUND, "File not found")
        expected = _EXPECTED_MISSING.get(path.rsplit("/", 1)[-1].lower())
        if expected is not None:
            log.debug("%s asked for %s over TFTP: none here, normal: %s", ip, path, expected)
            self._emit(TftpEvent("not_found", ip, port, path, None, expected))
            return
        where = ", ".join(looked)
        log.warning(
            "%s asked for %s over TFTP: not found (looked in %s); it got 'file not found' and "
            "will try its next boot option or give up",
            self.describe(ip),
            path,
            where,
        )
        self._emit(TftpEvent("not_found", ip, port, path, None, f"not in {where}"))

    # -- transfers -------------------------------------------------------------------

    def _begin(
        self,
        ip: str,
        port: int,
        local_ip: str,
        path: str,
        source: _Source,
        requested: dict[str, str],
    ) -> None:
        loop = self._loop
        epoll = self._epoll
        assert loop is not None and epoll is not None
        try:
            sockets = self._transfer_sockets(local_ip, (ip, port))
        except OSError as exc:
            source.close()
            log.warning("%s asked for %s over TFTP: cannot answer it: %s", ip, path, exc)
            self._send_error(ip, port, local_ip, ERR_UNDEFINED, "server error")
            self._emit(TftpEvent("aborted", ip, port, path, source.size, f"socket error: {exc}"))
            return
        sock, stray = sockets.sock, sockets.stray
        accepted, timeout = negotiate(requested, source.size, sockets.mtu)
        blksize = int(accepted.get("blksize", DEFAULT_BLKSIZE))
        chunk = max(1, _READ_AHEAD // blksize)
        transfer = _Transfer(
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
            started=self._now(),
            blocks=source.size // blksize + 1,
            buf=memoryview(bytearray(4 + chunk * blksize)),
            chunk=chunk,
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
        log.debug(
            "%s:%d asked for %s (%s, from %s); options asked %s, acknowledged %s",
            ip,
            port,
            path,
            human_size(source.size),
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
            transfer.timer = loop.call_at(transfer.deadline, self._on_timer, transfer)

    def _send_oack(self, transfer: _Transfer) -> None:
        assert transfer.oack is not None and self._loop is not None
        transfer.deadline = self._now() + transfer.timeout
        try:
            transfer.sock.send(transfer.oack)
        except BlockingIOError:
            pass  # as if lost: the timer sends it again
        except OSError as exc:
            self._socket_error(transfer, exc)

    def _send_window(self, transfer: _Transfer, now: float) -> None:
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

    def _read_ahead(self, transfer: _Transfer, block: int) -> bool:
        """Read up to `chunk` blocks from `block` on into the buffer; False if the transfer
        ended instead."""
        t = transfer
        offset = (block - 1) * t.blksize
        wanted = max(0, min(t.chunk * t.blksize, t.source.size - offset))
        assert t.source.fd is not None
        try:
            got = os.preadv(t.source.fd, [t.buf[4 : 4 + wanted]], offset) if wanted else 0
        except OSError as exc:
            self._finish(t, "aborted", f"reading the file failed: {exc}", logging.WARNING)
            return False
        if got < wanted:
            # The file shrank while being sent (replaced in place): end with what is there,
            # as tftpd-hpa does; the client sees a short file, not a hang.
            log.warning("%s shrank while being sent over TFTP; sent as it is", t.path)
            t.source.size = offset + got
            t.blocks = t.source.size // t.blksize + 1
        t.first = block
        t.valid = min(t.chunk, t.blocks - block + 1)
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
                    self._finish(transfer, "aborted", "internal error", logging.ERROR)
            if self._epoll is None:
                return

    def _on_readable(self, transfer: _Transfer, now: float) -> None:
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
        data = t.inbuf
        if n >= 4 and data[1] == ACK and data[0] == 0:
            # Which of the blocks in flight it acknowledges; anything else (a duplicate, or
            # an ACK from before a rewind) is ignored.
            ahead = ((data[2] << 8 | data[3]) - t.acked) & 0xFFFF
            if 0 < ahead <= t.sent - t.acked:
                t.acked += ahead
                t.resends = 0
                if t.acked >= t.blocks:
                    self._finish(t, "sent", "", logging.INFO)
                    return
                block = t.acked + 1
                slot = block - t.first
                if t.sent == t.acked and t.window == 1 and 0 <= slot < t.valid:
                    # Lockstep with the block already read ahead: _send_window written out,
                    # for what nearly every packet of a transfer takes.
                    start = slot * t.blksize
                    _DATA_HEADER.pack_into(t.buf, start, DATA, block & 0xFFFF)
                    size = min(t.blksize, t.source.size - t.acked * t.blksize)
                    t.deadline = now + t.timeout
                    try:
                        t.sock.send(t.buf[start : start + 4 + size])
                    except BlockingIOError:
                        return  # as if lost: the timer sends it again
                    except OSError as exc:
                        self._socket_error(t, exc)
                        return
                    t.sent = block
                    return
                if t.sent != t.acked:
                    # RFC 7440 section 4: an ACK short of the window's end means the blocks
                    # after it were lost; the next window starts right after it.
                    t.sent = t.acked
                    t.valid = 0  # their headers overwrote the read-ahead: read it again
                self._send_window(t, now)
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

    def _on_stray(self, transfer: _Transfer) -> None:
        """RFC 1350 section 4: a packet from another TID is answered with ERROR 5 and does not
        disturb the transfer."""
        try:
            _, source = transfer.stray.recvfrom(_INBUF)
        except OSError:  # nothing after all, or an ICMP error about an earlier ERROR 5
            return
        log.debug(
            "a packet from %s:%d reached the transfer of %s to %s:%d; it got ERROR 5",
            *source,
            transfer.path,
            *transfer.client,
        )
        with contextlib.suppress(OSError):
            transfer.stray.sendto(error_packet(ERR_UNKNOWN_TID, "Unknown transfer ID"), source)

    def _socket_error(self, transfer: _Transfer, exc: OSError) -> None:
        """A send or receive failed: on the connected socket that is about the client."""
        if isinstance(exc, ConnectionRefusedError):
            if _only_last_ack_missing(transfer):
                # FIRMWARE-QUIRKS #18 again: it took the last block without a word and left.
                reason = "no ACK for the last block; the client has closed its port"
                self._finish(transfer, "sent", reason, logging.INFO)
                return
            self._vanished(transfer, "its port is closed (ICMP port unreachable)")
        else:
            self._vanished(transfer, f"the socket failed: {exc.strerror or exc}")

    def _on_timer(self, transfer: _Transfer) -> None:
        """Runs at the transfer's deadline, which each send pushes back: one timer per
        transfer, re-armed here rather than replaced on every packet."""
        t = transfer
        t.timer = None
        loop = self._loop
        if t.done or loop is None:
            return
        if self._now() < t.deadline:
            t.timer = loop.call_at(t.deadline, self._on_timer, t)
            return
        if t.resends >= RESENDS:
            if _only_last_ack_missing(t):
                # Every block went out; the ACK of the last one never came. Windows clients
                # never send it (FIRMWARE-QUIRKS #18): done, not failed.
                self._finish(t, "sent", "no ACK for the last block", logging.INFO)
            else:
                waited = t.timeout * (RESENDS + 1)
                self._vanished(t, f"no ACK for {waited:g} s")
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
            self._send_window(t, self._now())
        if not t.done:
            t.timer = loop.call_at(t.deadline, self._on_timer, t)

    def _peer_error(self, transfer: _Transfer, code: int, message: str) -> None:
        said = f"ERROR {code}{f' ({message})' if message else ''}"
        if transfer.acked < 0 and "tsize" in transfer.options:
            # EDK2 asks with tsize=0 only to learn the size, aborts our OACK with ERROR 8 and
            # asks again (FIRMWARE-QUIRKS #17, pin/tftp#125, EDK2 PxeBcMtftp.c): normal.
            reason = f"it sent {said} once it knew the size, as UEFI firmware does"
            self._finish(transfer, "aborted", reason, logging.DEBUG, probe=True)
        else:
            self._finish(transfer, "aborted", f"the client sent {said}", logging.INFO)

    def _vanished(self, transfer: _Transfer, why: str) -> None:
        self._finish(transfer, "aborted", f"the client went away: {why}", logging.WARNING)

    def _finish(
        self, transfer: _Transfer, kind: EventKind, reason: str, level: int, *, probe: bool = False
    ) -> None:
        if transfer.done:
            return
        transfer.done = True
        if self._transfers.get(transfer.client) is transfer:
            del self._transfers[transfer.client]
        if transfer.timer is not None:
            transfer.timer.cancel()
            transfer.timer = None
        try:
            for sock, table in ((transfer.sock, self._by_fd), (transfer.stray, self._strays)):
                fd = sock.fileno()
                if table.get(fd) is transfer:
                    del table[fd]
                    if self._epoll is not None:
                        self._epoll.unregister(fd)
        finally:
            # Whatever happened, no socket or file stays open.
            transfer.sock.close()
            transfer.stray.close()
            transfer.source.close()
        self.stats[kind] += 1
        self.stats["bytes"] += transfer.bytes_acked
        self._log_outcome(transfer, kind, reason, level, probe)
        self._emit(TftpEvent(kind, *transfer.client, transfer.path, transfer.source.size, reason))

    def _log_outcome(
        self, transfer: _Transfer, kind: EventKind, reason: str, level: int, probe: bool
    ) -> None:
        ip = self.describe(transfer.client[0])
        size = human_size(transfer.source.size)
        if kind == "sent":
            assert self._loop is not None
            seconds = self._now() - transfer.started
            note = f" ({reason})" if reason else ""
            log.log(
                level,
                "%s fetched %s (%s) over TFTP in %.1f s%s; %s",
                ip,
                transfer.path,
                size,
                seconds,
                note,
                next_step(transfer.path),
            )
        elif probe:
            log.log(
                level,
                "%s asked for the size of %s (%s) over TFTP: %s (FIRMWARE-QUIRKS #17); it "
                "should ask for the file again",
                ip,
                transfer.path,
                size,
                reason,
            )
        else:
            log.log(
                level,
                "%s stopped fetching %s over TFTP after %s of %s: %s; other transfers carry on, "
                "and the machine starts over if it asks again",
                ip,
                transfer.path,
                human_size(transfer.bytes_acked),
                size,
                reason,
            )

    def _emit(self, event: TftpEvent) -> None:
        loop = self._loop
        if self.on_event is None or loop is None or loop.is_closed():
            return
        # Later, not now: the handler (the agent's event log) stays off the packet path.
        loop.call_soon(self._deliver, event)

    def _deliver(self, event: TftpEvent) -> None:
        assert self.on_event is not None
        try:
            self.on_event(event)
        except Exception:
            log.exception("the TFTP event handler failed on %s", event)
