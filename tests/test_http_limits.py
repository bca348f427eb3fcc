"""Connection limits of the real agent (`pixiebox serve`) under floods, issue 13: the [http]
header timeout, head size limit and connection caps (boot HTTP and the API), DNS over TCP per
source, and running out of file descriptors.

The floods are bench/floods/slow_http.py and dns_tcp.py, run in a namespace of their own with
several source addresses; the good clients are real curl and dig in another. The agent's
descriptors are read from /proc/PID/fd.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netlab
import pytest
from agentproc import READY, RunningAgent, lab_toml
from pixiebox.net.limits import ConnectionGate, LogLimiter

FLOODS = Path(__file__).resolve().parent.parent / "bench" / "floods"
SUBNET = "10.93.0.0/24"
AGENT_IP = "10.93.0.2"
CLIENT_IP = "10.93.0.30"
CLIENT_MAC = "02:00:00:93:00:1e"
FLOOD_IPS = [f"10.93.0.{n}" for n in range(101, 106)]  # five sources
HEADER_TIMEOUT = 3
MAX_CONNECTIONS = 256  # below the flood's 5 x 64 admitted per source: both caps are hit
PER_SOURCE = 64
DNS_PER_SOURCE = 8
KERNEL = 1 << 20
BIG = 32 << 20  # more than the send and receive buffers together: still being sent later
LIMITS = f"""header_timeout = "{HEADER_TIMEOUT}s"
max_connections = {MAX_CONNECTIONS}
max_connections_per_source = {PER_SOURCE}
"""


# --------------------------------------------------------------------------- the pieces


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True

    def __repr__(self) -> str:
        return self.name


def test_the_gate_makes_room_per_source_only_from_that_sources_idle() -> None:
    clock = Clock()
    gate: ConnectionGate[Conn] = ConnectionGate(10, 2, clock=clock)
    a1, a2, a3, b1 = Conn("a1"), Conn("a2"), Conn("a3"), Conn("b1")
    assert gate.admit(a1, "a") is None and gate.admit(a2, "a") is None
    assert gate.admit(b1, "b") is None
    gate.idle(b1)  # another source's idle connection is not a's to take
    clock.now += 60
    assert gate.admit(a3, "a") == "source"  # a1, a2 wait for their heads: not idle
    gate.busy(a1)
    gate.idle(a2)
    assert gate.admit(a3, "a") is None and a2.evicted and not b1.evicted
    assert gate.count("a") == 2 and len(gate) == 3
    gate.release(a2)  # its connection_lost, later: idempotent
    assert gate.count("a") == 2


def test_the_gate_makes_room_in_total_from_idle_then_the_longest_waiting() -> None:
    clock = Clock()
    gate: ConnectionGate[Conn] = ConnectionGate(3, 3, clock=clock)
    c = [Conn(f"c{i}") for i in range(6)]
    for i, source in enumerate("abc"):
        assert gate.admit(c[i], source) is None
    assert gate.admit(c[3], "d") == "total"  # all waiting, none for a second yet
    gate.busy(c[1])
    clock.now += 0.5
    gate.idle(c[2])
    assert gate.admit(c[3], "d") is None and c[2].evicted  # idle first
    assert gate.admit(c[4], "e") == "total"  # c0 and c3 have waited less than a second
    clock.now += 1.0
    assert gate.admit(c[4], "e") is None and c[0].evicted and not c[3].evicted
    assert gate.evicted == 2 and len(gate) == 3
    gate.busy(c[3])
    gate.busy(c[4])
    assert gate.admit(c[5], "f") == "total"  # busy ones (answers, downloads) are never cut


def test_the_log_limiter_says_one_line_per_kind_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("test.limits"), 10.0, clock=clock)
    with caplog.at_level(logging.INFO, "test.limits"):
        for _ in range(1000):
            limiter.log("refused", logging.WARNING, "refused %s", "x")
            limiter.log("timeout", logging.INFO, "timeout")
        clock.now += 10
        limiter.log("refused", logging.WARNING, "refused %s", "y")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused x", "timeout", "refused y (999 more like this since the last such "
                     "line, not logged)"]  # fmt: skip
    assert limiter.unsaid == {"refused": 999, "timeout": 999}


# --------------------------------------------------------------------------- the agent


@dataclass
class Lab:
    workdir: Path
    agent: RunningAgent
    client: netlab.Host
    flooder: netlab.Host
    pid: int
    floods: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def curl(self, path: str, *args: str, port: int = 80) -> subprocess.CompletedProcess[str]:
        return self.client.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
             "--max-time", "20", *args, f"http://{AGENT_IP}:{port}{path}"],
            timeout=30, check=False,
        )  # fmt: skip

    def flood(self, script: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.flooder.log_path(script)
        proc = self.flooder.popen(["python3", str(FLOODS / f"{script}.py"), *args], log)
        self.floods.append(proc)
        return proc

    def stop_floods(self) -> None:
        """Kill what a test's floods still hold: a failed test must not leave its connections
        to the tests after it (they would be refused as over the caps)."""
        for proc in self.floods:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.floods.clear()


def _agent_pid(host: netlab.Host) -> int:
    """The agent's Python process in its namespace (not `ip netns exec` or prlimit)."""
    for pid in netlab.namespace_pids(host.name):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"pixiebox.cli" in cmdline and b"serve" in cmdline:
            return pid
    raise AssertionError(f"no agent process in {host.name}")


