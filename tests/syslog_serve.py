"""Run pixiebox.syslog.SyslogReceiver until SIGTERM: the server side of tests/test_syslog.py.

Started inside a test namespace (``Host.popen``). Logs at debug level to stderr, prints
``SYSLOG listening`` once it receives, appends each accepted message as a JSON line to
``--events``, writes the receiver's stats as JSON to ``--stats`` on SIGUSR1 and on exit, and on
SIGTERM closes the receiver and prints how many sockets it left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import Any

from pixiebox.syslog import SyslogMessage, SyslogReceiver
from servicerunner import open_sockets, run, write_stats

READY = "SYSLOG listening"
STOPPED = "SYSLOG stopped"


def as_json(message: SyslogMessage) -> dict[str, Any]:
    data = dataclasses.asdict(message)
    data["source"] = str(message.source)
    data["timestamp"] = None if message.timestamp is None else message.timestamp.isoformat()
    data["line"] = message.line
    return data


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen-ip", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=514)
    parser.add_argument("--interface")
    parser.add_argument("--rate", type=float, default=200.0, help="lines/s per source")
    parser.add_argument("--burst", type=int, default=400)
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    events = args.events.open("a", buffering=1)

    def on_message(message: SyslogMessage) -> None:
        events.write(json.dumps(as_json(message)) + "\n")

    sockets_before = open_sockets()
    receiver = SyslogReceiver(
        on_message,
        listen_ip=args.listen_ip,
        port=args.port,
        interface=args.interface,
        rate_per_source=args.rate,
        burst=args.burst,
        describe=lambda ip: f"machine at {ip}",
    )
    loop.add_signal_handler(signal.SIGUSR1, lambda: write_stats(args.stats, receiver.stats))
    await receiver.start()
    print(READY, flush=True)
    await stop.wait()
    receiver.close()
    receiver.close()  # idempotent
    events.close()
    write_stats(args.stats, receiver.stats)
    sockets = open_sockets() - sockets_before
    print(f"{STOPPED}: sockets left {sockets}, stats {json.dumps(receiver.stats)}", flush=True)


def main(argv: list[str]) -> int:
    return run(serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
