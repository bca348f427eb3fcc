"""The `dashboard` group: the page and the API behind it with 500 machines, in a real browser.

The agent is the benchmark's (bench/lab.py: full DHCP mode, 100 enrolled machines c001..c100);
400 more become known the way strangers do, through real PXE DISCOVERs from 400 random MACs
(bench/floods/dhcp_storm.py with a fixed --seed, from the flooder namespace): 500 machines, the
API's largest page. Nothing is written into the agent's store behind its back. Then:

- page: Debian's Chromium (pixiebox.virtlab.chromium, as the browser tests; its own namespace
  on the bridge, as a laptop) opens `/` with an empty cache; the time from navigation start to
  the 500th `#rows tr[data-mac]` in the DOM, taken in the page by a MutationObserver that
  DevTools adds before the page's own scripts run (no polling from here to blur it);
- listing: every page of `GET /api/v1/machines?limit=500` (following `Link: rel="next"`), curl
  from the client namespace over one connection, against nginx serving the same bytes as static
  files (the comparator of the other HTTP works);
- event latency: while the 400 discovered machines send DISCOVERs again (the same MACs, so the
  lab stays at 500 machines and every DISCOVER is an event for a row on the page), probes from
  the client namespace each send one DISCOVER from a new MAC; the delay from just before that
  frame is handed to the kernel (time.time()) to the page's first row for the MAC (the
  observer's `performance.timeOrigin + performance.now()`, the same clock), median and p95;
  the log says how many whole-list and single-row reads the page made meanwhile (counted in
  the page by a PerformanceObserver): the price the agent pays for a page that keeps up.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from pixiebox.virtlab import chromium, forward, netns
from pixiebox.virtlab.chromium import Chromium

from .flooded import Flooder
from .floods import dhcp_storm
from .lab import MACHINES, SERVER_IP, BenchError, Lab, tool

BROWSER_IP = "10.77.0.4"
API = f"http://{SERVER_IP}:8080"
#: Machines that become known through DISCOVERs; with the 100 enrolled, the API's largest page.
DISCOVERED = 400
TOTAL = MACHINES + DISCOVERED
SEED = 14
#: In the page before its scripts: first-seen time of every row (epoch ms), the moment the
#: TOTAL-th row is in the DOM (ms since navigation start), and how many reads of the whole list
#: and of single rows the page made (what keeping up with a storm costs the agent).
OBSERVER = """
(() => {
  const want = %d;
  const pxb = (window.__pxb = { seen: {}, drawn: null });
  const look = (node) => {
    if (node.nodeType !== 1) return;
    const rows = node.matches("tr[data-mac]") ? [node] : node.querySelectorAll("tr[data-mac]");
    const now = performance.timeOrigin + performance.now();
    for (const row of rows) if (!(row.dataset.mac in pxb.seen)) pxb.seen[row.dataset.mac] = now;
  };
  new MutationObserver((records) => {
    for (const record of records) for (const node of record.addedNodes) look(node);
    if (pxb.drawn === null && document.querySelectorAll("#rows tr[data-mac]").length >= want) {
      pxb.drawn = performance.now();
    }
  }).observe(document, { childList: true, subtree: true });
  const reads = (pxb.reads = { list: 0, row: 0 });
  new PerformanceObserver((entries) => {
    for (const entry of entries.getEntries()) {
      const path = new URL(entry.name).pathname;
      if (path === "/api/v1/machines") reads.list++;
      else if (path.startsWith("/api/v1/machines/")) reads.row++;
    }
  }).observe({ type: "resource" });
})();
"""

#: A plain event-stream client (the control): prints "epoch-seconds MAC" for each event about
#: one of the MACs in argv[2:], as its `data:` line arrives.
SSE_READER = """
import json, sys, time, urllib.request
want = set(sys.argv[2:])
with urllib.request.urlopen(sys.argv[1] + "/api/v1/events", timeout=120) as stream:
    print("open", flush=True)
    for line in stream:
        if line.startswith(b"data:"):
            mac = json.loads(line[5:]).get("mac", "")
            if mac in want:
                print(time.time(), mac, flush=True)
                want.discard(mac)
