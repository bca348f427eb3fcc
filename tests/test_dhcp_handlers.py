"""The mode handlers, driven in-process with encoded packets: the RFC 2131 paths that the
dhclient tests do not reach (INFORM, DECLINE, RELEASE, REBIND, relays) and the boot-file policy
for every architecture."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from pixiebox.config import LabConfig
from pixiebox.core.firmware import Assets
from pixiebox.core.inventory import Inventory
from pixiebox.core.urls import BootUrls
from pixiebox.dhcp.codec import BOOTREQUEST, MessageType, Opt, Packet, decode, encode
from pixiebox.dhcp.full import FullHandler
from pixiebox.dhcp.leases import AddressBook
from pixiebox.dhcp.policy import BootPolicy
from pixiebox.dhcp.proxy import ProxyHandler
from pixiebox.dhcp.reservation import ReservationHandler
from pixiebox.dhcp.server import DhcpServer, reply_destination
from pixiebox.events import Event, Kind
from pixiebox.store.state import StateStore

SERVER = IPv4Address("10.0.0.2")
SUBNET = IPv4Network("10.0.0.0/24")
C1_MAC = "02:00:00:00:00:01"
C1_IP = IPv4Address("10.0.0.31")
STRANGER = "02:00:00:00:00:99"


def config(**boot: object) -> LabConfig:
    return LabConfig.model_validate({
        "network": {"subnet": str(SUBNET), "gateway": "10.0.0.1", "dns": ["10.0.0.1"],
                    "pool": "10.0.0.100-10.0.0.101", "lease_time": "1h"},
        "boot": boot,
        "machines": [{"name": "c1", "mac": C1_MAC, "ip": str(C1_IP)}],
    })  # fmt: skip


@pytest.fixture
def assets(tmp_path: Path) -> Assets:
    root = tmp_path / "assets"
    (root / "ipxe").mkdir(parents=True)
    for name in ("undionly.kpxe", "ipxe.efi"):
        (root / "ipxe" / name).write_bytes(b"x")
    # Point the system fallback at an empty directory: the test decides what exists.
    return Assets(root, system_ipxe=tmp_path / "no-system-ipxe")


def make(kind: type, tmp_path: Path, assets: Assets, **boot: object) -> object:
    store = StateStore(tmp_path / "state")
    inventory = Inventory(config(**boot), store)
    policy = BootPolicy(assets, BootUrls(SERVER))
    if kind is ProxyHandler:
        return ProxyHandler(inventory, policy)
    pool = inventory.config.network.pool if kind is FullHandler else None
    return kind(inventory, policy, AddressBook(store, pool), SUBNET)


def request(
    kind: MessageType,
    mac: str = C1_MAC,
    *,
    arch: int | None = None,
    ciaddr: str = "0.0.0.0",
    giaddr: str = "0.0.0.0",
    options: dict[int, bytes] | None = None,
) -> Packet:
    opts: dict[int, bytes] = {Opt.MESSAGE_TYPE: bytes((kind,))}
    if arch is not None:
        opts[Opt.VENDOR_CLASS] = f"PXEClient:Arch:{arch:05d}:UNDI:003016".encode()
        opts[Opt.CLIENT_ARCH] = arch.to_bytes(2, "big")
    opts.update(options or {})
    chaddr = bytes.fromhex(mac.replace(":", ""))
    packet = Packet(op=BOOTREQUEST, xid=0x1234, chaddr=chaddr, ciaddr=IPv4Address(ciaddr),
                    giaddr=IPv4Address(giaddr), options=opts)  # fmt: skip
    return decode(encode(packet))  # through the wire format, as the server sees it


def events(handler: object, mac: str) -> list[Event]:
    """`mac`'s events as the handler recorded them (the agent's API shows the same)."""
    return handler.inventory.lifecycle.events(mac)  # type: ignore[attr-defined, no-any-return]


def answer(handler: object, packet: Packet, port: int = 67) -> Packet | None:
    reply = handler.handle(packet, port)  # type: ignore[attr-defined]
    return None if reply is None else decode(encode(reply))


def test_inform_gets_options_but_no_address_or_lease(tmp_path: Path, assets: Assets) -> None:
    handler = make(ReservationHandler, tmp_path, assets)
    reply = answer(handler, request(MessageType.INFORM, ciaddr="10.0.0.57"))
    assert reply is not None and reply.message_type is MessageType.ACK
    assert reply.yiaddr == IPv4Address(0)  # RFC 2131 4.3.5: no yiaddr, no lease time
    assert Opt.LEASE_TIME not in reply.options
    assert reply.options[Opt.ROUTER] == IPv4Address("10.0.0.1").packed
    assert reply_destination(request(MessageType.INFORM, ciaddr="10.0.0.57"), reply, 67,
                             ("10.0.0.57", 68)) == ("10.0.0.57", 68)  # fmt: skip


def test_rebind_broadcast_with_ciaddr_is_acked(tmp_path: Path, assets: Assets) -> None:
    handler = make(ReservationHandler, tmp_path, assets)
    reply = answer(handler, request(MessageType.REQUEST, ciaddr=str(C1_IP)))
    assert reply is not None and reply.message_type is MessageType.ACK
    assert reply.yiaddr == C1_IP


def test_request_for_another_servers_offer_is_ignored(tmp_path: Path, assets: Assets) -> None:
    handler = make(FullHandler, tmp_path, assets)
    other = {Opt.SERVER_ID: IPv4Address("10.0.0.1").packed,
             Opt.REQUESTED_IP: IPv4Address("10.0.0.100").packed}  # fmt: skip
    assert answer(handler, request(MessageType.REQUEST, STRANGER, options=other)) is None


def test_request_for_an_address_off_the_network_is_naked(tmp_path: Path, assets: Assets) -> None:
    handler = make(FullHandler, tmp_path, assets)
    wrong = {Opt.REQUESTED_IP: IPv4Address("192.168.5.5").packed}
    reply = answer(handler, request(MessageType.REQUEST, STRANGER, options=wrong))
    assert reply is not None and reply.message_type is MessageType.NAK
    assert reply.yiaddr == IPv4Address(0)
    assert reply.options[Opt.SERVER_ID] == SERVER.packed


def test_release_then_decline_in_full_mode(tmp_path: Path, assets: Assets) -> None:
    handler = make(FullHandler, tmp_path, assets)
    offer = answer(handler, request(MessageType.DISCOVER, STRANGER))
    assert offer is not None
    ip = offer.yiaddr
    ours = {Opt.SERVER_ID: SERVER.packed, Opt.REQUESTED_IP: ip.packed}
    ack = answer(handler, request(MessageType.REQUEST, STRANGER, options=ours))
    assert ack is not None and ack.message_type is MessageType.ACK
    # Another client cannot have it while it is bound...
    taken = answer(handler, request(MessageType.REQUEST, "02:00:00:00:00:98", options=ours))
    assert taken is not None and taken.message_type is MessageType.NAK
    # ...but can once it is released.
    release = request(MessageType.RELEASE, STRANGER, ciaddr=str(ip),
                      options={Opt.SERVER_ID: SERVER.packed})  # fmt: skip
    assert answer(handler, release) is None
    other = answer(handler, request(MessageType.REQUEST, "02:00:00:00:00:98", options=ours))
    assert other is not None and other.message_type is MessageType.ACK
    # A DECLINE (the address is in use by someone else) takes it out of the pool.
    answer(handler, request(MessageType.DECLINE, "02:00:00:00:00:98", options=ours))
    macs = [f"02:00:00:00:01:0{n}" for n in range(3)]
    offers = [answer(handler, request(MessageType.DISCOVER, mac)) for mac in macs]
    assert ip not in {o.yiaddr for o in offers if o is not None}
    # Each step is a dhcp.lease event (no boot information), its action and address as fields.
    assert [(e.kind, e.fields) for e in events(handler, STRANGER)] == [
        (Kind.DHCP_LEASE, {"action": "offered", "ip": str(ip)}),
        (Kind.DHCP_LEASE, {"action": "bound", "ip": str(ip), "lease_time": 3600}),
        (Kind.DHCP_LEASE, {"action": "released", "ip": str(ip)}),
    ]
    assert events(handler, "02:00:00:00:00:98")[-1].fields == {"action": "declined", "ip": str(ip)}


def test_relayed_requests_are_answered_through_the_relay(tmp_path: Path, assets: Assets) -> None:
    handler = make(ReservationHandler, tmp_path, assets)
    relay_info = bytes([1, 4]) + b"port"
    relayed = request(MessageType.DISCOVER, giaddr="10.0.0.254",
                      options={Opt.RELAY_AGENT_INFO: relay_info})  # fmt: skip
    reply = answer(handler, relayed)
    assert reply is not None and reply.yiaddr == C1_IP
    assert reply.giaddr == IPv4Address("10.0.0.254")
    assert reply.options[Opt.RELAY_AGENT_INFO] == relay_info  # RFC 3046 2.2
    assert reply_destination(relayed, reply, 67, ("10.0.0.254", 67)) == ("10.0.0.254", 67)


def test_reservation_offer_carries_boot_file_for_pxe_clients(
    tmp_path: Path, assets: Assets
) -> None:
    handler = make(ReservationHandler, tmp_path, assets)
    reply = answer(handler, request(MessageType.DISCOVER, arch=7))
    assert reply is not None
    assert (reply.yiaddr, reply.file, reply.siaddr) == (C1_IP, b"ipxe.efi", SERVER)
    assert reply.options[Opt.HOSTNAME] == b"c1"
    plain = answer(handler, request(MessageType.DISCOVER))
    assert plain is not None and plain.file == b""  # the OSIE's own dhclient: no boot file
    booting, leasing = events(handler, C1_MAC)
    assert booting.kind == Kind.DHCP_OFFER
    assert booting.fields == {"mode": "reservation", "port": 67, "firmware": "UEFI",
                              "arch": "x86_64", "ipxe": False, "boot_file": "ipxe.efi",
                              "ip": str(C1_IP)}  # fmt: skip
    assert (leasing.kind, leasing.get("action")) == (Kind.DHCP_LEASE, "offered")
    ours = {Opt.SERVER_ID: SERVER.packed, Opt.REQUESTED_IP: C1_IP.packed}
    assert answer(handler, request(MessageType.REQUEST, arch=7, options=ours)) is not None
    acked = events(handler, C1_MAC)[-1]
    assert (acked.kind, acked.get("boot_file"), acked.get("ip")) == (
        Kind.DHCP_ACK, "ipxe.efi", str(C1_IP)
    )  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "expected", "vendor"),
    [
        (0, "undionly.kpxe", "PXEClient"),
        (6, "ipxe.efi", "PXEClient"),  # quirk 12: no i386 build, x86-64 laptops send 6
        (7, "ipxe.efi", "PXEClient"),
        (9, "ipxe.efi", "PXEClient"),
        (16, "http://10.0.0.2/ipxe/ipxe.efi", "HTTPClient"),
        (22, "pxelinux.0", "PXEClient"),
    ],
)
def test_boot_file_by_architecture(
    tmp_path: Path, assets: Assets, arch: int, expected: str, vendor: str
) -> None:
    handler = make(ProxyHandler, tmp_path, assets)
    reply = answer(handler, request(MessageType.DISCOVER, arch=arch))
    assert reply is not None
    assert reply.file.decode() == expected
    assert reply.vendor_class == vendor
    (offered,) = events(handler, C1_MAC)
    assert offered.kind == Kind.DHCP_OFFER
    assert (offered.get("mode"), offered.get("port"), offered.get("boot_file")) == (
        "proxy", 67, expected
    )  # fmt: skip


def test_proxy_ack_on_4011_to_ipxe_is_a_dhcp_ack_event_naming_the_script(
    tmp_path: Path, assets: Assets
) -> None:
    handler = make(ProxyHandler, tmp_path, assets)
    ipxe = {Opt.USER_CLASS: b"\x04iPXE"}  # RFC 3004, as iPXE sends it
    reply = answer(handler, request(MessageType.REQUEST, arch=7, options=ipxe), port=4011)
    assert reply is not None and reply.message_type is MessageType.ACK
    (acked,) = events(handler, C1_MAC)
    assert acked.kind == Kind.DHCP_ACK
    assert acked.fields == {"mode": "proxy", "port": 4011, "firmware": "iPXE", "arch": "x86_64",
                            "ipxe": True, "boot_file": reply.file.decode()}  # fmt: skip
    assert acked.get("boot_file") == f"http://{SERVER}/boot/{C1_MAC}.ipxe"


@pytest.mark.parametrize(("arch", "missing", "hint"), [
    (11, "ipxe-arm64.efi", "install Debian trixie's ipxe package"),
    (10, "snp-arm32.efi", "Debian's ipxe package has none"),
    (19, "ipxe-arm64.efi", "install Debian trixie's ipxe package"),
])  # fmt: skip
def test_missing_arm_build_is_not_offered_and_the_log_names_the_file(
    tmp_path: Path, assets: Assets, arch: int, missing: str, hint: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    handler = make(ProxyHandler, tmp_path, assets)
    with caplog.at_level(logging.INFO, logger="pixiebox"):
        assert answer(handler, request(MessageType.DISCOVER, arch=arch)) is None
    text = caplog.text
    assert f"{missing} is missing" in text
    assert str(assets.root / "ipxe" / missing) in text
    assert hint in text


def test_unknown_machines_are_ignored_with_one_log_line(
    tmp_path: Path, assets: Assets, caplog: pytest.LogCaptureFixture
) -> None:
    handler = make(ProxyHandler, tmp_path, assets, unknown="ignore")
    with caplog.at_level(logging.INFO, logger="pixiebox"):
        for _ in range(3):
            assert answer(handler, request(MessageType.DISCOVER, STRANGER, arch=0)) is None
    lines = [r.getMessage() for r in caplog.records if STRANGER in r.getMessage()]
    assert len(lines) == 1
    assert 'unknown = "ignore"' in lines[0]
    enrolled = answer(handler, request(MessageType.DISCOVER, C1_MAC, arch=0))
    assert enrolled is not None and enrolled.file == b"undionly.kpxe"


def test_unsupported_architecture_is_not_answered(tmp_path: Path, assets: Assets) -> None:
    handler = make(ProxyHandler, tmp_path, assets)
    assert answer(handler, request(MessageType.DISCOVER, arch=12)) is None  # PowerPC


def test_server_survives_a_handler_crash(tmp_path: Path, assets: Assets) -> None:
    class Exploding:
        mode = "test"
        ports = (67,)

        def handle(self, request: Packet, port: int) -> Packet | None:
            raise RuntimeError("boom")

        def flush(self) -> None:
            pass

        def reload(self) -> None:
            pass

        def held_addresses(self) -> set[IPv4Address]:
            return set()

        def known(self, mac: str) -> bool:
            return False

    server = DhcpServer(Exploding(), "lo")
    payload = encode(request(MessageType.DISCOVER))
    assert server.answer(payload, 67, ("0.0.0.0", 68)) is None
    assert server.stats["failed"] == 1
    assert server.answer(b"\x00" * 10, 67, ("0.0.0.0", 68)) is None
    assert server.stats["malformed"] == 1
