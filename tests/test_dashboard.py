"""Issue 14: the dashboard's skeleton, served by the API app at `/` and `/ui/{file}` from the files
in the package. Driven in-process (no namespace, no browser: the browser tests are elsewhere):
the headers that keep the page from running or loading anything it did not ship, the fixed list
of files, and the contract the page's script relies on (event names, the event's MAC, the Link
header of the machine listing)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from importlib import resources
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from fuzzing import Answer, AsgiClient
from pixiebox.config import LabConfig
from pixiebox.core.inventory import Inventory
from pixiebox.events import Kind
from pixiebox.http.api import ApiState, api_app
from pixiebox.http.dashboard import FILES
from pixiebox.store.state import StateStore

C1 = "02:00:00:00:14:31"
C2 = "02:00:00:00:14:32"
STRANGER = "02:00:00:00:14:99"
UI = Path(str(resources.files("pixiebox.http").joinpath("ui")))
TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}


def refuse_enroll(mac: str, name: str | None, ip: IPv4Address | None) -> str:
    raise AssertionError(f"the dashboard enrolled {mac}")


@dataclass
class Dashboard:
    client: AsgiClient
    app: Any
    inventory: Inventory

    def get(self, path: str, query: str = "", headers: dict[str, str] | None = None) -> Answer:
        return self.client.request(self.app, "GET", path, query, headers)


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[Dashboard]:
    config = LabConfig.model_validate({"machines": [
        {"name": "c1", "mac": C1, "ip": "10.0.0.31"},
        {"name": "c2", "mac": C2, "ip": "10.0.0.32"},
    ]})  # fmt: skip
    store = StateStore(tmp_path / "state")
    try:
        inventory = Inventory(config, store)
        app = api_app(ApiState(inventory=inventory, token="t", enroll=refuse_enroll))
        with asyncio.Runner() as runner:
            yield Dashboard(AsgiClient(runner), app, inventory)
    finally:
        store.close()


class Page(HTMLParser):
    """What the page loads (src/href) and anything that would run inline."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[str] = []
        self.inline: list[str] = []
        self.kinds = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        for name in ("src", "href"):
            if name in values:
                self.references.append(values[name])
        self.inline += [f"{tag} {name}" for name in values if name.startswith("on")]
        if "style" in values:
            self.inline.append(f"{tag} style=")
        if tag == "style":
            self.inline.append("<style>")
        if tag == "html":
            self.kinds = values.get("data-kinds", "")
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(f"<script>{data.strip()[:40]}")


def page_of(dashboard: Dashboard) -> tuple[Answer, Page]:
    answer = dashboard.get("/")
    page = Page()
    page.feed(answer.body.decode())
    return answer, page


def test_the_page_is_served_with_a_policy_that_allows_only_its_own_files(
    dashboard: Dashboard,
) -> None:
    answer, page = page_of(dashboard)
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/html")
    policy = answer.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "frame-ancestors 'none'" in policy
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert page.inline == [], "the policy forbids inline script and style: it would not run"
    assert page.references, "the page loads its script and style"


#: `import ... from "/ui/api.js"` in a module (no build step: the browser follows these).
IMPORT = re.compile(r'(?m)^\s*(?:import|export)\b[^;]*?\bfrom\s+"([^"]+)"|^\s*import\s+"([^"]+)"')


def modules_loaded(first: set[str]) -> set[str]:
    """The files the page loads: its own references, then every module's imports, transitively."""
    loaded: set[str] = set()
    todo = list(first)
    while todo:
        name = todo.pop()
        if name in loaded:
            continue
        loaded.add(name)
        if name.endswith(".js"):
            for match in IMPORT.finditer((UI / name).read_text()):
                target = match.group(1) or match.group(2)
                assert target.startswith("/ui/"), f"{name} imports {target!r}: only /ui/ is served"
                todo.append(target.removeprefix("/ui/"))
    return loaded


