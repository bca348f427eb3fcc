"""Issue 14: the API behind the dashboard. Signing in with the API token (an HttpOnly,
SameSite=Strict session cookie; the CSRF rule for actions; sign-out revokes; a rate limit and an
api.refused event for refusals), and the read endpoints the pages draw: a machine's events a
page at a time, its boots as stage bars, what it was given (no secret value), the lab's
timeline, the enroll form's suggestion and the settings page.

Driven in-process like tests/test_dashboard.py (the ASGI app on one event loop, events recorded
through the inventory as the servers record them), except the enroll suggestion, which needs the
agent's own enroll path: a real agent in a namespace, as in tests/test_api.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import netlab
import pytest
from agentproc import lab_toml, start_agent
from fuzzing import Answer, AsgiClient
from pixiebox.config import load_config
from pixiebox.core.inventory import Inventory
from pixiebox.events import Kind, fields_of
from pixiebox.http.api import ApiState, api_app
from pixiebox.http.api_settings import LabText, hide_secrets
from pixiebox.store.identity import IdentityStore
from pixiebox.store.state import StateStore

C1 = "02:00:00:00:14:41"
C2 = "02:00:00:00:14:42"
STRANGER = "02:00:00:00:14:99"
TOKEN = "the-right-token-0123456789abcdefghijklmnop"
BMC_PASSWORD = "hunter2-bmc"
ORIGIN = "http://10.53.0.2"  # the AsgiClient's server address, as the browser's Origin
LAB = f"""# the lab (a comment keeps its line)
[lab]
name = "dash"

[network]
interface = "eth0"
subnet = "10.0.0.0/24"
dhcp_mode = "reservation"
gateway = "10.0.0.1"

[api]
token_file = "/srv/dash/api-token"

[[machines]]
name = "c1"
mac = "{C1}"
ip = "10.0.0.31"
power = {{ driver = "redfish", url = "https://bmc1", username = "a", password = "{BMC_PASSWORD}" }}

[[machines]]
name = "c2"
mac = "{C2}"
ip = "10.0.0.32"
"""


@dataclass
class Api:
    client: AsgiClient
    app: Any
    inventory: Inventory
    config: Path
    enrolled: list[str] = field(default_factory=list)

    def call(
        self,
        method: str,
        path: str,
        query: str = "",
        headers: dict[str, str] | None = None,
        body: Any = None,
    ) -> Answer:
        data = b"" if body is None else json.dumps(body).encode()
        return self.client.request(self.app, method, path, query, headers, data)

    def json(self, path: str, query: str = "") -> Any:
        answer = self.call("GET", path, query)
        assert answer.status == 200, answer.body
        return json.loads(answer.body)

    def sign_in(self, token: str = TOKEN) -> Answer:
        return self.call("POST", "/api/v1/session", body={"token": token})

    def kinds(self, mac: str) -> list[str]:
        return [e.kind for e in self.inventory.lifecycle.events(mac)]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    path = tmp_path / "lab.toml"
    path.write_text(LAB)
    config = load_config(path)
    loaded = LabText(path, LAB, time.time())
    store = StateStore(tmp_path / "state")
    try:
        inventory = Inventory(config, store)
        enrolled: list[str] = []

        def enroll(mac: str, name: str | None, ip: IPv4Address | None) -> str:
            enrolled.append(mac)
            raise ValueError("refused by the test")

        state = ApiState(inventory=inventory, token=TOKEN, enroll=enroll,
                         lab_text=lambda: loaded, server_ip=IPv4Address("10.0.0.2"))  # fmt: skip
        with asyncio.Runner() as runner:
            yield Api(AsgiClient(runner), api_app(state), inventory, path, enrolled)
    finally:
        store.close()


def cookie_of(answer: Answer) -> str:
    match = re.match(r"pixiebox_session=([^;]*);", answer.headers["set-cookie"])
    assert match is not None, answer.headers
    return match.group(1)


def browser(value: str, *, csrf: bool = True, origin: str | None = ORIGIN) -> dict[str, str]:
    """The headers the dashboard's page sends with an action."""
    headers = {"cookie": f"pixiebox_session={value}", "host": "10.53.0.2"}
    if csrf:
        headers["x-pixiebox-csrf"] = "1"
    if origin is not None:
        headers["origin"] = origin
    return headers


