"""What went wrong with a machine's last boot, in plain words: what happened, the likely
cause, what to do next.

Only the last attempt decides the verdict; an older, failed one is history (it only counts to
say "the 3rd attempt in a row"). Every decision reads an event's kind and fields; its message
is shown (in "its last step (…)") but never read. A field an old event lacks becomes "?" or a
vaguer sentence, never a wrong one. Where Secure Boot or the signed chain is the likely cause,
secure_boot has the verdict; a verdict that names a cause also says it as a code (`cause`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from pixiebox.core import wording
from pixiebox.core.lifecycle import MachineState
from pixiebox.doctor.attempts import (
    CHAIN,
    DHCP_REQUESTS,
    ipxe_asked,
    is_loader,
    number,
    on_signed_chain,
    repeats,
    split_attempts,
    start_of,
    text,
    tftp_failure_matters,
)
from pixiebox.doctor.context import Context, Said, clock
from pixiebox.doctor.secure_boot import (
    ipxe_refused,
    kernel_refused,
    missing_signed_file,
    signed_stall,
)
from pixiebox.events import Event, Kind

#: Seconds after the kernel and initrd were sent without a phone-home before the OS is called
#: failed to start (the API's and the CLI's --boot-timeout overrides it).
DEFAULT_BOOT_TIMEOUT = 300.0
#: Seconds after a boot step without the next one before that step is called stalled (a PXE
#: ROM, iPXE and the script each take the next step within a few seconds).
DEFAULT_SETTLE = 30.0
#: How many attempts a Diagnosis keeps (the last one decides; the one before is context).
KEPT_ATTEMPTS = 2
#: Events shown for a machine without a boot attempt.
BEFORE_SHOWN = 30

#: Kinds that say a step failed (a retry may follow).
_FAILURES = frozenset({Kind.TFTP_FAILED, Kind.HTTP_FAILED})
#: (verdict, ok), or (verdict, None) while the last boot is within the doctor's waits.
_Said = tuple[str, bool | None]
#: Firmware that has no Secure Boot: a verdict for it never blames it.
_WITHOUT_SECURE_BOOT = frozenset({"BIOS", "U-Boot"})

#: Signs of a started OS, and how a verdict says each.
_OS_SIGNS = {
    Kind.SYSLOG: "sent its first syslog line",
    Kind.METADATA_SENT: "fetched its metadata",
    Kind.DHCP_LEASE: "asked DHCP for its address",
}
#: What a machine that only ever took an address may have logged besides.
_NO_BOOT_KINDS = frozenset(
    {
        Kind.DHCP_LEASE,
        Kind.SYSLOG,
        Kind.MACHINE_ENROLLED,
        Kind.MACHINE_DISCOVERED,
        Kind.METADATA_SENT,
        Kind.MACHINE_OFF,
    }
)


@dataclass(frozen=True)
class Diagnosis:
    machine: str
    state: str
    #: The last boot attempts (at most KEPT_ATTEMPTS), oldest first; each oldest event first.
    attempts: list[list[Event]]
    #: Plain English: what happened, the likely cause, what to do.
    verdict: str
    #: True only when the last boot reached the OS (it is up or joined).
    ok: bool
    #: The last boot is still within the doctor's waits (settle, boot_timeout): the verdict
    #: says what happened so far, not what went wrong. A page colours it as progress, not as
    #: a failure (it cannot read that from the sentence).
    waiting: bool = False
    #: Why, as a code for programs (tests, scripts: the API's `cause`), when the verdict names
    #: a likely cause with one: "secure-boot" (x86-64 UEFI refused iPXE: set secure_boot), or
    #: where the signed chain stopped; doctor.secure_boot.CAUSES lists them. None otherwise.
    cause: str | None = None


def diagnose(
    events: Sequence[Event],
    *,
    state: MachineState,
    now: float,
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    mode: str = "proxy",
    name: str,
    settle: float = DEFAULT_SETTLE,
    enrolled: bool | None = None,
    http_port: int = 80,
    signed_chain: bool | None = None,
) -> Diagnosis:
    """What the machine's events say about its last boot.

    `mode` is the DHCP mode (proxy | reservation | full); `settle` how long a boot step may go
    without the next one before it counts as stalled; `boot_timeout` the same after the kernel
    and initrd (the OS must phone home by then); `enrolled` whether lab.toml has the machine
    (default: unless its state is discovered); `signed_chain` whether lab.toml hands it the
    signed chain now (core.decision.boot_chain for x86-64 UEFI; None: not known), so that a
    Secure Boot verdict does not ask for a setting that is already there."""
    if enrolled is None:
        enrolled = state is not MachineState.DISCOVERED
    before, attempts = split_attempts(events)
    context = Context(
        name=name,
        mac=events[0].mac if events else name,
        state=state,
        now=now,
        mode=mode,
        enrolled=enrolled,
        boot_timeout=boot_timeout,
        settle=settle,
        http_port=http_port,
        signed_chain=signed_chain,
    )
    if attempts:
        said = _last_attempt(attempts, context)
        kept = attempts[-KEPT_ATTEMPTS:]
    else:
        said = Said(*_without_attempts(before, context))
        kept = [before[-BEFORE_SHOWN:]] if before else []
    return Diagnosis(
        name, str(state), kept, said.text, said.ok is True, said.ok is None, said.cause
    )


# --------------------------------------------------------------------------- wording


def _http_where(requests: Sequence[Event], http_port: int) -> tuple[str, str]:
    """(port, base URL) of the appliance's boot HTTP, from a script URL handed out if any."""
    for event in reversed(requests):
        url = text(event, "boot_file")
        if url is None or "://" not in url:
            continue
        parts = urlsplit(url)
        if parts.hostname:
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:  # a port out of range: the URL says nothing usable
                continue
            return str(port), f"{parts.scheme}://{parts.netloc}/"
    return str(http_port), ""


