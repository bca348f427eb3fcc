"""The one boot decision: what a machine that asks to boot gets, or why it gets nothing.

Like pixiecore's `Booter.BootSpec`, one function resolves everything (the machine, its image's
kernel, initrds and command line for the architecture its firmware reports, the first-stage
loader its firmware needs) and every protocol only renders the answer: DHCP in each mode,
pxelinux.cfg over TFTP and HTTP, the iPXE script, GRUB's configuration, metadata and the API.
`decide` has no side effects (no store, no log, no event) so it can be asked as often as a
protocol likes and tested with plain data; recording that a machine showed up is
`Inventory.seen`.

Imports `pixiebox.config` (the schema) and `core.firmware`; nothing else of pixiebox.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address

from pixiebox.config import (
    ARCH_NAMES,
    ArchName,
    ImageSection,
    LabConfig,
    MachineSection,
    UnknownPolicy,
)
from pixiebox.core import wording
from pixiebox.core.firmware import SHIM, SIGNED_GRUB, ArchInfo, Firmware, signed_chain_fits

#: The [images.NAME.arch.<name>] table a machine boots, by the CPU its firmware reports
#: (ArchInfo.cpu). i386 is x86-64: code 6 comes from x86-64 laptops far more often than from
#: 32-bit UEFI tablets (docs/firmware-quirks.md#12), and mkosi builds no i386 image.
ARCH_OF_CPU: Mapping[str, ArchName] = {
    "x86_64": "x86-64",
    "i386": "x86-64",
    "arm64": "arm64",
    "arm32": "armhf",
    "riscv64": "riscv64",
}

#: The CPU DHCP recorded for a MAC from option 93 (ArchInfo.cpu; None: nothing recorded), for a
#: request that does not say it (an iPXE script fetch, a pxelinux.cfg): core.inventory's store.
RecordedCpu = Callable[[str], str | None]


def arch_build(image: ImageSection, arch: ArchName | None) -> ImageSection:
    """`image` as a machine of `arch` boots it: its [images.NAME.arch.<arch>] table over the
    base (its own kernel, initrds and device trees; the base's command line unless it has one),
    or the base itself. The result has no arch tables: renderers only render it."""
    build = image.arch.get(arch) if arch is not None else None
    if build is None:
        return image.model_copy(update={"arch": {}}) if image.arch else image
    return ImageSection(
        kernel=build.kernel,
        initrd=list(build.initrd),
        cmdline=image.cmdline if build.cmdline is None else build.cmdline,
        fdtdir=build.fdtdir,
        fdt=build.fdt,
    )


@dataclass(frozen=True, slots=True)
class LabView:
    """One lab.toml as decisions read it: the config and its indexes, built together and swapped
    in one assignment, so no reader ever sees a new config with an old MAC index."""

    config: LabConfig
    by_mac: Mapping[str, MachineSection] = field(default_factory=dict)
    #: Reserved address → MAC (lab.toml `ip`).
    by_ip: Mapping[IPv4Address, str] = field(default_factory=dict)
    #: (image, architecture or None for the base) → what a machine of it boots (arch_build),
    #: made once per lab.toml rather than once per DHCP packet.
    builds: Mapping[tuple[str, ArchName | None], ImageSection] = field(default_factory=dict)

    @classmethod
    def of(cls, config: LabConfig) -> LabView:
        return cls(
            config,
            {machine.mac: machine for machine in config.machines},
            {m.ip: m.mac for m in config.machines if m.ip is not None},
            {
                (name, arch): arch_build(image, arch)
                for name, image in config.images.items()
                for arch in (None, *image.arch)
            },
        )

    def build(self, image: str, arch: ArchName | None) -> ImageSection | None:
        """[images.`image`] as a machine of `arch` boots it (None: the base); None when lab.toml
        has no such image."""
        section = self.config.images.get(image)
        if section is None or not section.arch:
            return section
        if arch not in section.arch:
            arch = None
        return self.builds.get((image, arch)) or arch_build(section, arch)


class Silence(StrEnum):
    """Why a machine gets no boot answer; the value is what events' `reason` fields say."""

    #: Not in lab.toml and [boot] unknown = "ignore": no protocol answers it.
    UNKNOWN_IGNORED = "unknown-ignored"
    #: The first-stage loader its firmware needs is not on this appliance: DHCP stays silent so
    #: the firmware moves on to its next boot device instead of failing a download.
    NO_LOADER = "no-loader"
    #: lab.toml names an image that has no [images.NAME] section: nothing to boot. DHCP still
    #: hands out the loader, because the iPXE script then says why on the machine's console,
    #: where a person looks; a silent DHCP server would look like a network problem.
    NO_IMAGE = "no-image"


class Chain(StrEnum):
    """Which boot chain the machine's firmware is handed; the value is what fields say."""

    #: iPXE (undionly.kpxe, ipxe.efi, ...) and then its script: every firmware, no Secure Boot.
    IPXE = "ipxe"
    #: shim (signed by Microsoft's UEFI CA), then Debian's signed GRUB and its per-machine
    #: grub.cfg (boot.grub_cfg): x86-64 UEFI with Secure Boot on (issue 16,
    #: docs/firmware-quirks.md#33).
    SIGNED = "signed"


@dataclass(frozen=True, slots=True)
class BootImage:
    """A resolved [images.NAME]: what the machine fetches after its loader. `section` is the
    build for the machine's architecture (its [images.NAME.arch.<arch>] table merged over the
    base) so that every renderer boots the right kernel without knowing about builds."""

    name: str
    section: ImageSection
    #: The architecture whose build `section` is; None: the base image.
    arch: ArchName | None = None

    @property
    def kernel(self) -> str:
        return self.section.kernel

    @property
    def initrd(self) -> tuple[str, ...]:
        return tuple(self.section.initrd)

    @property
    def cmdline(self) -> str:
        return self.section.cmdline


@dataclass(frozen=True, slots=True)
class Loader:
    """The first-stage loader for the asking firmware (core.firmware's table)."""

    #: The file to hand out: the firmware's own loader, or its fallback when that is missing.
    file: str
    #: The firmware's own loader (`file` differs when the fallback is used).
    wanted: str

    @property
    def fallback(self) -> bool:
        return self.file != self.wanted


@dataclass(frozen=True, slots=True)
class BootDecision:
    """The answer for one machine: boot `image` (through `loader`), or stay silent and why."""

    mac: str | None  # None: asked without saying who (pxelinux.cfg/default from an unknown board)
    machine: MachineSection | None  # None: not in lab.toml
    arch: ArchInfo | None  # None: the asking protocol cannot tell (an iPXE script fetch)
    policy: UnknownPolicy  # [boot] unknown when decided (what an unknown machine follows)
    #: The image lab.toml says it boots (its own, else [boot] image); None when ignored.
    image_name: str | None
    #: That image resolved; None when ignored or when lab.toml has no [images.<image_name>].
    image: BootImage | None
    #: The loader its firmware needs; None when not asked for (no arch, or a client already
    #: running iPXE) or when missing.
    loader: Loader | None
    #: Why it gets nothing; None when it boots. The first of: unknown-ignored, no-loader,
    #: no-image.
    silent: Silence | None
    #: The chain its firmware gets: SIGNED when lab.toml asks for Secure Boot (the machine's
    #: `secure_boot`, else [boot] secure_boot) and its firmware can take it, else IPXE.
    chain: Chain = Chain.IPXE

    @property
    def boots(self) -> bool:
        return self.silent is None

    @property
    def known(self) -> bool:
        return self.machine is not None

    @property
    def name(self) -> str | None:
        return self.machine.name if self.machine is not None else None

    @property
    def who(self) -> str:
        """How log lines name the machine: "c1 (mac)" when enrolled, else "unknown machine mac"."""
        return wording.machine(self.mac or "(MAC not known)", self.name)


#: Whether a loader file is on this appliance (firmware.Assets.ipxe_binary, as a yes or no).
LoaderCheck = Callable[[str], bool]


def decide(
    lab: LabView,
    mac: str | None,
    arch: ArchInfo | None,
    *,
    loaders: LoaderCheck | None = None,
    recorded: RecordedCpu | None = None,
) -> BootDecision:
    """What `mac` (firmware `arch`) boots, or why it gets nothing. Pass `loaders` when the asker
    needs a first-stage loader (a DHCP answer to firmware, not to iPXE): the decision then
    carries the loader, and is silent (no-loader) when neither it nor its fallback is here.

    The image is the build for the firmware's architecture; when the asker cannot tell it
    (`arch` None), for the CPU `recorded` says DHCP saw for `mac`, else the base image."""
    config = lab.config
    machine = lab.by_mac.get(mac) if mac is not None else None
    policy = config.boot.unknown
    if machine is None and policy == "ignore":
        return BootDecision(mac, None, arch, policy, None, None, None, Silence.UNKNOWN_IGNORED)
    chain = boot_chain(lab, machine, arch)
    image_name = machine.image if machine is not None and machine.image else config.boot.image
    build = image_arch(lab, image_name, mac, arch, recorded)
    section = lab.build(image_name, build)
    image = BootImage(image_name, section, build) if section is not None else None
    loader = None
    silent = None if image is not None else Silence.NO_IMAGE
    if arch is not None and loaders is not None:
        loader = first_stage_loader(arch, loaders, chain)
        if loader is None:
            silent = Silence.NO_LOADER
    return BootDecision(mac, machine, arch, policy, image_name, image, loader, silent, chain)


def image_arch(
    lab: LabView,
    image_name: str,
    mac: str | None,
    arch: ArchInfo | None,
    recorded: RecordedCpu | None,
) -> ArchName | None:
    """Which build of [images.`image_name`] the machine boots: the table for its firmware's
    architecture, None (the base) when the image has none for it. The record is read only when
    the image has builds at all, which most labs' images do not (a script fetch stays one
    dictionary lookup)."""
    section = lab.config.images.get(image_name)
    if section is None or not section.arch:
        return None
    cpu = arch.cpu if arch is not None else None
    if cpu is None and mac is not None and recorded is not None:
        cpu = recorded(mac)
    name = ARCH_OF_CPU.get(cpu) if cpu else None
    return name if name is not None and name in section.arch else None


def boot_chain(lab: LabView, machine: MachineSection | None, arch: ArchInfo | None) -> Chain:
    """SIGNED when Secure Boot is asked for this machine (its own `secure_boot`, else [boot]
    secure_boot, which unknown machines follow) and `arch` is firmware the signed chain fits
    (x86-64 UEFI over TFTP); IPXE otherwise, and when the asker cannot tell the firmware
    (`arch` None: an iPXE script fetch, which only iPXE makes). A BIOS or arm64 machine in a
    lab with [boot] secure_boot keeps iPXE: there is no Secure Boot to pass."""
    wanted = lab.config.boot.secure_boot
    if machine is not None and machine.secure_boot is not None:
        wanted = machine.secure_boot
    if wanted and arch is not None and signed_chain_fits(arch):
        return Chain.SIGNED
    return Chain.IPXE


def secure_boot_summary(config: LabConfig) -> str:
    """What `pixiebox check` says about [boot] secure_boot and the machines' `secure_boot`."""
    on = [m.name for m in config.machines if m.secure_boot is True]
    off = [m.name for m in config.machines if m.secure_boot is False]
    signed = "the signed chain (shim, then GRUB; no firmware visit to turn Secure Boot off)"
    if config.boot.secure_boot:
        text = f"Secure Boot: every x86-64 UEFI machine, unknown ones included, gets {signed}"
        if off:
            text += f"; iPXE for {', '.join(off)} (secure_boot = false)"
    else:
        text = "Secure Boot: machines get iPXE ([boot] secure_boot = false)"
        if on:
            text += f"; {signed} for {', '.join(on)} (secure_boot = true) on x86-64 UEFI"
    if config.boot.secure_boot or on:
        where = config.boot.assets
        text += f"; needs {where / SHIM} and {where / SIGNED_GRUB}; BIOS and ARM keep iPXE"
    return text


def images_summary(config: LabConfig) -> list[str]:
    """What `pixiebox check` says each image boots on which architecture, one line an image."""

    def files(section: ImageSection) -> str:
        tree = f" (fdtdir {section.fdtdir})" if section.fdtdir else ""
        return section.kernel + (f" (fdt {section.fdt})" if section.fdt else tree)

    lines = []
    for name, image in sorted(config.images.items()):
        builds = [
            f"{arch} → {files(arch_build(image, arch))}"
            for arch in ARCH_NAMES
            if arch in image.arch
        ]
        others = [arch for arch in ARCH_NAMES if arch not in image.arch]
        if not builds:
            lines.append(f"image {name}: every architecture → {files(image)}")
        else:
            rest = f"every other architecture ({', '.join(others)})" if others else "others"
            lines.append(f"image {name}: {'; '.join(builds)}; {rest} → {files(image)}")
    return lines


def first_stage_loader(
    arch: ArchInfo, loaders: LoaderCheck, chain: Chain = Chain.IPXE
) -> Loader | None:
    """The loader for `arch` that is on this appliance, or None.

    The signed chain needs shim and the GRUB it loads both here (GRUB is fetched by shim,
    never named by DHCP, so it is checked now), and never falls back to iPXE: firmware with
    Secure Boot on refuses iPXE (docs/firmware-quirks.md#33), so a machine is better left to
    its next boot device, with a log line naming the files to add.

    U-Boot gets `pxelinux.0` as a name only: it reads pxelinux.cfg relative to that file's
    directory and never fetches the file (docs/firmware-quirks.md#30). Code 6 (and 15) is sent
    by genuine 32-bit UEFI and by x86-64 laptops alike (#12): the i386 build when the user added
    one, the x86-64 one otherwise."""
    if chain is Chain.SIGNED:
        return Loader(SHIM, SHIM) if loaders(SHIM) and loaders(SIGNED_GRUB) else None
    if arch.firmware is Firmware.UBOOT or loaders(arch.loader):
        return Loader(arch.loader, arch.loader)
    if arch.fallback is not None and loaders(arch.fallback):
        return Loader(arch.fallback, arch.loader)
    return None
