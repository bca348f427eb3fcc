"""Events are data: a dotted kind, the facts as fields, and a sentence for people.

Everything that happens to a machine (a DHCP answer, a file sent, the OS phoning home, a power
action, a syslog line) is one `Event`. Code that reacts to events (the lifecycle's states, the
boot doctor, the demo's live stages, `lab up`, the dashboard) reads `kind` and `fields`; the
`message` is display only and may be reworded freely. `KINDS` below is the catalogue: each kind,
what it means, and the fields it carries (a field may be absent when the sender could not know
it). The API returns all three for every event.

A leaf module: it imports nothing of pixiebox, so the store can persist events and every
package can emit them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

#: What a field may hold: JSON scalars only, so an event stores and travels as JSON unchanged.
FieldValue = str | int | float | bool | None
Fields = Mapping[str, FieldValue]


class Kind(StrEnum):
    """Every kind of event. The value is what the API, the store and SSE `event:` lines show."""

    MACHINE_DISCOVERED = "machine.discovered"
    MACHINE_ENROLLED = "machine.enrolled"
    MACHINE_OFF = "machine.off"
    MACHINE_FORGOTTEN = "machine.forgotten"
    DHCP_OFFER = "dhcp.offer"
    DHCP_ACK = "dhcp.ack"
    DHCP_LEASE = "dhcp.lease"
    DHCP_REFUSED = "dhcp.refused"
    TFTP_SENT = "tftp.sent"
    TFTP_FAILED = "tftp.failed"
    HTTP_SCRIPT = "http.script"
    HTTP_PXELINUX = "http.pxelinux"
    HTTP_KERNEL = "http.kernel"
    HTTP_INITRD = "http.initrd"
    HTTP_FAILED = "http.failed"
    BOOT_IGNORED = "boot.ignored"
    METADATA_SENT = "metadata.sent"
    SECRET_REFUSED = "secret.refused"
    API_REFUSED = "api.refused"
    OS_UP = "os.up"
    OS_JOINED = "os.joined"
    SYSLOG = "syslog"
    POWER_ON = "power.on"
    POWER_OFF = "power.off"
    POWER_CYCLE = "power.cycle"
    POWER_STATUS = "power.status"


#: kind → (what it means, {field: what it holds}). Documentation that the tests hold the emitters
#: to: an event's fields must be a subset of its kind's fields here.
KINDS: dict[Kind, tuple[str, dict[str, str]]] = {
    Kind.MACHINE_DISCOVERED: (
        "an unknown MAC asked to boot for the first time",
        {
            "arch": "CPU from DHCP option 93 (x86_64, arm64...), absent when not reported",
            "firmware": "BIOS, UEFI, UEFI HTTP, U-Boot",
            "vendor": "the MAC's manufacturer (OUI), when known",
            "policy": "[boot] unknown: discover, enroll or ignore",
            "image": "the image it will boot, absent under ignore",
        },
    ),
    Kind.MACHINE_ENROLLED: (
        "added to lab.toml (pixiebox enroll, the API, or [boot] unknown = enroll)",
        {"name": "its name in lab.toml", "ip": "its reserved address, when it got one"},
    ),
    Kind.MACHINE_OFF: (
        "the machine is off: silent too long, or a power action saw it off",
        {
            "cause": "silence or power",
            "silent_for": "seconds since it was last heard (cause = silence)",
            "was": "its state before (booting, up, joined)",
        },
    ),
    Kind.MACHINE_FORGOTTEN: (
        'discovered machines (not in lab.toml) were forgotten, in the lab\'s log (mac ""): '
        "their records and events, not their leases; one event a minute at most per reason",
        {
            "reason": "age (not heard from for [boot] forget_discovered_after) or cap (the "
            "least recently heard past [boot] max_discovered, those that never got past DHCP "
            "first: a flood of DHCP requests from many MACs)",
            "count": "machines forgotten for that reason since the last such event",
            "max_discovered": "[boot] max_discovered",
            "forget_after": "[boot] forget_discovered_after, in seconds",
        },
    ),
    Kind.DHCP_OFFER: (
        "a DHCP OFFER with boot information: a step of the boot chain",
        {
            "mode": "proxy, reservation or full",
            "port": "67, or 4011 for a PXE request",
            "firmware": "BIOS, UEFI... or iPXE when iPXE itself asked",
            "arch": "CPU from option 93",
            "ipxe": "true when iPXE asked (it gets its script URL, not a loader)",
            "boot_file": "the loader file name or the script URL handed out",
            "ip": "the address offered (absent in proxy mode)",
        },
    ),
    Kind.DHCP_ACK: ("a DHCP ACK with boot information", {}),  # same fields as dhcp.offer
    Kind.DHCP_LEASE: (
        "an address lease without boot information (the booted OS renewing, a release)",
        {
            "action": "offered (reservation and full mode), bound, renewed, released or declined",
            "ip": "the address",
            "lease_time": "seconds (bound, renewed)",
        },
    ),
    Kind.DHCP_REFUSED: (
        "a DHCP request answered with NAK or not answered, and why",
        {"reason": "short machine-readable reason", "ip": "the address concerned"},
    ),
    Kind.TFTP_SENT: (
        "a file sent over TFTP, to the last ACK",
        {
            "file": "the path asked for",
            "bytes": "its size",
            "seconds": "how long the transfer took",
            "blksize": "negotiated block size",
        },
    ),
    Kind.TFTP_FAILED: (
        "a TFTP request that was refused or broke off",
        {
            "file": "the path asked for",
            "reason": "not-found, outside, refused, timeout, peer-error, size-probe (UEFI "
            "firmware stopped once it knew the size: normal, the real download follows), "
            "expected-miss (autoexec.ipxe, bootsig.bin: firmware is fine without them), "
            "busy (a [tftp] limit was reached: the client got ERROR 0 'server busy'), evicted "
            "(it had acknowledged nothing and gave way to a newer request at a limit), "
            "stopping (the agent stopped mid-transfer), ...",
            "detail": "more for people (the client's error text, paths looked at)",
        },
    ),
    Kind.HTTP_SCRIPT: (
        "the machine's iPXE script was served",
        {
            "file": "the URL path",
            "image": "the image the script boots",
            "kernel": "the kernel it fetches next",
            "initrds": "the initrds it fetches next, comma-separated",
        },
    ),
    Kind.HTTP_PXELINUX: (
        "a U-Boot pxelinux.cfg file was served (over HTTP or TFTP), or a Raspberry Pi's "
        "cmdline.txt (TFTP, boot.raspi): the boot configuration before the kernel",
        {
            "file": "the path",
            "image": "the image it boots",
            "kernel": "the kernel next",
            "serial": "the Raspberry Pi's serial number (its TFTP prefix), when it asked so",
        },
    ),
    Kind.HTTP_KERNEL: (
        "a kernel was sent over HTTP to its last byte",
        {"file": "the URL path", "bytes": "bytes sent", "seconds": "how long it took"},
    ),
    Kind.HTTP_INITRD: (
        "an initrd was sent over HTTP to its last byte",
        {"file": "the URL path", "bytes": "bytes sent", "seconds": "how long it took"},
    ),
    Kind.HTTP_FAILED: (
        "a boot file could not be sent over HTTP",
        {
            "file": "the URL path",
            "reason": "missing (no such file), broken (the transfer broke off), no-image "
            "(lab.toml names an image that has no [images.NAME] section)",
            "bytes": "bytes sent before it broke off",
            "status": "the HTTP status answered",
            "image": "the image lab.toml names (reason = no-image)",
        },
    ),
    Kind.BOOT_IGNORED: (
        "the machine asked to boot and was deliberately not answered",
        {"reason": "unknown-ignored ([boot] unknown = ignore)", "protocol": "dhcp, tftp, http"},
    ),
    Kind.METADATA_SENT: (
        "the booted OS fetched its /metadata: who received which secrets, and when",
        {
            "ip": "the address it asked from",
            "secrets": "the secrets in the document, comma-separated: ssh-host-key, "
            "node-password, k3s-token, telemetry-token (empty for a merely discovered machine)",
        },
    ),
    Kind.SECRET_REFUSED: (
        "a machine's secret (its metadata, a boot token, its phone-home) was refused to a "
        "request the evidence does not tie to that machine (SECURITY.md); recorded on the "
        'machine asked about, or lab-wide (mac "") when none is known',
        {
            "secret": "metadata, boot-token or phone-home",
            "ip": "the address the request came from",
            "reason": "off-link (not on the lab segment), not-owner (the neighbour table names "
            "another MAC at that address), no-evidence (nothing ties the address to a machine), "
            "no-token / bad-token (the boot token is missing, unknown or retired), not-booted "
            "(never booted through Pixiebox, or [boot] unknown = ignore)",
            "seen_mac": "the MAC the neighbour table has at that address, when it has one",
        },
    ),
    Kind.API_REFUSED: (
        'a sign-in or a change to the lab was refused by the API, in the lab\'s log (mac ""); '
        "the same reason is recorded a few times a minute at most",
        {
            "source": "the address the request came from",
            "reason": "wrong-token (sign-in with a token that is not this agent's), "
            "rate-limited (too many sign-in attempts from that address), bad-bearer (an action "
            "with a wrong Authorization: Bearer token), csrf (a session cookie without the "
            "X-Pixiebox-CSRF header, or from a page of another origin)",
        },
    ),
    Kind.OS_UP: (
        "the OS phoned home: it is up",
        {
            "ip": "its address",
            "boot_seconds": "seconds since the boot's first request",
            "secure_boot": "on or off as the OS reports it (its own claim); absent: not reported",
        },
    ),
    Kind.OS_JOINED: ("its Kubernetes node is Ready", {"ip": "its address"}),
    Kind.SYSLOG: (
        "a line of the machine's syslog",
        {"severity": "emerg ... debug", "facility": "kern, daemon...", "app": "the tag"},
    ),
    Kind.POWER_ON: (
        "a step of a power-on action",
        {
            "driver": "the driver used (wol, ssh, redfish...)",
            "outcome": "asked, sent, failed, done, timeout, nothing-to-do",
            "reason": "why it failed or was not needed: unusable (bad lab.toml entry), "
            "driver-error, no-answer, not-up, still-on, no-driver, internal-error, already-on, "
            "already-off, booting (it was booting: no driver used), relay-on (a plug read on "
            "while the machine was not up, so it was cycled)",
            "detail": "more for people (the driver's error sentence)",
        },
    ),
    Kind.POWER_OFF: ("a step of a power-off action", {}),  # same fields as power.on
    Kind.POWER_CYCLE: ("a step of a power-cycle action", {}),  # same fields as power.on
    Kind.POWER_STATUS: ("a power reading", {"state": "on, off, unknown", "watts": "reading"}),
}

#: Kinds whose fields are those of another kind.
SAME_FIELDS = {
    Kind.DHCP_ACK: Kind.DHCP_OFFER,
    Kind.POWER_OFF: Kind.POWER_ON,
    Kind.POWER_CYCLE: Kind.POWER_ON,
}


def fields_of(kind: Kind) -> dict[str, str]:
    """The fields documented for `kind`."""
    return KINDS[SAME_FIELDS.get(kind, kind)][1]


#: The steps of a boot before the OS is up: each moves a machine to `booting`.
BOOT_CHAIN = frozenset(
    {
        Kind.DHCP_OFFER,
        Kind.DHCP_ACK,
        Kind.TFTP_SENT,
        Kind.HTTP_SCRIPT,
        Kind.HTTP_PXELINUX,
        Kind.HTTP_KERNEL,
        Kind.HTTP_INITRD,
    }
)

#: Kinds a pre-typed database stored, and what they are now (store migration).
LEGACY_KINDS = {
    "discovered": Kind.MACHINE_DISCOVERED,
    "enrolled": Kind.MACHINE_ENROLLED,
    "off": Kind.MACHINE_OFF,
    "dhcp": Kind.DHCP_OFFER,
    "lease": Kind.DHCP_LEASE,
    "tftp": Kind.TFTP_SENT,
    "tftp-error": Kind.TFTP_FAILED,
    "script": Kind.HTTP_SCRIPT,
    "pxelinux": Kind.HTTP_PXELINUX,
    "kernel": Kind.HTTP_KERNEL,
    "initrd": Kind.HTTP_INITRD,
    "http-error": Kind.HTTP_FAILED,
    "ignored": Kind.BOOT_IGNORED,
    "metadata": Kind.METADATA_SENT,
    "phone-home": Kind.OS_UP,
    "joined": Kind.OS_JOINED,
    "syslog": Kind.SYSLOG,
    "power": Kind.POWER_ON,
}


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened to one machine (`mac`), as stored: `id` orders them."""

    id: int
    mac: str
    time: float
    kind: str
    message: str
    fields: Fields = field(default_factory=dict)

    def get(self, key: str) -> FieldValue:
        """A field's value, None when the event does not carry it."""
        return self.fields.get(key)
