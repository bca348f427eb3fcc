"""`pixiebox doctor`: why did (or didn't) a machine boot?

Unit tests read made-up event logs built from kinds and fields (pixiebox.events.KINDS), with a
placeholder for every message: the doctor decides from the facts, never from the sentences. The
integration tests break real boots on purpose, with real peers in network namespaces and a real
agent: a firewall in front of the boot HTTP server, a firmware that never fetches its boot file,
an OS that never phones home.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import netlab
import pytest
from agentproc import RunningAgent, lab_toml, start_agent
from pixiebox.core.lifecycle import MachineState
from pixiebox.doctor import (
    ATTEMPT_GAP,
    DEFAULT_BOOT_TIMEOUT,
    Diagnosis,
    diagnose,
    render,
    seconds_parameter,
    split_attempts,
    timeline,
    unknown_machine,
)
from pixiebox.events import Event, FieldValue, Kind, fields_of

MAC = "02:00:00:00:86:01"
SCRIPT_URL = f"http://10.86.0.2/boot/{MAC}.ipxe"
T0 = 1_700_000_000.0
#: What every made-up event says: the doctor must not need more.
MESSAGE = "(a sentence for people)"
#: A message full of what the doctor once looked for in sentences: it must change nothing.
TRAP = (
    "iPXE asked to boot; sent a proxy OFFER with script URL http://10.9.9.9:9999/boot/x.ipxe; "
    'unknown = "ignore"; broke off; no [images.x]; bound; fetched a.efi over TFTP; '
    "next: kernel trap/vmlinuz"
)
MiB = 1024 * 1024

# The facts of each step, as the emitters record them (see pixiebox.events.KINDS).
PROXY = {"mode": "proxy", "arch": "x86_64"}
UEFI_OFFER = {**PROXY, "port": 67, "firmware": "UEFI", "ipxe": False, "boot_file": "ipxe.efi"}
UEFI_ACK = {**UEFI_OFFER, "port": 4011}
BIOS_OFFER = {**PROXY, "port": 67, "firmware": "BIOS", "ipxe": False, "boot_file": "undionly.kpxe"}
IPXE_OFFER = {**PROXY, "port": 67, "firmware": "iPXE", "ipxe": True, "boot_file": SCRIPT_URL}
SCRIPT = {"file": f"/boot/{MAC}.ipxe", "image": "osie", "kernel": "osie/vmlinuz",
          "initrds": "osie/initrd"}  # fmt: skip
KERNEL = {"file": "/assets/osie/vmlinuz", "bytes": 5 * MiB, "seconds": 0.4}
INITRD = {"file": "/assets/osie/initrd", "bytes": 30 * MiB, "seconds": 2.1}


def ev(kind: Kind, at: float, message: str = MESSAGE, /, **fields: FieldValue) -> Event:
    """An event of c1 `at` seconds after T0, with only documented fields."""
    assert set(fields) <= set(fields_of(kind)), (kind, set(fields) - set(fields_of(kind)))
    return Event(0, MAC, T0 + at, kind, message, fields)


class Log:
    """Builds an event log: `log.at(seconds, kind, **fields)`; every event says `message`."""

    def __init__(self, message: str = MESSAGE) -> None:
        self.events: list[Event] = []
        self.message = message

    def at(self, seconds: float, kind: Kind, /, **fields: FieldValue) -> Log:
        event = ev(kind, seconds, self.message, **fields)
        self.events.append(dataclasses.replace(event, id=len(self.events) + 1))
        return self

    def uefi_to_ipxe(self, start: float = 0.0) -> Log:
        """What UEFI firmware does up to iPXE asking for its script."""
        return (
            self.at(start, Kind.DHCP_OFFER, **UEFI_OFFER)
            .at(start + 1.5, Kind.DHCP_ACK, **UEFI_ACK)
            .at(start + 1.6, Kind.TFTP_FAILED, file="ipxe.efi", reason="size-probe")
            .at(start + 2.0, Kind.TFTP_SENT, file="ipxe.efi", bytes=1_000_000, blksize=1468)
            .at(start + 6.0, Kind.DHCP_OFFER, **IPXE_OFFER)
        )

    def full_boot(self, start: float = 0.0, up_after: float | None = 42.0) -> Log:
        self.uefi_to_ipxe(start)
        self.at(start + 6.2, Kind.HTTP_SCRIPT, **SCRIPT)
        self.at(start + 8.0, Kind.HTTP_KERNEL, **KERNEL)
        self.at(start + 15.0, Kind.HTTP_INITRD, **INITRD)
        if up_after is not None:
            self.at(start + up_after, Kind.OS_UP, ip="10.86.0.50", boot_seconds=up_after)
        return self

    def without_fields(self) -> list[Event]:
        """The same log as a database from before typed events holds it: kinds only."""
        return [Event(e.id, e.mac, e.time, e.kind, e.message) for e in self.events]


def doc(
    log: Log | list[Event],
    now_after: float,
    state: MachineState = MachineState.BOOTING,
    **options: object,
) -> Diagnosis:
    events = log.events if isinstance(log, Log) else log
    last = max((e.time for e in events), default=T0)
    return diagnose(
        events,
        state=state,
        now=last + now_after,
        boot_timeout=options.pop("boot_timeout", DEFAULT_BOOT_TIMEOUT),  # type: ignore[arg-type]
        mode=options.pop("mode", "proxy"),  # type: ignore[arg-type]
        name=options.pop("name", "c1"),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- unit


def test_never_seen() -> None:
    d = doc([], 0, MachineState.ENROLLED)
    assert not d.ok
    assert d.verdict.startswith(
        "Pixiebox has never heard from c1: is it set to boot from the network (PXE) first, and "
        "on the same LAN as the appliance's interface?"
    )
    assert "no events recorded" in render(d)


def test_offer_but_no_boot_file_fetch_after_the_settle_time() -> None:
    log = Log().at(0, Kind.DHCP_OFFER, **BIOS_OFFER)
    early = doc(log, 5)
    assert not early.ok and "is booting" in early.verdict
    assert early.waiting, "within the settle time the verdict is progress, not a failure"
    d = doc(log, 31)
    assert not d.ok and not d.waiting
    assert "c1 got a DHCP offer" in d.verdict
    assert "never asked for the boot file undionly.kpxe" in d.verdict
    assert "another DHCP/PXE server may be answering it" in d.verdict
    assert "UEFI while only BIOS files are served (or the reverse)" in d.verdict
    # The threshold is a parameter (the integration tests use a short one).
    assert "never asked for the boot file" in doc(log, 5, settle=2).verdict


def test_reservation_mode_offer_never_taken_points_at_another_dhcp_server() -> None:
    offer = {"mode": "reservation", "port": 67, "firmware": "UEFI", "ipxe": False,
             "boot_file": "ipxe.efi", "ip": "10.86.0.31"}  # fmt: skip
    log = Log().at(0, Kind.DHCP_OFFER, **offer)
    d = doc(log, 60, mode="reservation")
    assert "never asked for the boot file ipxe.efi" in d.verdict
    assert "never took the address Pixiebox offered" in d.verdict
    taken = Log().at(0, Kind.DHCP_OFFER, **offer).at(0.1, Kind.DHCP_ACK, **offer)
    assert "never took" not in doc(taken, 60, mode="reservation").verdict
    # An old event cannot tell an offer from an ACK: no conclusion drawn from it.
    assert "never took" not in doc(log.without_fields(), 60, mode="reservation").verdict


def test_ipxe_fetched_but_never_the_script_names_the_http_port() -> None:
    d = doc(Log().uefi_to_ipxe(), 40)
    assert not d.ok
    assert d.verdict.startswith("c1 fetched iPXE but never the script: HTTP on port 80 of the ")
    assert "(http://10.86.0.2/)" in d.verdict
    assert "unreachable from the machine (a firewall?)" in d.verdict
    # The UEFI size probe (an aborted TFTP transfer) is normal, not the failure.
    assert "TFTP" not in d.verdict


def test_ipxe_request_alone_is_enough_and_another_port_is_named() -> None:
    url = f"http://10.86.0.2:8081/boot/{MAC}.ipxe"
    log = Log().at(0, Kind.DHCP_OFFER, **{**IPXE_OFFER, "boot_file": url})
    assert "HTTP on port 8081 of the appliance" in doc(log, 40).verdict
    reservation = Log().at(0, Kind.DHCP_ACK, mode="reservation", ipxe=True, boot_file=url,
                           ip="10.86.0.31")  # fmt: skip
    verdict = doc(reservation, 40, mode="reservation").verdict
    assert "fetched iPXE but never the script: HTTP on port 8081" in verdict


def test_ipxe_loader_over_tftp_without_ipxe_asking() -> None:
    log = Log().at(0, Kind.DHCP_OFFER, **BIOS_OFFER).at(1, Kind.TFTP_SENT, file="undionly.kpxe")
    d = doc(log, 40, http_port=8080)
    assert "fetched iPXE but never the script (undionly.kpxe was sent over TFTP" in d.verdict
    assert "port 8080" in d.verdict
    # BIOS has no Secure Boot: the verdict does not blame it (tests/test_doctor_secure_boot.py).
    assert "Secure Boot" not in d.verdict and d.cause is None
    assert "iPXE may have failed to start on its network card" in d.verdict
    # Firmware that may have Secure Boot but cannot take the signed chain (code 6, i386 UEFI)
    # is told the general way.
    i386 = {**UEFI_OFFER, "arch": "i386"}
    log = Log().at(0, Kind.DHCP_OFFER, **i386).at(1, Kind.TFTP_SENT, file="ipxe.efi")
    d = doc(log, 40)
    assert "Secure Boot on?" in d.verdict and d.cause is None


def test_script_but_no_kernel_names_the_kernel() -> None:
    d = doc(Log().uefi_to_ipxe().at(6.2, Kind.HTTP_SCRIPT, **SCRIPT), 40)
    assert "fetched its iPXE script" in d.verdict
    assert "never the kernel osie/vmlinuz" in d.verdict
    assert "console" in d.verdict


def test_http_failures_name_the_file_and_what_to_do() -> None:
    log = Log().uefi_to_ipxe().at(6.2, Kind.HTTP_SCRIPT, **SCRIPT)
    log.at(8, Kind.HTTP_KERNEL, **KERNEL)
    log.at(9, Kind.HTTP_FAILED, file="/assets/osie/initrd", reason="broken", bytes=MiB)
    d = doc(log, 5)  # a failure needs no waiting
    assert not d.ok
    assert "c1 broke off the download of /assets/osie/initrd after 1.0 MiB" in d.verdict
    assert "the connection dropped" in d.verdict
    missing = Log().uefi_to_ipxe().at(6.2, Kind.HTTP_SCRIPT, **SCRIPT)
    missing.at(6.3, Kind.HTTP_FAILED, file="/assets/osie/vmlinuz", reason="missing", status=404)
    verdict = doc(missing, 1).verdict
    assert "/assets/osie/vmlinuz does not exist on the appliance" in verdict
    assert "[boot] assets" in verdict
    no_image = Log().uefi_to_ipxe()
    no_image.at(6.2, Kind.HTTP_FAILED, file=f"/boot/{MAC}.ipxe", reason="no-image", image="osie2")
    verdict = doc(no_image, 1).verdict
    assert verdict.startswith("c1 could not be booted (at ")
    assert "it should boot image osie2, but lab.toml has no [images.osie2]" in verdict
    # A retry that then succeeds is not a failure.
    retried = Log().uefi_to_ipxe().at(6.2, Kind.HTTP_SCRIPT, **SCRIPT)
    retried.at(7, Kind.HTTP_FAILED, file="/assets/osie/vmlinuz", reason="broken")
    retried.at(9, Kind.HTTP_KERNEL, **KERNEL).at(15, Kind.HTTP_INITRD, **INITRD)
    retried.at(40, Kind.OS_UP, ip="10.86.0.50")
    assert doc(retried, 1).ok


def test_tftp_failures_say_what_to_add_or_to_retry() -> None:
    log = Log().at(0, Kind.DHCP_OFFER, **BIOS_OFFER)
    log.at(0.5, Kind.TFTP_FAILED, file="undionly.kpxe", reason="not-found",
           detail="not in /srv/assets, /usr/lib/ipxe")  # fmt: skip
    d = doc(log, 1)
    assert "asked for undionly.kpxe over TFTP" in d.verdict and "apt-get install ipxe" in d.verdict
    assert "(not in /srv/assets, /usr/lib/ipxe)" in d.verdict
    timeout = Log().at(0, Kind.DHCP_OFFER, **BIOS_OFFER)
    timeout.at(9, Kind.TFTP_FAILED, file="undionly.kpxe", reason="timeout",
               detail="no ACK for block 3 after 5 tries")  # fmt: skip
    verdict = doc(timeout, 1).verdict
    assert "c1's TFTP download of undionly.kpxe failed at " in verdict
    assert ": no ACK for block 3 after 5 tries. A flaky link or a firewall" in verdict
    # iPXE looking for autoexec.ipxe is no failure: it goes on to ask DHCP for its script.
    autoexec = (
        Log().at(0, Kind.DHCP_OFFER, **BIOS_OFFER).at(1, Kind.TFTP_SENT, file="undionly.kpxe")
    )
    autoexec.at(3, Kind.TFTP_FAILED, file="autoexec.ipxe", reason="not-found")
    autoexec.at(3.1, Kind.TFTP_FAILED, file="bootsig.bin", reason="expected-miss")
    assert "fetched iPXE but never the script" in doc(autoexec, 40).verdict


def test_kernel_and_initrd_sent_but_no_phone_home() -> None:
    log = Log().full_boot(up_after=None)
    waiting = doc(log, 60)
    assert not waiting.ok and "still booting" in waiting.verdict and waiting.waiting
    d = doc(log, DEFAULT_BOOT_TIMEOUT + 1)
    assert not d.ok and not d.waiting
    assert d.verdict.startswith("c1: kernel and initrd sent, no phone-home after 5 min: the OS ")
    assert "failed to start (or cannot reach the appliance); look at its console" in d.verdict
    assert "no phone-home after 3.0 s" in doc(log, 3, boot_timeout=2).verdict


def test_os_that_logs_but_never_phones_home() -> None:
    log = Log().full_boot(up_after=None)
    log.at(30, Kind.SYSLOG, severity="info", app="osie").at(31, Kind.SYSLOG, severity="info")
    verdict = doc(log, 400).verdict
    assert "its OS started (it sent its first syslog line at" in verdict
    assert "never phoned home" in verdict and "pixiebox events c1" in verdict


def test_its_own_os_refused_its_metadata_says_so_before_the_boot_timeout() -> None:
    log = Log().full_boot(up_after=None)
    log.at(21.0, Kind.SECRET_REFUSED, secret="metadata", ip="10.86.0.50", reason="no-token",
           seen_mac=MAC)  # fmt: skip
    verdict = doc(log, now_after=5).verdict
    assert "refused it its metadata" in verdict and "(no-token)" in verdict, verdict
    assert "boot the machine again through Pixiebox" in verdict
    # A refusal of its secrets to someone else (another MAC at the address) is not its failure.
    other = Log().full_boot(up_after=None)
    other.at(21.0, Kind.SECRET_REFUSED, secret="boot-token", ip="10.86.0.77",
             reason="not-owner", seen_mac="02:00:00:00:86:99")  # fmt: skip
    assert "still booting" in doc(other, now_after=5).verdict


def test_ignored_unknown_machine_says_how_to_enroll() -> None:
    log = Log().at(0, Kind.MACHINE_DISCOVERED, arch="x86_64", firmware="BIOS", policy="ignore")
    d = doc(log, 60, MachineState.DISCOVERED, name=MAC)
    assert not d.ok
    assert "unknown machine and is ignored by policy" in d.verdict
    assert f"pixiebox enroll {MAC} --name NAME" in d.verdict
    # iPXE asked for its script and was told to move on.
    told = Log().at(0, Kind.BOOT_IGNORED, reason="unknown-ignored", protocol="http")
    assert "ignored by policy" in doc(told, 1, MachineState.DISCOVERED, name=MAC).verdict
    # Enrolled since: the next power-cycle boots it.
    later = doc(log, 60, MachineState.ENROLLED, enrolled=True)
    assert "it is enrolled now, so power-cycle it" in later.verdict
    # Discovered under another policy but never answered: no boot file for its firmware.
    unanswered = Log().at(0, Kind.MACHINE_DISCOVERED, firmware="U-Boot", policy="discover")
    assert "did not answer it" in doc(unanswered, 60, MachineState.DISCOVERED).verdict


def test_up_is_ok_with_the_boot_duration() -> None:
    d = doc(Log().full_boot(), 10, MachineState.UP)
    assert d.ok
    assert "c1 booted fine: the OS phoned home 42 s after its first boot request" in d.verdict
    assert "it is up" in d.verdict
    joined = doc(Log().full_boot().at(80, Kind.OS_JOINED), 10, MachineState.JOINED)
    assert joined.ok and "joined Kubernetes" in joined.verdict


def test_off_after_up_says_when_it_went_silent() -> None:
    log = Log().full_boot().at(100, Kind.SYSLOG)
    log.at(800, Kind.MACHINE_OFF, cause="silence", silent_for=700, was="up")
    d = doc(log, 30, MachineState.OFF)
    assert not d.ok
    assert "c1 booted (42 s from its first boot request" in d.verdict
    assert "went silent at" in d.verdict and "(12 min ago)" in d.verdict
    assert "powered off, or it crashed" in d.verdict


def test_the_last_attempt_decides_not_an_old_one() -> None:
    # Booted fine yesterday, went off at night; today it stops at iPXE.
    log = Log().full_boot().at(700, Kind.MACHINE_OFF, cause="silence")
    log.uefi_to_ipxe(start=86_400)
    d = doc(log, 60, MachineState.BOOTING)
    assert not d.ok and "fetched iPXE but never the script" in d.verdict
    assert len(d.attempts) == 2
    assert [e.kind for e in d.attempts[-1]][:2] == [Kind.DHCP_OFFER, Kind.DHCP_ACK]
    # Failed at the first step an hour ago, booted after a power cycle: fine now.
    log = Log().at(0, Kind.DHCP_OFFER, **BIOS_OFFER).full_boot(start=3600)
    assert doc(log, 10, MachineState.UP).ok
    # A machine that fetched its kernel and asks from the start again rebooted: a new attempt,
    # even without a gap.
    log = Log().full_boot(up_after=None).at(40, Kind.DHCP_OFFER, **UEFI_OFFER)
    d = doc(log, 60)
    assert "never asked for the boot file" in d.verdict
    # So is the firmware asking again once it had fetched iPXE.
    log = Log().uefi_to_ipxe().at(20, Kind.DHCP_OFFER, **UEFI_OFFER)
    assert len(split_attempts(log.events)[1]) == 2
    # A NIC whose PXE ROM is iPXE (QEMU's): the script was never fetched, iPXE exited, and the
    # firmware's boot retry asks as iPXE again a minute later: a failed attempt, then a new one.
    log = Log().at(0, Kind.DHCP_OFFER, **IPXE_OFFER).at(81, Kind.DHCP_OFFER, **IPXE_OFFER)
    assert [len(a) for a in split_attempts(log.events)[1]] == [1, 1]
    # iPXE's own retransmissions within seconds stay one attempt.
    log = Log().at(0, Kind.DHCP_OFFER, **IPXE_OFFER).at(4, Kind.DHCP_OFFER, **IPXE_OFFER)
    assert len(split_attempts(log.events)[1]) == 1


def test_one_uefi_boot_is_one_attempt_with_its_discovery() -> None:
    log = Log().at(-0.01, Kind.MACHINE_DISCOVERED, firmware="UEFI", policy="discover")
    log.full_boot()
    before, attempts = split_attempts(log.events)
    assert before == [] and len(attempts) == 1
    assert attempts[0][0].kind == Kind.MACHINE_DISCOVERED
    assert attempts[0][-1].kind == Kind.OS_UP
    # A boot request after a long silence is a new attempt.
    later = Log().at(0, Kind.DHCP_OFFER, **BIOS_OFFER)
    later.at(ATTEMPT_GAP + 1, Kind.DHCP_OFFER, **BIOS_OFFER)
    assert len(split_attempts(later.events)[1]) == 2


def test_repeated_failures_are_counted() -> None:
    log = Log()
    for n in range(3):
        log.at(n * 600, Kind.DHCP_OFFER, **BIOS_OFFER)
    assert "This is the 3rd attempt in a row that stopped there." in doc(log, 60).verdict


def test_a_plain_lease_without_a_boot_request() -> None:
    log = Log().at(0, Kind.DHCP_LEASE, action="bound", ip="10.86.0.31", lease_time=3600)
    d = doc(log, 60, MachineState.ENROLLED, mode="reservation")
    assert "never asked to boot from the network" in d.verdict


def test_the_messages_are_never_read() -> None:
    """Every verdict is the same whatever the events say in words (here: what the doctor
    once looked for in them), as long as it does not show them."""
    scenarios = {
        "offer only": lambda log: log.at(0, Kind.DHCP_OFFER, **BIOS_OFFER),
        "ipxe stalled": lambda log: log.uefi_to_ipxe(),
        "up": lambda log: log.full_boot(),
        "no phone-home": lambda log: log.full_boot(up_after=None),
        "discovered": lambda log: log.at(0, Kind.MACHINE_DISCOVERED, policy="discover"),
        "lease": lambda log: log.at(0, Kind.DHCP_LEASE, action="bound"),
        "tftp size probe": lambda log: log.at(0, Kind.DHCP_OFFER, **UEFI_OFFER).at(
            1, Kind.TFTP_FAILED, file="ipxe.efi", reason="size-probe"
        ),
    }
    for what, build in scenarios.items():
        plain, trapped = doc(build(Log()), 600), doc(build(Log(TRAP)), 600)
        assert (plain.verdict, plain.ok) == (trapped.verdict, trapped.ok), what
        assert [len(a) for a in plain.attempts] == [len(a) for a in trapped.attempts], what
        assert "9999" not in trapped.verdict and "ignored" not in trapped.verdict, what


def test_old_events_without_fields_degrade_without_a_wrong_verdict() -> None:
    """A database from before typed events has kinds but no fields: the doctor says less
    (no file names, "?") but never crashes and never cuts one boot into two."""
    assert doc(Log().full_boot().without_fields(), 10, MachineState.UP).ok
    stalled = Log().uefi_to_ipxe().without_fields()
    d = doc(stalled, 40)
    assert len(d.attempts) == 1
    assert d.verdict.startswith("c1 fetched iPXE but never the script: HTTP on port 80 of the ")
    offer = doc(Log().at(0, Kind.DHCP_OFFER, **BIOS_OFFER).without_fields(), 60).verdict
    assert "never asked for the boot file: another DHCP/PXE server" in offer
    script = Log().uefi_to_ipxe().at(6.2, Kind.HTTP_SCRIPT, **SCRIPT).without_fields()
    assert "but never the kernel: the script stopped" in doc(script, 60).verdict
    http = Log().uefi_to_ipxe().at(6.2, Kind.HTTP_FAILED).without_fields()
    assert doc(http, 1).verdict.startswith("c1 could not download a boot file (at ")
    tftp = Log().at(0, Kind.DHCP_OFFER).at(1, Kind.TFTP_FAILED).without_fields()
    assert "c1's TFTP download of ? failed at " in doc(tftp, 1).verdict
    assert "did not answer it" in doc(Log().at(0, Kind.MACHINE_DISCOVERED), 60).verdict
    text = render(doc(Log().full_boot(up_after=None).without_fields(), 30))
    assert "+6.2s http.script" in text


def test_render_shows_a_relative_timeline_then_the_verdict() -> None:
    log = Log("x86_64 UEFI asked to boot (port 67)").full_boot(up_after=None)
    for n in range(50):
        log.events.append(ev(Kind.SYSLOG, 20 + n, f"line {n}", severity="info"))
    d = doc(log, 600)
    text = render(d)
    lines = text.splitlines()
    assert lines[0] == "c1: booting"
    assert lines[1].startswith("last boot attempt, from ")
    assert re.search(r"^\s+\+0\.0s dhcp\.offer\s+x86_64 UEFI asked to boot \(port 67\)", text, re.M)
    assert re.search(r"^\s+\+6\.2s http\.script\s+x86_64 UEFI", text, re.M)
    assert "50 lines, the last: line 49" in text  # syslog collapsed
    assert lines[-1].startswith("    ") or lines[-1].startswith("PROBLEM: ")
    assert "PROBLEM: c1" in text and d.verdict.split()[-1] in text
    assert timeline(d) == lines[1 : lines.index("")]


def test_query_parameters_and_unknown_keys() -> None:
    assert seconds_parameter({}, "settle", 30.0) == 30.0
    assert seconds_parameter({"settle": "2.5"}, "settle", 30.0) == 2.5
    for bad in ("x", "-1", "nan"):
        with pytest.raises(ValueError, match="settle must be a number of seconds"):
            seconds_parameter({"settle": bad}, "settle", 30.0)
    assert "never heard from 02:00:00:00:86:99" in unknown_machine("02-00-00-00-86-99")
    assert "no machine named or with MAC 'c7'" in unknown_machine("c7")


# --------------------------------------------------------------------------- integration

SUBNET = "10.86.0.0/24"
ROUTER_IP = "10.86.0.1"
AGENT_IP = "10.86.0.2"
C1_MAC, C2_MAC = MAC, "02:00:00:00:86:02"
UUID = bytes(range(16))
API = "http://127.0.0.1:8080"


def start_lab(segment: netlab.Segment, workdir: Path) -> tuple[netlab.Host, RunningAgent]:
    """The agent in proxy mode, c1 and c2 enrolled, with its API on :8080."""
    config_text = lab_toml(
        mode="proxy",
        subnet=SUBNET,
        assets=workdir / "assets",
        state=workdir / "state",
        machines=[("c1", C1_MAC, None), ("c2", C2_MAC, None)],
    ).replace("[http]", f'[api]\nlisten = "0.0.0.0:8080"\ntoken_file = "{workdir / "t"}"\n[http]')
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    return agent_host, start_agent(agent_host, config_text, workdir)


def doctor(agent: RunningAgent, *args: str) -> tuple[int, str]:
    result = agent.host.run(
        [sys.executable, "-m", "pixiebox.cli", "doctor", *args, "--config", str(agent.config)],
        timeout=30,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    # The verdict is wrapped for the terminal: compare words, not line breaks.
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def events_of(agent: RunningAgent, key: str) -> list[dict[str, object]]:
    out = agent.host.run(["curl", "-sS", "--max-time", "10", f"{API}/api/v1/machines/{key}/events"])
    return list(json.loads(out.stdout))


def wait_event(agent: RunningAgent, key: str, kind: str) -> dict[str, object]:
    def found() -> dict[str, object] | None:
        return next((e for e in events_of(agent, key) if e["kind"] == kind), None)

    return netlab.wait_until(found, 10, 0.2, f"{key}: no {kind!r} event")


def ours(replies: list[netlab.Reply]) -> netlab.Reply:
    (reply,) = [r for r in replies if r.src_ip == AGENT_IP]
    return reply


def test_http_blocked_by_a_firewall(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("dnsmasq", "dhclient", "curl", "nft")  # type: ignore[operator]
    router = segment.add_host("router", ip=f"{ROUTER_IP}/24")
    netlab.start_dnsmasq_router(router, "10.86.0.100", "10.86.0.150", ping_check=False)
    agent_host, agent = start_lab(segment, workdir)
    # A firewall on the appliance drops the boot HTTP server's port.
    agent_host.run(["nft", "-f", "-"], input="table inet pxbdoctor {\n chain in {\n"
                   "  type filter hook input priority 0; policy accept;\n"
                   "  tcp dport 80 drop\n }\n}\n")  # fmt: skip
    client = segment.add_host("c1", mac=C1_MAC)
    # What UEFI firmware does: DISCOVER (the router offers an address, Pixiebox the boot file),
    # take the router's address, ask Pixiebox on port 4011, fetch iPXE over TFTP.
    assert ours(netlab.pxe_discover(client, arch=7, uuid=UUID)).file == "ipxe.efi"
    lease = netlab.run_dhclient(client, workdir / "c1")
    assert lease.server_id == ROUTER_IP
    ack = ours(netlab.pxe_request_4011(client, AGENT_IP, arch=7, uuid=UUID, client_ip=lease.ip))
    assert ack.file == "ipxe.efi"
    client.run(["curl", "-sS", "--max-time", "20", "-o", str(workdir / "ipxe.efi"),
                f"tftp://{AGENT_IP}/ipxe.efi"])  # fmt: skip
    assert (workdir / "ipxe.efi").stat().st_size > 100_000
    sent = wait_event(agent, "c1", Kind.TFTP_SENT)
    # iPXE runs, asks DHCP again and is told its script URL, which it cannot reach.
    script_url = ours(netlab.pxe_discover(client, arch=7, uuid=UUID, user_class="iPXE")).file
    assert script_url == f"http://{AGENT_IP}/boot/{C1_MAC}.ipxe"
    blocked = client.run(["curl", "-sS", "--max-time", "3", script_url], check=False)
    assert blocked.returncode == 28, blocked  # timed out: the SYN was dropped
    code, out = doctor(agent, C1_MAC, "--settle", "2")
    assert code == 2, out
    assert "fetched iPXE but never the script" in out and "port 80" in out, out
    assert "tftp.sent" in out and "+0.0s dhcp.offer" in out, out
    # The same over the API, which is not behind the firewall.
    report = json.loads(agent_host.run(
        ["curl", "-sS", "--max-time", "10", f"{API}/api/v1/machines/c1/doctor?settle=2"]
    ).stdout)  # fmt: skip
    assert report["machine"] == "c1" and report["mac"] == C1_MAC and report["ok"] is False
    assert report["state"] == "booting"
    assert "fetched iPXE but never the script" in report["verdict"]
    assert any("tftp.sent" in line for line in report["timeline"])
    # The doctor read what the emitters recorded as fields, not their sentences.
    fields = sent["fields"]
    assert isinstance(fields, dict) and fields.get("file") == "ipxe.efi", sent
    bad = agent_host.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                          f"{API}/api/v1/machines/c1/doctor?settle=soon"])  # fmt: skip
    assert bad.stdout == "400"
    document = json.loads(agent_host.run(["curl", "-sS", f"{API}/api/v1/openapi.json"]).stdout)
    assert "/api/v1/machines/{key}/doctor" in document["paths"]
    assert "DoctorReport" in document["components"]["schemas"]


def test_offer_but_never_the_boot_file(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl")  # type: ignore[operator]
    _, agent = start_lab(segment, workdir)
    # c2 is enrolled but never asked; an unknown MAC is not a machine at all.
    code, out = doctor(agent, "c2")
    assert code == 2 and "Pixiebox has never heard from c2: is it set to boot" in out, out
    code, out = doctor(agent, "02:00:00:00:86:77")
    assert code == 1 and "Pixiebox has never heard from 02:00:00:00:86:77" in out, out
    client = segment.add_host("c1", mac=C1_MAC)
    # A BIOS PXE ROM is offered undionly.kpxe, then never fetches it.
    assert ours(netlab.pxe_discover(client, arch=0, uuid=UUID)).file == "undionly.kpxe"
    offered = wait_event(agent, "c1", Kind.DHCP_OFFER)
    code, out = doctor(agent, "c1")  # default threshold: it may still be on its way
    assert code == 2 and "is booting" in out, out
    time.sleep(max(0.0, float(offered["time"]) + 2.5 - time.time()))  # type: ignore[arg-type]
    code, out = doctor(agent, "c1", "--settle", "2")
    assert code == 2, out
    assert "got a DHCP offer" in out and "never asked for the boot file undionly.kpxe" in out, out


def test_kernel_and_initrd_without_phone_home_then_up(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl")  # type: ignore[operator]
    osie = workdir / "assets" / "osie"
    osie.mkdir(parents=True)
    (osie / "vmlinuz").write_bytes(b"kernel " * 20_000)
    (osie / "initrd").write_bytes(b"initrd " * 50_000)
    _, agent = start_lab(segment, workdir)
    client = segment.add_host("c1", mac=C1_MAC, ip="10.86.0.50/24")
    # iPXE (here: a PXE client that says it is iPXE, then curl) fetches its script and files.
    script_url = ours(netlab.pxe_discover(client, arch=0, uuid=UUID, user_class="iPXE")).file
    script = client.run(["curl", "-sS", "--fail", "--max-time", "10", script_url]).stdout
    for path in ("osie/vmlinuz", "osie/initrd"):
        url = f"http://{AGENT_IP}/assets/{path}"
        assert url in script, script
        client.run(["curl", "-sS", "--fail", "--max-time", "10", "-o", "/dev/null", url])
    sent = wait_event(agent, "c1", Kind.HTTP_INITRD)
    time.sleep(max(0.0, float(sent["time"]) + 3.0 - time.time()))  # type: ignore[arg-type]
    code, out = doctor(agent, "c1", "--boot-timeout", "2")
    assert code == 2, out
    assert "kernel and initrd sent, no phone-home after" in out, out
    assert "+0.0s dhcp.offer" in out and "http.script" in out, out
    # The OS comes up after all.
    client.run(["curl", "-sS", "--fail", "--max-time", "10", "-X", "POST",
                f"http://{AGENT_IP}/api/v1/phone-home"])  # fmt: skip
    code, out = doctor(agent, C1_MAC.upper(), "--boot-timeout", "2")
    assert code == 0, out
    assert "c1: up" in out and "OK: c1 booted fine: the OS phoned home" in out, out
