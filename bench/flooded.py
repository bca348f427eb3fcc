"""The `floods` group: a good client's time while a third host floods the server under test.

Issue 13's floods, from bench/floods/ (the scripts the endurance tests run), each against
Pixiebox and the established servers in turn, with the same good client measured during it:

- TFTP: 2,000 half-open RRQs (never acknowledged, RFC 2349 timeout=255, 64 forged source
  addresses, a fresh port each) while curl fetches 1 MiB;
- HTTP: 500 slow connections (a request head trickled in, from 10 addresses) while curl fetches
  the machine's iPXE script and a 1 MiB kernel;
- DHCP: a storm of DISCOVERs from 20,000 random MACs at 2,000/s while perfdhcp (as a relay)
  runs DORA exchanges for 10 of the lab's enrolled MACs; reported as the mean DISCOVER→ACK
  delay (a lost exchange fails the sample).

The flooder is its own namespace on the bridge (10.77.0.3); its forged addresses are local
routes there (the kernel answers ARP for them), so the servers' replies reach it and nothing
leaves the segment. A good client that fails or loses exchanges is a failed sample, reported.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from pixiebox.virtlab import netns

from .lab import ROOT, SERVER_IP, BenchError, Lab, machine, tool
from .measure import MIB, http_get, tftp_per_client

FLOODER_IP = "10.77.0.3"
#: Forged TFTP sources and slow HTTP sources: outside the DHCP pool (10.77.1.0-10.77.250.255).
TFTP_SOURCES = "10.77.251.0/26"
HTTP_SOURCES = [f"10.77.252.{n}" for n in range(1, 11)]
FLOODS = ROOT / "bench" / "floods"
#: Seconds a flood runs before the good client starts, so the server is already under it.
HEAD_START = 2.0


@dataclass
class Flooder:
    host: netns.Host

    @classmethod
    def on(cls, lab: Lab) -> Flooder:
        host = lab.segment.add_host("fld", ip=f"{FLOODER_IP}/16")
        host.run(["ip", "route", "add", "local", TFTP_SOURCES, "dev", "lo", "table", "local"])
        for address in HTTP_SOURCES:
            host.run(
                ["ip", "route", "add", "local", f"{address}/32", "dev", "lo", "table", "local"]
            )
        return cls(host)

    def start(self, script: str, *args: str, repeat: int = 20) -> subprocess.Popen[str]:
        """Run a flood script `repeat` times over (each run is bounded), so the flood outlasts
        the good client's measurement; `finish` ends it."""
        command = " ".join(shlex.quote(a) for a in (sys.executable, str(FLOODS / script), *args))
        argv = ["ip", "netns", "exec", self.host.name, "bash", "-c",
                f"for _ in $(seq {repeat}); do {command} || exit; done"]  # fmt: skip
        return subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )

    @staticmethod
    def finish(proc: subprocess.Popen[str], log: list[str], what: str) -> None:
        """End a flood (its whole process group) and log the last run's JSON summary."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=15)
        lines = out.strip().splitlines()
        log.append(f"  {what} flood, last run: {(lines[-1] if lines else err.strip())[-400:]}")

    def during(self, proc: subprocess.Popen[str], what: str) -> None:
        time.sleep(HEAD_START)
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise BenchError(f"the {what} flood ended before the measurement: {out} {err}")


def tftp_under_flood(lab: Lab, flooder: Flooder, log: list[str]) -> float:
    """Seconds curl takes for 1 MiB over TFTP during the half-open flood."""
    flood = flooder.start(
        "tftp_halfopen.py", "--server", SERVER_IP, "--file", "tftp-1m.bin", "--count", "2000",
        "--rate", "400", "--spoof-ports", "--sources", TFTP_SOURCES, "--timeout-option", "255",
        "--linger", "1", "--max-seconds", "60",
    )  # fmt: skip
    try:
        flooder.during(flood, "TFTP")
        return tftp_per_client(lab, "tftp-1m.bin", MIB, 1)
    finally:
        flooder.finish(flood, log, "TFTP")


def http_under_flood(lab: Lab, flooder: Flooder, script: str, log: list[str]) -> float:
    """Seconds curl takes for the iPXE script and a 1 MiB kernel (one after the other) during
    the slow-connection flood."""
    sources = [arg for address in HTTP_SOURCES for arg in ("--source", address)]
    flood = flooder.start(
        "slow_http.py", "--target", SERVER_IP, "--count", "500", "--duration", "40",
        "--mode", "slow", *sources,
    )  # fmt: skip
    try:
        flooder.during(flood, "HTTP")
        argv = [tool("curl"), "-sS", "--fail", "--max-time", "60", "-w", "%{time_total}\n"]
        for path in (script, "/assets/vmlinuz"):
            argv += ["-o", "/dev/null", f"http://{SERVER_IP}{path}"]
        result = lab.client_run(argv, timeout=90)
        if result.returncode != 0:
            raise BenchError(f"curl during the HTTP flood failed: {result.stderr.strip()}")
        return sum(float(line) for line in result.stdout.split())
    finally:
        flooder.finish(flood, log, "HTTP")


_AVG_DELAY = r"Statistics for: {}\*+.*?avg delay: ([\d.]+) ms"


def dhcp_under_storm(lab: Lab, flooder: Flooder, log: list[str]) -> float:
    """Milliseconds from DISCOVER to ACK (perfdhcp's mean delays) for 10 relayed clients at
    10 exchanges/s during the storm; a lost exchange fails the sample."""
    storm = flooder.start(
        "dhcp_storm.py", "--iface", "eth0", "--count", "20000", "--rate", "2000",
        "--settle", "1", "--max-seconds", "30",
    )  # fmt: skip
    try:
        flooder.during(storm, "DHCP")
        # The good clients are the lab's own machines (enrolled MACs c001..c010): a storm of
        # strangers must not cost the lab its boots.
        macs = lab.workdir / "good-macs.txt"
        macs.write_text("".join(f"{machine(i)[1]}\n" for i in range(1, 11)))
        argv = [tool("perfdhcp"), "-4", "-l", "eth0", "-r", "10", "-R", "10", "-M", str(macs),
                "-p", "5", "-W", "2000000", SERVER_IP]  # fmt: skip
        result = lab.client_run(argv, timeout=40)
    finally:
        flooder.finish(storm, log, "DHCP")
    text = result.stdout + result.stderr
    sent = re.search(r"Statistics for: DISCOVER-OFFER\*+\s*sent packets: (\d+)", text)
    acks = re.search(
        r"Statistics for: REQUEST-ACK\*+\s*sent packets: \d+\s*received packets: (\d+)", text
    )
    delays = [
        re.search(_AVG_DELAY.format(n), text, re.S) for n in ("DISCOVER-OFFER", "REQUEST-ACK")
    ]
    if not (sent and acks and all(delays)):
        raise BenchError(f"perfdhcp during the storm printed no statistics: {text[-800:]}")
    started, completed = int(sent.group(1)), int(acks.group(1))
    log.append(f"  good client: {completed} of {started} exchanges completed during the storm")
    if completed < started:
        raise BenchError(f"{started - completed} of {started} exchanges lost during the storm")
    return sum(float(m.group(1)) for m in delays if m)


def script_path() -> str:
    return f"/boot/{machine(1)[1]}.ipxe"


class Bench(Protocol):
    log: list[str]

    def started(self, lab: Lab, kind: str, server: str) -> bool: ...
    def sample(self, key: str, server: str, measure_one: Callable[[], float]) -> None: ...
    def chosen(self, servers: tuple[str, ...]) -> list[str]: ...


SERVERS: dict[str, tuple[str, Sequence[str]]] = {
    "flood-tftp": ("tftp", ("pixiebox", "tftpd-hpa", "dnsmasq")),
    "flood-dhcp": ("dhcp", ("pixiebox", "kea", "dnsmasq")),
    "flood-http": ("http", ("pixiebox", "nginx")),
}


def run_round(bench: Bench, lab: Lab, flooder: Flooder) -> None:
    """One round of every flood against every server, each started afresh."""
    lab.make_file("tftp-1m.bin", MIB)
    lab.make_file("vmlinuz", MIB)
    for key, (kind, servers) in SERVERS.items():
        for server in bench.chosen(tuple(servers)):
            if bench.started(lab, kind, server):
                bench.sample(key, server, partial(_measure, key, server, lab, flooder, bench.log))
            lab.stop()


def _measure(key: str, server: str, lab: Lab, flooder: Flooder, log: list[str]) -> float:
    if key == "flood-tftp":
        return tftp_under_flood(lab, flooder, log)
    if key == "flood-dhcp":
        return dhcp_under_storm(lab, flooder, log)
    path = script_path()
    if server == "pixiebox":  # nginx gets a static file of the script's size
        (lab.assets / "script-static.ipxe").write_bytes(http_get(lab, path))
    else:
        path = "/assets/script-static.ipxe"
    return http_under_flood(lab, flooder, path, log)
