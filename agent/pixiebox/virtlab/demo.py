"""`pixiebox demo`: the virtual lab, for anyone without a rack of NUCs.

On this one machine: a private bridge in network namespaces, a "home router" (dnsmasq handing
out addresses only), the Pixiebox agent in proxy mode, and QEMU machines (BIOS and UEFI; with
--arm64 also an arm64 UEFI one, a mixed lab) that PXE-boot from it, shown live until they are all
up, Ctrl-C, or the timeout; then everything the demo made is removed (unless --keep). It is the
same machinery the VM tests use. Which machines, and the lab.toml written for them: demo_plan.

Every VM is under power control, as a NUC with a smart plug would be: `on` by Wake-on-LAN (a
responder on the lab bridge plays the VMs' NICs and powers them on through QMP), `off` by the
qemu driver on their QMP sockets. With --power-cycle, once all are up the demo runs
`pixiebox lab down` and then `pixiebox lab up`, and the whole lab boots a second time.

The stages shown are read from the agent's event stream (its API's server-sent events), by
kind only, and from the VMs' serial consoles: never from the agent's log, whose sentences are
for people and may be reworded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from pixiebox.client.api import ApiClient, ApiRefused, ApiUnreachable
from pixiebox.client.follow import Follower
from pixiebox.config.schema import DEFAULT_API_PORT
from pixiebox.events import Kind
from pixiebox.virtlab import appliance_lab, arm, demo_access, forward, netns, vm, wake
from pixiebox.virtlab.demo_plan import (
    AGENT_IP,
    ARM64_TESTOS,
    DEMO_KEY,
    ROUTER_IP,
    ROUTER_RANGE,
    Machine,
    arm64_problem,
    default_arm64_os,
    lab_toml,
    label_width,
    memory_for,
    plan,
    qmp_socket,
    user_keys,
)
from pixiebox.virtlab.demo_plan import (
    DemoError as DemoError,  # re-exported: the CLI catches demo.DemoError
)

READY = "Pixiebox serving"
#: What the machines boot: the real OSIE (build.sh osie), or with --test-os the busybox test OS.
OSIE = Path("out/osie")
TEST_OS = Path("out/testos")
#: The agent's API port: [api] listen is unset in the demo's lab.toml, so the API answers on
#: the lab address and on 127.0.0.1 in the agent's namespace, where the demo follows its event
#: stream and runs the CLI.
API_PORT = DEFAULT_API_PORT


@dataclass(frozen=True, slots=True)
class Stage:
    """A stage of a boot, reached at the first agent event of one of `kinds` for the machine,
    or when `console` shows up on its serial console (the kernel's, which the agent cannot see)."""

    name: str
    kinds: frozenset[str] = frozenset()
    console: str | None = None


#: The stages a machine goes through. The same for the real OSIE and the small test OS (which
#: fetches no metadata: that stage is then skipped); `up` is the phone-home both send.
STAGES: tuple[Stage, ...] = (
    Stage("DHCP", frozenset({Kind.DHCP_OFFER, Kind.DHCP_ACK})),
    Stage("TFTP", frozenset({Kind.TFTP_SENT})),  # UEFI's own PXE client fetching ipxe.efi
    Stage("script", frozenset({Kind.HTTP_SCRIPT})),
    Stage("kernel", frozenset({Kind.HTTP_KERNEL})),
    Stage("initrd", frozenset({Kind.HTTP_INITRD})),
    Stage("OS", console="Run /init as init process"),
    Stage("metadata", frozenset({Kind.METADATA_SENT})),
    Stage("up", frozenset({Kind.OS_UP})),
)


class Display:
    """Live progress: a redrawn table on a terminal, one line per change otherwise."""

    def __init__(self, machines: list[Machine], stream: object = sys.stdout) -> None:
        self.machines = machines
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._drawn = 0

    def _write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)  # type: ignore[call-overload]

    def change(self, machine: Machine, stage: str, seconds: float) -> None:
        if not self.tty:
            self._write(f"[{seconds:5.1f}s] {machine.label}: {stage}")

    def redraw(self, started: float) -> None:
        if not self.tty:
            return
        names = [s.name for s in STAGES]
        width = label_width(self.machines)
        lines = [
            f"Pixiebox virtual lab, {time.monotonic() - started:5.1f}s",
            f"{'machine':<{width}} {'stage':<8} " + " ".join(f"{n:>7}" for n in names),
        ]
        for m in self.machines:
            cells = " ".join(
                f"{m.seconds[n]:>6.1f}s" if n in m.seconds else f"{'.':>7}" for n in names
            )
            lines.append(f"{m.label:<{width}} {m.stage:<8} {cells}")
        if self._drawn:
            self._write(f"\033[{self._drawn}F\033[J" + "\n".join(lines))
        else:
            self._write("\n".join(lines))
        self._drawn = len(lines)


