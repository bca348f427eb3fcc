"""Raspberry Pi 4/5 network boot (issue 15 item 4; docs/firmware-quirks.md#26-#29).

No emulator runs the Pi's network boot: QEMU's raspi3b/raspi4b machines start a kernel or an SD
card image directly and have neither the Pi 3 boot ROM's nor the Pi 4/5 EEPROM boot loader's
network code, so no VM test can boot a Pi from Pixiebox. These tests are the Pi's side instead,
as Raspberry Pi's documentation describes it (boot-net.adoc, eeprom-bootloader.adoc): its DHCP
DISCOVER (vendor class "PXEClient:Arch:00000:UNDI:002001", option 93 = 0, option 94 1.2.1,
option 97, the parameter list of the documented capture) sent by the scapy PXE client, and its
TFTP fetch sequence (bootsig.bin, then every file under its serial number) by tftp-hpa, against
the real agent in network namespaces beside a dnsmasq home router; plus the plain-data rules
(which clients are Pis, option 43's bytes, config.txt and cmdline.txt).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import netlab
import pytest
from agentproc import RunningAgent, lab_toml, recorded, start_agent
from pixiebox.boot.raspi import CMDLINE, CONFIG, config_txt, raspi_file
from pixiebox.config import LabConfig
from pixiebox.core.decision import BootImage
from pixiebox.core.evidence import Source
from pixiebox.core.firmware import Firmware
from pixiebox.core.inventory import Inventory
from pixiebox.core.lifecycle import MachineState
from pixiebox.core.raspi import (
    OLD_ROM_UUID,
    RASPI_ARCH,
    expected_miss,
    firmware_dirs,
    firmware_file,
    parse_path,
)
from pixiebox.core.urls import BootUrls
from pixiebox.dhcp.codec import BOOTREQUEST, MessageType, Opt, Packet, decode, encode
from pixiebox.dhcp.policy import boot_client, raspi_option43
from pixiebox.doctor import DEFAULT_BOOT_TIMEOUT, diagnose
from pixiebox.events import Event, FieldValue, Kind, fields_of
from pixiebox.store.state import StateStore
from pixiebox.tftp.files import expected_missing

#: What a Pi's boot loader sends (boot-net.adoc's capture; eeprom-bootloader.adoc).
PI_VENDOR_CLASS = "PXEClient:Arch:00000:UNDI:002001"
#: Option 55 of the documented capture: 43, 60, 67, 128-135, 66.
PI_PARAMS = (43, 60, 67, 128, 129, 130, 131, 132, 133, 134, 135, 66)
#: The Pi 4 EEPROM's option 97 (DHCP_OPTION97): "RPi4", board revision, MAC low bytes, serial.
PI_GUID = (
    b"RPi4" + bytes.fromhex("00c03111") + bytes.fromhex("32013601") + bytes.fromhex("9ffefdef")
)
SERIAL = "9ffefdef"
#: Option 43 exactly as the documented dnsmasq reply carries it (boot-net.adoc):
#: 6.1.3.10.4.0.80.88.69.9.20.0.0.17."Raspberry Pi Boot".255
DOCUMENTED_43 = bytes([6, 1, 3, 10, 4, 0, 80, 88, 69, 9, 20, 0, 0, 17]) + b"Raspberry Pi Boot\xff"

PI_MAC = "dc:a6:32:01:36:c2"
PI5_MAC = "2c:cf:67:00:00:05"
PC_MAC = "02:00:00:00:0a:01"
SERVER = IPv4Address("10.78.0.2")
URLS = BootUrls(SERVER)


def dhcp_packet(mac: str, code: int | None, vendor: str, **options: bytes) -> Packet:
    built: dict[int, bytes] = {Opt.MESSAGE_TYPE: bytes((MessageType.DISCOVER,))}
    built[Opt.VENDOR_CLASS] = vendor.encode()
    if code is not None:
        built[Opt.CLIENT_ARCH] = code.to_bytes(2, "big")
    for name, value in options.items():
        built[int(name.removeprefix("o"))] = value
    packet = Packet(op=BOOTREQUEST, xid=7, chaddr=bytes.fromhex(mac.replace(":", "")),
                    options=built)  # fmt: skip
    return decode(encode(packet))


# -- which DHCP clients are Pis (plain data) --------------------------------------------------


def test_a_pi_is_told_apart_from_a_bios_pc_by_its_oui_or_its_guid() -> None:
    pi = boot_client(dhcp_packet(PI_MAC, 0, PI_VENDOR_CLASS, o97=b"\x00" + PI_GUID))
    assert pi is not None and pi.arch is RASPI_ARCH and pi.arch.cpu == "arm64"
    # The Pi 5 sends option 93 = 0 too (quirk #28); without option 97 the OUI decides.
    pi5 = boot_client(dhcp_packet(PI5_MAC, 0, PI_VENDOR_CLASS))
    assert pi5 is not None and pi5.arch.firmware is Firmware.RASPBERRY_PI
    # A PC with option 93 = 0 stays a BIOS PC.
    pc = boot_client(dhcp_packet(PC_MAC, 0, "PXEClient:Arch:00000:UNDI:002001"))
    assert (
        pc is not None and pc.arch.firmware is Firmware.BIOS and pc.arch.loader == "undionly.kpxe"
    )
    # A Pi whose MAC was changed (MAC_ADDRESS) still says "RPi4" in option 97.
    moved = boot_client(dhcp_packet(PC_MAC, 0, PI_VENDOR_CLASS, o97=b"\x00" + PI_GUID))
    assert moved is not None and moved.arch is RASPI_ARCH
    # A Pi running UEFI firmware (option 93 = 11) or iPXE is no boot ROM: arm64 UEFI, the script.
    uefi = boot_client(dhcp_packet(PI_MAC, 11, "PXEClient:Arch:00011:UNDI:003000"))
    assert uefi is not None and uefi.arch.firmware is Firmware.UEFI
    ipxe = boot_client(dhcp_packet(PI_MAC, 0, PI_VENDOR_CLASS, o77=b"iPXE"))
    assert ipxe is not None and ipxe.ipxe and ipxe.arch.firmware is Firmware.BIOS


def test_option_43_is_the_documented_menu_and_the_old_rom_gets_three_spaces() -> None:
    assert raspi_option43(b"\x00" + PI_GUID) == DOCUMENTED_43
    assert raspi_option43(None) == DOCUMENTED_43
    old = raspi_option43(OLD_ROM_UUID)
    assert b"\x09\x17\x00\x00\x14Raspberry Pi Boot   \xff" in old


def test_tftp_names_under_the_serial_or_the_mac() -> None:
    parsed = parse_path(f"{SERIAL}/start4.elf")
    assert parsed is not None and (parsed.serial, parsed.mac, parsed.name) == (
        SERIAL, None, "start4.elf")  # fmt: skip
    parsed = parse_path("dc-a6-32-01-36-c2/config.txt")
    assert parsed is not None and (parsed.mac, parsed.name) == (PI_MAC, "config.txt")
    for not_a_pi in ("start4.elf", "9FFEFDEF/start4.elf", "9ffefde/x", "pxelinux.cfg/default"):
        assert parse_path(not_a_pi) is None, not_a_pi
    # Probes the Pi boots fine without: logged at debug level, not failures (tftp.files).
    for probe in ("bootsig.bin", f"{SERIAL}/bootsig.bin", f"{SERIAL}/pieeprom.sig",
                  f"{SERIAL}/recover4.elf", f"{SERIAL}/upstream/osie/vmlinuz"):  # fmt: skip
        assert expected_missing(probe) is not None, probe
    assert expected_miss(f"{SERIAL}/start4.elf") is None
    assert expected_missing(f"{SERIAL}/cmdline.txt") is None


# -- config.txt and cmdline.txt from the decision (plain data) --------------------------------


def arm64_lab(unknown: str = "discover", assets: str = "/nonexistent") -> LabConfig:
    return LabConfig.model_validate({
        "network": {"subnet": "10.78.0.0/24"},
        "boot": {"unknown": unknown, "assets": assets},
        "images": {"osie": {
            "kernel": "osie/vmlinuz", "initrd": ["osie/initrd"], "cmdline": "console=tty0",
            "arch": {"arm64": {"kernel": "osie-arm64/vmlinuz",
                               "initrd": ["osie-arm64/initrd", "osie-arm64/extra"],
                               "cmdline": "console=ttyS1,115200", "fdtdir": "osie-arm64/dtbs"}},
        }},
        "machines": [{"name": "pi1", "mac": PI_MAC}],
    })  # fmt: skip


def test_the_pi_boots_the_images_arm64_build(tmp_path: Path) -> None:
    inv = Inventory(arm64_lab(), StateStore(tmp_path / "state"))
    image = inv.decide(PI_MAC, RASPI_ARCH).image
    assert isinstance(image, BootImage)
    text = config_txt(image, SERIAL)
    lines = text.splitlines()
    assert {"arm_64bit=1", "enable_uart=1", "upstream_kernel=1"} <= set(lines), text
    assert "kernel=osie-arm64/vmlinuz" in lines, text
    assert "initramfs osie-arm64/initrd,osie-arm64/extra followkernel" in lines, text
    assert SERIAL in lines[0]


def test_cmdline_has_the_token_only_for_the_proven_pi(tmp_path: Path) -> None:
    inv = Inventory(arm64_lab(), StateStore(tmp_path / "state"))
    pi_ip, other_ip = IPv4Address("10.78.0.40"), IPv4Address("10.78.0.41")
    # The Pi's own serial prefix: the machine is the one at the asking address.
    inv.learn(PI_MAC, pi_ip, Source.DHCP_REQUEST)
    own = raspi_file(inv, URLS, f"{SERIAL}/{CMDLINE}", str(pi_ip))
    assert isinstance(own, bytes)
    assert own.count(b"\n") == 1 and own.startswith(b"console=ttyS1,115200 "), own
    token = re.search(rb"pixiebox\.token=(\S+)", own)
    assert token is not None and inv.tokens.check(PI_MAC, token.group(1).decode()) is None
    assert b"pixiebox.mac=" + PI_MAC.encode() in own and b"pixiebox.name=pi1" in own
    assert b"pixiebox.arch=arm64" in own
    (served,) = [e for e in inv.lifecycle.events(PI_MAC) if e.kind == Kind.HTTP_PXELINUX]
    assert served.get("serial") == SERIAL and served.get("kernel") == "osie-arm64/vmlinuz"
    # Another host naming the Pi by its MAC prefix gets the Pi's file without a token.
    inv.learn("02:00:00:00:0a:09", other_ip, Source.DHCP_REQUEST)
    theirs = raspi_file(inv, URLS, "dc-a6-32-01-36-c2/cmdline.txt", str(other_ip))
    assert isinstance(theirs, bytes) and b"pixiebox.token" not in theirs
    refused = [e for e in inv.lifecycle.events(PI_MAC) if e.kind == Kind.SECRET_REFUSED]
    assert refused and refused[-1].get("reason") == "not-owner"
    # config.txt carries no secret; it is the same file for anyone asking.
    conf = raspi_file(inv, URLS, f"{SERIAL}/{CONFIG}", str(other_ip))
    assert isinstance(conf, bytes) and b"pixiebox.token" not in conf


def test_files_come_from_assets_firmware_and_the_images_fdtdir(tmp_path: Path) -> None:
    assets = tmp_path / "assets"
    (assets / "raspi").mkdir(parents=True)
    (assets / "raspi" / "start4.elf").write_bytes(b"videocore")
    (assets / "osie-arm64" / "dtbs" / "broadcom").mkdir(parents=True)
    (assets / "osie-arm64" / "dtbs" / "broadcom" / "bcm2711-rpi-4-b.dtb").write_bytes(b"dtb")
    (assets / "osie-arm64" / "vmlinuz").write_bytes(b"kernel")
    inv = Inventory(arm64_lab(assets=str(assets)), StateStore(tmp_path / "state"))
    ip = str(IPv4Address("10.78.0.40"))
    inv.learn(PI_MAC, IPv4Address(ip), Source.DHCP_REQUEST)
    assert raspi_file(inv, URLS, f"{SERIAL}/start4.elf", ip) == (assets / "raspi", "start4.elf")
    assert raspi_file(inv, URLS, f"{SERIAL}/osie-arm64/vmlinuz", ip) == (
        assets, "osie-arm64/vmlinuz")  # fmt: skip
    assert raspi_file(inv, URLS, f"{SERIAL}/bcm2711-rpi-4-b.dtb", ip) == (
        assets, "osie-arm64/dtbs/broadcom/bcm2711-rpi-4-b.dtb")  # fmt: skip
    assert raspi_file(inv, URLS, f"{SERIAL}/pieeprom.sig", ip) is None
    assert raspi_file(inv, URLS, "start4.elf", ip) is None  # no prefix: not a Pi's request
    assert firmware_dirs(assets)[0] == assets / "raspi"


def test_an_unknown_pi_under_ignore_gets_nothing(tmp_path: Path) -> None:
    lab = arm64_lab(unknown="ignore").model_copy(update={"machines": []})
    inv = Inventory(lab, StateStore(tmp_path / "state"))
    ip = IPv4Address("10.78.0.40")
    inv.learn(PI_MAC, ip, Source.DHCP_REQUEST)
    for name in (CONFIG, CMDLINE, "start4.elf", "osie-arm64/vmlinuz"):
        assert raspi_file(inv, URLS, f"{SERIAL}/{name}", str(ip)) is None, name


def test_the_doctor_follows_a_pis_boot_over_tftp() -> None:
    t0 = 1_700_000_000.0
    offer = {"mode": "proxy", "port": 67, "firmware": "Raspberry Pi", "arch": "arm64",
             "ipxe": False, "boot_file": ""}  # fmt: skip
    steps: list[tuple[Kind, dict[str, FieldValue]]] = [
        (Kind.DHCP_OFFER, offer),
        (Kind.TFTP_FAILED, {"file": "bootsig.bin", "reason": "expected-miss"}),
        (Kind.TFTP_SENT, {"file": f"{SERIAL}/start4.elf", "bytes": 2_256_800}),
        (Kind.TFTP_SENT, {"file": f"{SERIAL}/config.txt", "bytes": 200}),
        (
            Kind.HTTP_PXELINUX,
            {
                "file": f"{SERIAL}/cmdline.txt",
                "image": "osie",
                "kernel": "osie/vmlinuz",
                "serial": SERIAL,
            },
        ),
        (Kind.TFTP_SENT, {"file": f"{SERIAL}/osie/vmlinuz", "bytes": 9_000_000}),
        (Kind.TFTP_SENT, {"file": f"{SERIAL}/osie/initrd", "bytes": 90_000_000}),
    ]
    for kind, fields in steps:
        assert set(fields) <= set(fields_of(kind)), kind
    events = [Event(i + 1, PI_MAC, t0 + i, kind, "(a sentence)", fields)
              for i, (kind, fields) in enumerate(steps)]  # fmt: skip

    def verdict(upto: int) -> str:
        now = events[upto - 1].time + DEFAULT_BOOT_TIMEOUT + 1
        found = diagnose(events[:upto], state=MachineState.BOOTING, now=now,
                         boot_timeout=DEFAULT_BOOT_TIMEOUT, mode="proxy", name="pi1")  # fmt: skip
        return found.verdict

    # No boot file was offered, so "never asked for the boot file" would be wrong.
    stalled = verdict(3)
    assert "Raspberry Pi" in stalled and f"{SERIAL}/start4.elf" in stalled, stalled
    assert "nothing over TFTP" in verdict(1)
    assert "kernel and initrd sent, no phone-home" in verdict(len(events))


# -- the real agent, the Pi's documented packets and TFTP sequence (namespaces) ----------------

SUBNET = "10.78.0.0/24"
ROUTER_IP = "10.78.0.1"
AGENT_IP = str(SERVER)
PI_IP = "10.78.0.60"
PC_IP = "10.78.0.61"


@dataclass
class PiLab:
    segment: netlab.Segment
    agent: RunningAgent
    pi: netlab.Host
    pc: netlab.Host
    assets: Path
    workdir: Path
    firmware: Path  # the start4.elf the agent should serve


def _require(tools: tuple[str, ...]) -> None:
    problem = netlab.prerequisite_problem(tools)
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI=true but prerequisite missing: {problem}", pytrace=False)
        pytest.skip(problem)


def _assets(workdir: Path) -> tuple[Path, Path]:
    """[boot] assets laid out as the appliance's (lab.toml without [images]: the default
    images' arm64 build, osie-arm64/, which a Pi boots), and the firmware: Debian's
    raspi-firmware as `./build.sh trixie` unpacked it, or a stand-in in assets/raspi/."""
    assets = workdir / "assets"
    for build in ("osie", "osie-arm64"):
        (assets / build).mkdir(parents=True)
        (assets / build / "vmlinuz").write_bytes(os.urandom(70_000))
        (assets / build / "initrd").write_bytes(os.urandom(150_000))
    found = firmware_file(assets, "start4.elf")
    if found is not None:
        return assets, found[0] / found[1]
    (assets / "raspi").mkdir()
    (assets / "raspi" / "start4.elf").write_bytes(os.urandom(40_000))
    return assets, assets / "raspi" / "start4.elf"


@pytest.fixture(scope="module")
def proxy_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PiLab]:
    _require(("dnsmasq", "tftp"))
    workdir = tmp_path_factory.mktemp("raspi")
    assets, firmware = _assets(workdir)
    with netlab.Segment(workdir / "segment") as segment:
        router = segment.add_host("router", ip=f"{ROUTER_IP}/24")
        netlab.start_dnsmasq_router(router, "10.78.0.100", "10.78.0.150", ping_check=False)
        agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
        config = lab_toml(mode="proxy", subnet=SUBNET, assets=assets, state=workdir / "state",
                          machines=[("pi1", PI_MAC, None)])  # fmt: skip
        agent = start_agent(agent_host, config, workdir)
        pi = segment.add_host("pi", mac=PI_MAC, ip=f"{PI_IP}/24")
        pc = segment.add_host("pc", mac=PC_MAC, ip=f"{PC_IP}/24")
        yield PiLab(segment, agent, pi, pc, assets, workdir, firmware)


def pi_discover(host: netlab.Host, uuid: bytes = PI_GUID) -> list[netlab.Reply]:
    """The DISCOVER of boot-net.adoc's capture: 93 = 0, 94 = 1.2.1, 97, 60, its option 55."""
    return netlab.pxe_discover(host, arch=0, uuid=uuid, vendor_class=PI_VENDOR_CLASS,
                               params=PI_PARAMS)  # fmt: skip


