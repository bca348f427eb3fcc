"""A flood of half-open TFTP read requests: RRQs that are never acknowledged.

Each RRQ makes a TFTP server open a transfer (two sockets and the file, for tftp.limits'
server) and send its first packet (an OACK, or DATA 1) to a client that never answers; a
server without limits keeps them all until its resends run out (25 minutes with a client's
RFC 2349 `timeout` of 255 s) and then has no descriptor left for a real client.

    python3 bench/floods/tftp_halfopen.py --server 10.0.0.2 --count 2000 --rate 500 \\
        --spoof-ports --sources 10.0.64.0/26 --timeout-option 255 --file undionly.kpxe

--spoof-ports sends each RRQ from a socket of its own on a random port, held open and silent
until the end (no ICMP "port unreachable" tells the server that nobody listens); without it
every RRQ leaves from one port, which a server must take for retransmissions of the first.
--sources binds those sockets to addresses of a range round-robin (IP_FREEBIND); the replies
reach them when the namespace routes the range to itself:
`ip route add local 10.0.64.0/26 dev lo table local` (the kernel then answers ARP for them).

Bounded in count and time (--max-seconds); nothing but RRQs is ever sent. Prints one JSON
object: sent, send_errors, sockets, replies_by_opcode, errors ("code text": count),
transfers_seen (distinct server ports that sent an OACK or DATA), seconds. Standard library
only, so it runs with any python3 in a namespace.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import resource
import select
import socket
import struct
import sys
import time

_OPCODES = {1: "RRQ", 2: "WRQ", 3: "DATA", 4: "ACK", 5: "ERROR", 6: "OACK"}
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
MAX_COUNT = 100_000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--server", required=True, help="the TFTP server's address")
    parser.add_argument("--port", type=int, default=69)
    parser.add_argument("--file", default="undionly.kpxe", help="the name asked for")
    parser.add_argument("--count", type=int, default=2000, help=f"RRQs to send (<= {MAX_COUNT})")
    parser.add_argument("--rate", type=float, default=1000.0, help="RRQs a second (0: no pause)")
    parser.add_argument(
        "--timeout-option", type=int, metavar="S", help="ask for RFC 2349 timeout=S (e.g. 255)"
    )
    parser.add_argument(
        "--opt", action="append", default=[], metavar="KEY=VALUE", help="another option"
    )
    parser.add_argument(
        "--spoof-ports", action="store_true", help="each RRQ from its own socket and random port"
    )
    parser.add_argument(
        "--sources", metavar="CIDR", help="with --spoof-ports: bind to the range's addresses"
    )
    parser.add_argument(
        "--linger", type=float, default=2.0, help="seconds to count replies after the last RRQ"
    )
    parser.add_argument("--max-seconds", type=float, default=60.0, help="hard bound on the run")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= MAX_COUNT:
        parser.error(f"--count must be 1..{MAX_COUNT}")
    if args.sources and not args.spoof_ports:
        parser.error("--sources needs --spoof-ports")
    return args


def request(args: argparse.Namespace) -> bytes:
    options = [item.split("=", 1) for item in args.opt]
    if args.timeout_option is not None:
        options.append(["timeout", str(args.timeout_option)])
    fields = [args.file, "octet", *itertools.chain.from_iterable(options)]
    return struct.pack("!H", 1) + b"".join(f.encode() + b"\0" for f in fields)


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


class Tally:
    def __init__(self) -> None:
        self.by_opcode: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.tids: set[tuple[int, int]] = set()

    def drain(self, poller: select.epoll, socks: dict[int, socket.socket], wait: float) -> None:
        for fd, _ in poller.poll(wait, 1024):
            sock = socks[fd]
            for _ in range(64):
                try:
                    data, (_, port) = sock.recvfrom(70000)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break  # an ICMP error about an earlier datagram
                opcode = int.from_bytes(data[:2], "big") if len(data) >= 2 else 0
                name = _OPCODES.get(opcode, f"opcode-{opcode}")
                self.by_opcode[name] = self.by_opcode.get(name, 0) + 1
                if opcode == 5 and len(data) >= 4:
                    code = int.from_bytes(data[2:4], "big")
                    text = data[4:].split(b"\0", 1)[0].decode("ascii", "replace")
                    key = f"{code} {text}"
                    self.errors[key] = self.errors.get(key, 0) + 1
                elif opcode in (3, 6):
                    self.tids.add((fd, port))


def flood(args: argparse.Namespace) -> dict[str, object]:
    started = time.monotonic()
    stop_at = started + args.max_seconds
    packet = request(args)
    server = (args.server, args.port)
    raise_fd_limit(args.count + 64 if args.spoof_ports else 256)
    sources = (
        itertools.cycle(str(ip) for ip in ipaddress.IPv4Network(args.sources, strict=False))
        if args.sources
        else None
    )
    poller = select.epoll()
    socks: dict[int, socket.socket] = {}
    tally = Tally()
    sent = send_errors = 0
    shared: socket.socket | None = None

    def new_socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            sock.bind((next(sources) if sources is not None else "0.0.0.0", 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        socks[sock.fileno()] = sock
        poller.register(sock.fileno(), select.EPOLLIN)
        return sock

    try:
        for i in range(args.count):
            now = time.monotonic()
            if now >= stop_at:
                break
            if args.rate > 0:
                due = started + i / args.rate
                if due > now:
                    tally.drain(poller, socks, min(due, stop_at) - now)
            try:
                if args.spoof_ports:
                    sock = new_socket()
                else:
                    sock = shared = shared or new_socket()
                sock.sendto(packet, server)
                sent += 1
            except OSError:
                send_errors += 1
            if i % 64 == 63:
                tally.drain(poller, socks, 0)
        linger_until = min(time.monotonic() + args.linger, stop_at)
        while (left := linger_until - time.monotonic()) > 0:
            tally.drain(poller, socks, left)
    finally:
        for sock in socks.values():
            sock.close()
        poller.close()
    return {
        "sent": sent,
        "send_errors": send_errors,
        "sockets": len(socks),
        "replies_by_opcode": tally.by_opcode,
        "errors": tally.errors,
        "transfers_seen": len(tally.tids),
        "seconds": round(time.monotonic() - started, 3),
    }


def main(argv: list[str]) -> int:
    print(json.dumps(flood(parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