def _ignored_verdict(c: Context) -> str:
    if c.enrolled:
        return (
            f"{c.name} was ignored as an unknown machine before it was enrolled; it is enrolled "
            "now, so power-cycle it and it will boot."
        )
    return (
        f'{c.name} is an unknown machine and is ignored by policy ([boot] unknown = "ignore" '
        f"in lab.toml): it was told to move on to its next boot device. To boot it, enroll "
        f"it: {wording.enroll_hint(c.mac)}, then power-cycle it."
    )


# --------------------------------------------------------------------------- verdicts


def _last_attempt(attempts: list[list[Event]], c: Context) -> Said:
    attempt = attempts[-1]
    start = start_of(attempt)
    count = repeats(attempts)
    again = f" This is the {count} attempt in a row that stopped there." if count else ""

    up = next((e for e in attempt if e.kind == Kind.OS_UP), None)
    if up is not None:
        return Said(*_booted(attempt, start, up, c))

    chain = [e for e in attempt if e.kind in CHAIN or e.kind in _FAILURES]
    progress = [e for e in chain if e.kind in CHAIN]
    last_step = progress[-1]
    after_step = chain[chain.index(last_step) + 1 :]
    failures = [
        e
        for e in after_step
        if e.kind == Kind.HTTP_FAILED or (e.kind == Kind.TFTP_FAILED and tftp_failure_matters(e))
    ]
    quiet = c.now - max(e.time for e in chain)
    kinds = {e.kind for e in progress}
    settled = quiet >= c.settle

    if last_step.kind == Kind.BOOT_IGNORED:
        return Said(_ignored_verdict(c), False)
    if failures:
        return Said(_failure_verdict(failures[-1], c) + again, False)
    if Kind.HTTP_KERNEL in kinds or (
        Kind.HTTP_PXELINUX in kinds and last_step.kind == Kind.TFTP_SENT
    ):
        refused = kernel_refused(attempt, c) if settled else None
        if refused is not None:
            return Said(refused.text + again, refused.ok, refused.cause)
        return Said(*_after_kernel(attempt, last_step, kinds, quiet, c, again))
    if not settled:
        return Said(
            f"{c.name} is booting: its last step ({last_step.kind}: {last_step.message}) was "
            f"{wording.span(quiet)} ago. Run pixiebox doctor again in a moment.",
            None,
        )
    if Kind.HTTP_SCRIPT in kinds:
        script = next(e for e in reversed(progress) if e.kind == Kind.HTTP_SCRIPT)
        kernel = text(script, "kernel")
        named = f" {kernel}" if kernel else ""
        return Said(
            f"{c.name} fetched its iPXE script at {clock(script.time, c.now)} but never the "
            f"kernel{named}: the script stopped before it. Look at the machine's console (the "
            "script says there why it stopped); check that the URL it fetches from is this "
            "appliance ([network] server_ip) and that the machine has enough memory." + again,
            False,
        )
    requests = [e for e in progress if e.kind in DHCP_REQUESTS]
    port = _http_where(requests, c.http_port)[0]
    # Secure Boot and the signed chain before the general "stalled in iPXE": their downloads
    # are .efi loaders too, and their silence has a likelier cause (doctor.secure_boot).
    cause = ipxe_refused(attempts, c) or signed_stall(attempt, c, port)
    if cause is not None:
        return Said(cause.text + again, cause.ok, cause.cause)
    stalled_in_ipxe = _stalled_in_ipxe(progress, requests, c)
    if stalled_in_ipxe is not None:
        return Said(stalled_in_ipxe + again, False)
    raspi = _raspi_stall(progress, requests, c)
    if raspi is not None:
        return Said(raspi + again, False)
    if requests:
        return Said(_no_boot_file(attempt, start, requests, c) + again, False)
    return Said(
        f"{c.name} stopped after {last_step.kind} ({last_step.message}) at "
        f"{clock(last_step.time, c.now)}, {wording.span(quiet)} ago; look at its console." + again,
        False,
    )


