"""Issue 13 item 7: the DHCP parsers an outsider reaches, fuzzed (hypothesis).

Every datagram on ports 67 and 4011 goes through `codec.decode`, the typed accessors on
`Packet`, `policy.boot_client` and a mode's handler, inside `DhcpServer.answer`. The server
drops a packet that raises DecodeError or EncodeError ("malformed"); anything else is caught
by its last-resort handler, counted as "failed" and logged with a traceback: that is a bug, and
these tests fail on it. Inputs are structure-aware (real PXE requests, built by the codec and by
scapy, with options replaced, repeated, overloaded, then cut and flipped) so that the fuzzing
gets past the first length check, plus plain bytes.

Reproducible: derandomized, no example database. The codec's own unit fuzzers are in
test_dhcp_codec.py; these go through the whole answer path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest
from dhcpchecks import HANDLER_ACCESSORS, check_round_trip, read_accessors
from fuzzing import fuzz, log_records
from hypothesis import given
from hypothesis import strategies as st
from pixiebox.config import LabConfig
from pixiebox.core.firmware import Assets
from pixiebox.core.inventory import Inventory
from pixiebox.core.urls import BootUrls
from pixiebox.dhcp.codec import (
    BOOTREPLY,
    BOOTREQUEST,
    MAGIC_COOKIE,
    DecodeError,
    MessageType,
    Opt,
    Packet,
    decode,
    encode,
)
from pixiebox.dhcp.full import FullHandler
from pixiebox.dhcp.leases import AddressBook
from pixiebox.dhcp.policy import BootClient, BootPolicy, NotABootRequest, boot_client
from pixiebox.dhcp.proxy import ProxyHandler
from pixiebox.dhcp.server import DhcpServer
from pixiebox.store.state import StateStore
from scapy.layers.dhcp import BOOTP, DHCP

SERVER = IPv4Address("10.0.0.2")
SUBNET = IPv4Network("10.0.0.0/24")
C1 = bytes.fromhex("020000000001")
MACS = [C1, bytes.fromhex("020000000099"), bytes.fromhex("f44d30647a3a")]
UUID = b"\x00" + bytes(range(16))


# --------------------------------------------------------------------------- what is asserted


def check_total(data: bytes) -> Packet | None:
    """decode() gives a Packet or DecodeError; every accessor a value or DecodeError;
    boot_client a BootClient, None, DecodeError or NotABootRequest; a decoded packet that
    encodes decodes to itself (nothing is lost or invented on the way)."""
    try:
        packet = decode(data)
    except DecodeError:
        return None
    read_accessors(packet, HANDLER_ACCESSORS)
    try:
        client = boot_client(packet)
        assert client is None or isinstance(client, BootClient)
    except (DecodeError, NotABootRequest):
        pass
    check_round_trip(packet)
    return packet


@dataclass
class Lab:
    proxy: DhcpServer
    full: DhcpServer


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A proxy and a full-mode server on one store, answering without sockets."""
    root = tmp_path_factory.mktemp("fuzz-dhcp")
    assets = root / "assets"
    (assets / "ipxe").mkdir(parents=True)
    for name in ("undionly.kpxe", "ipxe.efi", "snp.efi", "ipxe-arm64.efi"):
        (assets / "ipxe" / name).write_bytes(b"x")
    config = LabConfig.model_validate({
        "network": {"subnet": str(SUBNET), "gateway": "10.0.0.1", "dns": ["10.0.0.1"],
                    "server_ip": str(SERVER), "pool": "10.0.0.100-10.0.0.103",
                    "lease_time": "1h"},
        "machines": [{"name": "c1", "mac": C1.hex(":"), "ip": "10.0.0.31"}],
    })  # fmt: skip
    store = StateStore(root / "state")
    try:
        inventory = Inventory(config, store)
        policy = BootPolicy(Assets(assets, system_ipxe=root / "none"), BootUrls(SERVER))
        full = FullHandler(inventory, policy, AddressBook(store, config.network.pool), SUBNET)
        yield Lab(DhcpServer(ProxyHandler(inventory, policy), "lo"), DhcpServer(full, "lo"))
    finally:
        store.close()