"""
READS = "return [window.__pxb.reads.list, window.__pxb.reads.row]"
SEEN = "return Object.fromEntries(arguments[0].map((m) => [m, window.__pxb.seen[m] ?? null]))"


def works(quick: bool) -> list[dict[str, Any]]:
    """The group's works, as bench.run.Work keyword arguments."""
    storm = storm_rate(quick)
    during = f"during DISCOVERs from the {DISCOVERED} discovered MACs again at {storm}/s"
    return [
        {"key": "dash-page", "group": "dashboard", "unit": "s", "higher_better": False,
         "title": f"Dashboard: open / (empty cache) until all {TOTAL} rows are drawn (Chromium)",
         "servers": ("pixiebox",)},
        {"key": "dash-list", "group": "dashboard", "unit": "ms", "higher_better": False,
         "title": f"GET /api/v1/machines?limit=500, every page, {TOTAL} machines (nginx: the "
         "same JSON as static files)", "servers": ("pixiebox", "nginx"), "anchors": ("nginx",)},
        {"key": "dash-event-idle", "group": "dashboard", "unit": "ms", "higher_better": False,
         "title": "New MAC's DISCOVER on the wire to its row on the open page, no storm: median "
         "of 5", "servers": ("pixiebox",)},
        {"key": "dash-event", "group": "dashboard", "unit": "ms", "higher_better": False,
         "title": f"... the same {during} (storm): median",
         "servers": ("pixiebox",)},
        {"key": "dash-event-p95", "group": "dashboard", "unit": "ms", "higher_better": False,
         "title": "... the same, 95th percentile", "servers": ("pixiebox",)},
        {"key": "dash-stream", "group": "dashboard", "unit": "ms", "higher_better": False,
         "title": "... the same DISCOVER to its event at a plain event-stream client (control): "
         "median", "servers": ("pixiebox",)},
        {"key": "dash-stream-p95", "group": "dashboard", "unit": "ms", "higher_better": False,
         "title": "... the control, 95th percentile", "servers": ("pixiebox",)},
    ]  # fmt: skip


def storm_rate(quick: bool) -> int:
    return 300 if quick else 500


class Bench(Protocol):
    log: list[str]
    quick: bool

    def say(self, text: str) -> None: ...
    def started(self, lab: Lab, kind: str, server: str) -> bool: ...
    def sample(self, key: str, server: str, measure_one: Callable[[], float]) -> None: ...
    def chosen(self, servers: tuple[str, ...]) -> list[str]: ...


def browser_host(lab: Lab) -> netns.Host:
    for host in lab.segment.hosts:
        if host.role == "brw":
            return host
    return lab.segment.add_host("brw", ip=f"{BROWSER_IP}/16")


# -- the machines ----------------------------------------------------------------------------


def total(lab: Lab) -> int:
    """X-Total-Count of the machine listing (-1 when the API does not answer)."""
    argv = [tool("curl"), "-sS", "--max-time", "10", "-o", "/dev/null", "-D", "-",
            f"{API}/api/v1/machines?limit=1"]  # fmt: skip
    found = re.search(r"(?im)^x-total-count:\s*(\d+)", lab.client_run(argv, timeout=20).stdout)
    return int(found.group(1)) if found else -1


def make_known(lab: Lab, flooder: Flooder, log: list[str]) -> None:
    """The 400 strangers' DISCOVERs (again, for any the agent shed), until it knows TOTAL."""
    netns.wait_until(lambda: total(lab) >= 0, 20, 0.2, "the agent's API answering")
    for _ in range(3):
        if total(lab) >= TOTAL:
            break
        argv = [sys.executable, str(dhcp_storm.__file__), "--iface", "eth0", "--count",
                str(DISCOVERED), "--rate", "200", "--seed", str(SEED), "--settle", "1",
                "--max-seconds", "30"]  # fmt: skip
        flooder.host.run(argv, timeout=60)
    known = total(lab)
    log.append(f"  dashboard: the agent knows {known} machines")
    if known != TOTAL:
        raise BenchError(f"the agent knows {known} machines, not {TOTAL}")


# -- the listing -----------------------------------------------------------------------------


def page_urls(lab: Lab) -> list[str]:
    """Every page of the listing, by its Link headers; each page's body is saved for nginx as
    dash-page-N.json in its root."""
    url, urls = f"{API}/api/v1/machines?limit=500", list[str]()
    while url and len(urls) < 10:
        body = lab.workdir / f"dash-page-{len(urls) + 1}.json"
        argv = [tool("curl"), "-sS", "--fail", "--max-time", "30", "-D", "-", "-o", str(body),
                url]  # fmt: skip
        result = lab.client_run(argv, timeout=40)
        if result.returncode != 0:
            raise BenchError(f"GET {url}: {result.stderr.strip()}")
        body.chmod(0o644)
        urls.append(url)
        link = re.search(r'(?im)^link:\s*<([^>]+)>\s*;\s*rel="?next', result.stdout)
        url = f"{API}{link.group(1)}" if link else ""
    return urls


