"""TFTP's limits ([tftp] in lab.toml, pixiebox.tftp.limits) against the real agent.

A flood of half-open RRQs (bench/floods/tftp_halfopen.py: spoofed ports and addresses, a
client-chosen timeout of 255 s) must not keep tftp-hpa's and curl's downloads from succeeding
meanwhile, nor leave descriptors behind once it ends; one address gets at most
max_transfers_per_client transfers, half-open ones giving way first; a timeout over
max_client_timeout is not acknowledged; a stop tells the clients and records their transfers.
The client side that no packaged client can play runs from this file in the client's namespace
(``python tests/test_tftp_limits.py cap|options|hold SERVER ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netlab
import pytest
from agentproc import RunningAgent, lab_toml, start_agent
from clientcli import DOWNLOAD, command_line
from pixiebox.core.firmware import packaged_ipxe_dir
from pixiebox.core.trixie import trixie_root
from pixiebox.events import Kind
from pixiebox.net.limits import Quota
from pixiebox.store.state import StateStore
from pixiebox.tftp import packets
from pixiebox.tftp.limits import Admission, Full, TftpLimits

THIS = Path(__file__).resolve()
FLOOD = THIS.parent.parent / "bench" / "floods" / "tftp_halfopen.py"

SUBNET = "10.87.0.0/16"
AGENT_IP = "10.87.0.2"
CLIENT_MAC, CLIENT_IP = "02:00:00:00:87:0a", "10.87.0.10"
FLOODER_IP = "10.87.0.20"
#: The flooder's forged addresses: 64 of them, routed to its own namespace so that the
#: agent's replies reach its silent sockets (no ICMP tells the agent that nobody listens).
FORGED = "10.87.64.0/26"
BOOT_FILE = "undionly.kpxe"  # Debian's ipxe package: trixie's unpacked, else /usr/lib/ipxe
BIG = "big.bin"
BIG_SIZE = 256 * 1024
#: [tftp] defaults (config.schema.TftpSection), which this lab.toml keeps.
MAX_TRANSFERS, PER_CLIENT, IDLE_TIMEOUT = 256, 8, 10
FDS_PER_TRANSFER = 3  # the connected socket, its stray catcher, the file


@dataclass
class Lab:
    segment: netlab.Segment
    agent: RunningAgent
    client: netlab.Host
    flooder: netlab.Host
    state: Path
    assets: Path

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.agent.proc.pid}/fd"))

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.agent.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1))  # type: ignore[union-attr]

    def script(self, *args: str, timeout: float = 30.0) -> dict[str, Any]:
        result = self.client.run([sys.executable, str(THIS), *args], timeout=timeout)
        return dict(json.loads(result.stdout))

    def failures(self) -> list[dict[str, Any]]:
        """c1's tftp.failed events, as the agent stored them."""
        store = StateStore(self.state)
        try:
            return [dict(e.fields) for e in store.events(CLIENT_MAC) if e.kind == Kind.TFTP_FAILED]
        finally:
            store.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    problem = netlab.prerequisite_problem(("tftp", "curl"))
    if problem:
        if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
            pytest.fail(f"CI=true but a TFTP test prerequisite is missing: {problem}")
        pytest.skip(problem)
    work = tmp_path_factory.mktemp("tftp-limits")
    assets, state = work / "assets", work / "state"
    assets.mkdir()
    (assets / BIG).write_bytes(os.urandom(BIG_SIZE))
    with netlab.Segment(work / "segment") as segment:
        agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/16")
        client = segment.add_host("client", mac=CLIENT_MAC, ip=f"{CLIENT_IP}/16")
        flooder = segment.add_host("flooder", ip=f"{FLOODER_IP}/16")
        flooder.run(["ip", "route", "add", "local", FORGED, "dev", "lo", "table", "local"])
        config = lab_toml(
            mode="reservation", subnet=SUBNET, assets=assets, state=state,
            machines=[("c1", CLIENT_MAC, CLIENT_IP)],
        )  # fmt: skip
        agent = start_agent(agent_host, config, work)
        yield Lab(segment, agent, client, flooder, state, assets)
        if agent.proc.poll() is None:
            agent.stop()


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    started = time.monotonic()
    yield
    assert time.monotonic() - started < 60, "a TFTP limits test took over 60 s"