def power_on(api: Api, headers: dict[str, str]) -> Answer:
    """An action: with no power control in this lab, an authorized one answers 503."""
    return api.call("POST", "/api/v1/machines/c1/power", headers=headers, body={"action": "on"})


# --- signing in -------------------------------------------------------------------------------


def test_the_right_token_signs_in_with_a_strict_http_only_cookie(api: Api) -> None:
    assert api.json("/api/v1/session") == {"signed_in": False}
    answer = api.sign_in()
    assert answer.status == 200 and json.loads(answer.body) == {"signed_in": True}
    attributes = [part.strip() for part in answer.headers["set-cookie"].split(";")]
    value = cookie_of(answer)
    assert len(value) >= 40 and TOKEN not in answer.headers["set-cookie"]
    assert {"HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=604800"} <= set(attributes)
    status = api.call("GET", "/api/v1/session", headers={"cookie": f"pixiebox_session={value}"})
    assert json.loads(status.body) == {"signed_in": True}
    # The signed-in browser's action, with the CSRF header, from its own origin, is authorized.
    assert power_on(api, browser(value)).status == 503


def test_a_wrong_token_is_refused_with_a_sentence_no_cookie_and_an_event(api: Api) -> None:
    for wrong in ("not-the-token", "", TOKEN[:-1]):
        answer = api.sign_in(wrong)
        assert answer.status == 401 and "set-cookie" not in answer.headers
        body = json.loads(answer.body)
        assert "not this agent's API token" in body["error"] and "[api] token_file" in body["error"]
        # The configured file, not the default: the user reads the path they must open.
        assert "/srv/dash/api-token" in body["error"]
        assert body["problems"] == []
    refusals = [e for e in api.inventory.lifecycle.events("") if e.kind == Kind.API_REFUSED]
    assert refusals, "the refusal is in the lab's log"
    assert refusals[0].fields == {"source": "10.53.0.77", "reason": "wrong-token"}
    assert set(refusals[0].fields) <= set(fields_of(Kind.API_REFUSED))
    assert TOKEN not in json.dumps([e.message for e in refusals])
    # A wrong bearer token on an action is refused and recorded too.
    assert power_on(api, {"authorization": "Bearer nope"}).status == 401
    reasons = [e.fields["reason"] for e in api.inventory.lifecycle.events("")]
    assert "bad-bearer" in reasons


def test_a_cookie_without_the_csrf_header_or_from_another_origin_changes_nothing(
    api: Api,
) -> None:
    value = cookie_of(api.sign_in())
    before = api.config.read_text()
    url = f"/api/v1/machines/{STRANGER}/enroll"
    assert api.inventory.seen(STRANGER, None)
    for headers in (
        browser(value, csrf=False),  # a form another site posts: no custom header
        browser(value, origin="http://evil.example"),
        browser(value, origin="null"),
    ):
        answer = api.call("POST", url, headers=headers, body={})
        assert answer.status == 403, answer.body
        assert "X-Pixiebox-CSRF" in json.loads(answer.body)["error"]
        assert power_on(api, headers).status == 403
    assert api.enrolled == [] and api.config.read_text() == before
    assert Kind.MACHINE_ENROLLED not in api.kinds(STRANGER)
    reasons = [e.fields["reason"] for e in api.inventory.lifecycle.events("")]
    assert "csrf" in reasons
    # A browser that sends no Origin on a same-origin request is still served.
    assert power_on(api, browser(value, origin=None)).status == 503
    # And the enroll itself goes through with the header (the test's enroll refuses: 409).
    assert api.call("POST", url, headers=browser(value), body={}).status == 409
    assert api.enrolled == [STRANGER]


def test_sign_out_revokes_the_session_on_the_server(api: Api) -> None:
    value = cookie_of(api.sign_in())
    other = cookie_of(api.sign_in())  # a second browser
    # Signing out is an action: a foreign page cannot sign the owner out.
    refused = api.call("DELETE", "/api/v1/session", headers=browser(value, csrf=False))
    assert refused.status == 403
    assert power_on(api, browser(value)).status == 503
    answer = api.call("DELETE", "/api/v1/session", headers=browser(value))
    assert answer.status == 200 and json.loads(answer.body) == {"signed_in": False}
    assert cookie_of(answer) == "" and "Max-Age=0" in answer.headers["set-cookie"]
    # The old value no longer authorizes anything, even sent again by hand.
    assert power_on(api, browser(value)).status == 401
    status = api.call("GET", "/api/v1/session", headers={"cookie": f"pixiebox_session={value}"})
    assert json.loads(status.body) == {"signed_in": False}
    assert power_on(api, browser(other)).status == 503, "the other browser stays signed in"
    # Signing out again (a stale cookie) only clears it.
    assert api.call("DELETE", "/api/v1/session", headers=browser(value)).status == 200


