"""QEMU machines on a virtual-lab segment, for real PXE boots (BIOS and UEFI).

A VM is a ``qemu-system-x86_64`` process started in the segment's switch namespace through
:meth:`netns.Host.popen`, so the segment tracks it and kills it on close.  Its NIC is a tap
device created in that namespace and enslaved to the bridge: it needs no link in the root
namespace and disappears with the switch namespace.  The serial console goes to a file that
:meth:`VM.wait_console` polls.

Firmware: ``bios`` is SeaBIOS; ``uefi`` is OVMF (Debian's ``ovmf`` package, with a private copy
of the variable store); ``secure_boot`` makes it trixie's OVMF with Secure Boot enforcing and
Microsoft's keys enrolled, its variables writable only from SMM (so the guest cannot switch it
off). Every UEFI machine has a virtio RNG: EDK2's network stack since the CVE-2023-45237 fix
(2024) makes no PXE boot option without an RNG protocol, and QEMU's default CPU model has no
RDRAND for OVMF's RngDxe (docs/firmware-quirks.md#34).

PXE: ``ipxe-rom`` uses QEMU's default option ROM for virtio-net-pci
(iPXE's ``efi-virtio.rom``, which holds both the legacy PXE and the EFI driver);
``native`` (UEFI only) gives the NIC no ROM so EDK2's own PXE stack boots, which fetches its
boot file by TFTP.  With ``kernel``/``initrd`` the VM boots them directly (no PXE).

TCG by default (``PIXIEBOX_QEMU_ACCEL`` overrides, e.g. ``kvm`` on real hardware): KVM guests
hang on these machines (nested virtualisation).  One vCPU per VM: the machines have 2 cores.

Power: every VM has a QMP socket (``NAME.qmp`` in the workdir), which the ``qemu`` power
driver and the Wake-on-LAN responder (wake.py) speak.  ``-no-shutdown`` keeps QEMU alive when
the guest powers off (run state ``shutdown``), so the VM can be powered on again like a
machine whose PSU is still plugged in; and a guest reboot resets the VM like real hardware
(no ``-no-reboot``, which would turn QMP's ``system_reset`` into a shutdown too).  With
``powered_on=False`` the VM starts off (``-S``: QEMU waits in ``prelaunch`` for QMP ``cont``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pixiebox.core.trixie import trixie_file
from pixiebox.virtlab import netns

QEMU = "qemu-system-x86_64"
ACCEL_ENV = "PIXIEBOX_QEMU_ACCEL"
# Debian bookworm's ovmf: the 4 MiB build without Secure Boot, as its QEMU firmware descriptor
# (/usr/share/qemu/firmware/60-edk2-x86_64.json) names; the 2 MiB build as a fallback.
OVMF_PAIRS = (
    (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
)
# Secure Boot firmware (issue 16): Debian trixie's OVMF built with Secure Boot and SMM, and the
# variable store that enrolls Microsoft's keys, as real PCs ship (image/trixie.txt; unpacked by
# `./build.sh trixie`, never installed). Code and vars come from one release.
SECBOOT_CODE = "usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
SECBOOT_VARS = "usr/share/OVMF/OVMF_VARS_4M.ms.fd"
# The combined legacy+EFI iPXE ROM QEMU loads for virtio-net-pci by default (ipxe-qemu).
IPXE_VIRTIO_ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")

Firmware = Literal["bios", "uefi"]
Pxe = Literal["ipxe-rom", "native"]

_TAP_IDS = itertools.count(1)
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
#: sun_path holds 108 bytes; a deeper workdir gets its QMP socket in a short temporary dir.
_SOCKET_PATH_MAX = 100


def ovmf_files() -> tuple[Path, Path]:
    """(OVMF_CODE, OVMF_VARS template) of the installed ovmf package."""
    for code, vars_template in OVMF_PAIRS:
        if code.is_file() and vars_template.is_file():
            return code, vars_template
    raise FileNotFoundError("OVMF not found in /usr/share/OVMF: apt-get install ovmf")


def prerequisite_problem(firmware: Firmware | None = None) -> str | None:
    """Why a VM cannot run here (None if it can): netlab's needs, QEMU, firmware files."""
    problem = netns.prerequisite_problem((QEMU,))
    if problem:
        return problem
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "vmlab needs /dev/net/tun (tap devices)"
    if firmware in (None, "uefi"):
        try:
            ovmf_files()
        except FileNotFoundError as exc:
            return str(exc)
    if not IPXE_VIRTIO_ROM.is_file():
        return f"vmlab needs {IPXE_VIRTIO_ROM}: apt-get install ipxe-qemu"
    return None


