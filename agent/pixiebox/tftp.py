"""TFTP for boot files: read-only, rooted, on tftpy's transfer engine.

RFC 1350 with option negotiation (RFC 2347): blksize (RFC 2348), tsize and timeout (RFC 2349).

tftpy (pinned in pyproject.toml) does the transfer itself: its per-client context and states
send DATA, take ACKs, ignore duplicate ACKs (no Sorcerer's Apprentice), roll block numbers over
and resend. This module owns everything around a transfer, because tftpy 0.8.7's own
`TftpServer.listen()` cannot be trusted with a lab:

- one RRQ with a non-ASCII file name, or `blksize=abc`, raises out of `listen()` (a
  UnicodeDecodeError or ValueError, not a TftpException) and TFTP is gone for every machine;
- after serving a file-like object from `dyn_file_func`, `TftpContext.end()` unlocks it with
  flock (`TftpServer(flock=False)` is accepted but never passed on to the contexts), which raises
  on a BytesIO and ends `listen()` too (0.8.6: UnsupportedOperation, 0.8.7: AttributeError);
- it accepts uploads into the root, follows symlinks out of it, answers `..` with "illegal
  operation" instead of "access violation", cannot bind to a device, and `stop()` waits out a
  5 s select timeout.

So the sockets, the loop (one thread), request parsing, name resolution and option negotiation
are ours; each accepted read request becomes a tftpy `TftpContextServer` (created with
flock=False) driven by tftpy's `TftpStateExpectACK`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from tftpy.TftpContexts import TftpContextServer  # type: ignore[import-untyped]
from tftpy.TftpPacketFactory import TftpPacketFactory  # type: ignore[import-untyped]
from tftpy.TftpPacketTypes import TftpPacketERR  # type: ignore[import-untyped]
from tftpy.TftpShared import TftpException, TftpTimeoutExpectACK  # type: ignore[import-untyped]
from tftpy.TftpStates import TftpStateExpectACK  # type: ignore[import-untyped]

log = logging.getLogger("pixiebox.tftp")

TFTP_PORT = 69

# RFC 1350 section 5: opcodes and error codes (8 is RFC 2347's "options refused").
RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_ILLEGAL = 0, 1, 2, 4
ERR_OPTIONS = 8

# RFC 2348: a block size is 8..65464 octets; 65464 keeps a DATA packet inside one IPv4 datagram.
MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464
# IPv4 (20) + UDP (8) + TFTP DATA header (4): a block this much under the MTU is never fragmented.
_HEADERS = 32
#: Seconds before a DATA packet is sent again; a client may ask for another (RFC 2349 timeout).
RESEND_AFTER = 1.0
#: Unanswered resends before a transfer is given up.
RESENDS = 5

# Linux constants Python 3.11's socket module lacks (linux/in.h).
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IP_MTU = getattr(socket, "IP_MTU", 14)
_PKTINFO = struct.Struct("=i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr

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


class _Refused(Exception):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code
        self.why = why


class _NotFound(Exception):
    def __init__(self, looked: list[str]) -> None:
        super().__init__(", ".join(looked))
        self.looked = looked


@dataclass
class _Source:
    fileobj: BinaryIO
    size: int
    where: str


@dataclass
class _Transfer:
    ctx: Any  # tftpy TftpContextServer
    client: tuple[str, int]
    path: str
    size: int
    options: dict[str, str]  # as the client asked
    timeout: float
    started: float
    deadline: float
    resends: int = 0
    done: bool = False


# --------------------------------------------------------------------------- requests


def parse_request(data: bytes) -> tuple[int, str, str, dict[str, str]]:
    """(opcode, file name, mode, options) of an RRQ or WRQ; ValueError if it is neither.

    RFC 1350 section 5: opcode, then NUL-terminated file name and mode; RFC 2347 adds
    NUL-terminated option/value pairs whose names are case-insensitive. The file name is kept
    byte for byte (os.fsdecode) so it maps onto the disk as sent."""
    if len(data) < 4:
        raise ValueError(f"{len(data)}-byte packet")
    opcode = int.from_bytes(data[:2], "big")
    if opcode not in (RRQ, WRQ):
        raise ValueError(f"opcode {opcode} on the request port")
    fields = data[2:].split(b"\0")
    if len(fields) < 3 or fields[-1] != b"":
        raise ValueError("file name and mode are not NUL-terminated")
    name, mode, *rest = fields[:-1]
    pairs = zip(rest[0::2], rest[1::2], strict=False)  # an unpaired trailing field is ignored
    options = {k.decode("ascii", "replace").lower(): v.decode("ascii", "replace") for k, v in pairs}
    return opcode, os.fsdecode(name), mode.decode("ascii", "replace").lower(), options


def normalise(name: str) -> str:
    """The requested name as a path relative to a served directory, or _Refused.

    Windows clients send `\\` (FIRMWARE-QUIRKS #18, dnsmasq src/tftp.c); firmware often asks for
    `/ipxe.efi`, meaning the root, not the disk's `/`. A `..` component is refused outright,
    even one that would stay inside: no boot loader needs it."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _Refused(ERR_ACCESS, "the path contains '..'")
    if not parts:
        raise _Refused(ERR_ACCESS, "the name is empty or a directory")
    return "/".join(parts)


def printable(name: str) -> str:
    """`name` safe for one log line: undecodable bytes and control characters escaped."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def negotiate(
    options: dict[str, str], size: int, mtu: int | None
) -> tuple[dict[str, str], float | None]:
    """The options to acknowledge in an OACK, and the client's timeout if it asked for one.

    RFC 2347: a server acknowledges only what it accepts; unknown or malformed options are
    left out, and with nothing left it answers as plain RFC 1350 (DATA 1, no OACK)."""
    accepted: dict[str, str] = {}
    timeout: float | None = None
    blksize = _int(options.get("blksize"))
    if blksize is not None and blksize >= MIN_BLKSIZE:
        # RFC 2348 lets the server answer smaller. Blocks that fit the path MTU are never
        # IP-fragmented, which firmware handles badly (FIRMWARE-QUIRKS #16: QEMU's UEFI needs
        # <= 1024 on a small MTU; dnsmasq src/tftp.c caps at MTU - 32 the same way).
        limit = MAX_BLKSIZE if mtu is None else max(MIN_BLKSIZE, min(MAX_BLKSIZE, mtu - _HEADERS))
        accepted["blksize"] = str(min(blksize, limit))
    if "tsize" in options:
        # RFC 2349: a reading client sends 0 and the OACK carries the size. EDK2 asks this
        # way and then aborts with ERROR 8 (FIRMWARE-QUIRKS #17): see _peer_error.
        accepted["tsize"] = str(size)
    seconds = _int(options.get("timeout"))
    if seconds is not None and 1 <= seconds <= 255:  # RFC 2349: 1..255, echoed as asked
        accepted["timeout"] = str(seconds)
        timeout = float(seconds)
    return accepted, timeout


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def error_packet(code: int, message: str) -> bytes:
    """An ERROR packet (RFC 1350 section 5) with our own message; tftpy can only send its own."""
    return struct.pack("!HH", ERROR, code) + message.encode("ascii", "replace") + b"\0"


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


# --------------------------------------------------------------------------- server


class TftpServer:
    """Serves `root` (and `fallback_dirs`) read-only over TFTP until `close()`.

    `fallback_dirs`: (prefix, directory) pairs searched in order when a file is not under
    `root`; a request "ipxe/undionly.kpxe" or "undionly.kpxe" finds directory/undionly.kpxe for
    ("ipxe/", directory). `generate(path, client_ip)` may return the content of a file that is on
    no disk (U-Boot's pxelinux.cfg/01-<mac>), or None. `on_event` is called on the event loop
    that ran `start()`, once per request outcome."""

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
        self._factory = TftpPacketFactory()
        self._transfers: dict[tuple[str, int], _Transfer] = {}
        self._sock: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._closed = False
        self._shut = False
        # tftpy logs every packet at INFO/DEBUG and a client's routine ERROR at ERROR level; the
        # one line per transfer below replaces that. Left alone if someone configured it.
        tftpy_log = logging.getLogger("tftpy")
        if tftpy_log.level == logging.NOTSET:
            tftpy_log.setLevel(logging.CRITICAL)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket and start serving; returns once requests are being received."""
        if self._closed or self._thread is not None:
            raise RuntimeError("a TftpServer starts once and cannot restart after close()")
        if not self.root.is_dir():
            raise FileNotFoundError(f"TFTP root {self.root} is not a directory")
        self._loop = asyncio.get_running_loop()
        self._sock = self._open_listener()
        try:
            self.port = self._sock.getsockname()[1]
            self._wake = socket.socketpair()
            for end in self._wake:
                end.setblocking(False)
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._sock, selectors.EVENT_READ, self._on_request)
            self._selector.register(self._wake[0], selectors.EVENT_READ, self._on_wake)
            self._thread = threading.Thread(target=self._run, name="pixiebox-tftp", daemon=True)
            self._thread.start()
        except BaseException:
            self._thread = None
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
        """Stop serving: transfers under way are ended, the thread and every socket are gone."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        thread = self._thread
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake[1].send(b"x")
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10.0)
            if thread.is_alive():
                log.warning("the TFTP thread did not stop within 10 s (a file read hanging?)")
                return
        self._shutdown()

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

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(self._select_timeout()):
                    try:
                        key.data()
                    except Exception:
                        # Whatever one packet does, the other machines keep booting.
                        self.stats["internal_error"] += 1
                        log.exception("TFTP internal error; the server carries on")
                self._expire(time.monotonic())
        except Exception:
            log.exception("the TFTP server stopped on an internal error")
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        for transfer in list(self._transfers.values()):
            self._finish(transfer, "aborted", "the TFTP server is stopping", logging.INFO)
        self._release()

    def _release(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for sock in (self._sock, *(self._wake or ())):
            if sock is not None:
                sock.close()
        self._sock = None
        self._wake = None

    def _on_wake(self) -> None:
        assert self._wake is not None
        with contextlib.suppress(OSError):
            self._wake[0].recv(64)

    def _select_timeout(self) -> float | None:
        if not self._transfers:
            return None
        soonest = min(t.deadline for t in self._transfers.values())
        return max(0.0, soonest - time.monotonic())

    # -- requests --------------------------------------------------------------------

    def _on_request(self) -> None:
        assert self._sock is not None
        for _ in range(64):  # bounded, so transfers under way get their turn
            try:
                data, ancdata, _, (ip, port) = self._sock.recvmsg(
                    2048, socket.CMSG_SPACE(_PKTINFO.size)
                )
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("TFTP request socket: %s", exc)
                return
            self._request(data, ip, port, _pktinfo_local_ip(ancdata) or self.listen_ip)

    def _request(self, data: bytes, ip: str, port: int, local_ip: str) -> None:
        existing = self._transfers.get((ip, port))
        if existing is not None:
            # Its transfer may have ended already, with the packet saying so still queued
            # (EDK2's ERROR 8 before it asks again: FIRMWARE-QUIRKS #17).
            self._on_packet(existing)
            if (ip, port) in self._transfers:
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
        except _Refused as refused:
            self._refuse(ip, port, local_ip, shown, refused.code, refused.why)
            return
        except _NotFound as missing:
            self._not_found(ip, port, local_ip, printable(path), missing.looked)
            return
        self._begin(ip, port, local_ip, printable(path), source, options)

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
                return _Source(io.BytesIO(content), len(content), "generated")
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
        """The file `relative` under `base`, None if absent, _Refused if it leads elsewhere.

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
            raise _Refused(ERR_ACCESS, f"{shown} leads outside {base} (to {printable(real)})")
        try:
            # O_NONBLOCK: a FIFO planted in the root must not hang the server on open.
            fd = os.open(full, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError:
            raise _Refused(ERR_ACCESS, f"{shown} is not readable") from None
        except OSError as exc:
            raise _Refused(ERR_ACCESS, f"{shown} cannot be opened: {exc.strerror}") from None
        try:
            with contextlib.suppress(FileNotFoundError):  # no /proc: the realpath check stands
                opened = os.readlink(f"/proc/self/fd/{fd}")
                if not follow_links and not _inside(opened, base_real):
                    raise _Refused(
                        ERR_ACCESS, f"{shown} leads outside {base} (to {printable(opened)})"
                    )
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _Refused(ERR_ACCESS, f"{shown} is not a regular file")
            os.set_blocking(fd, True)
            fileobj = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        return _Source(fileobj, info.st_size, shown)

    def _reply_socket(self, local_ip: str) -> socket.socket:
        """A socket for one client: a new port (RFC 1350 TID) on the address it asked."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            self._prepare(sock, local_ip)
        except OSError:
            sock.close()
            raise
        return sock

    def _prepare(self, sock: socket.socket, local_ip: str) -> None:
        if self.interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
        sock.bind((local_ip, 0))

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
        try:
            # flock=False: nothing here takes locks, and with True tftpy's end() fails on a
            # BytesIO (the generated files) - see the module doc.
            ctx = TftpContextServer(ip, port, RESEND_AFTER, str(self.root), flock=False)
        except Exception:
            source.fileobj.close()
            raise
        sock: socket.socket = ctx.sock
        try:
            self._prepare(sock, local_ip)
            # Connected: the kernel drops datagrams from any other port (RFC 1350 TIDs), reports
            # a vanished client as ECONNREFUSED, and knows the path MTU.
            sock.connect((ip, port))
            sock.setblocking(False)
            mtu: int | None = sock.getsockopt(socket.IPPROTO_IP, _IP_MTU)
        except OSError as exc:
            sock.close()
            source.fileobj.close()
            log.warning("%s asked for %s over TFTP: cannot answer it: %s", ip, path, exc)
            self._send_error(ip, port, local_ip, ERR_UNDEFINED, "server error")
            self._emit(TftpEvent("aborted", ip, port, path, source.size, f"socket error: {exc}"))
            return
        accepted, timeout = negotiate(requested, source.size, mtu)
        now = time.monotonic()
        transfer = _Transfer(
            ctx=ctx,
            client=(ip, port),
            path=path,
            size=source.size,
            options=requested,
            timeout=timeout or RESEND_AFTER,
            started=now,
            deadline=now + (timeout or RESEND_AFTER),
        )
        ctx.timeout = transfer.timeout
        ctx.tidport = port
        ctx.fileobj = source.fileobj
        ctx.file_to_transfer = path
        ctx.options = accepted
        ctx.metrics.start_time = time.time()
        ctx.last_update = time.time()
        self._transfers[(ip, port)] = transfer
        assert self._selector is not None
        self._selector.register(
            sock, selectors.EVENT_READ, functools.partial(self._on_packet, transfer)
        )
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
        state = TftpStateExpectACK(ctx)
        ctx.state = state
        try:
            if accepted:
                state.sendOACK()  # the client answers with ACK 0 (RFC 2347)
            else:
                ctx.next_block = 1
                ctx.pending_complete = state.sendDAT()
        except OSError as exc:
            self._finish(transfer, "aborted", f"send failed: {exc}", logging.WARNING)

    def _on_packet(self, transfer: _Transfer) -> None:
        ctx = transfer.ctx
        for _ in range(16):
            if transfer.done:
                return
            try:
                data = ctx.sock.recv(65536)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self._vanished(transfer, "its port is closed (ICMP port unreachable)")
                return
            except OSError as exc:
                self._vanished(transfer, f"receive failed: {exc}")
                return
            try:
                packet = self._factory.parse(data)
            except Exception as exc:
                log.debug("bad TFTP packet from %s:%d: %s", *transfer.client, exc)
                continue
            if isinstance(packet, TftpPacketERR):
                self._peer_error(transfer, packet)
                return
            self._step(transfer, packet)

    def _step(self, transfer: _Transfer, packet: Any) -> None:
        ctx = transfer.ctx
        ctx.last_update = time.time()
        try:
            ctx.state = ctx.state.handle(packet, *transfer.client)
        except TftpTimeoutExpectACK:
            # A duplicate ACK while our DATA is older than the timeout: it was lost, resend.
            self._resend(transfer)
            return
        except ConnectionRefusedError:
            self._vanished(transfer, "its port is closed (ICMP port unreachable)")
            return
        except (TftpException, OSError) as exc:
            self._finish(transfer, "aborted", str(exc), logging.WARNING)
            return
        transfer.resends = 0
        transfer.deadline = time.monotonic() + transfer.timeout
        if ctx.state is None:
            self._finish(transfer, "sent", "", logging.INFO)

    def _resend(self, transfer: _Transfer) -> None:
        try:
            transfer.ctx.state.resendLast()
        except ConnectionRefusedError:
            self._vanished(transfer, "its port is closed (ICMP port unreachable)")
            return
        except (TftpException, OSError) as exc:
            self._finish(transfer, "aborted", f"resend failed: {exc}", logging.WARNING)
            return
        transfer.resends += 1
        transfer.deadline = time.monotonic() + transfer.timeout

    def _expire(self, now: float) -> None:
        for transfer in [t for t in self._transfers.values() if t.deadline <= now]:
            if transfer.resends < RESENDS:
                self._resend(transfer)
            elif transfer.ctx.pending_complete:
                # Every block went out; the ACK of the last one never came. Windows clients
                # never send it (FIRMWARE-QUIRKS #18): done, not failed.
                self._finish(transfer, "sent", "no ACK for the last block", logging.INFO)
            else:
                waited = transfer.timeout * (RESENDS + 1)
                self._vanished(transfer, f"no ACK for {waited:g} s")

    def _peer_error(self, transfer: _Transfer, packet: Any) -> None:
        code = int(packet.errorcode)
        raw = packet.errmsg
        message = printable(os.fsdecode(raw)) if isinstance(raw, bytes) else ""
        said = f"ERROR {code}{f' ({message})' if message else ''}"
        if transfer.ctx.next_block == 0 and "tsize" in transfer.options:
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
        ctx = transfer.ctx
        self._transfers.pop(transfer.client, None)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(ctx.sock)
        try:
            ctx.end()
        except Exception:
            self.stats["internal_error"] += 1
            log.exception("TFTP cleanup of %s for %s failed", transfer.path, transfer.client[0])
        finally:
            # Whatever tftpy's end() managed, no socket or file stays open.
            ctx.sock.close()
            if ctx.fileobj is not None:
                ctx.fileobj.close()
        self.stats[kind] += 1
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            self.stats["bytes"] += int(ctx.metrics.bytes)
        self._log_outcome(transfer, kind, reason, level, probe)
        self._emit(TftpEvent(kind, *transfer.client, transfer.path, transfer.size, reason))

    def _log_outcome(
        self, transfer: _Transfer, kind: EventKind, reason: str, level: int, probe: bool
    ) -> None:
        ip = self.describe(transfer.client[0])
        size = human_size(transfer.size)
        if kind == "sent":
            seconds = time.monotonic() - transfer.started
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
            sent = human_size(int(transfer.ctx.metrics.bytes))
            log.log(
                level,
                "%s stopped fetching %s over TFTP after %s of %s: %s; other transfers carry on, "
                "and the machine starts over if it asks again",
                ip,
                transfer.path,
                sent,
                size,
                reason,
            )

    def _emit(self, event: TftpEvent) -> None:
        loop = self._loop
        if self.on_event is None or loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: TftpEvent) -> None:
        assert self.on_event is not None
        try:
            self.on_event(event)
        except Exception:
            log.exception("the TFTP event handler failed on %s", event)
