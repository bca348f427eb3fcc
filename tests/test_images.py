"""The images built by `build.sh osie` and `build.sh appliance`, booted for real.

The user's story end to end, in virtual machines: the appliance disk image (as flashed to a USB
stick) gets its lab.toml written onto its FAT partition with mtools (what a laptop does), a QEMU
machine boots it from disk under UEFI with Secure Boot enforcing (trixie's OVMF with Microsoft's
keys, as PCs ship: issue 16), and a second QEMU machine on the same private bridge PXE-boots the
OSIE from it, phones home and is shown `up` by the appliance's API. An SSH client in the test's
namespace logs into the node as root with the key from lab.toml, then again after the node
rebooted, with the same host key. Everything under TCG, so the waits are long (bounded).

The images come from out/ (`build.sh test` builds them before pytest; cached).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import netlab
import osie_tools
import pytest
import vmlab
from osiebuilds import built
from pixiebox.cli.appliance import FALLBACK_NETWORK, network_unit, prepare
from pixiebox.config import LabConfig, load_config
from pixiebox.core import raspi
from pixiebox.core.trixie import trixie_root
from pixiebox.events import Kind
from pixiebox.virtlab import appliance_lab
from trixiefiles import trixie_file_or_skip

REPO = Path(__file__).resolve().parent.parent

APPLIANCE_IP, LAPTOP_IP = appliance_lab.APPLIANCE_IP, appliance_lab.LAPTOP_IP
APPLIANCE_MAC = appliance_lab.APPLIANCE_MAC
NODE_MAC, NODE_IP = "52:54:00:89:01:01", "10.89.0.31"
BOOT_TIMEOUT = 900.0  # the appliance under TCG on a loaded 2-core machine: kernel, systemd, agent
NODE_TIMEOUT = 600.0  # iPXE, a 12 MB kernel and a 52 MB initrd over TCG, systemd, metadata
#: The nodes' signed chain the appliance carries in its assets (core/firmware.py SHIM,
#: SIGNED_GRUB): served file → (trixie package, its file), compared with the pinned copy
#: `./build.sh trixie` unpacked (image/trixie.txt), so the image holds exactly the pinned binaries.
SIGNED_ASSETS = {
    "signed/shimx64.efi": ("shim-signed", "usr/lib/shim/shimx64.efi.signed"),
    "signed/grubx64.efi": (
        "grub-efi-amd64-signed",
        "usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed",
    ),
}


# --- the appliance's own network, from lab.toml (no VM) ------------------------------------------


def test_static_address_when_server_ip_is_set() -> None:
    config = LabConfig.model_validate(
        {
            "network": {
                "interface": "eth1",
                "server_ip": "192.168.1.64",
                "subnet": "192.168.1.0/24",
                "gateway": "192.168.1.254",
                "dns": ["192.168.1.254", "1.1.1.1"],
            }
        }
    )
    unit = network_unit(config)
    assert "Name=eth1\n" in unit
    assert "Address=192.168.1.64/24\n" in unit
    assert "Gateway=192.168.1.254\n" in unit
    assert "DNS=192.168.1.254\nDNS=1.1.1.1\n" in unit
    assert "DHCP=" not in unit


def test_dhcp_from_the_router_without_server_ip() -> None:
    unit = network_unit(LabConfig.model_validate({"network": {"interface": "eth0"}}))
    assert "Name=eth0\n" in unit and "DHCP=ipv4\n" in unit and "Address=" not in unit


def test_a_broken_lab_file_is_reported_and_the_network_falls_back_to_dhcp(tmp_path: Path) -> None:
    lab = tmp_path / "lab.toml"
    lab.write_text('[network]\ninterface = "eth0"\ndhcp_mode = "fulll"\n', encoding="utf-8")
    network_dir = tmp_path / "network"
    keys = tmp_path / "root" / ".ssh" / "authorized_keys"
    console = tmp_path / "console.txt"
    with console.open("w") as out:
        assert prepare(lab, network_dir, keys, console=out) == 1
    said = console.read_text()
    assert f"{lab}:3: error: network.dhcp_mode: 'fulll' is not allowed" in said
    assert "Every Ethernet port uses DHCP meanwhile" in said
    assert (network_dir / "10-pixiebox.network").read_text() == FALLBACK_NETWORK
    assert not keys.exists()  # nothing taken from a file that did not validate


def test_root_keys_follow_the_lab_file(tmp_path: Path) -> None:
    lab = tmp_path / "lab.toml"
    keys = tmp_path / "root" / ".ssh" / "authorized_keys"
    keys.parent.mkdir(parents=True)
    keys.write_text("ssh-ed25519 AAAAold removed@laptop\n")
    lab.write_text(
        '[network]\ninterface = "eth0"\n[boot]\nssh_keys = ["ssh-ed25519 AAAAnew me@laptop"]\n',
        encoding="utf-8",
    )
    with (tmp_path / "console.txt").open("w") as out:
        assert prepare(lab, tmp_path / "network", keys, console=out) == 0
    assert keys.read_text() == "ssh-ed25519 AAAAnew me@laptop\n"
    assert keys.stat().st_mode & 0o777 == 0o600


def test_appliance_units_verify(tmp_path: Path) -> None:
    """systemd's own checker on the appliance's units (ordering, directives, paths)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze missing")
    units = sorted((REPO / "overlays/appliance/usr/lib/systemd/system").glob("*.service"))
    assert units
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Binaries of the image (/opt/pixiebox, /usr/local/bin/k3s) are not on this machine.
    problems = [
        line
        for line in result.stderr.splitlines()
        if line.strip()
        and "is not executable" not in line
        and "No such file or directory" not in line
        and "/opt/pixiebox" not in line
        and "/usr/local/bin/k3s" not in line
    ]
    assert not problems, result.stderr


