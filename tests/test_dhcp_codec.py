"""Tests for pixiebox.dhcp.codec, cross-checked against scapy's independent DHCP dissector."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any, cast

import pytest
from dhcpchecks import HANDLER_ACCESSORS, check_round_trip, read_accessors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pixiebox.dhcp.codec import (
    BOOTREPLY,
    BOOTREQUEST,
    DecodeError,
    EncodeError,
    MessageType,
    Opt,
    Packet,
    decode,
    decode_suboptions,
    encode,
    encode_suboptions,
)
from scapy.fields import Field
from scapy.layers.dhcp import BOOTP, DHCP, DHCPOptions, DHCPRevOptions

CHADDR = bytes.fromhex("f44d30647a3a")
UUID = b"\x00" + bytes(range(0xA0, 0xB0))
RELAY_INFO = b"\x01\x06eth0/7\x02\x06" + bytes.fromhex("001122334455")
PXE_VENDOR_CLASS = b"PXEClient:Arch:00007:UNDI:003016"
COOKIE = b"\x63\x82\x53\x63"

# Bounded so the whole file runs in seconds; the arbitrary-bytes fuzzer is cheap, so it gets more.
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_CHEAP = settings(FUZZ, max_examples=2000)


def scapy_discover() -> bytes:
    """A UEFI PXE DISCOVER relayed through an agent, built by scapy (not by our encoder)."""
    return bytes(
        BOOTP(
            op=1,
            xid=0x1234ABCD,
            secs=4,
            hops=1,
            flags=0x8000,
            giaddr="10.1.2.3",
            chaddr=CHADDR,
        )
        / DHCP(
            options=[
                ("message-type", "discover"),
                ("param_req_list", [1, 3, 6, 43, 60, 66, 67, 97]),
                ("max_dhcp_size", 1464),
                ("vendor_class_id", PXE_VENDOR_CLASS),
                ("client_id", b"\x01" + CHADDR),
                ("user_class", b"iPXE"),
                ("pxe_client_architecture", b"\x00\x07\x00\x09"),
                ("pxe_client_network_interface", b"\x01\x03\x10"),
                ("pxe_client_machine_identifier", UUID),
                ("hostname", b"node-07"),
                ("relay_agent_information", RELAY_INFO),
                "end",
            ]
        )
    )


def scapy_raw_options(wire: bytes) -> dict[int, bytes]:
    """Option payloads as scapy dissects them, re-serialised field by field through scapy."""
    dhcp = BOOTP(wire)[DHCP]
    out: dict[int, bytes] = {}
    for item in dhcp.options:
        if item in ("end", "pad"):
            continue
        assert isinstance(item, tuple), f"scapy could not dissect an option: {item!r}"
        name, *values = item
        if isinstance(name, int):
            code, raw = name, b"".join(values)
        else:
            code, fld = DHCPRevOptions[name]
            fld = cast(Any, fld)
            if fld is None:
                raw = b"".join(values)
            else:
                raw = b"".join(fld.addfield(None, b"", fld.any2i(None, v)) for v in values)
        out[code] = out.get(code, b"") + raw
    return out


def header_only(**kw: Any) -> bytes:
    """236-byte BOOTP header + cookie, built by scapy, for hand-written option tails."""
    wire = bytes(BOOTP(xid=7, chaddr=CHADDR, **kw) / DHCP(options=[]))
    assert len(wire) == 240 and wire[236:] == COOKIE
    return wire


# --- scapy-built packets decode with ours ------------------------------------------------


def test_decode_scapy_discover_header() -> None:
    p = decode(scapy_discover())
    assert p.op == BOOTREQUEST
    assert p.xid == 0x1234ABCD
    assert p.secs == 4
    assert p.hops == 1
    assert p.flags == 0x8000
    assert p.broadcast is True
    assert p.htype == 1 and p.hlen == 6
    assert p.chaddr == CHADDR + bytes(10)
    assert p.mac == "f4:4d:30:64:7a:3a"
    assert p.ciaddr == IPv4Address("0.0.0.0")
    assert p.yiaddr == IPv4Address("0.0.0.0")
    assert p.siaddr == IPv4Address("0.0.0.0")
    assert p.giaddr == IPv4Address("10.1.2.3")
    assert p.sname == b""
    assert p.file == b""


def test_decode_scapy_discover_options() -> None:
    p = decode(scapy_discover())
    assert p.message_type is MessageType.DISCOVER
    assert p.parameter_request_list == (1, 3, 6, 43, 60, 66, 67, 97)
    assert p.max_message_size == 1464
    assert p.vendor_class == PXE_VENDOR_CLASS.decode()
    assert p.options[Opt.CLIENT_ID] == b"\x01" + CHADDR
    assert p.user_classes == ("iPXE",)
    assert p.client_arches == (7, 9)
    assert p.options[Opt.CLIENT_NDI] == b"\x01\x03\x10"
    assert p.client_uuid == UUID
    assert p.hostname == "node-07"
    assert p.options[Opt.RELAY_AGENT_INFO] == RELAY_INFO
    assert decode_suboptions(p.options[Opt.RELAY_AGENT_INFO]) == {
        1: b"eth0/7",
        2: bytes.fromhex("001122334455"),
    }
    assert p.requested_ip is None
    assert p.server_id is None


def test_decode_scapy_discover_matches_scapy_dissection() -> None:
    wire = scapy_discover()
    p = decode(wire)
    assert p.options == scapy_raw_options(wire)
    # Insertion order follows the wire order.
    assert list(p.options) == [53, 55, 57, 60, 61, 77, 93, 94, 97, 12, 82]
    ref = BOOTP(wire)
    assert p.xid == ref.xid
    assert p.flags == int(ref.flags)
    assert str(p.giaddr) == ref.giaddr


def test_decode_scapy_request_addresses() -> None:
    wire = bytes(
        BOOTP(xid=99, chaddr=CHADDR, ciaddr="192.0.2.10", sname=b"boot-srv", file=b"ipxe.efi")
        / DHCP(
            options=[
                ("message-type", "request"),
                ("requested_addr", "192.0.2.10"),
                ("server_id", "192.0.2.1"),
                "end",
            ]
        )
    )
    p = decode(wire)
    assert p.message_type is MessageType.REQUEST
    assert p.requested_ip == IPv4Address("192.0.2.10")
    assert p.server_id == IPv4Address("192.0.2.1")
    assert p.ciaddr == IPv4Address("192.0.2.10")
    assert p.sname == b"boot-srv"
    assert p.file == b"ipxe.efi"
    assert p.broadcast is False


# --- packets encoded by us decode with scapy ---------------------------------------------


def make_offer() -> Packet:
    return Packet(
        op=BOOTREPLY,
        xid=0xDEADBEEF,
        chaddr=CHADDR,
        flags=0x8000,
        yiaddr=IPv4Address("10.0.0.50"),
        siaddr=IPv4Address("10.0.0.1"),
        giaddr=IPv4Address("10.1.2.3"),
        ciaddr=IPv4Address("10.0.0.9"),
        sname=b"pixiebox",
        file=b"efi64/ipxe.efi",
        options={
            Opt.SERVER_ID: IPv4Address("10.0.0.1").packed,
            Opt.LEASE_TIME: struct.pack("!I", 3600),
            Opt.SUBNET_MASK: IPv4Address("255.255.255.0").packed,
            Opt.ROUTER: IPv4Address("10.0.0.254").packed,
            Opt.DNS_SERVERS: IPv4Address("1.1.1.1").packed + IPv4Address("8.8.8.8").packed,
            Opt.MESSAGE_TYPE: bytes([MessageType.OFFER]),
            Opt.TFTP_SERVER_NAME: b"10.0.0.1",
            Opt.VENDOR_CLASS: b"PXEClient",
            Opt.VENDOR_SPECIFIC: encode_suboptions({6: b"\x08"}),
            Opt.RELAY_AGENT_INFO: RELAY_INFO,
        },
    )


def test_encode_decodes_with_scapy_header() -> None:
    wire = encode(make_offer())
    ref = BOOTP(wire)
    assert ref.op == 2
    assert ref.xid == 0xDEADBEEF
    assert int(ref.flags) == 0x8000
    assert ref.ciaddr == "10.0.0.9"
    assert ref.yiaddr == "10.0.0.50"
    assert ref.siaddr == "10.0.0.1"
    assert ref.giaddr == "10.1.2.3"
    assert ref.chaddr == CHADDR + bytes(10)
    assert ref.sname == b"pixiebox".ljust(64, b"\0")
    assert ref.file == b"efi64/ipxe.efi".ljust(128, b"\0")


def test_encode_decodes_with_scapy_options_by_name() -> None:
    wire = encode(make_offer())
    opts = [o for o in BOOTP(wire)[DHCP].options if o != "pad"]
    assert opts == [
        ("message-type", 2),
        ("server_id", "10.0.0.1"),
        ("lease_time", 3600),
        ("subnet_mask", "255.255.255.0"),
        ("router", "10.0.0.254"),
        ("name_server", "1.1.1.1", "8.8.8.8"),
        ("tftp_server_name", b"10.0.0.1"),
        ("vendor_class_id", b"PXEClient"),
        ("vendor_specific", b"\x06\x01\x08\xff"),
        ("relay_agent_information", RELAY_INFO),
        "end",
    ]


def test_encode_matches_scapy_raw_options() -> None:
    offer = make_offer()
    assert scapy_raw_options(encode(offer)) == offer.options


# --- RFC 3396 long options and RFC 2132 9.3 overload -------------------------------------


def test_long_option_is_split_and_round_trips() -> None:
    payload = bytes(i % 251 for i in range(600))
    p = Packet(op=BOOTREPLY, xid=1, chaddr=CHADDR, options={224: payload, 53: b"\x05"})
    wire = encode(p)
    pieces = [o for o in BOOTP(wire)[DHCP].options if isinstance(o, tuple) and o[0] == 224]
    assert [len(o[1]) for o in pieces] == [255, 255, 90]
    assert b"".join(o[1] for o in pieces) == payload
    assert decode(wire).options[224] == payload


def test_repeated_option_instances_are_concatenated() -> None:
    wire = bytes(
        BOOTP(xid=3, chaddr=CHADDR)
        / DHCP(options=[(224, b"abc"), ("message-type", 1), (224, b"def"), (224, b"g"), "end"])
    )
    p = decode(wire)
    assert p.options[224] == b"abcdefg"
    assert list(p.options) == [224, 53]


def test_overload_both_fields() -> None:
    file_opts = b"\x0c\x04node" + b"\x3c\x03abc" + b"\xff"
    sname_opts = b"\x00\x3c\x03def" + b"\x61\x11" + UUID + b"\xff"
    wire = bytes(
        BOOTP(xid=5, chaddr=CHADDR, file=file_opts, sname=sname_opts)
        / DHCP(
            options=[
                ("message-type", "discover"),
                ("dhcp-option-overload", 3),
                ("vendor_class_id", b"XYZ"),
                "end",
            ]
        )
    )
    p = decode(wire)
    assert p.file == b""
    assert p.sname == b""
    assert p.hostname == "node"
    assert p.client_uuid == UUID
    # RFC 3396 5: options field, then file, then sname.
    assert p.options[Opt.VENDOR_CLASS] == b"XYZabcdef"
    assert p.message_type is MessageType.DISCOVER
    assert Opt.OVERLOAD not in p.options


def test_overload_file_only_keeps_sname() -> None:
    wire = bytes(
        BOOTP(xid=5, chaddr=CHADDR, file=b"\x0c\x02ab\xff", sname=b"server\0junk")
        / DHCP(options=[("dhcp-option-overload", 1), "end"])
    )
    p = decode(wire)
    assert p.file == b""
    assert p.sname == b"server"
    assert p.hostname == "ab"


@pytest.mark.parametrize("value", [b"", b"\x04", b"\x00", b"\x01\x01"])
def test_bad_overload_value(value: bytes) -> None:
    wire = header_only() + bytes([52, len(value)]) + value + b"\xff"
    with pytest.raises(DecodeError):
        decode(wire)


def test_truncated_option_in_overloaded_file() -> None:
    wire = bytes(
        BOOTP(xid=5, chaddr=CHADDR, file=b"\x00" * 126 + b"\x0c\x05")
        / DHCP(options=[("dhcp-option-overload", 1), "end"])
    )
    with pytest.raises(DecodeError):
        decode(wire)


# --- decode rules -------------------------------------------------------------------------


def test_decode_strips_sname_and_file_at_first_nul() -> None:
    wire = bytes(
        BOOTP(xid=1, chaddr=CHADDR, sname=b"srv\0garbage", file=b"pxelinux.0\0old.efi")
        / DHCP(options=["end"])
    )
    p = decode(wire)
    assert p.sname == b"srv"
    assert p.file == b"pxelinux.0"


def test_decode_short_packet() -> None:
    with pytest.raises(DecodeError):
        decode(scapy_discover()[:239])
    with pytest.raises(DecodeError):
        decode(b"")


def test_decode_bad_cookie() -> None:
    wire = bytearray(scapy_discover())
    wire[239] ^= 0xFF
    with pytest.raises(DecodeError):
        decode(bytes(wire))


def test_decode_hlen_too_large() -> None:
    with pytest.raises(DecodeError):
        decode(header_only(hlen=17))
    assert decode(header_only(hlen=16)).hlen == 16


@pytest.mark.parametrize("tail", [b"\x3c", b"\x3c\x0aabc", b"\x35\x01\x01\x3c\x05abcd"])
def test_decode_truncated_option(tail: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(header_only() + tail)


def test_decode_missing_end_and_trailing_after_end() -> None:
    p = decode(header_only() + b"\x35\x01\x01\x00\x00")
    assert p.message_type is MessageType.DISCOVER
    p = decode(header_only() + b"\x35\x01\x03\xff\x3c\x99junk")
    assert p.options == {53: b"\x03"}


def test_decode_accepts_bytearray_and_memoryview() -> None:
    wire = scapy_discover()
    assert decode(bytearray(wire)) == decode(wire)
    assert decode(memoryview(wire)) == decode(wire)


# --- encode rules -------------------------------------------------------------------------


def test_encode_puts_message_type_first_and_pads() -> None:
    p = Packet(op=BOOTREPLY, xid=1, chaddr=CHADDR, options={60: b"PXEClient", 53: b"\x02"})
    wire = encode(p)
    assert len(wire) == 300
    assert wire[236:240] == COOKIE
    assert wire[240:243] == b"\x35\x01\x02"
    assert wire[243:254] == b"\x3c\x09PXEClient"
    assert wire[254] == 0xFF
    assert wire[255:] == bytes(45)


def test_encode_long_packet_is_not_padded() -> None:
    p = Packet(op=BOOTREPLY, xid=1, chaddr=CHADDR, options={224: b"x" * 200})
    assert len(encode(p)) == 240 + 2 + 200 + 1


def test_encode_nul_terminates_max_length_boot_fields() -> None:
    p = Packet(op=BOOTREPLY, xid=1, chaddr=CHADDR, sname=b"s" * 63, file=b"f" * 127)
    wire = encode(p)
    assert wire[44:107] == b"s" * 63 and wire[107] == 0
    assert wire[108:235] == b"f" * 127 and wire[235] == 0
    assert scapy_raw_options(wire) == {}  # no overload option sneaked in
    q = decode(wire)
    assert q.sname == b"s" * 63 and q.file == b"f" * 127


@pytest.mark.parametrize(
    ("field", "value"),
    [("file", b"f" * 128), ("sname", b"s" * 64), ("file", b"a\0b"), ("sname", b"\0")],
)
def test_encode_rejects_bad_boot_fields(field: str, value: bytes) -> None:
    p = Packet(op=BOOTREPLY, xid=1, chaddr=CHADDR)
    setattr(p, field, value)
    with pytest.raises(EncodeError, match=field):
        encode(p)


@pytest.mark.parametrize(
    "packet",
    [
        Packet(op=BOOTREPLY, xid=1, chaddr=bytes(17)),
        Packet(op=BOOTREPLY, xid=1, chaddr=CHADDR, hlen=17),
        Packet(op=BOOTREPLY, xid=2**32, chaddr=CHADDR),
        Packet(op=256, xid=1, chaddr=CHADDR),
        Packet(op=BOOTREPLY, xid=1, chaddr=CHADDR, options={0: b"x"}),
        Packet(op=BOOTREPLY, xid=1, chaddr=CHADDR, options={255: b""}),
        Packet(op=BOOTREPLY, xid=1, chaddr=CHADDR, options={52: b"\x03"}),
    ],
)
def test_encode_rejects_unencodable(packet: Packet) -> None:
    with pytest.raises(EncodeError):
        encode(packet)


def test_encode_empty_option() -> None:
    p = Packet(op=BOOTREPLY, xid=1, chaddr=CHADDR, options={80: b""})
    wire = encode(p)
    assert wire[240:243] == b"\x50\x00\xff"
    assert decode(wire).options == {80: b""}


# --- reply() ------------------------------------------------------------------------------


def test_reply_skeleton() -> None:
    req = decode(scapy_discover())
    rep = req.reply(MessageType.OFFER)
    assert rep.op == BOOTREPLY
    assert rep.xid == 0x1234ABCD
    assert rep.chaddr == req.chaddr
    assert rep.htype == 1 and rep.hlen == 6
    assert rep.flags == 0x8000
    assert rep.giaddr == IPv4Address("10.1.2.3")
    assert rep.hops == 0 and rep.secs == 0
    assert rep.ciaddr == rep.yiaddr == rep.siaddr == IPv4Address(0)
    assert rep.sname == b"" and rep.file == b""
    assert rep.options == {53: b"\x02", 82: RELAY_INFO}
    assert rep.message_type is MessageType.OFFER
    # The reply's options must not alias the request's.
    rep.options[60] = b"PXEClient"
    assert req.options[60] == PXE_VENDOR_CLASS
    ref = BOOTP(encode(rep))
    assert ref[DHCP].options[:2] == [
        ("message-type", 2),
        ("relay_agent_information", RELAY_INFO),
    ]


def test_reply_without_relay_info() -> None:
    req = Packet(op=BOOTREQUEST, xid=8, chaddr=CHADDR, options={53: b"\x03", 12: b"h"})
    assert req.reply(MessageType.ACK).options == {53: b"\x05"}


# --- property accessors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\x04iPXE\x03foo", ("iPXE", "foo")),
        (b"iPXE", ("iPXE",)),
        (b"\x04iPXE\x00", ("\x04iPXE\x00",)),  # zero-length class is not RFC 3004
        (b"\x05iPXE", ("\x05iPXE",)),
        (b"", ()),
    ],
)
def test_user_classes(payload: bytes, expected: tuple[str, ...]) -> None:
    p = Packet(op=BOOTREQUEST, xid=1, chaddr=CHADDR, options={77: payload})
    assert p.user_classes == expected


def test_absent_options() -> None:
    p = Packet(op=BOOTREQUEST, xid=1, chaddr=CHADDR)
    assert p.message_type is None
    assert p.requested_ip is None
    assert p.server_id is None
    assert p.client_arches == ()
    assert p.vendor_class is None
    assert p.user_classes == ()
    assert p.client_uuid is None
    assert p.parameter_request_list == ()
    assert p.max_message_size is None
    assert p.hostname is None
    assert p.broadcast is False


@pytest.mark.parametrize(
    ("prop", "code", "payload"),
    [
        ("message_type", 53, b""),
        ("message_type", 53, b"\x01\x01"),
        ("message_type", 53, b"\x00"),
        ("message_type", 53, b"\x09"),
        ("requested_ip", 50, b"\x0a\x00\x00"),
        ("server_id", 54, b"\x0a\x00\x00\x01\x00"),
        ("client_arches", 93, b"\x00"),
        ("client_arches", 93, b""),
        ("max_message_size", 57, b"\x05\xdc\x00"),
    ],
)
def test_malformed_option_raises_decode_error(prop: str, code: int, payload: bytes) -> None:
    p = Packet(op=BOOTREQUEST, xid=1, chaddr=CHADDR, options={code: payload})
    with pytest.raises(DecodeError):
        getattr(p, prop)


@pytest.mark.parametrize(("htype", "hlen"), [(6, 6), (1, 8), (32, 0)])
def test_mac_needs_ethernet(htype: int, hlen: int) -> None:
    p = Packet(op=BOOTREQUEST, xid=1, chaddr=CHADDR + bytes(10), htype=htype, hlen=hlen)
    with pytest.raises(DecodeError):
        _ = p.mac


def test_mac_with_short_chaddr() -> None:
    with pytest.raises(DecodeError):
        _ = Packet(op=BOOTREQUEST, xid=1, chaddr=b"\x01\x02").mac
    assert Packet(op=BOOTREQUEST, xid=1, chaddr=bytes.fromhex("AABBCCDDEEFF")).mac == (
        "aa:bb:cc:dd:ee:ff"
    )


# --- sub-options --------------------------------------------------------------------------


def test_suboptions_round_trip() -> None:
    subs = {6: b"\x08", 9: b"\x00\x00\x01x", 71: b"\x00\x00"}
    wire = encode_suboptions(subs)
    assert wire == b"\x06\x01\x08\x09\x04\x00\x00\x01x\x47\x02\x00\x00\xff"
    assert decode_suboptions(wire) == subs
    assert encode_suboptions({}) == b"\xff"


def test_decode_suboptions_tolerates_pad_and_missing_end() -> None:
    assert decode_suboptions(b"\x00\x01\x02ab\x00\x02\x00") == {1: b"ab", 2: b""}


@pytest.mark.parametrize("data", [b"\x01", b"\x01\x05abc", b"\x01\x01a\x02"])
def test_decode_suboptions_malformed(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_suboptions(data)


@pytest.mark.parametrize("subs", [{0: b"x"}, {255: b"x"}, {1: b"x" * 256}])
def test_encode_suboptions_rejects(subs: dict[int, bytes]) -> None:
    with pytest.raises(EncodeError):
        encode_suboptions(subs)


# --- hypothesis ---------------------------------------------------------------------------

PROPERTIES = sorted(name for name, v in vars(Packet).items() if isinstance(v, property))


def test_property_list_is_complete() -> None:
    # Guard for the fuzzers below: they exercise every property by name.
    assert set(PROPERTIES) >= set(HANDLER_ACCESSORS)


def check_decode_total(data: bytes) -> None:
    """decode() and every accessor either work or raise DecodeError; re-encoding is faithful."""
    try:
        p = decode(data)
    except DecodeError:
        return
    assert isinstance(p, Packet)
    read_accessors(p, PROPERTIES)
    # A reply to anything we managed to decode must always be encodable.
    decode(encode(p.reply(MessageType.NAK)))
    check_round_trip(p)


_interesting_codes = st.sampled_from([0, 12, 43, 50, 52, 53, 54, 55, 57, 60, 77, 82, 93, 97, 255])
_option_tlv = st.tuples(
    st.one_of(_interesting_codes, st.integers(0, 255)), st.binary(max_size=20)
).map(lambda cv: bytes([cv[0], len(cv[1])]) + cv[1])
_option_tail = st.lists(st.one_of(_option_tlv, st.binary(max_size=3)), max_size=12).map(b"".join)
_field_with_options = st.one_of(st.binary(max_size=128), _option_tail)


@st.composite
def dhcp_shaped(draw: Callable[..., Any]) -> bytes:
    """Random header with a plausible hlen, the cookie, and a TLV-ish options tail."""
    header = bytearray(draw(st.binary(min_size=236, max_size=236)))
    header[2] = draw(st.integers(0, 18))
    sname: bytes = draw(_field_with_options)
    file: bytes = draw(_field_with_options)
    tail: bytes = draw(_option_tail)
    header[44:108] = sname[:64].ljust(64, b"\0")
    header[108:236] = file[:128].ljust(128, b"\0")
    return bytes(header) + COOKIE + tail


_addresses = st.integers(0, 2**32 - 1).map(IPv4Address)


def _cstring(max_size: int) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=max_size).map(lambda b: b.replace(b"\0", b"\x01"))


# Mostly short payloads, sometimes long enough to need RFC 3396 splitting.
_option_values = st.one_of(st.binary(max_size=24), st.binary(min_size=250, max_size=600))

packets = st.builds(
    Packet,
    op=st.integers(0, 255),
    xid=st.integers(0, 2**32 - 1),
    chaddr=st.binary(max_size=16),
    htype=st.integers(0, 255),
    hlen=st.integers(0, 16),
    hops=st.integers(0, 255),
    secs=st.integers(0, 2**16 - 1),
    flags=st.integers(0, 2**16 - 1),
    ciaddr=_addresses,
    yiaddr=_addresses,
    siaddr=_addresses,
    giaddr=_addresses,
    sname=_cstring(63),
    file=_cstring(127),
    options=st.dictionaries(
        st.integers(1, 254).filter(lambda c: c != 52), _option_values, max_size=8
    ),
)


@FUZZ_CHEAP
@given(st.binary(max_size=700))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    check_decode_total(data)


@FUZZ
@given(dhcp_shaped())
def test_fuzz_dhcp_shaped(data: bytes) -> None:
    check_decode_total(data)


@FUZZ
@given(
    st.one_of(packets.map(encode), st.just(scapy_discover())),
    st.data(),
)
def test_fuzz_truncated_and_flipped(wire: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(wire)), label="cut")
    mutated = bytearray(wire[:cut])
    if mutated:
        flips = data.draw(
            st.lists(st.tuples(st.integers(0, len(mutated) - 1), st.integers(0, 255)), max_size=6),
            label="flips",
        )
        for index, value in flips:
            mutated[index] = value
    check_decode_total(bytes(mutated))


@FUZZ
@given(packets)
def test_round_trip(p: Packet) -> None:
    wire = encode(p)
    assert len(wire) >= 300
    assert wire[236:240] == COOKIE
    if 53 in p.options:
        assert wire[240] == 53
    expected = dataclasses.replace(p, chaddr=p.chaddr.ljust(16, b"\0"))
    assert decode(wire) == expected


# scapy dissects codes it has a typed field for (IP addresses, ints) and gives up on payloads of
# the wrong size; codes it keeps raw can carry arbitrary bytes.
_SCAPY_RAW_CODES = [
    c for c in range(1, 255) if c != 52 and not isinstance(DHCPOptions.get(c), Field)
]


@settings(max_examples=300, deadline=None)
@given(
    packets,
    st.dictionaries(st.sampled_from(_SCAPY_RAW_CODES), _option_values, max_size=8),
)
def test_round_trip_against_scapy(p: Packet, options: dict[int, bytes]) -> None:
    p.options = options
    wire = encode(p)
    ref = BOOTP(wire)
    assert ref.xid == p.xid
    assert int(ref.flags) == p.flags
    assert ref.ciaddr == str(p.ciaddr)
    assert ref.yiaddr == str(p.yiaddr)
    assert ref.siaddr == str(p.siaddr)
    assert ref.giaddr == str(p.giaddr)
    assert ref.chaddr == p.chaddr.ljust(16, b"\0")
    assert ref.sname == p.sname.ljust(64, b"\0")
    assert ref.file == p.file.ljust(128, b"\0")
    assert scapy_raw_options(wire) == p.options
