"""Issue 13, item 2: a bounded inventory. Discovered machines (not in lab.toml) are at most
[boot] max_discovered, the least recently heard that never got past DHCP forgotten first, and
those not heard from for [boot] forget_discovered_after are forgotten; enrolled machines never
are, leases always stay. GET /api/v1/machines lists a page at a time with filters, and a DHCP
storm of 20,000 MACs (bench/floods/dhcp_storm.py) read by two pollers of the API neither grows
the inventory past its cap nor keeps an enrolled machine from its DHCP answer.

The bound's rules and the API's pages are driven in-process (fast); the storm runs against the
real agent in namespaces."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import httpx
import netlab
import pytest
from agentproc import lab_toml, start_agent
from pixiebox.client.api import ApiClient
from pixiebox.config import LabConfig
from pixiebox.core.firmware import arch_info
from pixiebox.core.inventory import Inventory
from pixiebox.core.lifecycle import FORGET_BATCH, MachineState
from pixiebox.events import Kind
from pixiebox.http.api import ApiState, api_app
from pixiebox.store.state import Lease, StateStore

REPO = Path(__file__).resolve().parent.parent
STORM = REPO / "bench" / "floods" / "dhcp_storm.py"
C1 = "02:00:00:00:87:01"
C2 = "02:00:00:00:87:02"
C3 = "02:00:00:00:87:03"
BIOS = arch_info(0)


def storm_mac(n: int) -> str:
    return f"0a:00:00:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def lab(tmp_path: Path, clock: Clock | None = None, **boot: Any) -> tuple[Inventory, StateStore]:
    config = LabConfig.model_validate({
        "boot": boot,
        "machines": [{"name": "c1", "mac": C1, "ip": "10.0.0.31"}, {"name": "c2", "mac": C2}],
    })  # fmt: skip
    store = StateStore(tmp_path / "state")
    inventory = Inventory(config, store)
    if clock is not None:
        inventory.lifecycle._clock = clock  # time is the test's
    return inventory, store


def discover(inventory: Inventory, mac: str) -> None:
    """What the proxy handler does for a PXE DISCOVER: seen, then its offer."""
    inventory.seen(mac, BIOS)
    inventory.record(mac, Kind.DHCP_OFFER, "offered", fields={"mode": "proxy"})


def rows(store: StateStore) -> set[str]:
    return set(store.machine_records())


def in_loop_turns(work: Any, per_turn: int = 64) -> None:
    """Run `work(i)` as the agent would: on an event loop, a DHCP batch per turn (the store
    commits per turn)."""

    async def main() -> None:
        for index in range(work.count):
            work(index)
            if (index + 1) % per_turn == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(main())


class Storm:
    def __init__(self, inventory: Inventory, count: int, first: int = 0) -> None:
        self.inventory, self.count, self.first = inventory, count, first

    def __call__(self, index: int) -> None:
        discover(self.inventory, storm_mac(self.first + index))


def test_the_cap_forgets_dhcp_only_machines_first_never_enrolled_ones_nor_leases(
    tmp_path: Path,
) -> None:
    clock = Clock()
    inventory, store = lab(tmp_path, clock, max_discovered=10)
    # c1 (enrolled) and a discovered machine that really booted (it fetched its kernel).
    discover(inventory, C1)
    booted = "02:00:00:00:87:77"
    discover(inventory, booted)
    inventory.record(booted, Kind.HTTP_KERNEL, "kernel sent", fields={"file": "/vmlinuz"})
    # The first storm MAC got a lease before the storm went on (full mode would keep it).
    store.save_lease(Lease(IPv4Address("10.0.0.100"), storm_mac(0), clock.now + 3600, "bound"))
    clock.now += 1
    storm = Storm(inventory, 2000)
    in_loop_turns(storm)
    kept = rows(store)
    assert len(kept - {C1}) == 10, len(kept)
    assert C1 in kept and booted in kept  # never enrolled; booted ones after DHCP-only ones
    assert {storm_mac(n) for n in range(1991, 2000)} <= kept  # the most recent ones
    assert store.events(storm_mac(0)) == [] and store.machine_record(storm_mac(0)) is None
    assert [lease.mac for lease in store.leases()] == [storm_mac(0)]  # a lease is a promise
    assert [e.kind for e in store.events(booted)][-1] == Kind.HTTP_KERNEL
    # In memory too: no boot-start entry per storm MAC.
    assert len(inventory.lifecycle._boot_started) <= 12
    # One lab-log event for 1,991 machines forgotten in the same minute, not 1,991.
    (said,) = store.events("")
    assert (said.kind, said.fields["reason"], said.fields["max_discovered"]) == (
        Kind.MACHINE_FORGOTTEN, "cap", 10,
    )  # fmt: skip
    assert inventory.lifecycle.under_pressure()
    # A minute later the periodic pass reports the rest, with their count.
    clock.now += 61
    assert inventory.lifecycle.forget_some() == 0
    later = store.events("")[-1]
    assert later.fields["reason"] == "cap" and later.fields["count"] == 1990
    assert not inventory.lifecycle.under_pressure()
    # With only booted machines and a newcomer left, the cap holds exactly: the oldest booted
    # one goes, the newcomer stays.
    for mac in list(rows(store) - {C1, booted}):
        inventory.record(mac, Kind.OS_UP, "up")
    discover(inventory, storm_mac(99_999))
    assert len(rows(store) - {C1}) == 10 and storm_mac(99_999) in rows(store)
    assert booted not in rows(store)  # the least recently heard of the booted ones


def test_machines_not_heard_from_are_forgotten_in_batches(tmp_path: Path) -> None:
    clock = Clock()
    inventory, store = lab(tmp_path, clock, forget_discovered_after="10s")
    discover(inventory, C1)
    in_loop_turns(Storm(inventory, 250))
    assert inventory.lifecycle.forget_some() == 0  # nobody is silent yet
    clock.now += 8
    discover(inventory, storm_mac(7))  # heard again: forgotten 10 s from now, not before
    clock.now += 3
    assert inventory.lifecycle.forget_some() == FORGET_BATCH  # a batch per loop turn
    assert inventory.lifecycle.forget_some() == FORGET_BATCH
    assert inventory.lifecycle.forget_some() == 250 - 1 - 2 * FORGET_BATCH
    assert rows(store) == {C1, storm_mac(7)}
    (said,) = store.events("")
    assert (said.fields["reason"], said.fields["forget_after"]) == ("age", 10)
    clock.now += 11
    inventory.lifecycle.forget_some()
    assert rows(store) == {C1}  # enrolled: never forgotten, however silent


def test_machines_falling_silent_together_are_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every MAC of a storm is `booting` after its offer and falls silent at once: each gets
    its machine.off event, the log one line for all (an enrolled machine keeps its own)."""
    clock = Clock()
    inventory, store = lab(tmp_path, clock)
    discover(inventory, C1)
    in_loop_turns(Storm(inventory, 30))
    clock.now += 121
    with caplog.at_level(logging.INFO, logger="pixiebox"):
        silent = inventory.lifecycle.mark_silent(120, inventory.name_of)
    assert len(silent) == 31
    lines = [r.getMessage() for r in caplog.records if "silent" in r.getMessage()]
    assert lines == [
        f"c1 ({C1}) has been silent for 2 min; shown as off",
        "30 discovered machines have been silent for 2 min; shown as off",
    ], lines
    assert store.events(storm_mac(3))[-1].kind == Kind.MACHINE_OFF


