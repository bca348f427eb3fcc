"""`pixiebox doctor`: why did (or didn't) a machine boot?

Unit tests read made-up event logs (with the agent's own wording); the integration tests break
real boots on purpose, with real peers in network namespaces and a real agent: a firewall in
front of the boot HTTP server, a firmware that never fetches its boot file, an OS that never
phones home.
"""

from __future__ import annotations

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
from pixiebox.store.state import Event

MAC = "02:00:00:00:86:01"
SCRIPT_URL = f"http://10.86.0.2/boot/{MAC}.ipxe"
T0 = 1_700_000_000.0

# The agent's own sentences for each step (see dhcp/proxy.py, tftp.py, http/boot.py).
UEFI_OFFER = "x86_64 UEFI asked to boot (port 67); sent a proxy OFFER with boot file ipxe.efi"
UEFI_ACK = "x86_64 UEFI asked to boot (port 4011); sent a proxy ACK with boot file ipxe.efi"
BIOS_OFFER = "x86_64 BIOS asked to boot (port 67); sent a proxy OFFER with boot file undionly.kpxe"
PROBE = "TFTP ipxe.efi: it sent ERROR 8 (User aborted) once it knew the size, as UEFI firmware does"
IPXE_OFFER = f"iPXE asked to boot (port 67); sent a proxy OFFER with script URL {SCRIPT_URL}"
SCRIPT = "fetched its iPXE script for image osie; next: kernel osie/vmlinuz"
KERNEL = "received the kernel osie/vmlinuz (5.0 MiB)"
INITRD = "received the initrd osie/initrd (30.0 MiB)"