def test_the_bearer_token_needs_no_csrf_header(api: Api) -> None:
    assert power_on(api, {"authorization": f"Bearer {TOKEN}"}).status == 503
    assert power_on(api, {}).status == 401
    no_credentials = json.loads(power_on(api, {}).body)["error"]
    assert no_credentials == (
        "this call changes the lab: send Authorization: Bearer <token> "
        "(the token is in [api] token_file)"
    )
    # A made-up cookie is no session.
    assert power_on(api, browser("made-up")).status == 401


def test_sign_in_attempts_are_rate_limited_per_source(api: Api) -> None:
    answers = [api.sign_in("guess") for _ in range(10)]
    assert {a.status for a in answers} == {401}
    limited = api.sign_in(TOKEN)  # even the right token, past the limit
    assert limited.status == 429 and "set-cookie" not in limited.headers
    assert "too many sign-in attempts from 10.53.0.77" in json.loads(limited.body)["error"]
    assert limited.headers["retry-after"] == "60"
    refusals = [e for e in api.inventory.lifecycle.events("") if e.kind == Kind.API_REFUSED]
    assert "rate-limited" in [e.fields["reason"] for e in refusals]
    # Refusals are recorded a few a minute per reason, not one per guess.
    assert sum(e.fields["reason"] == "wrong-token" for e in refusals) <= 5


# --- a machine's events, boots, what it was given ---------------------------------------------


def test_events_come_a_page_at_a_time_newest_page_first_each_page_ascending(api: Api) -> None:
    inventory = api.inventory
    for number in range(250):
        inventory.record(C1, Kind.SYSLOG, f"line {number}", fields={"app": "test"})
    ids = [e.id for e in inventory.lifecycle.events(C1, limit=1000)]
    assert len(ids) == 250
    seen: list[int] = []
    url = "/api/v1/machines/c1/events?limit=100"
    pages = 0
    while url:
        path, _, query = url.partition("?")
        answer = api.call("GET", path, query)
        assert answer.status == 200
        page = [e["id"] for e in json.loads(answer.body)]
        assert page == sorted(page), "each page in ascending order"
        assert not seen or page[-1] < seen[0], "each page older than the one before"
        seen = page + seen
        pages += 1
        link = answer.headers.get("link", "")
        match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
        url = match.group(1) if match else ""
        if match:
            assert url == f"/api/v1/machines/c1/events?before={page[0]}&limit=100"
    assert seen == ids and pages == 3
    # Paging with before= alone: pages of 100. Without limit or before, the newest 500 as
    # before pages existed (pixiebox events reads the body alone), with the Link.
    paged = [e["id"] for e in api.json(f"/api/v1/machines/{C1}/events", f"before={ids[-1]}")]
    assert paged == ids[-101:-1]
    unpaged = api.call("GET", f"/api/v1/machines/{C1}/events")
    assert [e["id"] for e in json.loads(unpaged.body)] == ids and "link" not in unpaged.headers
    middle = api.json("/api/v1/machines/c1/events", f"before={ids[10]}&limit=5")
    assert [e["id"] for e in middle] == ids[5:10]
    assert [e["id"] for e in api.json("/api/v1/machines/c1/events", f"after={ids[-3]}")] == (
        ids[-2:]
    )
    for bad in ("limit=0", "limit=501", "before=x"):
        assert api.call("GET", "/api/v1/machines/c1/events", bad).status == 400