def _start(segment: netlab.Segment, workdir: Path, nofile: int | None = None) -> Lab:
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    client = segment.add_host("client", mac=CLIENT_MAC, ip=f"{CLIENT_IP}/24")
    flooder = segment.add_host("flood", ip=f"{FLOOD_IPS[0]}/24")
    for ip in FLOOD_IPS[1:]:
        flooder.add_address(f"{ip}/24")
    assets = workdir / "assets"
    (assets / "osie").mkdir(parents=True)
    (assets / "osie" / "vmlinuz").write_bytes(b"k" * KERNEL)
    with open(assets / "osie" / "big.img", "wb") as big:
        big.truncate(BIG)
    text = lab_toml(mode="reservation", subnet=SUBNET, assets=assets, state=workdir / "state",
                    machines=[("c1", CLIENT_MAC, CLIENT_IP)])  # fmt: skip
    api = f'[api]\ntoken_file = "{workdir / "token"}"\n'
    dns = f"[dns]\ntcp_connections_per_source = {DNS_PER_SOURCE}\n"
    text = text.replace("[http]\n", f"{api}{dns}[http]\n{LIMITS}")
    config = workdir / "lab.toml"
    config.write_text(text)
    agent = RunningAgent(agent_host, config)
    agent.log = agent_host.log_path("agent")
    argv = [sys.executable, "-m", "pixiebox.cli", "serve", "--config", str(config),
            "--log-level", "debug"]  # fmt: skip
    if nofile is not None:  # the agent raises its soft limit to the hard one: lower both
        argv = ["prlimit", f"--nofile={nofile}:{nofile}", *argv]
    agent.proc = agent_host.popen(argv, agent.log)
    agent.wait_log(READY, timeout=30)
    return Lab(workdir, agent, client, flooder, _agent_pid(agent_host))


@pytest.fixture(scope="module")
def one_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    problem = netlab.prerequisite_problem(("curl", "dig", "prlimit"))
    if problem:
        pytest.skip(problem)
    workdir = tmp_path_factory.mktemp("http-limits")
    with netlab.Segment(workdir / "segment") as segment:
        yield _start(segment, workdir)


@pytest.fixture
def lab(one_agent: Lab) -> Iterator[Lab]:
    """The module's agent, with each test's floods stopped when it ends, pass or fail."""
    try:
        yield one_agent
    finally:
        one_agent.stop_floods()


