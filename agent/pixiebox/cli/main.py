"""The `pixiebox` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from pixiebox import config as lab
from pixiebox import doctor
from pixiebox.agent import Agent, StartupError
from pixiebox.client import follow as power_follow
from pixiebox.client.api import ApiClient, ApiRefused, ApiUnreachable
from pixiebox.config import labfile
from pixiebox.config.values import unicast_mac
from pixiebox.core.decision import images_summary, secure_boot_summary
from pixiebox.events import Kind
from pixiebox.net.netif import interface_info, interface_names
from pixiebox.virtlab import demo as virtlab_demo


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help=f"lab.toml to use (default: ${lab.CONFIG_PATH_ENV} or {lab.DEFAULT_CONFIG_PATH})",
    )


def summary(config: lab.LabConfig) -> str:
    network = config.network
    lines = [
        f"lab {config.lab.name!r}, domain {config.lab.domain}",
        f"DHCP: {network.dhcp_mode} mode on {network.interface}"
        + (f", server {network.server_ip}" if network.server_ip else "")
        + (f", subnet {network.subnet}" if network.subnet else "")
        + (f", pool {network.pool}" if network.pool and network.dhcp_mode == "full" else ""),
        f"unknown machines: {config.boot.unknown}; default image: {config.boot.image}; "
        f"images: {', '.join(sorted(config.images))}",
        *images_summary(config),
        secure_boot_summary(config),
        f"machines: {len(config.machines)}",
    ]
    for machine in config.machines:
        power = "+".join(spec.driver for spec in machine.power_chain()) or "-"
        lines.append(
            f"  {machine.name:<16} {machine.mac}  {machine.ip or '-'!s:<15} "
            f"image={machine.image or config.boot.image} power={power}"
        )
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    path = lab.config_path(args.config)
    config, problems = lab.check_config(path)
    if config is not None and interface_info(config.network.interface) is None:
        problems.append(
            lab.Problem(
                ("network", "interface"),
                f"no interface {config.network.interface!r} on this machine "
                f"(it has: {', '.join(interface_names())})",
                "fine if this file is for another machine; "
                "otherwise name the interface facing the lab",
                severity="warning",
                line=lab.line_for(
                    lab.key_lines(path.read_text(encoding="utf-8")), ("network", "interface")
                ),
            )
        )
        problems.sort(key=lambda p: p.line or 0)  # the warning joins the errors in file order
    for problem in problems:
        print(lab.format_problem(path, problem), file=sys.stderr)
    errors = [p for p in problems if p.severity == "error"]
    if config is None or errors:
        print(f"{path}: {lab.error_count(errors)} error(s); nothing was changed", file=sys.stderr)
        return 1
    print(f"{path}: OK")
    print(summary(config))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    agent = Agent(lab.config_path(args.config))
    try:
        asyncio.run(agent.run())
    except lab.ConfigError as exc:
        print(f"cannot start: {exc.path} has errors:\n{exc}", file=sys.stderr)
        return 1
    except StartupError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(
            f"cannot start: {exc}; DHCP needs root (or CAP_NET_BIND_SERVICE and CAP_NET_RAW)",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        # A port taken by another server (dnsmasq, tftpd-hpa, nginx) is the usual cause.
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _client(args: argparse.Namespace) -> ApiClient:
    config = lab.load_config(lab.config_path(args.config))
    return ApiClient.for_config(config, args.api)


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    ago = time.time() - timestamp
    if ago < 120:
        return f"{ago:.0f}s ago"
    if ago < 7200:
        return f"{ago / 60:.0f}m ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def machines_table(machines: list[dict[str, Any]]) -> str:
    rows = [("NAME", "MAC", "IP", "ARCH", "STATE", "LAST SEEN", "POWER")]
    for m in machines:
        # Secure Boot only when on (its OS's own report at the latest phone-home): off is the
        # column's plain meaning; --json tells "off" and null (not reported) apart.
        parts = [" ".join(x for x in (m.get("arch"), m.get("firmware")) if x)]
        if m.get("secure_boot") == "on":
            parts.append("Secure Boot")
        arch = ", ".join(part for part in parts if part) or "-"
        control = "+".join(m.get("power_control") or []) or "no control"
        power = f"{m.get('power', 'unknown')} ({control})"
        rows.append((m.get("name") or "(unknown)", m["mac"], m.get("ip") or "-", arch,
                     m["state"], _when(m.get("last_seen")), power))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)  # fmt: skip


def _event_line(event: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    who = event.get("name") or event["mac"] or "(lab)"
    return f"{stamp} {who:<17} {event['kind']:<10} {event['message']}"


def _api_command(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turns an unreachable agent, a refusal or a bad lab.toml into one clear line."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ApiUnreachable, ApiRefused) as exc:
            print(f"pixiebox: {exc}", file=sys.stderr)
            return 1
        except lab.ConfigError as exc:
            print(f"pixiebox: {exc.path} has errors:\n{exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130

    return wrapped


@_api_command
def cmd_machines(args: argparse.Namespace) -> int:
    machines = _client(args).every_page("/api/v1/machines?limit=500")
    print(json.dumps(machines, indent=2) if args.json else machines_table(machines))
    return 0


@_api_command
def cmd_events(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.machine:
        events = client.call("GET", f"/api/v1/machines/{quote(args.machine)}/events")
    else:  # the lab's own log: refusals of secrets no machine could be named for
        events = client.call("GET", "/api/v1/lab/events")
    for event in events[-args.last :]:
        print(_event_line(event), flush=True)
    if args.follow:
        query = f"?after={events[-1]['id']}" if events else ""
        if args.machine:
            mac = client.call("GET", f"/api/v1/machines/{quote(args.machine)}")["mac"]
            query += ("&" if query else "?") + f"mac={quote(mac)}"
        for event in client.stream(f"/api/v1/events{query}"):
            print(_event_line(event), flush=True)
    return 0


@_api_command
def cmd_enroll(args: argparse.Namespace) -> int:
    try:
        # Said here, before the agent or lab.toml is asked: a multicast, broadcast or zero MAC
        # is a typo or a forged address, never a machine (both would refuse it too).
        unicast_mac(args.mac)
    except ValueError as exc:
        print(f"pixiebox: {exc}", file=sys.stderr)
        return 1
    body: dict[str, str] = {}
    if args.name:
        body["name"] = args.name
    if args.ip:
        body["ip"] = args.ip
    client = _client(args)
    try:
        machine = client.call("POST", f"/api/v1/machines/{quote(args.mac)}/enroll", body)
    except ApiUnreachable:
        # No agent running: edit lab.toml directly (the agent reads it when it starts).
        path = lab.config_path(args.config)
        try:
            done = labfile.enroll(path, args.mac, args.name, args.ip)
        except labfile.EnrollError as exc:
            for problem in exc.problems:
                print(lab.format_problem(path, problem), file=sys.stderr)
            return 1
        print(f"enrolled {done.mac} as {done.name} in {path} (line {done.line}); "
              "no agent is running: it takes effect when it starts")  # fmt: skip
        return 0
    print(f"enrolled {machine['mac']} as {machine['name']}"
          + (f" at {machine['ip']}" if machine.get("ip") else "")
          + "; the running agent uses it now")  # fmt: skip
    return 0


@_api_command
def cmd_doctor(args: argparse.Namespace) -> int:
    options = {"boot_timeout": args.boot_timeout, "settle": args.settle}
    query = urlencode({key: f"{value:g}" for key, value in options.items() if value is not None})
    path = f"/api/v1/machines/{quote(args.machine)}/doctor" + (f"?{query}" if query else "")
    found = _client(args).call("GET", path)
    print(doctor.render_text(found["machine"], found["state"], found["timeline"],
                             found["verdict"], found["ok"]))  # fmt: skip
    return 0 if found["ok"] else 2


def _power_timeout(config: lab.LabConfig, links: int) -> float:
    """How long the CLI waits for the agent's answer to a power action: every link of a chain
    may take its full timeout (a cycle: off and on), plus room for the agent's own pauses."""
    per_link = float(config.power.on_timeout + config.power.off_timeout)
    return per_link * 3 * max(links, 1) + 120.0


