"""The one boot decision (core.decision), the address evidence (core.evidence), and a DHCP
handler answering through a fake backend: plain data, no sockets, no root."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from pixiebox.agent import Agent
from pixiebox.config import LabConfig
from pixiebox.core.decision import (
    BootDecision,
    LabView,
    Loader,
    LoaderCheck,
    Silence,
    decide,
)
from pixiebox.core.evidence import EvidenceBook, Source
from pixiebox.core.firmware import ArchInfo, Assets, arch_info
from pixiebox.core.inventory import Inventory
from pixiebox.core.urls import BootUrls
from pixiebox.dhcp.codec import BOOTREQUEST, MessageType, Opt, Packet, decode, encode
from pixiebox.dhcp.policy import BootPolicy
from pixiebox.dhcp.proxy import PXE_PORT, ProxyHandler
from pixiebox.events import Fields, Kind
from pixiebox.store.state import StateStore

C1 = "02:00:00:00:00:01"
C2 = "02:00:00:00:00:02"  # boots its own image
C3 = "02:00:00:00:00:03"  # names an image lab.toml does not have
STRANGER = "02:00:00:00:00:99"
SERVER = IPv4Address("10.0.0.2")


def lab(unknown: str = "discover", **boot: object) -> LabView:
    config = LabConfig.model_validate({
        "boot": {"unknown": unknown, **boot},
        "images": {"osie": {"kernel": "osie/vmlinuz", "initrd": ["osie/a", "osie/b"],
                            "cmdline": "console=ttyS0"},
                   "rescue": {"kernel": "rescue/vmlinuz"}},
        "machines": [{"name": "c1", "mac": C1, "ip": "10.0.0.31"},
                     {"name": "c2", "mac": C2, "image": "rescue"},
                     {"name": "c3", "mac": C3, "image": "gone"}],
    })  # fmt: skip
    return LabView.of(config)


def arch(code: int | None) -> ArchInfo:
    info = arch_info(code)
    assert info is not None
    return info


def only(*names: str) -> LoaderCheck:
    """A loader check for an appliance that has exactly these files."""
    return lambda name: name in names


# --- decide ----------------------------------------------------------------------------------


def test_an_enrolled_machine_boots_the_default_image_resolved() -> None:
    decision = decide(lab(), C1, arch(0))
    assert decision.boots and decision.known and decision.silent is None
    assert (decision.name, decision.who, decision.policy) == ("c1", f"c1 ({C1})", "discover")
    assert decision.image is not None
    image = decision.image
    assert (image.name, image.kernel, image.initrd, image.cmdline) == (
        "osie", "osie/vmlinuz", ("osie/a", "osie/b"), "console=ttyS0",
    )  # fmt: skip
    assert decision.loader is None  # not asked for: no loader check given


def test_a_machine_boots_its_own_image() -> None:
    decision = decide(lab(), C2, None)
    assert decision.image is not None and decision.image.name == "rescue"
    assert decision.image.initrd == ()


@pytest.mark.parametrize("policy", ["discover", "enroll"])
def test_unknown_machines_boot_the_default_image_unless_ignored(policy: str) -> None:
    decision = decide(lab(policy), STRANGER, arch(7))
    assert decision.boots and not decision.known
    assert decision.who == f"unknown machine {STRANGER}"
    assert decision.image is not None and decision.image.name == "osie"
    assert decision.policy == policy


def test_unknown_machines_get_nothing_under_ignore_and_known_ones_still_boot() -> None:
    ignoring = lab("ignore")
    decision = decide(ignoring, STRANGER, arch(0), loaders=only("undionly.kpxe"))
    assert decision.silent is Silence.UNKNOWN_IGNORED and not decision.boots
    assert (decision.image_name, decision.image, decision.loader) == (None, None, None)
    assert decide(ignoring, C1, arch(0)).boots
    # A board that asks for pxelinux.cfg/default without saying who it is: an unknown machine.
    assert decide(ignoring, None, arch(22)).silent is Silence.UNKNOWN_IGNORED
    assert decide(lab(), None, arch(22)).boots


def test_an_image_without_its_section_is_named_and_not_booted() -> None:
    decision = decide(lab(), C3, None)
    assert decision.silent is Silence.NO_IMAGE
    assert (decision.image_name, decision.image) == ("gone", None)
    # The default image missing: every machine that boots it is told the same.
    assert decide(lab(image="nosuch"), STRANGER, None).silent is Silence.NO_IMAGE


@pytest.mark.parametrize(
    ("code", "present", "expected"),
    [
        (0, ("undionly.kpxe",), Loader("undionly.kpxe", "undionly.kpxe")),
        (7, ("ipxe.efi",), Loader("ipxe.efi", "ipxe.efi")),
        # Quirk 12: code 6 from an x86-64 laptop gets the x86-64 build when there is no i386 one.
        (6, ("ipxe.efi",), Loader("ipxe.efi", "ipxe-i386.efi")),
        (6, ("ipxe.efi", "ipxe-i386.efi"), Loader("ipxe-i386.efi", "ipxe-i386.efi")),
        (11, ("ipxe-arm64.efi",), Loader("ipxe-arm64.efi", "ipxe-arm64.efi")),  # trixie's ipxe
        (19, ("ipxe-arm64.efi",), Loader("ipxe-arm64.efi", "ipxe-arm64.efi")),  # HTTP boot
        (27, ("ipxe-riscv64.efi",), Loader("ipxe-riscv64.efi", "ipxe-riscv64.efi")),
        (11, ("ipxe.efi",), None),  # arm64 without its build
        (22, (), Loader("pxelinux.0", "pxelinux.0")),  # U-Boot: a name only, never fetched
    ],
)
def test_the_first_stage_loader_per_firmware(
    code: int, present: tuple[str, ...], expected: Loader | None
) -> None:
    decision = decide(lab(), C1, arch(code), loaders=only(*present))
    assert decision.loader == expected
    assert decision.silent is (None if expected else Silence.NO_LOADER)
    if expected is not None:
        assert expected.fallback == (expected.file != expected.wanted)


def test_no_loader_wins_over_a_missing_image_and_ignore_over_both() -> None:
    # DHCP stays silent without a loader; with one it still answers a machine whose image is
    # missing, whose iPXE script then says why on its console.
    assert decide(lab(), C3, arch(11), loaders=only()).silent is Silence.NO_LOADER
    assert decide(lab(), C3, arch(0), loaders=only("undionly.kpxe")).silent is Silence.NO_IMAGE
    assert decide(lab("ignore"), STRANGER, arch(11), loaders=only()).silent is (
        Silence.UNKNOWN_IGNORED
    )


def test_deciding_changes_nothing() -> None:
    view = lab("enroll")
    first = decide(view, STRANGER, arch(0))
    assert decide(view, STRANGER, arch(0)) == first
    assert view == lab("enroll")


# --- seen, and the inventory's decision --------------------------------------------------------


def inventory(tmp_path: Path, unknown: str = "discover") -> Inventory:
    return Inventory(lab(unknown).config, StateStore(tmp_path / "state"))


def test_the_first_sighting_of_an_unknown_machine_is_one_typed_event(tmp_path: Path) -> None:
    inv = inventory(tmp_path, "enroll")
    enrolled: list[str] = []
    inv.on_unknown = enrolled.append
    assert inv.seen("00:04:4b:aa:aa:aa", arch(7))
    assert not inv.seen("00:04:4b:aa:aa:aa", None)
    (event,) = inv.lifecycle.events("00:04:4b:aa:aa:aa")
    assert event.kind == Kind.MACHINE_DISCOVERED
    assert dict(event.fields) == {"arch": "x86_64", "firmware": "UEFI", "vendor": "NVIDIA",
                                  "policy": "enroll", "image": "osie"}  # fmt: skip
    assert enrolled == ["00:04:4b:aa:aa:aa"]  # once
    assert inv.seen(C1, arch(0)) and inv.lifecycle.events(C1) == []  # enrolled: no event


def test_under_ignore_the_discovered_event_has_no_image(tmp_path: Path) -> None:
    inv = inventory(tmp_path, "ignore")
    inv.seen(STRANGER, None)
    (event,) = inv.lifecycle.events(STRANGER)
    assert dict(event.fields) == {"policy": "ignore"}  # firmware not reported, no vendor
    assert 'unknown = "ignore"' in event.message


def test_a_reload_swaps_the_config_and_the_mac_index_together(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    before = inv.lab
    assert inv.decide(STRANGER, None).known is False
    grown = before.config.model_copy(
        update={"machines": [*before.config.machines,
                             before.config.machines[0].model_copy(
                                 update={"name": "c9", "mac": STRANGER, "ip": None})]}
    )  # fmt: skip
    inv.reload(grown)
    assert inv.lab is not before and inv.lab.config is grown
    assert inv.decide(STRANGER, None).name == "c9"
    assert inv.who_is(STRANGER) is not None and before.by_mac.get(STRANGER) is None


# --- address evidence -------------------------------------------------------------------------


def test_the_book_keeps_the_latest_evidence_per_address_and_one_address_per_mac() -> None:
    clock = [100.0]
    book = EvidenceBook(clock=lambda: clock[0])
    a, b = IPv4Address("10.0.0.50"), IPv4Address("10.0.0.51")
    first = book.add(C1, a, Source.DHCP_REQUEST)
    assert (first.mac, first.ip, first.source, first.time) == (C1, a, Source.DHCP_REQUEST, 100.0)
    clock[0] = 200.0
    book.add(C1, b, Source.LEASE)  # c1 moved: its old address is free
    assert book.at(a) is None
    assert book.of(C1) == book.at(b)
    book.add(C2, b, Source.NEIGHBOUR)  # someone else is there now
    assert book.of(C1) is None
    evidence = book.at(b)
    assert evidence is not None and (evidence.mac, evidence.source) == (C2, Source.NEIGHBOUR)
    assert [e.mac for e in book.latest()] == [C2]


def test_the_book_is_bounded() -> None:
    book = EvidenceBook(limit=3)
    for host in range(10):
        book.add(f"02:00:00:00:01:{host:02x}", IPv4Address(f"10.0.1.{host}"), Source.DHCP_REQUEST)
    assert len(book) == 3
    assert book.at(IPv4Address("10.0.1.0")) is None
    assert book.at(IPv4Address("10.0.1.9")) is not None
    assert len(list(book.latest())) == 3


@pytest.fixture
def no_arp(monkeypatch: pytest.MonkeyPatch) -> None:
    from pixiebox.core import inventory as inventory_module

    monkeypatch.setattr(inventory_module, "neighbour_mac", lambda ip, device=None: None)


def test_who_is_at_an_address_rests_on_evidence(tmp_path: Path, no_arp: None) -> None:
    inv = inventory(tmp_path)
    reserved = inv.evidence_at(IPv4Address("10.0.0.31"))
    assert reserved is not None and (reserved.mac, reserved.source) == (C1, Source.RESERVATION)
    # A lease learned for another MAC does not override lab.toml's reservation.
    inv.learn(STRANGER, IPv4Address("10.0.0.31"), Source.DHCP_REQUEST)
    assert inv.mac_at(IPv4Address("10.0.0.31")) == C1
    inv.learn(C2, IPv4Address("10.0.0.60"), Source.DHCP_REQUEST)
    assert inv.describe_address(IPv4Address("10.0.0.60")) == f"c2 ({C2}, 10.0.0.60)"
    assert inv.dns_records(("pixiebox", SERVER)) == {
        "c1": IPv4Address("10.0.0.31"), "c2": IPv4Address("10.0.0.60"), "pixiebox": SERVER,
    }  # fmt: skip
    assert inv.mac_at(IPv4Address("10.0.0.99")) is None


def test_the_neighbour_table_is_read_once_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pixiebox.core import inventory as inventory_module

    asked: list[str] = []

    def neighbour(ip: str, device: str | None = None) -> str | None:
        asked.append(ip)
        return C2

    monkeypatch.setattr(inventory_module, "neighbour_mac", neighbour)
    inv = inventory(tmp_path)
    assert inv.mac_at(IPv4Address("10.0.0.70")) == C2
    assert inv.mac_at(IPv4Address("10.0.0.70")) == C2
    assert asked == ["10.0.0.70"]
    evidence = inv.evidence_at(IPv4Address("10.0.0.70"))
    assert evidence is not None and evidence.source is Source.NEIGHBOUR


# --- a DHCP handler through a fake backend ---------------------------------------------------


@dataclass
class FakeBackend:
    """The smallest backend a handler answers through: decisions from a LabView, and lists of
    what it was told."""

    view: LabView
    seen_macs: list[tuple[str, ArchInfo | None]] = field(default_factory=list)
    learned: list[tuple[str, IPv4Address, Source]] = field(default_factory=list)
    events: list[tuple[str, Kind, Fields | None]] = field(default_factory=list)

    @property
    def config(self) -> LabConfig:
        return self.view.config

    def decide(
        self, mac: str | None, arch: ArchInfo | None, *, loaders: LoaderCheck | None = None
    ) -> BootDecision:
        return decide(self.view, mac, arch, loaders=loaders)

    def seen(self, mac: str, arch: ArchInfo | None) -> bool:
        self.seen_macs.append((mac, arch))
        return len(self.seen_macs) == 1

    def learn(self, mac: str, ip: IPv4Address, source: Source) -> None:
        self.learned.append((mac, ip, source))

    def record(
        self,
        mac: str,
        kind: Kind,
        message: str,
        ip: IPv4Address | None = None,
        fields: Fields | None = None,
    ) -> None:
        self.events.append((mac, kind, fields))


def packet(kind: MessageType, mac: str, code: int | None = None, **extra: object) -> Packet:
    options: dict[int, bytes] = {Opt.MESSAGE_TYPE: bytes((kind,))}
    if code is not None:
        options[Opt.VENDOR_CLASS] = f"PXEClient:Arch:{code:05d}:UNDI:003016".encode()
        options[Opt.CLIENT_ARCH] = code.to_bytes(2, "big")
    requested = extra.get("requested")
    if isinstance(requested, str):
        options[Opt.REQUESTED_IP] = IPv4Address(requested).packed
    ciaddr = IPv4Address(str(extra.get("ciaddr", "0.0.0.0")))
    built = Packet(op=BOOTREQUEST, xid=7, chaddr=bytes.fromhex(mac.replace(":", "")),
                   ciaddr=ciaddr, options=options)  # fmt: skip
    return decode(encode(built))


def proxy(tmp_path: Path, unknown: str = "discover") -> tuple[ProxyHandler, FakeBackend]:
    root = tmp_path / "assets"
    (root / "ipxe").mkdir(parents=True)
    (root / "ipxe" / "undionly.kpxe").write_bytes(b"x")
    backend = FakeBackend(lab(unknown))
    policy = BootPolicy(Assets(root, system_ipxe=tmp_path / "none"), BootUrls(SERVER))
    return ProxyHandler(backend, policy), backend


def test_the_proxy_handler_renders_the_backends_decision(tmp_path: Path) -> None:
    handler, backend = proxy(tmp_path)
    reply = handler.handle(packet(MessageType.DISCOVER, C1, 0), 67)
    assert reply is not None and reply.message_type is MessageType.OFFER
    assert reply.file == b"undionly.kpxe" and reply.yiaddr == IPv4Address(0)
    assert [mac for mac, _ in backend.seen_macs] == [C1]
    ((mac, kind, fields),) = backend.events
    assert (mac, kind) == (C1, Kind.DHCP_OFFER)
    assert fields is not None and fields["boot_file"] == "undionly.kpxe"
    # No x86-64 UEFI build on this appliance: seen, but not answered.
    assert handler.handle(packet(MessageType.DISCOVER, C2, 7), 67) is None
    assert [mac for mac, _ in backend.seen_macs] == [C1, C2]


def test_the_proxy_handler_stays_silent_for_ignored_machines(tmp_path: Path) -> None:
    handler, backend = proxy(tmp_path, "ignore")
    assert handler.handle(packet(MessageType.DISCOVER, STRANGER, 0), 67) is None
    assert backend.seen_macs == [(STRANGER, arch(0))]  # seen all the same: `pixiebox machines`
    assert backend.events == []


def test_the_proxy_handler_learns_addresses_from_requests_only(tmp_path: Path) -> None:
    handler, backend = proxy(tmp_path)
    # A plain client selecting the router's offer: not answered, but its address is evidence.
    assert handler.handle(packet(MessageType.REQUEST, C2, requested="10.0.0.60"), 67) is None
    # A PXE ROM asking on port 4011 from the address the router gave it.
    reply = handler.handle(packet(MessageType.REQUEST, C1, 0, ciaddr="10.0.0.61"), PXE_PORT)
    assert reply is not None and reply.message_type is MessageType.ACK
    assert backend.learned == [
        (C2, IPv4Address("10.0.0.60"), Source.DHCP_REQUEST),
        (C1, IPv4Address("10.0.0.61"), Source.DHCP_REQUEST),
    ]
    # A DISCOVER names no address of its own.
    handler.handle(packet(MessageType.DISCOVER, C1, 0), 67)
    assert len(backend.learned) == 2
    assert handler.held_addresses() == set()


# --- reloads are applied on the event loop ---------------------------------------------------


def test_work_for_the_loop_runs_on_the_loop_thread_and_is_waited_for(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "lab.toml")

    async def main() -> tuple[int, int, int]:
        agent._loop = asyncio.get_running_loop()
        from_worker = await asyncio.to_thread(agent._on_loop, threading.get_ident)
        on_loop = agent._on_loop(threading.get_ident)
        return threading.get_ident(), from_worker, on_loop

    loop_thread, from_worker, on_loop = asyncio.run(main())
    assert from_worker == loop_thread == on_loop
