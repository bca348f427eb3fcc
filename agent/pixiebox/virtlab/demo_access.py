"""How the demo's user logs into a node once it is up (issue 17: the demo ends with how to reach
one): SSH from the agent's namespace, the only place on this machine from which the lab's bridge
is reachable, with a key the demo made for the run and the host key the agent keeps for that
machine.

The key is the demo's own, beside the user's keys in lab.toml, so the printed command works
whether or not the user has an SSH key, and works for root, who runs the demo. The node's host
key is not taken on first use: the agent made it and hands it only to that machine at boot
(store.identity), so known_hosts is written from the agent's copy and ssh checks it strictly,
as a user should with any lab machine.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pixiebox.store.identity import HOST_PUBLIC_FILE, IDENTITY_DIR, IdentityStore
from pixiebox.virtlab import netns
from pixiebox.virtlab.demo_plan import Machine

#: How long a TCP probe of a node's SSH port may take.
PROBE_SECONDS = 3.0


@dataclass(frozen=True, slots=True)
class DemoKey:
    private: Path
    public: str


def make_key(workdir: Path) -> DemoKey | None:
    """A fresh ed25519 key for this run (no passphrase: it lives as long as the lab), or None
    when ssh-keygen is missing (the demo then prints no login command)."""
    if shutil.which("ssh-keygen") is None:
        return None
    private = workdir / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pixiebox-demo", "-f", str(private)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return DemoKey(private, private.with_suffix(".pub").read_text().strip())


def known_host_line(state_dir: Path, mac: str, address: str) -> str | None:
    """The known_hosts line for the machine `mac` at `address`, from the host key the agent
    under `state_dir` keeps for it (None: it has made none yet)."""
    public = IdentityStore(state_dir / IDENTITY_DIR).directory(mac) / HOST_PUBLIC_FILE
    if not public.is_file():
        return None
    key_type, key = public.read_text().split()[:2]
    return f"{address} {key_type} {key}\n"


def write_known_hosts(workdir: Path, state_dir: Path, machines: Sequence[Machine]) -> Path:
    """known_hosts for the machines that have an address, from the host keys the agent keeps."""
    lines = [known_host_line(state_dir, m.mac, m.address) if m.address else None for m in machines]
    path = workdir / "known_hosts"
    path.write_text("".join(line for line in lines if line))
    return path


def ssh_listens(agent_host: netns.Host, address: str) -> bool:
    """Whether the machine at `address` accepts TCP on port 22 (the OSIE does; the small test
    OS has no SSH server)."""
    probe = f"import socket; socket.create_connection(({address!r}, 22), {PROBE_SECONDS}).close()"
    done = agent_host.run([sys.executable, "-c", probe], timeout=PROBE_SECONDS + 5, check=False)
    return done.returncode == 0


def login_command(agent_host: netns.Host, key: DemoKey, known_hosts: Path, address: str) -> str:
    """The command (run as root) that logs into the node at `address`."""
    return (
        f"ip netns exec {agent_host.name} ssh -i {key.private} -o IdentitiesOnly=yes "
        f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes root@{address}"
    )


def how_to_reach(
    agent_host: netns.Host, key: DemoKey | None, workdir: Path, state_dir: Path,
    machines: Sequence[Machine], kept: bool,
) -> str:  # fmt: skip
    """What the demo prints once the machines are up: a login command per machine that
    listens for SSH, or why there is none."""
    if key is None:
        return "no ssh-keygen on this machine, so the demo made no key to log into the nodes with"
    known_hosts = write_known_hosts(workdir, state_dir, machines)
    lines, without = [], []
    for machine in machines:
        if machine.address and ssh_listens(agent_host, machine.address):
            lines.append(
                f"  {machine.name}: {login_command(agent_host, key, known_hosts, machine.address)}"
            )
        else:
            without.append(machine.name)
    text = []
    if lines:
        when = (
            "now, while the lab runs"
            if kept
            else "while the lab runs (add --keep to leave it running)"
        )
        text.append(f"log into a node as root, {when}:")
        text.extend(lines)
    if without:
        text.append(
            f"no SSH server answers on {', '.join(without)}: the small test OS has none "
            "(the real OSIE does: leave out --test-os)"
        )
    return "\n".join(text)


__all__ = [
    "DemoKey",
    "how_to_reach",
    "known_host_line",
    "login_command",
    "make_key",
    "write_known_hosts",
]
