"""Run the OSIE's real scripts (overlays/osie/usr/lib/pixiebox/) on this machine, and make the
virtual disks (loop devices over sparse files) they are tested on."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from pixiebox.config import LabConfig
from pixiebox.core.urls import BootUrls
from pixiebox.http.metadata import build_metadata
from pixiebox.store.identity import IdentityStore

REPO = Path(__file__).resolve().parent.parent
OVERLAY = REPO / "overlays" / "osie"
SCRIPTS = OVERLAY / "usr" / "lib" / "pixiebox"
UNITS = OVERLAY / "usr" / "lib" / "systemd" / "system"

MAC = "02:00:00:00:85:31"
IP = "10.85.0.31"
APPLIANCE = "10.85.0.2"
#: On a node: what its root is, whether a new mount namespace can pivot_root off it (as runc
#: does for every container; on the initramfs it fails with EINVAL), and MB of RAM in use:
#: processes' and tmpfs's (`shared`), where the unpacked OS itself lives.
ROOT_CHECKS = (
    "findmnt -n -o FSTYPE /; "
    "unshare -m sh -c 'mount --make-rprivate / && mkdir -p /run/pxb-pivot && "
    "mount -t tmpfs pxb /run/pxb-pivot && mkdir /run/pxb-pivot/old && cd /run/pxb-pivot && "
    "pivot_root . old && echo pivoted' || echo 'pivot_root failed'; "
    "free -m | awk '/^Mem:/ {print $3 + $5}'"
)
USER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOsieTestKeyForPixieboxOnlyAAAAAAAAAAAAA test@lab"
INFLUX_TOKEN = "influx-write-token-85"


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require(*tools: str, root: bool = False, loop: bool = False) -> None:
    """Skip (fail when CI=true) unless the tools are installed, and root / loop devices."""
    problems = [f"{tool} is not installed" for tool in tools if shutil.which(tool) is None]
    if root and os.geteuid() != 0:
        problems.append("needs root (loop devices and mounts)")
    if loop and not Path("/dev/loop-control").exists():
        problems.append("no /dev/loop-control: this kernel or container has no loop devices")
    if problems:
        message = "; ".join(problems)
        if on_ci():
            pytest.fail(f"CI=true but an OSIE test prerequisite is missing: {message}",
                        pytrace=False)  # fmt: skip
        pytest.skip(message)


def metadata(
    tmp_path: Path,
    *,
    server: str | None = f"https://{APPLIANCE}:6443",
    telemetry_url: str | None = f"http://{APPLIANCE}:8086",
    disk: str | None = None,
    format: str = "never",
    **lab: Any,
) -> dict[str, Any]:
    """A metadata document as the agent builds it (pixiebox.http.metadata.build_metadata) for c1."""
    token_file = tmp_path / "influx-token"
    token_file.write_text(INFLUX_TOKEN + "\n")
    machine: dict[str, Any] = {"name": "c1", "mac": MAC, "ip": IP}
    if disk is not None:
        machine |= {"disk": disk, "format": format}
    config = LabConfig(
        lab={"name": "homelab", "domain": "lab.test"} | lab,
        boot={"ssh_keys": [USER_KEY]},
        kubernetes={"server": server},
        telemetry={"url": telemetry_url, "org": "home", "bucket": "lab",
                   "token_file": str(token_file)},
        machines=[machine],
    )  # fmt: skip
    identities = IdentityStore(tmp_path / "state" / "identity")
    token = identities.agent_token() if server else None
    return build_metadata(
        config, BootUrls(IPv4Address(APPLIANCE)), MAC, IPv4Address(IP),
        config.machines[0], identities.for_machine(MAC), token, telemetry_token=INFLUX_TOKEN,
    )  # fmt: skip


def script_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment the scripts run with in tests: files under `root`, nothing else."""
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PIXIEBOX_ROOT": str(root),
        "PIXIEBOX_SANDBOX": "1",
        "PIXIEBOX_RETRY_CAP": "2",
        "PIXIEBOX_MAX_TRIES": "40",
        "PIXIEBOX_DISK_WAIT": "2",
        **extra,
    }


def run_script(
    name: str, root: Path, timeout: float = 120.0, **extra: str
) -> subprocess.CompletedProcess[str]:
    """Run the real script `name` with bash, its output (stdout and stderr) in `.stdout`."""
    return subprocess.run(
        ["bash", str(SCRIPTS / name)],
        env=script_env(root, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_cmdline(root: Path, text: str) -> None:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "cmdline").write_text(text + "\n")


# --------------------------------------------------------------------------- disks


def _run(argv: list[str], input: str | None = None) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True,
                          input=input).stdout  # fmt: skip


@dataclass
class LoopDisk:
    """A sparse file attached to a loop device; `close` detaches it and unmounts it first."""

    image: Path
    device: str = field(init=False)

    def attach(self, size: int) -> LoopDisk:
        with self.image.open("wb") as handle:
            handle.truncate(size)
        self.device = _run(["losetup", "--find", "--show", str(self.image)]).strip()
        return self

    def digest(self) -> str:
        """sha256 of the whole device as read through it (what a write would have changed)."""
        _run(["blockdev", "--flushbufs", self.device])
        digest = hashlib.sha256()
        with open(self.device, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def probe(self) -> Mapping[str, str]:
        """blkid -p's view: TYPE, UUID, LABEL, PTTYPE..."""
        result = subprocess.run(
            ["blkid", "-p", "-o", "export", self.device],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)

    def mounts(self) -> list[str]:
        result = subprocess.run(
            ["findmnt", "-n", "-o", "TARGET", "--source", self.device],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        return result.stdout.split()

    def close(self) -> None:
        for target in reversed(self.mounts()):
            if subprocess.run(["umount", target], timeout=60, check=False).returncode != 0:
                subprocess.run(["umount", "-l", target], timeout=60, check=False)
        subprocess.run(["losetup", "--detach", self.device], timeout=60, check=False)