def listing_ms(lab: Lab, urls: list[str], repeats: int) -> float:
    """Median milliseconds to fetch every URL in `urls`, `repeats` times over one connection."""
    argv = [tool("curl"), "-sS", "--fail", "--max-time", "120", "-w", "%{time_total}\n"]
    for _ in range(repeats):
        for url in urls:
            argv += ["-o", "/dev/null", url]
    result = lab.client_run(argv, timeout=180)
    times = [float(line) for line in result.stdout.split()]
    if result.returncode != 0 or len(times) != repeats * len(urls):
        raise BenchError(f"curl of the listing failed: {result.stderr.strip()[-300:]}")
    each = [sum(times[i : i + len(urls)]) for i in range(0, len(times), len(urls))]
    return 1000 * statistics.median(each)


# -- the page --------------------------------------------------------------------------------


def start_browser(namespace: str | None, workdir: Path) -> Chromium:
    """Chromium without its request log: ChromeDriver buffering the DevTools events of every
    request the page makes would be part of what is measured. Page loads get a minute, as the
    lab may be busy."""
    why = chromium.problem()
    if why:
        raise BenchError(why)
    return Chromium(namespace, workdir, page_load_timeout=60, record_requests=False)


def page_load(browser: Chromium) -> float:
    """Seconds from navigation start to the TOTAL-th row, with an empty cache."""
    browser.cdp("Network.enable")
    browser.cdp("Network.clearBrowserCache")
    browser.open("about:blank")
    browser.open(f"{API}/")
    deadline = time.monotonic() + 60
    while (drawn := browser.js("return window.__pxb && window.__pxb.drawn")) is None:
        if time.monotonic() > deadline:
            count = browser.js("return document.querySelectorAll('#rows tr[data-mac]').length")
            raise BenchError(f"the page drew {count} of {TOTAL} rows in 60 s")
        time.sleep(0.05)
    return float(drawn) / 1000


# -- event latency ---------------------------------------------------------------------------


class Prober:
    """DISCOVERs from new MACs, sent from the client namespace by this process: the packet
    socket is made by a thread that entered that namespace (a socket stays in the namespace it
    was made in), so the send time is taken right before the frame goes to the kernel."""

    def __init__(self, namespace: str) -> None:
        made: list[socket.socket | BaseException] = []

        def make() -> None:
            try:
                forward.enter_namespace(namespace)
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
                sock.bind(("eth0", 0))
                made.append(sock)
            except OSError as exc:
                made.append(exc)

        thread = threading.Thread(target=make, name="dash-prober")
        thread.start()
        thread.join()
        if not made or not isinstance(made[0], socket.socket):
            raise BenchError(f"no packet socket in {namespace}: {made[0] if made else '?'}")
        self.sock = made[0]
        self.rng = random.Random()

    def send(self, mac: bytes) -> float:
        payload = dhcp_storm.discover(mac, self.rng.randrange(1 << 32), 0, self.rng.randbytes(16))
        frame = dhcp_storm.frame(mac, payload)
        sent = time.time()
        self.sock.send(frame)
        return sent

    def close(self) -> None:
        self.sock.close()


