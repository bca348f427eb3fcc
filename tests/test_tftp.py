"""The TFTP server against real peers: tftp-hpa's ``tftp``, curl's ``tftp://`` and a raw client.

The server runs in its own namespace (tests/tftp_serve.py), the clients in another, on one
bridge. The raw client at the bottom of this file (``python tests/test_tftp.py raw ...``) does
what the packaged clients cannot: ask for options tftp-hpa never sends, stop mid-transfer, abort
an OACK the way EDK2 does, send malformed requests.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netlab
import pytest
from clientcli import DOWNLOAD, command_line
from hypothesis import given, settings
from hypothesis import strategies as st
from pixiebox.core.firmware import Assets
from pixiebox.net import paths
from pixiebox.tftp import packets as tftp
from pixiebox.tftp.files import BootFiles, places_for
from pixiebox.tftp.packets import Refused

TESTS_DIR = Path(__file__).resolve().parent
TFTP_SERVE = TESTS_DIR / "tftp_serve.py"
THIS = Path(__file__).resolve()

SERVER_IP = "10.69.0.2"
CLIENT_IP = "10.69.0.10"
MIB = 1024 * 1024
GENERATED = "pxelinux.cfg/default"
SECRET = b"not for TFTP clients\n"
#: A log line at warning level or above (tftp_serve.py's format: time level logger: message).
LOUD = re.compile(r"^\S+ \S+ (?:WARNING|ERROR|CRITICAL) ", re.MULTILINE)


# --------------------------------------------------------------------------- the lab


@dataclass
class TftpLab:
    server_host: netlab.Host
    client: netlab.Host
    proc: subprocess.Popen[bytes]
    log: Path
    events_path: Path
    root: Path
    fallback: Path
    outside: Path
    out: Path

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text().split("\n")[:-1]  # the last may be incomplete
        return [json.loads(line) for line in lines if line.strip()]

    def wait_event(
        self, kind: str, path: str, *, after: int = 0, timeout: float = 10.0
    ) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for event in self.events()[after:]:
                if event["kind"] == kind and event["path"] == path:
                    return event
            assert self.proc.poll() is None, f"TFTP server exited:\n{self.log_text()[-3000:]}"
            return None

        return netlab.wait_until(find, timeout, 0.05, f"{kind} event for {path}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def tftp_hpa(self, command: str, *args: str) -> str:
        """tftp-hpa 5.2 sends no options (plain RFC 1350, 512-byte blocks), exits 0 even on an
        error and prints errors ("Error code 2: ...") on stdout: its output is returned."""
        argv = ["tftp", "-m", "binary", SERVER_IP, "-c", command, *args]
        result = self.client.run(argv, timeout=60.0, check=False)
        return result.stdout + result.stderr

    def curl(self, name: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        """curl asks blksize (default 512) and tsize; exit 68 = not found, 69 = access violation."""
        argv = ["curl", "-sS", "--max-time", "30", *extra, f"tftp://{SERVER_IP}/{name}", "-o", out]
        return self.client.run([str(a) for a in argv], timeout=60.0, check=False)

    def raw(self, name: str, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        argv = [sys.executable, str(THIS), "raw", SERVER_IP, name, *args]
        result = self.client.run(argv, timeout=timeout)
        return dict(json.loads(result.stdout))

    def output(self, stem: str) -> Path:
        path = self.out / stem
        path.unlink(missing_ok=True)
        return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prerequisites() -> None:
    problem = netlab.prerequisite_problem(("tftp", "curl"))
    if problem:
        if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
            pytest.fail(f"CI=true but a TFTP test prerequisite is missing: {problem}")
        pytest.skip(problem)


def start_server(
    host: netlab.Host, root: Path, events: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    log = host.log_path("tftp")
    argv = [sys.executable, str(TFTP_SERVE), "--root", str(root), "--interface", host.iface,
            "--events", str(events), *extra]  # fmt: skip
    proc = host.popen(argv, log)

    def ready() -> bool:
        text = log.read_text(errors="replace") if log.exists() else ""
        if proc.poll() is not None:
            raise AssertionError(f"tftp_serve.py exited ({proc.returncode}):\n{text[-3000:]}")
        return "TFTP serving" in text

    netlab.wait_until(ready, 15.0, 0.05, "tftp_serve.py ready")
    return proc, log


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TftpLab]:
    prerequisites()
    work = tmp_path_factory.mktemp("tftp")
    root, fallback, outside, out = (work / d for d in ("root", "fallback", "outside", "out"))
    for directory in (root / "sub" / "dir", fallback, outside, out):
        directory.mkdir(parents=True)
    (root / "big.bin").write_bytes(os.urandom(MIB))
    (root / "wrap.bin").write_bytes(os.urandom(8 * 70_000 + 3))  # 70,001 blocks of 8 bytes
    (root / "ipxe.efi").write_bytes(b"root ipxe.efi\n" * 500)
    (root / "sub" / "dir" / "file.txt").write_bytes(b"deep file\n")
    for name in ("stall-close.bin", "stall-silent.bin", "stall-stop.bin"):
        (root / name).write_bytes(os.urandom(64 * 1024))
    (outside / "secret.txt").write_bytes(SECRET)
    (root / "escape").symlink_to(outside / "secret.txt")  # a link leaving the root
    (root / "escape-dir").symlink_to(outside)
    (root / "alias.bin").symlink_to("big.bin")  # a link inside the root is fine
    (fallback / "undionly.kpxe").write_bytes(os.urandom(74213))
    (fallback / "ipxe.efi").write_bytes(b"fallback ipxe.efi\n")
    # Like Debian's /usr/lib/ipxe/ipxe.efi -> /boot/ipxe.efi: a package's own link.
    (outside / "packaged.efi").write_bytes(b"packaged build\n")
    (fallback / "linked.efi").symlink_to(outside / "packaged.efi")
    with netlab.Segment(work / "segment") as segment:
        server_host = segment.add_host("tftpd", ip=f"{SERVER_IP}/24")
        client = segment.add_host("client", ip=f"{CLIENT_IP}/24")
        events = work / "events.jsonl"
        # test_twenty_tftp_hpa_clients_at_once_all_get_the_file: twenty clients share one
        # address, more than [tftp] max_transfers_per_client's default (test_tftp_limits.py).
        proc, log = start_server(
            server_host, root, events, "--fallback", f"ipxe/={fallback}",
            "--generate", f"{GENERATED}=label generated", "--max-transfers-per-client", "24",
        )  # fmt: skip
        yield TftpLab(server_host, client, proc, log, events, root, fallback, outside, out)
        assert proc.poll() is None, f"the TFTP server died:\n{log.read_text()[-3000:]}"


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    started = time.monotonic()
    yield
    assert time.monotonic() - started < 90, "a TFTP test took over 90 s"


# --------------------------------------------------------------------------- whole files


@pytest.mark.parametrize("blksize", [512, 1468])
def test_curl_gets_whole_file_with_blksize(lab: TftpLab, blksize: int) -> None:
    out = lab.output(f"curl-{blksize}.bin")
    before = len(lab.events())
    result = lab.curl("big.bin", out, "--tftp-blksize", str(blksize))
    assert result.returncode == 0, result.stderr
    assert sha256(out) == sha256(lab.root / "big.bin")
    event = lab.wait_event("sent", "big.bin", after=before)
    assert event["client_ip"] == CLIENT_IP
    assert event["size"] == MIB
    assert (event["bytes"], event["blksize"], event["reason"]) == (MIB, blksize, "")
    assert 0 < event["seconds"] < 30
    assert f"{CLIENT_IP} fetched big.bin (1.0 MiB) over TFTP" in lab.log_text()
    assert f"acknowledged {{'blksize': '{blksize}', 'tsize': '{MIB}'" in lab.log_text()


def test_tftp_hpa_gets_whole_file_without_options(lab: TftpLab) -> None:
    out = lab.output("hpa.bin")
    said = lab.tftp_hpa("get", "big.bin", str(out))
    assert "Error" not in said, said
    assert sha256(out) == sha256(lab.root / "big.bin")


def test_oack_reports_tsize_and_caps_blksize_at_the_path_mtu(lab: TftpLab) -> None:
    out = lab.output("raw-8192.bin")
    got = lab.raw("big.bin", "--opt", "tsize=0", "--opt", "BLKSIZE=8192", "--out", str(out))
    # Option names are case-insensitive (RFC 2347); 8192 would fragment on a 1500-byte MTU.
    assert got["oack"] == {"tsize": str(MIB), "blksize": "1468"}
    assert got["error"] is None
    assert sha256(out) == sha256(lab.root / "big.bin")


def test_timeout_option_is_acknowledged(lab: TftpLab) -> None:
    got = lab.raw("ipxe.efi", "--opt", "timeout=3", "--opt", "bigfile=1")
    assert got["oack"] == {"timeout": "3"}  # an unknown option is left out (RFC 2347)
    assert got["size"] == (lab.root / "ipxe.efi").stat().st_size


def test_unusable_options_fall_back_to_plain_rfc1350(lab: TftpLab) -> None:
    out = lab.output("raw-plain.bin")
    got = lab.raw("big.bin", "--opt", "blksize=abc", "--out", str(out))
    assert got["oack"] is None  # nothing acceptable: DATA 1 straight away
    assert sha256(out) == sha256(lab.root / "big.bin")


def test_edk2_size_query_then_download_is_not_a_failure(lab: TftpLab) -> None:
    """docs/firmware-quirks.md#17: RRQ tsize=0, ERROR 8 on the OACK, then the real request."""
    before = len(lab.events())
    loud = len(LOUD.findall(lab.log_text()))
    probe = lab.raw("big.bin", "--opt", "tsize=0", "--opt", "blksize=1468", "--probe")
    assert probe["oack"] == {"tsize": str(MIB), "blksize": "1468"}
    event = lab.wait_event("aborted", "big.bin", after=before)
    assert event["reason"] == "size-probe" and "ERROR 8" in event["detail"]
    out = lab.output("after-probe.bin")
    lab.raw("big.bin", "--opt", "blksize=1468", "--out", str(out))
    assert sha256(out) == sha256(lab.root / "big.bin")
    lab.wait_event("sent", "big.bin", after=before)
    lines = [line for line in lab.log_text().splitlines() if "asked for the size of" in line]
    assert lines and all(" DEBUG pixiebox.tftp: " in line for line in lines), lines
    assert len(LOUD.findall(lab.log_text())) == loud  # no warning or error about it


