"""Machines with Secure Boot enforcing netboot from Pixiebox without a visit to their firmware
setup (issue 16, "How it is checked").

One lab, two QEMU q35 machines under Debian trixie's OVMF with Secure Boot enforcing and
Microsoft's keys enrolled (SMM, secure pflash: the guest cannot switch it off), each PXE-booting
with EDK2's own network stack (no option ROM, as a PC's NIC; a virtio RNG,
docs/firmware-quirks.md#34), under TCG:

- `sb1` has `secure_boot = true` in lab.toml: firmware PXE → Debian's shim (signed by Microsoft's
  UEFI CA) → Debian's signed network GRUB → its grub.cfg-<mac> rendered by the agent → Debian's
  signed kernel and the test OS's initrd over HTTP → `up`. Its kernel log says Secure Boot is
  enabled and the kernel is locked down, the OS reports `secure_boot: on` at phone-home, which
  the API shows, and the dashboard's stage bar shows every step, GRUB's file as the script.
- `plain1` is not marked: it is offered iPXE, which its firmware downloads and refuses; the
  doctor then names Secure Boot as the cause and says what to set.

The two share one agent and boot side by side. Times are recorded, never asserted.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import netlab
import pytest
import vmlab
from agentproc import start_agent
from pixiebox.core.firmware import SHIM, SIGNED_GRUB
from pixiebox.events import Kind
from testoslab import install_testos, lab_toml_for_testos
from trixiefiles import trixie_file_or_skip

SUBNET = "10.83.0.0/24"
AGENT_IP = "10.83.0.2"
API = f"http://{AGENT_IP}:8080"
SB_MAC, PLAIN_MAC = "52:54:00:83:00:01", "52:54:00:83:00:02"
MACHINES = {SB_MAC: ("sb1", "10.83.0.31", True), PLAIN_MAC: ("plain1", "10.83.0.32", False)}
#: Power-on to `up` through OVMF (SMM), shim, GRUB and the test OS, two TCG machines on a loaded
#: 2-core machine.
TIMEOUT = 480.0
#: What trixie's OVMF prints when it refuses an unsigned boot file (tests/test_secure_boot.py).
REFUSED = "Access Denied"
#: The doctor's wait after a boot step before it calls the step stalled, asked small.
SETTLE = 10

pytestmark = [pytest.mark.netns, pytest.mark.timeout(TIMEOUT + 300)]


def lab_config(workdir: Path, testos: tuple[Path, Path]) -> str:
    for firmware in (vmlab.SECBOOT_CODE, vmlab.SECBOOT_VARS):
        trixie_file_or_skip("ovmf", firmware)  # start_vm's, checked here to skip cleanly
    assets = install_testos(workdir, testos)
    (assets / "signed").mkdir()
    shutil.copyfile(
        trixie_file_or_skip("shim-signed", "usr/lib/shim/shimx64.efi.signed"), assets / SHIM
    )
    shutil.copyfile(
        trixie_file_or_skip(
            "grub-efi-amd64-signed", "usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"
        ),
        assets / SIGNED_GRUB,
    )
    api = f'[api]\nlisten = "0.0.0.0:8080"\ntoken_file = "{workdir / "api-token"}"\n'
    text = lab_toml_for_testos("secure-boot-test", SUBNET, workdir, sections=api)
    for mac, (name, ip, secure) in MACHINES.items():
        text += f'[[machines]]\nname = "{name}"\nmac = "{mac}"\nip = "{ip}"\n'
        if secure:
            text += "secure_boot = true\n"
    return text


def api_get(host: netlab.Host, path: str) -> Any:
    out = host.run(["curl", "-sS", "--fail", "--max-time", "10", f"{API}{path}"]).stdout
    return json.loads(out)


def test_a_secure_boot_machine_boots_the_signed_chain_and_one_offered_ipxe_is_diagnosed(
    netlab_require: Callable[..., None], testos: tuple[Path, Path], segment: netlab.Segment,
    workdir: Path, record_property: Callable[[str, object], None],
) -> None:  # fmt: skip
    netlab_require(vmlab.QEMU, "curl")
    config = lab_config(workdir, testos)
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    start_agent(agent_host, config, workdir)
    vms = {
        mac: vmlab.start_vm(
            segment, name, mac, firmware="uefi", pxe="native", secure_boot=True, workdir=workdir
        )
        for mac, (name, _, _) in MACHINES.items()
    }
    sb, plain = vms[SB_MAC], vms[PLAIN_MAC]
    seen: dict[str, float] = {}

    def both() -> bool:
        for vm in vms.values():
            assert vm.proc.poll() is None, vm.tails()
        if "up" not in seen and "PIXIEBOX-TESTOS: up sb1" in sb.console_text():
            seen["up"] = sb.elapsed()
        if "refused" not in seen and REFUSED in plain.console_text():
            seen["refused"] = plain.elapsed()
        return len(seen) == 2

    try:
        netlab.wait_until(both, TIMEOUT, 0.5, "sb1 up and plain1 refusing iPXE")
    except AssertionError:
        raise AssertionError(f"seen: {seen}\n{sb.tails()}\n{plain.tails()}") from None
    print(f"\nsb1: power-on to up through shim and GRUB in {seen['up']:.1f} s; plain1's firmware"
          f" refused iPXE {seen['refused']:.1f} s after power-on")  # fmt: skip
    record_property("secure_boot_up_seconds", round(seen["up"], 1))

    # The signed chain ran, and the kernel it started enforces Secure Boot.
    console = sb.console_text()
    assert f"NBP filename is {SHIM}" in console, console[-3000:]
    assert f"Fetching Netboot Image {SIGNED_GRUB}" in console, console[-3000:]
    assert "Secure boot enabled" in console, console[-3000:]
    assert "Kernel is locked down" in console, console[-3000:]
    machine = api_get(agent_host, "/api/v1/machines/sb1")
    assert machine.get("secure_boot") == "on", machine
    events = api_get(agent_host, "/api/v1/machines/sb1/events?limit=200")
    files = {e["fields"].get("file") for e in events if e["kind"] == Kind.TFTP_SENT}
    assert {SHIM, SIGNED_GRUB} <= files, events
    # The dashboard's stage bar reads GRUB's configuration as the signed chain's script step.
    last = api_get(agent_host, "/api/v1/machines/sb1/boots")[-1]
    stages = [stage["stage"] for stage in last["stages"]]
    assert stages[:1] == ["dhcp"] and {"loader", "script", "kernel", "initrd", "up"} <= set(
        stages
    ), last
    assert last["outcome"] == "up", last

    # The machine offered iPXE: downloaded it, refused it, and the doctor says why.
    assert "PIXIEBOX-TESTOS" not in plain.console_text()
    deadline = time.monotonic() + SETTLE + 60
    report: Any = {}
    while time.monotonic() < deadline:
        report = api_get(agent_host, f"/api/v1/machines/plain1/doctor?settle={SETTLE}")
        if report.get("cause") == "secure-boot":
            break
        time.sleep(2)
    assert report.get("cause") == "secure-boot", report
    verdict = str(report.get("verdict"))
    assert "Secure Boot" in verdict and "secure_boot = true" in verdict, verdict
