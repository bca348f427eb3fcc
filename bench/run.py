"""`sudo ./build.sh bench`: Pixiebox against Kea, dnsmasq, tftpd-hpa and nginx on this machine,
in the same run, over veth pairs between network namespaces this run creates and removes.

Each established server and Pixiebox take turns in one server namespace (interleaved, round by
round, so a busy spell on the machine hits every server alike); the clients (perfdhcp, curl,
wrk, dnsperf, a PXE DISCOVER probe, QEMU) run in a client namespace. It prints a table (median,
min, max, and the ratio of Pixiebox's median to the anchor's) and writes it as JSON under
out/bench/. It asserts nothing: a missed target is reported, not failed.

    python -m bench [--quick] [--rounds N] [--only GROUP ...] [--skip GROUP ...] [--works KEY ...]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from . import dashboard, flooded, measure, profile, vmboot
from .lab import DOMAIN, MACHINES, ROOT, BenchError, Lab, machine

GROUPS = ("dhcp", "tftp", "http", "dns", "startup", "floods", "dashboard", "vm")
MIB = 1 << 20


@dataclass
class Work:
    key: str
    group: str
    title: str
    unit: str
    higher_better: bool
    servers: tuple[str, ...]
    #: Servers the ratio is taken against; the better of their medians is the anchor.
    anchors: tuple[str, ...] = ()
    #: ("ratio", x) : Pixiebox / anchor at least x (higher_better) or at most x (lower);
    #: ("value", x): Pixiebox's median at least / at most x.
    target: tuple[str, float] | None = None
    #: The server whose ratio and target are the work's (vm-secure-boot: the signed chain).
    subject: str = "pixiebox"
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)

    def add(self, server: str, value: float) -> None:
        self.samples.setdefault(server, []).append(value)

    def fail(self, server: str, why: str) -> None:
        self.errors.setdefault(server, []).append(why)

    def median(self, server: str) -> float | None:
        values = self.samples.get(server)
        return statistics.median(values) if values else None

    def anchor(self) -> tuple[str, float] | None:
        medians = [(s, m) for s in self.anchors if (m := self.median(s)) is not None]
        if not medians:
            return None
        pick = max if self.higher_better else min
        return pick(medians, key=lambda item: item[1])

    def ratio(self, server: str | None = None) -> float | None:
        anchor, mine = self.anchor(), self.median(server or self.subject)
        if anchor is None or mine is None or anchor[1] in (0, float("inf")):
            return None
        return mine / anchor[1]

    def verdict(self) -> str:
        if self.target is None:
            return ""
        kind, bound = self.target
        value = self.ratio() if kind == "ratio" else self.median(self.subject)
        sign = "≥" if self.higher_better else "≤"
        wanted = f"{sign}{bound:g}{'x' if kind == 'ratio' else ' ' + self.unit}"
        if value is None:
            return f"{wanted}: not measured"
        met = value >= bound if self.higher_better else value <= bound
        return f"{wanted}: {'met' if met else 'MISSED'}"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "title": self.title,
            "unit": self.unit,
            "higher_better": self.higher_better,
            "servers": {},
        }
        for server in self.servers:
            values = self.samples.get(server, [])
            out["servers"][server] = {
                "samples": values,
                "median": statistics.median(values) if values else None,
                "min": min(values) if values else None,
                "max": max(values) if values else None,
                "errors": self.errors.get(server, []),
            }
        anchor = self.anchor()
        out["anchor"] = anchor[0] if anchor else None
        out["ratio"] = self.ratio()
        out["target"] = self.verdict()
        return out


def works(quick: bool) -> list[Work]:
    clients = 2000 if quick else 10_000
    big = 8 if quick else 30
    return [
        Work(
            "dhcp-rate",
            "dhcp",
            f"DHCP loss-free rate, {clients} clients, DORA",
            "DORA/s",
            True,
            ("pixiebox", "kea", "dnsmasq"),
            ("kea",),
            ("ratio", 0.5),
        ),
        Work(
            "dhcp-avalanche",
            "dhcp",
            f"DHCP avalanche: {clients} new clients all bound",
            "s",
            False,
            ("pixiebox", "kea", "dnsmasq"),
            ("kea",),
            None if quick else ("value", 20.0),
        ),
        Work(
            "tftp-1",
            "tftp",
            "TFTP 1 MiB blksize 1468, 1 client (server and client on one CPU)",
            "s/client",
            False,
            ("pixiebox", "tftpd-hpa", "dnsmasq"),
            ("tftpd-hpa", "dnsmasq"),
            ("ratio", 1.0),  # issue 17: no slower than the faster C server
        ),
        Work(
            "tftp-20",
            "tftp",
            "TFTP 1 MiB blksize 1468, 20 clients at once",
            "s/client",
            False,
            ("pixiebox", "tftpd-hpa", "dnsmasq"),
            ("tftpd-hpa", "dnsmasq"),
            ("ratio", 1.0),  # issue 17: no slower than the faster C server
        ),
        Work(
            "tftp-big",
            "tftp",
            f"TFTP {big} MiB x 20 clients, aggregate",
            "MiB/s",
            True,
            ("pixiebox", "dnsmasq"),
            ("dnsmasq",),
            ("ratio", 0.8),
        ),
        Work(
            "http-initrd",
            "http",
            "HTTP 100 MiB initrd download",
            "MiB/s",
            True,
            ("pixiebox", "nginx"),
            ("nginx",),
            ("ratio", 0.8),
        ),
        Work(
            "http-script",
            "http",
            "HTTP per-machine iPXE script (nginx: same-size file)",
            "req/s",
            True,
            ("pixiebox", "nginx"),
            ("nginx",),
            ("value", 20_000.0),
        ),
        Work(
            "dns",
            "dns",
            f"DNS queries for {MACHINES} lab names",
            "q/s",
            True,
            ("pixiebox", "dnsmasq"),
            ("dnsmasq",),
            ("value", 15_000.0),
        ),
        Work(
            "flood-tftp",
            "floods",
            "TFTP 1 MiB to a good client during 2,000 half-open RRQs (timeout=255, 64 sources)",
            "s",
            False,
            ("pixiebox", "tftpd-hpa", "dnsmasq"),
            ("tftpd-hpa", "dnsmasq"),
        ),
        Work(
            "flood-http",
            "floods",
            "HTTP iPXE script + 1 MiB kernel during 500 slow connections (10 sources)",
            "s",
            False,
            ("pixiebox", "nginx"),
            ("nginx",),
        ),
        Work(
            "flood-dhcp",
            "floods",
            "DHCP DISCOVER-to-ACK of 10 enrolled MACs during a 20,000-MAC storm at 2,000/s",
            "ms",
            False,
            ("pixiebox", "kea", "dnsmasq"),
            ("kea",),
        ),
        Work(
            "startup",
            "startup",
            "agent start to first DHCP OFFER (proxy mode)",
            "s",
            False,
            ("pixiebox",),
            (),
            ("value", 1.5),
        ),
        *(Work(**spec) for spec in vmboot.works()),
        *(Work(**spec) for spec in dashboard.works(quick)),
    ]


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.workdir = workdir
        self.works = {w.key: w for w in works(self.quick)}
        self.log: list[str] = []
        self.profile_dir: Path | None = Path(args.out) / "profiles" if args.profile else None
        self.lab: Lab | None = None
        self.groups = [
            g for g in GROUPS if (not args.only or g in args.only) and g not in args.skip
        ]

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.append(text)

    def sample(self, key: str, server: str, measure_one: Callable[[], float]) -> None:
        work = self.works[key]
        profiling = self.profile_dir is not None and server == "pixiebox" and self.lab_pid()
        with profile.recording(
            self.lab_pid() if profiling else None, self.profile_dir, key
        ) as prof:
            try:
                value = measure_one()
            except (BenchError, OSError, AssertionError, ValueError) as exc:
                work.fail(server, str(exc)[:2000])
                self.say(f"  {key} {server}: FAILED: {str(exc).splitlines()[0][:300]}")
                return
        work.add(server, value)
        self.say(f"  {key} {server}: {value:,.3f} {work.unit}")
        if prof is not None and prof.summary:
            self.say(f"  profile of pixiebox during {key} ({prof.path}):\n{prof.summary}")

    def chosen(self, servers: tuple[str, ...]) -> list[str]:
        return [s for s in servers if not self.args.servers or s in self.args.servers]

    def lab_pid(self) -> int | None:
        lab = self.lab
        proc = lab._proc if lab is not None else None
        return proc.pid if proc is not None and proc.poll() is None else None

    # -- groups -----------------------------------------------------------------

    def starters(self, lab: Lab, kind: str) -> dict[str, Callable[[], Any]]:
        return {
            "dhcp": {
                "pixiebox": lab.start_pixiebox,
                "kea": lab.start_kea,
                "dnsmasq": lab.start_dnsmasq_dhcp,
            },
            "tftp": {
                "pixiebox": lab.start_pixiebox,
                "tftpd-hpa": lab.start_tftpd_hpa,
                "dnsmasq": lab.start_dnsmasq_tftp,
            },
            "http": {"pixiebox": lab.start_pixiebox, "nginx": lab.start_nginx},
            "dns": {"pixiebox": lab.start_pixiebox, "dnsmasq": lab.start_dnsmasq_dns},
        }[kind]

    def started(self, lab: Lab, kind: str, server: str) -> bool:
        try:
            self.starters(lab, kind)[server]()
        except BenchError as exc:
            for work in self.works.values():
                if work.group == kind and server in work.servers:
                    work.fail(server, str(exc)[:2000])
            self.say(f"  {server}: could not start: {str(exc).splitlines()[0][:300]}")
            return False
        return True

    def dhcp_round(self, lab: Lab) -> None:
        clients = 2000 if self.quick else 10_000
        step = 2 if self.quick else 4
        for server in self.chosen(("pixiebox", "kea", "dnsmasq")):
            if self.started(lab, "dhcp", server):
                self.sample(
                    "dhcp-rate",
                    server,
                    lambda: measure.dhcp_loss_free_rate(lab, clients, step, self.log),
                )
            # A fresh server (no leases) for the avalanche: every client is new.
            if self.started(lab, "dhcp", server):
                self.sample(
                    "dhcp-avalanche",
                    server,
                    lambda: measure.dhcp_avalanche(lab, clients, 150.0, self.log),
                )
            lab.stop()

    def tftp_round(self, lab: Lab) -> None:
        big = (8 if self.quick else 30) * MIB
        lab.make_file("tftp-1m.bin", MIB)
        lab.make_file("tftp-big.bin", big)
        for server in self.chosen(("pixiebox", "tftpd-hpa", "dnsmasq")):
            if not self.started(lab, "tftp", server):
                continue
            self.sample(
                "tftp-1",
                server,
                lambda: measure.tftp_per_client(lab, "tftp-1m.bin", MIB, 1, pinned=True),
            )
            self.sample(
                "tftp-20", server, lambda: measure.tftp_per_client(lab, "tftp-1m.bin", MIB, 20)
            )
            if server in self.works["tftp-big"].servers:
                self.sample(
                    "tftp-big", server, lambda: measure.tftp_aggregate(lab, "tftp-big.bin", big, 20)
                )
            lab.stop()

    def http_round(self, lab: Lab) -> None:
        size = 100 * MIB
        lab.make_file("initrd-100m.img", size)
        lab.make_file("vmlinuz", MIB)
        seconds = 3 if self.quick else 8
        _, mac, _ = machine(1)
        script = f"/boot/{mac}.ipxe"
        for server in self.chosen(("pixiebox", "nginx")):
            if not self.started(lab, "http", server):
                continue
            if server == "pixiebox":
                # nginx gets a static file of the same size as the script Pixiebox makes.
                body = measure.http_get(lab, script)
                (lab.assets / "script-static.ipxe").write_bytes(body)
                self.say(f"  the iPXE script is {len(body)} bytes")
            path = script if server == "pixiebox" else "/assets/script-static.ipxe"
            self.sample(
                "http-initrd",
                server,
                lambda: measure.http_download(lab, "/assets/initrd-100m.img", size),
            )
            rps = functools.partial(measure.http_rps, lab, path, seconds)
            self.sample("http-script", server, rps)
            lab.stop()

    def dns_round(self, lab: Lab) -> None:
        queries = self.workdir / "dns-queries.txt"
        queries.write_text("".join(f"{machine(i)[0]}.{DOMAIN} A\n" for i in range(1, MACHINES + 1)))
        seconds = 3 if self.quick else 8
        for server in self.chosen(("pixiebox", "dnsmasq")):
            if self.started(lab, "dns", server):
                self.sample("dns", server, lambda: measure.dns_qps(lab, queries, seconds))
            lab.stop()

    def floods_round(self, lab: Lab) -> None:
        self.flooder = getattr(self, "flooder", None) or flooded.Flooder.on(lab)
        flooded.run_round(self, lab, self.flooder)

    def dashboard_round(self, lab: Lab) -> None:
        self.flooder = getattr(self, "flooder", None) or flooded.Flooder.on(lab)
        dashboard.run_round(self, lab, self.flooder)

    def startup_round(self, lab: Lab) -> None:
        self.sample("startup", "pixiebox", lambda: measure.dhcp_startup(lab, self.log))

    def wanted(self, work: Work) -> bool:
        """In a chosen group and, for the vm group, among --works (if given)."""
        if work.group not in self.groups:
            return False
        return work.group != "vm" or not self.args.works or work.key in self.args.works

    # -- all --------------------------------------------------------------------

    def run(self) -> None:
        rounds = self.args.rounds
        network_groups = [g for g in self.groups if g != "vm"]
        if network_groups:
            lab = self.lab = Lab(self.workdir / "lab")
            try:
                for index in range(rounds):
                    for group in network_groups:
                        self.say(f"{group}: round {index + 1} of {rounds}")
                        getattr(self, f"{group}_round")(lab)
            finally:
                lab.close()
        if "vm" in self.groups:
            keys = [w.key for w in self.works.values() if w.group == "vm" and self.wanted(w)]
            vmboot.run_rounds(self, keys)


def table(works_: list[Work]) -> str:
    def fmt(value: float | None) -> str:
        if value is None:
            return "-"
        if value == float("inf"):
            return "never"
        return (
            f"{value:,.0f}" if value >= 100 else f"{value:,.3g}" if value < 1 else f"{value:,.2f}"
        )

    rows = [("work", "server", "unit", "median", "min", "max", "ratio", "target")]
    for work in works_:
        anchor = work.anchor()
        for server in work.servers:
            values = work.samples.get(server, [])
            if not values and server not in work.errors:
                continue
            ratio = work.ratio(server)
            is_anchor = anchor is not None and anchor[0] == server
            rows.append(
                (
                    work.title if server == work.servers[0] else "",
                    server,
                    work.unit,
                    fmt(statistics.median(values)) if values else "failed",
                    fmt(min(values)) if values else "-",
                    fmt(max(values)) if values else "-",
                    "anchor" if is_anchor else (f"{ratio:.2f}x" if ratio is not None else ""),
                    work.verdict() if server == work.subject else "",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer clients, shorter steps, 2 rounds (for development)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        choices=range(1, 11),
        metavar="N",
        help="rounds per measurement (1-10; default 3, --quick 2)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=GROUPS,
        default=[],
        metavar="GROUP",
        help=f"run only these groups ({', '.join(GROUPS)})",
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        choices=GROUPS,
        default=[],
        metavar="GROUP",
        help="skip these groups (e.g. --skip vm: the slow one)",
    )
    parser.add_argument(
        "--servers",
        nargs="+",
        default=[],
        metavar="NAME",
        help="run only these servers (pixiebox kea dnsmasq tftpd-hpa nginx), for development",
    )
    parser.add_argument(
        "--works",
        nargs="+",
        choices=vmboot.KEYS,
        default=[],
        metavar="KEY",
        help=f"of the vm group, measure only these works ({', '.join(vmboot.KEYS)})",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record Pixiebox with py-spy during each measurement "
        "(out/bench/profiles/; pip install py-spy first)",
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / "out" / "bench"),
        help="directory for the JSON results (default out/bench)",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if os.geteuid() != 0:
        print(
            "bench: run as root (sudo ./build.sh bench): it builds network namespaces",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="pixiebox-bench-"))
    os.chmod(workdir, 0o755)  # nginx, tftpd-hpa and dnsmasq drop privileges
    bench = Bench(args, workdir)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    bench.say(
        f"Pixiebox benchmark, {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load "
        f"{load_before[0]:.1f}; groups: {', '.join(bench.groups)}; {args.rounds} rounds"
        f"{' (quick)' if args.quick else ''}"
    )
    status = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        bench.say("interrupted: removing the namespaces; results so far below")
        status = 130
    except Exception:
        bench.say(f"bench failed:\n{traceback.format_exc()}")
        status = 1
    finally:
        with contextlib.suppress(OSError):
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    chosen = [w for w in bench.works.values() if bench.wanted(w)]
    text = table(chosen)
    load_after = os.getloadavg()
    print()
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "date": started.isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "quick": args.quick,
        "rounds": args.rounds,
        "groups": bench.groups,
        "works": {w.key: w.as_json() for w in chosen},
        "table": text,
        "log": bench.log,
    }
    stamp = started.strftime("%Y%m%dT%H%M%S")
    path = out / f"bench-{stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=lambda v: None))
    (out / "latest.json").write_text(path.read_text())
    print(f"\nload average {load_before[0]:.1f} before, {load_after[0]:.1f} after; JSON: {path}")
    time.sleep(0)
    return status
