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
from pixiebox.boot.pxelinux import pxelinux_for
from pixiebox.config import LabConfig
from pixiebox.core.decision import (
    BootDecision,
    LabView,
    Loader,
    LoaderCheck,
    Silence,
    decide,
    images_summary,
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


# --- per-architecture builds ([images.NAME.arch.<arch>]) ----------------------------------------


def arch_lab() -> LabView:
    """osie with an arm64 and an armhf build; rescue with none."""
    config = LabConfig.model_validate({
        "images": {"osie": {"kernel": "osie/vmlinuz", "initrd": ["osie/initrd"],
                            "cmdline": "console=ttyS0",
                            "arch": {"arm64": {"kernel": "osie-arm64/vmlinuz",
                                               "initrd": ["osie-arm64/initrd"],
                                               "cmdline": "console=ttyAMA0,115200"},
                                     "armhf": {"kernel": "osie-armhf/vmlinuz",
                                               "fdtdir": "osie-armhf/dtbs"}}},
                   "rescue": {"kernel": "rescue/vmlinuz"}},
        "machines": [{"name": "c1", "mac": C1}, {"name": "c2", "mac": C2, "image": "rescue"}],
    })  # fmt: skip
    return LabView.of(config)


@pytest.mark.parametrize(
    ("code", "build", "kernel"),
    [
        (11, "arm64", "osie-arm64/vmlinuz"),  # arm64 UEFI
        (19, "arm64", "osie-arm64/vmlinuz"),  # arm64 UEFI HTTP boot
        (22, "arm64", "osie-arm64/vmlinuz"),  # U-Boot armv8
        (21, "armhf", "osie-armhf/vmlinuz"),  # U-Boot armv7 (a Jetson TK1)
        (0, None, "osie/vmlinuz"),  # x86 BIOS
        (7, None, "osie/vmlinuz"),  # x86-64 UEFI
        (6, None, "osie/vmlinuz"),  # i386 is x86-64, which osie has no table for
        (27, None, "osie/vmlinuz"),  # riscv64: no build, so the base
    ],
)
def test_a_machine_boots_the_build_for_its_firmwares_architecture(
    code: int, build: str | None, kernel: str
) -> None:
    for mac in (C1, STRANGER):  # enrolled or not: no per-machine configuration
        decision = decide(arch_lab(), mac, arch(code))
        assert decision.image is not None
        assert (decision.image.name, decision.image.arch, decision.image.kernel) == (
            "osie", build, kernel,
        )  # fmt: skip
        # What renderers get is the build alone: no tables left to resolve.
        assert decision.image.section.arch == {}


def test_a_build_has_its_own_files_and_the_base_command_line_unless_it_names_one() -> None:
    arm64 = decide(arch_lab(), C1, arch(11)).image
    armhf = decide(arch_lab(), C1, arch(21)).image
    base = decide(arch_lab(), C1, arch(7)).image
    assert arm64 is not None and armhf is not None and base is not None
    assert (arm64.initrd, arm64.cmdline, arm64.section.fdtdir) == (
        ("osie-arm64/initrd",), "console=ttyAMA0,115200", "",
    )  # fmt: skip
    # No initrd of its own: none (an x86 initrd's modules are no use to an armhf kernel).
    assert (armhf.initrd, armhf.cmdline, armhf.section.fdtdir) == (
        (), "console=ttyS0", "osie-armhf/dtbs",
    )  # fmt: skip
    assert (base.kernel, base.initrd, base.section.fdtdir) == ("osie/vmlinuz", ("osie/initrd",), "")


def test_an_image_without_builds_is_the_same_for_every_architecture() -> None:
    for code in (0, 11, 21, 22, 27):
        image = decide(arch_lab(), C2, arch(code)).image
        assert image is not None and (image.name, image.arch, image.kernel) == (
            "rescue", None, "rescue/vmlinuz",
        )  # fmt: skip


def test_without_the_arch_the_build_is_the_one_for_what_dhcp_recorded() -> None:
    recorded = {C1: "arm32", STRANGER: "arm64"}
    asked: list[str] = []

    def record(mac: str) -> str | None:
        asked.append(mac)
        return recorded.get(mac)

    view = arch_lab()
    c1 = decide(view, C1, None, recorded=record).image
    stranger = decide(view, STRANGER, None, recorded=record).image
    nothing = decide(view, "02:00:00:00:00:42", None, recorded=record).image
    assert c1 is not None and stranger is not None and nothing is not None
    assert (c1.arch, c1.kernel) == ("armhf", "osie-armhf/vmlinuz")
    assert (stranger.arch, stranger.kernel) == ("arm64", "osie-arm64/vmlinuz")
    assert (nothing.arch, nothing.kernel) == (None, "osie/vmlinuz")  # nothing recorded: base
    # The firmware's own word wins over the record; an image without builds reads no record.
    asked.clear()
    assert decide(view, C1, arch(7), recorded=record).image == base_of(view)
    assert decide(view, C2, None, recorded=record).image is not None and asked == []
    # Nobody asked (pxelinux.cfg/default from an unknown address): the base.
    assert decide(view, None, None, recorded=record).image == base_of(view)


def base_of(view: LabView) -> object:
    return decide(view, C1, arch(0)).image


def test_check_says_which_architectures_each_image_serves() -> None:
    assert images_summary(arch_lab().config) == [
        "image osie: arm64 → osie-arm64/vmlinuz; armhf → osie-armhf/vmlinuz (fdtdir "
        "osie-armhf/dtbs); every other architecture (x86-64, riscv64) → osie/vmlinuz",
        "image rescue: every architecture → rescue/vmlinuz",
    ]


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


def test_a_board_gets_the_pxelinux_cfg_of_the_build_for_what_dhcp_recorded(
    tmp_path: Path, no_arp: None
) -> None:
    """U-Boot's pxelinux.cfg request names no architecture: DHCP's record of option 93 (21,
    armv7) decides, and the board is still recorded as armv7 U-Boot afterwards."""
    inv = Inventory(arch_lab().config, StateStore(tmp_path / "state"))
    urls = BootUrls(SERVER)
    board_ip = IPv4Address("192.0.2.31")
    inv.seen(C1, arch(21))  # what the DHCP handlers record from the DISCOVER,
    inv.learn(C1, board_ip, Source.LEASE)  # and the lease they grant it
    text = pxelinux_for(inv, urls, "01-" + C1.replace(":", "-"), board_ip, strict=False)
    assert text is not None and "pixiebox.token=" in text  # the board itself asked
    lines = [line.strip() for line in text.splitlines()]
    assert "KERNEL osie-armhf/vmlinuz" in lines
    assert "FDTDIR osie-armhf/dtbs" in lines
    assert not [line for line in lines if line.startswith(("INITRD", "FDT "))]
    append = next(line for line in lines if line.startswith("APPEND "))
    assert "console=ttyS0 " in append and "pixiebox.arch=arm32" in append
    record = inv.lifecycle.record_of(C1)
    assert record is not None and (record.arch, record.firmware) == ("arm32", "U-Boot")
    # An armv8 board: the arm64 build, no device tree line; nothing recorded: the base.
    inv.seen(C2, arch(22))
    inv.reload(inv.config.model_copy(update={"machines": [inv.config.machines[0]]}))
    armv8 = pxelinux_for(inv, urls, "01-" + C2.replace(":", "-"), None, strict=False) or ""
    assert "KERNEL osie-arm64/vmlinuz" in armv8 and "FDT" not in armv8
    assert "INITRD osie-arm64/initrd" in armv8 and "pixiebox.arch=arm64" in armv8
    unseen = pxelinux_for(inv, urls, "01-02-00-00-00-00-42", None, strict=False) or ""
    assert "KERNEL osie/vmlinuz" in unseen and "pixiebox.arch=" not in unseen


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
