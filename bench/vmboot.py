"""Virtual lab boots: QEMU (TCG) machines power on and PXE-boot the test OS from a Pixiebox agent
in proxy mode beside a dnsmasq home router, exactly as `pixiebox demo` does (its plan, lab.toml
and stage tracking are reused); the time is from power-on to the test OS saying it is up.

`vm-secure-boot` puts the two x86-64 UEFI chains side by side (issue 16): one UEFI machine
(EDK2's own PXE, no option ROM) through the iPXE chain (firmware PXE → ipxe.efi → script →
kernel and initrd), then one with Secure Boot enforcing through the signed chain (firmware PXE →
shim → signed GRUB → its grub.cfg-<mac> → kernel and initrd), taking turns round by round. The
signed chain's firmware is trixie's Secure Boot OVMF (SMM, Microsoft's keys), the iPXE chain's
bookworm's plain OVMF: what each chain needs, so the firmware is part of the difference.

`vm-osie` puts the real OSIE beside the test OS (issue 17: the OSIE within 2x the test OS's
time): one machine (the demo's first, BIOS with the iPXE ROM) boots each in turn, round by
round, from power-on to its phone-home `up` (the OSIE's after it fetched its metadata).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pixiebox.core.trixie import trixie_file
from pixiebox.virtlab import demo, demo_access, netns, vm

from .lab import ROOT, BenchError

CHAINS = "vm-secure-boot"
OSIE = "vm-osie"
KEYS = ("vm-1", "vm-10", CHAINS, OSIE)
#: vm-osie's servers, the anchor first, and what each boots (under ROOT/out).
OS_SERVERS = (("test-os", "testos"), ("osie", "osie"))
#: Seconds the OSIE may take to be up under TCG on a busy machine (about 50 s on a quiet one).
OSIE_TIMEOUT = 300.0
#: vm-secure-boot's servers: (name, Secure Boot on); the first is the anchor.
CHAIN_SERVERS = (("ipxe-chain", False), ("signed-chain", True))
#: Seconds a UEFI machine may take to be up: OVMF under TCG with SMM is slow to start, and the
#: machine is shared with whatever else runs.
CHAIN_TIMEOUT = 300.0
#: What Debian's kernel logs when the firmware booted it with Secure Boot enforcing: without it
#: a signed-chain time would be the chain's without its checks.
ENFORCING = "Secure boot enabled"


def works() -> list[dict[str, Any]]:
    """The group's works, as bench.run.Work keyword arguments."""
    return [
        {"key": "vm-1", "group": "vm", "title": "VM power-on to up (TCG), 1 VM", "unit": "s",
         "higher_better": False, "servers": ("pixiebox",), "target": ("value", 30.0)},
        {"key": "vm-10", "group": "vm", "unit": "s", "higher_better": False,
         "title": "VM power-on to up (TCG), 10 at once: the slowest", "servers": ("pixiebox",),
         "target": ("value", 120.0)},
        {"key": CHAINS, "group": "vm", "unit": "s", "higher_better": False,
         "title": "UEFI VM power-on to up (TCG): iPXE chain vs Secure Boot (shim, signed GRUB)",
         "servers": tuple(name for name, _ in CHAIN_SERVERS),
         "anchors": (CHAIN_SERVERS[0][0],), "subject": CHAIN_SERVERS[1][0]},
        {"key": OSIE, "group": "vm", "unit": "s", "higher_better": False,
         "title": "VM power-on to up (TCG), 1 BIOS VM: the OSIE vs the test OS",
         "servers": tuple(name for name, _ in OS_SERVERS), "anchors": (OS_SERVERS[0][0],),
         "subject": OS_SERVERS[1][0], "target": ("ratio", 2.0)},
    ]  # fmt: skip


class Bench(Protocol):
    log: list[str]
    workdir: Path
    args: Any

    def say(self, text: str) -> None: ...
    def sample(self, key: str, server: str, measure_one: Callable[[], float]) -> None: ...


def ensure_testos(testos: Path) -> None:
    if (testos / "vmlinuz").is_file() and (testos / "initrd").is_file():
        return
    print(f"building the test OS in {testos} (scripts/build-testos.sh)", flush=True)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-testos.sh"), str(testos)], timeout=1800, check=False
    )
    if result.returncode != 0:
        raise BenchError("the test OS did not build (see above)")