def _booted(attempt: list[Event], start: Event, up: Event, c: Context) -> tuple[str, bool]:
    off = next((e for e in attempt if e.kind == Kind.MACHINE_OFF and e.time >= up.time), None)
    took = wording.span(up.time - start.time)
    if off is not None:
        alive = max((e.time for e in attempt if e.kind != Kind.MACHINE_OFF), default=up.time)
        return (
            f"{c.name} booted ({took} from its first boot request to the OS phoning home, at "
            f"{clock(up.time, c.now)}) and went silent at {clock(alive, c.now)} "
            f"({wording.span(c.now - alive)} ago): it was powered off, or it crashed. If it "
            "should be on, power it on and look at its console.",
            False,
        )
    joined = c.state is MachineState.JOINED or any(e.kind == Kind.OS_JOINED for e in attempt)
    now_what = "it has joined Kubernetes" if joined else "it is up"
    return (
        f"{c.name} booted fine: the OS phoned home {took} after its first boot request "
        f"({clock(start.time, c.now)}); {now_what}.",
        True,
    )


def _after_kernel(
    attempt: list[Event],
    last_step: Event,
    kinds: set[str],
    quiet: float,
    c: Context,
    again: str,
) -> _Said:
    """The kernel (and initrd) went out: the OS should phone home within boot_timeout."""
    with_initrd = Kind.HTTP_INITRD in kinds or Kind.HTTP_PXELINUX in kinds
    sent = "kernel and initrd" if with_initrd else "kernel"
    files = f"the {sent}"
    after = attempt[attempt.index(last_step) + 1 :]
    # Its own OS (the refusal names its MAC at the address) was refused its metadata: the OSIE
    # waits for it forever, so that, not the console, is the answer.
    refused = next(
        (e for e in reversed(after) if e.kind == Kind.SECRET_REFUSED
         and e.get("secret") == "metadata" and e.get("seen_mac") == c.mac),
        None,
    )  # fmt: skip
    if refused is not None:
        return (
            f"{c.name} received {files} and its OS started, but the appliance refused it its "
            f"metadata at {clock(refused.time, c.now)} ({refused.get('reason')}): "
            f"{refused.message}. The OS waits for it; boot the machine again through Pixiebox "
            "(its iPXE script hands it a new boot token).",
            False,
        )
    if quiet < c.boot_timeout:
        return (
            f"{c.name} is still booting: {files} were sent {wording.span(quiet)} ago; the OS "
            f"should phone home soon (doctor waits {wording.span(c.boot_timeout)} before "
            "calling it failed). Run it again in a minute.",
            None,
        )
    sign = next((e for e in after if e.kind in _OS_SIGNS), None)
    if sign is not None:
        return (
            f"{c.name} received {files} and its OS started (it {_OS_SIGNS[Kind(sign.kind)]} at "
            f"{clock(sign.time, c.now)}), but it never phoned home: the OS's startup stopped "
            f"before that. Read its log: pixiebox events {c.name}, or look at its console.",
            False,
        )
    loader = "GRUB" if on_signed_chain(attempt) else "the iPXE script"
    no_initrd = (
        ""
        if with_initrd
        else f" (it never fetched an initrd: if its image has one, {loader} stopped before it)"
    )
    return (
        f"{c.name}: {sent} sent, no phone-home after {wording.span(quiet)}{no_initrd}: the OS "
        "failed to start (or cannot reach the appliance); look at its console." + again,
        False,
    )