def test_every_file_the_page_references_is_served_with_its_type(dashboard: Dashboard) -> None:
    _, page = page_of(dashboard)
    fetched = {ref.removeprefix("/ui/") for ref in page.references if not ref.startswith("#")}
    referenced = modules_loaded(fetched)
    assert referenced == set(FILES) - {"index.html"}, "the page loads what ships, nothing else"
    for name in FILES:
        answer = dashboard.get(f"/ui/{name}")
        assert answer.status == 200, name
        assert answer.headers["content-type"].startswith(TYPES[Path(name).suffix]), name
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.body == (UI / name).read_bytes() or name == "index.html"
        etag = answer.headers["etag"]
        again = dashboard.get(f"/ui/{name}", headers={"If-None-Match": etag})
        assert (again.status, again.body) == (304, b""), name
        changed = dashboard.get(f"/ui/{name}", headers={"If-None-Match": '"other"'})
        assert changed.status == 200, name


@pytest.mark.parametrize("path", [
    "/ui/../x", "/ui/%2e%2e/api.py", "/ui/..%2fapi.py", "/ui/dashboard.py", "/ui/__init__.py",
    "/ui/", "/ui/APP.JS", "/ui/app.js/", "/ui/app.js.map", "/ui/./app.js", "/ui//etc/passwd",
    "/index.html", "/app.js",
])  # fmt: skip
def test_only_the_shipped_files_are_served(dashboard: Dashboard, path: str) -> None:
    answer = dashboard.get(path)
    if answer.status == 307:  # Starlette's trailing-slash redirect, to a shipped file only
        assert answer.headers["location"].endswith(path.rstrip("/")), path
        assert path.rstrip("/").removeprefix("/ui/") in FILES, path
        return
    assert answer.status == 404, f"{path}: {answer.status} {answer.body[:80]!r}"
    assert b"<" not in answer.body and b"import" not in answer.body


def test_nothing_refers_to_another_host() -> None:
    """The appliance's LAN may have no internet, and the page must not tell a third party who
    looks at the lab: no URL with a scheme or a protocol-relative one, in any shipped file."""
    outside = re.compile(r"(?i)(?:[a-z][a-z0-9+.-]*:)?//[a-z0-9.-]|url\(\s*['\"]?(?!/|#)")
    for name in FILES:
        text = (UI / name).read_text()
        code = re.sub(r"(?m)^\s*//.*$", "", text)  # a JS comment line is no reference
        # SVG's namespace is a name (createElementNS, xmlns), not a fetch.
        code = code.replace('xmlns="http://www.w3.org/2000/svg"', "")
        code = code.replace('"http://www.w3.org/2000/svg"', "")
        found = outside.findall(code)
        assert not found, f"{name} refers outside the agent: {found}"


def test_the_page_knows_every_event_kind_the_stream_names(dashboard: Dashboard) -> None:
    """An EventSource delivers `event: dhcp.offer` only to a listener for that name: the page
    listens for the kinds in its data-kinds, which must be all of them."""
    _, page = page_of(dashboard)
    assert set(page.kinds.split()) == {kind.value for kind in Kind}


def test_a_new_machine_reaches_the_page_as_an_event_then_its_row(dashboard: Dashboard) -> None:
    """What the script does on an event: read `mac` from its data, then GET the machine."""
    _, page = page_of(dashboard)
    inventory = dashboard.inventory
    inventory.record(C1, Kind.MACHINE_ENROLLED, "enrolled", fields={"name": "c1"})
    before = inventory.lifecycle.events(C1)[-1].id
    assert inventory.seen(STRANGER, None)
    # As the browser reconnects: Last-Event-ID replays what came after it.
    stream = dashboard.get("/api/v1/events", headers={"Last-Event-ID": str(before)})
    assert stream.headers["content-type"].startswith("text/event-stream")
    frame = dict(line.split(": ", 1) for line in stream.body.decode().splitlines() if ": " in line)
    assert frame["event"] in page.kinds.split()
    mac = json.loads(frame["data"])["mac"]
    assert mac == STRANGER
    row = json.loads(dashboard.get(f"/api/v1/machines/{mac}").body)
    assert (row["state"], row["name"], row["enrolled"]) == ("discovered", None, False)
    forgotten = dashboard.get("/api/v1/machines/02:00:00:00:14:98")
    assert forgotten.status == 404, "the script drops a row whose machine answers 404"


