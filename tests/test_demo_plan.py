"""The demo's plan without running it (virtlab.demo_plan): which machines `pixiebox demo` starts,
the lab.toml it writes for a mixed lab (an arm64 UEFI machine beside the x86 ones, issue 15),
read back by the agent's own config loader and boot decision, and what the demo says when the
arm64 machine cannot run here. No root, no namespaces, no VMs (tests/test_demo.py boots them)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from argparse import ArgumentParser
from pathlib import Path

import pytest
from pixiebox.config import load_config
from pixiebox.core.decision import LabView, decide
from pixiebox.core.firmware import ARM64_IPXE, arch_info
from pixiebox.store.identity import IDENTITY_DIR, IdentityStore
from pixiebox.virtlab import arm, demo, demo_access, demo_plan

ARM1_MAC = "52:54:00:88:00:41"


def fake_os(where: Path, initrd_bytes: int = 1000) -> Path:
    """A directory with a vmlinuz and an initrd of `initrd_bytes` (sparse: sizes are what the
    demo reads)."""
    where.mkdir(parents=True)
    (where / "vmlinuz").write_bytes(b"kernel of " + where.name.encode())
    with (where / "initrd").open("wb") as initrd:
        initrd.truncate(initrd_bytes)
    return where


def test_the_arm64_machine_comes_after_the_x86_ones_with_a_mac_of_its_own() -> None:
    machines = demo_plan.plan(3, arm64=True)
    assert [(m.name, m.mac, m.arch, m.firmware, m.pxe) for m in machines] == [
        ("node1", "52:54:00:88:00:01", "x86-64", "bios", "ipxe-rom"),
        ("node2", "52:54:00:88:00:02", "x86-64", "uefi", "native"),
        ("node3", "52:54:00:88:00:03", "x86-64", "bios", "ipxe-rom"),
        ("arm1", ARM1_MAC, "arm64", "uefi", "native"),
    ]
    assert [m.label for m in machines] == [
        "node1 (BIOS, iPXE ROM)",
        "node2 (UEFI, native PXE)",
        "node3 (BIOS, iPXE ROM)",
        "arm1 (arm64 UEFI, native PXE)",
    ]
    # The most x86 machines --machines allows leave the arm64 one its MAC.
    most = demo_plan.plan(10, arm64=True)
    assert len({m.mac for m in most}) == 11 and most[-1].mac == ARM1_MAC
    assert all(m.arch == "x86-64" for m in demo_plan.plan(2))


def test_the_mixed_lab_toml_loads_and_boots_each_architecture_its_own_os(tmp_path: Path) -> None:
    testos = fake_os(tmp_path / "testos")
    arm64_os = fake_os(tmp_path / "testos-arm64")
    workdir = tmp_path / "work"
    machines = demo_plan.plan(2, arm64=True)
    config_file = workdir / "lab.toml"
    text = demo_plan.lab_toml(workdir, testos, machines, ["ssh-ed25519 AAAAx a@b"], arm64_os)
    config_file.write_text(text)

    config = load_config(config_file)  # ConfigError (every problem, with its line) otherwise
    image = config.images["osie"]
    arm64 = image.arch["arm64"]
    assert (arm64.kernel, arm64.initrd, arm64.cmdline) == (
        "testos-arm64/vmlinuz", ["testos-arm64/initrd"], "console=ttyAMA0,115200",
    )  # fmt: skip
    assert set(image.arch) == {"arm64"}
    # Laid out under the assets as the x86 OS is, from the directories given.
    assets = Path(config.boot.assets)
    assert (assets / "testos-arm64" / "vmlinuz").read_bytes() == b"kernel of testos-arm64"
    assert (assets / "testos" / "vmlinuz").read_bytes() == b"kernel of testos"
    # The agent's decision: arm1's firmware (option 93 = 11, arm64 UEFI) gets the arm64 build,
    # the x86 UEFI machine (7) the base image; nothing in lab.toml names arm1's architecture.
    lab = LabView.of(config)
    arm1 = decide(lab, ARM1_MAC, arch_info(11), loaders=lambda name: True)
    assert arm1.boots and arm1.image is not None and arm1.loader is not None
    assert (arm1.image.kernel, arm1.image.arch, arm1.loader.file) == (
        "testos-arm64/vmlinuz", "arm64", ARM64_IPXE,
    )  # fmt: skip
    node2 = decide(lab, "52:54:00:88:00:02", arch_info(7))
    assert node2.image is not None and node2.image.kernel == "testos/vmlinuz"
    # Power: every machine, arm1 too, by Wake-on-LAN and on its QMP socket, where the demo's VMs
    # put it (demo.run checks each VM against this path once it started).
    for machine in machines:
        entry = next(m for m in config.machines if m.name == machine.name)
        assert isinstance(entry.power, list)
        drivers = [(p.driver, p.options()) for p in entry.power]
        qmp = str(demo_plan.qmp_socket(workdir, machine))
        assert drivers == [("wol", {}), ("qemu", {"qmp": qmp})], drivers


def test_without_arm64_the_lab_toml_has_no_arch_table(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    machines = demo_plan.plan(1)
    text = demo_plan.lab_toml(workdir, fake_os(tmp_path / "testos"), machines, ["ssh-ed25519 A"])
    (workdir / "lab.toml").write_text(text)
    assert load_config(workdir / "lab.toml").images["osie"].arch == {}
    assert not (workdir / "assets" / "testos-arm64").exists()
    with pytest.raises(ValueError, match="arm64_os"):
        demo_plan.lab_toml(tmp_path / "w2", tmp_path / "testos", demo_plan.plan(1, arm64=True), [])


def test_memory_follows_the_os_and_the_architecture(tmp_path: Path) -> None:
    small = fake_os(tmp_path / "small", 1 << 20)
    osie = fake_os(tmp_path / "osie", 55 << 20)
    assert demo_plan.memory_for(small) == demo_plan.memory_for(small, "arm64") == 512
    assert demo_plan.memory_for(osie) == 1536
    assert demo_plan.memory_for(osie, "arm64") == 2048


def test_the_arm64_machine_says_what_is_missing_and_the_command_that_fixes_it(
    tmp_path: Path,
) -> None:
    ipxe_dir = tmp_path / "ipxe"
    ipxe_dir.mkdir()
    os_dir = tmp_path / "testos-arm64"
    problem = demo_plan.arm64_problem(os_dir, ipxe_dir)
    assert problem == (
        f"no {ipxe_dir / 'ipxe-arm64.efi'}: the arm64 machine's firmware boots Debian trixie's "
        "arm64 iPXE; fetch it with sudo ./build.sh trixie (sudo ./build.sh demo --arm64 does)"
    )
    (ipxe_dir / ARM64_IPXE).write_bytes(b"MZ")
    problem = demo_plan.arm64_problem(os_dir, ipxe_dir)
    assert problem == (
        f"no {os_dir / 'vmlinuz'}: build the arm64 OSIE with sudo ./build.sh osie --arch arm64, "
        f"or the arm64 test OS with scripts/build-testos.sh --arch arm64 {os_dir} "
        "(sudo ./build.sh demo --arm64 does one of them)"
    )
    fake_os(os_dir)
    emulator = arm.prerequisite_problem()
    expected = f"the arm64 machine: {emulator}" if emulator else None
    assert demo_plan.arm64_problem(os_dir, ipxe_dir) == expected


def test_the_summary_names_the_arm64_machine_in_the_rows_the_demo_test_reads() -> None:
    machines = demo_plan.plan(2, arm64=True)
    for index, machine in enumerate(machines):
        machine.seconds["up"] = 40.0 + index
        machine.address = f"10.88.0.{101 + index}"
    text = demo.summary(machines)
    for machine in machines:
        row = re.search(
            rf"^{re.escape(machine.label)}\s+{machine.mac}\s+(10\.88\.0\.\d+)\s+([\d.]+) s$",
            text, re.M,
        )  # fmt: skip
        assert row, text
    # One column for every label, the longest (the arm64 one) included.
    starts = {line.index("52:54") for line in text.splitlines() if "52:54" in line}
    assert len(starts) == 1, text


def test_demo_help_shows_the_arm64_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pixiebox.cli.main", "demo", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "--arm64 " in done.stdout and "--arm64-os DIR" in done.stdout, done.stdout


def test_arm64_is_refused_with_the_appliance_before_anything_starts() -> None:
    parser = ArgumentParser()
    demo.add_arguments(parser)  # the CLI's own options, as `pixiebox demo` parses them
    args = parser.parse_args(["--appliance", "--arm64"])
    with pytest.raises(demo.DemoError, match="--arm64 is for the demo's own agent"):
        demo.run(args)


def test_the_login_trusts_the_host_key_the_agent_keeps_not_the_first_one_seen(
    tmp_path: Path,
) -> None:
    """known_hosts is written from the agent's identity store (the key it hands the machine at
    boot), for machines with an address only; OpenSSH's own parser finds it there."""
    store = IdentityStore(tmp_path / "state" / IDENTITY_DIR)
    node1 = demo_plan.Machine("node1", "52:54:00:88:00:01", "bios", "ipxe-rom",
                              address="10.88.0.115")  # fmt: skip
    node2 = demo_plan.Machine("node2", "52:54:00:88:00:02", "uefi", "native")  # not up: no IP
    identity = store.for_machine(node1.mac)
    store.for_machine(node2.mac)
    known = demo_access.write_known_hosts(tmp_path, tmp_path / "state", [node1, node2])
    key_type, key = identity.ssh_host_public.split()[:2]
    assert known.read_text() == f"10.88.0.115 {key_type} {key}\n"
    if shutil.which("ssh-keygen") is None:
        pytest.skip("no ssh-keygen (openssh-client; build.sh installs it)")
    found = subprocess.run(["ssh-keygen", "-F", "10.88.0.115", "-f", str(known)],
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert found.returncode == 0 and key in found.stdout, found