def _result(proc: subprocess.Popen[bytes], host: netlab.Host, timeout: float) -> dict[str, Any]:
    proc.wait(timeout)
    text = host.segment.log_of(proc).read_text()
    result: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
    return result


def _wait_fds(lab: Lab, at_least: int, timeout: float) -> int:
    return int(netlab.wait_until(lambda: (n := lab.fds()) >= at_least and n, timeout, 0.1,
                                 f"the agent never held {at_least} descriptors"))  # fmt: skip


def test_slow_clients_are_capped_and_timed_out_while_real_clients_are_served(lab: Lab) -> None:
    """(a) 500 slowloris connections from five sources: 64 per source and 256 in total are
    held, the rest refused at once; curl gets a script, a kernel and the API meanwhile; the
    agent's descriptors are back within the header timeout of the flood."""
    assert lab.curl(f"/boot/{CLIENT_MAC}.ipxe").stdout.startswith("200")
    before = lab.fds()
    mark = len(lab.agent.text())
    # The first source takes 3 of every 7 connections: over its 64 long before the others
    # together reach the total of 256.
    sources = [arg for ip in [FLOOD_IPS[0]] * 2 + FLOOD_IPS for arg in ("--source", ip)]
    flood = lab.flood("slow_http", "--target", AGENT_IP, "--count", "500", "--duration", "20",
                      "--interval", "1", "--path", "/boot/x.ipxe", *sources)  # fmt: skip
    _wait_fds(lab, before + MAX_CONNECTIONS - 20, timeout=10)
    # The total cap holds: once the refused are closed, the agent holds no more than the cap
    # (give or take a few in flight), well before the header timeout would close what it held
    # over it. Sockets accepted but not yet answered 503 and closed are descriptors too,
    # hundreds of them for a moment on a busy machine (stop 23's CI sampled 384 over `before`),
    # so no single sample can tell.
    capped = before + MAX_CONNECTIONS + 10
    netlab.wait_until(lambda: lab.fds() <= capped, HEADER_TIMEOUT - 0.5, 0.05,
                      f"the agent's descriptors never fell to {before} (before the flood) + the "
                      f"cap of {MAX_CONNECTIONS} while the flood held its connections")  # fmt: skip
    time.sleep(1.2)  # the flood's connections are now old enough to make room for a newcomer
    script = lab.curl(f"/boot/{CLIENT_MAC}.ipxe")
    kernel = lab.curl("/assets/osie/vmlinuz")
    api = lab.curl("/api/v1/machines", port=8080)
    assert script.returncode == 0 and script.stdout.startswith("200 "), script
    assert kernel.stdout == f"200 {KERNEL}", kernel
    assert api.stdout.startswith("200 "), api
    flooded = time.monotonic()

    result = _result(flood, lab.flooder, timeout=30)
    assert result["opened"] == 500, result
    # All but the 256 held are refused (less the few that made room for curl by eviction).
    assert result["refused"] >= 500 - MAX_CONNECTIONS - 5, result
    # Those held were closed by the header timeout (408), or made room (no answer).
    assert result["statuses"].get("408", 0) >= MAX_CONNECTIONS // 2, result
    assert result["still_open_at_end"] == 0, result  # each one closed within the header timeout
    assert time.monotonic() - flooded < HEADER_TIMEOUT + 5
    settled = netlab.wait_until(lambda: lab.fds() <= before + 3, HEADER_TIMEOUT + 3, 0.2,
                                f"descriptors stay at {lab.fds()} (before: {before})")  # fmt: skip
    assert settled
    log = lab.agent.text()[mark:]
    assert "per source address ([http] max_connections_per_source)" in log
    assert "in total ([http] max_connections)" in log
    # One line per kind per 10 s, however many refusals.
    assert log.count("refused a connection") <= 4, log[-3000:]
    assert log.count("sent no complete request head") <= 3, log[-3000:]
    assert "Traceback" not in log


