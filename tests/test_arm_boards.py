"""ARM machines boot a real Linux from Pixiebox, under TCG, with Debian's firmware (issue 15):
one agent in reservation mode, one lab.toml whose image has a build per architecture
([images.osie.arch.arm64], [images.osie.arch.armhf] over an x86-64 base), and three machines
powered on together, sharing the agent and the time:

- uefi64, qemu-system-aarch64 `virt` with AAVMF (bookworm's qemu-efi-aarch64): its own PXE
  client gets Debian trixie's arm64 iPXE (ipxe-arm64.efi, image/trixie.txt) over TFTP; that iPXE
  runs the machine's script, which downloads the arm64 test OS over HTTP and starts the kernel
  through its EFI stub;
- uboot64, the same board with u-boot-qemu's arm64 U-Boot, and uboot32, qemu-system-arm `virt`
  with its 32-bit U-Boot: `dhcp` (option 93 = 22 / 21, docs/firmware-quirks.md#30: U-Boot takes
  no proxy offer, hence reservation mode), `pxe get` of pxelinux.cfg/01-<mac>, `pxe boot` of the
  kernel and initrd over TFTP, no device tree named (U-Boot hands over QEMU's).

Each machine gets its architecture's test OS (scripts/build-testos.sh --arch: Debian bookworm's
kernel and busybox-static of that architecture), which phones home `up` with secure_boot "off".
An x86 kernel handed to one of them would not start, so `up` proves the per-architecture choice.
Power-on-to-up times are printed and recorded as `boot_seconds`, never asserted.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import netlab
import pytest
from agentproc import start_agent
from pixiebox.events import Kind
from pixiebox.store.state import StateStore
from pixiebox.virtlab import arm
from pixiebox.virtlab.vm import VM
from testoslab import install_testos, lab_toml_for_testos
from trixiefiles import on_ci, trixie_file_or_skip

SUBNET = "10.83.0.0/24"
AGENT_IP = "10.83.0.2"
UEFI64 = ("uefi64", "52:54:00:83:00:01", "10.83.0.31")
UBOOT64 = ("uboot64", "52:54:00:83:00:02", "10.83.0.32")
UBOOT32 = ("uboot32", "52:54:00:83:00:03", "10.83.0.33")
#: Three TCG machines on a loaded 2-core host: firmware, 33 MB of arm64 kernel over TFTP to
#: U-Boot, Linux's boot instruction by instruction.
TIMEOUT = 1200.0
#: What each console says once the agent's boot configuration is in hand, by machine and MAC:
#: the agent's iPXE script echoed by the iPXE it served, U-Boot's pxelinux.cfg fetch.
CONFIGURED: dict[str, Callable[[str], str]] = {
    "uefi64": lambda mac: f"Pixiebox: uefi64 ({mac}) boots image osie on arm64",
    "uboot64": lambda mac: f"Retrieving file: pxelinux.cfg/01-{mac.replace(':', '-')}",
    "uboot32": lambda mac: f"Retrieving file: pxelinux.cfg/01-{mac.replace(':', '-')}",
}
ARCH_IMAGES = """[images.osie.arch.arm64]
kernel = "testos-arm64/vmlinuz"
initrd = ["testos-arm64/initrd"]
cmdline = "console=ttyAMA0"
[images.osie.arch.armhf]
kernel = "testos-armhf/vmlinuz"
initrd = ["testos-armhf/initrd"]
cmdline = "console=ttyAMA0"
"""


@pytest.fixture
def arm_require(netlab_require: Callable[..., None]) -> Path:
    """trixie's arm64 iPXE as build.sh unpacked it; skips (fails on CI) without it, QEMU's arm
    emulators, AAVMF or u-boot-qemu."""
    netlab_require(arm.QEMU_AARCH64, arm.QEMU_ARM)
    problem = arm.prerequisite_problem(("arm64", "armhf"))
    if problem and on_ci():
        pytest.fail(f"CI=true but an arm VM prerequisite is missing: {problem}", pytrace=False)
    if problem:
        pytest.skip(problem)
    return trixie_file_or_skip("ipxe", "usr/lib/ipxe/ipxe-arm64.efi")


def install(assets: Path, arch: str, testos: tuple[Path, Path]) -> None:
    (assets / f"testos-{arch}").mkdir(parents=True, exist_ok=True)
    for source in testos:
        shutil.copyfile(source, assets / f"testos-{arch}" / source.name)


@pytest.mark.timeout(TIMEOUT + 300)
def test_arm64_uefi_and_arm64_and_armhf_u_boot_boards_boot_their_architectures_test_os_to_up(
    arm_require: Path, testos: tuple[Path, Path], testos_arm64: tuple[Path, Path],
    testos_armhf: tuple[Path, Path], segment: netlab.Segment, workdir: Path,
    record_property: Callable[[str, object], None],
) -> None:  # fmt: skip
    assets = install_testos(workdir, testos)  # the base image: x86-64
    install(assets, "arm64", testos_arm64)
    install(assets, "armhf", testos_armhf)
    config = lab_toml_for_testos("arm-boards", SUBNET, workdir, sections=ARCH_IMAGES) + "".join(
        f'[[machines]]\nname = "{name}"\nmac = "{mac}"\nip = "{ip}"\n'
        for name, mac, ip in (UEFI64, UBOOT64, UBOOT32)
    )
    agent = start_agent(segment.add_host("agent", ip=f"{AGENT_IP}/24"), config, workdir)
    vms: list[VM] = []
    try:
        # The U-Boot boards one after the other: each countdown (2 s) must be caught.
        boards: tuple[tuple[tuple[str, str, str], arm.UBootArch], ...] = (
            (UBOOT64, "arm64"), (UBOOT32, "armhf"),
        )  # fmt: skip
        for (name, mac, _), arch in boards:
            uboot = arm.start_uboot_vm(segment, name, mac, arch=arch, workdir=workdir)
            vms.append(uboot)
            uboot.run_bootcmd_pxe(120)
        vms.append(arm.start_arm64_vm(segment, UEFI64[0], UEFI64[1], workdir=workdir))
        up: dict[str, float] = {}
        configured: dict[str, float] = {}  # the iPXE script or pxelinux.cfg in hand

        def all_up() -> bool:
            for vm in vms:
                text = vm.console_text()
                if vm.name not in configured and CONFIGURED[vm.name](vm.mac) in text:
                    configured[vm.name] = vm.elapsed()
                if vm.name not in up and f"PIXIEBOX-TESTOS: up {vm.name}" in text:
                    up[vm.name] = vm.elapsed()
                assert vm.proc.poll() is None, vm.tails()
            return len(up) == len(vms)

        try:
            netlab.wait_until(all_up, TIMEOUT, 1.0, "the three arm machines up")
        except AssertionError:
            late = [vm for vm in vms if vm.name not in up]
            raise AssertionError(
                f"up: {up}; not up:\n" + "\n".join(vm.tails() for vm in late)
            ) from None
        consoles = {vm.name: vm.console_text() for vm in vms}
    finally:
        for vm in vms:
            vm.stop()
    for name, cpu in (("uefi64", "arm64"), ("uboot64", "arm64"), ("uboot32", "arm32")):
        text = consoles[name]
        assert "PIXIEBOX-TESTOS: secure boot off" in text, (name, text[-3000:])
        # The CPU the firmware reported, told to the OS (ipxe_script.kernel_arguments).
        command_line = next(line for line in text.splitlines() if "Kernel command line" in line)
        assert f"pixiebox.arch={cpu} " in command_line, (name, command_line)
    assert "Start PXE over IPv4" in consoles["uefi64"], consoles["uefi64"][-3000:]  # AAVMF's own
    # The U-Boot boards went the pxelinux way (not U-Boot's UEFI fallback), each with its build.
    for name, arch in (("uboot64", "arm64"), ("uboot32", "armhf")):
        assert f"Retrieving file: testos-{arch}/vmlinuz" in consoles[name], consoles[name][-3000:]
    log = agent.text()
    assert f"offered {UEFI64[2]} with boot file ipxe-arm64.efi" in log, log[-3000:]
    assert f"from {arm_require})" in log, log[-3000:]  # trixie's package, as build.sh unpacked it
    store = StateStore(workdir / "state")
    try:
        events = {mac: store.events(mac) for _, mac, _ in (UEFI64, UBOOT64, UBOOT32)}
        records = {mac: store.machine_record(mac) for mac in events}
    finally:
        store.close()
    for mac, record in records.items():
        assert record is not None and record.state == "up", (mac, record)
        assert record.secure_boot == "off", (mac, record)
    uefi = events[UEFI64[1]]
    sent = [e for e in uefi if e.kind == Kind.TFTP_SENT and e.get("file") == "ipxe-arm64.efi"]
    assert sent and sent[0].get("bytes") == arm_require.stat().st_size, uefi
    kinds = {(e.kind, e.get("file")) for e in uefi}
    assert (Kind.HTTP_SCRIPT, f"/boot/{UEFI64[1]}.ipxe") in kinds, uefi
    assert (Kind.HTTP_KERNEL, "/assets/testos-arm64/vmlinuz") in kinds, uefi
    assert (Kind.HTTP_INITRD, "/assets/testos-arm64/initrd") in kinds, uefi
    for (_, mac, ip), arch, cpu in ((UBOOT64, "arm64", "arm64"), (UBOOT32, "armhf", "arm32")):
        board = events[mac]
        offers = [e for e in board if e.kind in (Kind.DHCP_OFFER, Kind.DHCP_ACK)]
        assert offers and all(e.get("arch") == cpu for e in offers), offers
        assert all(e.get("firmware") == "U-Boot" for e in offers), offers
        assert all(e.get("ip") == ip for e in offers), offers
        files = {e.get("file") for e in board if e.kind == Kind.TFTP_SENT}
        wanted = {f"testos-{arch}/vmlinuz", f"testos-{arch}/initrd"}
        assert wanted <= files and f"pxelinux.cfg/01-{mac.replace(':', '-')}" in files, board
    seconds = {
        name: {"configured": round(configured.get(name, -1.0), 1), "up": round(value, 1)}
        for name, value in sorted(up.items())
    }
    record_property("boot_seconds", seconds)
    print(
        "\narm boards, power-on to boot configuration / to up: "
        + ", ".join(f"{name} {t['configured']} s / {t['up']} s" for name, t in seconds.items())
    )
