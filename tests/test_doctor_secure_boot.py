"""The doctor names Secure Boot, and where the signed chain stopped (issue 16, item 3).

Unit tests read made-up event logs (kinds and fields as the emitters record them, a placeholder
for every message; tests/test_doctor.py's `Log`). The integration tests run the steps a UEFI
machine takes with real peers in network namespaces against a real agent (the PXE requests,
dhclient, curl's TFTP) and stop where the firmware, shim or GRUB would stop, then ask the
doctor over the CLI and the API. The firmware's refusal itself is checked with QEMU and OVMF
in tests/test_secure_boot_netboot.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import netlab
from agentproc import lab_toml, start_agent
from pixiebox.boot.grub_cfg import BOOTSTRAP, GRUB_DIR
from pixiebox.core.firmware import SHIM, SIGNED_GRUB
from pixiebox.core.lifecycle import MachineState
from pixiebox.doctor import CAUSES, DEFAULT_SETTLE, report, split_attempts
from pixiebox.doctor.attempts import GRUB_DIR as DOCTORS_GRUB_DIR
from pixiebox.doctor.attempts import GRUB_MAC_CONFIG, signed_step
from pixiebox.events import Event, Kind
from test_doctor import (
    AGENT_IP,
    API,
    BIOS_OFFER,
    INITRD,
    KERNEL,
    MAC,
    ROUTER_IP,
    SUBNET,
    TRAP,
    UEFI_ACK,
    UEFI_OFFER,
    UUID,
    Log,
    doc,
    doctor,
    ours,
    wait_event,
)

SIGNED_OFFER = {**UEFI_OFFER, "boot_file": SHIM}
SIGNED_ACK = {**UEFI_ACK, "boot_file": SHIM}
UEFI_HTTP_OFFER = {**UEFI_OFFER, "firmware": "UEFI HTTP",
                   "boot_file": "http://10.86.0.2/ipxe/ipxe.efi"}  # fmt: skip
CONFIG = f"grub/grub.cfg-{MAC}"


def uefi_fetches_ipxe(log: Log, start: float = 0.0) -> Log:
    """x86-64 UEFI firmware up to iPXE fetched to the end: what a machine with Secure Boot on
    does before it refuses iPXE (docs/firmware-quirks.md#33), and nothing after."""
    return (
        log.at(start, Kind.DHCP_OFFER, **UEFI_OFFER)
        .at(start + 1.5, Kind.DHCP_ACK, **UEFI_ACK)
        .at(start + 1.6, Kind.TFTP_FAILED, file="ipxe.efi", reason="size-probe")
        .at(start + 2.0, Kind.TFTP_SENT, file="ipxe.efi", bytes=1_000_000, blksize=1468)
    )


def signed_chain(log: Log, upto: str, start: float = 0.0) -> Log:
    """The signed chain's steps up to `upto` (shim, grub, grub-files, grub-config, kernel)."""
    log.at(start, Kind.DHCP_OFFER, **SIGNED_OFFER).at(start + 1.5, Kind.DHCP_ACK, **SIGNED_ACK)
    log.at(start + 1.6, Kind.TFTP_FAILED, file=SHIM, reason="size-probe")
    log.at(start + 2.0, Kind.TFTP_SENT, file=SHIM, bytes=950_000, blksize=1468)
    if upto == "shim":
        return log
    log.at(start + 3.0, Kind.TFTP_SENT, file=SIGNED_GRUB, bytes=2_000_000, blksize=512)
    if upto == "grub":
        return log
    log.at(start + 4.0, Kind.TFTP_FAILED, file="grub/x86_64-efi/grub.cfg", reason="expected-miss")
    log.at(start + 4.1, Kind.TFTP_FAILED, file="grub/grub.cfg-amd64", reason="expected-miss")
    log.at(start + 4.2, Kind.TFTP_SENT, file=BOOTSTRAP, bytes=200)
    if upto == "grub-files":
        return log
    log.at(start + 4.3, Kind.TFTP_SENT, file=CONFIG, bytes=2000)
    if upto == "grub-config":
        return log
    return log.at(start + 6.0, Kind.HTTP_KERNEL, **KERNEL)


# --------------------------------------------------------------------------- unit


def test_uefi_that_fetched_ipxe_and_went_silent_names_secure_boot_and_the_key() -> None:
    log = uefi_fetches_ipxe(Log())
    d = doc(log, DEFAULT_SETTLE + 1)
    assert not d.ok and not d.waiting
    assert d.cause == "secure-boot" and d.cause in CAUSES
    assert d.verdict.startswith("c1 (x86-64 UEFI) fetched iPXE (ipxe.efi over TFTP, to the end")
    assert "the firmware most likely refused iPXE because Secure Boot is on" in d.verdict
    assert "set secure_boot = true for c1 in lab.toml (in its [[machines]] entry" in d.verdict
    assert "[boot] secure_boot = true" in d.verdict
    assert "or turn Secure Boot off in its firmware setup" in d.verdict
    # The API's JSON carries the cause as a field, for programs (the VM test reads it).
    body = report(d, MAC).model_dump(mode="json")
    assert body["cause"] == "secure-boot" and body["verdict"] == d.verdict
    # snp.efi (or any iPXE EFI build a user put there) is the same.
    snp = Log().at(0, Kind.DHCP_OFFER, **{**UEFI_OFFER, "boot_file": "snp.efi"})
    snp.at(1, Kind.TFTP_SENT, file="snp.efi")
    assert doc(snp, 60).cause == "secure-boot"


def test_within_the_settle_time_it_is_still_booting_not_secure_boot() -> None:
    log = uefi_fetches_ipxe(Log())
    d = doc(log, 5)
    assert d.waiting and not d.ok and d.cause is None
    assert "is booting" in d.verdict and "Secure Boot" not in d.verdict
    # The settle time is the caller's.
    assert doc(log, 5, settle=2).cause == "secure-boot"


def test_bios_that_fetched_undionly_and_went_silent_is_not_secure_boot() -> None:
    log = Log().at(0, Kind.DHCP_OFFER, **BIOS_OFFER)
    log.at(1, Kind.TFTP_SENT, file="undionly.kpxe", bytes=70_000)
    d = doc(log, 120)
    assert not d.ok and d.cause is None
    assert "fetched iPXE but never the script (undionly.kpxe" in d.verdict
    assert "Secure Boot" not in d.verdict and "secure_boot" not in d.verdict


def test_ipxe_that_ran_is_not_secure_boot() -> None:
    # iPXE asked DHCP for its script: it ran, the firmware did not refuse it.
    ran = uefi_fetches_ipxe(Log()).at(6, Kind.DHCP_OFFER, mode="proxy", port=67,
                                      firmware="iPXE", ipxe=True,
                                      boot_file=f"http://10.86.0.2/boot/{MAC}.ipxe")  # fmt: skip
    d = doc(ran, 60)
    assert d.cause is None and "fetched iPXE but never the script: HTTP on port 80" in d.verdict
    # iPXE looks for autoexec.ipxe before anything else (docs/firmware-quirks.md#25).
    autoexec = uefi_fetches_ipxe(Log())
    autoexec.at(3, Kind.TFTP_FAILED, file="autoexec.ipxe", reason="expected-miss")
    assert doc(autoexec, 60).cause is None
    # An old log (no fields) cannot say which firmware asked: no cause drawn.
    old = doc(uefi_fetches_ipxe(Log()).without_fields(), 60)
    assert old.cause is None and "Secure Boot on?" in old.verdict


def test_an_unknown_machine_is_told_the_boot_default_or_to_enroll() -> None:
    d = doc(uefi_fetches_ipxe(Log()), 60, MachineState.DISCOVERED, name=MAC)
    assert d.cause == "secure-boot"
    assert d.verdict.startswith(f"{MAC} (x86-64 UEFI) fetched iPXE")
    assert "set [boot] secure_boot = true in lab.toml" in d.verdict
    assert f"pixiebox enroll {MAC} --name NAME" in d.verdict
    assert "set secure_boot = true in its [[machines]] entry" in d.verdict


def test_a_machine_lab_toml_already_sends_the_signed_chain_is_told_to_power_cycle() -> None:
    d = doc(uefi_fetches_ipxe(Log()), 60, signed_chain=True)
    assert d.cause == "secure-boot"
    assert "lab.toml now hands it the signed chain (secure_boot = true)" in d.verdict
    assert "power-cycle it" in d.verdict and "set secure_boot" not in d.verdict
    assert "set secure_boot = true for c1" in doc(uefi_fetches_ipxe(Log()), 60,
                                                    signed_chain=False).verdict  # fmt: skip


def test_the_firmware_trying_its_next_boot_option_keeps_the_secure_boot_verdict() -> None:
    # OVMF: PXEv4 refused, then the HTTP boot option asks DHCP (a new attempt) and gets no
    # further either (its download over HTTP is refused too and leaves no event).
    log = uefi_fetches_ipxe(Log()).at(40, Kind.DHCP_OFFER, **UEFI_HTTP_OFFER)
    assert len(split_attempts(log.events)[1]) == 2
    d = doc(log, 60)
    assert d.cause == "secure-boot"
    assert "Its firmware then tried its other network boot options" in d.verdict
    # One option after the other (PXEv6, unheard, between them), minutes apart.
    log.at(200, Kind.DHCP_OFFER, **UEFI_HTTP_OFFER).at(390, Kind.DHCP_OFFER, **UEFI_OFFER)
    assert len(split_attempts(log.events)[1]) == 4
    assert doc(log, 60).cause == "secure-boot"
    # Not when that came long after (a power-cycle later is a boot of its own), nor when
    # another boot fetched something in between.
    later = uefi_fetches_ipxe(Log()).at(1000, Kind.DHCP_OFFER, **UEFI_HTTP_OFFER)
    assert doc(later, 60).cause is None
    between = uefi_fetches_ipxe(Log()).at(40, Kind.DHCP_OFFER, **BIOS_OFFER)
    between.at(41, Kind.TFTP_SENT, file="undionly.kpxe").at(90, Kind.DHCP_OFFER, **UEFI_OFFER)
    assert doc(between, 60).cause is None
    # The same refusal again and again is counted.
    again = uefi_fetches_ipxe(uefi_fetches_ipxe(Log()), start=300)
    d = doc(again, 60)
    assert d.cause == "secure-boot" and "the 2nd attempt in a row" in d.verdict


def test_shim_fetched_and_then_nothing_says_shim_did_not_load_grub() -> None:
    d = doc(signed_chain(Log(), "shim"), 60, signed_chain=True)
    assert d.cause == "shim-no-grub" and not d.ok
    assert d.verdict.startswith(f"c1 fetched shim ({SHIM}, at ")
    assert f"never asked for GRUB ({SIGNED_GRUB}): shim did not load GRUB" in d.verdict
    assert "Allow Microsoft 3rd Party UEFI CA" in d.verdict
    assert "Secure Boot is on" not in d.verdict  # not the iPXE verdict
    assert doc(signed_chain(Log(), "shim"), 5).waiting


def test_grub_fetched_but_never_running_says_shim_refused_it() -> None:
    d = doc(signed_chain(Log(), "grub"), 60)
    assert d.cause == "shim-refused-grub"
    assert "shim did not load GRUB; shim most likely refused it" in d.verdict
    assert "shim refuses a GRUB not signed by Debian's key" in d.verdict
    assert "grubnetx64.efi.signed (grub-efi-amd64-signed)" in d.verdict
    # shim then asks for its MOK manager (rhboot/shim init_grub), which Pixiebox does not
    # serve: that "not found" is the refusal's trace, not a missing file to add.
    mok = signed_chain(Log(), "grub")
    mok.at(3.5, Kind.TFTP_FAILED, file="signed/mmx64.efi", reason="not-found", detail="x")
    d = doc(mok, 60)
    assert d.cause == "shim-refused-grub", d.verdict
    assert "shim refused GRUB: it asked for its MOK manager (signed/mmx64.efi)" in d.verdict
    assert "does not have it" not in d.verdict
    assert doc(mok, 5).waiting


def test_grub_running_without_its_configuration() -> None:
    d = doc(signed_chain(Log(), "grub-files"), 60)
    assert d.cause == "grub-no-config"
    assert f"never fetched its own configuration {CONFIG}: GRUB did not find its" in d.verdict
    assert d.verdict.startswith(f"c1's GRUB runs (it asked for {BOOTSTRAP} at ")
    # Pixiebox had no configuration for the MAC it asked about (GRUB booted from a card with
    # another MAC, unknown and ignored): the failure names the MAC and what to do.
    other = "02:00:00:00:86:99"
    missing = signed_chain(Log(), "grub-files")
    missing.at(4.4, Kind.TFTP_FAILED, file=f"grub/grub.cfg-{other}", reason="not-found",
               detail="not in x")  # fmt: skip
    verdict = doc(missing, 1).verdict
    assert f"asked for grub/grub.cfg-{other} over TFTP" in verdict, verdict
    assert f'[boot] unknown = "ignore"; enroll it (pixiebox enroll {other} --name NAME)' in verdict


def test_grub_with_its_configuration_but_no_kernel_says_the_kernel_fetch_failed() -> None:
    d = doc(signed_chain(Log(), "grub-config"), 60, http_port=8081)
    assert d.cause == "grub-no-kernel"
    assert f"c1's GRUB read its configuration ({CONFIG}, at " in d.verdict
    assert "never fetched the kernel over HTTP: the kernel fetch failed" in d.verdict
    assert "HTTP on port 8081 of the appliance" in d.verdict
    assert doc(signed_chain(Log(), "grub-config"), 5).waiting


def test_a_kernel_fetched_again_and_again_without_an_initrd_failed_shims_check() -> None:
    log = signed_chain(Log(), "kernel")
    log.at(8, Kind.HTTP_KERNEL, **KERNEL).at(12, Kind.HTTP_KERNEL, **KERNEL)
    d = doc(log, 60)
    assert d.cause == "kernel-refused"
    assert "fetched the kernel /assets/osie/vmlinuz 3 times" in d.verdict
    assert "bad shim signature" in d.verdict
    # Fetched once, then the initrd: booting, then up: fine, one attempt.
    fine = signed_chain(Log(), "kernel").at(8, Kind.HTTP_INITRD, **INITRD)
    d = doc(fine, 60)
    assert d.waiting and d.cause is None and "still booting" in d.verdict
    fine.at(40, Kind.OS_UP, ip="10.86.0.50", boot_seconds=40)
    d = doc(fine, 5, MachineState.UP)
    assert d.ok and d.cause is None and len(d.attempts) == 1
    # Once, and no initrd past the boot timeout: GRUB, not the iPXE script, stopped.
    once = doc(signed_chain(Log(), "kernel"), 400)
    assert "GRUB stopped before it" in once.verdict and once.cause is None


def test_missing_signed_files_name_the_packages() -> None:
    log = Log().at(0, Kind.DHCP_OFFER, **SIGNED_OFFER).at(1, Kind.TFTP_SENT, file=SHIM)
    log.at(2, Kind.TFTP_FAILED, file=SIGNED_GRUB, reason="not-found", detail="not in /srv")
    verdict = doc(log, 1).verdict
    assert f"asked for {SIGNED_GRUB} over TFTP" in verdict
    assert "grubnetx64.efi.signed (grub-efi-amd64-signed)" in verdict
    assert "apt-get install ipxe" not in verdict


def test_the_secure_boot_verdicts_never_read_messages() -> None:
    scenarios = {
        "ipxe refused": lambda log: uefi_fetches_ipxe(log),
        **{step: (lambda log, s=step: signed_chain(log, s))
           for step in ("shim", "grub", "grub-files", "grub-config")},
    }  # fmt: skip
    for what, build in scenarios.items():
        plain, trapped = doc(build(Log()), 600), doc(build(Log(TRAP)), 600)
        assert (plain.verdict, plain.cause) == (trapped.verdict, trapped.cause), what
        assert plain.cause is not None, what


def test_the_doctor_knows_the_signed_chains_file_names() -> None:
    """The doctor may not import boot: its copies of GRUB's file names must agree."""
    assert DOCTORS_GRUB_DIR == GRUB_DIR and BOOTSTRAP.startswith(GRUB_DIR)
    assert GRUB_MAC_CONFIG.fullmatch(f"{GRUB_DIR}grub.cfg-{MAC}")
    steps = {f: signed_step(Event(0, MAC, 0, Kind.TFTP_SENT, "", {"file": f}))
             for f in (SHIM, SIGNED_GRUB, BOOTSTRAP, CONFIG, "ipxe.efi")}  # fmt: skip
    assert steps == {SHIM: "shim", SIGNED_GRUB: "grub", BOOTSTRAP: "grub-files",
                     CONFIG: "grub-config", "ipxe.efi": None}  # fmt: skip


# --------------------------------------------------------------------------- integration


def _api_doctor(host: netlab.Host, key: str) -> dict[str, object]:
    out = host.run(["curl", "-sS", "--fail", "--max-time", "10",
                    f"{API}/api/v1/machines/{key}/doctor?settle=2"]).stdout  # fmt: skip
    return dict(json.loads(out))


def _tftp(client: netlab.Host, workdir: Path, path: str) -> None:
    client.run(["curl", "-sS", "--fail", "--max-time", "20", "-o", str(workdir / "got"),
                f"tftp://{AGENT_IP}/{path}"])  # fmt: skip


def _settled(event: dict[str, object]) -> None:
    """Past the doctor's settle time (2 s) after `event`."""
    time.sleep(max(0.0, float(event["time"]) + 2.5 - time.time()))  # type: ignore[arg-type]


def test_the_doctor_names_secure_boot_and_the_signed_chains_stops_on_a_real_agent(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("dnsmasq", "dhclient", "curl")  # type: ignore[operator]
    assets = workdir / "assets"
    (assets / "signed").mkdir(parents=True)
    # Stand-ins for Debian's shim and GRUB: DHCP hands out shim only when both are there.
    (assets / SHIM).write_bytes(b"shim " * 40_000)
    (assets / SIGNED_GRUB).write_bytes(b"grub " * 40_000)
    router = segment.add_host("router", ip=f"{ROUTER_IP}/24")
    netlab.start_dnsmasq_router(router, "10.86.0.100", "10.86.0.150", ping_check=False)
    text = lab_toml(mode="proxy", subnet=SUBNET, assets=assets, state=workdir / "state",
                    machines=[("c1", MAC, None), ("sb1", "02:00:00:00:86:02", None)])  # fmt: skip
    text = text.replace("[http]", f'[api]\nlisten = "0.0.0.0:8080"\ntoken_file = '
                        f'"{workdir / "t"}"\n[http]') + "secure_boot = true\n"  # fmt: skip
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    agent = start_agent(agent_host, text, workdir)

    # c1 (no secure_boot): what UEFI firmware with Secure Boot on does with iPXE: DISCOVER,
    # the router's address, Pixiebox on port 4011, iPXE over TFTP to the end; then it refuses
    # it and the network hears nothing more.
    c1 = segment.add_host("c1", mac=MAC)
    assert ours(netlab.pxe_discover(c1, arch=7, uuid=UUID)).file == "ipxe.efi"
    lease = netlab.run_dhclient(c1, workdir / "c1")
    ack = ours(netlab.pxe_request_4011(c1, AGENT_IP, arch=7, uuid=UUID, client_ip=lease.ip))
    assert ack.file == "ipxe.efi"
    _tftp(c1, workdir, "ipxe.efi")
    _settled(wait_event(agent, "c1", Kind.TFTP_SENT))
    code, out = doctor(agent, "c1", "--settle", "2")
    assert code == 2, out
    assert "the firmware most likely refused iPXE because Secure Boot is on" in out, out
    assert "set secure_boot = true for c1 in lab.toml" in out, out
    found = _api_doctor(agent_host, "c1")
    assert found["cause"] == "secure-boot" and found["ok"] is False, found

    # sb1 (secure_boot = true) is handed shim; shim "runs" and stops at each step in turn.
    sb1 = segment.add_host("sb1", mac="02:00:00:00:86:02")
    assert ours(netlab.pxe_discover(sb1, arch=7, uuid=UUID)).file == SHIM
    lease = netlab.run_dhclient(sb1, workdir / "sb1")
    ack = ours(netlab.pxe_request_4011(sb1, AGENT_IP, arch=7, uuid=UUID, client_ip=lease.ip))
    assert ack.file == SHIM
    _tftp(sb1, workdir, SHIM)
    _settled(wait_event(agent, "sb1", Kind.TFTP_SENT))
    found = _api_doctor(agent_host, "sb1")
    assert found["cause"] == "shim-no-grub", found
    assert "shim did not load GRUB" in str(found["verdict"]), found
    # GRUB fetched, ran, read its configuration (generated by the agent) and never the kernel.
    for path in (SIGNED_GRUB, BOOTSTRAP, "grub/grub.cfg-02:00:00:00:86:02"):
        _tftp(sb1, workdir, path)
    assert b"linux" in (workdir / "got").read_bytes()  # its grub.cfg-<mac>: the real thing

    def config_sent() -> dict[str, object] | None:
        url = f"{API}/api/v1/machines/sb1/events"
        events = json.loads(agent_host.run(["curl", "-sS", url]).stdout)
        sent = [e for e in events if e["kind"] == Kind.TFTP_SENT]
        return next(
            (e for e in sent if e["fields"].get("file", "").startswith("grub/grub.cfg-")), None
        )

    _settled(netlab.wait_until(config_sent, 10, 0.2, "no tftp.sent of grub.cfg-<mac>"))
    found = _api_doctor(agent_host, "sb1")
    assert found["cause"] == "grub-no-kernel", found
    assert "never fetched the kernel over HTTP: the kernel fetch failed" in str(found["verdict"])
