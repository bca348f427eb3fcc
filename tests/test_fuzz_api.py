"""Issue 13 items 6 and 7: the API's query parameters, headers and bodies, fuzzed (hypothesis).

The API app is driven in-process through ASGI, as uvicorn drives it (fuzzing.AsgiClient), with
`after`, `mac`, `boot_timeout`, `settle`, the paging and filter parameters, Last-Event-ID and
the JSON bodies of enroll, power and lab up/down drawn from values a client or a script gets
wrong. The rule (http.params): every request gets an answer below 500 (503: power control is
not configured here), and a 400 is a JSON sentence saying what was wrong.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any
from urllib.parse import quote

import pytest
from fuzzing import JSON_BODIES, Answer, AsgiClient, fuzz, latin1
from hypothesis import given
from hypothesis import strategies as st
from pixiebox.config import LabConfig
from pixiebox.core.inventory import Inventory
from pixiebox.events import Kind
from pixiebox.http.api import ApiState, api_app
from pixiebox.http.params import (
    MAX_EVENT_ID,
    bool_parameter,
    choices_parameter,
    count_parameter,
    event_id_parameter,
    mac_parameter,
)
from pixiebox.store.state import StateStore

C1 = "02:00:00:00:13:31"
TOKEN = "fuzz-token"


@dataclass
class Api:
    app: Any
    client: AsgiClient

    def request(self, *args: Any, **kwargs: Any) -> Answer:
        return self.client.request(self.app, *args, **kwargs)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The API of a lab with one machine and a few events (so `after` has something to skip)."""
    config = LabConfig.model_validate({"machines": [{"name": "c1", "mac": C1, "ip": "10.0.0.31"}]})
    store = StateStore(tmp_path_factory.mktemp("fuzz-api"))
    try:
        inventory = Inventory(config, store)
        for n in range(3):
            inventory.record(C1, Kind.MACHINE_ENROLLED, f"event {n}", fields={"name": "c1"})

        def enroll(mac: str, name: str | None, ip: IPv4Address | None) -> str:
            raise ValueError(f"enrollment is off in this test ({mac})")

        app = api_app(ApiState(inventory=inventory, token=TOKEN, enroll=enroll))
        with asyncio.Runner() as runner:
            yield Api(app, AsgiClient(runner))
    finally:
        store.close()


_ids = st.one_of(
    st.integers(0, 2**64).map(str),
    st.sampled_from(["", " ", "-1", "1.5", "abc", "0x1", "\u00b2", "9" * 5000, "1 2", "+1"]),
    st.text(max_size=12),
)
_api_params = st.sampled_from(
    ["after", "mac", "boot_timeout", "settle", "state", "enrolled", "limit", "cursor", "x"]
)
_api_values = st.one_of(
    _ids,
    st.sampled_from([C1, "c1", "nonsense", "10s", "nan", "inf", "1e300", "-0", "true", "FALSE"]),
    st.sampled_from(["up", "up,joined", "booting,", ",", "UP , off", "up," * 20]),
    st.sampled_from(["e~0", "e~999999999", "E~1", "e~-1", "d~1.5~" + C1, "d~1e999~" + C1]),
    st.sampled_from(["d~...~" + C1, "d~1~02:00:00:00:13", "d~" + "9" * 33 + "~" + C1]),
)


@st.composite
def api_requests(draw: st.DrawFn) -> tuple[str, str, str, dict[str, str], bytes]:
    key = draw(st.sampled_from(["c1", C1, "nobody", "%00", "c1/../c1"]))
    method, path = draw(
        st.sampled_from(
            [
                ("GET", "/api/v1/machines"),
                ("GET", f"/api/v1/machines/{key}"),
                ("GET", f"/api/v1/machines/{key}/events"),
                ("GET", f"/api/v1/machines/{key}/doctor"),
                ("GET", "/api/v1/lab/events"),
                ("GET", "/api/v1/events"),
                ("POST", f"/api/v1/machines/{key}/enroll"),
                ("POST", f"/api/v1/machines/{key}/power"),
                ("POST", "/api/v1/lab/up"),
                ("POST", "/api/v1/lab/down"),
            ]
        )
    )
    pairs = draw(st.lists(st.tuples(_api_params, _api_values), max_size=4))
    query = "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs)
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["authorization"] = f"Bearer {TOKEN}"
    if draw(st.integers(0, 3)) == 0:
        headers["last-event-id"] = latin1(draw(_ids))
    body = b""
    if method == "POST":
        body = draw(
            st.one_of(
                JSON_BODIES,
                st.fixed_dictionaries(
                    {},
                    optional={
                        "action": st.sampled_from(["on", "off", "cycle", "dance", 5]),
                        "name": st.one_of(st.text(max_size=10), st.integers()),
                        "ip": st.sampled_from(["10.53.0.40", "10.0.0", "::1", 3]),
                        "stagger": st.one_of(st.floats(), st.integers(), st.text(max_size=5)),
                        "timeout": st.one_of(st.floats(), st.integers(), st.text(max_size=5)),
                    },
                ).map(lambda d: json.dumps(d).encode()),
            )
        )
    return method, path, query, headers, body


@fuzz(400)
@given(api_requests())
def test_every_api_request_answers_below_500_and_a_400_says_why(
    api: Api, built: tuple[str, str, str, dict[str, str], bytes]
) -> None:
    method, path, query, headers, body = built
    answer = api.request(method, path, query, headers, body)
    if answer.status == 400:
        error = json.loads(answer.body)["error"]
        assert isinstance(error, str) and 10 < len(error) < 2000, error
        assert "Traceback" not in error


def _in_sentence(name: str, raw: str, exc: ValueError) -> None:
    """A refusal names the parameter and stays one short sentence however long the value."""
    text = str(exc)
    assert name in text and len(text) < 400 and "\n" not in text, (raw, text)


_raw = st.one_of(st.none(), _ids, _api_values, st.text(max_size=80))


@fuzz(500)
@given(_raw)
def test_each_parameter_reader_gives_a_value_in_range_or_a_sentence(raw: str | None) -> None:
    try:
        assert 0 <= event_id_parameter("after", raw) <= MAX_EVENT_ID
    except ValueError as exc:
        _in_sentence("after", raw or "", exc)
    try:
        mac = mac_parameter("mac", raw)
        assert mac is None or re.fullmatch(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}", mac), mac
    except ValueError as exc:
        _in_sentence("mac", raw or "", exc)
    try:
        assert 1 <= count_parameter("limit", raw, 100, 500) <= 500
    except ValueError as exc:
        _in_sentence("limit", raw or "", exc)
    try:
        assert bool_parameter("enrolled", raw) in (None, True, False)
    except ValueError as exc:
        _in_sentence("enrolled", raw or "", exc)
    try:
        chosen = choices_parameter("state", raw, ["up", "off", "joined"])
        assert chosen is None or (set(chosen) <= {"up", "off", "joined"} and len(chosen) <= 3)
    except ValueError as exc:
        _in_sentence("state", raw or "", exc)
