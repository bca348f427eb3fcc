"""Many DNS-over-TCP connections from one or a few sources, held open, against one server.

Opens --count TCP connections to --target:--port (53), from the --source addresses in turn
(each an address of this host; none: the kernel's choice). With --query NAME each connection
first asks NAME (type A) and then idles; without it, it sends nothing. Connections are held
until the server closes them or --duration seconds have passed. Standard library only; run
inside a network namespace: python3 bench/floods/dns_tcp.py --target 10.0.0.1 --count 20 ...

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
import json
import struct
import sys
import time
from dataclasses import dataclass

CONNECT_TIMEOUT = 3.0


@dataclass
class Tally:
    opened: int = 0
    connect_failed: int = 0
    refused: int = 0
    answered: int = 0
    closed_by_server: int = 0
    still_open_at_end: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="the server's address")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--count", type=int, default=16, help="connections (at most 5000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (at most 600)")
    parser.add_argument("--source", action="append", default=[], help="a source address (repeat)")
    parser.add_argument("--query", help="a name each connection asks once, then idles")
    parser.add_argument("--refused-within", type=float, default=0.5, help="seconds")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 5000:
        parser.error("--count must be 1..5000")
    if not 0 < args.duration <= 600:
        parser.error("--duration must be in (0, 600]")
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
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                args.target, args.port, local_addr=(source, 0) if source else None
            ),
            min(CONNECT_TIMEOUT, max(0.1, deadline - loop.time())),
        )
    except (OSError, TimeoutError):
        tally.connect_failed += 1
        return
    tally.opened += 1
    opened = loop.time()
    answered = False
    try:
        if args.query:
            writer.write(query(args.query, index & 0xFFFF))
        while True:
            left = deadline - loop.time()
            if left <= 0:
                tally.still_open_at_end += 1
                return
            try:
                data = await asyncio.wait_for(reader.read(4096), left)
            except TimeoutError:
                continue
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
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.duration
    tally = Tally()
    sources = args.source or [None]
    tasks = [
        asyncio.create_task(_connection(args, i, sources[i % len(sources)], deadline, tally))
        for i in range(args.count)
    ]
    await asyncio.wait(tasks, timeout=args.duration + CONNECT_TIMEOUT + 2)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return dict(vars(tally))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    result = asyncio.run(flood(args))
    result["seconds"] = round(time.monotonic() - started, 2)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
