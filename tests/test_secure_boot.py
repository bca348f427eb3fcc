"""The Secure Boot firmware the signed chain is tested against really enforces (issue 16).

QEMU q35 with SMM and a secure pflash (the firmware's variables can only be written from SMM, so
nothing the guest runs can switch Secure Boot off), Debian trixie's OVMF Secure Boot build with a
private copy of the variables that enroll Microsoft's keys (image/trixie.txt, fetched by
`./build.sh trixie` or `test`, never installed), under TCG. Each machine boots a FAT disk
(QEMU's vvfat of a directory) holding \\EFI\\BOOT\\BOOTX64.EFI, the removable-media path every
UEFI firmware tries:

- Debian's shim (signed by Microsoft's UEFI CA) starts, verifies and loads Debian's signed
  network GRUB (\\EFI\\BOOT\\grubx64.efi beside it), which reads `grub/grub.cfg` under its
  built-in prefix `/grub` and prints a marker: the whole signed first stage runs.
- Debian bookworm's iPXE (ipxe.efi, not signed by any key the firmware holds) is refused.

Without these two facts a later test of the PXE chain could pass against firmware that lets
everything through.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import vmlab
from trixiefiles import on_ci, trixie_file_or_skip

REPO = Path(__file__).resolve().parent.parent
UNSIGNED_EFI = Path("/usr/lib/ipxe/ipxe.efi")  # Debian's ipxe package: no signature at all
MARKER = "PIXIEBOX-SIGNED-GRUB-RAN"
#: What OVMF says when it refuses an image: BdsDxe on the console ("BdsDxe: failed to load
#: Boot0001 ... Access Denied", seen with trixie's 2025.02-8+deb13u1), or, in a DEBUG build,
#: DxeImageVerificationLib on the debug port (Debian's RELEASE build writes nothing there).
REFUSALS = ("Access Denied", "Image is not signed", "SECURITY_VIOLATION")
#: What OVMF says when it has nothing (left) to boot: a run that reaches it can stop waiting.
NOTHING_TO_BOOT = "No bootable option or device was found"
# QEMU machines: with the namespace and VM tests (conftest's rule cannot see through the class).
pytestmark = pytest.mark.netns

BOOT_TIMEOUT = 240.0  # s: OVMF + shim + GRUB under TCG on a loaded 2-core machine


def _require_qemu() -> None:
    missing = [tool for tool in (vmlab.QEMU,) if shutil.which(tool) is None]
    if not UNSIGNED_EFI.is_file():
        missing.append(f"{UNSIGNED_EFI} (apt-get install ipxe)")
    if missing:
        problem = f"Secure Boot test needs {', '.join(missing)}"
        if on_ci():
            pytest.fail(f"CI=true but prerequisite missing: {problem}", pytrace=False)
        pytest.skip(problem)


def disk(esp: Path) -> list[str]:
    """QEMU arguments: the directory `esp` as a read-only FAT disk, booted first."""
    return [
        "-drive", f"if=none,id=esp,format=raw,readonly=on,file=fat:{esp}",
        "-device", "virtio-blk-pci,drive=esp,bootindex=0",
    ]  # fmt: skip


class SecureBootVM:
    """One QEMU machine under OVMF with Secure Boot enforcing, booting what `boot` says."""

    def __init__(self, workdir: Path, boot: list[str]) -> None:
        _require_qemu()
        code = trixie_file_or_skip("ovmf", vmlab.SECBOOT_CODE)
        vars_template = trixie_file_or_skip("ovmf", vmlab.SECBOOT_VARS)
        self.vars = workdir / "OVMF_VARS.fd"
        shutil.copyfile(vars_template, self.vars)  # the firmware writes its variables here
        self.serial = workdir / "serial.log"
        self.debug = workdir / "ovmf-debug.log"
        self.qemu_log = workdir / "qemu.log"
        argv = [
            vmlab.QEMU,
            "-machine", "q35,smm=on",
            "-accel", os.environ.get(vmlab.ACCEL_ENV, "").strip() or "tcg",
            "-m", "512", "-smp", "1", "-nodefaults", "-display", "none",
            # Variables writable from SMM only: the guest cannot turn Secure Boot off.
            "-global", "driver=cfi.pflash01,property=secure,value=on",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={self.vars}",
            *boot,
            "-serial", f"file:{self.serial}",
            # OVMF's own log (DEBUG messages, image verification among them) on port 0x402.
            "-debugcon", f"file:{self.debug}", "-global", "isa-debugcon.iobase=0x402",
        ]  # fmt: skip
        with self.qemu_log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def text(self) -> str:
        parts = []
        for path in (self.serial, self.debug):
            try:
                parts.append(path.read_bytes().decode("utf-8", "replace").replace("\r", ""))
            except FileNotFoundError:
                parts.append("")
        return "\n".join(parts)

    def wait_for(self, needles: tuple[str, ...], timeout: float) -> str:
        """The first of `needles` seen on the console or OVMF's log within `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            for needle in needles:
                if needle in text:
                    return needle
            if self.proc.poll() is not None:
                text = self.text()  # what it wrote before it exited
                found = [needle for needle in needles if needle in text]
                if found:
                    return found[0]
                break
            time.sleep(0.5)
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        raise AssertionError(
            f"none of {needles} within {timeout:.0f} s (QEMU {state})"
            f"\n--- serial console (tail):\n{self.tail(self.serial)}"
            f"\n--- OVMF debug log (tail):\n{self.tail(self.debug)}"
            f"\n--- QEMU:\n{self.tail(self.qemu_log)}"
        )

    @staticmethod
    def tail(path: Path, lines: int = 40) -> str:
        try:
            text = path.read_bytes().decode("utf-8", "replace").replace("\r", "")
        except FileNotFoundError:
            return "(none)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def boot_disk(tmp_path: Path) -> Iterator[tuple[Path, list[SecureBootVM]]]:
    """A directory QEMU shows as a FAT disk, and the machines started on it (stopped after)."""
    esp = tmp_path / "esp"
    (esp / "EFI" / "BOOT").mkdir(parents=True)
    machines: list[SecureBootVM] = []
    try:
        yield esp, machines
    finally:
        for machine in machines:
            machine.stop()