def record_boot(
    inventory: Inventory, mac: str, *, fail_kernel: bool = False, up: bool = True
) -> None:
    """One PXE boot as the servers record it: firmware DHCP, iPXE over TFTP, iPXE's DHCP, its
    script, the kernel and initrd over HTTP, metadata, phone-home."""
    offer = {"mode": "reservation", "port": 67, "firmware": "BIOS", "arch": "x86_64"}
    script = f"http://10.0.0.2/boot/{mac}.ipxe"
    kernel, initrd = "/assets/osie/vmlinuz", "/assets/osie/initrd.img"
    steps: list[tuple[Kind, dict[str, Any]]] = [
        (Kind.DHCP_OFFER, {**offer, "ipxe": False, "boot_file": "undionly.kpxe"}),
        (Kind.TFTP_SENT, {"file": "undionly.kpxe", "bytes": 70_000, "seconds": 0.1}),
        (Kind.DHCP_OFFER, {**offer, "ipxe": True, "boot_file": script}),
        (Kind.HTTP_SCRIPT, {"file": f"/boot/{mac}.ipxe", "image": "osie",
                            "kernel": "osie/vmlinuz", "initrds": "osie/initrd.img"}),
    ]  # fmt: skip
    if fail_kernel:
        steps.append((Kind.HTTP_FAILED, {"file": kernel, "reason": "broken", "bytes": 1000}))
    else:
        steps += [
            (Kind.HTTP_KERNEL, {"file": kernel, "bytes": 12_000_000, "seconds": 0.5}),
            (Kind.HTTP_INITRD, {"file": initrd, "bytes": 40_000_000, "seconds": 1.5}),
            (Kind.METADATA_SENT, {"ip": "10.0.0.31", "secrets": "ssh-host-key,node-password"}),
        ]
        if up:
            steps += [(Kind.OS_UP, {"ip": "10.0.0.31"}), (Kind.OS_JOINED, {"ip": "10.0.0.31"})]
    for kind, fields in steps:
        assert set(fields) <= set(fields_of(kind)), kind
        inventory.record(mac, kind, f"{kind} (test)", fields=fields)


def test_boots_are_the_doctors_attempts_as_stage_bars(api: Api) -> None:
    inventory = api.inventory
    assert api.json("/api/v1/machines/c1/boots") == []
    record_boot(inventory, C1)
    record_boot(inventory, C1, fail_kernel=True)  # starts over from DHCP: a new attempt
    inventory.record(C1, Kind.DHCP_OFFER, "offered undionly.kpxe",
                     fields={"ipxe": False, "boot_file": "undionly.kpxe"})  # fmt: skip
    boots = api.json("/api/v1/machines/c1/boots")
    assert [b["outcome"] for b in boots] == ["joined", "failed", "booting"]
    first, second, third = boots
    assert [s["stage"] for s in first["stages"]] == [
        "dhcp", "loader", "script", "kernel", "initrd", "os", "up", "joined",
    ]  # fmt: skip
    sizes = {s["stage"]: s["bytes"] for s in first["stages"]}
    assert sizes == {"dhcp": None, "loader": 70_000, "script": None, "kernel": 12_000_000,
                     "initrd": 40_000_000, "os": None, "up": None, "joined": None}  # fmt: skip
    assert not any(s["failed"] for s in first["stages"])
    at = [s["at"] for s in first["stages"]]
    assert at == sorted(at) and first["started"] == at[0] and first["ended"] == at[-1]
    assert first["seconds_to_up"] is not None and 0 <= first["seconds_to_up"] < 60
    assert [(s["stage"], s["failed"]) for s in second["stages"]][-1] == ("kernel", True)
    assert second["ended"] is not None and second["seconds_to_up"] is None
    assert [s["stage"] for s in third["stages"]] == ["dhcp"] and third["ended"] is None
    assert third["started"] >= second["ended"] >= first["ended"]
    # limit: the last ones, oldest first.
    assert [b["outcome"] for b in api.json("/api/v1/machines/c1/boots", "limit=2")] == [
        "failed", "booting",
    ]  # fmt: skip
    assert api.call("GET", "/api/v1/machines/c1/boots", "limit=51").status == 400
    assert api.call("GET", f"/api/v1/machines/{STRANGER}/boots").status == 404


