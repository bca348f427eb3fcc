"""Slow HTTP clients (slowloris), or oversized request heads, against one HTTP server.

Opens --count TCP connections to --target:--port, from the --source addresses in turn (each
must be an address of this host; none: the kernel's choice), and on each either sends nothing
(--mode silent), or a request line and then one header line every --interval seconds, never
the blank line that ends the head (--mode slow), or one request whose head is --header-bytes
long (--mode big-header). Connections are held until the server closes them or --duration
seconds have passed since the start, whichever comes first. Standard library only (and
tcpflood.py beside it); run inside a network namespace:
python3 bench/floods/slow_http.py --target 10.0.0.1 --count 500 ...

Prints one JSON object:
  opened            TCP connections established
  connect_failed    connections that could not be established (refused, timed out, no fd)
  refused           established, then answered 503 (the server's connection caps)
  closed_by_server  established, not refused, then closed by the server (EOF or reset, with
                    or without an answer such as 408 or 431)
  still_open_at_end established and still open when --duration ran out
  statuses          status codes of the answers read, by code
  sent_bytes        bytes of request head sent, all connections together
  seconds           how long the run took
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import tcpflood

#: Connections being set up at once (the rest wait their turn).
CONNECTING = 64
CHUNK = 64 * 1024
MOST, LONGEST = 20000, 3600.0


@dataclass
class Tally(tcpflood.Tally):
    sent_bytes: int = 0
    statuses: Counter[str] = field(default_factory=Counter)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tcpflood.parser(__doc__, port=80, count=100, most=MOST, duration=30.0, longest=LONGEST)
    parser.add_argument("--mode", choices=["slow", "silent", "big-header"], default="slow")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between lines")
    parser.add_argument("--path", default="/", help="the request's path")
    parser.add_argument("--header-bytes", type=int, default=16 << 20, help="big-header size")
    args = parser.parse_args(argv)
    tcpflood.check(parser, args, most=MOST, longest=LONGEST)
    if args.interval <= 0:
        parser.error("--interval must be positive")
    return args


def _status(first: bytes) -> str | None:
    parts = first.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return parts[1].decode()
    return None


async def _connection(
    args: argparse.Namespace, source: str | None, deadline: float, gate: asyncio.Semaphore,
    tally: Tally,
) -> None:  # fmt: skip
    async with gate:
        streams = await tcpflood.connect(args, source, deadline, tally)
    if streams is None:
        return
    reader, writer = streams
    status: str | None = None
    head = f"GET {args.path} HTTP/1.1\r\nHost: {args.target}\r\n".encode()
    try:
        if args.mode == "big-header":
            status = await _big_header(args, reader, writer, deadline, tally)
        else:
            if args.mode == "slow":
                writer.write(head)
                tally.sent_bytes += len(head)
            lines = 0
            while True:
                try:
                    data = await tcpflood.read(reader, CHUNK, deadline, tally, args.interval)
                except TimeoutError:
                    if args.mode == "slow":
                        lines += 1
                        line = f"X-Slow-{lines}: {'x' * 16}\r\n".encode()
                        writer.write(line)
                        tally.sent_bytes += len(line)
                    continue
                if data is None:  # still open at the end
                    return
                if not data:
                    break
                status = status or _status(data.split(b"\r\n", 1)[0])
                if status is not None:
                    # An answer: read what is left of it until the server closes.
                    left = deadline - asyncio.get_running_loop().time()
                    while await asyncio.wait_for(reader.read(CHUNK), max(0.1, left)):
                        pass
                    break
    except (OSError, TimeoutError):
        pass  # reset, or nothing more within the deadline: the server ended it
    finally:
        writer.transport.abort()
    if status is not None:
        tally.statuses[status] += 1
    if status == "503":
        tally.refused += 1
    else:
        tally.closed_by_server += 1


async def _big_header(
    args: argparse.Namespace, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    deadline: float, tally: Tally,
) -> str | None:  # fmt: skip
    loop = asyncio.get_running_loop()
    head = f"GET {args.path} HTTP/1.1\r\nHost: {args.target}\r\nX-Big: ".encode()
    writer.write(head)
    tally.sent_bytes += len(head)
    left = args.header_bytes
    piece = b"a" * CHUNK
    answer = asyncio.ensure_future(reader.read(CHUNK))
    try:
        while left > 0 and not answer.done():
            chunk = piece[: min(left, CHUNK)]
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), max(0.1, deadline - loop.time()))
            tally.sent_bytes += len(chunk)
            left -= len(chunk)
        if left <= 0:
            writer.write(b"\r\n\r\n")
        data = await asyncio.wait_for(answer, max(0.1, deadline - loop.time()))
    except (OSError, TimeoutError):
        if not answer.done():
            answer.cancel()
            return None
        with contextlib.suppress(Exception):
            data = answer.result()
            return _status(data.split(b"\r\n", 1)[0]) if data else None
        return None
    return _status(data.split(b"\r\n", 1)[0]) if data else None


async def flood(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + args.duration
    tally = Tally()
    gate = asyncio.Semaphore(CONNECTING)

    async def connection(_: int, source: str | None) -> None:
        await _connection(args, source, deadline, gate, tally)

    await tcpflood.run(connection, args)
    return {
        "opened": tally.opened,
        "connect_failed": tally.connect_failed,
        "refused": tally.refused,
        "closed_by_server": tally.closed_by_server,
        "still_open_at_end": tally.still_open_at_end,
        "statuses": dict(tally.statuses),
        "sent_bytes": tally.sent_bytes,
        "seconds": round(loop.time() - start, 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # one descriptor per connection
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    return tcpflood.report(asyncio.run(flood(args)), started)


if __name__ == "__main__":
    sys.exit(main())
