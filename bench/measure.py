"""One measurement each: run a real client in the client namespace against whatever server the
lab runs now, and return one number. Every client run is bounded in count and time."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .lab import ROOT, SERVER_IP, BenchError, Lab, tool

MIB = 1 << 20


# --------------------------------------------------------------------------- DHCP


@dataclass(frozen=True)
class PerfdhcpRun:
    rate: float  # offered DORA exchanges/s
    discovers: int
    offers: int
    requests: int
    acks: int
    seconds: float

    @property
    def loss(self) -> float:
        """Exchanges not completed, as a fraction of those started."""
        return 1.0 - self.acks / self.discovers if self.discovers else 1.0

    @property
    def completed_per_second(self) -> float:
        return self.acks / self.seconds


def _section(text: str, name: str) -> tuple[int, int]:
    match = re.search(
        rf"Statistics for: {name}\*+\s*sent packets: (\d+)\s*received packets: (\d+)", text
    )
    if not match:
        raise BenchError(f"perfdhcp printed no {name} statistics:\n{text[-1500:]}")
    return int(match.group(1)), int(match.group(2))


def perfdhcp(lab: Lab, rate: int, clients: int, seconds: int) -> PerfdhcpRun:
    """`seconds` of full DORA at `rate` exchanges/s from `clients` simulated clients (MACs),
    perfdhcp acting as a relay (giaddr = the client namespace's address), so every server
    answers by unicast; then 2 s for late answers."""
    argv = [
        tool("perfdhcp"),
        "-4",
        "-l",
        "eth0",
        "-g",
        "single",
        "-r",
        str(rate),
        "-R",
        str(clients),
        "-p",
        str(seconds),
        "-W",
        "2000000",
        SERVER_IP,
    ]
    result = lab.client_run(argv, timeout=seconds + 30)
    text = result.stdout + result.stderr
    discovers, offers = _section(text, "DISCOVER-OFFER")
    requests, acks = _section(text, "REQUEST-ACK")
    return PerfdhcpRun(rate, discovers, offers, requests, acks, float(seconds))


def dhcp_loss_free_rate(lab: Lab, clients: int, seconds: int, log: list[str]) -> float:
    """The highest offered rate with under 1 % of exchanges lost: double from 250/s until a
    step loses 1 % or more, then bisect twice between the last good and the first bad rate."""

    def loss_free(rate: int) -> bool:
        # A step that loses packets is run once more: on a shared machine one busy second of
        # another process must not decide the result.
        for _ in range(2):
            time.sleep(3)  # the server works off what an overloaded step left queued
            run = perfdhcp(lab, rate, clients, seconds)
            log.append(f"  rate {rate}/s: {run.acks}/{run.discovers} bound, loss {run.loss:.2%}")
            if run.loss < 0.01:
                return True
        return False

    perfdhcp(lab, 100, clients, 1)  # warm-up: first packets, ARP, the server's caches
    good, bad = 0, 0
    rate = 250
    for _ in range(8):  # 250 .. 32,000
        if loss_free(rate):
            good = rate
            rate *= 2
        else:
            bad = rate
            break
    if bad:
        for _ in range(2):
            rate = (good + bad) // 2
            if rate in (good, bad):
                break
            if loss_free(rate):
                good = rate
            else:
                bad = rate
    return float(good)


def dhcp_avalanche(lab: Lab, clients: int, timeout: float, log: list[str]) -> float:
    """Seconds until `clients` new clients, all discovering at once and retransmitting with
    back-off, are all bound (perfdhcp's avalanche scenario)."""
    argv = [
        tool("perfdhcp"),
        "-4",
        "-l",
        "eth0",
        "-g",
        "single",
        "--scenario",
        "avalanche",
        "-R",
        str(clients),
        SERVER_IP,
    ]
    started = time.monotonic()
    try:
        result = lab.client_run(argv, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.append(f"  avalanche: not all {clients} bound within {timeout:g} s")
        return float("inf")
    seconds = time.monotonic() - started
    text = result.stdout + result.stderr
    _, acks = _section(text, "REQUEST-ACK")
    retrans = re.findall(r"retransmissions? *: *(\d+)", text, re.IGNORECASE)
    log.append(f"  avalanche: {acks} ACKs in {seconds:.1f} s (retransmissions {retrans})")
    if acks < clients:
        return float("inf")
    return seconds


def dhcp_startup(lab: Lab, log: list[str]) -> float:
    """Seconds from starting `pixiebox serve` to its first OFFER to a PXE client that keeps
    sending DISCOVERs (proxy mode, the default: no rogue-server probe before answering)."""
    lab.stop()
    config = lab.pixiebox_config("proxy")
    probe = lab.client_popen([sys.executable, str(ROOT / "bench" / "probe.py"), "eth0", "20"])
    try:
        assert probe.stdout is not None
        if probe.stdout.readline().strip() != "ready":
            raise BenchError(
                f"the DHCP probe did not start: {probe.stderr.read() if probe.stderr else ''}"
            )
        started = time.monotonic()
        agent = lab.server.popen(lab.pixiebox_argv(config), lab.server.log_path("pixiebox-start"))
        try:
            out, err = probe.communicate(timeout=30)
        finally:
            lab.segment.stop(agent)
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.communicate()
    match = re.search(r"offer (\d+\.\d+)", out)
    if not match:
        raise BenchError(f"no OFFER within 20 s of starting the agent: {out} {err}")
    seconds = float(match.group(1)) - started
    log.append(f"  start to first OFFER: {seconds:.3f} s")
    return seconds


# --------------------------------------------------------------------------- TFTP


def _curl_tftp(name: str) -> list[str]:
    return [
        tool("curl"),
        "-sS",
        "--max-time",
        "120",
        "--tftp-blksize",
        "1468",
        "-o",
        "/dev/null",
        "-w",
        "%{time_total} %{size_download}\n",
        f"tftp://{SERVER_IP}/{name}",
    ]


def _parallel(lab: Lab, argvs: list[list[str]], timeout: float) -> tuple[float, list[str]]:
    """Start every argv at once in the client namespace; (wall seconds, each one's stdout)."""
    started = time.monotonic()
    procs = [lab.client_popen(argv) for argv in argvs]
    outs: list[str] = []
    try:
        for proc in procs:
            remaining = max(1.0, timeout - (time.monotonic() - started))
            out, err = proc.communicate(timeout=remaining)
            if proc.returncode != 0:
                raise BenchError(
                    f"{' '.join(argvs[0][:1])} failed ({proc.returncode}): {err.strip()}"
                )
            outs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return time.monotonic() - started, outs


#: Fetches one after the other that make one sample of a lone client's time.
LONE_FETCHES = 10


def tftp_per_client(lab: Lab, name: str, size: int, clients: int, pinned: bool = False) -> float:
    """Mean seconds one client takes to fetch `name` while `clients` fetch it at once (a lone
    client: the mean of LONE_FETCHES fetches, one after the other).

    `pinned` puts the server and the client on one CPU. Unpinned, a lone client's time on
    this 2-CPU VM is set by where the scheduler puts the two ends: 6-9 ms per MiB when they
    share a CPU, 40-50 ms when each block waits for two wake-ups of an idle vCPU, for every
    server alike (bench/RESULTS.md, issue 17). A server's process layout decides the lottery
    more than its work does: tftpd-hpa's child forked per transfer mostly lands beside curl,
    dnsmasq mostly does not. On one CPU every server is measured in the same place, by its
    own work per round trip; across two CPUs too, but by the hypervisor's wake-ups."""
    cpu = max(os.sched_getaffinity(0))
    command = _curl_tftp(name)
    if pinned:
        command = [tool("taskset"), "-c", str(cpu), *command]
    times = []
    with lab.server_pinned(cpu) if pinned else contextlib.nullcontext():
        for _ in range(LONE_FETCHES if clients == 1 else 1):
            _, outs = _parallel(lab, [command] * clients, timeout=300)
            for out in outs:
                seconds, got = out.split()
                if int(float(got)) != size:
                    raise BenchError(f"TFTP {name}: got {got} of {size} bytes")
                times.append(float(seconds))
    return sum(times) / len(times)


def tftp_aggregate(lab: Lab, name: str, size: int, clients: int) -> float:
    """MiB/s delivered to `clients` fetching `name` at once (first start to last end)."""
    wall, outs = _parallel(lab, [_curl_tftp(name)] * clients, timeout=600)
    for out in outs:
        if int(float(out.split()[1])) != size:
            raise BenchError(f"TFTP {name}: a client got {out.split()[1]} of {size} bytes")
    return clients * size / MIB / wall


# --------------------------------------------------------------------------- HTTP


def http_download(lab: Lab, path: str, size: int, count: int = 5) -> float:
    """MiB/s of `count` curl downloads of `path` one after the other, to /dev/null (one 100 MiB
    download lasts a tenth of a second: too short to be one sample on a busy machine)."""
    argv = [tool("curl"), "-sS", "--max-time", "300", "-w", "%{time_total} %{size_download}\n"]
    for _ in range(count):
        argv += ["-o", "/dev/null", f"http://{SERVER_IP}{path}"]
    result = lab.client_run(argv, timeout=330)
    if result.returncode != 0:
        raise BenchError(f"curl {path} failed: {result.stderr.strip()}")
    seconds = 0.0
    for line in result.stdout.split("\n"):
        if not line.strip():
            continue
        took, got = line.split()
        if int(float(got)) != size:
            raise BenchError(f"HTTP {path}: got {got} of {size} bytes")
        seconds += float(took)
    return count * size / MIB / seconds


def http_get(lab: Lab, path: str) -> bytes:
    result = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lab.client.name,
            tool("curl"),
            "-sS",
            "--max-time",
            "10",
            f"http://{SERVER_IP}{path}",
        ],
        capture_output=True,
        timeout=20,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"curl {path} failed: {result.stderr.decode(errors='replace')}")
    return result.stdout


def http_rps(lab: Lab, path: str, seconds: int, connections: int = 32) -> float:
    """Requests/s wrk gets for `path` (keep-alive, `connections` connections, one thread)."""
    argv = [
        tool("wrk"),
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        f"http://{SERVER_IP}{path}",
    ]
    result = lab.client_run(argv, timeout=seconds + 30)
    match = re.search(r"Requests/sec:\s*([\d.]+)", result.stdout)
    if result.returncode != 0 or not match:
        raise BenchError(f"wrk {path} failed: {result.stdout[-800:]} {result.stderr[-400:]}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    if errors:
        raise BenchError(f"wrk {path}: {errors.group(1)} error responses")
    return float(match.group(1))


# --------------------------------------------------------------------------- DNS


def dns_qps(lab: Lab, queries: Path, seconds: int) -> float:
    """Queries/s dnsperf gets for the lab names in `queries` (lost queries count as not done)."""
    argv = [
        tool("dnsperf"),
        "-s",
        SERVER_IP,
        "-d",
        str(queries),
        "-l",
        str(seconds),
        "-c",
        "4",
        "-q",
        "200",
        "-t",
        "2",
    ]
    result = lab.client_run(argv, timeout=seconds + 30)
    match = re.search(r"Queries per second:\s*([\d.]+)", result.stdout)
    if result.returncode != 0 or not match:
        raise BenchError(f"dnsperf failed: {result.stdout[-800:]} {result.stderr[-400:]}")
    noerror = re.search(r"NOERROR (\d+)", result.stdout)
    completed = re.search(r"Queries completed:\s*(\d+)", result.stdout)
    if noerror and completed and noerror.group(1) != completed.group(1):
        raise BenchError(f"dnsperf: not every answer was NOERROR:\n{result.stdout[-800:]}")
    return float(match.group(1))


__all__ = ["MIB", "ROOT"]