def event_latency(
    lab: Lab, flooder: Flooder, browser: Chromium, probes: int, rate: int | None, log: list[str]
) -> tuple[list[float], list[float]]:
    """Milliseconds from each probe's DISCOVER to its row on the page, and to its first event
    at a plain event-stream client beside the browser (the control), during the storm."""
    prober = Prober(lab.client.name)
    macs = dhcp_storm.random_macs(random.Random(), probes)
    names = [mac.hex(":") for mac in macs]
    # The control, beside the browser in its namespace: the same events to a plain client.
    reader = subprocess.Popen(
        ["ip", "netns", "exec", browser_host(lab).name, sys.executable, "-c", SSE_READER, API,
         *names], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    if reader.stdout is None or reader.stdout.readline().strip() != "open":
        reader.kill()
        raise BenchError("the event-stream reader did not start")
    time.sleep(0.5)  # its headers came; its subscription starts with the body
    storm = None
    if rate:
        storm = flooder.start(
            "dhcp_storm.py", "--iface", "eth0", "--count", str(DISCOVERED), "--rate", str(rate),
            "--seed", str(SEED), "--settle", "0", "--max-seconds", "60", repeat=200,
        )  # fmt: skip
    sent: dict[str, float] = {}
    try:
        if storm is not None:
            flooder.during(storm, "DHCP")
        reads_before, started = browser.js(READS), time.monotonic()
        for raw, name in zip(macs, names, strict=True):
            sent[name] = prober.send(raw)
            time.sleep(0.5 if storm is not None else 1.0)
        lists, rows = (a - b for a, b in zip(browser.js(READS), reads_before, strict=True))
        log.append(f"  dashboard: the page's reads while probing ({time.monotonic() - started:.1f}"
                   f" s): {lists} of the whole list, {rows} of single rows")  # fmt: skip
        seen: dict[str, float | None] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            seen = browser.js(SEEN, list(sent))
            if all(value is not None for value in seen.values()):
                break
            time.sleep(0.5)
    finally:
        if storm is not None:
            Flooder.finish(storm, log, "dashboard DHCP")
        prober.close()
        reader.kill()
    streamed: dict[str, float] = {}
    for line in reader.communicate(timeout=10)[0].splitlines():
        with contextlib.suppress(ValueError):
            at, mac = line.split()
            streamed[mac] = float(at)
    # A probe never seen counts as never (inf): more than half of them unseen makes the median
    # "never", which is what the page did.
    never = float("inf")
    control = [
        1000 * (streamed[mac] - at) if mac in streamed else never for mac, at in sent.items()
    ]
    delays = [
        float(shown) - 1000 * at if (shown := seen.get(mac)) is not None else never
        for mac, at in sent.items()
    ]
    during = f"during the {rate}/s storm" if rate else "without a storm"
    missed = [index + 1 for index, value in enumerate(delays) if value == never]
    if missed:
        shown_error = browser.js("return document.querySelector('[role=alert]:not([hidden])')"
                                 "?.textContent || ''")  # fmt: skip
        log.append(f"  dashboard: probes not seen (in sending order): {missed}; the page's "
                   f"alert: {str(shown_error)[:300]!r}")  # fmt: skip
    for what, values in (("on the page", delays), ("in the event stream", control)):
        log.append(
            f"  dashboard: probes {during}, {what}, {sum(v < never for v in values)} of "
            f"{len(sent)} seen; ms: {', '.join(f'{v:.0f}' for v in sorted(values) if v < never)}"
        )
    return delays, control


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


# -- the round -------------------------------------------------------------------------------


def run_round(bench: Bench, lab: Lab, flooder: Flooder) -> None:
    quick = bench.quick
    urls: list[str] = []
    if "pixiebox" in bench.chosen(("pixiebox",)) and bench.started(lab, "http", "pixiebox"):
        try:
            make_known(lab, flooder, bench.log)
            urls = page_urls(lab)
        except (BenchError, OSError, AssertionError, netns.CommandError) as exc:
            for key in ("dash-page", "dash-list", "dash-event-idle", "dash-event"):
                bench.sample(key, "pixiebox", partial(_raise, BenchError(str(exc))))
            lab.stop()
            return
        bench.say(f"  the listing is {len(urls)} page(s)")
        bench.sample("dash-list", "pixiebox", partial(listing_ms, lab, urls, 20 if quick else 50))
        browser = start_browser(browser_host(lab).name, lab.fresh_dir("browser"))
        try:
            browser.cdp("Page.enable")
            browser.cdp("Page.addScriptToEvaluateOnNewDocument", {"source": OBSERVER % TOTAL})
            for _ in range(3 if quick else 5):
                bench.sample("dash-page", "pixiebox", partial(page_load, browser))

            def idle() -> float:
                page, _ = event_latency(lab, flooder, browser, 5, None, bench.log)
                return statistics.median(page)

            bench.sample("dash-event-idle", "pixiebox", idle)
            shown: list[float] = []
            streamed: list[float] = []

            def latency() -> float:
                rate, probes = storm_rate(quick), 20 if quick else 40
                page, stream = event_latency(lab, flooder, browser, probes, rate, bench.log)
                shown[:], streamed[:] = page, stream
                return statistics.median(shown)

            bench.sample("dash-event", "pixiebox", latency)
            if shown:
                bench.sample("dash-event-p95", "pixiebox", lambda: p95(shown))
            if streamed:
                bench.sample("dash-stream", "pixiebox", lambda: statistics.median(streamed))
                bench.sample("dash-stream-p95", "pixiebox", lambda: p95(streamed))
        finally:
            browser.close()
        lab.stop()
    if urls and "nginx" in bench.chosen(("nginx",)) and bench.started(lab, "http", "nginx"):
        static = [f"http://{SERVER_IP}/dash-page-{n}.json" for n in range(1, len(urls) + 1)]
        bench.sample("dash-list", "nginx", partial(listing_ms, lab, static, 20 if quick else 50))
        lab.stop()


def _raise(exc: BaseException) -> float:
    raise exc