def test_a_stray_gets_error_5_and_the_transfer_completes(lab: TftpLab) -> None:
    """RFC 1350 section 4: a packet from another port to a transfer's port is answered with
    ERROR 5 ("Unknown transfer ID") and does not disturb the transfer."""
    before = len(lab.events())
    out = lab.output("stray.bin")
    got = lab.raw("big.bin", "--opt", "blksize=1468", "--stray-after", "3", "--out", str(out))
    assert got["stray"] == [5, 5]  # ERROR, code 5
    assert got["error"] is None
    assert sha256(out) == sha256(lab.root / "big.bin")
    lab.wait_event("sent", "big.bin", after=before)


def test_twenty_tftp_hpa_clients_at_once_all_get_the_file(lab: TftpLab) -> None:
    before = len(lab.events())
    out = lab.out / "many"
    out.mkdir(exist_ok=True)
    argv = [sys.executable, str(THIS), "many", SERVER_IP, "big.bin", "--out", str(out)]
    result = lab.client.run(argv, timeout=150.0)
    got = json.loads(result.stdout)
    assert got["sha256"] == [sha256(lab.root / "big.bin")] * 20, got["said"]
    netlab.wait_until(
        lambda: len([e for e in lab.events()[before:] if e["kind"] == "sent"]) >= 20,
        15.0,
        0.1,
        "20 sent events",
    )