def check_answer(server: DhcpServer, data: bytes, port: int) -> None:
    """The server answers, drops as malformed, or ignores; it never fails."""
    failed = server.stats["failed"]  # the servers live for the module: count this one only
    with log_records() as seen:
        result = server.answer(data, port, ("10.0.0.77", 68))
        server.flush()
    assert server.stats["failed"] == failed, seen.text()
    assert not seen.records, seen.text()
    if result is None:
        return
    payload, destination = result
    reply = decode(payload)
    request = decode(data)
    assert reply.op == BOOTREPLY and reply.xid == request.xid and reply.chaddr == request.chaddr
    assert reply.message_type in (MessageType.OFFER, MessageType.ACK, MessageType.NAK)
    host, dport = destination
    IPv4Address(host)
    assert 0 < dport < 65536


# --------------------------------------------------------------------------- strategies

_addresses = st.one_of(
    st.sampled_from([0, int(SERVER), 0x0A00001F, 0x0A000064, 0x0A000065, 0xC0A80505]),
    st.integers(0, 2**32 - 1),
).map(IPv4Address)
_vendor = st.sampled_from(
    [
        b"PXEClient:Arch:00000:UNDI:002001",
        b"PXEClient:Arch:00007:UNDI:003016",
        b"PXEClient:Arch:00011:UNDI:003000",
        b"HTTPClient:Arch:00016:UNDI:003001",
        b"U-Boot.armv8",
        b"PXEClient",
        b"MSFT 5.0",
    ]
)
#: An option code with a payload well formed for it, as firmware sends it.
_OPTION_VALUES: dict[int, st.SearchStrategy[bytes]] = {
    Opt.REQUESTED_IP: _addresses.map(lambda a: a.packed),
    Opt.SERVER_ID: _addresses.map(lambda a: a.packed),
    Opt.VENDOR_CLASS: _vendor,
    Opt.CLIENT_ARCH: st.sampled_from([0, 6, 7, 9, 10, 11, 16, 19, 21, 22, 0xFFFF]).map(
        lambda code: code.to_bytes(2, "big")
    ),
    Opt.USER_CLASS: st.sampled_from([b"iPXE", b"\x04iPXE", b"\x04iPXE\x03foo"]),
    Opt.CLIENT_UUID: st.just(UUID),
    Opt.CLIENT_NDI: st.sampled_from([b"\x01\x02\x01", b"\x01\x03\x10"]),
    Opt.PARAMETER_REQUEST_LIST: st.binary(min_size=1, max_size=12),
    Opt.MAX_MESSAGE_SIZE: st.integers(0, 65535).map(lambda n: n.to_bytes(2, "big")),
    Opt.HOSTNAME: st.binary(min_size=1, max_size=20),
    Opt.CLIENT_ID: st.sampled_from(MACS).map(lambda mac: b"\x01" + mac),
    Opt.RELAY_AGENT_INFO: st.just(b"\x01\x04eth0\x02\x06" + C1),
    Opt.LEASE_TIME: st.binary(min_size=4, max_size=4),
}
#: Payloads of the wrong size or shape for the same codes.
_BAD_VALUES: dict[int, st.SearchStrategy[bytes]] = {
    Opt.CLIENT_ARCH: st.binary(max_size=5),
    Opt.CLIENT_UUID: st.binary(max_size=18),
    Opt.USER_CLASS: st.sampled_from([b"\x00", b"", b"\x09iPXE"]),
    Opt.RELAY_AGENT_INFO: st.sampled_from([b"\x01", b""]),
    Opt.REQUESTED_IP: st.binary(max_size=6),
    Opt.SERVER_ID: st.binary(max_size=6),
    Opt.MAX_MESSAGE_SIZE: st.binary(max_size=3),
}
_any_option = st.tuples(st.integers(1, 254), st.binary(max_size=16))


