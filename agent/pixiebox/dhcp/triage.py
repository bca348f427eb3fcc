"""Which DHCP requests are answered first when more arrive than the server can answer.

A DHCP server on a home LAN can be sent DISCOVERs from random MACs as fast as the link carries
them (one forger, a broken device, a lab of a thousand machines powering on). Answering a
stranger costs the agent far more than receiving one (a decision, a machine record, events, an
offer, a commit), so past a rate the server cannot keep up; if it then lets the kernel's socket
buffer overflow, the kernel drops datagrams at random, the lab's own machines' among them, and
they wait for their firmware's retransmission (4 s, then 8 s ...) or give up (issue 13: 82 % of
enrolled machines' DISCOVERs lost under 2,000 strangers a second).

So the server empties its socket at every wake-up (cheap: no decoding) and sorts what it read
here, from two fields read straight from the bytes (chaddr, option 53):

- *urgent*: a MAC the handler knows (enrolled in lab.toml, or holding a lease of ours), and a
  non-DISCOVER from a MAC this server has just offered to (the REQUEST that completes an
  exchange we began). Answered first, in the order they came, a batch per loop turn, and never
  shed; only past URGENT_LIMIT waiting (thousands of lab machines at once, or someone forging
  their MACs) is a newcomer dropped, as the kernel would, and counted apart (`dropped`).
- *strangers*: everything else (unknown MACs' DISCOVERs above all; and what cannot be peeked,
  left to the decoder). Answered a budget per loop turn, newest first; one that has waited
  SHED_AFTER, or that overflows the queue's byte bound, is *shed*: dropped unanswered, counted.

Newest first, oldest shed (Kea's packet queue, dhcp-queue-control, also drops from the old end
of its ring): a client retransmits a DISCOVER it got no answer to, so under overload the oldest
request is the one most likely already repeated (the repeat is queued behind it) or given up
on, while the newest one's client is surely still listening. Answering oldest first would, once
the queue is longer than a retry interval, spend every answer on clients that have moved on.

What the classification trusts is a claimed MAC, which anyone can forge: a forger who knows an
enrolled MAC gets its requests answered at priority (as with any DHCP server); what the storm of
*random* MACs cannot do is crowd the lab's machines out.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

#: RFC 2131 3: the magic cookie that starts the options field, at byte 236.
_MAGIC = b"\x63\x82\x53\x63"
_OPTIONS_AT = 240
_MESSAGE_TYPE = 53
_PAD, _END = 0, 255
#: Options looked at for option 53 (it comes first in every client seen; a packet that hides it
#: further in, or in an overloaded file/sname field, is simply a stranger: decoded in its turn).
_PEEK_OPTIONS = 16
DISCOVER = 1

#: Seconds a stranger's request may wait before it is shed: half a PXE ROM's first DISCOVER
#: timeout (4 s, PXE 2.1; RFC 2131 4.1 suggests 4 s too), leaving the client time to get the
#: answer and send its REQUEST before it retransmits.
SHED_AFTER = 2.0
#: Bytes of strangers' datagrams held at most (the oldest go first): the queue's memory bound
#: whatever the datagrams' size.
QUEUE_BYTES = 8 << 20
#: Urgent datagrams held at most.
URGENT_LIMIT = 8192
#: Seconds after our OFFER during which that MAC's next requests (its REQUEST, on port 67 or
#: the PXE port) are urgent, and how many of them: a PXE client sends the router's REQUEST
#: (overheard), then ours on 4011, and may retransmit once. The memory of offers is bounded.
OFFERED_FOR = 30.0
OFFERED_USES = 4
OFFERED_LIMIT = 8192

P = TypeVar("P")


def peek(data: bytes) -> tuple[bytes, int] | None:
    """(chaddr's first 6 bytes, DHCP message type) of a BOOTREQUEST read from the raw bytes,
    without decoding; None when it is not one a peek can read (the decoder then says why)."""
    if len(data) < _OPTIONS_AT + 3 or data[0] != 1 or data[236:240] != _MAGIC:
        return None
    at, end = _OPTIONS_AT, len(data) - 2
    for _ in range(_PEEK_OPTIONS):
        if at >= end:
            return None
        code = data[at]
        if code == _PAD:
            at += 1
            continue
        if code == _END:
            return None
        if code == _MESSAGE_TYPE:
            return (data[28:34], data[at + 2]) if data[at + 1] == 1 else None
        at += 2 + data[at + 1]
    return None


class Triage(Generic[P]):
    """The datagrams read and not yet answered, sorted (see the module's doc). `P` is what the
    server keeps with each datagram (its port). `known(mac)` is the handler's: a MAC of the lab
    (lowercase, colon-separated)."""

    def __init__(
        self,
        known: Callable[[str], bool],
        *,
        shed_after: float = SHED_AFTER,
        queue_bytes: int = QUEUE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.known = known
        self.shed_after = shed_after
        self.queue_bytes = queue_bytes
        self.clock = clock
        self.urgent: deque[tuple[P, bytes, tuple[str, int]]] = deque()
        self.strangers: deque[tuple[float, P, bytes, tuple[str, int]]] = deque()
        self.queued_bytes = 0
        #: chaddr → (until, uses left), oldest first.
        self._offered: dict[bytes, tuple[float, int]] = {}
        #: Strangers' datagrams shed since the start; urgent ones dropped (URGENT_LIMIT).
        self.shed = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.urgent) + len(self.strangers)

    def put(self, port: P, data: bytes, source: tuple[str, int]) -> None:
        """Sort one datagram just read."""
        peeked = peek(data)
        if peeked is not None and self._is_urgent(*peeked):
            if len(self.urgent) < URGENT_LIMIT:
                self.urgent.append((port, data, source))
            else:
                self.dropped += 1
            return
        self.strangers.append((self.clock(), port, data, source))
        self.queued_bytes += len(data)
        while self.queued_bytes > self.queue_bytes:
            self._shed_oldest()

    def _is_urgent(self, chaddr: bytes, kind: int) -> bool:
        if kind != DISCOVER:
            offered = self._offered.get(chaddr)
            if offered is not None:
                until, uses = offered
                if until >= self.clock():
                    if uses > 1:
                        self._offered[chaddr] = (until, uses - 1)
                    else:
                        del self._offered[chaddr]
                    return True
                del self._offered[chaddr]
        return self.known(chaddr.hex(":"))

    def offered(self, chaddr: bytes) -> None:
        """We sent `chaddr` an OFFER: its next few requests complete that exchange."""
        self._offered.pop(chaddr, None)
        self._offered[chaddr] = (self.clock() + OFFERED_FOR, OFFERED_USES)
        if len(self._offered) > OFFERED_LIMIT:
            del self._offered[next(iter(self._offered))]

    def take_urgent(self, limit: int) -> list[tuple[P, bytes, tuple[str, int]]]:
        """Up to `limit` urgent datagrams, the oldest first."""
        urgent = self.urgent
        return [urgent.popleft() for _ in range(min(limit, len(urgent)))]

    def shed_stale(self) -> int:
        """Shed the strangers' datagrams that have waited SHED_AFTER; how many."""
        before = self.shed
        oldest = self.clock() - self.shed_after
        strangers = self.strangers
        while strangers and strangers[0][0] < oldest:
            self._shed_oldest()
        return self.shed - before

    def next_stranger(self) -> tuple[P, bytes, tuple[str, int]] | None:
        """The newest stranger's datagram, or None."""
        if not self.strangers:
            return None
        _, port, data, source = self.strangers.pop()
        self.queued_bytes -= len(data)
        return port, data, source

    def _shed_oldest(self) -> None:
        _, _, data, _ = self.strangers.popleft()
        self.queued_bytes -= len(data)
        self.shed += 1