@pytest.mark.parametrize("drop", [[], ["--drop", "6"], ["--drop", "4", "--drop", "13"]])
def test_windowsize_with_and_without_lost_blocks(lab: TftpLab, drop: list[str]) -> None:
    """RFC 7440 (EDK2 asks for windowsize 4): the client ACKs each window's last block, and
    after a gap the block before it, from which the server sends the window again."""
    out = lab.output("window.bin")
    opts = ["--opt", "blksize=1468", "--opt", "windowsize=4", "--opt", "timeout=1"]
    got = lab.raw("big.bin", *opts, *drop, "--out", str(out))
    assert got["oack"] == {"blksize": "1468", "windowsize": "4", "timeout": "1"}
    assert sha256(out) == sha256(lab.root / "big.bin")


def test_windowsize_is_capped(lab: TftpLab) -> None:
    got = lab.raw("ipxe.efi", "--opt", "windowsize=500")
    assert got["oack"] == {"windowsize": "16"}
    assert got["size"] == (lab.root / "ipxe.efi").stat().st_size


@pytest.mark.parametrize("drop", [["--drop", "6"], ["--drop", "45", "--drop", "46"]])
def test_lockstep_resends_a_lost_block_and_goes_on(lab: TftpLab, drop: list[str]) -> None:
    """RFC 1350: in lockstep a lost DATA block is sent again when the server's timer runs out,
    and the transfer goes on from it. At blksize 1468 block 45 is the first of the second
    64 KiB read ahead: the resend reads it again, and the ACKs after it take the fast path
    (tftp.transfers) again."""
    before = len(lab.events())
    out = lab.output("lockstep-lost.bin")
    opts = ["--opt", "blksize=1468", "--opt", "timeout=1"]
    got = lab.raw("big.bin", *opts, *drop, "--out", str(out))
    assert got["error"] is None
    assert sha256(out) == sha256(lab.root / "big.bin")
    assert lab.wait_event("sent", "big.bin", after=before)["bytes"] == MIB


def test_a_repeated_ack_mid_file_gets_no_second_block(lab: TftpLab) -> None:
    """RFC 1123 section 4.2.3.1: answering a duplicate ACK with DATA would double every packet
    from then on (the Sorcerer's Apprentice bug). Mid-file the blocks go from a worker thread
    (tftp.lending), which hands a repeated ACK to the protocol code; the file still arrives
    whole, each block once."""
    before = len(lab.events())
    out = lab.output("repeated-ack.bin")
    repeats = ["--repeat-ack", "10", "--repeat-ack", "300", "--repeat-ack", "600"]
    got = lab.raw("big.bin", "--opt", "blksize=1468", *repeats, "--out", str(out))
    assert got["error"] is None and got["duplicates"] == 0, got
    assert sha256(out) == sha256(lab.root / "big.bin")
    assert lab.wait_event("sent", "big.bin", after=before)["bytes"] == MIB


def test_an_error_from_the_client_mid_file_ends_the_transfer(lab: TftpLab) -> None:
    """RFC 1350: an ERROR ends a transfer. Sent while the blocks go from a worker thread,
    it ends there too: not one more block, and the outcome names the client's error."""
    before = len(lab.events())
    got = lab.raw("big.bin", "--opt", "blksize=1468", "--error-after", "100")
    assert got["blocks"] == 100 and got["after_error"] == 0, got
    event = lab.wait_event("aborted", "big.bin", after=before)
    assert event["reason"] == "peer-error" and "client gave up" in event["detail"], event


@contextlib.contextmanager
def _no_new_threads(pid: int) -> Iterator[None]:
    """Hold process `pid` in a pids cgroup of its own at its present number of tasks: the
    kernel refuses it any new thread (pthread_create: EAGAIN), root or not."""
    v1, v2 = Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")
    if v1.is_dir():
        base, hierarchy = v1, re.compile(r"^\d+:(?:[^:]*,)?pids(?:,[^:]*)?:(.*)$", re.MULTILINE)
    elif "pids" in (v2 / "cgroup.subtree_control").read_text().split():
        base, hierarchy = v2, re.compile(r"^0::(.*)$", re.MULTILINE)
    else:
        pytest.fail("no pids cgroup controller: the test cannot refuse the server a thread")
    found = hierarchy.search(Path(f"/proc/{pid}/cgroup").read_text())
    assert found, Path(f"/proc/{pid}/cgroup").read_text()
    home = base / found.group(1).lstrip("/")
    group = base / f"pixiebox-test-tftp-{os.getpid()}"
    group.mkdir()
    try:
        # Threads of earlier transfers may still be ending: hold at the count once it is still.
        tasks = netlab.wait_until(
            lambda: _still(pid), 10.0, 0.1, "the server's threads of earlier transfers to end"
        )
        (group / "pids.max").write_text(str(tasks))
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        (home / "cgroup.procs").write_text(str(pid))
        group.rmdir()


def _still(pid: int) -> int | None:
    """The number of tasks of `pid` if it stays the same for 0.3 s, else None."""
    count = len(os.listdir(f"/proc/{pid}/task"))
    time.sleep(0.3)
    return count if len(os.listdir(f"/proc/{pid}/task")) == count else None