def agent_events(host: netns.Host, port: int = API_PORT) -> Follower:
    """The agent's event stream (its API's server-sent events, replayed from the first event),
    read by a power.follow.Follower whose thread lives in the agent's namespace: the demo itself
    runs outside every namespace of the lab."""
    started: list[Follower] = []
    failed: list[str] = []

    def start() -> None:
        try:
            forward.enter_namespace(host.name)
            client = ApiClient(f"http://127.0.0.1:{port}")
            client.call("GET", "/api/v1/machines")  # says why, should the API not answer
            started.append(Follower(client).start())
        except (OSError, ApiUnreachable, ApiRefused) as exc:
            failed.append(str(exc))

    # A thread of its own enters the namespace and ends there; the Follower's thread, started
    # from it, stays in the agent's namespace, and this one never leaves the demo's.
    opener = threading.Thread(target=start, name="demo-events", daemon=True)
    opener.start()
    opener.join()
    if failed or not started:
        raise DemoError(f"cannot follow the agent's events: {failed[0] if failed else '?'}")
    return started[0]


def _pending(events: Follower, wait: float) -> list[dict[str, Any]]:
    """The events that arrived, waiting up to `wait` seconds for the first one."""
    found: list[dict[str, Any]] = []
    with contextlib.suppress(queue.Empty):
        found.append(events.events.get(timeout=wait) if wait > 0 else events.events.get_nowait())
        while True:
            found.append(events.events.get_nowait())
    return found


def _reach(machine: Machine, stage: Stage, display: Display) -> None:
    if stage.name in machine.seconds or machine.vm is None:
        return
    seconds = machine.vm.elapsed()
    machine.seconds[stage.name] = seconds
    machine.stage = stage.name
    display.change(machine, stage.name, seconds)


def follow(
    machines: Sequence[Machine], events: Follower, display: Display, wait: float = 0.0
) -> None:
    """Advance each machine's stage from the agent's events (waiting up to `wait` seconds for
    one) and its serial console."""
    by_mac = {machine.mac: machine for machine in machines}
    for event in _pending(events, wait):
        machine = by_mac.get(event["mac"])
        if machine is None:
            continue
        for stage in STAGES:
            if event["kind"] in stage.kinds:
                _reach(machine, stage, display)
        if event["kind"] == Kind.OS_UP and not machine.address:
            machine.address = str(event["fields"].get("ip") or "")
    for machine in machines:
        if machine.vm is None:
            continue
        console = machine.vm.console_text()
        for stage in STAGES:
            if stage.console is not None and stage.console in console:
                _reach(machine, stage, display)


def summary(machines: list[Machine]) -> str:
    width = label_width(machines)
    lines = ["", f"{'machine':<{width}} {'MAC':<18} {'address':<18} power-on to up"]
    for m in machines:
        up = f"{m.seconds['up']:.1f} s" if "up" in m.seconds else f"not up (last: {m.stage})"
        lines.append(f"{m.label:<{width}} {m.mac:<18} {m.address or '-':<18} {up}")
    return "\n".join(lines)


def start_wake_responder(segment: netns.Segment, machines: list[Machine], workdir: Path) -> None:
    """The VMs' "NICs" for Wake-on-LAN: a packet socket on the lab bridge (wake.py) that powers
    a VM on through QMP when the wol driver's magic packet for its MAC goes by."""
    vms = {m.mac: str(m.vm.qmp) for m in machines if m.vm is not None and m.vm.qmp is not None}
    vm_map = workdir / "wake-vms.json"
    vm_map.write_text(json.dumps(vms))
    log = workdir / "wake.log"
    proc = segment.switch.popen(
        [sys.executable, "-m", "pixiebox.virtlab.wake", "--interface", netns.BRIDGE,
         "--map", str(vm_map)], log,
    )  # fmt: skip
    netns.wait_until(
        lambda: wake.READY in log.read_text(errors="replace") or proc.poll() is not None,
        20, 0.1, f"the Wake-on-LAN responder did not start; see {log}",
    )  # fmt: skip
    if proc.poll() is not None:
        raise DemoError(f"the Wake-on-LAN responder exited:\n{log.read_text(errors='replace')}")


