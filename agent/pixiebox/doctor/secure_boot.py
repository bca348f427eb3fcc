"""Verdicts where Secure Boot is the likely cause, and where the signed chain stopped.

Secure Boot refusals leave no trace on the network (docs/firmware-quirks.md#35): UEFI firmware
downloads its boot file to the end and only then checks its signature, so an x86-64 UEFI machine
that fetched iPXE and was refused looks like one whose iPXE died at once: the download, then
nothing. What tells them apart is the next step iPXE always takes and firmware never does: iPXE
asks DHCP again (user class "iPXE") or asks TFTP for autoexec.ipxe (#25). Without either, and on
firmware that has Secure Boot at all (x86-64 UEFI, where the signed chain is the fix), the
doctor names Secure Boot and the lab.toml key that hands the machine shim instead.

The signed chain (#33) has its own silent refusals: the firmware may refuse shim (it is signed
by Microsoft's third-party UEFI CA, which Secured-core PCs do not trust until told to), shim
refuses a GRUB its distribution did not sign, GRUB refuses a kernel shim cannot verify. Each
shows as the last TFTP or HTTP download of the chain with nothing of the next one: `signed_step`
(attempts) names the step from the file name, this module says what it means.

Each verdict carries a cause (`CAUSES`) that the API reports as `cause`, so tests and scripts
read it instead of the sentence.
"""

from __future__ import annotations

from collections.abc import Sequence

from pixiebox.core import wording
from pixiebox.core.firmware import SHIM, SIGNED_GRUB
from pixiebox.doctor.attempts import (
    CHAIN,
    DHCP_REQUESTS,
    GRUB_MAC_CONFIG,
    MOK_MANAGER,
    is_ipxe_efi,
    on_signed_chain,
    signed_step,
    start_of,
    text,
    tftp_failure_matters,
)
from pixiebox.doctor.context import Context, Said, clock
from pixiebox.events import Event, Kind

#: Seconds from one failed network boot option of UEFI firmware to its next: a PXEv6 or HTTP
#: boot option waits for DHCP answers for a minute or more before the firmware moves on.
NEXT_OPTION_GAP = 600.0
#: The machine-readable causes (Diagnosis.cause, the API's `cause`), and what each means.
CAUSES = {
    "secure-boot": "x86-64 UEFI fetched iPXE and never ran it: its firmware refused it",
    "shim-no-grub": "shim was fetched, but it never asked for GRUB",
    "shim-refused-grub": "shim fetched GRUB, but GRUB never ran",
    "grub-no-config": "GRUB ran, but never fetched its grub.cfg-<mac>",
    "grub-no-kernel": "GRUB read its grub.cfg-<mac>, but never fetched the kernel",
    "kernel-refused": "GRUB fetched the kernel again and again, never an initrd",
}
#: Where Debian's signed files come from (image/trixie.txt pins them; build.sh unpacks them).
_SIGNED_FILES = (
    f"{SHIM} is trixie's shimx64.efi.signed (package shim-signed) and {SIGNED_GRUB} its "
    "grubnetx64.efi.signed (grub-efi-amd64-signed), renamed, in [boot] assets"
)


def _x86_uefi(request: Event) -> bool:
    """The firmware itself (not iPXE) of an x86-64 UEFI machine asked: DHCP option 93 = 7 or
    9 (and 2, 8: docs/firmware-quirks.md#12), over TFTP. UEFI HTTP boot clients and other CPUs
    cannot take the signed chain (core.firmware.signed_chain_fits)."""
    return (
        request.kind in DHCP_REQUESTS
        and request.get("ipxe") is False
        and request.get("firmware") == "UEFI"
        and request.get("arch") == "x86_64"
    )


def _refused_ipxe(attempt: Sequence[Event]) -> Event | None:
    """The iPXE download (tftp.sent) the firmware most likely refused, or None: an x86-64 UEFI
    machine, not on the signed chain, fetched an iPXE EFI build to the end, and nothing came
    after it (no iPXE DHCP request, no autoexec.ipxe, no script)."""
    if on_signed_chain(attempt) or not any(_x86_uefi(e) for e in attempt):
        return None
    loader = next((e for e in reversed(attempt) if is_ipxe_efi(e)), None)
    if loader is None:
        return None
    after = attempt[attempt.index(loader) + 1 :]
    return None if any(map(_ipxe_ran, after)) else loader