def tftp_hpa_get(lab: Lab, name: str, out: Path) -> str:
    """tftp-hpa exits 0 even on an error and says it on stdout."""
    argv = ["tftp", "-m", "binary", AGENT_IP, "-c", "get", name, str(out)]
    result = lab.client.run(argv, timeout=30.0, check=False)
    return result.stdout + result.stderr


def loud_tftp_lines(text: str) -> int:
    """Log lines about TFTP above debug level (the agent's format: date time LEVEL message)."""
    return len(re.findall(r"^\S+ \S+ (?!DEBUG)\w+ .*over TFTP", text, re.MULTILINE))


# --------------------------------------------------------------------------- the rules


def test_half_open_transfers_give_way_oldest_first_and_progressing_ones_never() -> None:
    admission = Admission(TftpLimits(max_transfers=4, max_transfers_per_client=2))
    a1, a2, b1, c1 = ("10.0.0.1", 1), ("10.0.0.1", 2), ("10.0.0.2", 1), ("10.0.0.3", 1)
    for client in (a1, a2, b1):
        assert admission.make_room(client[0]) is None
        admission.started(client)
    admission.heard(a1)
    assert admission.make_room("10.0.0.1") == a2  # its own address's half-open one
    admission.heard(a2)
    with pytest.raises(Full) as full:
        admission.make_room("10.0.0.1")  # both of its transfers are progressing
    assert full.value.limit == "max_transfers_per_client"
    admission.started(c1)
    assert admission.make_room("10.0.0.4") == b1  # at max_transfers: the oldest half-open
    admission.heard(b1)
    admission.heard(c1)
    with pytest.raises(Full) as full:
        admission.make_room("10.0.0.4")
    assert full.value.limit == "max_transfers"
    for client in (a1, a2, b1, c1):
        admission.ended(client)
    assert len(admission) == 0 and admission.half_open() == 0
    assert admission._per_ip == {}  # no state kept for addresses without transfers


def test_quota_admits_a_burst_per_period_then_counts() -> None:
    now = [0.0]
    quota = Quota(burst=2, period=10.0, clock=lambda: now[0])
    assert [quota.admit("aborted:evicted") for _ in range(5)] == [0, 0, None, None, None]
    assert quota.admit("refused:busy") == 0  # each kind has its own
    now[0] = 10.0
    assert quota.admit("aborted:evicted") == 3  # the next line says how many were left out
    assert quota.admit("aborted:evicted") == 0


def test_error_packets_carry_only_fixed_texts() -> None:
    assert packets.error_packet(0, packets.BUSY) == b"\x00\x05\x00\x00server busy\x00"
    assert packets.error_packet(0, packets.STOPPING).endswith(b"server shutting down\x00")
    with pytest.raises(ValueError):
        packets.error_packet(0, "/srv/assets is full")
    with pytest.raises(ValueError):
        packets.error_packet(1, packets.BUSY)


# --------------------------------------------------------------------------- one address


def test_ninth_transfer_of_one_address_displaces_a_half_open_one_or_is_busy(lab: Lab) -> None:
    got = lab.script("cap", AGENT_IP, BIG, "--count", str(PER_CLIENT))
    # The same RRQ again from the same port is a retransmission: no second transfer.
    assert got["repeat_tids"] == 1, got
    # Eight half-open transfers, then a ninth: the oldest half-open one gives way, told so.
    assert got["ninth_first"] == "DATA 1", got
    assert got["evicted"] == [0, "server busy"], got
    # The other seven and the ninth acknowledge: eight progressing transfers. A tenth is busy,
    # and none of the eight is disturbed.
    assert got["tenth"] == [0, "server busy"], got
    assert got["progressing_next"] == ["DATA 3"] * PER_CLIENT, got
    reasons = [e.get("reason") for e in lab.failures()]
    assert "evicted" in reasons and "busy" in reasons, reasons


# --------------------------------------------------------------------------- timeout option


