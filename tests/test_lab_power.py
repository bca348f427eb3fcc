"""`pixiebox lab up` and `lab down` on the virtual lab: two QEMU machines (TCG) that start
powered off, powered through their QMP sockets by the qemu driver. `lab up` switches both on
(staggered), each PXE-boots the test OS from the agent and phones home, and the readiness report
gives each one's time to `up`; `lab down` switches both off, seen as QEMU's run state.

Slow (two network boots under TCG), so one test with generous timeouts; times are printed and
recorded as the `lab_up_seconds` property, never asserted."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import netlab
import pytest
import vmlab
from agentproc import start_agent
from testoslab import install_testos, lab_toml_for_testos

SUBNET = "10.84.0.0/24"
AGENT_IP = "10.84.0.2"
NODES = {"node1": ("52:54:00:84:00:01", "10.84.0.31"), "node2": ("52:54:00:84:00:02", "10.84.0.32")}
BOOT_TIMEOUT = 400  # seconds per machine: firmware + iPXE + 10 MB over TCG on a busy machine


@pytest.fixture
def vm_require(netlab_require: Callable[..., None]) -> None:
    netlab_require(vmlab.QEMU)


def lab_config(workdir: Path, testos: tuple[Path, Path], qmp: dict[str, Path]) -> str:
    install_testos(workdir, testos)
    machines = "".join(
        f'[[machines]]\nname = "{name}"\nmac = "{mac}"\nip = "{ip}"\n'
        f'power = {{ driver = "qemu", qmp = "{qmp[name]}" }}\n'
        for name, (mac, ip) in NODES.items()
    )
    # A machine without power control: lab up and down list it as skipped.
    machines += '[[machines]]\nname = "manual"\nmac = "52:54:00:84:00:09"\nip = "10.84.0.39"\n'
    sections = (
        f'[api]\nlisten = "0.0.0.0:8080"\ntoken_file = "{workdir / "api-token"}"\n'
        '[power]\nstagger = "2s"\noff_timeout = "60s"\n'
    )
    return lab_toml_for_testos("lab-power-test", SUBNET, workdir, sections=sections) + machines


def test_lab_up_boots_both_machines_and_lab_down_stops_them(
    vm_require: None, testos: tuple[Path, Path], segment: netlab.Segment, workdir: Path,
    record_property: Callable[[str, object], None],
) -> None:  # fmt: skip
    vms = {
        name: vmlab.start_vm(segment, name, mac, firmware="bios", workdir=workdir, powered_on=False)
        for name, (mac, _) in NODES.items()
    }
    qmp = {name: vm.qmp for name, vm in vms.items() if vm.qmp is not None}
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    agent = start_agent(agent_host, lab_config(workdir, testos, qmp), workdir)

    def pixiebox(*args: str) -> tuple[int, str]:
        result = agent_host.run([sys.executable, "-m", "pixiebox.cli", *args, "--config",
                                 str(agent.config)], timeout=2 * BOOT_TIMEOUT + 120,
                                check=False)  # fmt: skip
        assert "Traceback" not in result.stderr, result.stderr
        return result.returncode, result.stdout + result.stderr

    def tails() -> str:
        return "\n".join(vm.tails() for vm in vms.values()) + agent.text()[-3000:]

    # Both start off: the qemu driver reads QEMU's run state (prelaunch).
    for name in NODES:
        code, out = pixiebox("power", name, "status")
        assert code == 0 and f"{name}: off (qemu at {qmp[name]} reads off)" in out, out

    code, out = pixiebox("lab", "up", "--timeout", str(BOOT_TIMEOUT))
    assert code == 0, f"{out}\n{tails()}"
    assert "lab up: 2 of 2 machine(s) with power control up after" in out, out
    times = {}
    for name in NODES:
        row = re.search(rf"^{name}\s+up\s+([\d.]+) s\s+-\s+qemu at ", out, re.M)
        assert row, out
        times[name] = float(row.group(1))
        assert f"power on by qemu at {qmp[name]} sent" in out  # the live view, line by line
    assert re.search(r"^manual\s+skipped\s", out, re.M), out
    assert "no power control: skipped: manual" in out, out
    for name, seconds in times.items():
        print(f"\n{name}: lab up to up in {seconds:.1f} s")
    record_property("lab_up_seconds", times)
    for name, vm in vms.items():
        assert f"PIXIEBOX-TESTOS: up {name}" in vm.console_text()
    listed = json.loads(pixiebox("machines", "--json")[1])
    for machine in listed:
        if machine["name"] in NODES:
            assert (machine["state"], machine["power"]) == ("up", "on"), machine

    # lab up again: both are up already, nothing is switched.
    code, out = pixiebox("lab", "up", "--timeout", "60")
    assert code == 0 and all(re.search(rf"^{n}\s+already up\s", out, re.M) for n in NODES), out

    code, out = pixiebox("lab", "down")
    assert code == 0, f"{out}\n{tails()}"
    assert "lab down: 2 of 2 machine(s) with power control off after" in out, out
    for name in NODES:
        assert re.search(rf"^{name}\s+off\s+[\d.]+ s\s+qemu at ", out, re.M), out
        code, status = pixiebox("power", name, "status")
        assert code == 0 and "reads off" in status, status
    listed = json.loads(pixiebox("machines", "--json")[1])
    assert {m["name"]: (m["state"], m["power"]) for m in listed if m["name"] in NODES} == {
        name: ("off", "off") for name in NODES
    }
    for vm in vms.values():
        assert vm.proc.poll() is None  # off, not gone: QEMU waits to be powered on again
