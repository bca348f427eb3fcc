"""DHCPv4 packet codec: RFC 2131/2132, RFC 3396 long options, RFC 4578 PXE, RFC 3046 relay info.

Hand-written rather than built on a general packet library because it sits on the hot path of a
server answering thousands of clients per second, and because PXE firmware needs byte-exact
control over the wire format (see the notes on ``encode``).

Options are kept as raw payloads keyed by code; the typed conveniences on ``Packet`` validate
lazily, so a malformed option the server never looks at cannot make a whole packet undecodable.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address

__all__ = [
    "BOOTREPLY",
    "BOOTREQUEST",
    "MAGIC_COOKIE",
    "DecodeError",
    "EncodeError",
    "MessageType",
    "Opt",
    "Packet",
    "decode",
    "decode_suboptions",
    "encode",
    "encode_suboptions",
]

BOOTREQUEST = 1
BOOTREPLY = 2

# RFC 2131 section 3: the first four octets of the options field tell DHCP apart from plain BOOTP.
MAGIC_COOKIE = b"\x63\x82\x53\x63"


class DecodeError(ValueError):
    """The bytes are not a DHCP packet we can trust; the server drops it."""


class EncodeError(ValueError):
    """The Packet cannot be put on the wire without a client misreading it."""


class MessageType(enum.IntEnum):
    """RFC 2132 9.6 message types."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Opt(enum.IntEnum):
    """The option codes Pixiebox reads or writes (RFC 2132, 3004, 3046, 4578)."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS_SERVERS = 6
    HOSTNAME = 12
    DOMAIN_NAME = 15
    BROADCAST_ADDRESS = 28
    VENDOR_SPECIFIC = 43
    REQUESTED_IP = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAMETER_REQUEST_LIST = 55
    MESSAGE = 56
    MAX_MESSAGE_SIZE = 57
    RENEWAL_TIME = 58
    REBINDING_TIME = 59
    VENDOR_CLASS = 60
    CLIENT_ID = 61
    TFTP_SERVER_NAME = 66
    BOOTFILE_NAME = 67
    USER_CLASS = 77
    RELAY_AGENT_INFO = 82
    CLIENT_ARCH = 93
    CLIENT_NDI = 94
    CLIENT_UUID = 97
    END = 255


# Plain ints for the hot paths: enum attribute lookups cost more than a global int.
_PAD = 0
_END = 255
_OVERLOAD = 52
_MESSAGE_TYPE = 53
_RELAY_AGENT_INFO = 82

# RFC 2131 figure 1 plus the cookie: op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr
# chaddr sname file cookie.
_HEADER = struct.Struct("!BBBBIHHIIII16s64s128s4s")
_HEADER_LEN = _HEADER.size  # 240
_CHADDR_LEN = 16
_SNAME_LEN = 64
_FILE_LEN = 128
# RFC 1542 2.1: relay agents and old BOOTP implementations may drop anything shorter than the
# original 300-byte BOOTP message.
_MIN_PACKET_LEN = 300
_MAX_OPTION_LEN = 255
_BROADCAST_FLAG = 0x8000

_ZERO = IPv4Address(0)
_U16 = struct.Struct("!H")
_MESSAGE_TYPES = frozenset(int(m) for m in MessageType)


@dataclass(slots=True)
class Packet:
    """One BOOTP/DHCP message with its options as raw payloads.

    ``options`` keeps insertion order so that what a relay or client sent can be replayed in the
    same order; repeated instances on the wire are already joined (RFC 3396).
    """

    op: int
    xid: int
    chaddr: bytes
    htype: int = 1
    hlen: int = 6
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: IPv4Address = _ZERO
    yiaddr: IPv4Address = _ZERO
    siaddr: IPv4Address = _ZERO
    giaddr: IPv4Address = _ZERO
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def mac(self) -> str:
        # Only Ethernet (RFC 1700 htype 1) has a 6-byte MAC we can key leases and PXE policy on;
        # anything else (InfiniBand htype 32 carries its address in option 61) must not be
        # silently truncated into a look-alike MAC.
        if self.htype != 1 or self.hlen != 6 or len(self.chaddr) < 6:
            raise DecodeError(
                f"no Ethernet MAC: htype={self.htype} hlen={self.hlen} chaddr={len(self.chaddr)}B"
            )
        return self.chaddr[:6].hex(":")

    @property
    def message_type(self) -> MessageType | None:
        value = self.options.get(_MESSAGE_TYPE)
        if value is None:
            return None
        # RFC 2132 9.6: exactly one octet. Types beyond 8 (FORCERENEW, leasequery, ...) are not
        # ones a PXE server answers, so they count as malformed for our purposes.
        if len(value) != 1 or value[0] not in _MESSAGE_TYPES:
            raise DecodeError(f"option 53 (message type) is malformed: {value.hex()}")
        return MessageType(value[0])

    @property
    def broadcast(self) -> bool:
        # RFC 2131 4.1: a client that cannot receive unicast before it has an address sets the
        # leftmost flags bit; the reply must then go to 255.255.255.255.
        return bool(self.flags & _BROADCAST_FLAG)

    @property
    def requested_ip(self) -> IPv4Address | None:
        return _address(self.options.get(Opt.REQUESTED_IP), "50 (requested IP)")

    @property
    def server_id(self) -> IPv4Address | None:
        return _address(self.options.get(Opt.SERVER_ID), "54 (server identifier)")

    @property
    def client_arches(self) -> tuple[int, ...]:
        value = self.options.get(Opt.CLIENT_ARCH)
        if value is None:
            return ()
        # RFC 4578 2.1: one or more 16-bit architecture types, so an empty or odd length is junk.
        n = len(value)
        if n == 0 or n % 2:
            raise DecodeError(f"option 93 (client arch) has length {n}, not a uint16 list")
        return struct.unpack(f"!{n // 2}H", value)

    @property
    def vendor_class(self) -> str | None:
        value = self.options.get(Opt.VENDOR_CLASS)
        # latin-1 maps every byte, so firmware sending non-ASCII junk still yields a matchable str.
        return None if value is None else value.decode("latin-1")

    @property
    def user_classes(self) -> tuple[str, ...]:
        value = self.options.get(Opt.USER_CLASS)
        if value is None:
            return ()
        # RFC 3004 says a list of length-prefixed strings (each length at least 1), but iPXE and
        # many ROMs send one bare string such as b"iPXE". Accept the RFC form only when it
        # accounts for every byte; otherwise the payload is a single class.
        classes: list[str] = []
        pos = 0
        end = len(value)
        while pos < end:
            n = value[pos]
            stop = pos + 1 + n
            if n == 0 or stop > end:
                return (value.decode("latin-1"),)
            classes.append(value[pos + 1 : stop].decode("latin-1"))
            pos = stop
        return tuple(classes)

    @property
    def client_uuid(self) -> bytes | None:
        # Raw on purpose: RFC 4578 2.3 wants type 0 + 16 bytes, but real firmware varies and
        # whether to trust it is the caller's policy.
        return self.options.get(Opt.CLIENT_UUID)

    @property
    def parameter_request_list(self) -> tuple[int, ...]:
        value = self.options.get(Opt.PARAMETER_REQUEST_LIST)
        return () if value is None else tuple(value)

    @property
    def max_message_size(self) -> int | None:
        value = self.options.get(Opt.MAX_MESSAGE_SIZE)
        if value is None:
            return None
        if len(value) != 2:
            raise DecodeError(f"option 57 (max message size) has length {len(value)}, not 2")
        size: int = _U16.unpack(value)[0]
        return size

    @property
    def hostname(self) -> str | None:
        value = self.options.get(Opt.HOSTNAME)
        return None if value is None else value.decode("latin-1")

    def reply(self, message_type: MessageType) -> Packet:
        """A BOOTREPLY skeleton for this request.

        RFC 2131 4.3.1 / table 3: xid, flags, giaddr and chaddr are copied so the client (or
        relay) can match the reply; RFC 3046 2.2: the server echoes relay agent info so the
        relay can route the reply back to the right port. Nothing else may leak from the request.
        """
        options: dict[int, bytes] = {_MESSAGE_TYPE: bytes((int(message_type),))}
        relay = self.options.get(_RELAY_AGENT_INFO)
        if relay is not None:
            options[_RELAY_AGENT_INFO] = relay
        return Packet(
            op=BOOTREPLY,
            xid=self.xid,
            chaddr=self.chaddr,
            htype=self.htype,
            hlen=self.hlen,
            flags=self.flags,
            giaddr=self.giaddr,
            options=options,
        )


def _address(value: bytes | None, what: str) -> IPv4Address | None:
    if value is None:
        return None
    if len(value) != 4:
        raise DecodeError(f"option {what} has length {len(value)}, not 4")
    return IPv4Address(value)


def _ip(value: int) -> IPv4Address:
    # Requests mostly carry 0.0.0.0; sharing one instance skips the constructor.
    return _ZERO if value == 0 else IPv4Address(value)


def _cstr(raw: bytes) -> bytes:
    # RFC 2131 2: sname and file are "null terminated strings"; bytes after the NUL are garbage
    # some ROMs leave in their buffers.
    nul = raw.find(b"\0")
    return raw if nul < 0 else raw[:nul]


def _walk(
    buf: bytes,
    pos: int,
    end: int,
    out: dict[int, bytes],
    repeats: dict[int, list[bytes]],
    where: str,
) -> None:
    """Parse code/length/value triples from ``buf[pos:end]`` into ``out``.

    Repeated codes are gathered in ``repeats`` and joined once by ``_join`` (RFC 3396
    concatenation) so a hostile packet full of tiny repeats cannot force quadratic copying.
    """
    while pos < end:
        code = buf[pos]
        if code == _PAD:
            pos += 1
            continue
        if code == _END:
            return
        if pos + 1 >= end:
            raise DecodeError(f"option {code} in {where} is cut off before its length")
        stop = pos + 2 + buf[pos + 1]
        if stop > end:
            raise DecodeError(f"option {code} in {where} runs {stop - end} bytes past the end")
        value = buf[pos + 2 : stop]
        first = out.get(code)
        if first is None:
            out[code] = value
        else:
            parts = repeats.get(code)
            if parts is None:
                repeats[code] = [first, value]
            else:
                parts.append(value)
        pos = stop
    # No END: tolerated, many clients (and some relays that append option 82) omit it.


def _join(out: dict[int, bytes], repeats: dict[int, list[bytes]]) -> None:
    for code, parts in repeats.items():
        out[code] = b"".join(parts)
    repeats.clear()


def decode(data: bytes | bytearray | memoryview) -> Packet:
    """Parse one DHCP message; raise DecodeError (and nothing else) for anything unusable."""
    buf = data if type(data) is bytes else bytes(data)
    if len(buf) < _HEADER_LEN:
        raise DecodeError(f"{len(buf)} bytes is shorter than the BOOTP header and magic cookie")
    (
        op,
        htype,
        hlen,
        hops,
        xid,
        secs,
        flags,
        ciaddr,
        yiaddr,
        siaddr,
        giaddr,
        chaddr,
        sname,
        file,
        cookie,
    ) = _HEADER.unpack_from(buf)
    if cookie != MAGIC_COOKIE:
        raise DecodeError(f"bad magic cookie {cookie.hex()} (plain BOOTP is not served)")
    if hlen > _CHADDR_LEN:
        raise DecodeError(f"hlen {hlen} does not fit the 16-byte chaddr field")

    options: dict[int, bytes] = {}
    repeats: dict[int, list[bytes]] = {}
    _walk(buf, _HEADER_LEN, len(buf), options, repeats, "options")
    if repeats:
        _join(options, repeats)

    # Option 52 is framing, not data: it is consumed here so that re-encoding a decoded packet
    # cannot claim sname/file hold options they no longer hold.
    overload = options.pop(_OVERLOAD, None)
    if overload is None:
        sname = _cstr(sname)
        file = _cstr(file)
    else:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise DecodeError(f"option 52 (overload) is malformed: {overload.hex()}")
        # RFC 2132 9.3 / RFC 3396 5: options field first, then file, then sname.
        if overload[0] & 1:
            _walk(file, 0, _FILE_LEN, options, repeats, "file")
            file = b""
        else:
            file = _cstr(file)
        if overload[0] & 2:
            _walk(sname, 0, _SNAME_LEN, options, repeats, "sname")
            sname = b""
        else:
            sname = _cstr(sname)
        if repeats:
            _join(options, repeats)
        # RFC 2132 9.3 allows option 52 only in the options field; a copy elsewhere is noise.
        options.pop(_OVERLOAD, None)

    return Packet(
        op,
        xid,
        chaddr,
        htype,
        hlen,
        hops,
        secs,
        flags,
        _ip(ciaddr),
        _ip(yiaddr),
        _ip(siaddr),
        _ip(giaddr),
        sname,
        file,
        options,
    )


def _boot_field(value: bytes, name: str, size: int) -> None:
    # PXE ROMs read sname/file as C strings and need the terminating NUL inside the field
    # (dnsmasq rfc2131.c, "buggy PXE again"); an embedded NUL would silently truncate the name.
    if len(value) >= size:
        raise EncodeError(f"{name} is {len(value)} bytes; at most {size - 1} fit with the NUL")
    if b"\0" in value:
        raise EncodeError(f"{name} contains a NUL byte; clients would read a truncated name")


def _put(parts: list[bytes], code: int, value: bytes) -> None:
    if not 0 < code < _END:
        raise EncodeError(f"option code {code} is not encodable (0 is PAD, 255 is END)")
    n = len(value)
    if n <= _MAX_OPTION_LEN:
        parts.append(bytes((code, n)))
        parts.append(value)
        return
    # RFC 3396: a payload longer than 255 bytes goes out as consecutive instances of the code,
    # which the receiver concatenates.
    for start in range(0, n, _MAX_OPTION_LEN):
        chunk = value[start : start + _MAX_OPTION_LEN]
        parts.append(bytes((code, len(chunk))))
        parts.append(chunk)


def encode(packet: Packet) -> bytes:
    """Serialise a Packet for the wire.

    Never uses option overload (52): old PXE clients misread options stored in sname/file, and
    the boot server name and file must stay in the fixed fields they look at (the same reason as
    dnsmasq's --dhcp-no-override).
    """
    if len(packet.chaddr) > _CHADDR_LEN:
        raise EncodeError(f"chaddr is {len(packet.chaddr)} bytes; the field holds 16")
    if packet.hlen > _CHADDR_LEN:
        raise EncodeError(f"hlen {packet.hlen} does not fit the 16-byte chaddr field")
    _boot_field(packet.sname, "sname", _SNAME_LEN)
    _boot_field(packet.file, "file", _FILE_LEN)
    options = packet.options
    if _OVERLOAD in options:
        raise EncodeError("option 52 (overload) is never sent; sname/file hold boot info")
    try:
        header = _HEADER.pack(
            packet.op,
            packet.htype,
            packet.hlen,
            packet.hops,
            packet.xid,
            packet.secs,
            packet.flags,
            int(packet.ciaddr),
            int(packet.yiaddr),
            int(packet.siaddr),
            int(packet.giaddr),
            packet.chaddr,
            packet.sname,
            packet.file,
            MAGIC_COOKIE,
        )
    except struct.error as exc:
        raise EncodeError(f"header field out of range: {exc}") from exc

    parts = [header]
    # Some clients only look for the message type as the first option.
    message_type = options.get(_MESSAGE_TYPE)
    if message_type is not None:
        _put(parts, _MESSAGE_TYPE, message_type)
    for code, value in options.items():
        if code != _MESSAGE_TYPE:
            _put(parts, code, value)
    parts.append(b"\xff")
    wire = b"".join(parts)
    if len(wire) < _MIN_PACKET_LEN:
        wire += bytes(_MIN_PACKET_LEN - len(wire))
    return wire


def encode_suboptions(subopts: dict[int, bytes]) -> bytes:
    """Encode sub-options (PXE option 43 or similar) as code/len/value triples closed by END.

    The PXE spec 2.1 terminates the vendor option block with 255; firmware that walks it
    without a length check needs that terminator.
    """
    parts: list[bytes] = []
    for code, value in subopts.items():
        if not 0 < code < _END:
            raise EncodeError(f"sub-option code {code} is not encodable (0 is PAD, 255 is END)")
        if len(value) > _MAX_OPTION_LEN:
            # RFC 3396 splitting is defined for top-level options only.
            raise EncodeError(f"sub-option {code} is {len(value)} bytes; at most 255 fit")
        parts.append(bytes((code, len(value))))
        parts.append(value)
    parts.append(b"\xff")
    return b"".join(parts)


def decode_suboptions(data: bytes) -> dict[int, bytes]:
    """Decode sub-options (option 43 or 82 payload); PAD skipped, END stops, repeats joined."""
    out: dict[int, bytes] = {}
    repeats: dict[int, list[bytes]] = {}
    buf = data if type(data) is bytes else bytes(data)
    _walk(buf, 0, len(buf), out, repeats, "sub-options")
    if repeats:
        _join(out, repeats)
    return out