def test_client_timeout_over_the_cap_is_not_acknowledged_and_idle_transfers_end(
    lab: Lab,
) -> None:
    # A client that asked for 5 s and never answers: the OACK again after 5 s, and the
    # transfer ended at idle_timeout (10 s), not after six tries (30 s).
    idle_log = lab.client.log_path("idle")
    idle = lab.client.popen([sys.executable, str(THIS), "idle", AGENT_IP, BIG], idle_log)
    got = lab.script("options", AGENT_IP, BIG)
    assert got["255"]["oack"] == {"tsize": str(BIG_SIZE)}, got
    # The server keeps its own resend time (1 s), not the 255 s asked for.
    assert 0.5 < got["255"]["resend_after"] < 2.5, got
    assert got["5"]["oack"] == {"timeout": "5", "tsize": str(BIG_SIZE)}, got  # max_client_timeout
    assert got["6"]["oack"] == {"tsize": str(BIG_SIZE)}, got
    assert idle.wait(IDLE_TIMEOUT + 10) == 0, idle_log.read_text()
    oacks = json.loads(idle_log.read_text().strip().splitlines()[-1])["oacks"]
    assert len(oacks) == 2 and 4.5 < oacks[1] < 6.0, oacks
    ended = [e for e in lab.failures() if e.get("reason") == "timeout" and e["file"] == BIG]
    assert ended, lab.failures()
    said = "the client went away: no answer to the first packet for 10 s ([tftp] idle_timeout)"
    assert ended[-1]["detail"] == said, ended


# --------------------------------------------------------------------------- the flood


def test_half_open_flood_leaves_room_for_real_clients_and_no_descriptors(
    lab: Lab, tmp_path: Path
) -> None:
    wanted = (packaged_ipxe_dir(trixie_root("ipxe")) / BOOT_FILE).read_bytes()
    warm = tmp_path / "warm.bin"
    assert "Error" not in tftp_hpa_get(lab, BOOT_FILE, warm)  # whatever a first transfer opens
    assert warm.read_bytes() == wanted
    time.sleep(0.5)
    fds_before, rss_before = lab.fds(), lab.rss_kib()
    loud_before = loud_tftp_lines(lab.agent.text())

    # 2,000 RRQs at 400 a second from 64 forged addresses, each from a port of its own that
    # stays open and silent: more than max_transfers at once, eight a source address.
    flood_log = lab.flooder.log_path("flood")
    flood = lab.flooder.popen(
        [sys.executable, str(FLOOD), "--server", AGENT_IP, "--count", "2000", "--rate", "400",
         "--spoof-ports", "--sources", FORGED, "--timeout-option", "255", "--file", BOOT_FILE,
         "--linger", "1", "--max-seconds", "30"],
        flood_log,
    )  # fmt: skip
    netlab.wait_until(
        lambda: lab.fds() > fds_before + 100 * FDS_PER_TRANSFER, 10.0, 0.05, "the flood's transfers"
    )
    # Meanwhile real clients are served: tftp-hpa (plain RFC 1350) and curl (blksize, tsize).
    hpa_out, curl_out = tmp_path / "hpa.bin", tmp_path / "curl.bin"
    said = tftp_hpa_get(lab, BOOT_FILE, hpa_out)
    assert "Error" not in said, said
    assert hpa_out.read_bytes() == wanted
    got = lab.client.run(
        ["curl", "-sS", "--max-time", "20", f"tftp://{AGENT_IP}/{BOOT_FILE}", "-o", str(curl_out)],
        timeout=30.0,
        check=False,
    )
    assert got.returncode == 0, got.stderr
    assert curl_out.read_bytes() == wanted
    assert flood.poll() is None, "the flood ended before the real clients were done"
    peak = lab.fds()
    while flood.poll() is None:
        peak = max(peak, lab.fds())
        time.sleep(0.05)
    assert flood.returncode == 0, flood_log.read_text()
    report = json.loads(flood_log.read_text().strip().splitlines()[-1])
    ended = time.monotonic()

    assert report["sent"] == 2000 and report["send_errors"] == 0, report
    # Every RRQ was answered: a transfer began (its first packet), or it was told "busy";
    # a transfer that gave way to a newer one was told so too. Never "server error".
    assert report["transfers_seen"] > MAX_TRANSFERS, report
    assert report["errors"].get("0 server busy", 0) > 0, report
    assert set(report["errors"]) == {"0 server busy"}, report
    assert "OACK" not in report["replies_by_opcode"], report  # timeout=255 is not acknowledged
    assert peak <= fds_before + MAX_TRANSFERS * FDS_PER_TRANSFER + 16, (fds_before, peak)

    # Half-open transfers end within idle_timeout; their descriptors go with them.
    def settled() -> int | None:
        now = lab.fds()
        return now if now <= fds_before + 4 else None

    netlab.wait_until(settled, IDLE_TIMEOUT + 5.0, 0.2, f"fds back near {fds_before}")
    assert time.monotonic() - ended < IDLE_TIMEOUT + 5.0
    rss_after = lab.rss_kib()
    assert rss_after - rss_before < 24 * 1024, (rss_before, rss_after)  # KiB
    text = lab.agent.text()
    assert "Traceback" not in text
    # A few lines per kind and reason, not one per forged request.
    assert loud_tftp_lines(text) - loud_before < 150, loud_tftp_lines(text) - loud_before