def test_a_transfer_with_no_thread_to_be_had_goes_on_from_the_loop(lab: TftpLab) -> None:
    """When the system refuses a thread (tftp.lending), the transfer is not lent: the event loop
    serves it as it did before the threads, the file arrives whole, and the log says why."""
    before = len(lab.events())
    out = lab.output("no-thread.bin")
    with _no_new_threads(lab.proc.pid):
        got = lab.raw("big.bin", "--opt", "blksize=1468", "--out", str(out))
    assert got["error"] is None and got["duplicates"] == 0, got
    assert sha256(out) == sha256(lab.root / "big.bin")
    assert lab.wait_event("sent", "big.bin", after=before)["bytes"] == MIB
    assert "big.bin goes on from the event loop: no thread for it" in lab.log_text()


def test_block_numbers_wrap_after_65535(lab: TftpLab) -> None:
    """RFC 1350's block number has 16 bits; like tftpd-hpa and dnsmasq the server goes on from
    0 (tftp.transfer), which the lockstep fast path must match: 70,001 blocks arrive whole."""
    out = lab.output("wrap.bin")
    got = lab.raw("wrap.bin", "--opt", "blksize=8", "--out", str(out))
    assert got["error"] is None and got["blocks"] == 70_001
    assert sha256(out) == sha256(lab.root / "wrap.bin")


@pytest.mark.parametrize(
    ("hold", "reason"),
    [
        ("8", "no ACK for the last block"),
        ("0", "no ACK for the last block; the client has closed its port"),
    ],
)
def test_a_missing_last_ack_is_still_a_sent_file(lab: TftpLab, hold: str, reason: str) -> None:
    """docs/firmware-quirks.md#18: some clients never ACK the last block, and keep their port open
    or close it; either way the transfer counts as sent, not failed."""
    before = len(lab.events())
    loud = len(LOUD.findall(lab.log_text()))
    out = lab.output("no-last-ack.bin")
    lab.raw("ipxe.efi", "--opt", "timeout=1", "--no-last-ack", "--hold", hold, "--out", str(out))
    assert out.read_bytes() == (lab.root / "ipxe.efi").read_bytes()
    event = lab.wait_event("sent", "ipxe.efi", after=before, timeout=20.0)
    assert (event["reason"], event["detail"]) == ("no-last-ack", reason)
    assert event["bytes"] == event["size"] == (lab.root / "ipxe.efi").stat().st_size
    assert len(LOUD.findall(lab.log_text())) == loud  # no warning about it


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "code", "reason"),
    [
        ("../outside/secret.txt", 2, "climbs-out"),
        ("..\\outside\\secret.txt", 2, "climbs-out"),
        ("sub/../../outside/secret.txt", 2, "climbs-out"),
        ("escape", 2, "outside"),
        ("escape-dir/secret.txt", 2, "outside"),
        ("ipxe/../outside/secret.txt", 2, "climbs-out"),  # a name leaving a fallback dir
        (f"/{'../' * 12}etc/passwd", 2, "climbs-out"),
        ("/etc/passwd", 1, "not-found"),  # the root's /etc/passwd: there is none
    ],
)
def test_names_leaving_the_root_are_refused(
    lab: TftpLab, name: str, code: int, reason: str
) -> None:
    before = len(lab.events())
    out = lab.output("traversal.out")
    said = lab.tftp_hpa("get", name, str(out))
    # The client learns that it may not have the file, never why or where the server keeps
    # things: the code's fixed words only.
    assert said.strip() == f"Error code {code}: {tftp.CLIENT_TEXT[code]}", said
    assert str(lab.root.parent) not in said, said
    assert not out.exists() or out.read_bytes() == b""
    kind = "refused" if code == 2 else "not_found"
    event = netlab.wait_until(
        lambda: [e for e in lab.events()[before:] if e["kind"] == kind], 10.0, 0.05, kind
    )[0]
    assert event["client_ip"] == CLIENT_IP
    assert event["reason"] == reason
    # The reason stays with the server: in the event and the log line.
    assert event["detail"], event
    if code == 2:
        line = f"{CLIENT_IP} asked for {event['path']} over TFTP: refused, {event['detail']}"
        assert line in lab.log_text()
    if reason == "outside":
        assert str(lab.outside) in event["detail"]


@pytest.mark.parametrize(
    ("name", "reason", "target"),
    [
        ("../../etc/passwd", "climbs-out", None),
        ("passwd-link", "outside", "/etc/passwd"),  # a link in the root to the server's files
    ],
)
def test_error_packets_name_no_server_path_but_the_log_does(
    lab: TftpLab, name: str, reason: str, target: str | None
) -> None:
    """The ERROR a client gets says "Access violation" and nothing more; the reason, the root
    and the link's target are in the server's log line and the event."""
    link = lab.root / "passwd-link"
    link.symlink_to("/etc/passwd")
    try:
        before = len(lab.events())
        said = lab.tftp_hpa("get", name, str(lab.output("no-path.out")))
        assert said.strip() == "Error code 2: Access violation", said
        # The packet itself, byte for byte, as a raw client reads it.
        assert lab.raw(name)["error"] == [2, "Access violation"]
        event = lab.wait_event("refused", name, after=before)
        assert event["reason"] == reason and event["client_ip"] == CLIENT_IP
        for secret in (str(lab.root), target or "/etc/passwd", "leads outside", "'..'"):
            assert secret not in said, (secret, said)
        if target is not None:
            # tftp.failed's `detail` (from TftpEvent.detail) says where the link led.
            detail = f"{name} leads outside {os.path.realpath(lab.root)} (to {target})"
            assert event["detail"] == detail, event
        else:
            assert event["detail"] == "the path contains '..'", event
        line = f"{CLIENT_IP} asked for {name} over TFTP: refused, {event['detail']}; it got ERROR 2"
        assert line in lab.log_text()
    finally:
        link.unlink()


