"""One TFTP transfer's state (tftp.transfers moves it): the file it sends, its sockets, its
window, its timer. Kept apart from the code that moves it so that both stay readable.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field

#: Bytes read from a client per datagram: an ACK is 4, an ERROR carries a message; the rest of
#: a longer datagram is dropped by the kernel, which is fine for both.
INBUF = 516


@dataclass
class Source:
    """An opened file, read with os.preadv (never a Python file object and its buffer copies);
    generated content is put in a memfd so it is read the same way. `where` names it for the
    log."""

    fd: int | None
    size: int
    where: str

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass(slots=True, eq=False)
class Transfer:
    """One read transfer. Blocks are counted from 1 without wrapping; only the wire number is
    taken modulo 2**16 (RFC 1350 has 16 bits; like tftpd-hpa and dnsmasq it wraps to 0, which
    every client we know accepts). Block 0 stands for the OACK, acknowledged with ACK 0."""

    sock: socket.socket  # connected to the client
    stray: socket.socket  # the same port, unconnected: gets datagrams from anyone else
    client: tuple[str, int]
    source: Source
    path: str
    options: dict[str, str]  # as the client asked
    oack: bytes | None
    blksize: int
    window: int
    timeout: float
    started: float
    blocks: int  # the last block is shorter than blksize, possibly empty (RFC 1350 section 6)
    # Read-ahead: `chunk` blocks read with one os.preadv into buf[4:]. Block `first + i` starts
    # at buf[4 + i * blksize], and its DATA header goes in the 4 bytes before it, over the end
    # of block `first + i - 1`, which by then has been sent (a resend reads afresh).
    buf: memoryview  # one block until the client is heard from, then `chunk` blocks
    chunk: int
    heard_at: float  # when the client last sent anything (TftpLimits.idle_timeout)
    first: int = 0
    valid: int = 0  # blocks in buf from `first` on; 0 when it must be read again
    inbuf: bytearray = field(default_factory=lambda: bytearray(INBUF))
    # The first four bytes of the ACK that takes the fast path (tftp.transfers._on_readable):
    # ACK of block `sent` in lockstep once the client is heard from, as one big-endian word;
    # -1 when the next ACK must go the general way.
    expect: int = -1
    acked: int = -1  # the highest block the client acknowledged
    sent: int = 0  # the highest block sent since the last (re)start of the window
    deadline: float = 0.0
    timer: asyncio.TimerHandle | None = None
    resends: int = 0
    rewound: int = -1  # the last block a repeated ACK restarted the window after
    heard: bool = False  # the client acknowledged something: no longer half-open
    lent: bool = False  # a worker thread sends its blocks (tftp.lending): hands off
    done: bool = False

    @property
    def bytes_acked(self) -> int:
        return min(self.source.size, max(0, self.acked) * self.blksize)


def only_last_ack_missing(transfer: Transfer) -> bool:
    """Every block went out and only the ACK of the last window is missing."""
    return transfer.sent >= transfer.blocks and transfer.acked >= transfer.blocks - transfer.window