# --------------------------------------------------------------------------- stop (last)


def test_sigterm_tells_the_client_and_records_the_transfer(lab: Lab) -> None:
    before = len([e for e in lab.failures() if e.get("reason") == "stopping"])
    out = lab.client.log_path("holder")
    holder = lab.client.popen([sys.executable, str(THIS), "hold", AGENT_IP, BIG], out)
    netlab.wait_until(lambda: "holding" in out.read_text(), 10.0, 0.05, "the holder's transfer")
    assert lab.agent.stop(signal.SIGTERM, timeout=15.0) == 0, lab.agent.text()[-3000:]
    assert holder.wait(15) == 0, out.read_text()
    got = json.loads(out.read_text().strip().splitlines()[-1])
    assert got["error"] == [0, "server shutting down"], got
    text = lab.agent.text()
    assert "Traceback" not in text and "closed database" not in text, text[-3000:]
    stopping = [e for e in lab.failures() if e.get("reason") == "stopping"]
    assert len(stopping) == before + 1 and stopping[-1]["file"] == BIG, stopping


# --------------------------------------------------------------------------- client side


def _rrq(name: str, **options: str) -> bytes:
    fields = [name, "octet", *(x for kv in options.items() for x in kv)]
    return struct.pack("!H", 1) + b"".join(f.encode() + b"\0" for f in fields)


def _ack(block: int) -> bytes:
    return struct.pack("!HH", 4, block)


def _recv(sock: socket.socket, timeout: float = 3.0) -> tuple[bytes, tuple[str, int]] | None:
    sock.settimeout(timeout)
    try:
        return sock.recvfrom(70000)
    except TimeoutError:
        return None


def _said(packet: tuple[bytes, tuple[str, int]] | None) -> Any:
    """ "DATA n", "OACK", [code, text] for an ERROR, None for silence."""
    if packet is None:
        return None
    data = packet[0]
    opcode = int.from_bytes(data[:2], "big")
    if opcode == 3:
        return f"DATA {int.from_bytes(data[2:4], 'big')}"
    if opcode == 5:
        return [int.from_bytes(data[2:4], "big"), data[4:].split(b"\0")[0].decode()]
    return "OACK" if opcode == 6 else f"opcode {opcode}"


