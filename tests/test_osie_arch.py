"""`build.sh osie --arch x86-64|arm64|armhf`: one image/osie configuration, three architectures.

What can be checked without building: the configuration mkosi resolves for each architecture
(`mkosi --architecture A --json summary`: the kernel package of mkosi.conf.d/ and the platform's
module patterns, nothing of another architecture's), and what build.sh says about a wrong --arch.
What a finished build holds is checked when it is there (out/osie-arm64/, out/osie-armhf/; they
are built by `build.sh test`, for the appliance, which carries them; tests/osiebuilds.py): the
programs in the initrd are that architecture's ELF files, the kernel is that architecture's boot
image, the initrd is under 120 MB, and armhf carries the Jetson TK1's device tree beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from osiebuilds import built
from trixiefiles import on_ci

REPO = Path(__file__).resolve().parent.parent
OSIE = REPO / "image" / "osie"

# mkosi's architecture names for build.sh's, and what each build must (not) carry.
MKOSI = {"x86-64": "x86-64", "arm64": "arm64", "armhf": "arm"}
KERNEL_PACKAGE = {"x86-64": "linux-image-amd64", "arm64": "linux-image-arm64",
                  "armhf": "linux-image-armmp-lpae"}  # fmt: skip
ARCH_MODULES = {"x86-64": "/kernel/arch/x86/", "arm64": "/kernel/arch/arm64/",
                "armhf": "/kernel/arch/arm/"}  # fmt: skip
# ELF e_machine of /usr/lib/systemd/systemd in each initrd.
ELF_MACHINE = {"x86-64": 62, "arm64": 183, "armhf": 40}
INITRD_LIMIT = 120 * 1024 * 1024


def summary(arch: str) -> dict[str, Any]:
    if shutil.which("mkosi") is None:
        message = "mkosi is not installed (sudo ./build.sh osie installs it)"
        if on_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    result = subprocess.run(
        ["mkosi", "--architecture", MKOSI[arch], "--json", "summary"],
        cwd=OSIE, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    image: dict[str, Any] = json.loads(result.stdout)["Images"][0]
    return image


@pytest.mark.parametrize("arch", ["x86-64", "arm64", "armhf"])
def test_each_architecture_resolves_to_its_own_kernel_and_modules(arch: str) -> None:
    image = summary(arch)
    assert image["Architecture"] == MKOSI[arch]
    kernels = [p for p in image["Packages"] if p.startswith("linux-image-")]
    assert kernels == [KERNEL_PACKAGE[arch]]
    modules = image["KernelModulesInclude"]
    assert ARCH_MODULES[arch] in modules
    others = {pattern for other, pattern in ARCH_MODULES.items() if other != arch}
    assert not others & set(modules), modules
    # The shared part (NICs, virtio, storage, netfilter for k3s) is in every architecture.
    assert "/kernel/drivers/virtio/" in modules and "/kernel/net/" in modules
    # The same OS on every architecture: the same packages apart from the kernel.
    assert {"systemd", "openssh-server", "curl", "jq", "udev"} <= set(image["Packages"])
    # An ARM board's NIC sits behind PCIe/PHY/clock drivers that are modules there (the TK1's
    # RTL8111 on Tegra's PCIe): only the ARM builds carry them.
    assert ("/kernel/drivers/pci/" in modules) == (arch != "x86-64")


def build_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["./build.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("args", [["--arch", "sparc"], ["--arch=amd64"], ["--arch", "x86-64 mips"]])
def test_an_unknown_arch_is_one_line_naming_the_allowed_ones(args: list[str]) -> None:
    result = build_sh("osie", *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    wrong = args[-1].removeprefix("--arch=").split()[-1]
    assert lines[0] == (
        f"build.sh: error: unknown architecture '{wrong}' for --arch: use x86-64, arm64, armhf, "
        "all (the three) or lab (those config/lab.toml's images use)"
    )


def test_arch_is_refused_for_the_appliance_and_needs_a_value() -> None:
    result = build_sh("appliance", "--arch", "arm64")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "build.sh: error: --arch is for ./build.sh osie (the appliance builds and carries every "
        "architecture's)"
    )
    result = build_sh("osie", "--arch")
    assert result.returncode == 1
    assert "--arch needs a value: x86-64, arm64, armhf, all or lab" in result.stderr


def test_arch_lab_builds_what_the_labs_images_boot_from_osie_directories(tmp_path: Path) -> None:
    """`--arch lab`: build.sh's own lab_osie_arches on a lab.toml (no build)."""
    config = tmp_path / "lab.toml"
    config.write_text(
        '[images.osie]\nkernel = "osie/vmlinuz"\n'
        '[images.osie.arch.armhf]\nkernel = "osie-armhf/vmlinuz"\nfdtdir = "osie-armhf/dtbs"\n'
        '[images.osie.arch.arm64]\nkernel = "osie-arm64/vmlinuz"\n'
        # Another image's variant boots its own kernel: no OSIE build for it.
        '[images.testos.arch.riscv64]\nkernel = "testos-riscv64/vmlinuz"\n'
    )
    script = (
        'set -euo pipefail; die() { echo "die: $*" >&2; exit 1; }\n'
        'eval "$(sed -n \'/^lab_osie_arches() {/,/^}/p\' "$BUILD_SH")"\nlab_osie_arches\n'
    )
    env = {**os.environ, "BUILD_SH": str(REPO / "build.sh"), "PIXIEBOX_CONFIG": str(config)}
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["x86-64", "arm64", "armhf"]