# --- the appliance's Secure Boot chain, on its FAT partition (no VM) -----------------------------

#: Names in the certificates an Authenticode signature carries (DER strings are plain bytes).
MICROSOFT_UEFI_CA = b"Microsoft Corporation UEFI CA"
DEBIAN_CA = b"Debian Secure Boot CA"


def pe_signature(binary: bytes) -> bytes:
    """The Authenticode certificate table of a PE file (the optional header's data directory 4,
    PE/COFF spec "The Attribute Certificate Table"); empty when the file is unsigned."""
    header = int.from_bytes(binary[0x3C:0x40], "little")
    optional = header + 24
    plus = binary[optional : optional + 2] == b"\x0b\x02"  # PE32+ (x86-64) or PE32
    entry = optional + (144 if plus else 128)
    start, size = (int.from_bytes(binary[i : i + 4], "little") for i in (entry, entry + 4))
    return binary[start : start + size]


def esp_files(image: Path) -> list[str]:
    listing = subprocess.run(
        ["mdir", "-/", "-b", "-i", f"{image}@@{appliance_lab.ESP_OFFSET}", "::/"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    lines = [line.removeprefix("::") for line in listing.stdout.split("\n") if line.strip()]
    return [line for line in lines if not line.endswith("/")]  # files only


def esp_file(image: Path, path: str, workdir: Path) -> bytes:
    copy = workdir / path.strip("/").replace("/", "_")
    subprocess.run(
        ["mcopy", "-n", "-i", f"{image}@@{appliance_lab.ESP_OFFSET}", f"::{path}", str(copy)],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return copy.read_bytes()


def test_the_appliance_boots_only_signed_binaries_under_uefi(
    images: tuple[Path, Path], tmp_path: Path
) -> None:
    """What firmware with Secure Boot on meets on the stick (mkosi.conf): \\EFI\\BOOT\\BOOTX64.EFI
    is trixie's shim (signed by Microsoft's UEFI CA, the pinned file), beside it Debian's signed
    systemd-boot as grubx64.efi (the name shim loads) and MokManager as mmx64.efi; the boot
    entries' kernels are Debian-signed, and no unsigned UKI is left for systemd-boot to list."""
    if shutil.which("mdir") is None:
        pytest.skip("mtools is missing (apt-get install mtools; build.sh installs it)")
    image = images[0]
    pinned_shim = trixie_file_or_skip(*SIGNED_ASSETS["signed/shimx64.efi"])
    files = esp_files(image)
    lower = {name.lower(): name for name in files}
    for wanted in ("/efi/boot/bootx64.efi", "/efi/boot/grubx64.efi", "/efi/boot/mmx64.efi"):
        assert wanted in lower, f"{wanted} not on the ESP: {files}"
    shim = esp_file(image, lower["/efi/boot/bootx64.efi"], tmp_path)
    assert shim == pinned_shim.read_bytes(), "BOOTX64.EFI is not trixie's pinned shimx64.efi.signed"
    assert MICROSOFT_UEFI_CA in pe_signature(shim)
    loader = esp_file(image, lower["/efi/boot/grubx64.efi"], tmp_path)
    assert b"systemd-boot" in loader and DEBIAN_CA in pe_signature(loader)
    assert DEBIAN_CA in pe_signature(esp_file(image, lower["/efi/boot/mmx64.efi"], tmp_path))
    assert not [f for f in files if f.lower().startswith("/efi/linux/")], files
    entries = [f for f in files if f.lower().startswith("/loader/entries/")]
    assert entries, f"no boot entry in /loader/entries: {files}"
    for entry in entries:
        text = esp_file(image, entry, tmp_path).decode()
        kernels = [line.split()[1] for line in text.splitlines() if line.startswith("linux ")]
        assert kernels, text
        for kernel in kernels:
            assert DEBIAN_CA in pe_signature(esp_file(image, kernel, tmp_path)), kernel


# --- what the appliance carries on its root filesystem (no VM) -----------------------------------

#: The GPT type of mkosi.repart's root partition (Type=root on x86-64, the Discoverable
#: Partitions Specification's "Root Partition (x86-64)").
ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"


def root_file(image: Path, path: str) -> bytes:
    """`path` on the image's ext4 root, read with debugfs at the partition's offset: no loop
    device, no mount (neither is allowed in every container the tests run in). Empty when the
    file is not there (debugfs says so on stderr only)."""
    table = subprocess.run(
        ["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True, timeout=60
    )
    partitions = json.loads(table.stdout)["partitiontable"]["partitions"]
    roots = [p for p in partitions if p["type"].upper() == ROOT_X86_64]
    assert roots, f"no x86-64 root partition in {image}: {partitions}"
    offset = roots[0]["start"] * 512
    dump = subprocess.run(
        ["debugfs", "-R", f"cat {path}", f"{image}?offset={offset}"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return dump.stdout


def test_the_appliance_carries_the_raspberry_pi_firmware(images: tuple[Path, Path]) -> None:
    """Debian's raspi-firmware (non-free-firmware, mkosi.conf) is installed where the agent
    looks for a netbooting Pi's first files (core/raspi.py SYSTEM_DIR): start4.elf, a VideoCore
    ELF, and fixup4.dat; the pinned copy's bytes when the image has the pinned version."""
    for tool in ("sfdisk", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (apt-get install fdisk e2fsprogs; build.sh does)")
    image = images[0]
    manifest = json.loads(image.with_suffix(".manifest").read_text())
    versions = {p["name"]: p["version"] for p in manifest["packages"]}
    assert raspi.PACKAGE in versions, "raspi-firmware is not in the appliance's manifest"
    pinned = trixie_root(raspi.PACKAGE)
    for name in ("start4.elf", "fixup4.dat"):
        content = root_file(image, f"{raspi.SYSTEM_DIR}/{name}")
        assert content, f"{raspi.SYSTEM_DIR}/{name} is not in {image}"
        if name.endswith(".elf"):
            assert content.startswith(b"\x7fELF"), name
        if pinned is not None and pinned.name == f"{raspi.PACKAGE}_{versions[raspi.PACKAGE]}":
            copy = trixie_file_or_skip(raspi.PACKAGE, f"{raspi.PACKAGE_DIR}/{name}")
            assert content == copy.read_bytes(), f"{name} differs from the pinned {pinned.name}"


#: The ARM builds the appliance carries for config/lab.toml's [images.osie.arch.<arch>] (issue
#: 15: out of the box an arm64 or armhf machine boots its own kernel, not the x86 one).
ARM_ASSETS = "/var/lib/pixiebox/assets"


@pytest.mark.parametrize("arch", ["arm64", "armhf"])
def test_the_appliance_carries_the_arm_osie_its_lab_file_names(
    images: tuple[Path, Path], arch: str
) -> None:
    """The appliance's assets hold out/osie-<arch>'s kernel and initrd byte for byte and the
    device trees U-Boot's fdtdir fetches (the Jetson TK1's for armhf, a Pi 4's under broadcom/
    for arm64: boot/raspi.py on_disk); and the lab file it ships (config/lab.toml) names them.
    Compared by digest: pytest's diff of two 40 MB byte strings would take minutes."""
    for tool in ("sfdisk", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (apt-get install fdisk e2fsprogs; build.sh does)")
    out = built(arch)
    image = images[0]
    build = load_config(REPO / "config" / "lab.toml").images["osie"].arch[arch]
    assert (build.kernel, build.initrd, build.fdtdir) == (
        f"osie-{arch}/vmlinuz", [f"osie-{arch}/initrd"], f"osie-{arch}/dtbs",
    )  # fmt: skip
    tree = {"armhf": "tegra124-jetson-tk1.dtb", "arm64": "broadcom/bcm2711-rpi-4-b.dtb"}[arch]
    built_files = {
        build.kernel: out / "osie.vmlinuz",
        build.initrd[0]: out / "osie.cpio.zst",
        f"{build.fdtdir}/{tree}": out / "dtbs" / tree,
    }
    for served, source in built_files.items():
        content = root_file(image, f"{ARM_ASSETS}/{served}")
        assert content, f"{ARM_ASSETS}/{served} is not in {image}: sudo ./build.sh appliance"
        expected = hashlib.sha256(source.read_bytes()).hexdigest()
        assert hashlib.sha256(content).hexdigest() == expected, f"{served} is not {source}"
        if served.endswith(".dtb"):
            assert content.startswith(b"\xd0\x0d\xfe\xed"), f"{served} is no device tree"


# --- booting the images ---------------------------------------------------------------------------


@pytest.fixture
def ssh_key(tmp_path: Path) -> tuple[Path, str]:
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tester@laptop", "-f", str(key)],
        check=True,
        timeout=30,
    )
    return key, key.with_suffix(".pub").read_text().strip()


def appliance_lab_toml(public_key: str, *, broken: bool = False) -> str:
    """The demo's lab file for one node; `broken` misspells dhcp_mode (line 10)."""
    machines = [("node1", NODE_MAC, NODE_IP)]
    text = appliance_lab.lab_toml(
        machines, [public_key], mode="reservaton" if broken else "reservation"
    )
    # Every x86-64 UEFI machine gets the signed chain (the node of the Secure Boot test).
    return text.replace("[boot]\n", "[boot]\nsecure_boot = true\n", 1)


def flash(images: tuple[Path, Path], workdir: Path, lab_toml: str) -> Path:
    """A copy of the appliance image with this lab.toml on its FAT partition (mtools), as a
    user writes it from a laptop; the same helper `pixiebox demo --appliance` uses."""
    disk = workdir / "stick.raw"
    appliance_lab.flash(images[0], disk, lab_toml)
    assert appliance_lab.read_lab_toml(disk) == lab_toml
    return disk


def api(laptop: netlab.Host, path: str) -> Any:
    return appliance_lab.api_get(laptop, path)


def wait_for(what: str, check: Callable[[], Any], timeout: float, vm: vmlab.VM) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if vm.proc.poll() is not None:
            break
        time.sleep(3)
    pytest.fail(f"{what} not seen within {timeout:.0f} s\n{vm.tails()}", pytrace=False)


def lockdown_refusals(console: str) -> list[str]:
    """What a locked-down kernel refused (an unsigned module, /dev/mem, kexec... each print
    "Lockdown: PROCESS: WHAT is restricted"), but its own note that hibernation is off."""
    return [
        line
        for line in console.splitlines()
        if "is restricted; see man kernel_lockdown" in line and "hibernation" not in line
    ]


def node_state(laptop: netlab.Host) -> dict[str, Any] | None:
    machines = api(laptop, "/api/v1/machines") or []
    return next((m for m in machines if m.get("mac") == NODE_MAC), None)


def syslog_lines(laptop: netlab.Host) -> list[str]:
    events = api(laptop, f"/api/v1/machines/{NODE_MAC}/events") or []
    return [event.get("message", "") for event in events if event.get("kind") == Kind.SYSLOG]


def last_phone_home(laptop: netlab.Host) -> int:
    """The id of the node's newest `up` event (0: none yet). Not a count: the API returns the
    newest events only, and a booted OSIE's forwarded journal soon pushes the first boot's `up`
    out of them (then a count stays the same across a reboot)."""
    events = api(laptop, f"/api/v1/machines/{NODE_MAC}/events") or []
    return max((int(event["id"]) for event in events if event.get("kind") == Kind.OS_UP),
               default=0)  # fmt: skip


def ssh(
    laptop: netlab.Host,
    key: Path,
    known_hosts: Path,
    command: str,
    *,
    first: bool,
    host: str = NODE_IP,
) -> subprocess.CompletedProcess[str]:
    argv = [
        "ssh", "-i", str(key), "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", f"StrictHostKeyChecking={'accept-new' if first else 'yes'}",
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
        f"root@{host}", command,
    ]  # fmt: skip
    return laptop.run(argv, timeout=60)


@pytest.mark.timeout(BOOT_TIMEOUT + 3 * NODE_TIMEOUT + 600)
def test_appliance_boots_from_disk_and_serves_the_osie_to_a_node_that_keeps_its_identity(
    images: tuple[Path, Path],
    segment: netlab.Segment,
    netlab_require: Callable[..., None],
    ssh_key: tuple[Path, str],
    vms: list[vmlab.VM],
    tmp_path: Path,
) -> None:
    """The appliance boots under UEFI with Secure Boot enforcing (shim → Debian's signed
    systemd-boot → Debian's signed kernel: its kernel says so and locks down) and serves a node
    as usual; its assets hold the nodes' signed chain. One boot checks both (VM time is CI's
    budget); legacy BIOS boot is the next test's."""
    netlab_require(vmlab.QEMU, "mcopy", "ssh", "curl", "tftp")
    signed = {name: trixie_file_or_skip(*where) for name, where in SIGNED_ASSETS.items()}
    for firmware in (vmlab.SECBOOT_CODE, vmlab.SECBOOT_VARS):
        trixie_file_or_skip("ovmf", firmware)
    key, public = ssh_key
    disk = flash(images, tmp_path, appliance_lab_toml(public))
    laptop = segment.add_host("laptop", ip=f"{LAPTOP_IP}/24")
    appliance = vmlab.start_vm(
        segment, "appliance", APPLIANCE_MAC, firmware="uefi", secure_boot=True,
        memory_mb=1536, disk=disk, workdir=tmp_path / "vms",
    )  # fmt: skip
    vms.append(appliance)
    wait_for("the appliance's API", lambda: api(laptop, "/api/v1/machines") is not None,
             BOOT_TIMEOUT, appliance)  # fmt: skip
    booted_in = appliance.elapsed()
    console = appliance.console_text()
    assert f"lab.toml is valid; eth0 gets {APPLIANCE_IP}" in console, console[-3000:]
    # Debian's kernel, verified by shim, sees the firmware's Secure Boot and locks itself down
    # (only signed modules; the appliance needs nothing else).
    for line in ("Secure boot enabled", "Kernel is locked down"):
        assert line in console, f"{line!r} not on the appliance's console\n{console[-3000:]}"
    # Nothing the appliance does is refused by lockdown (an unsigned module, /dev/mem, kexec...
    # would each print "Lockdown: PROCESS: WHAT is restricted"); the kernel's own note that
    # hibernation is off is the one expected line.
    refused = lockdown_refusals(console)
    assert not refused, "\n".join(refused)
    # The key from lab.toml lets the user into the appliance too; the API token was made on
    # this first boot, readable by root only; the agent runs under its hardened unit.
    inside = ssh(
        laptop, key, tmp_path / "appliance_known_hosts",
        "stat -c %a /var/lib/pixiebox/api-token; systemctl is-active pixiebox; "
        "systemctl show -p ProtectSystem -p NoNewPrivileges --value pixiebox; "
        "cat /sys/kernel/security/lockdown",
        first=True, host=APPLIANCE_IP,
    )  # fmt: skip
    assert inside.returncode == 0, inside.stderr
    mode, active, *hardening, lockdown = inside.stdout.splitlines()
    assert (mode, active, sorted(hardening)) == ("600", "active", ["strict", "yes"]), inside.stdout
    assert "[integrity]" in lockdown, inside.stdout
    # The nodes' signed chain, as a node gets it: by TFTP from the appliance, the pinned files.
    for name, pinned in signed.items():
        got = tmp_path / name.replace("/", "-")
        fetched = laptop.run(["tftp", "-m", "binary", APPLIANCE_IP, "-c", "get", name, str(got)],
                             timeout=120, check=False)  # fmt: skip
        assert fetched.returncode == 0 and got.is_file(), f"TFTP {name}: {fetched.stderr}"
        assert got.read_bytes() == pinned.read_bytes(), (
            f"the appliance's {name} is not {pinned}: the image installed another version than "
            "image/trixie.txt pins (a trixie point release?): update the pin"
        )

    # The node has Secure Boot enforcing too ([boot] secure_boot = true in its lab.toml): EDK2's
    # own PXE → the appliance's shim → Debian's signed GRUB → the OSIE's signed kernel, locked
    # down, whose phone-home reports Secure Boot on. (The iPXE path to the OSIE: test_demo.)
    node = vmlab.start_vm(
        segment, "node1", NODE_MAC, firmware="uefi", pxe="native", secure_boot=True,
        memory_mb=1024, workdir=tmp_path / "vms",
    )  # fmt: skip
    vms.append(node)
    state = wait_for("node1 up in the appliance's API",
                     lambda: (s := node_state(laptop)) and s["state"] in ("up", "joined") and s,
                     NODE_TIMEOUT, node)  # fmt: skip
    node_up_in = node.elapsed()
    assert state["name"] == "node1" and state["ip"] == NODE_IP
    assert state["secure_boot"] == "on", state
    node_console = node.console_text()
    assert "Fetching Netboot Image signed/grubx64.efi" in node_console, node_console[-3000:]
    assert "Secure boot enabled" in node_console, node_console[-3000:]
    refused = lockdown_refusals(node_console)  # the OSIE's modules are all Debian-signed
    assert not refused, "\n".join(refused)
    # The node's journal reaches the appliance (systemd-netlogd → the agent's syslog receiver)
    # and lands in node1's event log.
    wait_for("a syslog line from node1 in its events", lambda: syslog_lines(laptop),
             NODE_TIMEOUT, node)  # fmt: skip

    known_hosts = tmp_path / "known_hosts"
    first = ssh(laptop, key, known_hosts,
                f"hostname; cat /etc/ssh/ssh_host_ed25519_key.pub; {osie_tools.ROOT_CHECKS}",
                first=True)  # fmt: skip
    assert first.returncode == 0, first.stderr
    name, host_line, root_type, pivot, used_mb = first.stdout.splitlines()[:5]
    assert name == "node1"
    host_key = host_line.split()[:2]
    # The OSIE runs on an overlay of its initramfs (nothing copied, image/osie/mkosi.finalize),
    # on which runc's pivot_root works, as containerd needs to start a pod.
    assert (root_type, pivot) == ("overlay", "pivoted"), first.stdout

    before = last_phone_home(laptop)
    ssh(laptop, key, known_hosts, "systemctl reboot", first=False)  # the connection may drop
    wait_for("node1's phone-home after its reboot", lambda: last_phone_home(laptop) > before,
             NODE_TIMEOUT, node)  # fmt: skip
    # StrictHostKeyChecking=yes with the host key recorded before the reboot: a new key would
    # be refused ("REMOTE HOST IDENTIFICATION HAS CHANGED").
    again = ssh(laptop, key, known_hosts, "cat /etc/ssh/ssh_host_ed25519_key.pub", first=False)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[:2] == host_key
    print(f"appliance (UEFI, Secure Boot on) API up {booted_in:.0f} s after power-on; node1 (the"
          " same, through shim and GRUB) up "
          f"{node_up_in:.0f} s after power-on, {used_mb} MB of RAM in use once up")  # fmt: skip


@pytest.mark.timeout(BOOT_TIMEOUT + 300)
def test_a_broken_lab_file_is_named_on_the_console_of_a_bios_booted_appliance(
    images: tuple[Path, Path],
    segment: netlab.Segment,
    netlab_require: Callable[..., None],
    vms: list[vmlab.VM],
    tmp_path: Path,
) -> None:
    """The other half of "UEFI and legacy BIOS bootable": SeaBIOS boots the stick through GRUB
    and the same kernel and initrds (the test above boots it under UEFI with Secure Boot)."""
    netlab_require(vmlab.QEMU, "mcopy")
    disk = flash(images, tmp_path, appliance_lab_toml("ssh-ed25519 AAAAx a@b", broken=True))
    appliance = vmlab.start_vm(
        segment, "appliance", APPLIANCE_MAC, firmware="bios", memory_mb=1536,
        disk=disk, workdir=tmp_path / "vms",
    )  # fmt: skip
    vms.append(appliance)
    text = appliance.wait_console("Every Ethernet port uses DHCP meanwhile", BOOT_TIMEOUT)
    assert (
        "/efi/pixiebox/lab.toml:10: error: network.dhcp_mode: 'reservaton' is not allowed" in text
    ), text[-3000:]
