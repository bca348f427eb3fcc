"""Many DNS-over-TCP connections from one or a few sources, held open, against one server.

Opens --count TCP connections to --target:--port (53), from the --source addresses in turn
(each an address of this host; none: the kernel's choice). With --query NAME each connection
first asks NAME (type A) and then idles; without it, it sends nothing. Connections are held
until the server closes them or --duration seconds have passed. Standard library only (and
tcpflood.py beside it); run inside a network namespace:
python3 bench/floods/dns_tcp.py --target 10.0.0.1 --count 20 ...

Prints one JSON object:
  opened            TCP connections established
  connect_failed    connections that could not be established
  refused           established, then closed by the server within --refused-within seconds
                    without an answer (over its connection caps)
  answered          connections that got an answer to their query
  closed_by_server  established, not refused, then closed by the server (idle timeout,
                    made room for others)
  still_open_at_end established and still open when --duration ran out
  seconds           how long the run took
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time
from dataclasses import dataclass

import tcpflood

MOST, LONGEST = 5000, 600.0


@dataclass
class Tally(tcpflood.Tally):
    answered: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tcpflood.parser(__doc__, port=53, count=16, most=MOST, duration=10.0, longest=LONGEST)
    parser.add_argument("--query", help="a name each connection asks once, then idles")
    parser.add_argument("--refused-within", type=float, default=0.5, help="seconds")
    args = parser.parse_args(argv)
    tcpflood.check(parser, args, most=MOST, longest=LONGEST)
    return args


def query(name: str, ident: int) -> bytes:
    """A DNS query for `name` type A class IN, recursion desired, with its TCP length prefix."""
    labels = b"".join(
        bytes([len(part)]) + part.encode() for part in name.rstrip(".").split(".") if part
    )
    message = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"
    return struct.pack("!H", len(message)) + message


async def _connection(
    args: argparse.Namespace, index: int, source: str | None, deadline: float, tally: Tally
) -> None:
    streams = await tcpflood.connect(args, source, deadline, tally)
    if streams is None:
        return
    reader, writer = streams
    loop = asyncio.get_running_loop()
    opened = loop.time()
    answered = False
    try:
        if args.query:
            writer.write(query(args.query, index & 0xFFFF))
        while True:
            try:
                data = await tcpflood.read(reader, 4096, deadline, tally)
            except TimeoutError:
                continue
            if data is None:  # still open at the end
                return
            if not data:
                break
            if not answered:
                answered = True
                tally.answered += 1
    except OSError:
        pass  # reset by the server
    finally:
        writer.transport.abort()
    if not answered and loop.time() - opened <= args.refused_within:
        tally.refused += 1
    else:
        tally.closed_by_server += 1


async def flood(args: argparse.Namespace) -> dict[str, object]:
    deadline = asyncio.get_running_loop().time() + args.duration
    tally = Tally()

    async def connection(index: int, source: str | None) -> None:
        await _connection(args, index, source, deadline, tally)

    await tcpflood.run(connection, args)
    return dict(vars(tally))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    return tcpflood.report(asyncio.run(flood(args)), started)


if __name__ == "__main__":
    sys.exit(main())
