"""The `pixiebox` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from . import config as lab
from .agent import Agent, StartupError
from .netif import interface_info, interface_names
from .virtlab import demo as virtlab_demo


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
        f"machines: {len(config.machines)}",
    ]
    for machine in config.machines:
        power = machine.power.driver if machine.power else "-"
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
        print(f"{path}: {len(errors)} error(s); nothing was changed", file=sys.stderr)
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