def test_signed_shim_starts_and_loads_signed_grub(
    boot_disk: tuple[Path, list[SecureBootVM]], tmp_path: Path
) -> None:
    esp, machines = boot_disk
    shim = trixie_file_or_skip("shim-signed", "usr/lib/shim/shimx64.efi.signed")
    grub = trixie_file_or_skip(
        "grub-efi-amd64-signed", "usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"
    )
    shutil.copyfile(shim, esp / "EFI" / "BOOT" / "BOOTX64.EFI")
    # shim loads \grubx64.efi from its own directory (rhboot/shim: DEFAULT_LOADER).
    shutil.copyfile(grub, esp / "EFI" / "BOOT" / "grubx64.efi")
    # Debian's grubnetx64 has the prefix /grub built in and its memdisk config sources
    # $prefix/grub.cfg (after x86_64-efi/grub.cfg and grub.cfg-amd64, which are absent here).
    (esp / "grub").mkdir()
    (esp / "grub" / "grub.cfg").write_text(f"echo {MARKER}\nsleep 1\nhalt\n")
    machine = SecureBootVM(tmp_path, disk(esp))
    machines.append(machine)
    seen = machine.wait_for((MARKER, *REFUSALS, NOTHING_TO_BOOT), BOOT_TIMEOUT)
    assert seen == MARKER, (
        f"the firmware refused the signed chain ({seen!r}):\n{machine.tail(machine.debug)}"
    )


def test_unsigned_efi_binary_is_refused(
    boot_disk: tuple[Path, list[SecureBootVM]], tmp_path: Path
) -> None:
    esp, machines = boot_disk
    trixie_file_or_skip("ovmf", vmlab.SECBOOT_VARS)
    _require_qemu()
    shutil.copyfile(UNSIGNED_EFI, esp / "EFI" / "BOOT" / "BOOTX64.EFI")
    machine = SecureBootVM(tmp_path, disk(esp))
    machines.append(machine)
    seen = machine.wait_for((*REFUSALS, NOTHING_TO_BOOT), BOOT_TIMEOUT)
    assert seen in REFUSALS, machine.tail(machine.serial)
    assert re.search(r"failed to load Boot\w+ .*Access Denied", machine.text()) or (
        "Image is not signed" in machine.text()
    ), machine.tail(machine.serial)
    # iPXE never ran: its banner would be on the console.
    assert "iPXE" not in machine.tail(machine.serial, 200), machine.tail(machine.serial)
