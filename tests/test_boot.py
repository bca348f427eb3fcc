"""Real firmware boots a real kernel from Pixiebox: QEMU machines (SeaBIOS + iPXE ROM, and OVMF's
own UEFI PXE client) PXE-boot the test OS through the agent, in proxy mode beside a dnsmasq home
router and in reservation mode alone. DHCP → (TFTP ipxe.efi) → HTTP script → kernel + initrd.

Boot times are printed and recorded as the `boot_seconds` property, never asserted.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import netlab
import pytest
import vmlab
from agentproc import recorded, start_agent
from pixiebox.events import Kind

SUBNET = "10.80.0.0/24"
ROUTER_IP = "10.80.0.1"
AGENT_IP = "10.80.0.2"
RANGE = ("10.80.0.100", "10.80.0.150")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPixieboxBootTestKey test@pixiebox"
BIOS_MAC, UEFI_MAC = "52:54:00:80:00:01", "52:54:00:80:00:02"
RESERVED = {BIOS_MAC: "10.80.0.31", UEFI_MAC: "10.80.0.32"}
ADDRESS_RE = re.compile(r"PIXIEBOX-TESTOS: address (\S+) via (\S+)")
TIMEOUT = 300.0  # firmware + iPXE + 10 MB over TCG, two VMs on a loaded 2-core machine


@pytest.fixture
def vm_require(netlab_require: Callable[..., None]) -> None:
    netlab_require("dnsmasq", vmlab.QEMU)


def lab_config(workdir: Path, testos: tuple[Path, Path], mode: str, enrolled: bool) -> str:
    assets = workdir / "assets"
    (assets / "testos").mkdir(parents=True)
    for source in testos:
        shutil.copyfile(source, assets / "testos" / source.name)
    machines = ""
    for name, mac in (("bios1", BIOS_MAC), ("uefi1", UEFI_MAC)):
        if enrolled or mode == "reservation":
            machines += f'[[machines]]\nname = "{name}"\nmac = "{mac}"\nip = "{RESERVED[mac]}"\n'
    return f"""
[lab]
name = "boot-test"
domain = "lab.test"
[network]
interface = "eth0"
subnet = "{SUBNET}"
gateway = "{ROUTER_IP}"
dhcp_mode = "{mode}"
dhcp_probe_time = "1s"
[boot]
unknown = "discover"
assets = "{assets}"
ssh_keys = ["{KEY}"]
[images.osie]
kernel = "testos/vmlinuz"
initrd = ["testos/initrd"]
cmdline = "console=ttyS0"
[state]
dir = "{workdir / "state"}"
{machines}"""


def booted_address(vm: vmlab.VM, name: str) -> ipaddress.IPv4Interface:
    text = vm.wait_console(f"PIXIEBOX-TESTOS: up {name}", TIMEOUT)
    assert f"PIXIEBOX-TESTOS: key {KEY}" in text, text[-2000:]
    match = ADDRESS_RE.search(text)
    assert match, text[-2000:]
    return ipaddress.IPv4Interface(match.group(1))


def wait_all_up(vms: dict[vmlab.VM, str]) -> dict[str, float]:
    """Power-on to `up` for each VM, polling them together so each time is its own."""
    times: dict[str, float] = {}

    def all_up() -> bool:
        for vm, name in vms.items():
            if vm.name not in times and f"PIXIEBOX-TESTOS: up {name}" in vm.console_text():
                times[vm.name] = vm.elapsed()
            if vm.proc.poll() is not None and vm.name not in times:
                raise AssertionError(f"{vm.name} stopped before it was up:\n{vm.tails()}")
        return len(times) == len(vms)

    try:
        netlab.wait_until(all_up, TIMEOUT, 0.5, "VMs up")
    except AssertionError:
        raise AssertionError("\n".join(vm.tails() for vm in vms)) from None
    return times


def report(record_property: Callable[[str, object], None], times: dict[str, float]) -> None:
    for name, seconds in times.items():
        print(f"\n{name}: power-on to up in {seconds:.1f} s")
    record_property("boot_seconds", {name: round(s, 1) for name, s in times.items()})


def assert_chain_recorded(workdir: Path, mac: str) -> None:
    events = recorded(workdir / "state", mac)
    sent = {(e.kind, e.get("file")) for e in events}
    assert (Kind.HTTP_SCRIPT, f"/boot/{mac}.ipxe") in sent, events
    assert (Kind.HTTP_KERNEL, "/assets/testos/vmlinuz") in sent, events
    assert (Kind.HTTP_INITRD, "/assets/testos/initrd") in sent, events
    assert any(e.kind in (Kind.DHCP_OFFER, Kind.DHCP_ACK) for e in events), events


def test_bios_and_uefi_pxe_boot_in_proxy_mode_beside_a_home_router(
    vm_require: None, testos: tuple[Path, Path], segment: netlab.Segment, workdir: Path,
    record_property: Callable[[str, object], None],
) -> None:  # fmt: skip
    router = segment.add_host("router", ip=f"{ROUTER_IP}/24")
    netlab.start_dnsmasq_router(router, *RANGE, ping_check=False)
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    # The UEFI machine is not enrolled: it is discovered and boots the default image.
    agent = start_agent(agent_host, lab_config(workdir, testos, "proxy", enrolled=False), workdir)
    bios = vmlab.start_vm(segment, "bios1", BIOS_MAC, firmware="bios", workdir=workdir)
    uefi = vmlab.start_vm(segment, "uefi1", UEFI_MAC, firmware="uefi", pxe="native",
                          workdir=workdir)  # fmt: skip
    times = wait_all_up({bios: "", uefi: ""})
    low, high = (ipaddress.IPv4Address(a) for a in RANGE)
    for vm in (bios, uefi):
        address = booted_address(vm, "")
        assert low <= address.ip <= high, f"{vm.name} got {address}, not from the router"
    report(record_property, times)
    text = agent.text()
    # UEFI's own PXE client went through port 4011 and TFTP before iPXE took over.
    assert f"unknown machine {UEFI_MAC} (x86_64 UEFI) asked to boot" in text
    uefi_events = recorded(workdir / "state", UEFI_MAC)
    assert any(e.kind == Kind.DHCP_ACK and e.get("port") == 4011 for e in uefi_events)
    assert any(e.kind == Kind.TFTP_SENT and e.get("file") == "ipxe.efi" for e in uefi_events)
    for mac in (BIOS_MAC, UEFI_MAC):
        assert_chain_recorded(workdir, mac)


def test_bios_and_uefi_pxe_boot_in_reservation_mode_with_their_reserved_addresses(
    vm_require: None, testos: tuple[Path, Path], segment: netlab.Segment, workdir: Path,
    record_property: Callable[[str, object], None],
) -> None:  # fmt: skip
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    start_agent(agent_host, lab_config(workdir, testos, "reservation", True), workdir)
    bios = vmlab.start_vm(segment, "bios1", BIOS_MAC, firmware="bios", workdir=workdir)
    uefi = vmlab.start_vm(segment, "uefi1", UEFI_MAC, firmware="uefi", pxe="native",
                          workdir=workdir)  # fmt: skip
    times = wait_all_up({bios: "bios1", uefi: "uefi1"})
    for vm, mac, name in ((bios, BIOS_MAC, "bios1"), (uefi, UEFI_MAC, "uefi1")):
        assert booted_address(vm, name) == ipaddress.IPv4Interface(f"{RESERVED[mac]}/24")
    report(record_property, times)
    for mac in (BIOS_MAC, UEFI_MAC):
        assert_chain_recorded(workdir, mac)