def test_curl_traversal_is_an_access_violation(lab: TftpLab) -> None:
    out = lab.output("curl-traversal.out")
    result = lab.curl("../outside/secret.txt", out, "--path-as-is")
    assert result.returncode == 69, (result.returncode, result.stderr)  # access violation
    assert not out.exists() or SECRET not in out.read_bytes()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("/ipxe.efi", "ipxe.efi"),  # firmware's leading slash means the root
        ("sub\\dir\\file.txt", "sub/dir/file.txt"),  # docs/firmware-quirks.md#18
        ("alias.bin", "big.bin"),  # a symlink that stays inside the root
    ],
)
def test_firmware_spellings_of_names_are_served(lab: TftpLab, name: str, expected: str) -> None:
    out = lab.output("spelling.out")
    said = lab.tftp_hpa("get", name, str(out))
    assert "Error" not in said, said
    assert out.read_bytes() == (lab.root / expected).read_bytes()


def test_upload_is_refused(lab: TftpLab) -> None:
    before = len(lab.events())
    local = lab.output("upload.bin")
    local.write_bytes(b"should not land\n")
    said = lab.tftp_hpa("put", str(local), "uploaded.bin")
    assert said.strip() == "Error code 2: Access violation", said
    assert not (lab.root / "uploaded.bin").exists()
    event = lab.wait_event("refused", "uploaded.bin", after=before)
    assert event["reason"] == "read-only" and "read-only" in event["detail"]
    assert f"{CLIENT_IP} tried to upload uploaded.bin over TFTP: refused" in lab.log_text()


def test_fallback_dir_serves_what_the_root_lacks(lab: TftpLab) -> None:
    wanted = (lab.fallback / "undionly.kpxe").read_bytes()
    for name in ("undionly.kpxe", "ipxe/undionly.kpxe"):
        out = lab.output("fallback.out")
        assert lab.curl(name, out).returncode == 0
        assert out.read_bytes() == wanted
    assert "fetched undionly.kpxe (72.5 KiB) over TFTP" in lab.log_text()
    assert "next it should ask DHCP again as iPXE" in lab.log_text()
    out = lab.output("linked.out")
    assert lab.curl("linked.efi", out).returncode == 0  # links in a package dir are followed
    assert out.read_bytes() == b"packaged build\n"
    out = lab.output("root-first.out")
    assert lab.curl("ipxe.efi", out).returncode == 0
    assert out.read_bytes() == (lab.root / "ipxe.efi").read_bytes()  # the root comes first


def test_not_found_names_where_it_looked(lab: TftpLab) -> None:
    before = len(lab.events())
    out = lab.output("missing.out")
    result = lab.curl("missing.efi", out)
    assert result.returncode == 68, result.stderr  # TFTP file not found
    event = lab.wait_event("not_found", "missing.efi", after=before)
    assert event["reason"] == "not-found"
    assert str(lab.root / "missing.efi") in event["detail"]
    assert str(lab.fallback / "missing.efi") in event["detail"]
    line = next(line for line in lab.log_text().splitlines() if "asked for missing.efi" in line)
    assert " WARNING " in line and CLIENT_IP in line and str(lab.root / "missing.efi") in line


@pytest.mark.parametrize("name", ["autoexec.ipxe", "0123abcd/bootsig.bin"])
def test_expected_misses_are_answered_fast_and_quietly(lab: TftpLab, name: str) -> None:
    """docs/firmware-quirks.md#25 (iPXE's autoexec.ipxe) and #27 (Raspberry Pi's bootsig.bin)."""
    before = len(lab.events())
    started = time.monotonic()
    result = lab.curl(name, lab.output("expected-miss.out"))
    assert result.returncode == 68, result.stderr
    assert time.monotonic() - started < 5
    assert lab.wait_event("not_found", name, after=before)["reason"] == "expected-miss"
    lines = [line for line in lab.log_text().splitlines() if f"asked for {name}" in line]
    assert lines and all(" DEBUG " in line for line in lines), lines


# --------------------------------------------------------------------------- robustness


def test_generated_file_twice_then_a_real_file(lab: TftpLab) -> None:
    """tftpy 0.8.6/0.8.7's TftpServer died after serving a BytesIO (flock on end()); ours not."""
    before = len(lab.events())
    for attempt in range(2):
        out = lab.output(f"generated-{attempt}.out")
        result = lab.curl(GENERATED, out)
        assert result.returncode == 0, result.stderr
        assert out.read_text() == f"label generated for {CLIENT_IP}\n"
    out = lab.output("after-generated.bin")
    assert lab.curl("big.bin", out, "--tftp-blksize", "1468").returncode == 0
    assert sha256(out) == sha256(lab.root / "big.bin")
    sent = [e for e in lab.events()[before:] if e["kind"] == "sent" and e["path"] == GENERATED]
    assert len(sent) == 2
    assert "Traceback" not in lab.log_text()
    assert "next it should fetch the kernel and initrd" in lab.log_text()