def power_cycle(agent_host: netns.Host, config: Path, timeout: float) -> bool:
    """`pixiebox lab down`, then `pixiebox lab up`, as a user would type them (output shown
    as it comes); True when both did all they should."""
    ok = True
    for direction in ("down", "up"):
        print(f"\n$ pixiebox lab {direction}", flush=True)
        argv = ["ip", "netns", "exec", agent_host.name, sys.executable, "-m", "pixiebox.cli.main",
                "lab", direction, "--config", str(config)]  # fmt: skip
        if direction == "up":
            argv += ["--timeout", f"{timeout:g}"]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=2 * timeout + 300)
        except subprocess.TimeoutExpired:
            print(f"pixiebox lab {direction} did not finish", flush=True)
            return False
        ok = ok and done.returncode == 0
    return ok


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def check_prerequisites(testos: Path, arm64_os: Path | None = None) -> None:
    if os.geteuid() != 0:
        raise DemoError("the virtual lab builds network namespaces: run it as root (sudo)")
    problem = netns.prerequisite_problem(("dnsmasq",)) or vm.prerequisite_problem()
    if problem:
        raise DemoError(f"{problem} (sudo ./build.sh demo installs what it needs)")
    for name in ("vmlinuz", "initrd"):
        if not (testos / name).is_file():
            raise DemoError(
                f"no {testos / name}: build the OSIE with sudo ./build.sh osie, or the test OS "
                f"with scripts/build-testos.sh {testos} (sudo ./build.sh demo builds the OSIE, "
                "sudo ./build.sh demo --test-os the test OS)"
            )
    problem = arm64_problem(arm64_os) if arm64_os is not None else None
    if problem:
        raise DemoError(problem)