def _stalled_in_ipxe(progress: list[Event], requests: list[Event], c: Context) -> str | None:
    """The verdict when iPXE was fetched or asked for its script, and nothing came next."""
    loader = next((e for e in progress if is_loader(e) is not False), None)
    # iPXE's own request; an old event does not say who asked, but a request after a loader
    # was fetched can only be iPXE's (the firmware asking again starts a new attempt).
    ipxe = next(
        (
            e
            for e in requests
            if ipxe_asked(e) or (ipxe_asked(e) is None and loader and e.time >= loader.time)
        ),
        None,
    )
    if loader is None and ipxe is None:
        return None
    port, base = _http_where(requests, c.http_port)
    where = f" ({base})" if base else ""
    if ipxe is None:
        path = (text(loader, "file") if loader is not None else None) or "iPXE"
        # BIOS has no Secure Boot; UEFI on other CPUs (or an old event that does not say) may.
        firmware = {e.get("firmware") for e in requests if e.get("ipxe") is False}
        refused = (
            "iPXE may have failed to start on its network card"
            if firmware and firmware <= _WITHOUT_SECURE_BOOT
            else "the firmware may have refused to run it (Secure Boot on? Debian's iPXE "
            "builds are not signed: switch Secure Boot off)"
        )
        return (
            f"{c.name} fetched iPXE but never the script ({path} was sent over TFTP, but iPXE "
            f"never asked DHCP for its script either): {refused}, or HTTP on port {port} of "
            f"the appliance{where} is unreachable from the machine (a firewall?). Look at its "
            "console, then power-cycle it."
        )
    return (
        f"{c.name} fetched iPXE but never the script: HTTP on port {port} of the "
        f"appliance{where} is unreachable from the machine (a firewall?). Check that nothing "
        f"on the appliance or between them blocks TCP port {port} (nft list ruleset, "
        "iptables -L), then power-cycle it."
    )


def _no_boot_file(attempt: list[Event], start: Event, requests: list[Event], c: Context) -> str:
    """Offered a boot file, never fetched it."""
    boot_file = next((f for f in map(_boot_file, reversed(requests)) if f), None)
    named = f" {boot_file}" if boot_file else ""
    other = ""
    # Outside proxy mode the machine should take the address it was offered (a REQUEST that
    # Pixiebox ACKs); if it never did, another server's offer won. Old events cannot say
    # which answer was which, so only typed ones draw that conclusion.
    if c.mode != "proxy" and any(e.fields for e in requests) and not _took_address(attempt):
        other = (
            " It never took the address Pixiebox offered, so another DHCP server most likely "
            "answered it first: switch that one off or let Pixiebox run in proxy mode."
        )
    other_server = "another DHCP/PXE server" if c.mode == "proxy" else "another DHCP server"
    since_start = f"{clock(start.time, c.now)}, {wording.span(c.now - start.time)} ago"
    return (
        f"{c.name} got a DHCP offer ({since_start}) but never asked for the boot "
        f"file{named}: {other_server} may be answering it, or the firmware is set to UEFI "
        "while only BIOS files are served (or the reverse). Check the firmware's boot mode "
        "(UEFI or legacy BIOS) and for other PXE servers on the LAN (a router with network "
        f"boot on, another dnsmasq), then power-cycle it.{other}"
    )


def _raspi_stall(progress: list[Event], requests: list[Event], c: Context) -> str | None:
    """A Raspberry Pi's boot loader is handed no boot file: it fetches its firmware, config.txt
    and cmdline.txt under its serial number, then the kernel, all over TFTP
    (docs/firmware-quirks.md#28, boot.raspi); None for any other machine."""
    if not any(e.get("firmware") == "Raspberry Pi" for e in requests):
        return None
    sent = [e for e in progress if e.kind == Kind.TFTP_SENT]
    if not sent:
        return (
            f'{c.name} (a Raspberry Pi) was offered the "Raspberry Pi Boot" menu but fetched '
            "nothing over TFTP: check that its EEPROM's BOOT_ORDER has network boot (2) and no "
            "TFTP_IP of another server, and that the appliance's log does not say its firmware "
            "is missing, then power-cycle it."
        )
    last = sent[-1]
    return (
        f"{c.name} (a Raspberry Pi) fetched {text(last, 'file')} over TFTP at "
        f"{clock(last.time, c.now)} and stopped before the kernel: look at its HDMI or serial "
        "console (BOOT_UART=1 in its EEPROM configuration shows the boot loader's steps) and "
        "check that [boot] assets has the kernel, initrds and device tree its config.txt names."
    )


