"""A machine's iPXE script, handed out again unchanged when the machine fetches it again at once.

iPXE fetches `/boot/<mac>.ipxe` once per boot. A second fetch of the same URL by the same machine
a moment later, with nothing else recorded for it in between, is the same boot step again (a
response lost to a timeout, a double `chain`, a client hammering the URL), not a new boot: it
gets the same bytes, with the same boot token, and records nothing (no http.script event, no log
line, no new token, no "seen"). One event per boot step, and a repeated fetch costs no store
write; `LimitedProtocol` answers it from here without the ASGI stack (http.connlimit), and
`_Handlers.boot_script` (http.boot) answers it from here when the request did come through it.

A kept script is handed out only while everything it was made from still holds, checked on
every fetch (no invalidation hook can be forgotten):

- the same request target (path and query) from the same client address, which the kernel's
  neighbour entry still shows to be the machine the URL names (`Inventory.prove`): the script
  carries that machine's boot token (core.trust), which no other client may get;
- the same lab.toml (`Inventory.lab` is swapped in whole on a reload) and the same decision
  (`Inventory.decide` asked again: image, build for the architecture, name, silence);
- nothing recorded for the machine since (its record's `last_seen`: every DHCP request, TFTP or
  HTTP boot file and event moves it), so a new boot, which always asks DHCP first, or a step
  back from the kernel to the script, is a new step with a new token and its event;
- its boot token still the machine's current one (not retired by the OS's phone-home, not
  replaced by another boot's script or configuration);
- less than REPEAT_WINDOW seconds since the script was made.

Only fetches proven to come from the machine itself are kept (a bystander's copy has no token
and records a refusal: http.boot answers those in full). Used from the event loop only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from pixiebox.core.decision import BootDecision, LabView, Silence
from pixiebox.core.firmware import ArchInfo
from pixiebox.core.inventory import Inventory

#: Seconds a script is handed out again as it is (see the module's doc). A new boot ends the
#: repeat before that anyway (its DHCP request is recorded), so this need not be shorter than
#: the fastest reboot; it bounds how long one answer is reused at all, so that a machine that
#: keeps fetching its script (a loop in a custom script, a stuck client) still shows as one
#: http.script event and log line every 10 s instead of disappearing from its log, and the
#: decision is made afresh at least that often.
REPEAT_WINDOW = 10.0
#: Scripts kept at most. Only proven machines' fetches are kept, each for REPEAT_WINDOW: a lab
#: has far fewer machines booting within 10 s; the bound is for a neighbour that cycles MACs.
MAX_KEPT = 4096

#: What a script is made from in a decision: with the same lab.toml, the same text follows.
Rendering = tuple[Silence | None, str | None, str | None, str | None]


def rendering(decision: BootDecision) -> Rendering:
    image = decision.image
    return (decision.silent, decision.image_name, image.arch if image else None, decision.name)


@dataclass(frozen=True, slots=True)
class KeptScript:
    """A script as it was answered, with what it was made from."""

    mac: str
    #: The client's address as the server reports it (str) and parsed.
    source: str
    address: IPv4Address
    #: The `?arch=` the URL carried (None: none, DHCP's record stands).
    arch: ArchInfo | None
    lab: LabView
    rendering: Rendering
    #: The boot token the script carries (None: it carries none).
    token: str | None
    #: The machine's record's last_seen right after this fetch was recorded.
    last_seen: float | None
    made: float
    #: The response's header lines (name: value CRLF each, as the server writes them).
    head: bytes
    body: bytes


class ScriptCache:
    """Scripts kept by request target (see the module's doc)."""

    def __init__(self, inventory: Inventory, clock: Callable[[], float] = time.monotonic) -> None:
        self._inventory = inventory
        #: Seconds, for the window (a test's clock may stand in).
        self.clock = clock
        self._kept: dict[bytes, KeptScript] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def now(self) -> float:
        return self.clock()

    def last_seen(self, mac: str) -> float | None:
        record = self._inventory.lifecycle.record_of(mac)
        return record.last_seen if record is not None else None

    def find(self, target: bytes, source: str) -> KeptScript | None:
        """The script kept for `target` when it may be handed to `source` again as it is."""
        kept = self._kept.get(target)
        if kept is None:
            return None
        inventory = self._inventory
        if (
            kept.source != source
            or self.clock() - kept.made >= REPEAT_WINDOW
            or inventory.lab is not kept.lab
        ):
            return None
        mac = kept.mac
        if not inventory.prove(kept.address, mac).proven:
            return None
        if rendering(inventory.decide(mac, kept.arch)) != kept.rendering:
            return None
        if self.last_seen(mac) != kept.last_seen:
            return None
        if kept.token is not None and inventory.tokens.check(mac, kept.token) is not None:
            return None
        return kept

    def keep(self, target: bytes, script: KeptScript) -> None:
        kept = self._kept
        kept.pop(target, None)
        if len(kept) >= MAX_KEPT:
            now = self.clock()
            self._kept = kept = {t: k for t, k in kept.items() if now - k.made < REPEAT_WINDOW}
            while len(kept) >= MAX_KEPT:  # the oldest first (insertion order)
                del kept[next(iter(kept))]
        kept[target] = script

    def answer(self, target: bytes, source: str) -> tuple[bytes, bytes] | None:
        """For the server's protocol (http.connlimit's FastAnswer): the header lines and body of
        the 200 answer to a GET of `target` from `source`, or None (the application answers)."""
        kept = self.find(target, source)
        return None if kept is None else (kept.head, kept.body)