def test_the_bound_is_restored_from_the_store_and_follows_lab_toml(tmp_path: Path) -> None:
    """A restart rebuilds the roster (an old store over the cap is brought under it by the
    periodic pass); enrolling a machine takes it out of the bound, removing it puts it in."""
    inventory, store = lab(tmp_path)
    in_loop_turns(Storm(inventory, 300))
    discover(inventory, C3)
    inventory.record(C3, Kind.OS_UP, "up")
    store.close()
    config = LabConfig.model_validate({"boot": {"max_discovered": 50}, "machines": [
        {"name": "c1", "mac": C1}, {"name": "c3", "mac": C3}]})  # fmt: skip
    store = StateStore(tmp_path / "state")
    inventory = Inventory(config, store)
    assert len(inventory.lifecycle.roster) == 300  # c3 is enrolled now: not in it

    async def periodic() -> None:
        task = asyncio.create_task(inventory.lifecycle.watch_silence(lambda: 600.0, str))
        for _ in range(100):
            await asyncio.sleep(0)
        task.cancel()

    asyncio.run(periodic())
    assert len(rows(store) - {C3}) == 50 and C3 in rows(store)
    # c3 leaves lab.toml: a discovered machine again, counted against the cap.
    inventory.reload(config.model_copy(update={"machines": config.machines[:1]}))
    assert C3 in inventory.lifecycle.roster and len(inventory.lifecycle.roster) == 51
    inventory.lifecycle.forget_some()
    assert len(rows(store)) == 50 and C3 in rows(store)  # it was up: the storm's go first
    store.close()


