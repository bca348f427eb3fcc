"""An arm64 UEFI machine is answered out of the box: real firmware (QEMU virt, Debian's AAVMF,
its own PXE client) PXE-boots from the agent, which hands it Debian trixie's arm64 iPXE
(ipxe-arm64.efi, image/trixie.txt) by TFTP; that iPXE asks DHCP again, fetches the machine's
script over HTTP and runs it, which downloads the image's kernel and initrd and starts the kernel.

No arm64 test OS exists yet (the test OS and the OSIE are x86-64 builds; issue 15 item 1), so the
image's "kernel" is an arm64 EFI executable that says on the console that it runs: trixie's
ipxe-arm64.efi again. Linux's arm64 kernel is started the same way (its EFI stub is a PE image
iPXE loads and starts); a file that is not an arm64 EFI image is refused by iPXE's `kernel`
("Exec format error"). Boot times (power-on to the script, to the payload) are printed and
recorded as `boot_seconds`, never asserted.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import armvm
import netlab
import pytest
from agentproc import start_agent
from pixiebox.core.firmware import SYSTEM_IPXE_DIR, packaged_ipxe_dir
from pixiebox.events import Kind
from pixiebox.store.state import StateStore
from testoslab import lab_toml_for_testos
from trixiefiles import on_ci, trixie_file_or_skip

SUBNET = "10.82.0.0/24"
AGENT_IP = "10.82.0.2"
ARM_MAC, ARM_IP = "52:54:00:82:00:01", "10.82.0.31"
#: AAVMF under TCG on a loaded 2-core machine: firmware start, PXE, 1 MB of iPXE over TFTP.
TIMEOUT = 600.0
INIT = "iPXE initialising devices"


@pytest.fixture
def arm_require(netlab_require: Callable[..., None]) -> Path:
    """trixie's arm64 iPXE as build.sh unpacked it; skips (fails on CI) without it or QEMU."""
    netlab_require(armvm.QEMU_AARCH64)
    problem = armvm.prerequisite_problem()
    if problem and on_ci():
        pytest.fail(f"CI=true but an arm64 VM prerequisite is missing: {problem}", pytrace=False)
    if problem:
        pytest.skip(problem)
    return trixie_file_or_skip("ipxe", "usr/lib/ipxe/ipxe-arm64.efi")


def test_arm64_uefi_pxe_gets_trixies_arm64_ipxe_and_runs_its_script(
    arm_require: Path, segment: netlab.Segment, workdir: Path,
    record_property: Callable[[str, object], None],
) -> None:  # fmt: skip
    assets = workdir / "assets"
    (assets / "testos").mkdir(parents=True)
    shutil.copyfile(arm_require, assets / "testos" / "vmlinuz")  # an arm64 EFI payload
    (assets / "testos" / "initrd").write_bytes(b"stand-in initrd " * 1000)
    config = lab_toml_for_testos("arm64-uefi", SUBNET, workdir) + (
        f'[[machines]]\nname = "arm1"\nmac = "{ARM_MAC}"\nip = "{ARM_IP}"\n'
    )
    agent = start_agent(segment.add_host("agent", ip=f"{AGENT_IP}/24"), config, workdir)
    vm = armvm.start_arm64_vm(segment, "arm1", ARM_MAC, workdir=workdir)
    try:
        # The agent's script, echoed by the iPXE it served: ${buildarch} is the running build's.
        text = vm.wait_console(
            "Pixiebox: arm1 (52:54:00:82:00:01) boots image osie on arm64", TIMEOUT
        )
        script_seconds = vm.elapsed()
        text = vm.wait_console("Pixiebox: starting the kernel", TIMEOUT - script_seconds)
        started = text.index("Pixiebox: starting the kernel")
        # The payload runs: the second iPXE on this console, started by the first.
        netlab.wait_until(
            lambda: INIT in vm.console_text()[started:], TIMEOUT - vm.elapsed(), 0.5, "payload"
        )
        payload_seconds = vm.elapsed()
        text = vm.console_text()
    finally:
        vm.stop()
    assert text.count(INIT) >= 2, text[-3000:]
    assert "iPXE" in text and "Start PXE over IPv4" in text, text[-3000:]
    log = agent.text()
    assert f"offered {ARM_IP} with boot file ipxe-arm64.efi" in log, log[-3000:]
    assert f"from {arm_require})" in log, log[-3000:]  # trixie's package, as build.sh unpacked it
    store = StateStore(workdir / "state")
    try:
        events = store.events(ARM_MAC)
    finally:
        store.close()
    offered = [e for e in events if e.kind in (Kind.DHCP_OFFER, Kind.DHCP_ACK)]
    assert any(e.get("boot_file") == "ipxe-arm64.efi" for e in offered), offered
    sent = [e for e in events if e.kind == Kind.TFTP_SENT and e.get("file") == "ipxe-arm64.efi"]
    assert sent and sent[0].get("bytes") == arm_require.stat().st_size, events
    kinds = {(e.kind, e.get("file")) for e in events}
    assert (Kind.HTTP_SCRIPT, f"/boot/{ARM_MAC}.ipxe") in kinds, events
    assert (Kind.HTTP_KERNEL, "/assets/testos/vmlinuz") in kinds, events
    assert (Kind.HTTP_INITRD, "/assets/testos/initrd") in kinds, events
    record_property("boot_seconds", {"script": round(script_seconds, 1),
                                     "payload": round(payload_seconds, 1)})  # fmt: skip
    print(f"\narm64 UEFI: power-on to the agent's script running in iPXE in {script_seconds:.1f} s,"
          f" to the arm64 payload it started in {payload_seconds:.1f} s")  # fmt: skip


def test_the_agent_serves_trixies_ipxe_only_once_build_sh_unpacked_all_of_it(
    tmp_path: Path,
) -> None:
    unpacked = tmp_path / "ipxe_1.21.1+git20250501.dad20602+dfsg-1"
    assert packaged_ipxe_dir(None) == SYSTEM_IPXE_DIR  # not pinned
    assert packaged_ipxe_dir(unpacked) == SYSTEM_IPXE_DIR  # not fetched
    (unpacked / "usr" / "lib" / "ipxe").mkdir(parents=True)
    assert packaged_ipxe_dir(unpacked) == SYSTEM_IPXE_DIR  # dpkg-deb -x under way: no .unpacked
    (unpacked / ".unpacked").touch()
    assert packaged_ipxe_dir(unpacked) == unpacked / "usr" / "lib" / "ipxe"