def test_vanished_clients_do_not_stop_the_server(lab: TftpLab) -> None:
    before = len(lab.events())
    silent_log = lab.client.log_path("silent-client")
    # Stops ACKing after two blocks but keeps its port open: only resends and a timeout tell.
    silent = lab.client.popen(
        [sys.executable, str(THIS), "raw", SERVER_IP, "stall-silent.bin", "--opt", "timeout=1",
         "--ack-blocks", "2", "--hold", "15"],
        silent_log,
    )  # fmt: skip
    # Takes two blocks and exits: the next resend meets a closed port.
    gone = lab.raw("stall-close.bin", "--opt", "timeout=1", "--ack-blocks", "2")
    assert gone["blocks"] == 3  # the third arrived and was never acknowledged
    # Meanwhile everybody else is served.
    out = lab.output("while-stalled.bin")
    assert lab.curl("big.bin", out, "--tftp-blksize", "1468").returncode == 0
    assert sha256(out) == sha256(lab.root / "big.bin")
    out = lab.output("while-stalled-hpa.bin")
    lab.tftp_hpa("get", "big.bin", str(out))
    assert sha256(out) == sha256(lab.root / "big.bin")
    assert silent.poll() is None, "the silent client should still hold its port"

    closed = lab.wait_event("aborted", "stall-close.bin", after=before, timeout=15.0)
    assert closed["reason"] == "gone" and "port is closed" in closed["detail"], closed
    assert 0 < closed["bytes"] < closed["size"]
    quiet = lab.wait_event("aborted", "stall-silent.bin", after=before, timeout=20.0)
    assert quiet["reason"] == "timeout" and "no ACK" in quiet["detail"], quiet
    assert f"{CLIENT_IP} stopped fetching stall-silent.bin over TFTP" in lab.log_text()
    lab.client.segment.stop(silent)
    out = lab.output("after-stalled.bin")
    assert lab.curl("big.bin", out).returncode == 0
    assert sha256(out) == sha256(lab.root / "big.bin")


def test_malformed_requests_do_not_stop_the_server(lab: TftpLab) -> None:
    """Each of these stopped tftpy 0.8.7's own listen() loop, or would have confused it."""
    junk = [
        b"\x00\x01\xff\xfe\x00octet\x00",  # a non-ASCII name (UnicodeDecodeError in tftpy)
        b"\x00\x01",  # truncated
        b"\x00\x01big.bin",  # not NUL-terminated
        b"\x00\x04\x00\x01",  # an ACK on the request port
        b"\x00\x09whatever\x00",  # no such opcode
        b"\x00\x01big.bin\x00octet\x00blksize\x00",  # an option without a value
    ]
    lab.client.run([sys.executable, str(THIS), "junk", SERVER_IP, *(j.hex() for j in junk)])
    lab.wait_event("not_found", "\\xff\\xfe")
    out = lab.output("after-junk.bin")
    assert lab.curl("big.bin", out, "--tftp-blksize", "1468").returncode == 0
    assert sha256(out) == sha256(lab.root / "big.bin")
    assert "Traceback" not in lab.log_text()


def test_stop_ends_transfers_and_leaves_no_thread_or_socket(segment: netlab.Segment) -> None:
    prerequisites()
    work = segment.workdir
    root = work / "root"
    root.mkdir()
    (root / "stall-stop.bin").write_bytes(os.urandom(64 * 1024))
    server = segment.add_host("tftpd", ip=f"{SERVER_IP}/24")
    client = segment.add_host("client", ip=f"{CLIENT_IP}/24")
    events = work / "events.jsonl"
    proc, log = start_server(server, root, events)
    # A second server on the same port must fail loudly, not share the port.
    second_log = server.log_path("tftp-second")
    second = server.popen(
        [sys.executable, str(TFTP_SERVE), "--root", str(root), "--events", str(work / "x")],
        second_log,
    )
    assert second.wait(15) != 0
    assert "TFTP cannot listen on 0.0.0.0:69" in second_log.read_text()
    assert "another TFTP server" in second_log.read_text()

    holder = client.popen(
        [sys.executable, str(THIS), "raw", SERVER_IP, "stall-stop.bin", "--ack-blocks", "2",
         "--hold", "20"],
        client.log_path("holder"),
    )  # fmt: skip
    netlab.wait_until(
        lambda: "asked for stall-stop.bin" in log.read_text(), 10.0, 0.05, "transfer started"
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "TFTP stopped: threads left 0 [], sockets left 0" in text, text[-3000:]
    assert "stopped fetching stall-stop.bin over TFTP" in text
    stopped = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(e["reason"], e["detail"]) for e in stopped if e["kind"] == "aborted"] == [
        ("stopping", "the TFTP server is stopping")
    ]
    segment.stop(holder)


# --------------------------------------------------------------------------- confinement


