"""ARM machines boot the real OSIE from Pixiebox, under TCG, with Debian's firmware (issue 15):
one agent in reservation mode, one lab.toml whose image has a build per architecture
([images.osie.arch.arm64], [images.osie.arch.armhf] over an x86-64 base), and three machines
powered on together, sharing the agent and the time:

- uefi64, qemu-system-aarch64 `virt` with AAVMF (bookworm's qemu-efi-aarch64): its own PXE
  client gets Debian trixie's arm64 iPXE (ipxe-arm64.efi, image/trixie.txt) over TFTP; that iPXE
  runs the machine's script, which downloads the arm64 OSIE over HTTP and starts the kernel
  through its EFI stub;
- uboot64, the same board with u-boot-qemu's arm64 U-Boot, and uboot32, qemu-system-arm `virt`
  with its 32-bit U-Boot: `dhcp` (option 93 = 22 / 21, docs/firmware-quirks.md#30: U-Boot takes
  no proxy offer, hence reservation mode), `pxe get` of pxelinux.cfg/01-<mac>, `pxe boot` of the
  kernel and initrd over TFTP, no device tree named (U-Boot hands over QEMU's).

Each machine gets its architecture's OSIE (`./build.sh osie --arch arm64|armhf`, out/osie-ARCH;
an x86 kernel handed to one of them would not start, so `up` proves the per-architecture
choice). Like the x86 one it fetches its metadata, takes the host key the agent keeps for its
MAC and the lab's SSH keys, and phones home `up`: the test then logs in over SSH with the lab's
key, strict about the host key the agent holds, and reads the machine's architecture. The Pi's
boot ROM runs in no emulator: tests/test_raspi.py plays its packets. Power-on-to-up times are
printed and recorded as `boot_seconds`, never asserted.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import netlab
import pytest
from agentproc import recorded, start_agent
from osiebuilds import built
from pixiebox.config.schema import ARM_CONSOLES
from pixiebox.events import Kind
from pixiebox.store.state import EVENTS_PER_MACHINE, StateStore
from pixiebox.virtlab import arm, demo_access
from pixiebox.virtlab.vm import VM
from testoslab import install_testos, lab_toml_for_testos
from trixiefiles import on_ci, trixie_file_or_skip

SUBNET = "10.83.0.0/24"
AGENT_IP = "10.83.0.2"
UEFI64 = ("uefi64", "52:54:00:83:00:01", "10.83.0.31")
UBOOT64 = ("uboot64", "52:54:00:83:00:02", "10.83.0.32")
UBOOT32 = ("uboot32", "52:54:00:83:00:03", "10.83.0.33")
BOARDS = (UEFI64, UBOOT64, UBOOT32)
#: Three TCG machines on a loaded 2-core host: firmware, 40-50 MB initrds (over TFTP to U-Boot),
#: Linux and systemd instruction by instruction.
TIMEOUT = 1500.0
#: The OSIE lives in RAM: its initrd unpacked, under an overlay (virtlab.demo.memory_for).
MEMORY_MB = 2048
#: What each console says once the agent's boot configuration is in hand, by machine and MAC:
#: the agent's iPXE script echoed by the iPXE it served, U-Boot's pxelinux.cfg fetch.
CONFIGURED: dict[str, Callable[[str], str]] = {
    "uefi64": lambda mac: f"Pixiebox: uefi64 ({mac}) boots image osie on arm64",
    "uboot64": lambda mac: f"Retrieving file: pxelinux.cfg/01-{mac.replace(':', '-')}",
    "uboot32": lambda mac: f"Retrieving file: pxelinux.cfg/01-{mac.replace(':', '-')}",
}
#: What `uname -m` says on each, and the CPU the firmware reported (pixiebox.arch=).
MACHINE = {"uefi64": "aarch64", "uboot64": "aarch64", "uboot32": "armv7l"}
CPU = {"uefi64": "arm64", "uboot64": "arm64", "uboot32": "arm32"}
#: The arch tables as the appliance's default images have them (config.schema.default_images):
#: both serial consoles named, device trees in dtbs/ (QEMU's U-Boot has no fdt_addr_r, so it
#: fetches none and hands over QEMU's own tree, as it does when the file is missing).
ARCH_IMAGES = "".join(
    f'[images.osie.arch.{arch}]\nkernel = "osie-{arch}/vmlinuz"\ninitrd = ["osie-{arch}/initrd"]\n'
    f'cmdline = "{ARM_CONSOLES}"\nfdtdir = "osie-{arch}/dtbs"\n'
    for arch in ("arm64", "armhf")
)


@pytest.fixture
def arm_require(netlab_require: Callable[..., None]) -> Path:
    """trixie's arm64 iPXE as build.sh unpacked it; skips (fails on CI) without it, QEMU's arm
    emulators, AAVMF or u-boot-qemu."""
    netlab_require(arm.QEMU_AARCH64, arm.QEMU_ARM, "ssh", "ssh-keygen")
    problem = arm.prerequisite_problem(("arm64", "armhf"))
    if problem and on_ci():
        pytest.fail(f"CI=true but an arm VM prerequisite is missing: {problem}", pytrace=False)
    if problem:
        pytest.skip(problem)
    return trixie_file_or_skip("ipxe", "usr/lib/ipxe/ipxe-arm64.efi")


def install_osie(assets: Path, arch: str) -> None:
    """The `arch` OSIE's kernel and initrd under assets/osie-ARCH (copies: TFTP and HTTP serve
    nothing that leads out of the assets directory)."""
    source = built(arch)
    (assets / f"osie-{arch}").mkdir(parents=True, exist_ok=True)
    for name in ("vmlinuz", "initrd"):
        shutil.copyfile(source / name, assets / f"osie-{arch}" / name)


def ssh(host: netlab.Host, key: Path, known_hosts: Path, ip: str, command: str) -> str:
    """`command` run as root on `ip` with the lab's key, accepting only the host key in
    known_hosts (the one the agent keeps for that machine)."""
    argv = [
        "ssh", "-i", str(key), "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
        f"root@{ip}", command,
    ]  # fmt: skip
    result = host.run(argv, timeout=90, check=False)
    assert result.returncode == 0, (ip, result.stderr)
    return str(result.stdout)


@pytest.mark.timeout(TIMEOUT + 300)
def test_arm64_uefi_and_arm64_and_armhf_u_boot_boards_boot_their_architectures_osie_to_up(
    arm_require: Path, testos: tuple[Path, Path], segment: netlab.Segment, workdir: Path,
    record_property: Callable[[str, object], None],
) -> None:  # fmt: skip
    assets = install_testos(workdir, testos)  # the base image: x86-64, booted by none here
    install_osie(assets, "arm64")
    install_osie(assets, "armhf")
    key = workdir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tester@laptop",
                    "-f", str(key)], check=True, timeout=30)  # fmt: skip
    public = key.with_suffix(".pub").read_text().strip()
    config = lab_toml_for_testos(
        "arm-boards", SUBNET, workdir, boot=f'ssh_keys = ["{public}"]\n', sections=ARCH_IMAGES
    ) + "".join(f'[[machines]]\nname = "{name}"\nmac = "{mac}"\nip = "{ip}"\n'
                for name, mac, ip in BOARDS)  # fmt: skip
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    agent = start_agent(agent_host, config, workdir)
    state = workdir / "state"
    vms: list[VM] = []
    try:
        # The U-Boot boards one after the other: each countdown (2 s) must be caught.
        boards: tuple[tuple[tuple[str, str, str], arm.UBootArch], ...] = (
            (UBOOT64, "arm64"), (UBOOT32, "armhf"),
        )  # fmt: skip
        for (name, mac, _), arch in boards:
            uboot = arm.start_uboot_vm(
                segment, name, mac, arch=arch, workdir=workdir, memory_mb=MEMORY_MB
            )
            vms.append(uboot)
            uboot.run_bootcmd_pxe(120)
        vms.append(arm.start_arm64_vm(segment, UEFI64[0], UEFI64[1], workdir=workdir,
                                      memory_mb=MEMORY_MB))  # fmt: skip
        up: dict[str, float] = {}
        configured: dict[str, float] = {}  # the iPXE script or pxelinux.cfg in hand

        def all_up() -> bool:
            for vm in vms:
                if vm.name not in configured and CONFIGURED[vm.name](vm.mac) in vm.console_text():
                    configured[vm.name] = vm.elapsed()
                if vm.name not in up and any(e.kind == Kind.OS_UP for e in recorded(state, vm.mac)):
                    up[vm.name] = vm.elapsed()
                assert vm.proc.poll() is None, vm.tails()
            return len(up) == len(vms)

        try:
            netlab.wait_until(all_up, TIMEOUT, 2.0, "the three arm machines up")
        except AssertionError:
            late = [vm for vm in vms if vm.name not in up]
            raise AssertionError(
                f"up: {up}; not up:\n" + "\n".join(vm.tails() for vm in late)
            ) from None
        # Logged in with the lab's key, strict about the host key the agent keeps for the MAC:
        # the machine holds its SSH key and its host key, both from the agent.
        logins: dict[str, list[str]] = {}
        for name, mac, ip in BOARDS:
            known_hosts = workdir / f"known_hosts-{name}"
            line = demo_access.known_host_line(state, mac, ip)
            assert line is not None, f"the agent keeps no host key for {name} ({mac})"
            known_hosts.write_text(line)
            logins[name] = ssh(agent_host, key, known_hosts, ip, "hostname; uname -m").split()
        consoles = {vm.name: vm.console_text() for vm in vms}
    finally:
        for vm in vms:
            vm.stop()
    for name, _, _ in BOARDS:
        assert logins[name] == [name, MACHINE[name]], logins
        # The CPU the firmware reported, told to the OS (ipxe_script.kernel_arguments).
        text = consoles[name]
        command_line = next(line for line in text.splitlines() if "Kernel command line" in line)
        assert f"pixiebox.arch={CPU[name]} " in command_line, (name, command_line)
    assert "Start PXE over IPv4" in consoles["uefi64"], consoles["uefi64"][-3000:]  # AAVMF's own
    # The U-Boot boards went the pxelinux way (not U-Boot's UEFI fallback), each with its build.
    for name, arch in (("uboot64", "arm64"), ("uboot32", "armhf")):
        assert f"Retrieving file: osie-{arch}/vmlinuz" in consoles[name], consoles[name][-3000:]
    log = agent.text()
    assert f"offered {UEFI64[2]} with boot file ipxe-arm64.efi" in log, log[-3000:]
    assert f"from {arm_require})" in log, log[-3000:]  # trixie's package, as build.sh unpacked it
    store = StateStore(state)
    try:
        # All a machine keeps: the OSIE's journal (syslog events) outnumbers the boot's.
        events = {mac: store.events(mac, limit=EVENTS_PER_MACHINE) for _, mac, _ in BOARDS}
        records = {mac: store.machine_record(mac) for mac in events}
    finally:
        store.close()
    for mac, record in records.items():
        assert record is not None and record.state == "up", (mac, record)
        # No EFI variables under U-Boot, and AAVMF's Secure Boot is off.
        assert record.secure_boot == "off", (mac, record)
        kinds = {e.kind for e in events[mac]}
        assert {Kind.METADATA_SENT, Kind.OS_UP} <= kinds, (mac, kinds)
    uefi = events[UEFI64[1]]
    sent = [e for e in uefi if e.kind == Kind.TFTP_SENT and e.get("file") == "ipxe-arm64.efi"]
    assert sent and sent[0].get("bytes") == arm_require.stat().st_size, uefi
    kinds = {(e.kind, e.get("file")) for e in uefi}
    assert (Kind.HTTP_SCRIPT, f"/boot/{UEFI64[1]}.ipxe") in kinds, uefi
    assert (Kind.HTTP_KERNEL, "/assets/osie-arm64/vmlinuz") in kinds, uefi
    assert (Kind.HTTP_INITRD, "/assets/osie-arm64/initrd") in kinds, uefi
    for (_, mac, ip), arch, cpu in ((UBOOT64, "arm64", "arm64"), (UBOOT32, "armhf", "arm32")):
        board = events[mac]
        offers = [e for e in board if e.kind in (Kind.DHCP_OFFER, Kind.DHCP_ACK)]
        assert offers and all(e.get("arch") == cpu for e in offers), offers
        assert all(e.get("firmware") == "U-Boot" for e in offers), offers
        assert all(e.get("ip") == ip for e in offers), offers
        files = {e.get("file") for e in board if e.kind == Kind.TFTP_SENT}
        wanted = {f"osie-{arch}/vmlinuz", f"osie-{arch}/initrd"}
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
