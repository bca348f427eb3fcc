"""Durability that means what it says (issue 13): an ACK leaves only after its lease is on stable
storage, the files that hold secrets and lab.toml edits are fsynced, and a SIGTERM stops the
agent cleanly: TFTP clients get an ERROR, downloads finish or are cut off, their events are
stored, and only then does the store close.

The lease check runs the real agent under strace and reads the order of its system calls: the
WAL page holding the lease is written, the WAL is fsynced, and only then is the ACK sent. With
`synchronous=NORMAL` (the store before issue 13) no fsync comes between them and the test fails.

`python tests/test_durability.py tftp-slow SERVER NAME` is the slow TFTP client the stop test
runs in a namespace (it prints one JSON object).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import struct
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import netlab
import pytest
from agentproc import READY, RunningAgent, lab_toml
from pixiebox.config.labfile import enroll
from pixiebox.dhcp.codec import BOOTREQUEST, MessageType, Opt, Packet, decode, encode
from pixiebox.dhcp.server import DhcpServer
from pixiebox.http.api import ensure_token
from pixiebox.store.identity import (
    HOST_KEY_FILE,
    HOST_PUBLIC_FILE,
    NODE_PASSWORD_FILE,
    IdentityStore,
)

THIS = Path(__file__).resolve()
SUBNET = "10.83.0.0/24"
AGENT_IP = "10.83.0.2"
C1_MAC, C1_IP = "02:00:00:00:83:01", "10.83.0.31"
#: DHCP option 53's value of an ACK (RFC 2132 9.6).
_DHCPACK = 5
_MAGIC = bytes([99, 130, 83, 99])


def _config(workdir: Path, mode: str = "reservation") -> str:
    return lab_toml(
        mode=mode, subnet=SUBNET, assets=workdir / "assets", state=workdir / "state",
        machines=[("c1", C1_MAC, C1_IP)], lease_time="10m",
    )  # fmt: skip


def _write_config(workdir: Path, host: netlab.Host, mode: str = "reservation") -> Path:
    config = workdir / f"lab-{host.role}.toml"
    config.write_text(_config(workdir, mode))
    return config


def _state_db(workdir: Path) -> sqlite3.Connection:
    """The agent's database, read-only (the agent has exited or is running)."""
    return sqlite3.connect(f"file:{workdir / 'state' / 'pixiebox.db'}?mode=ro", uri=True)


# --------------------------------------------------------------------------- the ACK and its fsync


_CALL = re.compile(
    r"^(?P<pid>\d+) +(?P<name>\w+)\((?P<fd>\d+)<(?P<path>(?:\\x[0-9a-f]{2})*)>(?P<rest>.*)$"
)
_STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')


def _unhex(text: str) -> bytes:
    """What strace -xx wrote as \\xNN\\xNN... (buffers, and the paths of -y too)."""
    return bytes.fromhex(text.replace("\\x", ""))


def _bytes_of(rest: str) -> bytes:
    """The first string argument of a strace line written with -xx."""
    found = _STRING.search(rest)
    return _unhex(found.group(1)) if found else b""


def _dhcp_type(payload: bytes) -> int | None:
    """Option 53 of a BOOTP payload (options start after the 236-byte header and the cookie)."""
    if len(payload) < 240 or payload[236:240] != _MAGIC:
        return None
    at = 240
    while at < len(payload):
        code = payload[at]
        if code == 255:
            return None
        if code == 0:
            at += 1
            continue
        if at + 1 >= len(payload):
            return None
        length = payload[at + 1]
        if code == 53 and length == 1 and at + 2 < len(payload):
            return payload[at + 2]
        at += 2 + length
    return None