def test_given_names_the_secrets_and_when_never_their_values(api: Api, tmp_path: Path) -> None:
    identity = IdentityStore(tmp_path / "state" / "identity").for_machine(C1)
    record_boot(api.inventory, C1)
    answer = api.call("GET", "/api/v1/machines/c1/given")
    given = json.loads(answer.body)
    assert given["image"] == "osie" and given["kernel"] == "osie/vmlinuz"
    assert given["initrd"] == "osie/initrd.img"
    assert given["ip"] == "10.0.0.31" and given["gateway"] == "10.0.0.1"
    assert given["dns"] == ["10.0.0.2"]
    sent = next(e for e in api.inventory.lifecycle.events(C1) if e.kind == Kind.METADATA_SENT)
    assert given["secrets"] == [
        {"what": "ssh host key", "when": sent.time, "to": "10.0.0.31"},
        {"what": "node password", "when": sent.time, "to": "10.0.0.31"},
    ]
    body = answer.body.decode()
    for secret in (identity.ssh_host_key, identity.node_password):
        assert secret and secret.strip() not in body
    assert "PRIVATE KEY" not in body
    nothing = api.json("/api/v1/machines/c2/given")
    assert nothing["secrets"] == [] and nothing["kernel"] is None


def test_the_timeline_runs_from_the_first_power_on_to_the_last_up(api: Api) -> None:
    inventory = api.inventory
    empty = api.json("/api/v1/lab/timeline")
    assert empty["since"] is None and empty["all_up_seconds"] is None
    assert [(m["name"], m["boot"]) for m in empty["machines"]] == [("c1", None), ("c2", None)]
    power = {"driver": "redfish", "outcome": "sent"}
    inventory.record(C1, Kind.POWER_ON, "switched on", fields=power)
    record_boot(inventory, C1)
    alone = api.json("/api/v1/lab/timeline")
    assert alone["all_up_seconds"] is None, "c2 has not booted: the lab is not all up"
    assert [m["boot"] is None for m in alone["machines"]] == [False, True]
    inventory.record(C2, Kind.POWER_ON, "switched on", fields=power)
    record_boot(inventory, C2, up=False)
    halfway = api.json("/api/v1/lab/timeline")
    assert halfway["all_up_seconds"] is None, "c2 is not up yet"
    assert [m["boot"]["outcome"] for m in halfway["machines"]] == ["joined", "booting"]
    inventory.record(C2, Kind.OS_UP, "phoned home", fields={"ip": "10.0.0.32"})
    done = api.json("/api/v1/lab/timeline")
    events = inventory.lifecycle.events
    first_power = next(e for e in events(C1) if e.kind == Kind.POWER_ON).time
    last_up = next(e for e in events(C2) if e.kind == Kind.OS_UP).time
    assert done["since"] == first_power
    assert done["all_up_seconds"] == round(last_up - first_power, 1)
    assert [m["mac"] for m in done["machines"]] == [C1, C2]


# --- settings ----------------------------------------------------------------------------------


def test_settings_hide_the_bmc_password_and_keep_every_line(api: Api) -> None:
    settings = api.json("/api/v1/settings")
    assert settings["path"] == str(api.config) and settings["loaded_at"] > 0
    text = settings["text"]
    assert BMC_PASSWORD not in text and BMC_PASSWORD not in json.dumps(settings)
    shown, original = text.splitlines(), LAB.splitlines()
    assert len(shown) == len(original)
    changed = [n for n, (a, b) in enumerate(zip(shown, original, strict=True), 1) if a != b]
    power_line = next(n for n, line in enumerate(original, 1) if BMC_PASSWORD in line)
    assert changed == [power_line]
    assert 'password = "(hidden)"' in shown[power_line - 1]
    assert 'username = "a"' in shown[power_line - 1], "only the secret is hidden"
    assert settings["findings"] == []


def test_settings_show_check_findings_about_the_file_now_in_checks_words(api: Api) -> None:
    broken = LAB.replace('gateway = "10.0.0.1"', 'gateway = "10.0.0.1"\ninterfase = "eth1"')
    api.config.write_text(broken)
    settings = api.json("/api/v1/settings")
    assert BMC_PASSWORD not in settings["text"], "the text is the one loaded, secrets hidden"
    line = broken.splitlines().index('interfase = "eth1"') + 1
    [finding] = [f for f in settings["findings"] if f["key"] == "network.interfase"]
    assert finding["severity"] == "error" and finding["line"] == line
    command = [sys.executable, "-m", "pixiebox.cli", "check", "--config", str(api.config)]
    checked = subprocess.run(command, capture_output=True, text=True, timeout=60)
    said = checked.stdout + checked.stderr
    assert checked.returncode == 1
    assert f"{api.config}:{line}: error: network.interfase: {finding['message']}" in said, said
    assert f"hint: {finding['hint']}" in said


