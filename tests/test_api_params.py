"""Issue 13: every bad query parameter, header or JSON body of the API answers 400 with one
sentence naming it, its value and what it may be; never a 500 with a traceback, never silently
read as a default. The API app is driven in-process (no namespace): these are its own checks,
the real agent's are in test_api.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from pixiebox.config import LabConfig
from pixiebox.core.inventory import Inventory
from pixiebox.events import Kind
from pixiebox.http.api import ApiState, api_app
from pixiebox.http.boot import arch_from_query
from pixiebox.http.params import MAX_EVENT_ID
from pixiebox.store.state import StateStore

C1 = "02:00:00:00:13:31"
STRANGER = "02:00:00:00:13:99"
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def refuse_enroll(mac: str, name: str | None, ip: IPv4Address | None) -> str:
    raise AssertionError(f"a bad request reached enroll({mac}, {name}, {ip})")


@dataclass
class Answer:
    status: int
    body: bytes

    def error(self) -> str:
        return str(json.loads(self.body)["error"])


class Client:
    """Drives the API app in-process through ASGI. Not starlette's TestClient: that one waits
    for the whole body, so an event stream wrongly accepted (`?after=abc` read as 0, as before
    issue 13) would hang the test instead of failing it. Here the client hangs up once the
    answer's first body chunk arrived, like a browser closing an EventSource."""

    def __init__(self, state: ApiState) -> None:
        self.app = api_app(state)

    def request(
        self, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Answer:
        path, _, query = target.partition("?")
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": query.encode(), "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080),
        }  # fmt: skip
        answer = Answer(0, b"")

        async def run() -> None:
            answered = asyncio.Event()
            sent = False

            async def receive() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await answered.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    answer.status = int(message["status"])
                elif message["type"] == "http.response.body":
                    answer.body += message.get("body", b"")
                    if answer.body or not message.get("more_body", False):
                        answered.set()

            await asyncio.wait_for(self.app(scope, receive, send), 10)

        try:
            asyncio.run(run())
        except Exception:
            # Starlette answers an exception with a 500, then raises it again for the server
            # to log: the 500 is what the client saw, and what the assertions check.
            if answer.status != 500:
                raise
        return answer


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    config = LabConfig.model_validate({"machines": [{"name": "c1", "mac": C1, "ip": "10.0.0.31"}]})
    store = StateStore(tmp_path)
    inventory = Inventory(config, store)
    for n in range(3):
        inventory.record(C1, Kind.MACHINE_ENROLLED, f"event {n}", fields={"name": "c1"})
    try:
        yield Client(ApiState(inventory=inventory, token=TOKEN, enroll=refuse_enroll))
    finally:
        store.close()


HUGE = "1" + "0" * 30  # 10**30: an int() takes it, SQLite does not
LONG = "9" * 5000  # past CPython's int() digit limit

#: (method, path, headers, body, words the sentence must contain).
BAD: list[tuple[str, str, dict[str, str], str | None, tuple[str, ...]]] = [
    ("GET", f"/api/v1/machines/{C1}/events?after=abc", {}, None, ("after", "'abc'")),
    ("GET", f"/api/v1/machines/{C1}/events?after=-1", {}, None, ("after", "'-1'")),
    ("GET", f"/api/v1/machines/c1/events?after={HUGE}", {}, None, ("after", HUGE)),
    ("GET", f"/api/v1/machines/c1/events?after={LONG}", {}, None, ("after", "999...")),
    ("GET", "/api/v1/machines/c1/events?after=1.5", {}, None, ("after", "'1.5'")),
    ("GET", "/api/v1/machines/c1/events?after=%C2%B2", {}, None, ("after", "'²'")),
    ("GET", "/api/v1/lab/events?after=abc", {}, None, ("after", "'abc'")),
    ("GET", f"/api/v1/lab/events?after={MAX_EVENT_ID + 1}", {}, None, ("after",)),
    ("GET", "/api/v1/events?after=abc", {}, None, ("after", "'abc'")),
    ("GET", "/api/v1/events?after=-5", {}, None, ("after", "'-5'")),
    ("GET", "/api/v1/events", {"Last-Event-ID": "x1"}, None, ("Last-Event-ID", "'x1'")),
    ("GET", "/api/v1/events", {"Last-Event-ID": HUGE}, None, ("Last-Event-ID", HUGE)),
    ("GET", "/api/v1/events?mac=nonsense", {}, None, ("mac", "'nonsense'", "MAC")),
    ("GET", "/api/v1/machines/c1/doctor?boot_timeout=soon", {}, None, ("boot_timeout", "soon")),
    ("GET", "/api/v1/machines/c1/doctor?boot_timeout=-1", {}, None, ("boot_timeout", "'-1'")),
    ("GET", "/api/v1/machines/c1/doctor?settle=nan", {}, None, ("settle", "nan")),
    ("GET", "/api/v1/machines/c1/doctor?settle=1e300", {}, None, ("settle", "1e300")),
    ("POST", "/api/v1/machines/c1/power", AUTH, '{"action": "dance"}', ("action", "dance", "on")),
    ("POST", "/api/v1/machines/c1/power", AUTH, "{}", ("action",)),
    ("POST", "/api/v1/machines/c1/power", AUTH, "on", ("not JSON", "action")),
    ("POST", "/api/v1/machines/c1/power", AUTH, '{"action": "on", "x": 1}', ("'x'",)),
    ("POST", "/api/v1/machines/c1/power", AUTH, '["on"]', ("object", "['on']")),
    ("POST", f"/api/v1/machines/{STRANGER}/enroll", AUTH, '{"ip": "10.0.0"}', ("ip", "10.0.0")),
    ("POST", f"/api/v1/machines/{STRANGER}/enroll", AUTH, '{"name": 5}', ("name", "5")),
    ("POST", f"/api/v1/machines/{STRANGER}/enroll", AUTH, '{"nmae": "c3"}', ("'nmae'",)),
    ("POST", f"/api/v1/machines/{STRANGER}/enroll", AUTH, "[" * 100_000, ("not JSON",)),
    ("POST", "/api/v1/machines/01:00:5e:00:00:01/enroll", AUTH, None, ("01:00:5e:00:00:01",)),
    ("POST", "/api/v1/lab/up", AUTH, '{"stagger": -1}', ("stagger", "-1", "greater")),
    ("POST", "/api/v1/lab/up", AUTH, '{"timeout": 1e400}', ("timeout", "inf", "less")),
    ("POST", "/api/v1/lab/down", AUTH, '{"timeout": "soon"}', ("timeout", "soon")),
    ("POST", "/api/v1/lab/down", AUTH, "\udcff", ("not JSON",)),  # the byte 0xff
]