@_api_command
def cmd_power(args: argparse.Namespace) -> int:
    config = lab.load_config(lab.config_path(args.config))
    client = ApiClient.for_config(config, args.api)
    machine = client.call("GET", f"/api/v1/machines/{quote(args.machine)}")
    chain = len(machine.get("power_control") or [])
    client = dataclasses.replace(client, timeout=_power_timeout(config, chain))
    path = f"/api/v1/machines/{quote(args.machine)}/power"

    def call() -> dict[str, Any]:
        answer: dict[str, Any] = client.call("POST", path, {"action": args.action})
        return answer

    if args.action == "status" or not chain:
        outcome = call()
    else:
        follower = power_follow.Follower(client, machine["mac"]).start()
        shown = {Kind.POWER_ON, Kind.POWER_OFF, Kind.POWER_CYCLE, Kind.MACHINE_OFF, Kind.OS_UP}

        def show(event: dict[str, Any]) -> None:
            if event["kind"] in shown:
                print(power_follow.event_line(event), flush=True)

        outcome = follower.run_while(call, show)
    print(f"{outcome['machine']}: {outcome['message']}"
          + ("" if args.action == "status" else f" ({outcome['seconds']:.0f} s)"))  # fmt: skip
    return 0 if outcome["outcome"] == "ok" else 2


