"""What the TCP floods (dns_tcp.py, slow_http.py) share: their common options, opening each
connection from its source within the run's deadline, reading with the deadline in view, and
running all the connections bounded in time, counted in one tally.

Not a flood itself. The floods run as scripts (python3 bench/floods/NAME.py, often under
`ip netns exec` with whatever python3 the namespace has), so they import this as a sibling
module (the script's folder is first on sys.path) and it stays standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

#: Seconds one connection may take to be established (less when the run ends sooner).
CONNECT_TIMEOUT = 3.0

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Tally:
    """The counts every TCP flood prints (a flood's own tally adds its own)."""

    opened: int = 0
    connect_failed: int = 0
    refused: int = 0
    closed_by_server: int = 0
    still_open_at_end: int = 0


def parser(
    doc: str, *, port: int, count: int, most: int, duration: float, longest: float
) -> argparse.ArgumentParser:
    """A parser with the options every TCP flood takes: --target, --port, --count (default
    `count`, at most `most`), --duration (default `duration`, at most `longest` seconds) and
    --source; check() bounds them after parsing."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="the server's address")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--count", type=int, default=count, help=f"connections (at most {most})")
    parser.add_argument(
        "--duration", type=float, default=duration, help=f"seconds (at most {longest:g})"
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        help="a source address of this host (repeat; connections take them in turn)",
    )
    return parser


def check(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *, most: int, longest: float
) -> None:
    """Refuse a --count or --duration beyond the bounds parser() named (exits, as argparse)."""
    if not 1 <= args.count <= most:
        parser.error(f"--count must be 1..{most}")
    if not 0 < args.duration <= longest:
        parser.error(f"--duration must be in (0, {longest:g}]")


async def connect(
    args: argparse.Namespace, source: str | None, deadline: float, tally: Tally
) -> Streams | None:
    """A connection to --target:--port from `source` (None: the kernel's choice), counted as
    opened, or None counted as connect_failed (refused, timed out, out of descriptors)."""
    loop = asyncio.get_running_loop()
    try:
        streams = await asyncio.wait_for(
            asyncio.open_connection(
                args.target, args.port, local_addr=(source, 0) if source else None
            ),
            min(CONNECT_TIMEOUT, max(0.1, deadline - loop.time())),
        )
    except (OSError, TimeoutError):
        tally.connect_failed += 1
        return None
    tally.opened += 1
    return streams


async def read(
    reader: asyncio.StreamReader, size: int, deadline: float, tally: Tally,
    wait: float | None = None,
) -> bytes | None:  # fmt: skip
    """Up to `size` bytes from the server (b"" once it closed), or None when the run's deadline
    has passed, counted as still_open_at_end. TimeoutError when nothing came within `wait`
    seconds (default: until the deadline)."""
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        tally.still_open_at_end += 1
        return None
    return await asyncio.wait_for(reader.read(size), left if wait is None else min(left, wait))


async def run(
    connection: Callable[[int, str | None], Coroutine[Any, Any, None]],
    args: argparse.Namespace,
) -> None:
    """--count `connection(index, source)` at once, the sources taken in turn, each ended
    once --duration (plus the time to connect) has passed."""
    sources: list[str | None] = args.source or [None]
    tasks = [
        asyncio.create_task(connection(i, sources[i % len(sources)])) for i in range(args.count)
    ]
    await asyncio.wait(tasks, timeout=args.duration + CONNECT_TIMEOUT + 2)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def report(result: dict[str, object], started: float) -> int:
    """Print `result` with the run's seconds since time.monotonic() `started`, as one JSON line."""
    result["seconds"] = round(time.monotonic() - started, 2)
    json.dump(result, sys.stdout)
    print()
    return 0