def _boot_file(event: Event) -> str | None:
    return text(event, "boot_file")


def _took_address(attempt: list[Event]) -> bool:
    """Whether the machine bound an address from Pixiebox (outside proxy mode)."""
    for event in attempt:
        if event.kind == Kind.DHCP_ACK and event.get("mode") != "proxy":
            return True
        if event.kind == Kind.DHCP_LEASE and event.get("action") in ("bound", "renewed"):
            return True
    return False


def _failure_verdict(failure: Event, c: Context) -> str:
    at = clock(failure.time, c.now)
    path = text(failure, "file") or "?"
    reason = (text(failure, "reason") or "").replace("_", "-")
    if failure.kind == Kind.TFTP_FAILED:
        detail = text(failure, "detail")
        if reason == "not-found":
            why = f" ({detail})" if detail else ""
            what = missing_signed_file(path) or (
                "put the file there (for iPXE builds: apt-get install ipxe)"
            )
            return (
                f"{c.name} asked for {path} over TFTP at {at}, but the appliance does not have "
                f"it{why}: {what}."
            )
        said = detail or reason or "no reason recorded"
        return (
            f"{c.name}'s TFTP download of {path} failed at {at}: {said}. A flaky link or a "
            "firewall dropping UDP (port 69 and the high ports TFTP answers from) is the usual "
            "cause; power-cycle it to try again."
        )
    if reason == "broken":
        sent = number(failure, "bytes")
        after = f" after {wording.size(int(sent))}" if sent else " before the end"
        return (
            f"{c.name} broke off the download of {path}{after} (at {at}): the connection "
            "dropped or the machine gave up (out of memory, a flaky cable or switch port). "
            "Check the link and that the file on the appliance is complete; the script "
            "retries, and a power-cycle starts over."
        )
    if reason == "no-image":
        image = text(failure, "image")
        which = (
            f"image {image}, but lab.toml has no [images.{image}]"
            if image
            else "an image that has no [images.NAME] section in lab.toml"
        )
        return (
            f"{c.name} could not be booted (at {at}): it should boot {which}; add it, or give "
            "the machine another image."
        )
    missing = f": {path} does not exist on the appliance" if path != "?" else ""
    return (
        f"{c.name} could not download a boot file (at {at}){missing}. Put the file in the "
        "appliance's [boot] assets directory or fix the image's paths in lab.toml, then "
        "power-cycle it."
    )


def _without_attempts(before: list[Event], c: Context) -> tuple[str, bool]:
    """Verdicts for a machine that never went through a boot Pixiebox answered."""
    kinds = {e.kind for e in before}
    if not before:
        proxy = (
            " (in proxy mode the home router hands out addresses; Pixiebox answers only its "
            "PXE requests)"
            if c.mode == "proxy"
            else ""
        )
        return (
            f"Pixiebox has never heard from {c.name}: is it set to boot from the network (PXE) "
            f"first, and on the same LAN as the appliance's interface?{proxy}",
            False,
        )
    if Kind.BOOT_IGNORED in kinds or any(
        e.kind == Kind.MACHINE_DISCOVERED and e.get("policy") == "ignore" for e in before
    ):
        return _ignored_verdict(c), False
    up = next((e for e in reversed(before) if e.kind == Kind.OS_UP), None)
    if up is not None and c.state in (MachineState.UP, MachineState.JOINED):
        return (
            f"{c.name} is up: its OS phoned home at {clock(up.time, c.now)}, without a network "
            "boot Pixiebox saw (it booted from its disk, or before Pixiebox kept its log).",
            True,
        )
    if Kind.DHCP_LEASE in kinds and kinds <= _NO_BOOT_KINDS:
        return (
            f"{c.name} got an address from Pixiebox but never asked to boot from the network: "
            "PXE is off in its firmware, or its boot order puts a disk first. Enable network "
            "boot (PXE) and put it first, then power it on.",
            False,
        )
    last = before[-1]
    if last.kind == Kind.MACHINE_DISCOVERED:
        return (
            f"{c.name} asked to boot at {clock(last.time, c.now)} but Pixiebox did not answer "
            "it: the appliance has no boot file for its firmware. The agent's log names the "
            "file to add.",
            False,
        )
    return (
        f"{c.name} has not booted through Pixiebox; the last it heard was {last.kind} "
        f"({last.message}) at {clock(last.time, c.now)}.",
        False,
    )
