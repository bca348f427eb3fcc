"""TFTP packets and names: the parsing half of pixiebox.tftp, kept apart so it can be read
(and fuzzed) on its own.

RFC 1350 (RRQ/WRQ, DATA, ACK, ERROR), RFC 2347 (option negotiation and OACK), RFC 2348
(blksize), RFC 2349 (tsize, timeout), RFC 7440 (windowsize).
"""

from __future__ import annotations

import os
import struct

from pixiebox.net.paths import printable

# RFC 1350 section 5: opcodes and error codes (8 is RFC 2347's "options refused").
RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_ILLEGAL, ERR_UNKNOWN_TID = 0, 1, 2, 4, 5
ERR_OPTIONS = 8

# RFC 2348: a block size is 8..65464 octets; 65464 keeps a DATA packet inside one IPv4 datagram.
MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464
DEFAULT_BLKSIZE = 512
# RFC 7440 allows 1..65535 blocks in flight; more than this only floods a firmware's small
# receive ring (EDK2 asks for 4) and a lost block then costs the whole window again.
MAX_WINDOWSIZE = 16
# IPv4 (20) + UDP (8) + TFTP DATA header (4): a block this much under the MTU is never fragmented.
_HEADERS = 32
_U16 = struct.Struct("!H")


#: The only texts a client's ERROR packet carries, by code: RFC 1350's own words, the same for
#: every request. Why a request failed (a link leading out of the root, the places looked in, a
#: permission) names server paths and the layout of the assets, which a client on the LAN has
#: no business learning ("... leads outside /srv/assets (to /etc/shadow)" told a prober which
#: files exist); the reason goes to the log line and the event's `reason` and `detail`.
CLIENT_TEXT = {
    ERR_UNDEFINED: "server error",
    ERR_NOT_FOUND: "File not found",
    ERR_ACCESS: "Access violation",
    ERR_ILLEGAL: "Illegal TFTP operation",
    ERR_UNKNOWN_TID: "Unknown transfer ID",
}
#: ERROR 0's other fixed texts (RFC 1350: code 0 is "not defined, see error message"): a
#: request the server has no room for, a transfer ended to make room for another (both
#: tftp.limits), and transfers under way when the agent stops. Fixed words, like CLIENT_TEXT.
BUSY = "server busy"
STOPPING = "server shutting down"
_CODE_0_TEXTS = frozenset({BUSY, STOPPING})
#: The largest RFC 2349 timeout a client may ask for by default (tftp.limits.TftpLimits).
MAX_CLIENT_TIMEOUT = 5


class Refused(Exception):
    """A request that gets an ERROR `code` (access violation, illegal operation): `reason` is a
    short code for the event, `why` the log's words (it may name server paths). The client
    gets only CLIENT_TEXT[code]."""

    def __init__(self, code: int, why: str, *, reason: str = "refused") -> None:
        super().__init__(why)
        self.code = code
        self.why = why
        self.reason = reason


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


def negotiate(
    options: dict[str, str],
    size: int,
    mtu: int | None,
    *,
    max_timeout: float = MAX_CLIENT_TIMEOUT,
) -> tuple[dict[str, str], float | None]:
    """The options to acknowledge in an OACK, and the client's timeout if it asked for one.

    RFC 2347: a server acknowledges only what it accepts; unknown or malformed options are
    left out, and with nothing left it answers as plain RFC 1350 (DATA 1, no OACK). A
    `timeout` over `max_timeout` is left out too (the server keeps its own): RFC 2349 allows
    up to 255 s, and a forged request asking for it held a transfer for 25 minutes."""
    accepted: dict[str, str] = {}
    timeout: float | None = None
    blksize = _int(options.get("blksize"))
    if blksize is not None and blksize >= MIN_BLKSIZE:
        # RFC 2348 lets the server answer smaller. Blocks that fit the path MTU are never
        # IP-fragmented, which firmware handles badly (docs/firmware-quirks.md#16: QEMU's UEFI needs
        # <= 1024 on a small MTU; dnsmasq src/tftp.c caps at MTU - 32 the same way).
        limit = MAX_BLKSIZE if mtu is None else max(MIN_BLKSIZE, min(MAX_BLKSIZE, mtu - _HEADERS))
        accepted["blksize"] = str(min(blksize, limit))
    if "tsize" in options:
        # RFC 2349: a reading client sends 0 and the OACK carries the size. EDK2 asks this
        # way and then aborts with ERROR 8 (docs/firmware-quirks.md#17): see _peer_error.
        accepted["tsize"] = str(size)
    seconds = _int(options.get("timeout"))
    # RFC 2349: 1..255, echoed as asked; a server may refuse an option it does not accept.
    if seconds is not None and 1 <= seconds <= min(255, max_timeout):
        accepted["timeout"] = str(seconds)
        timeout = float(seconds)
    window = _int(options.get("windowsize"))
    if window is not None and window >= 1:  # RFC 7440: 1..65535; the server may answer less
        accepted["windowsize"] = str(min(window, MAX_WINDOWSIZE))
    return accepted, timeout


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def error_packet(code: int, text: str | None = None) -> bytes:
    """An ERROR packet (RFC 1350 section 5) with CLIENT_TEXT's words for `code`, or for code 0
    one of its fixed texts (BUSY, STOPPING): there is no way to put anything else in one."""
    if text is None:
        text = CLIENT_TEXT[code]
    elif code != ERR_UNDEFINED or text not in _CODE_0_TEXTS:
        raise ValueError(f"not a fixed TFTP error text: {code} {text!r}")
    return struct.pack("!HH", ERROR, code) + text.encode("ascii") + b"\0"


def oack_packet(options: dict[str, str]) -> bytes:
    """An OACK (RFC 2347): NUL-terminated option names and values, in the client's order."""
    fields = b"".join(f"{key}\0{value}\0".encode("ascii") for key, value in options.items())
    return _U16.pack(OACK) + fields


def parse_reply(data: bytes) -> tuple[int, int, str] | None:
    """(opcode, number, text) of what a client sends on a transfer's port, None if it is
    neither an ACK nor an ERROR or too short to be one.

    ACK: (4, block, ""); ERROR: (5, code, message). The message is optional in practice
    (EDK2 and iPXE send bare codes, some clients leave off the NUL) and is made printable."""
    if len(data) < 4 or data[0] != 0 or data[1] not in (ACK, ERROR):
        return None
    number = data[2] << 8 | data[3]
    if data[1] == ACK:
        return ACK, number, ""
    message = data[4:].split(b"\0", 1)[0]
    return ERROR, number, printable(os.fsdecode(message))
