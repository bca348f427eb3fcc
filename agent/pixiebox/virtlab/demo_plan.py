"""The demo's lab on paper: which machines `pixiebox demo` starts, the lab.toml it writes for
them, and what this host must have before any of it starts.

The machines are x86 BIOS and UEFI ones alternately, and with --arm64 one arm64 UEFI machine
beside them (issue 15: a mixed lab). The arm64 one needs no lab.toml entry of its own beyond
its MAC: its firmware reports arm64 (DHCP option 93 = 11), so the agent hands it trixie's arm64
iPXE and boots the image's `[images.osie.arch.arm64]` build, as it would any arm64 server.
Kept apart from demo.py (which runs the lab) so the plan can be checked without root or VMs.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pixiebox.core.firmware import ARM64_IPXE, SHIM, SIGNED_GRUB, packaged_ipxe_dir
from pixiebox.core.trixie import trixie_file, trixie_root
from pixiebox.virtlab import arm, vm

SUBNET = "10.88.0.0/24"
ROUTER_IP = "10.88.0.1"
AGENT_IP = "10.88.0.2"
ROUTER_RANGE = ("10.88.0.100", "10.88.0.199")
DEMO_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPixieboxDemoKeyReplaceMe demo@pixiebox"
#: The signed chain's files (docs/firmware-quirks.md#33): where `./build.sh trixie` unpacked them
#: (package, path in it), by their name under [boot] assets.
SIGNED_CHAIN = {
    SHIM: ("shim-signed", "usr/lib/shim/shimx64.efi.signed"),
    SIGNED_GRUB: ("grub-efi-amd64-signed", "usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"),
}
#: Where the demo's assets keep each architecture's OS (the x86 one has been `testos/` since the
#: demo began, whichever OS it is: the test OS or the OSIE).
OS_ASSETS = {"x86-64": "testos", "arm64": "testos-arm64"}
#: The arm64 machine's serial console is the virt board's PL011, not a 16550.
ARM64_CMDLINE = "console=ttyAMA0,115200"
#: The arm64 OS when --arm64-os is not given: the OSIE once `./build.sh osie --arch arm64` built
#: it, else the small test OS (scripts/build-testos.sh --arch arm64).
ARM64_OSIE = Path("out/osie-arm64")
ARM64_TESTOS = Path("out/testos-arm64")
#: The arm64 MACs start here, past the ten x86 machines --machines allows (…:01 to …:0a), so a
#: machine keeps its MAC whatever the count beside it.
ARM64_MAC_BASE = 0x40

Arch = Literal["x86-64", "arm64"]


class DemoError(Exception):
    """The demo cannot run here; the message says why and what to do."""


@dataclass
class Machine:
    name: str
    mac: str
    firmware: vm.Firmware
    pxe: vm.Pxe
    vm: vm.VM | None = None
    #: Secure Boot enforcing (UEFI only): the VM runs trixie's Secure Boot OVMF, and lab.toml
    #: sends it shim → signed GRUB instead of iPXE, which that firmware would refuse.
    secure_boot: bool = False
    #: lab.toml's architecture name (config.schema ArchName) of the machine's CPU.
    arch: Arch = "x86-64"
    stage: str = "off"
    seconds: dict[str, float] = field(default_factory=dict)
    address: str = ""

    @property
    def label(self) -> str:
        if self.arch != "x86-64":
            how = f"{self.arch} UEFI, native PXE"
        elif self.pxe == "native":
            how = "UEFI, native PXE"
        else:
            how = f"{self.firmware.upper()}, iPXE ROM"
        return f"{self.name} ({how}{', Secure Boot' if self.secure_boot else ''})"


def plan(count: int, *, arm64: bool = False) -> list[Machine]:
    """BIOS and UEFI machines alternately; UEFI ones use the firmware's own PXE client, so the
    demo shows both chains: iPXE ROM → script, and UEFI PXE → TFTP ipxe.efi → script. With
    `arm64`, an arm64 UEFI machine after them (AAVMF's PXE → TFTP ipxe-arm64.efi → script)."""
    machines = []
    for index in range(1, count + 1):
        bios = index % 2 == 1
        machines.append(Machine(
            name=f"node{index}", mac=f"52:54:00:88:00:{index:02x}",
            firmware="bios" if bios else "uefi", pxe="ipxe-rom" if bios else "native",
        ))  # fmt: skip
    if arm64:
        machines.append(Machine(
            name="arm1", mac=f"52:54:00:88:00:{ARM64_MAC_BASE + 1:02x}", firmware="uefi",
            pxe="native", arch="arm64",
        ))  # fmt: skip
    return machines


def label_width(machines: list[Machine]) -> int:
    """The machine column's width in the live table and the summary."""
    return max([28, *(len(m.label) for m in machines)])


def user_keys() -> list[str]:
    """The invoking user's SSH public keys (so the demo's machines would let them in), or a
    placeholder."""
    home = Path((os.environ.get("SUDO_USER") and f"~{os.environ['SUDO_USER']}") or "~").expanduser()
    keys = []
    for path in sorted((home / ".ssh").glob("*.pub")):
        try:
            line = path.read_text().strip()
        except OSError:
            continue
        if line.startswith(("ssh-", "ecdsa-")):
            keys.append(line)
    return keys or [DEMO_KEY]


def qmp_socket(workdir: Path, machine: Machine) -> Path:
    """Where vm.start_vm (and arm.start_arm64_vm) puts the VM's QMP socket (the demo's short
    workdir keeps it within a socket path's length); lab.toml names it before the VMs start."""
    return workdir.absolute() / f"{machine.name}.qmp"


def signed_chain_sources() -> dict[str, Path]:
    """The signed chain's unpacked files by their name under [boot] assets; FileNotFoundError
    (one sentence: run sudo ./build.sh trixie) when they are not unpacked."""
    return {name: trixie_file(*where) for name, where in SIGNED_CHAIN.items()}


def default_arm64_os() -> Path:
    return ARM64_OSIE if (ARM64_OSIE / "initrd").is_file() else ARM64_TESTOS


def memory_for(os_dir: Path, arch: Arch = "x86-64") -> int:
    """RAM for a VM booting this OS: the OSIE lives in RAM (its initrd unpacked, under an
    overlay whose writes go to a tmpfs), the busybox test OS needs little. The arm64 OSIE was
    seen `up` under AAVMF with 2048 MB (session 22); its kernel is an uncompressed Image (37 MB
    against x86's 12 MB bzImage), which iPXE holds in RAM beside the initrd while it boots."""
    initrd_mb = (os_dir / "initrd").stat().st_size / 2**20
    if initrd_mb < 20:
        return 512
    return 2048 if arch == "arm64" else 1536


def _install(source: Path, assets: Path, arch: Arch) -> None:
    target = assets / OS_ASSETS[arch]
    target.mkdir(parents=True)
    for name in ("vmlinuz", "initrd"):
        shutil.copyfile(source / name, target / name)


def lab_toml(
    workdir: Path, testos: Path, machines: list[Machine], keys: list[str],
    arm64_os: Path | None = None,
) -> str:  # fmt: skip
    """lab.toml for `machines`, with their OS copied under workdir/assets: `testos` for the
    x86 ones and, when one of them is arm64, `arm64_os` as the image's arm64 build."""
    assets = workdir / "assets"
    _install(testos, assets, "x86-64")
    arm64_image = ""
    if any(m.arch == "arm64" for m in machines):
        if arm64_os is None:
            raise ValueError("an arm64 machine needs arm64_os")
        _install(arm64_os, assets, "arm64")
        arm64_image = (
            "\n[images.osie.arch.arm64]\n# The arm64 machine's build: its firmware reports arm64"
            f' (DHCP option 93 = 11).\nkernel = "{OS_ASSETS["arm64"]}/vmlinuz"\n'
            f'initrd = ["{OS_ASSETS["arm64"]}/initrd"]\ncmdline = "{ARM64_CMDLINE}"\n'
        )
    if any(m.secure_boot for m in machines):
        for name, source in signed_chain_sources().items():
            (assets / name).parent.mkdir(exist_ok=True)
            shutil.copyfile(source, assets / name)
    # on: Wake-on-LAN (answered by the wake responder); off (and on, should WoL fail): QMP.
    blocks = "".join(
        f'\n[[machines]]\nname = "{m.name}"\nmac = "{m.mac}"\npower = [{{ driver = "wol" }}, '
        f'{{ driver = "qemu", qmp = "{qmp_socket(workdir, m)}" }}]\n'
        + ("secure_boot = true\n" if m.secure_boot else "")
        for m in machines
    )
    quoted = ", ".join(f'"{key}"' for key in keys)
    return f"""# The virtual lab's lab.toml, written by `pixiebox demo`.
[lab]
name = "demo"
domain = "demo.internal"

[network]
interface = "eth0"
subnet = "{SUBNET}"
gateway = "{ROUTER_IP}"
dhcp_mode = "proxy"

[boot]
unknown = "discover"
assets = "{assets}"
ssh_keys = [{quoted}]

[images.osie]
# The demo's test OS until the real OSIE image is built.
kernel = "{OS_ASSETS["x86-64"]}/vmlinuz"
initrd = ["{OS_ASSETS["x86-64"]}/initrd"]
cmdline = "console=ttyS0"
{arm64_image}
[http]
listen = ":80"

[api]
token_file = "{workdir / "api-token"}"

[state]
dir = "{workdir / "state"}"

[power]
stagger = "2s"
off_timeout = "60s"
{blocks}"""


def arm64_problem(os_dir: Path, ipxe_dir: Path | None = None) -> str | None:
    """Why the arm64 machine cannot boot here (None if it can), with the command that fixes it.

    Its firmware (AAVMF) is served trixie's arm64 iPXE from the packaged iPXE directory the
    agent uses (core.firmware.packaged_ipxe_dir, `ipxe_dir` by default): bookworm's ipxe
    package has x86 builds only, so without `./build.sh trixie` the agent would not answer it
    at all."""
    if ipxe_dir is None:
        ipxe_dir = packaged_ipxe_dir(trixie_root("ipxe"))
    ipxe = ipxe_dir / ARM64_IPXE
    if not ipxe.is_file():
        return (
            f"no {ipxe}: the arm64 machine's firmware boots Debian trixie's arm64 iPXE; fetch it "
            "with sudo ./build.sh trixie (sudo ./build.sh demo --arm64 does)"
        )
    for name in ("vmlinuz", "initrd"):
        if not (os_dir / name).is_file():
            return (
                f"no {os_dir / name}: build the arm64 OSIE with sudo ./build.sh osie --arch "
                f"arm64, or the arm64 test OS with scripts/build-testos.sh --arch arm64 {os_dir} "
                "(sudo ./build.sh demo --arm64 does one of them)"
            )
    problem = arm.prerequisite_problem()
    return f"the arm64 machine: {problem}" if problem else None


__all__ = [
    "AGENT_IP",
    "ARM64_CMDLINE",
    "ARM64_TESTOS",
    "DEMO_KEY",
    "OS_ASSETS",
    "ROUTER_IP",
    "ROUTER_RANGE",
    "SUBNET",
    "DemoError",
    "Machine",
    "arm64_problem",
    "default_arm64_os",
    "lab_toml",
    "label_width",
    "memory_for",
    "plan",
    "qmp_socket",
    "signed_chain_sources",
    "user_keys",
]