def run_rounds(bench: Bench, keys: list[str]) -> None:
    """The vm group's works among `keys`: vm-1 and vm-secure-boot twice at most (a VM boot
    takes a minute or more), vm-10 once."""
    testos = ROOT / "out" / "testos"
    ensure_testos(testos)
    rounds = min(bench.args.rounds, 2)
    for count, key, timeout in ((1, "vm-1", 120.0), (10, "vm-10", 300.0)):
        if key not in keys:
            continue
        for index in range(rounds if count == 1 else 1):
            bench.say(f"vm: {count} machine(s), round {index + 1}")
            boot_them = functools.partial(
                boot, count, bench.workdir / f"vm-{count}", testos, timeout, bench.log
            )
            # The slowest machine: when it is up, the whole lab is.
            bench.sample(key, "pixiebox", functools.partial(_slowest, boot_them))
    for index in range(rounds if CHAINS in keys else 0):
        # Taking turns, as the servers of the other groups do: a busy spell hits both chains.
        for server, secure_boot in CHAIN_SERVERS:
            bench.say(f"vm: 1 UEFI machine, {server}, round {index + 1}")
            boot_it = functools.partial(
                boot, 1, bench.workdir / f"vm-{server}", testos, CHAIN_TIMEOUT, bench.log,
                firmware="uefi", secure_boot=secure_boot,
            )  # fmt: skip
            bench.sample(CHAINS, server, functools.partial(_slowest, boot_it))
    for index in range(rounds if OSIE in keys else 0):
        for server, directory in OS_SERVERS:
            os_dir = ROOT / "out" / directory
            if not (os_dir / "initrd").is_file():
                raise BenchError(f"no {os_dir / 'initrd'}: sudo ./build.sh osie builds the OSIE")
            bench.say(f"vm: 1 machine, {server}, round {index + 1}")
            boot_it = functools.partial(
                boot, 1, bench.workdir / f"vm-{server}", os_dir, OSIE_TIMEOUT, bench.log,
                report_ram=server == "osie",
            )  # fmt: skip
            initrd_mb = (os_dir / "initrd").stat().st_size / 2**20
            bench.log.append(f"  {server}: initrd {initrd_mb:.1f} MB (compressed)")
            bench.sample(OSIE, server, functools.partial(_slowest, boot_it))


def _slowest(boot_them: Callable[[], list[float]]) -> float:
    return max(boot_them())


def _ram_in_use(
    agent_host: netns.Host, key: demo_access.DemoKey, workdir: Path, machines: list[demo.Machine]
) -> list[str]:
    """A log line per machine that is up: MB of RAM in use once up (processes', and tmpfs's
    where the unpacked OS lives: free's used + shared), read over SSH as the demo logs in."""
    known_hosts = demo_access.write_known_hosts(workdir, workdir / "state", machines)
    lines = []
    for m in machines:
        if not m.address:
            continue
        command = demo_access.login_command(agent_host, key, known_hosts, m.address)
        done = subprocess.run(
            [*shlex.split(command), "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
             "free -m | awk '/^Mem:/ {print $2, $3 + $5}'"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            lines.append(f"  {m.name}: no SSH login ({done.stderr[-200:]})")
            continue
        total, used = [*done.stdout.split(), "?", "?"][:2]
        lines.append(f"  {m.name}: {used} MB of {total} MB RAM in use once up")
    return lines


def secure_boot_problem() -> str | None:
    """Why a machine with Secure Boot cannot boot here (None if it can): trixie's Secure Boot
    OVMF, shim and signed GRUB are unpacked by `./build.sh trixie`, not installed."""
    try:
        demo.signed_chain_sources()
        for firmware_file in (vm.SECBOOT_CODE, vm.SECBOOT_VARS):
            trixie_file("ovmf", firmware_file)
    except FileNotFoundError as exc:
        return str(exc)
    return None


def boot(
    count: int, workdir: Path, testos: Path, timeout: float, log: list[str], *,
    firmware: vm.Firmware | None = None, pxe: vm.Pxe = "native", secure_boot: bool = False,
    report_ram: bool = False,
) -> list[float]:  # fmt: skip
    """Power on `count` machines at once; each one's seconds from power-on to up (inf if not
    up within `timeout`). Without `firmware` they are the demo's (BIOS and UEFI alternately);
    with it every machine has that firmware, `pxe` and `secure_boot`. With `report_ram`, each
    machine that is up is logged into (the demo's way, demo_access) and its RAM in use logged."""
    problem = netns.prerequisite_problem(("dnsmasq",)) or vm.prerequisite_problem()
    if not problem and secure_boot:
        problem = secure_boot_problem()
    if problem:
        raise BenchError(problem)
    workdir.mkdir(parents=True, exist_ok=True)
    machines = demo.plan(count)
    if firmware is not None:
        machines = [
            dataclasses.replace(m, firmware=firmware, pxe=pxe, secure_boot=secure_boot)
            for m in machines
        ]
    segment = netns.Segment(workdir / "segment")
    try:
        router = segment.add_host("router", ip=f"{demo.ROUTER_IP}/24")
        netns.start_dnsmasq_router(router, *demo.ROUTER_RANGE, ping_check=False)
        agent_host = segment.add_host("agent", ip=f"{demo.AGENT_IP}/24")
        config = workdir / "lab.toml"
        key = demo_access.make_key(workdir) if report_ram else None
        keys = [key.public] if key is not None else [demo.DEMO_KEY]
        config.write_text(demo.lab_toml(workdir, testos, machines, keys))
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
                secure_boot=machine.secure_boot,
                memory_mb=demo.memory_for(testos),
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
            if "up" not in m.seconds and m.vm is not None:  # why, before the workdir goes
                log.append(f"  {m.name} not up; its console ends:\n{m.vm.console_text()[-1500:]}")
        if key is not None:
            log.extend(_ram_in_use(agent_host, key, workdir, machines))
        for m in machines:
            if m.secure_boot and "up" in m.seconds and m.vm is not None:
                if ENFORCING not in m.vm.console_text():
                    raise BenchError(f"{m.name} was up, but its kernel never said {ENFORCING!r}")
                log.append(f"  {m.name}: its kernel says {ENFORCING!r}")
        return times
    finally:
        segment.close()
        shutil.rmtree(workdir, ignore_errors=True)
