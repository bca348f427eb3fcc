"""Run the boot HTTP server alone, for the tests: `python http_serve.py LAB_TOML [--no-pathsend]`.

Serves [http].listen with the inventory, URLs and assets of the given lab.toml until SIGTERM.
Prints READY once listening, every machine event as `EVENT {"kind", "who", "message", "fields"}`
(one JSON object), and on SIGUSR1
how many bytes went out through os.sendfile(2) in this process (`SENDFILE calls=N bytes=M`), so
a test can tell zero-copy sends from copies without trusting the server's own bookkeeping.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from ipaddress import IPv4Address
from pathlib import Path

from pixiebox.config import load_config, split_listen
from pixiebox.core.firmware import Assets
from pixiebox.core.inventory import Inventory
from pixiebox.core.urls import BootUrls
from pixiebox.http.boot import BootEvent, BootHttpState, boot_app
from pixiebox.http.server import BootHttpServer
from pixiebox.store.state import StateStore

READY = "READY"
log = logging.getLogger("http_serve")

_sendfile = os.sendfile
_counts = {"calls": 0, "bytes": 0}


def _counting_sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
    sent = _sendfile(out_fd, in_fd, offset, count)
    _counts["calls"] += 1
    _counts["bytes"] += sent
    return sent


# asyncio's selector loop looks os.sendfile up at each call (selector_events.py).
os.sendfile = _counting_sendfile


def _event(event: BootEvent) -> None:
    shown = {"kind": str(event.kind), "who": event.who, "message": event.message,
             "fields": dict(event.fields)}  # fmt: skip
    print(f"EVENT {json.dumps(shown)}", flush=True)


async def serve(config_path: Path, pathsend: bool) -> None:
    config = load_config(config_path)
    host, port = split_listen(config.http.listen)
    store = StateStore(config.state.dir)
    try:
        inventory = Inventory(config, store)
        urls = BootUrls(config.network.server_ip or IPv4Address("127.0.0.1"), port)
        state = BootHttpState(inventory, urls, Assets(config.boot.assets), _event)
        server = BootHttpServer(boot_app(state), host, port, pathsend=pathsend)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(
            signal.SIGUSR1,
            lambda: print(
                f"SENDFILE calls={_counts['calls']} bytes={_counts['bytes']}", flush=True
            ),
        )
        print(f"{READY} {host}:{server.bound_port} pid={os.getpid()}", flush=True)
        await stop.wait()
        await server.stop()
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--no-pathsend", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stdout,
    )
    logging.getLogger("asyncio").setLevel(logging.INFO)
    asyncio.run(serve(args.config, not args.no_pathsend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