def _syscalls(trace: Path) -> Iterator[tuple[str, str, bytes]]:
    """(call, what: "wal", "dhcp" or "", its data) for each traced call, in the order strace
    saw them begin (`-f` may split a call over an "unfinished" and a "resumed" line: the first
    carries the arguments)."""
    for line in trace.read_text(errors="replace").splitlines():
        call = _CALL.match(line)
        if call is None:
            continue
        name, path = call["name"], _unhex(call["path"]).decode(errors="replace")
        if path.endswith("pixiebox.db-wal"):
            yield name, "wal", _bytes_of(call["rest"]) if name == "pwrite64" else b""
        elif name in ("sendto", "sendmsg") and "htons(68)" in call["rest"]:
            yield name, "dhcp", _bytes_of(call["rest"])


def test_an_ack_leaves_only_after_its_lease_is_fsynced(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("dhclient", "strace")  # type: ignore[operator]
    host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    config = _write_config(workdir, host)
    trace = workdir / "agent.strace"
    # -xx: every byte of a buffer as \xNN; -s: whole WAL pages (4 KiB) and DHCP packets.
    argv = [shutil.which("strace") or "strace", "-f", "-qq", "-y", "-xx", "-s", "8192",
            "-e", "trace=fsync,fdatasync,pwrite64,sendto,sendmsg", "-o", str(trace),
            sys.executable, "-m", "pixiebox.cli", "serve", "--config", str(config)]  # fmt: skip
    running = RunningAgent(host, config)
    running.log = host.log_path("agent")
    running.proc = host.popen(argv, running.log)
    running.wait_log(READY, 30)
    c1 = segment.add_host("c1", mac=C1_MAC)
    lease = netlab.run_dhclient(c1, workdir / "c1")
    assert lease.ip == C1_IP
    # To the group: the agent stops on its own SIGTERM; strace then exits with its status.
    os.killpg(running.proc.pid, signal.SIGTERM)
    assert running.wait_exit(20) == 0, running.text()[-3000:]
    with _state_db(workdir) as db:
        stored = db.execute("SELECT mac, state FROM leases WHERE ip = ?", (C1_IP,)).fetchall()
    assert stored == [(C1_MAC, "bound")]

    # The lease's row is in a WAL page (ip and MAC as text); the ACK is the sendto to port 68
    # whose option 53 says ACK.
    calls = list(_syscalls(trace))
    acks = [i for i, (_, what, data) in enumerate(calls)
            if what == "dhcp" and _dhcp_type(data) == _DHCPACK]  # fmt: skip
    assert acks, f"no DHCPACK in the trace:\n{trace.read_text()[-3000:]}"
    ack = acks[0]
    row = (C1_IP.encode(), C1_MAC.encode())
    writes = [i for i, (name, what, data) in enumerate(calls[:ack])
              if what == "wal" and name == "pwrite64" and all(x in data for x in row)]  # fmt: skip
    assert writes, "the lease was not written to the WAL before the ACK left"
    synced = [name for name, what, _ in calls[writes[-1] + 1 : ack]
              if what == "wal" and name in ("fsync", "fdatasync")]  # fmt: skip
    assert synced, (
        "the ACK left before the WAL holding its lease was fsynced: "
        f"{[(n, w) for n, w, _ in calls[writes[-1] : ack + 1]]}"
    )


class _Unsaved:
    """A DHCP mode that answers every request with itself and whose commit fails until told
    otherwise (the disk full, the database held by another program)."""

    mode = "test"

    def __init__(self, port: int) -> None:
        self.ports = (port,)
        self.failing = True

    def handle(self, request: Packet, port: int) -> Packet | None:
        return request

    def flush(self) -> None:
        if self.failing:
            raise sqlite3.OperationalError("database or disk is full")

    def reload(self) -> None:
        pass

    def held_addresses(self) -> set[IPv4Address]:
        return set()

    def known(self, mac: str) -> bool:
        return False


def test_a_batch_whose_commit_failed_sends_no_replies(tmp_path: Path) -> None:
    """The DHCP server sends a batch's replies only once its COMMIT succeeded: an ACK whose
    lease may not be stored stays unsent (the client retransmits, RFC 2131 4.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options: dict[int, bytes] = {Opt.MESSAGE_TYPE: bytes((MessageType.DISCOVER,))}
    discover = encode(Packet(op=BOOTREQUEST, xid=7, chaddr=bytes.fromhex("020000008301"),
                             options=options))  # fmt: skip

    async def exchange(server: DhcpServer, client: socket.socket) -> bytes | None:
        client.sendto(discover, ("127.0.0.1", port))
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recv(client, 1500), 1.0)
        except TimeoutError:
            return None

    async def run() -> tuple[bytes | None, bytes | None, int]:
        handler = _Unsaved(port)
        server = DhcpServer(handler, "lo")
        await server.start()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.bind(("127.0.0.1", 0))
                client.setblocking(False)
                unsaved = await exchange(server, client)
                handler.failing = False
                saved = await exchange(server, client)
        finally:
            server.close()
        return unsaved, saved, server.stats["unsaved"]

    unsaved, saved, count = asyncio.run(run())
    assert unsaved is None and count == 1
    assert saved is not None and decode(saved).xid == 7


# --------------------------------------------------------------------------- files that are fsynced


def _recording_fsync(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every os.fsync from now on, as the path of the descriptor it was given."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def _made_durably(final: Path, synced: list[str]) -> bool:
    """`final` was written as a temporary file beside it (".<name>.<random>.tmp") that was
    fsynced, and its directory was fsynced after the rename or link."""
    temps = [Path(p) for p in synced if Path(p).parent == final.parent
             and Path(p).name.startswith(f".{final.name}.")]  # fmt: skip
    return bool(temps) and final.is_file() and str(final.parent) in synced


def test_token_identities_and_lab_toml_edits_are_fsynced_with_their_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each is written to a temporary file that is fsynced, renamed or linked into place, and
    its directory fsynced: a power cut leaves the old file or the new, never a torn one or
    none (a node password or host key handed out and then lost would lock the machine out)."""
    synced = _recording_fsync(monkeypatch)
    token_file = tmp_path / "api" / "token"
    ensure_token(token_file)
    assert _made_durably(token_file, synced), synced

    identities = IdentityStore(tmp_path / "state" / "identity")
    identities.agent_token()
    identities.for_machine(C1_MAC)
    assert _made_durably(identities.agent_token_file, synced), synced
    for name in (HOST_KEY_FILE, HOST_PUBLIC_FILE, NODE_PASSWORD_FILE):
        assert _made_durably(identities.directory(C1_MAC) / name, synced), (name, synced)

    lab = tmp_path / "lab" / "lab.toml"
    lab.parent.mkdir()
    lab.write_text(_config(tmp_path))
    synced.clear()
    enroll(lab, "02:00:00:00:83:02", None, None)
    assert _made_durably(lab, synced), synced
    assert "02:00:00:00:83:02" in lab.read_text()


# --------------------------------------------------------------------------- a clean stop


def test_sigterm_during_downloads_stops_cleanly_with_their_events_stored(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl")  # type: ignore[operator]
    initrd = workdir / "assets" / "osie" / "initrd"
    initrd.parent.mkdir(parents=True)
    with initrd.open("wb") as file:
        file.truncate(64 << 20)  # the default image's initrd: a download that takes a while
    host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    config = _write_config(workdir, host)
    running = RunningAgent(host, config).start(timeout=30)
    c1 = segment.add_host("c1", mac=C1_MAC, ip=f"{C1_IP}/24")
    curl = c1.popen(
        ["curl", "-sS", "--limit-rate", "1M", "-o", "/dev/null", "--max-time", "60",
         f"http://{AGENT_IP}/assets/osie/initrd"],
        c1.log_path("curl"),
    )  # fmt: skip
    tftp_out = workdir / "tftp-slow.json"
    tftp = c1.popen(
        [sys.executable, str(THIS), "tftp-slow", AGENT_IP, "osie/initrd", "--out", str(tftp_out)],
        c1.log_path("tftp-slow"),
    )

    def under_way() -> bool:
        downloads = host.run(["ss", "-Htn", "state", "established", "sport", "= :80"]).stdout
        return "asked for osie/initrd" in running.text() and C1_IP in downloads

    netlab.wait_until(under_way, 15.0, 0.1, "the TFTP and HTTP downloads never started")
    time.sleep(0.5)
    started = time.monotonic()
    running.proc.send_signal(signal.SIGTERM)
    status = running.wait_exit(20)
    took = time.monotonic() - started
    text = running.text()
    assert status == 0, text[-3000:]
    assert took < 15, f"stopping took {took:.1f} s"
    assert "Traceback" not in text and "closed database" not in text, text[-4000:]
    assert "Pixiebox stopped" in text

    netlab.wait_until(lambda: tftp.poll() is not None, 10.0, 0.1, "the TFTP client never ended")
    got = json.loads(tftp_out.read_text())
    assert got["blocks"] > 0 and got["error"] is not None, got  # an ERROR, not silence
    segment.stop(curl)

    with _state_db(workdir) as db:
        rows = db.execute("SELECT kind, fields FROM events WHERE mac = ? ORDER BY id",
                          (C1_MAC,)).fetchall()  # fmt: skip
    events = [(kind, json.loads(fields)) for kind, fields in rows]
    tftp_failed = [f for k, f in events if k == "tftp.failed" and f.get("file") == "osie/initrd"]
    assert [f["reason"] for f in tftp_failed] == ["stopping"], events
    broken = [f for k, f in events
              if k == "http.failed" and f.get("file") == "/assets/osie/initrd"]  # fmt: skip
    assert [f["reason"] for f in broken] == ["broken"], events


def test_sigterm_while_starting_is_a_clean_stop_too(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    """The agent handles SIGTERM from its first moment: one that comes while the DHCP guard
    still listens (seconds, in reservation mode) stops it with status 0, before it serves."""
    netlab_require()  # type: ignore[operator]
    host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    running = RunningAgent(host, _write_config(workdir, host)).start(ready=None)
    running.wait_log("for other DHCP servers on eth0 before answering", 20)
    running.proc.send_signal(signal.SIGTERM)
    assert running.wait_exit(15) == 0, running.text()[-3000:]
    text = running.text()
    assert "Pixiebox stopped before it served" in text and READY not in text, text[-3000:]
    assert "Traceback" not in text


# --------------------------------------------------------------------------- the slow TFTP client


def _tftp_slow(server: str, name: str, out: Path, pause: float, limit: float) -> None:
    """Download `name` acknowledging each block after `pause` s, until the last block, an
    ERROR, silence or `limit` s; writes {"blocks", "error"} to `out`."""
    result: dict[str, object] = {"blocks": 0, "error": None}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(8.0)
        sock.sendto(b"\0\1" + name.encode() + b"\0octet\0", (server, 69))
        deadline = time.monotonic() + limit
        try:
            while time.monotonic() < deadline:
                packet, peer = sock.recvfrom(1024)
                opcode = int.from_bytes(packet[:2], "big")
                if opcode == 5:
                    text = packet[4:].rstrip(b"\0").decode(errors="replace")
                    result["error"] = [int.from_bytes(packet[2:4], "big"), text]
                    break
                if opcode != 3:
                    continue
                result["blocks"] = int(result["blocks"]) + 1  # type: ignore[call-overload]
                time.sleep(pause)
                sock.sendto(struct.pack("!HH", 4, int.from_bytes(packet[2:4], "big")), peer)
                if len(packet) < 516:
                    break
        except TimeoutError:
            result["error"] = None  # silence: the server went away without a word
    out.write_text(json.dumps(result))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="helpers of tests/test_durability.py")
    commands = parser.add_subparsers(dest="command", required=True)
    slow = commands.add_parser("tftp-slow", help="a TFTP download that acknowledges slowly")
    slow.add_argument("server")
    slow.add_argument("name")
    slow.add_argument("--out", type=Path, required=True)
    slow.add_argument("--pause", type=float, default=0.05, help="seconds before each ACK")
    slow.add_argument("--limit", type=float, default=60.0, help="give up after this many s")
    args = parser.parse_args(argv)
    _tftp_slow(args.server, args.name, args.out, args.pause, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