def _cap(args: argparse.Namespace) -> dict[str, Any]:
    server = (args.server, 69)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(args.count + 2)]
    tids_of: dict[int, tuple[str, int]] = {}
    try:
        first, *rest = socks[: args.count]
        first.sendto(_rrq(args.name), server)
        first.sendto(_rrq(args.name), server)  # a retransmission
        tids = set()
        while (got := _recv(first, 0.5)) is not None:
            tids.add(got[1])
        for i, sock in enumerate(rest, 1):
            sock.sendto(_rrq(args.name), server)
            got = _recv(sock)
            assert got is not None and _said(got) == "DATA 1", _said(got)
            tids_of[i] = got[1]
        ninth = socks[args.count]
        ninth.sendto(_rrq(args.name), server)
        ninth_first = _recv(ninth)
        assert ninth_first is not None
        tids_of[args.count] = ninth_first[1]
        # The first socket's transfer was the oldest half-open one: drain its resent DATA 1.
        evicted = None
        while (got := _recv(first)) is not None:
            if _said(got) != "DATA 1":
                evicted = _said(got)
                break
        # The other seven and the ninth acknowledge DATA 1: eight progressing transfers.
        progressing = {i: socks[i] for i in range(1, args.count + 1)}
        for i, sock in progressing.items():
            sock.sendto(_ack(1), tids_of[i])
            assert _said(_recv(sock)) == "DATA 2"
        tenth = socks[args.count + 1]
        tenth.sendto(_rrq(args.name), server)
        tenth_said = _said(_recv(tenth))
        nexts = []
        for i, sock in progressing.items():
            sock.sendto(_ack(2), tids_of[i])
            nexts.append(_said(_recv(sock)))
        return {
            "repeat_tids": len(tids),
            "ninth_first": _said(ninth_first),
            "evicted": evicted,
            "tenth": tenth_said,
            "progressing_next": nexts,
        }
    finally:
        for i, tid in tids_of.items():  # end them now: the next test asks from this address
            socks[i].sendto(struct.pack("!HH", 5, 0) + b"done\0", tid)
        for sock in socks:
            sock.close()


def _options(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for timeout in ("255", "5", "6"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(_rrq(args.name, timeout=timeout, tsize="0"), (args.server, 69))
            got = _recv(sock)
            assert got is not None and _said(got) == "OACK", _said(got)
            sent = time.monotonic()
            fields = got[0][2:].split(b"\0")[:-1]
            oack = {k.decode(): v.decode() for k, v in zip(fields[0::2], fields[1::2], strict=True)}
            entry: dict[str, Any] = {"oack": oack}
            if timeout == "255":
                again = _recv(sock, 5.0)  # never acknowledged: when does it come again?
                entry["resend_after"] = time.monotonic() - sent if again else None
            sock.sendto(struct.pack("!HH", 5, 0) + b"done\0", got[1])  # end it
            result[timeout] = entry
    return result


def _idle(args: argparse.Namespace) -> dict[str, Any]:
    """Ask with timeout=5, never answer: when do the OACKs come (seconds after the first)?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(_rrq(args.name, timeout="5", tsize="0"), (args.server, 69))
        times: list[float] = []
        deadline = time.monotonic() + IDLE_TIMEOUT + 4.0
        while (left := deadline - time.monotonic()) > 0:
            got = _recv(sock, left)
            if got is not None and _said(got) == "OACK":
                times.append(time.monotonic())
        return {"oacks": [round(t - times[0], 2) for t in times]}


def _hold(args: argparse.Namespace) -> dict[str, Any]:
    """Take two blocks, then say nothing: what does the server send when it stops?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(_rrq(args.name), (args.server, 69))
        for block in (1, 2):
            got = _recv(sock)
            assert got is not None and _said(got) == f"DATA {block}", _said(got)
            sock.sendto(_ack(block), got[1])
        print("holding", flush=True)
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            got = _recv(sock, deadline - time.monotonic())
            said = _said(got)
            if isinstance(said, list):
                return {"error": said}
        return {"error": None}


def main(argv: list[str]) -> int:
    parser, commands = command_line("TFTP clients for the limits tests", {
        "cap": ("fill one address's transfers, then two more", DOWNLOAD),
        "options": ("ask timeout 255, 5 and 6", DOWNLOAD),
        "idle": ("ask timeout 5, never answer", DOWNLOAD),
        "hold": ("stall after 2 blocks", DOWNLOAD),
    })  # fmt: skip
    commands["cap"].add_argument("--count", type=int, default=8)
    args = parser.parse_args(argv)
    run = {"cap": _cap, "options": _options, "idle": _idle, "hold": _hold}[args.command]
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