def test_the_periodic_pass_forgets_with_the_real_clock(tmp_path: Path) -> None:
    """The agent's watcher task (watch_silence) applies a short forget_discovered_after within
    a tick or two, not once every 30 s."""
    inventory, store = lab(tmp_path, forget_discovered_after="1s")
    discover(inventory, C1)
    discover(inventory, C3)

    async def main() -> float:
        started = time.monotonic()
        task = asyncio.create_task(inventory.lifecycle.watch_silence(lambda: 600.0, str))
        try:
            while C3 in rows(store) and time.monotonic() - started < 10:
                await asyncio.sleep(0.1)
        finally:
            task.cancel()
        return time.monotonic() - started

    took = asyncio.run(main())
    assert rows(store) == {C1}, took
    assert 0.9 < took < 4, took
    store.close()


# -- GET /api/v1/machines: filters and pages


class AsgiClient:
    """The API app in-process over ASGI (httpx's transport), one request at a time."""

    def __init__(self, state: ApiState) -> None:
        self._transport = httpx.ASGITransport(app=api_app(state))

    def get(self, path: str) -> httpx.Response:
        async def fetch() -> httpx.Response:
            async with httpx.AsyncClient(
                transport=self._transport, base_url="http://127.0.0.1:8080"
            ) as client:
                return await client.get(path)

        return asyncio.run(fetch())


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AsgiClient, Inventory]]:
    """Read only: c1 (up) and c2 enrolled, 250 discovered machines (one of them up)."""
    inventory, store = lab(tmp_path_factory.mktemp("api"))
    in_loop_turns(Storm(inventory, 250))
    discover(inventory, C1)
    inventory.record(C1, Kind.OS_UP, "up", fields={"ip": "10.0.0.31"})
    inventory.record(storm_mac(5), Kind.OS_UP, "up")
    state = ApiState(inventory=inventory, token="t", enroll=lambda *_: "")
    try:
        yield AsgiClient(state), inventory
    finally:
        store.close()


def every_page(client: AsgiClient, path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The machines of every page, following Link rel="next"; and each page's size."""
    found: list[dict[str, Any]] = []
    sizes: list[int] = []
    following: str | None = path
    while following is not None and len(sizes) < 200:
        answer = client.get(following)
        assert answer.status_code == 200, answer.text
        found += answer.json()
        sizes.append(len(answer.json()))
        link = answer.headers.get("link")
        following = (
            httpx.Response(200, headers={"link": link}).links["next"]["url"] if link else None
        )
    return found, sizes


def test_machines_are_listed_a_page_at_a_time(api: tuple[AsgiClient, Inventory]) -> None:
    client, _ = api
    first = client.get("/api/v1/machines")
    assert first.status_code == 200
    body = first.json()
    assert isinstance(body, list) and len(body) == 100  # the default page, still a JSON list
    assert first.headers["x-total-count"] == "252"
    assert [m["name"] for m in body[:2]] == ["c1", "c2"]  # lab.toml's order, then discovered
    assert body[2]["mac"] == storm_mac(0) and not body[2]["enrolled"]
    found, sizes = every_page(client, "/api/v1/machines")
    assert sizes == [100, 100, 52]
    macs = [m["mac"] for m in found]
    assert macs == [C1, C2, *[storm_mac(n) for n in range(250)]]  # each once, in order
    # Pages of a size that ends exactly after the enrolled ones, and of the largest size.
    assert every_page(client, "/api/v1/machines?limit=2")[1][:2] == [2, 2]
    assert [m["mac"] for m in every_page(client, "/api/v1/machines?limit=2")[0]] == macs
    assert every_page(client, "/api/v1/machines?limit=500")[1] == [252]


def test_machines_are_filtered(api: tuple[AsgiClient, Inventory]) -> None:
    client, _ = api
    enrolled = client.get("/api/v1/machines?enrolled=true")
    assert [m["name"] for m in enrolled.json()] == ["c1", "c2"]
    assert enrolled.headers["x-total-count"] == "2" and "link" not in enrolled.headers
    up, _ = every_page(client, "/api/v1/machines?state=up")
    assert [m["mac"] for m in up] == [C1, storm_mac(5)]
    found, sizes = every_page(client, "/api/v1/machines?enrolled=false&state=booting&limit=60")
    assert sizes == [60, 60, 60, 60, 9] and all(m["state"] == "booting" for m in found)
    discovered = client.get("/api/v1/machines?enrolled=false&limit=1")
    assert discovered.headers["x-total-count"] == "250"
    link = discovered.headers["link"]
    assert (
        link.startswith("</api/v1/machines?enrolled=false&limit=1&cursor=") and 'rel="next"' in link
    )
    both = client.get("/api/v1/machines?state=enrolled,up&enrolled=true")
    assert [m["state"] for m in both.json()] == ["up", "enrolled"]  # c1 is up, c2 enrolled
    # One machine by name or MAC without a walk of the list, as before.
    assert client.get(f"/api/v1/machines/{storm_mac(5).upper()}").json()["state"] == "up"
    assert client.get("/api/v1/machines/c2").json()["mac"] == C2
    assert client.get("/api/v1/machines/c9").status_code == 404


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("limit=abc", ("limit", "'abc'", "500")),
        ("limit=0", ("limit", "'0'")),
        ("limit=501", ("limit", "'501'")),
        ("limit=-5", ("limit", "'-5'")),
        ("limit=" + "9" * 5000, ("limit", "999...")),
        ("state=dancing", ("state", "'dancing'", "booting")),
        ("state=up,,joined", ("state",)),
        ("enrolled=maybe", ("enrolled", "'maybe'", "true or false")),
        ("cursor=abc", ("cursor", "'abc'", "Link")),
        ("cursor=d~1.5~nonsense", ("cursor",)),
    ],
)
def test_a_bad_listing_parameter_is_a_400_sentence(
    api: tuple[AsgiClient, Inventory], query: str, words: tuple[str, ...]
) -> None:
    client, _ = api
    answer = client.get(f"/api/v1/machines?{query}")
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    for word in words:
        assert word in error, (word, error)
    assert len(error) < 400


