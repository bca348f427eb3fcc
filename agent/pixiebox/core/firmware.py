"""Which firmware is asking, and which first-stage loader it needs.

The client architecture (DHCP option 93, RFC 4578 2.1, IANA "Processor Architecture Types")
decides the iPXE build to hand out. Firmware misreports it (docs/firmware-quirks.md#12: codes 2, 6,
7, 8 and 9 all come from x86-64 UEFI laptops), so the table maps by what firmware actually does,
not by the registry's wording alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pixiebox.net.paths import PathRefused, Place, candidates, stat_file

#: Debian's ipxe package. The appliance (trixie) has the 2025 build there, for x86 and arm64;
#: a bookworm host has the 2019 one (x86 only) there and trixie's unpacked by `./build.sh
#: trixie` beside it (image/trixie.txt), which `packaged_ipxe_dir` prefers.
SYSTEM_IPXE_DIR = Path("/usr/lib/ipxe")
#: Where an unpacked ipxe .deb keeps its builds (`dpkg-deb -c`: usr/lib/ipxe/ipxe-arm64.efi, ...).
PACKAGE_IPXE_DIR = "usr/lib/ipxe"


def packaged_ipxe_dir(unpacked: Path | None) -> Path:
    """The packaged iPXE builds to serve: trixie's ipxe unpacked at `unpacked` (the package
    root, `.unpacked` written last by build.sh) when it is there, else SYSTEM_IPXE_DIR.

    One directory, not both: trixie's package has every build bookworm's has and more (arm64,
    riscv64), so mixing a 2019 ipxe.efi with a 2025 arm64 one would only make boots differ by
    architecture for no reason."""
    if unpacked is not None and (unpacked / ".unpacked").is_file():
        candidate = unpacked / PACKAGE_IPXE_DIR
        if candidate.is_dir():
            return candidate
    return SYSTEM_IPXE_DIR


class Firmware(StrEnum):
    BIOS = "BIOS"
    UEFI = "UEFI"
    UEFI_HTTP = "UEFI HTTP"
    UBOOT = "U-Boot"
    #: The Raspberry Pi's boot ROM / EEPROM boot loader: not PXE, though it says so
    #: (core.raspi, docs/firmware-quirks.md#26-#28).
    RASPBERRY_PI = "Raspberry Pi"


@dataclass(frozen=True, slots=True)
class ArchInfo:
    code: int
    cpu: str  # x86_64, i386, arm64, arm32, riscv64
    firmware: Firmware
    loader: str  # the iPXE build (or U-Boot config) this client must get first
    # In every Debian ipxe package, bookworm's (2019, x86 only) too: the agent does not start
    # without it. The others are in trixie's (2025) or must be dropped into assets.
    in_debian_package: bool = True
    fallback: str | None = None  # served when `loader` is missing (see _ARCHES)

    @property
    def label(self) -> str:
        return f"{self.cpu} {self.firmware}"


ARM64_IPXE = "ipxe-arm64.efi"
RISCV64_IPXE = "ipxe-riscv64.efi"

_ARCHES: dict[int, ArchInfo] = {
    0: ArchInfo(0, "x86_64", Firmware.BIOS, "undionly.kpxe"),
    # Itanium, Xscale and EBC codes are in practice x86-64 UEFI (docs/firmware-quirks.md#12).
    2: ArchInfo(2, "x86_64", Firmware.UEFI, "ipxe.efi"),
    # Genuine 32-bit UEFI tablets exist, but so do x86-64 laptops that send 6 (quirk #12): the
    # i386 build when the user added one, the x86-64 one otherwise.
    6: ArchInfo(6, "i386", Firmware.UEFI, "ipxe-i386.efi", False, fallback="ipxe.efi"),
    7: ArchInfo(7, "x86_64", Firmware.UEFI, "ipxe.efi"),
    8: ArchInfo(8, "x86_64", Firmware.UEFI, "ipxe.efi"),
    9: ArchInfo(9, "x86_64", Firmware.UEFI, "ipxe.efi"),
    10: ArchInfo(10, "arm32", Firmware.UEFI, "snp-arm32.efi", False),
    # Debian trixie's ipxe (1.21.1+git20250501) names its arm64 and riscv64 builds
    # usr/lib/ipxe/ipxe-arm64.efi and ipxe-riscv64.efi (its ipxe.efi is a link to ipxe-amd64.efi
    # beside them); bookworm's had none. On AAVMF's virtio NIC the arm64 build drives the
    # firmware's SNP (tests/test_arm_boards.py; docs/firmware-quirks.md#37).
    11: ArchInfo(11, "arm64", Firmware.UEFI, ARM64_IPXE, False),
    15: ArchInfo(15, "i386", Firmware.UEFI_HTTP, "ipxe-i386.efi", False, fallback="ipxe.efi"),
    16: ArchInfo(16, "x86_64", Firmware.UEFI_HTTP, "ipxe.efi"),
    18: ArchInfo(18, "arm32", Firmware.UEFI_HTTP, "snp-arm32.efi", False),
    19: ArchInfo(19, "arm64", Firmware.UEFI_HTTP, ARM64_IPXE, False),
    # U-Boot (docs/firmware-quirks.md#30: Debian's u-boot-qemu sends 21 on armv7, 22 on armv8) reads
    # pxelinux.cfg/01-<mac> relative to the boot file's directory, so the file name only anchors it.
    21: ArchInfo(21, "arm32", Firmware.UBOOT, "pxelinux.0", False),
    22: ArchInfo(22, "arm64", Firmware.UBOOT, "pxelinux.0", False),
    # IANA 0x1b, 0x1c: RISC-V 64-bit UEFI, and its HTTP boot.
    27: ArchInfo(27, "riscv64", Firmware.UEFI, RISCV64_IPXE, False),
    28: ArchInfo(28, "riscv64", Firmware.UEFI_HTTP, RISCV64_IPXE, False),
}

#: PXE clients that omit option 93 are old BIOS ROMs (RFC 4578 made it mandatory later).
DEFAULT_ARCH = _ARCHES[0]

#: The signed chain (issue 16, docs/firmware-quirks.md#33), in [boot] assets under `signed/`:
#: Debian's shim (shim-signed's shimx64.efi.signed, signed by Microsoft's UEFI CA) is the boot
#: file; it fetches `grubx64.efi` by TFTP from the directory of the boot file DHCP named
#: (rhboot/shim netboot.c parseDhcp4, DEFAULT_LOADER "\\grubx64.efi"), which must be Debian's
#: signed network GRUB (grub-efi-amd64-signed's grubnetx64.efi.signed, renamed).
SIGNED_DIR = "signed"
SHIM = f"{SIGNED_DIR}/shimx64.efi"
SIGNED_GRUB = f"{SIGNED_DIR}/grubx64.efi"


def signed_chain_fits(arch: ArchInfo) -> bool:
    """Whether `arch` can take the signed chain: x86-64 UEFI fetching its boot file by TFTP
    (Debian's shim and GRUB are x86-64 builds; UEFI HTTP boot is not done this way yet)."""
    return arch.cpu == "x86_64" and arch.firmware is Firmware.UEFI


def arch_info(code: int | None) -> ArchInfo | None:
    """What we know about an option-93 code; None for architectures we cannot boot."""
    if code is None:
        return DEFAULT_ARCH
    return _ARCHES.get(code)


def known_arches() -> list[ArchInfo]:
    return list(_ARCHES.values())


def describe_arch(code: int | None) -> str:
    info = arch_info(code)
    return info.label if info else f"unsupported architecture {code}"


@dataclass(frozen=True, slots=True)
class Assets:
    """Where boot files are found: the lab's asset directory first, then Debian's ipxe package.

    The one boot-file resolver: TFTP looks a requested name up in `places` (tftp.files) and
    boot HTTP's /ipxe/ and DHCP's "is this loader here?" ask `ipxe_binary`, which looks in the
    same places the same way, so a loader DHCP hands out is one TFTP and HTTP can send."""

    root: Path
    system_ipxe: Path = SYSTEM_IPXE_DIR

    @property
    def places(self) -> tuple[Place, ...]:
        """The assets root; then its ipxe/ directory and Debian's ipxe package, where
        `ipxe/NAME` and `NAME` both find NAME. Only the package directory follows links out of
        itself (net.paths: Debian's ipxe.efi is a link to /boot/ipxe.efi)."""
        return (
            Place(self.root),
            Place(self.root / "ipxe", "ipxe/"),
            Place(self.system_ipxe, "ipxe/", packaged=True),
        )

    @property
    def fallback_places(self) -> tuple[Place, ...]:
        """`places` after the root: what TftpServer's `fallback_dirs` takes."""
        return self.places[1:]

    def ipxe_binary(self, name: str) -> Path | None:
        """The real path of the iPXE build `name`, found as TFTP finds `ipxe/NAME`; None when
        no place has it, or the first that has it may not serve it (a link leading out)."""
        for place, relative in candidates(self.places, f"ipxe/{name}"):
            try:
                real, found = stat_file(place.directory, relative, packaged=place.packaged)
            except PathRefused:
                return None
            if found is not None:
                return real
        return None

    def signed_binary(self, name: str) -> Path | None:
        """The real path of `name` (SHIM, SIGNED_GRUB) under the assets root, as TFTP finds
        it; None when it is not there or may not be served (a link leading out)."""
        try:
            real, found = stat_file(self.root, name)
        except PathRefused:
            return None
        return real if found is not None else None

    def loader_file(self, name: str) -> Path | None:
        """A first-stage loader DHCP may hand out: a signed-chain file or an iPXE build."""
        if name.startswith(SIGNED_DIR + "/"):
            return self.signed_binary(name)
        return self.ipxe_binary(name)

    def missing_signed_hint(self) -> str:
        return (
            f"copy Debian trixie's shimx64.efi.signed (package shim-signed) to "
            f"{self.root / SHIM} and grubnetx64.efi.signed (grub-efi-amd64-signed) to "
            f"{self.root / SIGNED_GRUB}, or set secure_boot = false for it"
        )

    def missing_loader_hint(self, info: ArchInfo) -> str:
        where = self.root / "ipxe" / info.loader
        if info.in_debian_package:
            return f"install Debian's ipxe package or copy {info.loader} to {where}"
        if info.loader in (ARM64_IPXE, RISCV64_IPXE):
            return (
                f"install Debian trixie's ipxe package (on a bookworm host: sudo ./build.sh "
                f"trixie) or copy an {info.cpu} iPXE build to {where}"
            )
        return f"add an {info.cpu} iPXE build as {where} (Debian's ipxe package has none)"