@st.composite
def requests(draw: st.DrawFn) -> Packet:
    """A PXE or plain DHCP request as firmware sends one, fields and options drawn; one in
    four has options of the wrong shape or unknown codes."""
    sane = draw(st.integers(0, 3)) > 0
    kinds = st.sampled_from([MessageType.DISCOVER, MessageType.REQUEST, *MessageType])
    kind = draw(kinds if sane else st.integers(0, 255))
    options: dict[int, bytes] = {Opt.MESSAGE_TYPE: bytes((int(kind),))}
    for code in draw(st.lists(st.sampled_from(sorted(_OPTION_VALUES)), unique=True, max_size=8)):
        bad = _BAD_VALUES.get(code)
        options[code] = draw(_OPTION_VALUES[code] if sane or bad is None else bad)
    if draw(st.booleans()):  # most boot requests are PXE ones
        options.setdefault(Opt.VENDOR_CLASS, draw(_vendor))
        options.setdefault(Opt.CLIENT_ARCH, draw(_OPTION_VALUES[Opt.CLIENT_ARCH]))
    if not sane:
        for code, value in draw(st.lists(_any_option, max_size=2)):
            if code != 52:
                options.setdefault(code, value)
    if draw(st.booleans()):
        del options[Opt.MESSAGE_TYPE]
        options[Opt.MESSAGE_TYPE] = bytes((int(kind),))  # not first: re-encoding moves it
    return Packet(
        op=BOOTREQUEST if sane else draw(st.sampled_from([BOOTREQUEST, BOOTREPLY, 0, 7])),
        xid=draw(st.integers(0, 2**32 - 1)),
        chaddr=draw(st.sampled_from(MACS) if sane else st.binary(max_size=16)),
        htype=1 if sane else draw(st.sampled_from([1, 6, 32])),
        hlen=6 if sane else draw(st.sampled_from([6, 0, 3, 16])),
        hops=draw(st.integers(0, 255)),
        flags=draw(st.sampled_from([0, 0x8000, 0xFFFF])),
        ciaddr=draw(_addresses),
        giaddr=draw(st.sampled_from([IPv4Address(0), IPv4Address("10.0.0.1"), SERVER])),
        options=options,
    )


def _tlv(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def pxe_discover(xid: int, arch: int, undi: str, more: dict[int, bytes] | None = None) -> bytes:
    """C1's DISCOVER as a PXE ROM of architecture `arch` (option 93) and UNDI version `undi`
    sends it, with `more` options after those."""
    options = {
        Opt.MESSAGE_TYPE: b"\x01",
        Opt.VENDOR_CLASS: f"PXEClient:Arch:{arch:05d}:UNDI:{undi}".encode(),
        Opt.CLIENT_ARCH: arch.to_bytes(2, "big"),
        Opt.CLIENT_UUID: UUID,
        **(more or {}),
    }
    return encode(Packet(op=BOOTREQUEST, xid=xid, chaddr=C1, options=options))


@st.composite
def wires(draw: st.DrawFn) -> bytes:
    """A request on the wire, then perhaps spoiled as a hostile or broken sender would."""
    data = bytearray(encode(draw(requests())))
    end = data.rindex(b"\xff")  # the END the encoder wrote
    tail = bytes(data[end:])
    actions = ["keep", "keep", "keep", "flip", "cut", "repeat", "overload", "garbage"]
    action = draw(st.sampled_from(actions))
    if action == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif action == "cut":
        del data[draw(st.integers(0, len(data))) :]
    elif action == "repeat":
        # RFC 3396: repeated codes are concatenated (a split option 93, 97, 53 ...).
        code = draw(st.sampled_from([53, 50, 54, 60, 77, 93, 97, 57, 82]))
        extra = b"".join(
            _tlv(code, draw(st.binary(max_size=6))) for _ in range(draw(st.integers(1, 3)))
        )
        data[end:] = extra + tail
    elif action == "overload":
        # RFC 2132 9.3: options in the file and/or sname fields, announced by option 52.
        which = draw(st.integers(0, 4))
        moved = b"".join(
            _tlv(code, draw(_OPTION_VALUES[code]))
            for code in draw(st.lists(st.sampled_from(sorted(_OPTION_VALUES)), max_size=3))
        )
        moved += draw(st.sampled_from([b"\xff", b"", b"\x00\x00", b"\x35"]))
        if which & 1:
            data[108:236] = moved[:128].ljust(128, b"\0")
        if which & 2:
            data[44:108] = moved[:64].ljust(64, b"\0")
        data[end:] = _tlv(52, bytes((which,))) + tail
    elif action == "garbage":
        data[end:] = draw(st.binary(max_size=40))
    return bytes(data)


@st.composite
def scapy_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, object]]:
    """A request built by scapy (an implementation independent of ours) and what it holds."""
    fields: dict[str, object] = {
        "xid": draw(st.integers(0, 2**32 - 1)),
        "flags": draw(st.integers(0, 0xFFFF)),
        "secs": draw(st.integers(0, 0xFFFF)),
        "ciaddr": str(draw(_addresses)),
        "giaddr": str(draw(_addresses)),
        "chaddr": draw(st.sampled_from(MACS)),
        "sname": draw(st.binary(max_size=63).map(lambda b: b.replace(b"\0", b"s"))),
        "file": draw(st.binary(max_size=127).map(lambda b: b.replace(b"\0", b"f"))),
    }
    kind = draw(st.sampled_from(["discover", "request", "inform", "release", "decline"]))
    requested = str(draw(_addresses))
    server_id = str(draw(_addresses))
    hostname = draw(st.binary(min_size=1, max_size=30))
    vendor = draw(_vendor)
    prl = draw(st.lists(st.integers(1, 254), min_size=1, max_size=10))
    size = draw(st.integers(576, 65535))
    options = [
        ("message-type", kind),
        ("requested_addr", requested),
        ("server_id", server_id),
        ("hostname", hostname),
        ("vendor_class_id", vendor),
        ("param_req_list", prl),
        ("max_dhcp_size", size),
        "end",
    ]
    wire = bytes(BOOTP(op=1, **fields) / DHCP(options=options))  # type: ignore[arg-type]
    expected: dict[str, object] = {
        **fields,
        "message_type": kind,
        "requested_ip": IPv4Address(requested),
        "server_id": IPv4Address(server_id),
        "hostname": hostname.decode("latin-1"),
        "vendor_class": vendor.decode("latin-1"),
        "parameter_request_list": tuple(prl),
        "max_message_size": size,
    }
    return wire, expected


