"""Run pixiebox.dns.DnsServer until SIGTERM: the server side of tests/test_dns.py.

Started inside a test namespace (``Host.popen``). The records come from ``--record NAME=IP``
(repeatable); on SIGHUP ``--records-file`` (JSON: {"name": "ip"}) replaces them in place, in the
same dict object, as an inventory would. ``--forward-for NETWORK`` (repeatable) says whose other
names are forwarded (none given: nobody's). Logs at debug level to stderr, prints ``DNS serving``
once it listens, writes the server's stats as JSON to ``--stats`` on SIGUSR1 and on exit, and on
SIGTERM closes the server and prints how many tasks and sockets it left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pixiebox.dns import DnsServer
from servicerunner import open_sockets, run, write_stats

READY = "DNS serving"
STOPPED = "DNS stopped"
RELOADED = "DNS records reloaded"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--domain", default="lab.internal")
    parser.add_argument("--record", action="append", default=[], metavar="NAME=IP")
    parser.add_argument("--records-file", type=Path, help="JSON records, re-read on SIGHUP")
    parser.add_argument("--upstream", action="append", default=[], metavar="IP")
    parser.add_argument("--forward-for", action="append", default=[], metavar="NETWORK")
    parser.add_argument("--listen-ip", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--interface")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--ttl", type=int, default=60)
    parser.add_argument("--max-forwards", type=int, default=256)
    parser.add_argument("--stats", type=Path)
    parser.add_argument("--quiet", action="store_true", help="log at info level (benchmarks)")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    records: dict[str, IPv4Address] = {}
    for item in args.record:
        name, ip = item.split("=", 1)
        records[name] = IPv4Address(ip)

    def reload() -> None:
        loaded = json.loads(args.records_file.read_text())
        records.clear()
        records.update({name: IPv4Address(ip) for name, ip in loaded.items()})
        print(f"{RELOADED}: {sorted(records)}", flush=True)

    if args.records_file is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)

    forward_for = [IPv4Network(network) for network in args.forward_for]
    sockets_before = open_sockets()
    server = DnsServer(
        domain=args.domain,
        records=lambda: records,
        upstreams=[IPv4Address(ip) for ip in args.upstream],
        forward_for=lambda: forward_for,
        listen_ip=args.listen_ip,
        port=args.port,
        interface=args.interface,
        timeout=args.timeout,
        ttl=args.ttl,
        max_forwards=args.max_forwards,
    )
    loop.add_signal_handler(signal.SIGUSR1, lambda: write_stats(args.stats, server.stats))
    await server.start()
    print(f"{READY} on port {server.port}", flush=True)
    await stop.wait()
    await server.close()
    await server.close()  # idempotent
    write_stats(args.stats, server.stats)
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    sockets = open_sockets() - sockets_before
    print(
        f"{STOPPED}: tasks left {len(tasks)}, sockets left {sockets}, "
        f"stats {json.dumps(server.stats)}",
        flush=True,
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run(serve(args), logging.INFO if args.quiet else logging.DEBUG)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