def tftp_get(host: netlab.Host, name: str, dest: Path) -> tuple[bool, str]:
    """tftp-hpa's `get`, as the Pi's loader asks (octet mode); (got it, what tftp said)."""
    dest.unlink(missing_ok=True)
    done = host.run(["tftp", "-m", "binary", AGENT_IP, "-c", "get", name, str(dest)],
                    timeout=60, check=False)  # fmt: skip
    said = (done.stdout + done.stderr).strip()
    # tftp-hpa exits 0 even on an ERROR packet; it says so and leaves an empty file.
    return ("Error" not in said and dest.is_file()), said


def test_the_pi_gets_option_43_and_the_pc_undionly_in_proxy_mode(proxy_lab: PiLab) -> None:
    replies = pi_discover(proxy_lab.pi)
    (ours,) = [r for r in replies if r.src_ip == AGENT_IP]
    assert ours.yiaddr == "0.0.0.0" and ours.siaddr == AGENT_IP  # quirk #2: next-server
    assert ours.option(54) == SERVER.packed
    assert ours.option(43) == DOCUMENTED_43
    assert ours.option_text(60) == "PXEClient"
    assert ours.option(97) == b"\x00" + PI_GUID
    assert ours.file == ""  # the Pi fetches fixed names under its serial number
    router = [r for r in replies if r.src_ip == ROUTER_IP]
    assert router and router[0].yiaddr.startswith("10.78.0.1")  # its address: the router's
    # A PC sending the very same option 60 and 93 = 0 still gets iPXE for BIOS.
    pc = [r for r in pi_discover(proxy_lab.pc, bytes(range(16))) if r.src_ip == AGENT_IP]
    assert (
        len(pc) == 1 and pc[0].file == "undionly.kpxe" and pc[0].option(43) == b"\x06\x01\x08\xff"
    )


