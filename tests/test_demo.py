"""`sudo ./build.sh demo`, the README's main command, run non-interactively as a newcomer would."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import netlab
import pytest
import vmlab

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo_require(netlab_require: Callable[..., None], testos: tuple[Path, Path]) -> None:
    netlab_require("dnsmasq", vmlab.QEMU)


class DemoRun(subprocess.CompletedProcess[str]):
    """A finished demo and the namespaces it was seen to make while it ran."""

    prefix: str  # the start of every namespace name this demo makes
    seen: set[str]


def run_demo(*args: str, timeout: float) -> DemoRun:
    """`./build.sh demo ARGS`. build.sh execs `pixiebox demo`, so the demo keeps the pid started
    here, and every namespace it makes is named `pxb<pid>-...` (virtlab.netns RUN_PREFIX): the
    leak check looks at those only, never at another lab running on this machine meanwhile."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXIEBOX_")}
    proc = subprocess.Popen(
        ["./build.sh", "demo", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    prefix = f"{netlab.NS_PREFIX}{proc.pid}-"
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=1)
            break
        except subprocess.TimeoutExpired:
            seen.update(n for n in netlab.list_namespaces() if n.startswith(prefix))
            if time.monotonic() > deadline:
                proc.kill()
                proc.communicate()
                raise
    run = DemoRun(proc.args, proc.returncode, out, err)
    run.prefix, run.seen = prefix, seen
    return run


def assert_cleaned_up(run: DemoRun) -> None:
    """The demo removed every namespace it made. Seeing some while it ran proves the prefix is
    really its own, so an empty leftover list means something."""
    assert run.seen, f"no namespace {run.prefix}* seen while the demo ran: whose are they now?"
    assert netlab.leftover_namespaces(run.prefix) == []


@pytest.mark.timeout(1600)
def test_build_sh_demo_boots_two_machines_and_removes_everything(demo_require: None) -> None:
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
    assert_cleaned_up(result)


def test_demo_that_times_out_fails_and_still_cleans_up(demo_require: None) -> None:
    result = run_demo("--machines", "1", "--timeout", "3", timeout=300)
    assert result.returncode == 1
    assert "not every machine was up within 3 s" in result.stdout
    assert_cleaned_up(result)
    kept = re.search(r"files kept in (\S+)", result.stdout)
    assert kept and Path(kept.group(1)).is_dir()
    subprocess.run(["rm", "-rf", kept.group(1)], check=True)
