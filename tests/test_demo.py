"""`sudo ./build.sh demo`, the README's main command, run non-interactively as a newcomer would."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import netlab
import osie_tools
import pytest
import vmlab
from pixiebox.virtlab import forward

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo_require(netlab_require: Callable[..., None]) -> None:
    """What the demo needs besides what build.sh demo builds (the OSIE, cached)."""
    netlab_require("dnsmasq", vmlab.QEMU, "ssh")


class DemoRun(subprocess.CompletedProcess[str]):
    """A finished demo, the namespaces it was seen to make while it ran, and what
    `while_running` returned (None if it never did)."""

    prefix: str  # the start of every namespace name this demo makes
    seen: set[str]
    checked: Any


def _collect(stream: IO[str] | None, into: list[str]) -> None:
    if stream is not None:
        into.extend(stream)


def run_demo(
    *args: str, timeout: float, while_running: Callable[[str], Any] | None = None,
    interrupt_when_checked: bool = False,
) -> DemoRun:  # fmt: skip
    """`./build.sh demo ARGS`. build.sh execs `pixiebox demo`, so the demo keeps the pid started
    here, and every namespace it makes is named `pxb<pid>-...` (virtlab.netns RUN_PREFIX): the
    leak check looks at those only, never at another lab running on this machine meanwhile.

    `while_running(output so far)` is called about once a second while the demo runs, until it
    returns something other than None (kept as `checked`): a look at the lab while it is up.
    With `interrupt_when_checked`, the demo then gets Ctrl-C (SIGINT), as a user stops --keep."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXIEBOX_")}
    proc = subprocess.Popen(
        ["./build.sh", "demo", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    prefix = f"{netlab.NS_PREFIX}{proc.pid}-"
    seen: set[str] = set()
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=_collect, args=(stream, into), daemon=True)
        for stream, into in ((proc.stdout, out), (proc.stderr, err))
    ]
    for reader in readers:
        reader.start()
    checked: Any = None
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        seen.update(n for n in netlab.list_namespaces() if n.startswith(prefix))
        if while_running is not None and checked is None:
            checked = while_running("".join(out))
            if checked is not None and interrupt_when_checked:
                proc.send_signal(signal.SIGINT)
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(proc.args, timeout, "".join(out), "".join(err))
        time.sleep(1)
    for reader in readers:
        reader.join(30)
    run = DemoRun(proc.args, proc.returncode, "".join(out), "".join(err))
    run.prefix, run.seen, run.checked = prefix, seen, checked
    return run


#: What the demo prints once its agent answers (virtlab.demo, virtlab.forward).
DASHBOARD_LINE = re.compile(
    r"^dashboard: (http://127\.0\.0\.1:(\d+)/) \(this machine only; sign in with the token in "
    r"(\S+)\)$",
    re.M,
)