@dataclass(eq=False)
class VM:
    """A running QEMU machine; stopped by :meth:`stop` or when its segment closes."""

    name: str
    mac: str
    firmware: Firmware
    pxe: Pxe | None  # None: direct kernel boot
    proc: subprocess.Popen[bytes]
    console: Path  # the serial console (ttyS0), as written by QEMU
    log: Path  # QEMU's own stdout/stderr
    tap: str  # the tap device on the bridge, in the switch namespace
    segment: netns.Segment
    argv: list[str]
    started: float  # time.monotonic() when QEMU was started ("power-on")
    qmp: Path | None = None  # the QMP unix socket (the qemu power driver's `qmp` key)

    def console_text(self) -> str:
        """Everything on the serial console so far (CRs dropped, bad UTF-8 replaced)."""
        try:
            data = self.console.read_bytes()
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", "replace").replace("\r", "")

    def elapsed(self) -> float:
        """Seconds since power-on."""
        return time.monotonic() - self.started

    def wait_console(self, needle: str, timeout: float) -> str:
        """Wait (at most ``timeout`` s) until ``needle`` is on the console; return the text.

        Raises AssertionError with the console's tail and QEMU's log if the time runs out or
        QEMU exits first.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_text()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                problem = f"QEMU exited ({self.proc.returncode})"
                break
            if time.monotonic() >= deadline:
                problem = f"timed out after {timeout:g}s"
                break
            time.sleep(0.25)
        raise AssertionError(
            f"{self.name}: {problem} waiting for {needle!r} on the console "
            f"({self.elapsed():.0f}s after power-on)\n{self.tails()}"
        )

    def tails(self) -> str:
        """The console's tail and QEMU's log, for failure messages."""
        console = self.console_text()[-3000:]
        try:
            qemu_log = self.log.read_bytes()[-1500:].decode("utf-8", "replace")
        except OSError as exc:
            qemu_log = f"<{exc}>"
        return (
            f"----- {self.name} console tail ({self.console}) -----\n{console}\n"
            f"----- {self.name} QEMU log ({self.log}) -----\n{qemu_log}"
        )

    def stop(self) -> None:
        """Kill QEMU, remove the tap device and the QMP socket."""
        self.segment.stop(self.proc)
        netns.run_command(
            ["ip", "-n", self.segment.switch.name, "link", "del", self.tap], check=False
        )
        if self.qmp is not None:
            self.qmp.unlink(missing_ok=True)
            if self.qmp.parent.name.startswith("pxbqmp-"):
                with contextlib.suppress(OSError):
                    self.qmp.parent.rmdir()


def _accel() -> str:
    return os.environ.get(ACCEL_ENV, "").strip() or "tcg"


def _add_tap(segment: netns.Segment) -> str:
    """A persistent tap on the bridge, in the switch namespace (dies with it)."""
    ns = segment.switch.name
    tap = f"tap{next(_TAP_IDS)}"
    netns.run_command(["ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"])
    netns.run_command(["ip", "-n", ns, "link", "set", tap, "master", netns.BRIDGE, "up"])
    return tap


def _qmp_path(workdir: Path, name: str) -> Path:
    path = workdir.absolute() / f"{name}.qmp"
    if len(os.fsencode(str(path))) <= _SOCKET_PATH_MAX:
        return path
    return Path(tempfile.mkdtemp(prefix="pxbqmp-")) / f"{name}.qmp"


def start_vm(
    segment: netns.Segment,
    name: str,
    mac: str,
    *,
    firmware: Firmware,
    pxe: Pxe = "ipxe-rom",
    memory_mb: int = 512,
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str = "",
    workdir: Path,
    powered_on: bool = True,
    disk: Path | None = None,
    boot_retry: float | None = None,
    secure_boot: bool = False,
) -> VM:
    """Start a VM whose one NIC (virtio-net-pci, ``mac``) is on ``segment``, powered on
    unless ``powered_on`` is False (then QMP ``cont``, the qemu power driver's ``on``, or a
    Wake-on-LAN packet through wake.py starts it).

    Without ``kernel`` it network-boots (``pxe``); with it QEMU loads ``kernel``, ``initrd``
    and ``append`` directly (the firmware still runs). With ``disk`` (a raw or qcow2 image on a
    virtio disk) it boots from that disk, as the appliance does from its USB stick. Files go to
    ``workdir``: ``NAME-console.log``, ``NAME-qemu.log``, the QMP socket ``NAME.qmp`` and, for UEFI,
    ``NAME-OVMF_VARS.fd``.

    ``boot_retry`` (BIOS only): seconds SeaBIOS waits after finding nothing to boot, then
    resets and tries again, like firmware with its "retry boot" setting on; by default (QEMU's
    choice) it halts at "No bootable device." for good, e.g. when its PXE DHCP gave up before
    the lab's DHCP server was up.
    """
    mac = mac.lower()
    if not _MAC_RE.fullmatch(mac):
        raise ValueError(f"bad MAC {mac!r}")
    if firmware not in ("bios", "uefi"):
        raise ValueError(f"firmware must be 'bios' or 'uefi': {firmware!r}")
    if pxe not in ("ipxe-rom", "native"):
        raise ValueError(f"pxe must be 'ipxe-rom' or 'native': {pxe!r}")
    if pxe == "native" and firmware == "bios":
        raise ValueError("SeaBIOS has no PXE stack of its own: use pxe='ipxe-rom' for BIOS")
    if boot_retry is not None and firmware != "bios":
        raise ValueError("boot_retry is SeaBIOS's (firmware='bios'); OVMF has no such setting")
    if secure_boot and firmware != "uefi":
        raise ValueError("secure_boot needs firmware='uefi'")
    if kernel is None and (initrd is not None or append):
        raise ValueError("initrd and append need kernel (direct boot)")
    workdir = Path(workdir)
    console, qmp, tap = vm_files(segment, workdir, name)
    nic = f"virtio-net-pci,netdev=net0,mac={mac}"
    if pxe == "native":
        nic += ",romfile="  # no option ROM: OVMF's VirtioNetDxe + its own PXE client
    machine = ["-machine", "q35,smm=on" if secure_boot else "q35"]
    argv = qemu_head(QEMU, name, machine, memory_mb, ["-serial", f"file:{console}"], qmp, tap)
    if not powered_on:
        argv.append("-S")
    if firmware == "bios":
        # SeaBIOS's serial console (its "sercon", enabled by this fw_cfg file holding the port
        # as a little-endian integer): with no VGA, SeaBIOS and the iPXE ROM print to ttyS0 too.
        # QEMU warns that the name lacks the "opt/" prefix; SeaBIOS wants exactly this name.
        sercon = workdir / "seabios-sercon-port"
        sercon.write_bytes((0x3F8).to_bytes(2, "little"))
        argv += ["-fw_cfg", f"name=etc/sercon-port,file={sercon}"]
        if boot_retry is not None:  # SeaBIOS's etc/boot-fail-wait; QEMU merges -boot options
            argv += ["-boot", f"reboot-timeout={round(boot_retry * 1000)}"]
    if firmware == "uefi":
        if secure_boot:
            code, vars_template = (
                trixie_file("ovmf", SECBOOT_CODE),
                trixie_file("ovmf", SECBOOT_VARS),
            )
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
        else:
            code, vars_template = ovmf_files()
        vars_copy = workdir / f"{name}-OVMF_VARS.fd"
        shutil.copyfile(vars_template, vars_copy)  # OVMF writes its variables here
        argv += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
    if disk is not None:
        with disk.open("rb") as header:
            image_format = "qcow2" if header.read(4) == b"QFI\xfb" else "raw"
        argv += [
            "-drive", f"file={disk},format={image_format},if=none,id=disk0,cache=unsafe",
            "-device", "virtio-blk-pci,drive=disk0,bootindex=1",
            "-device", nic,
        ]  # fmt: skip
    elif kernel is not None:
        argv += ["-device", nic, "-kernel", str(kernel)]
        if initrd is not None:
            argv += ["-initrd", str(initrd)]
        if append:
            argv += ["-append", append]
    else:
        # bootindex is what OVMF builds its boot order from; SeaBIOS also takes -boot n.
        argv += ["-device", f"{nic},bootindex=1", "-boot", "n"]

    log = workdir / f"{name}-qemu.log"
    proc = spawn(segment, argv, tap, log)
    return VM(
        name=name, mac=mac, firmware=firmware, pxe=None if kernel is not None else pxe,
        proc=proc, console=console, log=log, tap=tap, segment=segment, argv=argv,
        started=time.monotonic(), qmp=qmp,
    )  # fmt: skip


def vm_files(segment: netns.Segment, workdir: Path, name: str) -> tuple[Path, Path, str]:
    """(console log, QMP socket, tap) of a new VM `name`: stale files of an earlier one with
    that name removed, the tap on the segment's bridge."""
    workdir.mkdir(parents=True, exist_ok=True)
    console = workdir / f"{name}-console.log"
    console.unlink(missing_ok=True)
    qmp = _qmp_path(workdir, name)
    qmp.unlink(missing_ok=True)
    return console, qmp, _add_tap(segment)


