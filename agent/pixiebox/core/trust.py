"""Who may receive a machine's secrets: the rules of SECURITY.md, applied to the address evidence.

The appliance sits on a home LAN that is not trusted. A machine's secrets (its SSH host private
key and k3s node password, the lab's k3s agent token, the telemetry token) go only to a request
that the evidence ties to that machine:

- **on-link**: the request comes from an address in the lab subnet, and (for TCP, where the
  kernel had to resolve the peer to answer it) the kernel's neighbour entry on the lab interface
  says which MAC sent it. A routed source has no neighbour entry of its own: the frames came
  from its router.
- **the owner**: the MAC the neighbour entry (or, where the kernel has none yet, our own DHCP
  lease, the DHCP request we overheard, or a reservation) binds to that address is the machine
  asked about. A MAC merely named in a URL or a query is a claim, never evidence.
- **during a boot this agent served**: the iPXE script (or U-Boot's pxelinux.cfg) carries a
  per-boot token on the kernel command line, and only when it goes to the machine's own on-link
  address; `/metadata` requires it, and the OS's phone-home retires it (`BootTokens`).

An on-link attacker who spoofs both a machine's MAC and its address is that machine as far as
the network can tell (SECURITY.md says so and what a user can do about it); everything weaker,
a routed host or a neighbour with another MAC, is refused, and every refusal is a
`secret.refused` event (`RefusalNotes`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network

from pixiebox.store.state import StateStore


class Refusal(StrEnum):
    """Why a request was not given a machine's secret (the `reason` of secret.refused)."""

    OFF_LINK = "off-link"
    NOT_OWNER = "not-owner"
    NO_EVIDENCE = "no-evidence"
    NO_TOKEN = "no-token"
    BAD_TOKEN = "bad-token"
    NOT_BOOTED = "not-booted"


#: How each refusal reads in a sentence: "refused c1's metadata to 10.0.1.5: <this>".
REFUSAL_WORDS: dict[Refusal, str] = {
    Refusal.OFF_LINK: "not on the lab segment",
    Refusal.NOT_OWNER: "the neighbour table names another machine at that address",
    Refusal.NO_EVIDENCE: "nothing on the lab segment ties that address to a machine",
    Refusal.NO_TOKEN: "the request carries no boot token",
    Refusal.BAD_TOKEN: "its boot token is not the one of this machine's current boot",
    Refusal.NOT_BOOTED: "that machine never booted through Pixiebox, or is not booted here",
}


#: How each secret (the `secret` field of secret.refused) reads in that sentence.
SECRET_WORDS = {"metadata": "metadata", "boot-token": "boot token", "phone-home": "phone-home"}


@dataclass(frozen=True, slots=True)
class Verdict:
    """Who the evidence says is asking from an address: `mac`, or why nobody (`refusal`).
    `seen_mac` is what the neighbour table had at that address (None when it had nothing)."""

    mac: str | None
    refusal: Refusal | None = None
    seen_mac: str | None = None

    @property
    def proven(self) -> bool:
        return self.mac is not None and self.refusal is None


#: Seconds a boot token stays valid when the OS never phones home (a boot that hung): a day
#: covers the slowest first boot; the next boot's script replaces it anyway.
TOKEN_LIFETIME = 24 * 3600


def _digest(token: str) -> str:
    # Only the digest is stored: a copy of the state database does not hand out live tokens.
    return hashlib.sha256(token.encode()).hexdigest()


class BootTokens:
    """One token per machine for its current boot, on stable storage.

    Stored before the script that carries it is sent ("what is acknowledged is on stable
    storage"): an agent restarted between a node's script and its metadata fetch still knows
    it. Used from the event loop only."""

    def __init__(self, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def issue(self, mac: str) -> str:
        """A new token for `mac`'s boot; the one before it is no longer valid. Stored with this
        loop turn's writes: the caller waits for `committed` (or calls `flush`) before the
        token leaves."""
        token = secrets.token_urlsafe(24)
        self._store.save_boot_token(mac, _digest(token), self._clock())
        return token

    async def committed(self) -> None:
        """Return once the tokens issued in this loop turn are on disk."""
        await self._store.committed()

    def flush(self) -> None:
        """Commit now (for a caller that cannot wait: the TFTP server's file hook)."""
        self._store.flush()

    def check(self, mac: str, token: str | None) -> Refusal | None:
        """None when `token` is `mac`'s current boot token, else why not."""
        if not token:
            return Refusal.NO_TOKEN
        stored = self._store.boot_token(mac)
        if stored is None:
            return Refusal.BAD_TOKEN
        digest, issued = stored
        if self._clock() - issued > TOKEN_LIFETIME:
            return Refusal.BAD_TOKEN
        if not hmac.compare_digest(digest, _digest(token)):
            return Refusal.BAD_TOKEN
        return None

    def retire(self, mac: str) -> None:
        """`mac`'s OS is up: its metadata is not handed out again until its next boot."""
        self._store.retire_boot_token(mac)


#: Seconds during which the same refusal (address, secret, reason) is recorded once: a client
#: hammering /metadata must not fill the event table.
REFUSAL_QUIET = 60.0
#: Refusals remembered for that at most (a flood of source addresses stays bounded).
MAX_REFUSALS_REMEMBERED = 4096


class RefusalNotes:
    """Which refusals were recorded lately, so that each is recorded once a minute at most."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[tuple[str, str, str, str], float] = {}

    def first_in_a_while(self, mac: str, ip: str, secret: str, reason: Refusal) -> bool:
        """True when this refusal was not recorded in the last REFUSAL_QUIET seconds."""
        now = self._clock()
        key = (mac, ip, secret, str(reason))
        last = self._last.get(key)
        if last is not None and now - last < REFUSAL_QUIET:
            return False
        if len(self._last) >= MAX_REFUSALS_REMEMBERED:
            self._last = {k: t for k, t in self._last.items() if now - t < REFUSAL_QUIET}
            if len(self._last) >= MAX_REFUSALS_REMEMBERED:
                return False  # a flood of distinct refusals: the log line still says it
        self._last[key] = now
        return True


@dataclass(frozen=True, slots=True)
class LabLink:
    """The lab segment as the agent is attached to it: the interface its boot services are bound
    to (whose neighbour entries count: None, any) and its subnet (None: not known, no check)."""

    interface: str | None = None
    subnet: IPv4Network | None = None

    def on_link(self, ip: IPv4Address) -> bool:
        return self.subnet is None or ip in self.subnet


_BOOT_TOKEN_ARGUMENT = re.compile(r"(pixiebox\.token=)\S+")


def redact(text: str) -> str:
    """`text` without boot tokens: the kernel prints its command line at boot, and the node's
    journal reaches the appliance's syslog receiver, whose lines are events anyone may read."""
    if "pixiebox.token=" not in text:
        return text
    return _BOOT_TOKEN_ARGUMENT.sub(r"\1<redacted>", text)
