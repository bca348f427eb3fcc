"""What the appliance image does before the agent starts: its own network, from lab.toml.

The appliance boots from a USB stick whose lab.toml (on the FAT partition, so any laptop can
edit it) says which interface faces the lab and which address the appliance has there. That
address must be on the interface before the agent starts, and the file may be broken: then the
console says exactly what is wrong (the same words as `pixiebox check`) and the appliance still
comes up with DHCP on every Ethernet port, so that it can be reached over SSH to fix it.

    python3 -m pixiebox.cli.appliance prepare --config /efi/pixiebox/lab.toml \
        --network-dir /run/systemd/network

is run by pixiebox-prepare.service before systemd-networkd.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from pixiebox.config import LabConfig, check_config, error_count, format_problem
from pixiebox.store.private import private_dir, replace_file

NETWORK_FILE = "10-pixiebox.network"

# When lab.toml cannot be used: every wired port asks the home router for an address (an
# appliance nobody can reach cannot be fixed without a screen).
FALLBACK_NETWORK = """\
# Written by pixiebox-prepare: lab.toml could not be used, so every Ethernet port uses DHCP.
[Match]
Type=ether
Name=eth* en*

[Network]
DHCP=ipv4
"""


def network_unit(config: LabConfig) -> str:
    """The systemd-networkd unit for [network] interface.

    With server_ip set, the address is static (in reservation and full mode the appliance is
    the DHCP server and cannot lease its own address; in proxy mode the user chose an address
    that the lab's machines and DNS will be told about, so it must not wander). Without it,
    the home router's DHCP gives the appliance its address and the agent reads it from the
    interface."""
    network = config.network
    lines = [
        "# Written by pixiebox-prepare from lab.toml [network]; edit lab.toml, not this file.",
        "[Match]",
        f"Name={network.interface}",
        "",
        "[Network]",
        # The lab interface is needed for boot services even with no carrier yet (the switch
        # may power up after the appliance).
        "ConfigureWithoutCarrier=yes",
        "LinkLocalAddressing=no",
        "IPv6AcceptRA=no",
    ]
    if network.server_ip is None:
        lines.append("DHCP=ipv4")
        return "\n".join(lines) + "\n"
    prefix = network.subnet.prefixlen if network.subnet is not None else 24
    lines.append(f"Address={network.server_ip}/{prefix}")
    if network.gateway is not None:
        lines.append(f"Gateway={network.gateway}")
    for server in network.dns:
        lines.append(f"DNS={server}")
    if config.lab.domain:
        lines.append(f"Domains={config.lab.domain}")
    return "\n".join(lines) + "\n"


def install_root_keys(keys: list[str], path: Path) -> None:
    """root's authorized_keys on the appliance: the same [boot] ssh_keys the nodes get, so the
    person who wrote lab.toml can log into the appliance too. Replaced on every boot, so a key
    removed from lab.toml is removed here."""
    private_dir(path.parent)  # ~/.ssh: sshd's StrictModes wants it no looser than 0700
    # 0600 from the first byte: a file chmodded after writing can be opened for writing in
    # between (with umask 000), and the descriptor kept to add a key later.
    replace_file(path, "".join(key.strip() + "\n" for key in keys if key.strip()))


def prepare(
    config_path: Path,
    network_dir: Path,
    root_keys: Path | None = None,
    console: TextIO = sys.stdout,
) -> int:
    """Write the appliance's network unit (and root's SSH keys); print lab.toml's problems.
    0 if lab.toml is usable."""
    config, problems = check_config(config_path)
    for problem in problems:
        print(f"pixiebox: {format_problem(config_path, problem)}", file=console)
    errors = [p for p in problems if p.severity == "error"]
    network_dir.mkdir(parents=True, exist_ok=True)
    target = network_dir / NETWORK_FILE
    if config is None or errors:
        print(
            f"pixiebox: {config_path} has {error_count(problems)} error(s); the lab's boot "
            "services stay "
            "off until it is fixed. Every Ethernet port uses DHCP meanwhile, so you can log in "
            "over SSH and edit it (or edit it on the stick's PIXIEBOX partition from a laptop).",
            file=console,
        )
        text = FALLBACK_NETWORK
    else:
        text = network_unit(config)
        if root_keys is not None:
            install_root_keys(config.boot.ssh_keys, root_keys)
        where = config.network.server_ip or "an address from DHCP"
        print(
            f"pixiebox: {config_path} is valid; {config.network.interface} gets {where}",
            file=console,
        )
    temporary = target.with_suffix(".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(target)
    return 0 if config is not None and not errors else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m pixiebox.cli.appliance")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="write the appliance's network unit from lab.toml")
    prep.add_argument("--config", type=Path, required=True)
    prep.add_argument("--network-dir", type=Path, default=Path("/run/systemd/network"))
    prep.add_argument("--root-keys", type=Path, default=None, help="write [boot] ssh_keys here")
    args = parser.parse_args(argv)
    return prepare(args.config, args.network_dir, args.root_keys)


if __name__ == "__main__":
    sys.exit(main())