def test_the_openapi_document_names_the_new_endpoints(api: Api) -> None:
    document = api.json("/api/v1/openapi.json")
    paths = document["paths"]
    for path in ("/api/v1/session", "/api/v1/machines/{key}/boots", "/api/v1/machines/{key}/given",
                 "/api/v1/lab/timeline", "/api/v1/settings"):  # fmt: skip
        assert path in paths, path
    assert set(paths["/api/v1/session"]) == {"get", "post", "delete"}
    assert set(paths["/api/v1/machines/{mac}/enroll"]) == {"get", "post"}
    schemas = document["components"]["schemas"]
    assert {"BootView", "StageView", "GivenView", "TimelineView", "SettingsView"} <= set(schemas)
    assert "session" in document["components"]["securitySchemes"]


# --- the enroll suggestion, against a running agent --------------------------------------------

SUBNET, AGENT_IP = "10.84.0.0/24", "10.84.0.2"
C9 = "02:00:00:00:84:01"


def test_the_enroll_suggestion_is_what_an_empty_enroll_then_chooses(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl")  # type: ignore[operator]
    token_file = workdir / "api-token"
    text = lab_toml(mode="reservation", subnet=SUBNET, assets=workdir / "assets",
                    state=workdir / "state", machines=[("node1", C9, "10.84.0.1")])  # fmt: skip
    text = text.replace("[http]", f'[api]\ntoken_file = "{token_file}"\n[http]')
    agent = start_agent(segment.add_host("agent", ip=f"{AGENT_IP}/24"), text, workdir)
    host = agent.host
    stranger = segment.add_host("stranger", mac=STRANGER)
    netlab.pxe_discover(stranger, arch=0, uuid=bytes(range(16)))
    base = "http://127.0.0.1:8080/api/v1/machines"

    def curl(*args: str) -> tuple[int, Any]:
        out = host.run(["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", *args]).stdout
        body, _, status = out.rpartition("\n")
        return int(status), json.loads(body) if body else None

    before = agent.config.read_text()
    status, suggestion = curl(f"{base}/{STRANGER}/enroll")
    assert status == 200, suggestion
    assert suggestion == {"name": "node2", "ip": "10.84.0.3"}, "node1, .1, .2 (agent) taken"
    assert agent.config.read_text() == before, "a suggestion writes nothing"
    token = token_file.read_text().strip()
    status, enrolled = curl("-X", "POST", "-H", f"Authorization: Bearer {token}",
                            f"{base}/{STRANGER}/enroll")  # fmt: skip
    assert status == 201, enrolled
    assert (enrolled["name"], enrolled["ip"]) == (suggestion["name"], suggestion["ip"])
    assert f'name = "node2"\nmac = "{STRANGER}"\nip = "10.84.0.3"' in agent.config.read_text()
    status, refused = curl(f"{base}/{STRANGER}/enroll")
    assert status == 409 and "already enrolled as node2" in refused["error"]
    assert curl(f"{base}/02:00:00:00:84:77/enroll")[0] == 404
    assert curl(f"{base}/01:00:5e:00:00:01/enroll")[0] == 400


def test_every_secret_looking_value_is_hidden_on_its_own_lines() -> None:
    text = '''[api]
token_file = "/var/lib/pixiebox/api-token"
[[machines]]
name = "c3"
power = [
{ driver = "http", on = { url = "http://p/on", headers = { Authorization = "Bearer s3cr3t-a" } } },
{ driver = "ipmi", host = "bmc3", user = "ADMIN", password = """s3cr3t-b
continued""" },
]
note.url = "https://admin:s3cr3t-c@bmc4/redfish"
[telemetry]
token = 's3cr3t-d'
'''
    hidden = hide_secrets(text)
    assert "s3cr3t" not in hidden and hidden.count("(hidden)") == 4
    assert len(hidden.splitlines()) == len(text.splitlines())
    assert '/var/lib/pixiebox/api-token"' in hidden, "where a secret is kept is no secret"
    assert 'user = "ADMIN"' in hidden and '"http://p/on"' in hidden
    # Text the scanner cannot follow is hidden line by line.
    assert "s3cr3t" not in hide_secrets('password = "s3cr3t" = broken\n')