# build.sh's foreign-architecture check, run as build.sh defines it, in a user namespace with
# a binfmt_misc instance of its own (Linux >= 6.7 gives each user namespace one): the host's
# registrations are not touched, and this machine's own handlers cannot make the test pass.
FOREIGN_CHECK = r"""
set -euo pipefail
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }
eval "$(sed -n '/^osie_arch() {/,/^}/p;/^foreign_ready() {/,/^}/p' "$BUILD_SH")"
mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || exit 77
if [ -n "$HIDE" ]; then mount -t tmpfs tmpfs /usr/lib/binfmt.d; fi
foreign_ready "$ARCH"
echo "ran $ARCH"
"""


def foreign_check(arch: str, hide_handlers: bool) -> subprocess.CompletedProcess[str]:
    if shutil.which("unshare") is None or shutil.which("qemu-aarch64-static") is None:
        pytest.skip("needs unshare and qemu-user-static (sudo ./build.sh osie installs it)")
    env = {**os.environ, "BUILD_SH": str(REPO / "build.sh"), "ARCH": arch,
           "HIDE": "1" if hide_handlers else ""}  # fmt: skip
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", FOREIGN_CHECK],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if result.returncode == 77 or "unshare: " in result.stderr:
        pytest.skip(f"no binfmt_misc of a user namespace's own here: {result.stderr.strip()}")
    return result


@pytest.mark.parametrize("arch", ["arm64", "armhf"])
def test_build_sh_registers_qemu_user_static_and_runs_a_foreign_binary(arch: str) -> None:
    result = foreign_check(arch, hide_handlers=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ran {arch}"


def test_a_host_that_cannot_run_foreign_binaries_is_one_line_saying_what_to_install() -> None:
    result = foreign_check("armhf", hide_handlers=True)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "build.sh: error: this host cannot run armhf binaries (no qemu-arm handler with flag F "
        "in /proc/sys/fs/binfmt_misc): install qemu-user-static (apt-get install "
        "qemu-user-static) and mount binfmt_misc (mount -t binfmt_misc binfmt_misc "
        "/proc/sys/fs/binfmt_misc), or build on an armhf machine"
    )


# --------------------------------------------------------------------------- finished builds


def elf_machine(initrd: Path, member: str) -> int:
    """e_machine of `member` in the zstd cpio `initrd` (its first 20 bytes are enough)."""
    script = f"zstd -dc {initrd} | cpio -i --quiet --to-stdout '{member}' | head -c 20"
    head = subprocess.run(["sh", "-c", script], capture_output=True, timeout=300).stdout
    assert head[:4] == b"\x7fELF", f"{member} is not an ELF file in {initrd}"
    machine: int = struct.unpack_from("<H", head, 18)[0]
    return machine


@pytest.mark.parametrize("arch", ["x86-64", "arm64", "armhf"])
def test_a_built_osie_is_of_its_architecture_and_under_120_mb(arch: str) -> None:
    directory = built(arch)
    initrd = directory / "osie.cpio.zst"
    assert initrd.stat().st_size < INITRD_LIMIT, f"{initrd}: {initrd.stat().st_size} bytes"
    assert (directory / "initrd").resolve() == initrd.resolve()
    assert elf_machine(initrd, "usr/lib/systemd/systemd") == ELF_MACHINE[arch]
    kernel = (directory / "vmlinuz").read_bytes()
    if arch == "arm64":
        # Debian's arm64 kernel: an EFI-stub Image ("ARM\x64" at 0x38, Documentation/arch/
        # arm64/booting.rst), what U-Boot's booti and UEFI firmware both load.
        assert kernel[0x38:0x3C] == b"ARM\x64", kernel[:64]
    elif arch == "armhf":
        # A zImage: magic 0x016F2818 at 0x24 (what U-Boot's bootz checks).
        assert struct.unpack_from("<I", kernel, 0x24)[0] == 0x016F2818
    else:
        assert kernel[0x202:0x206] == b"HdrS"  # x86 boot protocol
    version = (directory / "osie.kernel-version").read_text().strip()
    assert version.endswith({"x86-64": "-amd64", "arm64": "-arm64", "armhf": "-armmp-lpae"}[arch])


def test_the_armhf_osie_ships_the_boards_device_trees_flat_for_fdtdir() -> None:
    dtbs = built("armhf") / "dtbs"
    # 32-bit U-Boot's fdtfile has no vendor directory: pxelinux `fdtdir` loads
    # <fdtdir>/tegra124-jetson-tk1.dtb for the Jetson TK1.
    tk1 = dtbs / "tegra124-jetson-tk1.dtb"
    assert tk1.is_file(), sorted(p.name for p in dtbs.iterdir())[:20]
    assert tk1.read_bytes()[:4] == b"\xd0\x0d\xfe\xed"  # the flattened device tree magic
    assert len(list(dtbs.rglob("tegra*.dtb"))) >= 5
    # Not in the initrd: the device trees only cost RAM there.
    listing = subprocess.run(
        ["sh", "-c", f"zstd -dc {dtbs.parent / 'osie.cpio.zst'} | cpio -t --quiet"],
        capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    assert "usr/lib/systemd/systemd" in listing
    assert ".dtb" not in listing