def case_id(case: tuple[str, str, dict[str, str], str | None, tuple[str, ...]]) -> str:
    method, path, headers, body, _ = case
    extra = headers.get("Last-Event-ID") or (body or "")
    return f"{method} {path.removeprefix('/api/v1')} {extra}"[:70].strip()


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "words"), BAD, ids=[case_id(case) for case in BAD]
)
def test_a_bad_parameter_is_a_400_that_names_it(
    client: Client,
    method: str,
    path: str,
    headers: dict[str, str],
    body: str | None,
    words: tuple[str, ...],
) -> None:
    answer = client.request(method, path, headers, (body or "").encode("utf-8", "surrogateescape"))
    assert answer.status == 400, answer.body[:2000]
    error = answer.error()
    for word in words:
        assert word in error, (word, error)
    assert b"Traceback" not in answer.body
    assert len(error) < 400, error  # one sentence, not an echo of the value


def test_good_parameters_are_still_read(client: Client) -> None:
    """The control: the same endpoints with good values answer, and `after` filters."""
    everything = client.request("GET", f"/api/v1/machines/{C1}/events")
    events = json.loads(everything.body)
    assert [e["message"] for e in events] == ["event 0", "event 1", "event 2"]
    for after in ("", "0", "%200", str(MAX_EVENT_ID)):
        answer = client.request("GET", f"/api/v1/machines/c1/events?after={after}")
        assert answer.status == 200, (after, answer.body)
    later = client.request("GET", f"/api/v1/machines/c1/events?after={events[0]['id']}")
    assert [e["message"] for e in json.loads(later.body)] == ["event 1", "event 2"]
    assert json.loads(client.request("GET", "/api/v1/lab/events?after=0").body) == []
    doctor = client.request("GET", "/api/v1/machines/c1/doctor?boot_timeout=60&settle=0")
    assert doctor.status == 200, doctor.body
    # The stream replays the events after Last-Event-ID (the header wins over ?after=).
    stream = client.request(
        "GET", f"/api/v1/events?mac={C1.upper()}&after=0", {"Last-Event-ID": str(events[1]["id"])}
    )
    assert stream.status == 200 and stream.body.startswith(b"id: "), stream.body
    assert b"event 2" in stream.body and b"event 1" not in stream.body, stream.body
    # Past the body's checks, the lab calls find no power control in this agent.
    no_power = client.request("POST", "/api/v1/lab/up", AUTH, b'{"stagger": 0}')
    assert no_power.status == 503, no_power.body


@pytest.mark.parametrize("arch", ["²", "٣", "9" * 5000, "-1", "99999"])
def test_a_strange_boot_arch_is_unknown_not_an_exception(arch: str) -> None:
    """/boot/<mac>.ipxe?arch=: iPXE sends ${buildarch} or an option-93 code; anything else is
    an unknown architecture (the script falls back to the default), never a 500."""
    assert arch_from_query(arch, "efi") is None