def _ipxe_ran(event: Event) -> bool:
    """A step only iPXE takes after the firmware's download: a DHCP request (the firmware
    asking again starts a new attempt), autoexec.ipxe (docs/firmware-quirks.md#25), a script."""
    if event.kind == Kind.TFTP_FAILED:
        name = (text(event, "file") or "").rsplit("/", 1)[-1].lower()
        return name == "autoexec.ipxe" or tftp_failure_matters(event)
    return event.kind in CHAIN or event.kind == Kind.HTTP_FAILED


def _what_to_set(c: Context) -> str:
    if c.enrolled:
        return (
            f"set secure_boot = true for {c.name} in lab.toml (in its [[machines]] entry; or "
            "[boot] secure_boot = true for every x86-64 UEFI machine), which hands it Debian's "
            "signed shim and GRUB instead"
        )
    return (
        "set [boot] secure_boot = true in lab.toml (every x86-64 UEFI machine, unknown ones "
        "included, then gets Debian's signed shim and GRUB), or enroll it "
        f"({wording.enroll_hint(c.mac)}) and set secure_boot = true in its [[machines]] entry"
    )


def _secure_boot_said(loader: Event, c: Context, extra: str = "") -> Said:
    path = text(loader, "file") or "iPXE"
    said = (
        f"{c.name} (x86-64 UEFI) fetched iPXE ({path} over TFTP, to the end, at "
        f"{clock(loader.time, c.now)}) and then went silent, without iPXE ever asking DHCP for "
        "its script: the firmware most likely refused iPXE because Secure Boot is on (iPXE is "
        f'not signed by a key the firmware trusts; its console says "Access Denied").{extra}'
    )
    if c.signed_chain:
        # lab.toml was changed since: the next boot gets shim.
        return Said(
            f"{said} lab.toml now hands it the signed chain (secure_boot = true), which this "
            "boot predates: power-cycle it.",
            False,
            "secure-boot",
        )
    return Said(
        f"{said} To boot it, {_what_to_set(c)}, or turn Secure Boot off in its firmware setup; "
        "then power-cycle it. (With Secure Boot already off, iPXE's own network driver may "
        "have failed on its card: look at its console.)",
        False,
        "secure-boot",
    )


def _only_firmware(attempt: Sequence[Event]) -> bool:
    """An attempt that is only UEFI firmware asking DHCP (another boot option of its NIC:
    PXE again, HTTP boot, whose download over HTTP leaves no event) and fetching nothing."""
    steps = [e for e in attempt if e.kind in CHAIN]
    return bool(steps) and all(
        e.kind in DHCP_REQUESTS
        and e.get("ipxe") is False
        and str(e.get("firmware") or "").startswith("UEFI")
        for e in steps
    )


def ipxe_refused(attempts: Sequence[Sequence[Event]], c: Context) -> Said | None:
    """The Secure Boot verdict for the last attempt (its boot steps are past the settle time),
    or None. Also when the firmware, after refusing iPXE, went on through its other network
    boot options and they got nowhere either: the attempts after the refused one are then
    only its DHCP requests, each soon after the one before (OVMF tries PXEv4, PXEv6, HTTPv4,
    HTTPv6 in turn, then waits in its boot manager)."""
    last = len(attempts) - 1
    for index in range(last, -1, -1):
        attempt = attempts[index]
        loader = _refused_ipxe(attempt)
        if loader is not None:
            if index == last:
                return _secure_boot_said(loader, c)
            asked = start_of(attempts[index + 1]).time
            return _secure_boot_said(
                loader,
                c,
                f" Its firmware then tried its other network boot options (it asked DHCP again "
                f"at {clock(asked, c.now)}) and got no further.",
            )
        if not _only_firmware(attempt) or index == 0:
            return None
        if start_of(attempt).time - attempts[index - 1][-1].time > NEXT_OPTION_GAP:
            return None
    return None