def test_one_confinement_rule_for_tftp_and_http(tmp_path: Path) -> None:
    """net.paths: links are followed only while they stay inside the root, except in a
    package directory; the client-facing text names no server path."""
    root, outside, package = (tmp_path / d for d in ("root", "outside", "package"))
    for directory in (root / "sub", outside, package):
        directory.mkdir(parents=True)
    (root / "sub" / "file").write_bytes(b"inside")
    (outside / "secret").write_bytes(b"secret")
    (root / "alias").symlink_to("sub/file")
    (root / "escape").symlink_to(outside / "secret")
    (root / "dangling").symlink_to(outside / "missing")
    (package / "linked.efi").symlink_to(outside / "secret")
    os.mkfifo(root / "fifo")

    opened = paths.open_file(root, "/sub//./file")
    assert opened is not None and opened.size == 6
    os.close(opened.fd)
    alias = paths.open_file(root, "alias")
    assert alias is not None
    os.close(alias.fd)
    assert paths.open_file(root, "missing") is None
    for name, reason in [("escape", "outside"), ("dangling", "outside"), ("a/../sub/file",
                         "climbs-out"), ("", "no-name"), ("fifo", "not-a-file"), ("sub",
                         "not-a-file")]:  # fmt: skip
        for check in (paths.open_file, paths.stat_file):
            with pytest.raises(paths.PathRefused) as refused:
                check(root, name)
            assert refused.value.reason == reason, (check, name)
    with pytest.raises(paths.PathRefused):
        paths.open_file(package, "linked.efi")  # not declared a package directory
    linked = paths.open_file(package, "linked.efi", packaged=True)
    assert linked is not None and os.pread(linked.fd, 6, 0) == b"secret"
    os.close(linked.fd)
    with pytest.raises(paths.PathRefused):
        paths.open_file(package, "../outside/secret", packaged=True)

    # The one boot-file resolver: HTTP's /ipxe/ finds what TFTP's ipxe/NAME finds.
    (root / "ipxe").mkdir()
    (root / "ipxe" / "snp.efi").write_bytes(b"arm64")
    (root / "ipxe" / "leak.efi").symlink_to(outside / "secret")
    assets = Assets(root, system_ipxe=package)
    assert assets.ipxe_binary("snp.efi") == (root / "ipxe" / "snp.efi").resolve()
    assert assets.ipxe_binary("linked.efi") == package / "linked.efi"
    assert assets.ipxe_binary("leak.efi") is None  # a link out of the assets
    assert assets.ipxe_binary("none.efi") is None
    files = BootFiles(places_for(root, assets.fallback_places))
    for name in ("ipxe/snp.efi", "snp.efi", "ipxe/linked.efi"):
        _, source = files.open(name, CLIENT_IP)
        source.close()
    with pytest.raises(Refused):
        files.open("ipxe/leak.efi", CLIENT_IP)


# --------------------------------------------------------------------------- packets


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_any_datagram_on_a_transfer_port_parses_or_is_ignored(data: bytes) -> None:
    reply = tftp.parse_reply(data)
    if reply is not None:
        opcode, number, text = reply
        assert opcode in (tftp.ACK, tftp.ERROR) and 0 <= number <= 0xFFFF
        assert text.isprintable() or text == ""


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_any_datagram_on_the_request_port_parses_or_is_malformed(data: bytes) -> None:
    try:
        opcode, name, mode, options = tftp.parse_request(data)
    except ValueError:
        return
    assert opcode in (tftp.RRQ, tftp.WRQ)
    assert isinstance(name, str) and mode == mode.lower()
    assert all(key == key.lower() for key in options)


@given(st.integers(0, 0xFFFF), st.sampled_from(sorted(tftp.CLIENT_TEXT)))
def test_ack_and_error_bytes(block: int, code: int) -> None:
    assert tftp.parse_reply(struct.pack("!HH", 4, block)) == (4, block, "")
    assert tftp.parse_reply(struct.pack("!HH", 4, block) + b"pad") == (4, block, "")
    sent = tftp.error_packet(code)
    assert sent[:4] == struct.pack("!HH", 5, code) and sent.endswith(b"\0")
    # A client is told the code's fixed words, nothing else (no path, no reason).
    assert tftp.parse_reply(sent) == (5, code, tftp.CLIENT_TEXT[code])
    assert tftp.parse_reply(b"\x00\x05\x00\x08") == (5, 8, "")  # EDK2: no message at all


def test_oack_bytes_keep_the_clients_order() -> None:
    packet = tftp.oack_packet({"tsize": "1048576", "blksize": "1468", "windowsize": "4"})
    assert packet == b"\x00\x06tsize\x001048576\x00blksize\x001468\x00windowsize\x004\x00"


@given(
    st.dictionaries(
        st.sampled_from(["blksize", "tsize", "timeout", "windowsize", "multicast", "x"]),
        st.one_of(st.integers(-5, 70000).map(str), st.text(max_size=6)),
    ),
    st.integers(0, 1 << 40),
    st.one_of(st.none(), st.integers(68, 65535)),
)
def test_negotiated_options_stay_in_their_ranges(
    options: dict[str, str], size: int, mtu: int | None
) -> None:
    accepted, timeout = tftp.negotiate(options, size, mtu)
    assert set(accepted) <= {"blksize", "tsize", "timeout", "windowsize"}
    if "blksize" in accepted:
        blksize = int(accepted["blksize"])
        assert tftp.MIN_BLKSIZE <= blksize <= tftp.MAX_BLKSIZE
        assert mtu is None or blksize <= max(tftp.MIN_BLKSIZE, mtu - 32)  # never fragmented
    if "windowsize" in accepted:
        assert 1 <= int(accepted["windowsize"]) <= tftp.MAX_WINDOWSIZE
    if "tsize" in accepted:
        assert accepted["tsize"] == str(size)
    assert (timeout is None) == ("timeout" not in accepted)


# --------------------------------------------------------------------------- raw client


def _packet(opcode: int, *fields: bytes) -> bytes:
    return struct.pack("!H", opcode) + b"".join(f + b"\0" for f in fields)


