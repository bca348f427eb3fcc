"""arm machines on a segment, for the demo and the tests: qemu-system-aarch64 `virt` with AAVMF.

pixiebox.virtlab.vm starts x86 machines only (q35, SeaBIOS/OVMF); this is the least it takes for
an arm64 one, reusing its VM record, tap and QMP helpers so the machine is stopped, its tap
removed and its console read exactly like theirs. The firmware is Debian's AAVMF (bookworm's
qemu-efi-aarch64: EDK2 for QEMU's virt board) with a private copy of its variable store.

The NIC is virtio-net-pci with no option ROM (`romfile=`): QEMU's default ROM for it is an x86
iPXE (ipxe-qemu's efi-virtio.rom), which an arm64 firmware cannot run, so AAVMF's own
VirtioNetDxe and PXE client boot, as on a real arm64 server. A virtio RNG as on every UEFI machine
of the lab: EDK2's network stack makes no PXE boot option without an RNG protocol since the
CVE-2023-45237 fix, and the emulated Cortex-A57 has no RNDR (docs/firmware-quirks.md#34).

U-Boot boards (start_uboot_vm): the same `virt` board with bookworm's u-boot-qemu as its -bios,
64-bit (qemu_arm64) or 32-bit (qemu_arm, on qemu-system-arm). Debian builds these U-Boots with
distro boot targets qfw, usb, scsi, virtio, nvme and dhcp, but no `pxe`: left alone they try
boot.scr.uimg and then UEFI's PXE (a boot file run with bootefi), never pxelinux.cfg. A real
board (a Jetson TK1's U-Boot) runs `bootcmd_pxe`, so the tests stop autoboot on the serial
console and type that command: the console is a socket QEMU also logs to a file.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pixiebox.virtlab import netns
from pixiebox.virtlab.vm import VM, qemu_head, spawn, vm_files

QEMU_AARCH64 = "qemu-system-aarch64"
QEMU_ARM = "qemu-system-arm"
# Debian's qemu-efi-aarch64: the 64 MiB pflash images QEMU's virt board takes as they are.
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
#: TCG emulates the Cortex-A57 instruction by instruction: slower than x86 on x86.
CPU = "cortex-a57"
#: Debian's u-boot-qemu, by Debian architecture: the board's firmware, QEMU's -bios.
UBOOT = {
    "arm64": Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin"),
    "armhf": Path("/usr/lib/u-boot/qemu_arm/u-boot.bin"),
}
UBootArch = Literal["arm64", "armhf"]
#: What distro boot's bootcmd_pxe runs (include/config_distro_bootcmd.h, with boot_pci_enum):
#: `dhcp` sends option 93 = 22 (armv8) or 21 (armv7) and U-Boot's vendor class
#: (docs/firmware-quirks.md#30), then tries the boot file (autoload), then `pxe get` asks
#: pxelinux.cfg/01-<mac> and `pxe boot` fetches the kernel and initrd by TFTP.
BOOTCMD_PXE = "pci enum; dhcp; if pxe get; then pxe boot; fi"
AUTOBOOT = "Hit any key to stop autoboot"
PROMPT = "=> "


def prerequisite_problem(uboot: tuple[UBootArch, ...] = (), *, uefi: bool = True) -> str | None:
    """Why the arm VMs cannot run here (None if they can), with the package that fixes it:
    an arm64 UEFI one (`uefi`), U-Boot boards of the architectures `uboot`."""
    emulators = {QEMU_AARCH64} if uefi or "arm64" in uboot else set()
    if "armhf" in uboot:
        emulators.add(QEMU_ARM)
    problem = netns.prerequisite_problem(tuple(sorted(emulators)))
    if problem:
        return f"{problem} (apt-get install qemu-system-arm)"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "arm VMs need /dev/net/tun (tap devices)"
    for firmware in (AAVMF_CODE, AAVMF_VARS) if uefi else ():
        if not firmware.is_file():
            return f"{firmware} not found: apt-get install qemu-efi-aarch64"
    for arch in uboot:
        if not UBOOT[arch].is_file():
            return f"{UBOOT[arch]} not found: apt-get install u-boot-qemu"
    return None


def start_arm64_vm(
    segment: netns.Segment, name: str, mac: str, *, workdir: Path, memory_mb: int = 512
) -> VM:
    """An arm64 UEFI machine, powered on, network-booting from its one NIC (``mac``) on
    ``segment``; stopped by VM.stop or when the segment closes. Files in ``workdir`` are named
    as start_vm names them (NAME-console.log, NAME-qemu.log, NAME.qmp, NAME-AAVMF_VARS.fd)."""
    mac = mac.lower()
    console, qmp, tap = vm_files(segment, workdir, name)
    vars_copy = workdir / f"{name}-AAVMF_VARS.fd"
    shutil.copyfile(AAVMF_VARS, vars_copy)  # AAVMF writes its boot options here
    serial = ["-serial", f"file:{console}"]  # the board's PL011: AAVMF's and iPXE's console
    argv = qemu_head(QEMU_AARCH64, name, ["-machine", "virt", "-cpu", CPU], memory_mb, serial,
                     qmp, tap)  # fmt: skip
    argv += [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={AAVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-device", "virtio-rng-pci",
        "-device", f"virtio-net-pci,netdev=net0,mac={mac},romfile=,bootindex=1",
    ]  # fmt: skip
    log = workdir / f"{name}-qemu.log"
    proc = spawn(segment, argv, tap, log)
    return VM(
        name=name, mac=mac, firmware="uefi", pxe="native", proc=proc, console=console, log=log,
        tap=tap, segment=segment, argv=argv, started=time.monotonic(), qmp=qmp,
    )  # fmt: skip


@dataclass(eq=False)
class UBootVM(VM):
    """A U-Boot board: a VM whose serial console also takes keystrokes (type_line)."""

    serial: Path | None = None  # the console's unix socket (QEMU is its server)

    def type_line(self, line: str) -> None:
        """Type `line` and Enter on the console. QEMU reads from the socket only as fast as the
        emulated UART takes characters, so a long line is not cut."""
        assert self.serial is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self.serial))
            sock.sendall(line.encode() + b"\r")
            time.sleep(0.5)  # let QEMU read it before the connection closes

    def run_bootcmd_pxe(self, timeout: float) -> None:
        """Stop autoboot at U-Boot's countdown and run distro boot's PXE command."""
        before = self.wait_console(AUTOBOOT, timeout).count(PROMPT)
        self.type_line("")
        deadline = time.monotonic() + 30
        while self.console_text().count(PROMPT) <= before:
            assert time.monotonic() < deadline, f"no U-Boot prompt\n{self.tails()}"
            time.sleep(0.2)
        self.type_line(BOOTCMD_PXE)

    def stop(self) -> None:
        super().stop()
        if self.serial is not None:
            self.serial.unlink(missing_ok=True)
            if self.serial.parent.name.startswith("pxbser-"):
                shutil.rmtree(self.serial.parent, ignore_errors=True)


def start_uboot_vm(
    segment: netns.Segment, name: str, mac: str, *, arch: UBootArch, workdir: Path,
    memory_mb: int = 512,
) -> UBootVM:  # fmt: skip
    """A `virt` board of `arch` running Debian's U-Boot, powered on, its one NIC (``mac``,
    virtio-net on virtio-mmio, which U-Boot's and Linux's virtio drivers take) on ``segment``.
    Files in ``workdir`` as start_arm64_vm names them; stop it with UBootVM.stop."""
    mac = mac.lower()
    console, qmp, tap = vm_files(segment, workdir, name)
    # A unix socket path has ~100 bytes: pytest's directories are longer.
    serial = Path(tempfile.mkdtemp(prefix="pxbser-")) / f"{name}.sock"
    if arch == "arm64":
        machine = ["-machine", "virt", "-cpu", CPU]
        qemu = QEMU_AARCH64
    else:
        # highmem=off: the PCI host's ECAM and windows below 4 GiB, where U-Boot and the armmp
        # (non-LPAE) kernel reach them.
        machine = ["-machine", "virt,highmem=off", "-cpu", "cortex-a15"]
        qemu = QEMU_ARM
    console_args = [
        "-chardev", f"socket,id=console,path={serial},server=on,wait=off,logfile={console}",
        "-serial", "chardev:console",
    ]  # fmt: skip
    argv = qemu_head(qemu, name, machine, memory_mb, console_args, qmp, tap)
    argv += [
        "-bios", str(UBOOT[arch]),
        # virtio-mmio, not PCI: U-Boot 2023.01's virtio-pci (modern) reads the MAC address from
        # the config space one byte at the same offset six times (52:52:52:52:52:52), so the
        # board would ask DHCP as a machine nobody enrolled.
        "-device", f"virtio-net-device,netdev=net0,mac={mac}",
    ]  # fmt: skip
    log = workdir / f"{name}-qemu.log"
    proc = spawn(segment, argv, tap, log)
    return UBootVM(
        # "bios": VM knows BIOS and UEFI only; U-Boot, like a BIOS, offers no EFI variables.
        name=name, mac=mac, firmware="bios", pxe="native", proc=proc, console=console, log=log,
        tap=tap, segment=segment, argv=argv, started=time.monotonic(), qmp=qmp, serial=serial,
    )  # fmt: skip
