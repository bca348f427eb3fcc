"""Virtual lab boots: QEMU (TCG) machines power on and PXE-boot the test OS from a Pixiebox agent
in proxy mode beside a dnsmasq home router, exactly as `pixiebox demo` does (its plan, lab.toml
and stage tracking are reused); the time is from power-on to the test OS saying it is up."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pixiebox.virtlab import demo, netns, vm

from .lab import ROOT, BenchError


def ensure_testos(testos: Path) -> None:
    if (testos / "vmlinuz").is_file() and (testos / "initrd").is_file():
        return
    print(f"building the test OS in {testos} (scripts/build-testos.sh)", flush=True)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-testos.sh"), str(testos)], timeout=1800, check=False
    )
    if result.returncode != 0:
        raise BenchError("the test OS did not build (see above)")


def boot(count: int, workdir: Path, testos: Path, timeout: float, log: list[str]) -> list[float]:
    """Power on `count` machines at once; each one's seconds from power-on to up (inf if not
    up within `timeout`)."""
    problem = netns.prerequisite_problem(("dnsmasq",)) or vm.prerequisite_problem()
    if problem:
        raise BenchError(problem)
    workdir.mkdir(parents=True, exist_ok=True)
    machines = demo.plan(count)
    segment = netns.Segment(workdir / "segment")
    try:
        router = segment.add_host("router", ip=f"{demo.ROUTER_IP}/24")
        netns.start_dnsmasq_router(router, *demo.ROUTER_RANGE, ping_check=False)
        agent_host = segment.add_host("agent", ip=f"{demo.AGENT_IP}/24")
        config = workdir / "lab.toml"
        config.write_text(demo.lab_toml(workdir, testos, machines, [demo.DEMO_KEY]))
        agent_log = workdir / "agent.log"
        agent = agent_host.popen(
            [sys.executable, "-m", "pixiebox.cli", "serve", "--config", str(config)], agent_log
        )
        netns.wait_until(
            lambda: demo.READY in agent_log.read_text(errors="replace") or agent.poll() is not None,
            30,
            0.1,
            "agent start",
        )
        if agent.poll() is not None:
            raise BenchError(f"the agent exited: {agent_log.read_text(errors='replace')[-2000:]}")
        display = demo.Display(machines, io.StringIO())
        events = demo.agent_events(agent_host)
        for machine in machines:
            machine.vm = vm.start_vm(
                segment,
                machine.name,
                machine.mac,
                firmware=machine.firmware,
                pxe=machine.pxe,
                workdir=workdir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            demo.follow(machines, events, display)
            if all("up" in m.seconds for m in machines):
                break
            if any(m.vm is not None and m.vm.proc.poll() is not None for m in machines):
                break
            time.sleep(0.25)
        times = [m.seconds.get("up", float("inf")) for m in machines]
        for m in machines:
            log.append(f"  {m.label}: " + ", ".join(f"{k} {v:.1f}s" for k, v in m.seconds.items()))
        return times
    finally:
        segment.close()
        shutil.rmtree(workdir, ignore_errors=True)
