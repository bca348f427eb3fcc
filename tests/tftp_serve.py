"""Run pixiebox.tftp.TftpServer until SIGTERM: the server side of tests/test_tftp.py.

Started inside a test namespace (``Host.popen``). Logs at debug level to stderr, prints
``TFTP serving`` once it listens, appends each TftpEvent as a JSON line to ``--events``, and on
SIGTERM closes the server and prints how many threads and sockets it left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path

from pixiebox.tftp import TftpEvent, TftpLimits, TftpServer
from servicerunner import open_sockets, run

READY = "TFTP serving"
STOPPED = "TFTP stopped"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--listen-ip", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=69)
    parser.add_argument("--interface")
    parser.add_argument(
        "--fallback", action="append", default=[], metavar="PREFIX=DIR", help="a fallback dir"
    )
    parser.add_argument(
        "--generate",
        action="append",
        default=[],
        metavar="PATH=TEXT",
        help="serve PATH, generated as TEXT plus the client's IP",
    )
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument(
        "--max-transfers-per-client", type=int, default=8, help="[tftp] max_transfers_per_client"
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    fallbacks = [tuple(item.split("=", 1)) for item in args.fallback]
    generated = dict(item.split("=", 1) for item in args.generate)
    events = args.events.open("a", buffering=1)

    def on_event(event: TftpEvent) -> None:
        assert threading.current_thread() is threading.main_thread(), "event off the loop"
        events.write(json.dumps(dataclasses.asdict(event)) + "\n")

    def generate(path: str, client_ip: str) -> bytes | None:
        text = generated.get(path)
        return None if text is None else f"{text} for {client_ip}\n".encode()

    sockets_before = open_sockets()
    server = TftpServer(
        args.root,
        listen_ip=args.listen_ip,
        port=args.port,
        interface=args.interface,
        fallback_dirs=[(prefix, Path(directory)) for prefix, directory in fallbacks],
        on_event=on_event,
        generate=generate,
        limits=TftpLimits(max_transfers_per_client=args.max_transfers_per_client),
    )
    await server.start()
    print(READY, flush=True)
    await stop.wait()
    server.close()
    server.close()  # idempotent
    await asyncio.sleep(0.1)  # events queued by close() reach on_event
    events.close()
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    sockets = open_sockets() - sockets_before
    print(f"{STOPPED}: threads left {len(threads)} {threads}, sockets left {sockets}", flush=True)


def main(argv: list[str]) -> int:
    return run(serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