def _raw(args: argparse.Namespace) -> dict[str, Any]:
    """One download, packet by packet; see the options in main()."""
    server = (args.server, args.port)
    options: list[bytes] = []
    for item in args.opt:
        key, value = item.split("=", 1)
        options += [key.encode(), value.encode()]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.settimeout(5.0)
    result: dict[str, Any] = {"port": sock.getsockname()[1], "oack": None, "error": None}
    result["duplicates"] = 0
    sock.sendto(_packet(1, os.fsencode(args.name), b"octet", *options), server)
    data = bytearray()
    blocks, expected, blksize, window, acked = 0, 1, 512, 1, 0
    dropped: set[int] = set()
    peer: tuple[str, int] | None = None
    deadline = time.monotonic() + 45.0
    while time.monotonic() < deadline:
        packet, source = sock.recvfrom(70000)
        if peer is None:
            peer = source  # the server's TID (RFC 1350)
        elif source != peer:
            continue
        opcode = int.from_bytes(packet[:2], "big")
        if opcode == 6:  # OACK
            fields = packet[2:].split(b"\0")[:-1]
            oack = {k.decode(): v.decode() for k, v in zip(fields[0::2], fields[1::2], strict=True)}
            result["oack"] = oack
            if args.probe:  # EDK2: learn the size, then abort (docs/firmware-quirks.md#17)
                sock.sendto(struct.pack("!HH", 5, 8) + b"tsize query\0", peer)
                break
            blksize = int(oack.get("blksize", 512))
            window = int(oack.get("windowsize", 1))
            sock.sendto(struct.pack("!HH", 4, 0), peer)
        elif opcode == 5:  # ERROR
            code = int.from_bytes(packet[2:4], "big")
            result["error"] = [code, packet[4:].rstrip(b"\0").decode(errors="replace")]
            break
        elif opcode == 3:  # DATA
            block = int.from_bytes(packet[2:4], "big")
            if block in args.drop and block not in dropped:
                dropped.add(block)  # as if lost on the way, once
                continue
            if block != expected & 0xFFFF:
                result["duplicates"] += ((expected - block) & 0xFFFF) < 0x8000  # one we have
                if window > 1 and block == (expected + 1) & 0xFFFF:
                    # RFC 7440 section 4: a gap; acknowledge the last block in order.
                    acked = expected - 1
                    sock.sendto(struct.pack("!HH", 4, acked & 0xFFFF), peer)
                continue
            blocks += 1
            expected += 1
            data += packet[4:]
            last = len(packet) - 4 < blksize
            if args.ack_blocks is not None and blocks > args.ack_blocks:
                break  # vanish: this block is never acknowledged
            if last and args.no_last_ack:
                break  # like Windows clients (docs/firmware-quirks.md#18)
            if blocks == args.stray_after:
                result["stray"] = _stray(peer, block)
            if blocks == args.error_after:
                sock.sendto(struct.pack("!HH", 5, 0) + b"client gave up\0", peer)
                result["after_error"] = _heard_within(sock, 1.5)
                break
            if last or expected - 1 - acked >= window:  # RFC 7440: the window's last block
                acked = expected - 1
                sock.sendto(struct.pack("!HH", 4, block), peer)
                if blocks in args.repeat_ack:  # the same ACK again: a duplicate
                    sock.sendto(struct.pack("!HH", 4, block), peer)
            if last:
                break
    result.update(blocks=blocks, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    if args.out:
        Path(args.out).write_bytes(data)
    print(json.dumps(result), flush=True)
    if args.hold:
        time.sleep(args.hold)  # keep the port open and say nothing
    sock.close()
    return result


def _heard_within(sock: socket.socket, seconds: float) -> int:
    """Datagrams that reach `sock` within `seconds`."""
    heard = 0
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            sock.recvfrom(70000)
        except TimeoutError:
            break
        heard += 1
    return heard


def _stray(peer: tuple[str, int], block: int) -> list[int] | None:
    """Send an ACK to the server's TID from another port; what came back (RFC 1350 section 4
    says ERROR 5, "Unknown transfer ID")."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.settimeout(5.0)
        other.sendto(struct.pack("!HH", 4, block), peer)
        try:
            reply, source = other.recvfrom(600)
        except TimeoutError:
            return None
        assert source == peer, (source, peer)
        return [int.from_bytes(reply[:2], "big"), int.from_bytes(reply[2:4], "big")]


def _many(args: argparse.Namespace) -> None:
    """N tftp-hpa clients at once, each to its own file; prints the sha256 of each."""
    out = Path(args.out)
    procs = [
        subprocess.Popen(
            ["tftp", "-m", "binary", args.server, "-c", "get", args.name, str(out / f"{i}.bin")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(args.clients)
    ]
    said = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    digests = [
        sha256(out / f"{i}.bin") if (out / f"{i}.bin").exists() else None
        for i in range(args.clients)
    ]
    print(json.dumps({"sha256": digests, "said": said}), flush=True)


def main(argv: list[str]) -> int:
    parser, commands = command_line("a raw TFTP client for these tests", {
        "raw": ("download NAME packet by packet, print JSON", DOWNLOAD),
        "many": ("N tftp-hpa clients at once; prints sha256s", DOWNLOAD),
        "junk": ("send datagrams (hex) to the request port", ("server",)),
    })  # fmt: skip
    raw = commands["raw"]
    raw.add_argument("--port", type=int, default=69)
    raw.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE")
    raw.add_argument("--out")
    raw.add_argument("--probe", action="store_true", help="abort the OACK with ERROR 8")
    raw.add_argument("--ack-blocks", type=int, help="acknowledge this many blocks, then stop")
    raw.add_argument("--hold", type=float, default=0.0, help="then keep the port open for S s")
    raw.add_argument("--no-last-ack", action="store_true", help="never ACK the last block")
    raw.add_argument("--stray-after", type=int, help="after block N, poke the TID from elsewhere")
    raw.add_argument("--drop", type=int, action="append", default=[], help="lose block N once")
    raw.add_argument("--repeat-ack", type=int, action="append", default=[], help="ACK N twice")
    raw.add_argument("--error-after", type=int, help="after block N, send ERROR 0 and listen")
    commands["many"].add_argument("--clients", type=int, default=20)
    commands["many"].add_argument("--out", required=True)
    commands["junk"].add_argument("packets", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "raw":
        _raw(args)
    elif args.command == "many":
        _many(args)
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for packet in args.packets:
                sock.sendto(bytes.fromhex(packet), (args.server, 69))
                time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