def test_the_listing_pages_as_the_script_follows_them(dashboard: Dashboard) -> None:
    """api.js reads the next page from Link: <url>; rel="next" and stops without one."""
    script = (UI / "api.js").read_text()
    pattern = re.search(r"part\.match\(/(.+)/\)", script)
    assert pattern is not None
    follow = re.compile(pattern.group(1).replace("\\/", "/"))
    seen: list[str] = []
    url = "/api/v1/machines?limit=1"
    while url:
        path, _, query = url.partition("?")
        answer = dashboard.get(path, query)
        seen += [view["mac"] for view in json.loads(answer.body)]
        link = answer.headers.get("link", "")
        match = follow.search(link)
        url = match.group(1) if match else ""
    assert seen == [C1, C2]


@pytest.mark.parametrize("name", [name for name in FILES if name.endswith(".js")])
def test_the_script_is_valid_javascript(tmp_path: Path, name: str) -> None:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    module = tmp_path / f"{name[:-3]}.mjs"  # the page loads it as a module: check it as one
    module.write_bytes((UI / name).read_bytes())
    checked = subprocess.run([node, "--check", str(module)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


#: What would turn text from the network into markup or code, or need 'unsafe-inline'.
UNSAFE = re.compile(
    r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|"
    r"setAttribute\(\s*[\"'](?:style|on\w+)[\"']|\.on\w+\s*=|javascript:"
)


def test_the_scripts_build_the_page_from_text_only() -> None:
    """A machine name or syslog line is shown with textContent: never parsed as markup. No
    inline style attribute either (the policy would block it: a class does the work)."""
    for name in FILES:
        if name.endswith(".js"):
            code = re.sub(r"(?m)^\s*//.*$", "", (UI / name).read_text())
            assert not UNSAFE.findall(code), f"{name}: {UNSAFE.findall(code)}"


def test_every_action_carries_the_csrf_header_and_same_origin_cookie() -> None:
    """contract §1: the agent takes a session cookie only with X-Pixiebox-CSRF: 1; the page's one
    sender of POST and DELETE (api.js send) adds it, and no other module calls fetch."""
    api = (UI / "api.js").read_text()
    assert '"X-Pixiebox-CSRF": "1"' in api and 'credentials: "same-origin"' in api
    for name in FILES:
        if name.endswith(".js") and name != "api.js":
            assert "fetch(" not in (UI / name).read_text(), f"{name} fetches outside api.js"


#: The selectors the browser tests (and the README's screenshots) rely on: contract §3.
SELECTORS = {
    "nav": ['href="#/"', 'href="#/lab"', 'href="#/settings"', 'id="live"'],
    "sign-in": ['button id="signin"', 'button id="signout"', 'form id="signin-form"',
                'name="token" type="password"', 'id="signin-error" class="error" role="alert"'],
    "machines": ['tbody id="rows"', 'form id="enroll-form"', 'input name="name"',
                 'input name="ip"', 'id="enroll-problems"'],
    "machine": ['id="machine-title"', 'ol id="stagebar"', 'id="verdict"', 'ol id="events"',
                'button id="older"', 'data-power="on"', 'data-power="off"', 'data-power="cycle"',
                'id="power-outcome"', 'dl id="given"'],
    "lab": ['button id="lab-up"', 'button id="lab-down"', 'id="lab-outcome"', 'id="timeline"',
            'id="all-up"', 'id="boot-times"'],
    "settings": ['pre id="labtoml"', 'ul id="findings"', 'id="findings-ok"'],
}  # fmt: skip


@pytest.mark.parametrize("view", SELECTORS)
def test_the_page_has_the_contracted_selectors(view: str) -> None:
    page = (UI / "index.html").read_text()
    missing = [selector for selector in SELECTORS[view] if selector not in page]
    assert missing == [], f"the {view} view lacks {missing}"


def test_the_package_ships_the_files() -> None:
    """setuptools includes only .py files unless told: pyproject's package-data names ui/."""
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert re.search(r'(?m)^pixiebox = \[[^\]]*"http/ui/\*"', pyproject)
    assert {path.name for path in UI.iterdir()} >= set(FILES)