class Log:
    """Builds an event log: `log.at(seconds, kind, message)`."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def at(self, seconds: float, kind: str, message: str = "") -> Log:
        self.events.append(Event(len(self.events) + 1, MAC, T0 + seconds, kind, message))
        return self

    def uefi_to_ipxe(self, start: float = 0.0) -> Log:
        """What UEFI firmware does up to iPXE asking for its script."""
        return (
            self.at(start, "dhcp", UEFI_OFFER)
            .at(start + 1.5, "dhcp", UEFI_ACK)
            .at(start + 1.6, "tftp-error", PROBE)
            .at(start + 2.0, "tftp", "fetched ipxe.efi over TFTP")
            .at(start + 6.0, "dhcp", IPXE_OFFER)
        )

    def full_boot(self, start: float = 0.0, up_after: float | None = 42.0) -> Log:
        self.uefi_to_ipxe(start)
        self.at(start + 6.2, "script", SCRIPT)
        self.at(start + 8.0, "kernel", KERNEL).at(start + 15.0, "initrd", INITRD)
        if up_after is not None:
            self.at(start + up_after, "phone-home", "the OS is up at 10.86.0.50")
        return self


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
    log = Log().at(0, "dhcp", BIOS_OFFER)
    early = doc(log, 5)
    assert not early.ok and "is booting" in early.verdict
    d = doc(log, 31)
    assert not d.ok
    assert "c1 got a DHCP offer" in d.verdict
    assert "never asked for the boot file undionly.kpxe" in d.verdict
    assert "another DHCP/PXE server may be answering it" in d.verdict
    assert "UEFI while only BIOS files are served (or the reverse)" in d.verdict
    # The threshold is a parameter (the integration tests use a short one).
    assert "never asked for the boot file" in doc(log, 5, settle=2).verdict


def test_reservation_mode_offer_never_taken_points_at_another_dhcp_server() -> None:
    log = Log().at(0, "dhcp", "asked for an address; offered 10.86.0.31 with boot file ipxe.efi")
    d = doc(log, 60, mode="reservation")
    assert "never asked for the boot file ipxe.efi" in d.verdict
    assert "never took the address Pixiebox offered" in d.verdict
    taken = Log().at(0, "dhcp", "asked for an address; offered 10.86.0.31 with boot file ipxe.efi")
    taken.at(0.1, "dhcp", "bound 10.86.0.31 for 3600s with boot file ipxe.efi")
    assert "never took" not in doc(taken, 60, mode="reservation").verdict


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
    log = Log().at(
        0, "dhcp", f"iPXE asked to boot (port 67); sent a proxy OFFER with script URL {url}"
    )
    assert "HTTP on port 8081 of the appliance" in doc(log, 40).verdict
    reservation = Log().at(0, "dhcp", f"bound 10.86.0.31 for 3600s with boot file {url}")
    verdict = doc(reservation, 40, mode="reservation").verdict
    assert "fetched iPXE but never the script: HTTP on port 8081" in verdict


def test_ipxe_loader_over_tftp_without_ipxe_asking_mentions_secure_boot() -> None:
    log = Log().at(0, "dhcp", BIOS_OFFER).at(1, "tftp", "fetched undionly.kpxe over TFTP")
    d = doc(log, 40, http_port=8080)
    assert "fetched iPXE but never the script" in d.verdict
    assert "Secure Boot" in d.verdict and "port 8080" in d.verdict


def test_script_but_no_kernel_names_the_kernel() -> None:
    d = doc(Log().uefi_to_ipxe().at(6.2, "script", SCRIPT), 40)
    assert "fetched its iPXE script" in d.verdict
    assert "never the kernel osie/vmlinuz" in d.verdict
    assert "console" in d.verdict


def test_broken_off_download_names_the_file() -> None:
    log = Log().uefi_to_ipxe().at(6.2, "script", SCRIPT).at(8, "kernel", KERNEL)
    log.at(
        9, "http-error", "broke off the download of the initrd osie/initrd after 1.0 MiB of 30 MiB"
    )
    d = doc(log, 5)  # a failure needs no waiting
    assert not d.ok
    assert (
        "c1 broke off the download of the initrd osie/initrd after 1.0 MiB of 30 MiB" in d.verdict
    )
    assert "the connection dropped" in d.verdict
    missing = Log().uefi_to_ipxe().at(6.2, "script", SCRIPT)
    missing.at(
        6.3, "http-error", "the kernel osie/vmlinuz does not exist (/srv/assets/osie/vmlinuz)"
    )
    verdict = doc(missing, 1).verdict
    assert "the kernel osie/vmlinuz does not exist" in verdict and "[boot] assets" in verdict
    # A retry that then succeeds is not a failure.
    retried = Log().uefi_to_ipxe().at(6.2, "script", SCRIPT)
    retried.at(7, "http-error", "broke off the download of the kernel osie/vmlinuz before the end")
    retried.at(9, "kernel", KERNEL).at(15, "initrd", INITRD).at(40, "phone-home", "up")
    assert doc(retried, 1).ok


def test_tftp_file_not_found_says_what_to_add() -> None:
    log = Log().at(0, "dhcp", BIOS_OFFER)
    log.at(0.5, "tftp-error", "TFTP undionly.kpxe: not in /srv/assets, /usr/lib/ipxe")
    d = doc(log, 1)
    assert "asked for undionly.kpxe over TFTP" in d.verdict and "apt-get install ipxe" in d.verdict


def test_kernel_and_initrd_sent_but_no_phone_home() -> None:
    log = Log().full_boot(up_after=None)
    waiting = doc(log, 60)
    assert not waiting.ok and "still booting" in waiting.verdict
    d = doc(log, DEFAULT_BOOT_TIMEOUT + 1)
    assert not d.ok
    assert d.verdict.startswith("c1: kernel and initrd sent, no phone-home after 5 min: the OS ")
    assert "failed to start (or cannot reach the appliance); look at its console" in d.verdict
    assert "no phone-home after 3.0 s" in doc(log, 3, boot_timeout=2).verdict


def test_os_that_logs_but_never_phones_home() -> None:
    log = (
        Log().full_boot(up_after=None).at(30, "syslog", "<30>osie: starting").at(31, "syslog", "x")
    )
    verdict = doc(log, 400).verdict
    assert "its OS started" in verdict and "never phoned home" in verdict
    assert "pixiebox events c1" in verdict


def test_ignored_unknown_machine_says_how_to_enroll() -> None:
    discovered = (
        f"unknown machine {MAC} (x86_64 BIOS) asked to boot; not answering it because "
        f'[boot] unknown = "ignore"; enroll it with: pixiebox enroll {MAC} --name NAME'
    )
    log = Log().at(0, "discovered", discovered)
    d = doc(log, 60, MachineState.DISCOVERED, name=MAC)
    assert not d.ok
    assert "unknown machine and is ignored by policy" in d.verdict
    assert f"pixiebox enroll {MAC} --name NAME" in d.verdict
    # iPXE asked for its script and was told to move on.
    told = Log().at(0, "ignored", f"unknown machine {MAC} is not booted ([boot] unknown = ignore)")
    assert "ignored by policy" in doc(told, 1, MachineState.DISCOVERED, name=MAC).verdict
    # Enrolled since: the next power-cycle boots it.
    later = doc(log, 60, MachineState.ENROLLED, enrolled=True)
    assert "it is enrolled now, so power-cycle it" in later.verdict


def test_up_is_ok_with_the_boot_duration() -> None:
    d = doc(Log().full_boot(), 10, MachineState.UP)
    assert d.ok
    assert "c1 booted fine: the OS phoned home 42 s after its first boot request" in d.verdict
    assert "it is up" in d.verdict
    joined = doc(Log().full_boot().at(80, "joined", "node Ready"), 10, MachineState.JOINED)
    assert joined.ok and "joined Kubernetes" in joined.verdict


def test_off_after_up_says_when_it_went_silent() -> None:
    log = Log().full_boot().at(100, "syslog", "still here")
    log.at(800, "off", "silent for 12 min after it was up; shown as off")
    d = doc(log, 30, MachineState.OFF)
    assert not d.ok
    assert "c1 booted (42 s from its first boot request" in d.verdict
    assert "went silent at" in d.verdict and "(12 min ago)" in d.verdict
    assert "powered off, or it crashed" in d.verdict


def test_the_last_attempt_decides_not_an_old_one() -> None:
    # Booted fine yesterday, went off at night; today it stops at iPXE.
    log = Log().full_boot().at(700, "off", "silent for 10 min after it was up; shown as off")
    log.uefi_to_ipxe(start=86_400)
    d = doc(log, 60, MachineState.BOOTING)
    assert not d.ok and "fetched iPXE but never the script" in d.verdict
    assert len(d.attempts) == 2
    assert [e.kind for e in d.attempts[-1]][:2] == ["dhcp", "dhcp"]
    # Failed at the first step an hour ago, booted after a power cycle: fine now.
    log = Log().at(0, "dhcp", BIOS_OFFER).full_boot(start=3600)
    assert doc(log, 10, MachineState.UP).ok
    # A machine that fetched its kernel and asks from the start again rebooted: a new attempt,
    # even without a gap.
    log = Log().full_boot(up_after=None).at(40, "dhcp", UEFI_OFFER)
    d = doc(log, 60)
    assert "never asked for the boot file" in d.verdict


def test_one_uefi_boot_is_one_attempt_with_its_discovery() -> None:
    log = Log().at(-0.01, "discovered", f"unknown machine {MAC} (x86_64 UEFI) asked to boot")
    log.full_boot()
    before, attempts = split_attempts(log.events)
    assert before == [] and len(attempts) == 1
    assert attempts[0][0].kind == "discovered" and attempts[0][-1].kind == "phone-home"
    # A boot request after a long silence is a new attempt.
    later = Log().at(0, "dhcp", BIOS_OFFER).at(ATTEMPT_GAP + 1, "dhcp", BIOS_OFFER)
    assert len(split_attempts(later.events)[1]) == 2


def test_repeated_failures_are_counted() -> None:
    log = Log()
    for n in range(3):
        log.at(n * 600, "dhcp", BIOS_OFFER)
    assert "This is the 3rd attempt in a row that stopped there." in doc(log, 60).verdict


def test_a_plain_lease_without_a_boot_request() -> None:
    log = Log().at(0, "lease", "bound 10.86.0.31 for 3600s")
    d = doc(log, 60, MachineState.ENROLLED, mode="reservation")
    assert "never asked to boot from the network" in d.verdict


def test_render_shows_a_relative_timeline_then_the_verdict() -> None:
    log = Log().full_boot(up_after=None)
    for n in range(50):
        log.at(20 + n, "syslog", f"line {n}")
    d = doc(log, 600)
    text = render(d)
    lines = text.splitlines()
    assert lines[0] == "c1: booting"
    assert lines[1].startswith("last boot attempt, from ")
    assert re.search(r"^\s+\+0\.0s dhcp\s+x86_64 UEFI asked to boot \(port 67\)", text, re.M)
    assert re.search(r"^\s+\+6\.2s script\s+fetched its iPXE script", text, re.M)
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
    wait_event(agent, "c1", "tftp")
    # iPXE runs, asks DHCP again and is told its script URL, which it cannot reach.
    script_url = ours(netlab.pxe_discover(client, arch=7, uuid=UUID, user_class="iPXE")).file
    assert script_url == f"http://{AGENT_IP}/boot/{C1_MAC}.ipxe"
    blocked = client.run(["curl", "-sS", "--max-time", "3", script_url], check=False)
    assert blocked.returncode == 28, blocked  # timed out: the SYN was dropped
    code, out = doctor(agent, C1_MAC, "--settle", "2")
    assert code == 2, out
    assert "fetched iPXE but never the script" in out and "port 80" in out, out
    assert "fetched ipxe.efi over TFTP" in out and "+0.0s dhcp" in out, out
    # The same over the API, which is not behind the firewall.
    report = json.loads(agent_host.run(
        ["curl", "-sS", "--max-time", "10", f"{API}/api/v1/machines/c1/doctor?settle=2"]
    ).stdout)  # fmt: skip
    assert report["machine"] == "c1" and report["mac"] == C1_MAC and report["ok"] is False
    assert report["state"] == "booting"
    assert "fetched iPXE but never the script" in report["verdict"]
    assert any("fetched ipxe.efi over TFTP" in line for line in report["timeline"])
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
    offered = wait_event(agent, "c1", "dhcp")
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
    sent = wait_event(agent, "c1", "initrd")
    time.sleep(max(0.0, float(sent["time"]) + 3.0 - time.time()))  # type: ignore[arg-type]
    code, out = doctor(agent, "c1", "--boot-timeout", "2")
    assert code == 2, out
    assert "kernel and initrd sent, no phone-home after" in out, out
    assert "+0.0s dhcp" in out and "script" in out, out
    # The OS comes up after all.
    client.run(["curl", "-sS", "--fail", "--max-time", "10", "-X", "POST",
                f"http://{AGENT_IP}/api/v1/phone-home"])  # fmt: skip
    code, out = doctor(agent, C1_MAC.upper(), "--boot-timeout", "2")
    assert code == 0, out
    assert "c1: up" in out and "OK: c1 booted fine: the OS phoned home" in out, out
