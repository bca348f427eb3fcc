"""`sudo ./build.sh demo`, the README's main command, run non-interactively as a newcomer would."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import netlab
import pytest
import vmlab

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo_require(netlab_require: Callable[..., None], testos: tuple[Path, Path]) -> None:
    netlab_require("dnsmasq", vmlab.QEMU)


def demo_namespaces() -> set[str]:
    """Namespaces of any virtual lab except this test run's own."""
    return {n for n in netlab.list_namespaces() if n.startswith(netlab.NS_PREFIX)} - set(
        netlab.leftover_namespaces()
    )


def run_demo(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXIEBOX_")}
    return subprocess.run(
        ["./build.sh", "demo", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.timeout(1600)
def test_build_sh_demo_boots_two_machines_and_removes_everything(demo_require: None) -> None:
    before = demo_namespaces()
    # The real OSIE when build.sh built it (build.sh test does), else the small test OS.
    result = run_demo("--machines", "2", "--timeout", "900", timeout=1500)
    out = result.stdout
    assert result.returncode == 0, f"{out[-4000:]}\n{result.stderr[-4000:]}"
    for name, label in (("node1", "BIOS, iPXE ROM"), ("node2", "UEFI, native PXE")):
        row = re.search(rf"^{name} \({label}\)\s+(\S+)\s+(10\.88\.0\.\d+)\s+([\d.]+) s$", out,
                        re.M)  # fmt: skip
        assert row, out[-3000:]
        print(f"\n{name} ({label}): power-on to up in {row.group(3)} s")
    # The UEFI machine went through the whole chain, TFTP included.
    assert re.search(r"node2 \(UEFI, native PXE\): TFTP", out), out[-3000:]
    # The agent knows both as `up`: their OS phoned home (pixiebox machines, over its API).
    table = out.split("what the agent knows (pixiebox machines):", 1)[1]
    for name, mac, firmware in (("node1", "52:54:00:88:00:01", "x86_64 BIOS"),
                                ("node2", "52:54:00:88:00:02", "x86_64 UEFI")):  # fmt: skip
        assert re.search(rf"^{name}\s+{mac}\s+10\.88\.0\.\d+\s+{firmware}\s+up\s", table, re.M), (
            table
        )
    assert "all machines booted; removing the lab" in out
    assert demo_namespaces() - before == set()  # (others may run labs at the same time)


def test_demo_that_times_out_fails_and_still_cleans_up(demo_require: None) -> None:
    before = demo_namespaces()
    result = run_demo("--machines", "1", "--timeout", "3", timeout=300)
    assert result.returncode == 1
    assert "not every machine was up within 3 s" in result.stdout
    assert demo_namespaces() - before == set()  # (others may run labs at the same time)
    kept = re.search(r"files kept in (\S+)", result.stdout)
    assert kept and Path(kept.group(1)).is_dir()
    subprocess.run(["rm", "-rf", kept.group(1)], check=True)