def curl(url: str) -> tuple[int, str]:
    """(curl's exit status, body + the HTTP status on the last line), from the root namespace."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", url],
        capture_output=True, text=True, timeout=40,
    )  # fmt: skip
    return done.returncode, done.stdout


def listeners(port: int) -> list[str]:
    """The local addresses listening on TCP `port` in the root namespace."""
    table = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[3] for line in table.splitlines() if line.strip()]


def look_at_dashboard(output: str) -> dict[str, Any] | None:
    """Once the demo printed its dashboard's URL: what a browser on this machine (the root
    namespace) gets there, and where that port listens."""
    found = DASHBOARD_LINE.search(output)
    if not found:
        return None
    url, port = found.group(1), int(found.group(2))
    return {
        "url": url,
        "port": port,
        "page": curl(url),
        "machines": curl(f"{url}api/v1/machines"),
        "listeners": listeners(port),
        "token": Path(found.group(3)).is_file(),
    }


def assert_dashboard_was_reachable(run: DemoRun) -> None:
    """While the demo ran, its printed URL answered the dashboard page and the API from the
    host, on loopback only; once it ended, nothing listens there."""
    seen = run.checked
    assert seen is not None, f"the demo printed no dashboard URL:\n{run.stdout[-3000:]}"
    status, page = seen["page"]
    assert status == 0 and page.endswith("\n200"), page[-500:]
    assert "<title>Pixiebox</title>" in page and 'id="rows"' in page, page[:1000]
    status, machines = seen["machines"]
    assert status == 0 and machines.endswith("\n200"), machines[-500:]
    assert isinstance(json.loads(machines.rsplit("\n", 1)[0]), list)
    assert seen["listeners"] == [f"127.0.0.1:{seen['port']}"], seen["listeners"]
    assert seen["token"], "the token file the dashboard line names does not exist"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", seen["port"]), timeout=5).close()


#: A login line the demo prints per machine with an SSH server (virtlab.demo_access).
LOGIN_LINE = re.compile(r"^  (node\d+): (ip netns exec \S+ ssh .* root@10\.88\.0\.\d+)$", re.M)
#: On the node: its name, then what its root is, whether containers can pivot_root off it and
#: the RAM in use (osie_tools.ROOT_CHECKS).
ON_THE_NODE = f"hostname; {osie_tools.ROOT_CHECKS}"


class LookAtTheLab:
    """While the demo runs: its dashboard (look_at_dashboard) once it prints the URL, then,
    once it says the lab keeps running (--keep), each login command it printed, run as printed
    with ON_THE_NODE as the remote command."""

    def __init__(self) -> None:
        self.dashboard: dict[str, Any] | None = None

    def __call__(self, output: str) -> dict[str, Any] | None:
        if self.dashboard is None:
            self.dashboard = look_at_dashboard(output)
        if self.dashboard is None or "the lab keeps running (--keep)" not in output:
            return None
        logins = {}
        for name, command in LOGIN_LINE.findall(output):
            done = subprocess.run(
                [*shlex.split(command), "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
                 ON_THE_NODE],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            logins[name] = (done.returncode, done.stdout.split("\n"), done.stderr)
        return {**self.dashboard, "logins": logins}


def assert_cleaned_up(run: DemoRun) -> None:
    """The demo removed every namespace it made. Seeing some while it ran proves the prefix is
    really its own, so an empty leftover list means something."""
    assert run.seen, f"no namespace {run.prefix}* seen while the demo ran: whose are they now?"
    assert netlab.leftover_namespaces(run.prefix) == []


@pytest.mark.timeout(1600)
def test_build_sh_demo_boots_two_machines_into_the_osie_and_removes_everything(
    demo_require: None,
) -> None:
    """The README's main command with --keep: both machines boot the real OSIE (built, or
    found up to date, by build.sh), the demo prints how to log into each, the printed command
    logs in (the demo's key, the host key the agent keeps), and Ctrl-C removes it all."""
    result = run_demo(
        "--machines", "2", "--timeout", "900", "--keep", timeout=1500,
        while_running=LookAtTheLab(), interrupt_when_checked=True,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, f"{out[-4000:]}\n{result.stderr[-4000:]}"
    assert "the machines boot the OSIE from out/osie" in result.stderr + out, result.stderr[-3000:]
    assert_dashboard_was_reachable(result)
    # Logged in as the demo said: the OSIE, on an overlay root (nothing copied at boot) that
    # containers can pivot_root off.
    logins = result.checked["logins"]
    assert sorted(logins) == ["node1", "node2"], out[-3000:]
    for name, (status, lines, err) in logins.items():
        assert status == 0, f"{name}: {err}"
        assert lines[:3] == [name, "overlay", "pivoted"], (name, lines, err)
    assert "interrupted; removing the lab" in out
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
    assert_cleaned_up(result)


def test_demo_that_times_out_fails_and_still_cleans_up(demo_require: None) -> None:
    result = run_demo("--machines", "1", "--timeout", "3", timeout=300)
    assert result.returncode == 1
    assert "not every machine was up within 3 s" in result.stdout
    assert_cleaned_up(result)
    kept = re.search(r"files kept in (\S+)", result.stdout)
    assert kept and Path(kept.group(1)).is_dir()
    subprocess.run(["rm", "-rf", kept.group(1)], check=True)


def test_the_dashboard_forwarder_reaches_into_a_namespace_from_loopback_only(
    segment: netlab.Segment, tmp_path: Path
) -> None:
    """The demo's forwarder without the VMs: a page served on 127.0.0.1 inside a namespace is
    fetched whole from the root namespace's loopback; a taken port gives way to a free one; the
    listener is on loopback only and is gone when the forwarder closes."""
    agent = segment.add_host("agent", ip="10.66.0.1/24")
    site = tmp_path / "site"
    site.mkdir()
    body = os.urandom(3 << 20)  # several socket buffers: the copy loop and its back-pressure
    (site / "big.bin").write_bytes(body)
    log = agent.log_path("http")
    server = agent.popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(site),
         "8080"], log,
    )  # fmt: skip
    netlab.wait_until(
        lambda: "Serving HTTP" in log.read_text(errors="replace") or server.poll() is not None,
        10.0, message="http.server in the namespace",
    )  # fmt: skip
    taken = socket.create_server(("127.0.0.1", 0))  # the port the forwarder is asked for
    wanted = taken.getsockname()[1]
    forwarder = forward.Forwarder(agent.name, 8080, wanted).start()
    try:
        assert forwarder.port != wanted
        assert forwarder.url == f"http://127.0.0.1:{forwarder.port}/"
        assert listeners(forwarder.port) == [f"127.0.0.1:{forwarder.port}"]
        fetched = tmp_path / "fetched.bin"
        done = subprocess.run(
            ["curl", "-sS", "--fail", "--max-time", "20", "-o", "/dev/null",
             f"{forwarder.url}big.bin", "-o", str(fetched), f"{forwarder.url}big.bin"],
            capture_output=True, text=True, timeout=40,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert fetched.read_bytes() == body
        # Nothing of it answers on the root namespace's other addresses.
        assert curl(f"http://127.0.0.2:{forwarder.port}/big.bin")[0] == 7
    finally:
        forwarder.close()
        taken.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", forwarder.port), timeout=5).close()
    assert not [t for t in threading.enumerate() if t.name == "demo-dashboard"]