def qemu_head(
    qemu: str, name: str, machine: list[str], memory_mb: int, serial: list[str], qmp: Path,
    tap: str,
) -> list[str]:  # fmt: skip
    """The arguments every lab machine starts with, whatever its architecture: one vCPU under
    TCG (or PIXIEBOX_QEMU_ACCEL), only the devices listed, the serial console, QMP for the power
    drivers, a poweroff that leaves the machine off but alive, its NIC's tap as `net0`."""
    return [
        shutil.which(qemu) or qemu,
        "-name", name,
        *machine,
        "-accel", _accel(),
        "-smp", "1",
        "-m", str(memory_mb),
        "-nodefaults",  # no default NIC, VGA, floppy, CD-ROM: only what is listed here
        "-display", "none",
        *serial,
        "-monitor", "none",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-no-shutdown",  # a guest poweroff leaves the VM off, not gone: it can be powered on
        "-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no",
    ]  # fmt: skip


def spawn(segment: netns.Segment, argv: list[str], tap: str, log: Path) -> subprocess.Popen[bytes]:
    """QEMU started in the segment's switch namespace (which kills it on close); its tap
    removed if it cannot start."""
    try:
        return segment.switch.popen(argv, log)
    except BaseException:
        netns.run_command(["ip", "-n", segment.switch.name, "link", "del", tap], check=False)
        raise


__all__ = [
    "QEMU",
    "VM",
    "Firmware",
    "Pxe",
    "ovmf_files",
    "prerequisite_problem",
    "qemu_head",
    "spawn",
    "start_vm",
    "vm_files",
]