def start_machine(segment: netns.Segment, machine: Machine, workdir: Path, os_dir: Path) -> vm.VM:
    """Power on `machine`'s VM, booting from the network (it finds `os_dir` through the agent;
    the demo reads only its size, for the RAM it needs)."""
    memory = memory_for(os_dir, machine.arch)
    if machine.arch == "arm64":
        return arm.start_arm64_vm(segment, machine.name, machine.mac, workdir=workdir,
                                  memory_mb=memory)  # fmt: skip
    return vm.start_vm(
        segment, machine.name, machine.mac, firmware=machine.firmware, pxe=machine.pxe,
        workdir=workdir, memory_mb=memory, secure_boot=machine.secure_boot,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    arm64_os = Path(args.arm64_os) if args.arm64_os else None
    if arm64_os is None and args.arm64:
        arm64_os = ARM64_TESTOS if args.test_os else default_arm64_os()
    if args.appliance:
        if arm64_os is not None:
            raise DemoError("--arm64 is for the demo's own agent, not --appliance (yet): "
                            "leave out one of them")  # fmt: skip
        if os.geteuid() != 0:
            raise DemoError("the virtual lab builds network namespaces: run it as root (sudo)")
        try:
            return appliance_lab.run(args, user_keys())
        except appliance_lab.ApplianceError as exc:
            raise DemoError(str(exc)) from None
    testos = Path(args.testos or (TEST_OS if args.test_os else OSIE))
    check_prerequisites(testos, arm64_os)
    machines = plan(args.machines, arm64=arm64_os is not None)
    workdir = Path(tempfile.mkdtemp(prefix="pixiebox-demo-"))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    display = Display(machines)
    segment: netns.Segment | None = None
    dashboard: forward.Forwarder | None = None
    booted = False
    cycled = True
    try:
        segment = netns.Segment(workdir / "segment")
        router = segment.add_host("router", ip=f"{ROUTER_IP}/24")
        netns.start_dnsmasq_router(router, *ROUTER_RANGE, ping_check=False)
        print(f"home router (dnsmasq) at {ROUTER_IP}, handing out {'-'.join(ROUTER_RANGE)}")
        agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
        config = workdir / "lab.toml"
        key = demo_access.make_key(workdir)
        keys = user_keys()
        if key is not None:  # the user's own keys, and the demo's, whose login it prints
            keys = [k for k in keys if k != DEMO_KEY] + [key.public]
        config.write_text(lab_toml(workdir, testos, machines, keys, arm64_os))
        agent_log = workdir / "agent.log"
        agent = agent_host.popen(
            [sys.executable, "-m", "pixiebox.cli.main", "serve", "--config", str(config)], agent_log
        )
        api = f"http://127.0.0.1:{API_PORT}/api/v1/machines"

        def answering() -> bool:  # the API answers once every service is up (agent.run)
            probe = ["curl", "-sf", "-o", "/dev/null", "--max-time", "2", api]
            return agent_host.run(probe, timeout=5, check=False).returncode == 0

        netns.wait_until(
            lambda: agent.poll() is not None or answering(),
            20, 0.2, f"the agent did not start; see {agent_log}",
        )  # fmt: skip
        if agent.poll() is not None:
            raise DemoError(f"the agent exited:\n{agent_log.read_text(errors='replace')[-2000:]}")
        print(f"Pixiebox agent at {AGENT_IP} in proxy mode (log: {agent_log})")
        dashboard = forward.Forwarder(agent_host.name, API_PORT, args.dashboard_port).start()
        print(f"dashboard: {dashboard.url} (this machine only; sign in with the token in "
              f"{workdir / 'api-token'})", flush=True)  # fmt: skip
        events = agent_events(agent_host)
        started = time.monotonic()
        for machine in machines:
            os_dir = arm64_os if machine.arch == "arm64" and arm64_os else testos
            machine.vm = start_machine(segment, machine, workdir, os_dir)
            machine.stage = "on"
            if machine.vm.qmp != qmp_socket(workdir, machine):
                raise DemoError(f"{machine.name}'s QMP socket is {machine.vm.qmp}, not where "
                                "lab.toml says; run the demo from a shorter TMPDIR")  # fmt: skip
            print(f"powered on {machine.label}, MAC {machine.mac}")
        start_wake_responder(segment, machines, workdir)
        deadline = started + args.timeout
        while time.monotonic() < deadline:
            follow(machines, events, display, wait=0.5)
            display.redraw(started)
            if all("up" in m.seconds for m in machines):
                booted = True
                break
        print(summary(machines))
        if booted and args.power_cycle and not power_cycle(agent_host, config, args.timeout):
            print("\nlab down / lab up did not do all it should (see above); consoles and logs: "
                  f"{workdir} (kept)")  # fmt: skip
            args.keep_files = True
            cycled = False
        print("\nwhat the agent knows (pixiebox machines):")
        table = agent_host.run(
            [sys.executable, "-m", "pixiebox.cli.main", "machines", "--config", str(config)],
            check=False,
        )
        print(table.stdout.rstrip() or table.stderr.rstrip())
        if booted:
            reach = demo_access.how_to_reach(
                agent_host, key, workdir, workdir / "state", machines, kept=args.keep
            )
            print(f"\n{reach}")
        if not booted:
            print(f"\nnot every machine was up within {args.timeout:g} s; consoles and logs: "
                  f"{workdir} (kept)")  # fmt: skip
            args.keep_files = True
        elif args.keep:
            print(f"\nthe lab keeps running (--keep). Its agent: ip netns exec {agent_host.name} "
                  f"...; its dashboard: {dashboard.url}; consoles in {workdir}. Ctrl-C stops "
                  "the dashboard and removes everything.", flush=True)  # fmt: skip
            while True:
                follow(machines, events, display, wait=1.0)
        else:
            print("\nall machines booted; removing the lab")
    except KeyboardInterrupt:
        print("\ninterrupted; removing the lab")
    except (DemoError, OSError, AssertionError, netns.CommandError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        args.keep_files = True
    finally:
        if dashboard is not None:
            dashboard.close()  # its thread sits in the agent's namespace: before that goes
        if segment is not None:
            segment.close()
        signal.signal(signal.SIGTERM, previous)
        if getattr(args, "keep_files", False):
            print(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if booted and cycled else 1


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535)")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--appliance", action="store_true",
                        help="boot the appliance disk image itself as a VM (lab.toml written "
                        "onto its FAT partition) and the machines from it")  # fmt: skip
    parser.add_argument("--appliance-image", default="out/appliance/appliance.raw",
                        help="the image for --appliance (./build.sh appliance)")  # fmt: skip
    parser.add_argument("--machines", type=int, default=2, choices=range(1, 11),
                        metavar="N", help="how many QEMU machines (1-10, default 2)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds until every machine must be up (default 300)")  # fmt: skip
    parser.add_argument("--keep", action="store_true",
                        help="leave the lab running after it booted, until Ctrl-C")  # fmt: skip
    parser.add_argument("--dashboard-port", type=_port, default=forward.DEFAULT_PORT,
                        metavar="PORT",
                        help="the port on 127.0.0.1 where this machine's browser reaches the "
                        "agent's dashboard (default 8080, or a free one when that is taken; "
                        "0: any free one)")  # fmt: skip
    parser.add_argument("--power-cycle", action="store_true",
                        help="once all are up, run pixiebox lab down, then lab up (the lab "
                        "boots a second time, powered on by Wake-on-LAN)")  # fmt: skip
    parser.add_argument("--os", "--testos", dest="testos", default=None, metavar="DIR",
                        help="directory with the vmlinuz and initrd the machines boot (default "
                        f"{OSIE}: the real OSIE, ./build.sh osie)")  # fmt: skip
    parser.add_argument("--test-os", action="store_true",
                        help=f"boot the small busybox test OS ({TEST_OS}, "
                        "scripts/build-testos.sh) instead of the OSIE: it is up in half the "
                        "time, but has no SSH, Kubernetes or telemetry")  # fmt: skip
    parser.add_argument("--arm64", action="store_true",
                        help="add an arm64 UEFI machine (QEMU's virt board with AAVMF) after "
                        "the x86 ones: a mixed lab")  # fmt: skip
    parser.add_argument("--arm64-os", default=None, metavar="DIR",
                        help="directory with the arm64 machine's vmlinuz and initrd (implies "
                        "--arm64; default out/osie-arm64 once ./build.sh osie --arch arm64 "
                        "built it, else out/testos-arm64)")  # fmt: skip