@_api_command
def cmd_lab(args: argparse.Namespace) -> int:
    config = lab.load_config(lab.config_path(args.config))
    client = ApiClient.for_config(config, args.api)
    machines = client.every_page("/api/v1/machines?enrolled=true&limit=500")
    body: dict[str, float] = {}
    if args.timeout is not None:
        body["timeout"] = args.timeout
    stagger = config.power.stagger
    if args.direction == "up" and args.stagger is not None:
        body["stagger"] = stagger = args.stagger
    each = max(args.timeout or 0.0, _power_timeout(config, max(
        (len(m.get("power_control") or []) for m in machines), default=1)))  # fmt: skip
    client = dataclasses.replace(client, timeout=each + stagger * len(machines))
    table = power_follow.LiveTable(machines, args.direction)
    follower = power_follow.Follower(client).start()
    report: dict[str, Any] = follower.run_while(
        lambda: client.call("POST", f"/api/v1/lab/{args.direction}", body), table.event, table.draw
    )
    table.draw()
    print()
    print(power_follow.render_report(report))
    return 0 if report["ok"] else 2


def _api_arguments(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("--api", default=None, help="the agent's API URL (default: from lab.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixiebox", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate lab.toml and summarise the lab")
    _config_argument(check)
    check.set_defaults(func=cmd_check)
    serve = commands.add_parser("serve", help="run the boot services in the foreground")
    _config_argument(serve)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)
    machines = commands.add_parser("machines", help="every machine and its state (a table)")
    _api_arguments(machines)
    machines.add_argument("--json", action="store_true", help="print JSON instead")
    machines.set_defaults(func=cmd_machines)
    events = commands.add_parser("events", help="a machine's event log; --follow for live events")
    _api_arguments(events)
    events.add_argument(
        "machine",
        nargs="?",
        help="a name or MAC (default: the lab's own log, "
        "e.g. refused secrets, and with --follow every machine's events)",
    )
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--last", type=int, default=50, help="how many past events (default 50)")
    events.set_defaults(func=cmd_events)
    enroll = commands.add_parser("enroll", help="add a machine to lab.toml (comments kept)")
    _api_arguments(enroll)
    enroll.add_argument("mac", help="its MAC, in any usual spelling")
    enroll.add_argument("--name", help="its name (default: the next free nodeN)")
    enroll.add_argument("--ip", help="its fixed address (reservation and full mode)")
    enroll.set_defaults(func=cmd_enroll)
    diagnose = commands.add_parser(
        "doctor", help="why did (or didn't) a machine boot: its last boot attempts and a verdict"
    )
    _api_arguments(diagnose)
    diagnose.add_argument("machine", help="a name or MAC")
    diagnose.add_argument("--boot-timeout", type=float, default=None, metavar="SECONDS",
                          help="how long after the kernel and initrd the OS must phone home "
                          f"(default {doctor.DEFAULT_BOOT_TIMEOUT:g})")  # fmt: skip
    diagnose.add_argument("--settle", type=float, default=None, metavar="SECONDS",
                          help="how long a boot step may go without the next before it counts "
                          f"as stalled (default {doctor.DEFAULT_SETTLE:g})")  # fmt: skip
    diagnose.set_defaults(func=cmd_doctor)
    power = commands.add_parser(
        "power", help="switch a machine on or off, power-cycle it, or read its power",
        description="Through the running agent; the action counts only when its result is seen "
        "(the OS phoning home, the power read off, or silence). Exit status: 0 done and seen, "
        "2 tried but not seen, 1 refused (unknown machine, no power control, busy, token).",
    )  # fmt: skip
    _api_arguments(power)
    power.add_argument("machine", help="a name or MAC")
    power.add_argument("action", choices=["on", "off", "cycle", "status"])
    power.set_defaults(func=cmd_power)
    lab_parser = commands.add_parser(
        "lab", help="lab up: power on every machine and report when each is up; lab down: "
        "power them all off",
    )  # fmt: skip
    lab_commands = lab_parser.add_subparsers(dest="direction", required=True)
    up = lab_commands.add_parser("up", help="power on every machine with power control, "
                                 "staggered, and report each one's time to up")  # fmt: skip
    down = lab_commands.add_parser("down", help="power off every machine with power control "
                                   "(graceful drivers first) and report what is off")  # fmt: skip
    for sub in (up, down):
        _api_arguments(sub)
        sub.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                         help="how long each power attempt may take (default: [power] "
                         "on_timeout / off_timeout)")  # fmt: skip
        sub.set_defaults(func=cmd_lab)
    up.add_argument("--stagger", type=float, default=None, metavar="SECONDS",
                    help="pause between two machines' power-on (default: [power] "
                    "stagger)")  # fmt: skip
    demo = commands.add_parser(
        "demo", help="run the virtual lab: a router, the agent and QEMU machines that PXE-boot"
    )
    virtlab_demo.add_arguments(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        return virtlab_demo.run(args)
    except virtlab_demo.DemoError as exc:
        print(f"cannot run the demo: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