def test_a_huge_request_head_is_refused_without_being_read(lab: Lab) -> None:
    """(b) a 16 MB header: 431 (or a reset) long before the server read it all."""
    flood = lab.flood("slow_http", "--target", AGENT_IP, "--count", "1", "--duration", "10",
                      "--mode", "big-header", "--header-bytes", str(16 << 20))  # fmt: skip
    result = _result(flood, lab.flooder, timeout=20)
    assert result["closed_by_server"] == 1, result
    assert result["statuses"] in ({"431": 1}, {}), result
    assert result["sent_bytes"] < 8 << 20, result  # what the kernel's buffers took, no more
    # A real client's 10 kB of headers is fine.
    header = "X-Fine: " + "a" * 10_000
    assert lab.curl(f"/boot/{CLIENT_MAC}.ipxe", "-H", header).stdout.startswith("200")


def test_a_slow_download_outlives_the_header_timeout(lab: Lab) -> None:
    """(c) a 32 MB file at 4 MB/s: the response is still being sent well after the header
    timeout, and it completes."""
    started = time.monotonic()
    done = lab.curl("/assets/osie/big.img", "--limit-rate", "4M")
    took = time.monotonic() - started
    assert done.returncode == 0 and done.stdout == f"200 {BIG}", done
    assert took > HEADER_TIMEOUT + 2, took


def test_dns_tcp_connections_are_capped_per_source(lab: Lab) -> None:
    """(e) a source holding its 8 TCP connections gets no ninth; another source's dig +tcp
    is answered meanwhile."""
    flood = lab.flood("dns_tcp", "--target", AGENT_IP, "--count", str(DNS_PER_SOURCE + 6),
                      "--duration", "4", "--source", FLOOD_IPS[0])  # fmt: skip
    time.sleep(1.5)
    dig = ["dig", f"@{AGENT_IP}", "+tcp", "+short", "+time=2", "+tries=1", "pixiebox.lab.test"]
    good = lab.client.run(dig, timeout=10, check=False)
    same = lab.flooder.run([*dig, "-b", FLOOD_IPS[0]], timeout=10, check=False)
    other = lab.flooder.run([*dig, "-b", FLOOD_IPS[1]], timeout=10, check=False)
    result = _result(flood, lab.flooder, timeout=15)
    assert good.stdout.split() == [AGENT_IP], good
    assert other.stdout.split() == [AGENT_IP], other
    assert same.returncode != 0 and same.stdout.split() != [AGENT_IP], same  # at its cap
    assert result["opened"] == DNS_PER_SOURCE + 6, result
    assert result["refused"] == 6 and result["still_open_at_end"] == DNS_PER_SOURCE, result


def test_running_out_of_descriptors_is_one_line_and_passes(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    """(d) the agent under a hard limit of 160 descriptors and 300 silent connections: accept
    fails with EMFILE; the log says so in a line or two (no traceback storm), and curl is
    answered again once the flood is over."""
    netlab_require("curl", "prlimit")  # type: ignore[operator]
    lab = _start(segment, workdir, nofile=160)
    assert lab.curl(f"/boot/{CLIENT_MAC}.ipxe").stdout.startswith("200")
    sources = [arg for ip in FLOOD_IPS[:4] for arg in ("--source", ip)]
    flood = lab.flood("slow_http", "--target", AGENT_IP, "--count", "300", "--duration", "6",
                      "--mode", "silent", *sources)  # fmt: skip
    lab.agent.wait_log("out of file descriptors", timeout=10)
    _result(flood, lab.flooder, timeout=20)

    def answered() -> bool:
        return lab.curl(f"/boot/{CLIENT_MAC}.ipxe", "--max-time", "3").stdout.startswith("200")

    netlab.wait_until(answered, 20, 0.5, "curl never answered after the flood")
    log = lab.agent.text()
    assert log.count("out of file descriptors") <= 3, log[-3000:]
    assert "socket.accept() out of system resource" not in log
    assert "Traceback" not in log, log[-3000:]