# --------------------------------------------------------------------------- the codec


@fuzz(400)
@given(st.one_of(wires(), st.binary(max_size=600)))
def test_any_datagram_decodes_or_is_a_decode_error(data: bytes) -> None:
    check_total(data)


def test_every_truncation_of_real_requests() -> None:
    """Each prefix of a few real requests (scapy's, our encoder's, an overloaded one)."""
    pxe = pxe_discover(7, 7, "003016", {
        Opt.USER_CLASS: b"iPXE",
        Opt.HOSTNAME: b"h" * 300,  # split in two (RFC 3396)
    })  # fmt: skip
    overloaded = bytearray(pxe)
    overloaded[108:236] = (_tlv(93, b"\x00\x00") + _tlv(97, UUID) + b"\xff").ljust(128, b"\0")
    end = overloaded.rindex(b"\xff")
    overloaded[end:] = _tlv(52, b"\x01") + b"\xff"
    scapy = bytes(
        BOOTP(op=1, xid=9, chaddr=C1)
        / DHCP(options=[("message-type", "request"), ("requested_addr", "10.0.0.31"), "end"])
    )
    for wire in (pxe, bytes(overloaded), scapy):
        assert check_total(wire) is not None
        for cut in range(len(wire)):
            check_total(wire[:cut])


@fuzz(250)
@given(scapy_requests())
def test_scapy_built_requests_decode_to_what_scapy_put_in(
    built: tuple[bytes, dict[str, object]],
) -> None:
    wire, expected = built
    packet = decode(wire)
    assert packet.op == BOOTREQUEST and packet.xid == expected["xid"]
    assert (packet.flags, packet.secs) == (expected["flags"], expected["secs"])
    assert str(packet.ciaddr) == expected["ciaddr"] and str(packet.giaddr) == expected["giaddr"]
    assert packet.chaddr[:6] == expected["chaddr"] and packet.hlen == 6
    assert (packet.sname, packet.file) == (expected["sname"], expected["file"])
    message_type = packet.message_type
    assert message_type is not None and message_type.name.lower() == expected["message_type"]
    for name in (
        "requested_ip",
        "server_id",
        "hostname",
        "vendor_class",
        "parameter_request_list",
        "max_message_size",
    ):
        assert getattr(packet, name) == expected[name], name
    assert wire[236:240] == MAGIC_COOKIE


# --------------------------------------------------------------------------- the server


@fuzz(300)
@given(st.one_of(wires(), wires(), st.binary(max_size=400)), st.sampled_from([67, 4011]))
def test_the_proxy_server_never_fails_on_a_datagram(lab: Lab, data: bytes, port: int) -> None:
    check_answer(lab.proxy, data, port)


@fuzz(250)
@given(st.one_of(wires(), wires(), st.binary(max_size=400)))
def test_the_full_server_never_fails_on_a_datagram(lab: Lab, data: bytes) -> None:
    check_answer(lab.full, data, 67)


def test_every_truncation_of_a_pxe_discover_is_answered_or_dropped(lab: Lab) -> None:
    wire = pxe_discover(11, 0, "002001")
    before = lab.proxy.stats["answered"]
    for cut in range(len(wire) + 1):
        check_answer(lab.proxy, wire[:cut], 67)
    # The whole request, and the cuts that lose only padding, get their OFFER.
    assert lab.proxy.stats["answered"] > before