def test_the_openapi_document_and_metrics_know_the_pages(api: tuple[AsgiClient, Inventory]) -> None:
    client, inventory = api
    document = client.get("/api/v1/openapi.json").json()
    listing = document["paths"]["/api/v1/machines"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"state", "enrolled", "limit", "cursor"}
    assert {"Link", "X-Total-Count"} <= set(listing["responses"]["200"]["headers"])
    assert "400" in listing["responses"]
    from pixiebox.http.api import state_counts

    assert state_counts(inventory) == {
        MachineState.UP: 2, MachineState.ENROLLED: 1, MachineState.BOOTING: 249,
    }  # fmt: skip


def test_the_cli_client_follows_the_pages(api: tuple[AsgiClient, Inventory]) -> None:
    """`pixiebox machines` and `lab up` read every page (ApiClient.every_page): served here by
    a plain HTTP server that answers with the API's own pages and Link headers."""
    client, _ = api

    class Pages(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer = client.get(self.path)
            self.send_response(answer.status_code)
            for key in ("link", "content-type"):
                if key in answer.headers:
                    self.send_header(key, answer.headers[key])
            self.end_headers()
            self.wfile.write(answer.content)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cli = ApiClient(f"http://127.0.0.1:{server.server_address[1]}")
        every = cli.every_page("/api/v1/machines?limit=30")
        assert [m["mac"] for m in every][:3] == [C1, C2, storm_mac(0)] and len(every) == 252
        assert [m["name"] for m in cli.every_page("/api/v1/machines?enrolled=true&limit=1")] == [
            "c1", "c2",
        ]  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- the storm against the real agent

SUBNET = "10.87.0.0/24"
AGENT_IP = "10.87.0.2"
READER_IP = "10.87.0.9"
CAP = 200
STORM_SIZE = 20_000
#: DISCOVERs a second: what the agent answers in full on a busy 2-core machine, so that every
#: stranger is recorded and the cap is what keeps the inventory small (a storm faster than the
#: agent, where strangers are shed and enrolled machines answered first: test_dhcp_storm.py).
STORM_RATE = 500
UUID = bytes(range(16))
#: A PXE ROM tries a DISCOVER 4 times (PXE 2.1, 4, 8, 16, 32 s): the budget here is 4 tries of
#: 4 s each, the first timeout of a ROM's.
TRIES, TRY_SECONDS = 4, 4.0


def storm_lab(workdir: Path) -> str:
    text = lab_toml(
        mode="proxy", subnet=SUBNET, assets=workdir / "assets", state=workdir / "state",
        machines=[("c1", C1, None)],
    )  # fmt: skip
    text = text.replace("[boot]\n", f"[boot]\nmax_discovered = {CAP}\n")
    return text.replace("[http]", f'[api]\ntoken_file = "{workdir / "token"}"\n[http]')


def exchange(c1: netlab.Host) -> int:
    """c1's PXE DHCP exchange with the agent: the number of DISCOVERs it took (0: none
    answered within the budget)."""
    for attempt in range(1, TRIES + 1):
        replies = netlab.pxe_discover(c1, arch=0, uuid=UUID, timeout=TRY_SECONDS)
        if any(r.src_ip == AGENT_IP and r.message_type == netlab.DHCPOFFER for r in replies):
            return attempt
    return 0


def api_get(host: netlab.Host, path: str) -> tuple[dict[str, str], Any]:
    out = host.run(["curl", "-sS", "--max-time", "10", "-D", "-",
                    f"http://{AGENT_IP}:8080{path}"]).stdout  # fmt: skip
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    headers = {}
    for line in head.splitlines()[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return headers, json.loads(body)


def test_a_dhcp_storm_stays_within_the_cap_and_a_known_machine_still_gets_its_answer(
    netlab_require: Any, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl")
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    agent = start_agent(agent_host, storm_lab(workdir), workdir)
    c1 = segment.add_host("c1", mac=C1)
    stormer = segment.add_host("storm")
    reader = segment.add_host("reader", ip=f"{READER_IP}/24")
    assert exchange(c1) == 1  # the control: before the storm, at the first DISCOVER
    # Two readers poll the listing all through the storm (bounded: 150 s at most).
    polls = [workdir / "reader-0.txt", workdir / "reader-1.txt"]
    readers = [
        reader.popen(["timeout", "150", "bash", "-c", "while :; do curl -s -o /dev/null -w "
                      f"'%{{http_code}} %{{time_total}}\\n' 'http://{AGENT_IP}:8080{path}' "
                      f">> {out}; done"], workdir / f"reader-{n}.log")
        for n, (path, out) in enumerate(zip(("/api/v1/machines", "/api/v1/machines?limit=500"),
                                            polls, strict=True))
    ]  # fmt: skip
    storm_out = workdir / "storm.json"
    storm = stormer.popen([sys.executable, str(STORM), "--iface", stormer.iface, "--count",
                           str(STORM_SIZE), "--rate", str(STORM_RATE), "--max-seconds", "90",
                           "--seed", "13"], storm_out)  # fmt: skip
    try:
        # Under way once the cap makes room: then c1 asks, again and again until it ends.
        netlab.wait_until(lambda: any(e["kind"] == "machine.forgotten"
                                      for e in api_get(reader, "/api/v1/lab/events")[1]),
                          30, 0.5, "the storm never reached the cap")  # fmt: skip
        during: list[int] = []
        while storm.poll() is None and len(during) < 4:
            during.append(exchange(c1))
        assert storm.wait(90) == 0
    finally:
        for proc in readers:
            segment.stop(proc)
        segment.stop(storm)
    result = json.loads(storm_out.read_text().strip().splitlines()[-1])
    answered = [line.split() for p in polls for line in p.read_text().splitlines()]
    took = sorted(float(t) for _, t in answered) or [0.0]
    print(
        f"storm {result}; c1's DISCOVERs per exchange during it: {during}; {len(answered)} "
        f"listings, median {took[len(took) // 2]:.3f} s, slowest {took[-1]:.3f} s"
    )
    assert result["sent"] == STORM_SIZE and result["offers"] > CAP * 10, result
    assert during and all(1 <= tries <= TRIES for tries in during), during
    assert len(answered) > 20 and all(code == "200" for code, _ in answered), answered[:5]
    # The cap held: the inventory the API lists, and the store under it.
    headers, page = api_get(reader, "/api/v1/machines?enrolled=false&limit=500")
    assert int(headers["x-total-count"]) == len(page) <= CAP, headers
    assert agent.proc.poll() is None
    store = sqlite3.connect(f"file:{workdir / 'state' / 'pixiebox.db'}?mode=ro", uri=True)
    try:
        (machines,), (logs,) = store.execute(
            "SELECT count(*) FROM machines UNION ALL SELECT count(DISTINCT mac) FROM events"
        ).fetchall()
    finally:
        store.close()
    assert machines <= CAP + 1 and logs <= CAP + 2, (machines, logs)  # + c1, + the lab's log
    forgotten = [e for e in api_get(reader, "/api/v1/lab/events")[1]
                 if e["kind"] == "machine.forgotten"]  # fmt: skip
    assert 1 <= len(forgotten) <= 3, forgotten  # once a minute, not once a MAC
    assert exchange(c1) == 1  # and afterwards at once again
