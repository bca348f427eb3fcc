"""arm64 UEFI machines on a segment, for the tests: qemu-system-aarch64 `virt` with AAVMF.

pixiebox.virtlab.vm starts x86 machines only (q35, SeaBIOS/OVMF); this is the least it takes for
an arm64 one, reusing its VM record, tap and QMP helpers so the machine is stopped, its tap
removed and its console read exactly like theirs. The firmware is Debian's AAVMF (bookworm's
qemu-efi-aarch64: EDK2 for QEMU's virt board) with a private copy of its variable store.

The NIC is virtio-net-pci with no option ROM (`romfile=`): QEMU's default ROM for it is an x86
iPXE (ipxe-qemu's efi-virtio.rom), which an arm64 firmware cannot run, so AAVMF's own
VirtioNetDxe and PXE client boot, as on a real arm64 server. A virtio RNG as on every UEFI machine
of the lab: EDK2's network stack makes no PXE boot option without an RNG protocol since the
CVE-2023-45237 fix, and the emulated Cortex-A57 has no RNDR (docs/firmware-quirks.md#34).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from pixiebox.virtlab import netns
from pixiebox.virtlab.vm import VM, _accel, _add_tap, _qmp_path

QEMU_AARCH64 = "qemu-system-aarch64"
# Debian's qemu-efi-aarch64: the 64 MiB pflash images QEMU's virt board takes as they are.
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
#: TCG emulates the Cortex-A57 instruction by instruction: slower than x86 on x86.
CPU = "cortex-a57"


def prerequisite_problem() -> str | None:
    """Why an arm64 VM cannot run here (None if it can), with the package that fixes it."""
    problem = netns.prerequisite_problem((QEMU_AARCH64,))
    if problem:
        return f"{problem} (apt-get install qemu-system-arm)"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "arm64 VMs need /dev/net/tun (tap devices)"
    for firmware in (AAVMF_CODE, AAVMF_VARS):
        if not firmware.is_file():
            return f"{firmware} not found: apt-get install qemu-efi-aarch64"
    return None


def start_arm64_vm(
    segment: netns.Segment, name: str, mac: str, *, workdir: Path, memory_mb: int = 512
) -> VM:
    """An arm64 UEFI machine, powered on, network-booting from its one NIC (``mac``) on
    ``segment``; stopped by VM.stop or when the segment closes. Files in ``workdir`` are named
    as start_vm names them (NAME-console.log, NAME-qemu.log, NAME.qmp, NAME-AAVMF_VARS.fd)."""
    mac = mac.lower()
    workdir.mkdir(parents=True, exist_ok=True)
    console = workdir / f"{name}-console.log"
    console.unlink(missing_ok=True)
    vars_copy = workdir / f"{name}-AAVMF_VARS.fd"
    shutil.copyfile(AAVMF_VARS, vars_copy)  # AAVMF writes its boot options here
    qmp = _qmp_path(workdir, name)
    qmp.unlink(missing_ok=True)
    tap = _add_tap(segment)
    argv = [
        shutil.which(QEMU_AARCH64) or QEMU_AARCH64,
        "-name", name,
        "-machine", "virt",
        "-cpu", CPU,
        "-accel", _accel(),
        "-smp", "1",
        "-m", str(memory_mb),
        "-nodefaults",
        "-display", "none",
        "-serial", f"file:{console}",  # the board's PL011: AAVMF's and iPXE's console
        "-monitor", "none",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-no-shutdown",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={AAVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-device", "virtio-rng-pci",
        "-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=net0,mac={mac},romfile=,bootindex=1",
    ]  # fmt: skip
    log = workdir / f"{name}-qemu.log"
    try:
        proc = segment.switch.popen(argv, log)
    except BaseException:
        netns.run_command(["ip", "-n", segment.switch.name, "link", "del", tap], check=False)
        raise
    return VM(
        name=name,
        mac=mac,
        firmware="uefi",
        pxe="native",
        proc=proc,
        console=console,
        log=log,
        tap=tap,
        segment=segment,
        argv=argv,
        started=time.monotonic(),
        qmp=qmp,
    )