def test_the_documented_tftp_sequence_boots_the_image(proxy_lab: PiLab) -> None:
    pi, work = proxy_lab.pi, proxy_lab.workdir / "pi-files"
    work.mkdir(exist_ok=True)
    pi_discover(pi)
    # The Pi 3 ROM's bootsig.bin, and the Pi 4 EEPROM's self-update probe: "not found" at once.
    for probe in ("bootsig.bin", f"{SERIAL}/pieeprom.sig"):
        got, said = tftp_get(pi, probe, work / "probe")
        assert not got and "not found" in said.lower(), said
    got, said = tftp_get(pi, f"{SERIAL}/start4.elf", work / "start4.elf")
    assert got, said
    assert (work / "start4.elf").read_bytes() == proxy_lab.firmware.read_bytes()
    got, said = tftp_get(pi, f"{SERIAL}/config.txt", work / "config.txt")
    assert got, said
    config = (work / "config.txt").read_text()
    assert "arm_64bit=1" in config.splitlines(), config
    kernel = re.search(r"^kernel=(\S+)$", config, re.MULTILINE)
    initrd = re.search(r"^initramfs (\S+) followkernel$", config, re.MULTILINE)
    assert kernel and initrd, config
    # The default images' arm64 build (lab.toml has no [images]), not the x86 base.
    assert kernel.group(1) == "osie-arm64/vmlinuz", config
    got, said = tftp_get(pi, f"{SERIAL}/cmdline.txt", work / "cmdline.txt")
    assert got, said
    cmdline = (work / "cmdline.txt").read_text()
    assert f"pixiebox.mac={PI_MAC}" in cmdline and "pixiebox.token=" in cmdline, cmdline
    assert f"pixiebox.url=http://{AGENT_IP}" in cmdline, cmdline
    # The kernel and initramfs config.txt names, under the same prefix.
    for name in (kernel.group(1), *initrd.group(1).split(",")):
        got, said = tftp_get(pi, f"{SERIAL}/{name}", work / "file")
        assert got, said
        assert (work / "file").read_bytes() == (proxy_lab.assets / name).read_bytes(), name

    def events() -> list[Event] | None:
        found = recorded(proxy_lab.workdir / "state", PI_MAC)
        kinds = {(e.kind, e.get("file")) for e in found}
        wanted = {(Kind.TFTP_SENT, f"{SERIAL}/start4.elf"), (Kind.TFTP_SENT, f"{SERIAL}/{name}")}
        return found if wanted <= kinds else None

    found = netlab.wait_until(events, 10, message="the Pi's TFTP sends were not recorded")
    offers = [e for e in found if e.kind == Kind.DHCP_OFFER]
    assert offers and offers[-1].get("firmware") == "Raspberry Pi" and offers[-1].get("arch") == (
        "arm64")  # fmt: skip
    (served,) = [e for e in found if e.kind == Kind.HTTP_PXELINUX]
    assert served.get("serial") == SERIAL and served.get("file") == f"{SERIAL}/cmdline.txt"
    misses = [e for e in found if e.kind == Kind.TFTP_FAILED]
    assert all(e.get("reason") == "expected-miss" for e in misses), misses


