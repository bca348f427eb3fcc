"""Run the real agent (`pixiebox serve`) inside a test namespace."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import netlab
from pixiebox.events import Event
from pixiebox.store.state import StateStore

READY = "Pixiebox serving"


def lab_toml(
    *,
    mode: str,
    subnet: str,
    assets: Path,
    state: Path,
    machines: Sequence[tuple[str, str, str | None]] = (),
    gateway: str | None = None,
    pool: str | None = None,
    lease_time: str = "1h",
    unknown: str = "discover",
    extra_network: str = "",
) -> str:
    """A lab.toml for a test: machines are (name, mac, ip or None)."""
    lines = [
        "[lab]",
        'name = "test"',
        'domain = "lab.test"',
        "[network]",
        'interface = "eth0"',
        f'subnet = "{subnet}"',
        f'dhcp_mode = "{mode}"',
        f'lease_time = "{lease_time}"',
        'dhcp_probe_time = "2s"',
        *([f'gateway = "{gateway}"', f'dns = ["{gateway}"]'] if gateway else []),
        *([f'pool = "{pool}"'] if pool else []),
        extra_network,
        "[boot]",
        f'unknown = "{unknown}"',
        f'assets = "{assets}"',
        "[state]",
        f'dir = "{state}"',
        "[http]",
        'listen = ":80"',
    ]
    for name, mac, ip in machines:
        lines += ["[[machines]]", f'name = "{name}"', f'mac = "{mac}"']
        if ip:
            lines.append(f'ip = "{ip}"')
    return "\n".join(lines) + "\n"


@dataclass
class RunningAgent:
    host: netlab.Host
    config: Path
    proc: subprocess.Popen[bytes] = field(init=False)
    log: Path = field(init=False)

    def start(self, ready: str | None = READY, timeout: float = 20.0) -> RunningAgent:
        self.log = self.host.log_path("agent")
        argv = [sys.executable, "-m", "pixiebox.cli", "serve", "--config", str(self.config),
                "--log-level", "debug"]  # fmt: skip
        self.proc = self.host.popen(argv, self.log)
        if ready is not None:
            self.wait_log(ready, timeout)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        def seen() -> str | None:
            text = self.text()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n{text[-3000:]}")
            return None

        return netlab.wait_until(seen, timeout, 0.1, f"agent log never said {needle!r}:\n"
                                 f"{self.text()[-3000:]}")  # fmt: skip

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Stop it as an operator would (SIGTERM / Ctrl-C) and return its exit status."""
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            self.host.segment.stop(self.proc)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)


def start_agent(
    host: netlab.Host, config_text: str, workdir: Path, ready: str | None = READY
) -> RunningAgent:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"lab-{host.role}.toml"
    config.write_text(config_text)
    return RunningAgent(host, config).start(ready)


def recorded(state: Path, mac: str) -> list[Event]:
    """`mac`'s events as the running agent stored them in its [state] dir `state` (what its API
    lists)."""
    store = StateStore(state)
    try:
        return store.events(mac)
    finally:
        store.close()