def signed_stall(attempt: Sequence[Event], c: Context, http_port: str) -> Said | None:
    """Where the signed chain stopped, for an attempt past the settle time that never fetched a
    kernel (and no download failed); None when it is not on the signed chain or never fetched
    shim (the general verdicts say that)."""
    if not on_signed_chain(attempt):
        return None
    reached = {step: e for e in attempt if (step := signed_step(e)) is not None}
    look = "Look at its console, then power-cycle it."
    if "grub-config" in reached:
        config = reached["grub-config"]
        return Said(
            f"{c.name}'s GRUB read its configuration ({text(config, 'file')}, at "
            f"{clock(config.time, c.now)}) but never fetched the kernel over HTTP: the kernel "
            f"fetch failed. HTTP on port {http_port} of the appliance is most likely "
            "unreachable from the machine (a firewall?); GRUB retries, then says on its console "
            "why it gave up (also when lab.toml gives it nothing to boot). Check that nothing "
            f"on the appliance or between them blocks TCP port {http_port} (nft list ruleset, "
            "iptables -L), then power-cycle it.",
            False,
            "grub-no-kernel",
        )
    if "grub-files" in reached:
        asked = reached["grub-files"]
        return Said(
            f"{c.name}'s GRUB runs (it asked for {text(asked, 'file')} at "
            f"{clock(asked.time, c.now)}) but never fetched its own configuration "
            f"grub/grub.cfg-{c.mac}: GRUB did not find its configuration. Its grub/grub.cfg "
            "sources grub/grub.cfg-<the MAC it booted from>, which it never asked for. "
            f"{look}",
            False,
            "grub-no-config",
        )
    if "grub-refused" in reached or "grub" in reached:
        grub = reached.get("grub") or reached["grub-refused"]
        refused = reached.get("grub-refused")
        seen = (
            f"shim refused GRUB: it asked for its MOK manager ({MOK_MANAGER}) at "
            f"{clock(refused.time, c.now)}, which shim does when it refused its next stage "
            '(its console says "Verification failed: (0x1A) Security Violation")'
            if refused is not None
            else 'shim most likely refused it (its console then says "Verification failed")'
        )
        return Said(
            f"{c.name}'s shim fetched GRUB ({SIGNED_GRUB}, at {clock(grub.time, c.now)}) but "
            f"GRUB never asked for anything under grub/: shim did not load GRUB; {seen}. shim "
            f"refuses a GRUB not signed by Debian's key: {_SIGNED_FILES}, both from the same "
            f"release. {look}",
            False,
            "shim-refused-grub",
        )
    if "shim" in reached:
        shim = reached["shim"]
        return Said(
            f"{c.name} fetched shim ({SHIM}, at {clock(shim.time, c.now)}) but never asked for "
            f"GRUB ({SIGNED_GRUB}): shim did not load GRUB. Either its firmware refused shim "
            "(shim is signed by Microsoft's third-party UEFI CA, which some firmware, e.g. "
            'Secured-core PCs, trusts only once "Allow Microsoft 3rd Party UEFI CA" is on in '
            "its setup) or shim could not fetch GRUB over TFTP from the appliance. "
            f"{look}",
            False,
            "shim-no-grub",
        )
    return None


def kernel_refused(attempt: Sequence[Event], c: Context) -> Said | None:
    """On the signed chain, GRUB fetching the same kernel again and again and never an initrd:
    its `linux` command failed, and under Secure Boot that is shim refusing the kernel (GRUB
    verifies it through shim before it loads the initrds; boot.grub_cfg retries each download).
    None otherwise, or when the OS shows signs of life."""
    if not on_signed_chain(attempt):
        return None
    kernels = [e for e in attempt if e.kind == Kind.HTTP_KERNEL]
    if len(kernels) < 2 or any(e.kind in (Kind.HTTP_INITRD, Kind.OS_UP) for e in attempt):
        return None
    if any(e.kind in (Kind.SYSLOG, Kind.METADATA_SENT) for e in attempt):
        return None
    path = text(kernels[-1], "file")
    named = f" {path}" if path else ""
    return Said(
        f"{c.name}'s GRUB fetched the kernel{named} {len(kernels)} times (the last at "
        f"{clock(kernels[-1].time, c.now)}) and never an initrd: the kernel most likely failed "
        "shim's check. Under Secure Boot GRUB starts only a kernel signed by a key shim trusts "
        '(its console says "bad shim signature"): give the image a kernel Debian signed '
        "(linux-image-amd64), or turn Secure Boot off in its firmware setup. Look at its "
        "console, then power-cycle it.",
        False,
        "kernel-refused",
    )


def missing_signed_file(path: str) -> str | None:
    """What to do when a signed-chain file was asked for and is not on the appliance."""
    if path.lower() in (SHIM.lower(), SIGNED_GRUB.lower()):
        return f"put it there: {_SIGNED_FILES}"
    config = GRUB_MAC_CONFIG.fullmatch(path)
    if config is None:
        return None
    return (
        "Pixiebox writes a GRUB configuration for every MAC it boots, so it does not boot "
        f'{config.group(1)}: an unknown machine under [boot] unknown = "ignore"; enroll it '
        f"({wording.enroll_hint(config.group(1))}) and power-cycle it"
    )