def test_a_bystander_naming_the_pi_gets_no_token(proxy_lab: PiLab) -> None:
    work = proxy_lab.workdir / "pc-files"
    work.mkdir(exist_ok=True)
    got, said = tftp_get(proxy_lab.pc, "dc-a6-32-01-36-c2/cmdline.txt", work / "cmdline.txt")
    assert got, said
    text = (work / "cmdline.txt").read_text()
    assert f"pixiebox.mac={PI_MAC}" in text and "pixiebox.token" not in text, text


@pytest.fixture
def reservation_lab(tmp_path: Path) -> Iterator[tuple[netlab.Segment, Path]]:
    _require(("tftp",))
    assets, _ = _assets(tmp_path)
    with netlab.Segment(tmp_path / "segment") as segment:
        agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
        config = lab_toml(mode="reservation", subnet=SUBNET, assets=assets,
                          state=tmp_path / "state", unknown="ignore",
                          machines=[("pi1", PI_MAC, PI_IP)])  # fmt: skip
        start_agent(agent_host, config, tmp_path)
        yield segment, tmp_path


def test_reservation_mode_offers_the_pi_its_address_and_ignores_an_unknown_pi(
    reservation_lab: tuple[netlab.Segment, Path],
) -> None:
    segment, workdir = reservation_lab
    pi = segment.add_host("pi", mac=PI_MAC)
    (offer,) = [r for r in pi_discover(pi) if r.src_ip == AGENT_IP]
    assert offer.message_type == netlab.DHCPOFFER and offer.yiaddr == PI_IP
    assert offer.siaddr == AGENT_IP and offer.option(43) == DOCUMENTED_43
    assert offer.option_text(60) == "PXEClient"
    # An unknown Pi under [boot] unknown = "ignore": no offer, and no file over TFTP either.
    stranger = segment.add_host("pi5", mac=PI5_MAC, ip="10.78.0.77/24")
    assert not [r for r in pi_discover(stranger) if r.src_ip == AGENT_IP]
    got, said = tftp_get(stranger, f"{SERIAL}/config.txt", workdir / "config.txt")
    assert not got and "not found" in said.lower(), said
    got, said = tftp_get(stranger, f"{SERIAL}/start4.elf", workdir / "start4.elf")
    assert not got, said


def test_the_pinned_raspi_firmware_is_found_where_build_sh_unpacks_it() -> None:
    """`./build.sh trixie` unpacks Debian's raspi-firmware (image/trixie.txt); the agent finds
    it without configuration."""
    found = firmware_file(Path("/nonexistent"), "start4.elf")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI=true but raspi-firmware is not unpacked: sudo ./build.sh trixie")
        pytest.skip("raspi-firmware not unpacked: sudo ./build.sh trixie")
    directory, name = found
    assert (directory / "fixup4.dat").is_file() and (directory / "bootcode.bin").is_file()
    assert (directory / name).stat().st_size > 1_000_000
