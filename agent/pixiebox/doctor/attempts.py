"""A machine's event log as boot attempts, and what each step of one was.

A boot attempt starts at a boot request after a quiet gap, after the machine was up or off, or
when a machine that had already got further (its script, kernel…) asks from the start again.
The signed chain's steps (shim, GRUB, its configuration: docs/firmware-quirks.md#33) are TFTP
downloads told apart by their file names (`signed_step`). Everything here reads an event's kind
and fields only. Events from a database older than typed
events have no fields: a fact they cannot tell is None ("not known"), and the attempt split
then starts a new attempt only on what is known, so an old log is never cut in the wrong place.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pixiebox.core.firmware import SHIM, SIGNED_DIR, SIGNED_GRUB
from pixiebox.events import Event, Kind

#: A boot request after this much silence starts a new attempt (a power cycle, a retry).
ATTEMPT_GAP = 120.0
#: iPXE asking DHCP again this long after the attempt's last step: it gave up and the machine
#: started over (see _starts_attempt). iPXE's own DHCP retransmissions come within seconds.
REASK_GAP = 30.0
#: "discovered"/"enrolled" events this close before a boot request belong to its attempt.
LEAD_IN = 5.0

#: Boot requests answered by DHCP (firmware or iPXE asking; ACKs come from port 4011 or a
#: REQUEST in reservation and full mode).
DHCP_REQUESTS = frozenset({Kind.DHCP_OFFER, Kind.DHCP_ACK})
#: Kinds that are a step of a network boot (they can open an attempt).
CHAIN = frozenset(
    {
        *DHCP_REQUESTS,
        Kind.TFTP_SENT,
        Kind.HTTP_SCRIPT,
        Kind.HTTP_KERNEL,
        Kind.HTTP_INITRD,
        Kind.HTTP_PXELINUX,
        Kind.BOOT_IGNORED,
    }
)
#: Kinds after which a new boot request is a new attempt.
ENDS = frozenset({Kind.OS_UP, Kind.OS_JOINED, Kind.MACHINE_OFF})
#: Steps past the firmware's own: asking DHCP from the start after one means it started over.
PAST_FIRMWARE = frozenset(
    {Kind.HTTP_SCRIPT, Kind.HTTP_KERNEL, Kind.HTTP_INITRD, Kind.HTTP_PXELINUX, Kind.BOOT_IGNORED}
)
#: The iPXE builds a firmware fetches first (undionly.kpxe, ipxe.efi, snp.efi, …).
_LOADER = re.compile(r"\.(efi|kpxe|kkpxe|pxe)$", re.IGNORECASE)
#: TFTP requests that fail on every healthy boot: iPXE looks for an autoexec script, HP and
#: Dell UEFI firmware for a Secure Boot signature file; neither needs to exist.
_ASKED_FOR_NOTHING = frozenset({"autoexec.ipxe", "bootsig.bin"})
#: What Debian's signed GRUB asks for once it runs: files under its built-in prefix /grub, the
#: probes, then grub/grub.cfg, then grub/grub.cfg-<mac> (boot.grub_cfg serves them; the doctor
#: does not import boot). Any of them, even a probe answered "not found", shows GRUB running.
GRUB_DIR = "grub/"
GRUB_MAC_CONFIG = re.compile(r"grub/grub\.cfg-(.+)", re.IGNORECASE)
#: What shim starts when it refused its next stage (rhboot/shim `init_grub`: on
#: EFI_SECURITY_VIOLATION or EFI_ACCESS_DENIED it runs MOK_MANAGER, fetched like GRUB from the
#: boot file's directory). Pixiebox does not serve it: the request is the refusal's trace.
MOK_MANAGER = f"{SIGNED_DIR}/mmx64.efi"
#: The signed chain's steps, last first (see `signed_step`).
SIGNED_STEPS = ("grub-config", "grub-files", "grub-refused", "grub", "shim")


def text(event: Event, key: str) -> str | None:
    """A text field, None when the event does not carry it (or carries no text)."""
    value = event.get(key)
    return value if isinstance(value, str) and value else None


def number(event: Event, key: str) -> float | None:
    """A numeric field, None when the event does not carry it."""
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def ipxe_asked(event: Event) -> bool | None:
    """Whether a boot request came from iPXE itself (it gets its script URL, not a loader);
    None when the event does not say."""
    if event.kind not in DHCP_REQUESTS:
        return False
    said = event.get("ipxe")
    if isinstance(said, bool):
        return said
    boot_file = text(event, "boot_file")
    if boot_file is None:
        return None
    return "://" in boot_file


def is_loader(event: Event) -> bool | None:
    """Whether a TFTP download was an iPXE build; None when the file is not known."""
    if event.kind != Kind.TFTP_SENT:
        return False
    path = text(event, "file")
    if path is None:
        return None
    return _LOADER.search(path) is not None


def _tftp_path(event: Event) -> str | None:
    if event.kind not in (Kind.TFTP_SENT, Kind.TFTP_FAILED):
        return None
    path = text(event, "file")
    return path.lower() if path is not None else None


def signed_step(event: Event) -> str | None:
    """Which step of the signed chain (docs/firmware-quirks.md#33) a TFTP request shows:
    "shim" (the firmware fetched shim to the end), "grub" (shim fetched GRUB to the end),
    "grub-refused" (shim asked for its MOK manager: it refused GRUB), "grub-files" (GRUB asked
    for something under its prefix: it runs), "grub-config" (GRUB got its own grub.cfg-<mac>);
    None for anything else."""
    path = _tftp_path(event)
    if path is None:
        return None
    if path == MOK_MANAGER:
        return "grub-refused"
    sent = event.kind == Kind.TFTP_SENT
    if path == SHIM.lower():
        return "shim" if sent else None
    if path == SIGNED_GRUB.lower():
        return "grub" if sent else None
    if not path.startswith(GRUB_DIR):
        return None
    return "grub-config" if sent and GRUB_MAC_CONFIG.fullmatch(path) else "grub-files"


def on_signed_chain(attempt: Sequence[Event]) -> bool:
    """Whether an attempt was handed shim (a DHCP answer naming it, or shim fetched)."""
    return any(
        signed_step(e) is not None or (e.kind in DHCP_REQUESTS and text(e, "boot_file") == SHIM)
        for e in attempt
    )


def is_ipxe_efi(event: Event) -> bool:
    """Whether a TFTP download to the end was an iPXE build for UEFI (ipxe.efi, snp.efi…), the
    binary firmware with Secure Boot on refuses (not shim or GRUB, which are .efi too)."""
    path = _tftp_path(event)
    if event.kind != Kind.TFTP_SENT or path is None:
        return False
    return path.endswith(".efi") and not path.startswith(SIGNED_DIR + "/")


def tftp_failure_matters(event: Event) -> bool:
    """A TFTP failure that explains a stalled boot; not the normal ones (the UEFI size probe,
    iPXE looking for autoexec.ipxe), nor shim's MOK manager: shim asks for it only after it
    refused GRUB, and that refusal is the cause (doctor.secure_boot says it)."""
    if event.get("reason") in ("size-probe", "expected-miss"):
        return False
    if _tftp_path(event) == MOK_MANAGER:
        return False
    name = (text(event, "file") or "").rsplit("/", 1)[-1].lower()
    return name not in _ASKED_FOR_NOTHING


def _starts_attempt(event: Event, current: list[Event] | None) -> bool:
    if event.kind not in CHAIN:
        return False
    if current is None or event.time - current[-1].time > ATTEMPT_GAP:
        return True
    if any(e.kind in ENDS for e in current):
        return True
    if event.kind not in DHCP_REQUESTS:
        return False
    # Asking from the start again once past the first steps: the machine started over.
    if any(e.kind in PAST_FIRMWARE for e in current):
        return True
    # iPXE asking again long after an iPXE request of this attempt, with nothing past it: its
    # script (or the fetch of it) failed, iPXE exited and the firmware retried the network
    # boot (SeaBIOS's boot retry; QEMU's and many NICs' PXE ROM *is* iPXE, so the retry asks
    # as iPXE too). One attempt of 80 s would hide a failed boot and the good one after it.
    if (
        ipxe_asked(event)
        and event.time - current[-1].time > REASK_GAP
        and any(ipxe_asked(e) for e in current)
    ):
        return True
    # The firmware (not iPXE) asking again after iPXE ran: a reboot. Only when the request
    # says so: an old event that does not say who asked stays in the attempt.
    firmware_again = ipxe_asked(event) is False
    return firmware_again and any(is_loader(e) or ipxe_asked(e) for e in current)


def split_attempts(events: Sequence[Event]) -> tuple[list[Event], list[list[Event]]]:
    """(events before the first boot attempt, the attempts), everything oldest first."""
    before: list[Event] = []
    attempts: list[list[Event]] = []
    current: list[Event] | None = None
    for event in sorted(events, key=lambda e: (e.time, e.id)):
        if _starts_attempt(event, current):
            # What was recorded just before the request belongs to it ("discovered").
            lead: list[Event] = []
            pool = current if current is not None else before
            while (
                pool
                and pool[-1].kind in (Kind.MACHINE_DISCOVERED, Kind.MACHINE_ENROLLED)
                and (event.time - pool[-1].time <= LEAD_IN)
            ):
                lead.insert(0, pool.pop())
            current = [*lead, event]
            attempts.append(current)
        elif current is not None:
            current.append(event)
        else:
            before.append(event)
    return before, attempts


def start_of(attempt: Sequence[Event]) -> Event:
    """An attempt's first boot step (its lead-in events come before it)."""
    return next((e for e in attempt if e.kind in CHAIN), attempt[0])


def stage(attempt: Sequence[Event]) -> str:
    """How far an attempt got, as a word (to tell attempts that stopped at the same place)."""
    kinds = {e.kind for e in attempt if e.kind in CHAIN or e.kind in ENDS}
    for kind in (Kind.OS_UP, Kind.HTTP_INITRD, Kind.HTTP_KERNEL, Kind.HTTP_SCRIPT):
        if kind in kinds:
            return str(kind)
    if Kind.BOOT_IGNORED in kinds:
        return str(Kind.BOOT_IGNORED)
    steps = {signed_step(e) for e in attempt}
    for step in SIGNED_STEPS:
        if step in steps:
            return step
    if any(ipxe_asked(e) or is_loader(e) for e in attempt):
        return "ipxe"
    return "dhcp"


def repeats(attempts: Sequence[Sequence[Event]]) -> str:
    """'3rd' when the last attempts all stopped where the last one did, else ''."""
    last = stage(attempts[-1])
    if last == Kind.OS_UP:
        return ""
    count = 0
    for attempt in reversed(attempts):
        if stage(attempt) != last:
            break
        count += 1
    if count < 2:
        return ""
    suffix = "th" if 10 <= count % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(count % 10, "th")
    return f"{count}{suffix}"
