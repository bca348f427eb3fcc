"""A machine's iPXE script fetched again at once (http.script_cache), in process: the boot app is
called as the server calls it, with the client's address, a real inventory and store, and the
neighbour table faked; boot events are recorded into the inventory as the agent does.

What is checked: the same answer (and token) and one event per boot step; and that no kept
script outlives what it was made from (lab.toml, the machine's record, its token, the window,
the client).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pixiebox.config import LabConfig
from pixiebox.core import inventory as inventory_module
from pixiebox.core.firmware import Assets
from pixiebox.core.inventory import Inventory
from pixiebox.core.urls import BootUrls
from pixiebox.events import Kind
from pixiebox.http.boot import BootEvent, BootHttpState, boot_app
from pixiebox.http.connlimit import FastAnswer, HttpLimits, LimitedState
from pixiebox.http.script_cache import REPEAT_WINDOW, ScriptCache
from pixiebox.http.server import PathsendProtocol
from pixiebox.store.state import StateStore
from starlette.applications import Starlette

MAC = "02:00:00:00:85:01"
IP = "10.85.0.31"
OTHER_MAC, OTHER_IP = "02:00:00:00:85:02", "10.85.0.32"
URLS = BootUrls(IPv4Address("10.85.0.2"))


def config(cmdline: str = "console=ttyS0") -> LabConfig:
    return LabConfig(
        network={"subnet": "10.85.0.0/24"},
        boot={"image": "osie"},
        images={
            "osie": {
                "kernel": "osie/vmlinuz",
                "initrd": ["osie/initrd"],
                "cmdline": cmdline,
                "arch": {"arm64": {"kernel": "osie-arm64/vmlinuz", "initrd": ["a/initrd"]}},
            }
        },
        machines=[{"name": "c1", "mac": MAC, "ip": IP}, {"name": "c2", "mac": OTHER_MAC}],
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Lab:
    inventory: Inventory
    app: Starlette
    scripts: ScriptCache
    clock: Clock
    #: The neighbour table: address → MAC.
    neighbours: dict[str, str]

    def get(self, path: str, client: str = IP) -> tuple[int, dict[bytes, bytes], str]:
        """(status, headers, body) of a GET of `path` from `client`, through the ASGI app."""
        raw, _, query = path.partition("?")
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": raw, "raw_path": raw.encode(),
            "query_string": query.encode(), "root_path": "", "headers": [],
            "client": (client, 40000), "server": ("10.85.0.2", 80),
        }  # fmt: skip
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        asyncio.run(self.app(scope, receive, send))
        start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
        return start["status"], dict(start["headers"]), body.decode()

    def script(self, path: str = f"/boot/{MAC}.ipxe", client: str = IP) -> str:
        status, _, body = self.get(path, client)
        assert status == 200, body
        return body

    def events(self, kind: Kind = Kind.HTTP_SCRIPT, mac: str = MAC) -> int:
        return sum(1 for e in self.inventory.lifecycle.events(mac) if e.kind == kind)


def token_of(script: str) -> str | None:
    found = re.search(r"pixiebox\.token=(\S+)", script)
    return found.group(1) if found else None


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    table = {IP: MAC, OTHER_IP: OTHER_MAC}
    monkeypatch.setattr(
        inventory_module, "neighbour_mac", lambda ip, device=None: table.get(str(ip))
    )
    store = StateStore(tmp_path / "state")
    inventory = Inventory(config(), store)

    def record(event: BootEvent) -> None:  # as the agent's http_recorder
        inventory.record(event.who, event.kind, event.message, None, event.fields)

    state = BootHttpState(inventory, URLS, Assets(tmp_path / "assets"), record)
    app = boot_app(state)
    scripts = app.state.scripts
    clock = Clock()
    scripts.clock = clock
    try:
        yield Lab(inventory, app, scripts, clock, table)
    finally:
        store.close()


def test_the_same_script_again_at_once_is_one_boot_step(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pixiebox.http")
    first = lab.script()
    token = token_of(first)
    assert token is not None
    assert lab.script() == first  # the same token: this boot's
    lab.clock.now += REPEAT_WINDOW - 1
    assert lab.script() == first
    assert lab.events() == 1
    assert caplog.text.count("fetched its iPXE script") == 1
    assert lab.inventory.tokens.check(MAC, token) is None
    # The server's protocol is handed the same bytes for the same request target.
    found = lab.scripts.answer(f"/boot/{MAC}.ipxe".encode(), IP)
    assert found is not None and found[1].decode() == first
    assert b"cache-control: no-store\r\n" in found[0]
    # Past the window it is a new step: a new token and its event.
    lab.clock.now += 2
    later = lab.script()
    assert token_of(later) not in (None, token)
    assert lab.events() == 2
    assert lab.inventory.tokens.check(MAC, token) is not None  # the older one is void


def test_a_lab_toml_reload_is_seen_at_once(lab: Lab) -> None:
    first = lab.script()
    assert "console=ttyS0" in first
    lab.inventory.reload(config("console=tty0 quiet"))
    second = lab.script()
    assert "console=tty0 quiet" in second and "console=ttyS0" not in second
    assert lab.events() == 2


def test_anything_recorded_for_the_machine_since_makes_it_a_new_step(lab: Lab) -> None:
    first = lab.script()
    # Its kernel, or DHCP again (a new boot): the machine's record moves.
    lab.clock.now += 1
    lab.inventory.record(MAC, Kind.HTTP_KERNEL, "received the kernel", None, {})
    second = lab.script()
    assert token_of(second) != token_of(first)
    assert lab.events() == 2


def test_a_changed_decision_is_never_answered_from_the_old_script(lab: Lab) -> None:
    first = lab.script()
    assert "/assets/osie/vmlinuz " in first
    # The store now says the machine is arm64 (DHCP's option 93 = 11): it boots the arm64
    # build. Written with the same last_seen, so that only the decision tells.
    record = lab.inventory.lifecycle.record_of(MAC)
    assert record is not None
    lab.inventory._store.record_seen(MAC, "arm64", "UEFI", now=record.last_seen)
    second = lab.script()
    assert "/assets/osie-arm64/vmlinuz " in second
    assert lab.events() == 2


def test_a_retired_or_replaced_token_is_never_handed_out_again(lab: Lab) -> None:
    first = lab.script()
    lab.inventory.tokens.retire(MAC)  # the OS phoned home
    second = lab.script()
    assert token_of(second) not in (None, token_of(first))
    lab.inventory.tokens.issue(MAC)  # another boot file carried a new one (pxelinux.cfg)
    third = lab.script()
    assert token_of(third) not in (None, token_of(second))
    assert lab.inventory.tokens.check(MAC, token_of(third)) is None


def test_a_kept_script_goes_to_the_machine_alone(lab: Lab) -> None:
    first = lab.script()
    assert token_of(first) is not None
    target = f"/boot/{MAC}.ipxe".encode()
    # Another machine asking for c1's script: the full answer for a bystander, no token.
    other = lab.script(client=OTHER_IP)
    assert "pixiebox.name=c1" in other and token_of(other) is None
    assert lab.scripts.answer(target, OTHER_IP) is None
    # Another machine at c1's address now (the kernel's neighbour entry, read afresh).
    lab.neighbours[IP] = OTHER_MAC
    lab.inventory._neighbours.clear()
    assert lab.scripts.answer(target, IP) is None
    assert token_of(lab.script()) is None


def test_an_unknown_ignored_machine_is_told_once_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger, where = "02:00:00:00:85:99", "10.85.0.99"
    monkeypatch.setattr(
        inventory_module, "neighbour_mac", lambda ip, device=None: {where: stranger}.get(str(ip))
    )
    store = StateStore(tmp_path / "state")
    try:
        inventory = Inventory(config().model_copy(update={"boot": config().boot.model_copy(
            update={"unknown": "ignore"})}), store)  # fmt: skip

        def record(event: BootEvent) -> None:
            inventory.record(event.who, event.kind, event.message, None, event.fields)

        app = boot_app(BootHttpState(inventory, URLS, Assets(tmp_path), record))
        lab = Lab(inventory, app, app.state.scripts, Clock(), {})
        first = lab.script(f"/boot/{stranger}.ipxe", where)
        assert first.rstrip().endswith("exit 1")
        assert lab.script(f"/boot/{stranger}.ipxe", where) == first
        assert lab.events(Kind.BOOT_IGNORED, stranger) == 1
    finally:
        store.close()


# --- the server's protocol answering at once (http.connlimit) ----------------------------------


class Transport(asyncio.Transport):
    """What the protocol writes, for a connection from `peer`."""

    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer
        self.written = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (self.peer, 40000), "sockname": ("10.85.0.2", 80)}.get(name, default)


def test_the_protocol_answers_a_kept_script_itself_and_else_hands_over(lab: Lab) -> None:
    script = lab.script()

    async def exchange(request: bytes, fast: FastAnswer) -> tuple[bytes, bool]:
        """What the protocol wrote for `request`, and whether it closed the connection."""
        config = uvicorn.Config(lab.app, log_config=None, lifespan="off")
        config.load()
        state = LimitedState(HttpLimits(), "boot HTTP")
        state.fast = fast
        state.default_headers = [(b"date", b"Sat, 05 Dec 2026 08:00:00 GMT")]
        protocol = PathsendProtocol(config, state, {}, _loop=asyncio.get_running_loop())
        transport = Transport(IP)
        protocol.connection_made(transport)
        protocol.data_received(request)
        await asyncio.sleep(0.05)  # a request handed over runs as a task
        closed = transport.closed
        protocol.connection_lost(None)
        return transport.written, closed

    get = f"GET /boot/{MAC}.ipxe HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answered, closed = asyncio.run(exchange(get, lab.scripts.answer))
    assert answered == (
        b"HTTP/1.1 200 OK\r\ndate: Sat, 05 Dec 2026 08:00:00 GMT\r\n"
        b"cache-control: no-store\r\nContent-Length: " + str(len(script)).encode() + b"\r\n"
        b"content-type: text/plain; charset=utf-8\r\n\r\n" + script.encode()
    )
    assert not closed
    # HTTP/1.0: the answer says it ends the connection, and does.
    old, closed = asyncio.run(exchange(get.replace(b"HTTP/1.1", b"HTTP/1.0"), lab.scripts.answer))
    assert b"\r\nconnection: close\r\n\r\n#!ipxe" in old and closed

    # A failing fast answer is no "invalid request": the application answers.
    def broken(target: bytes, source: str) -> tuple[bytes, bytes] | None:
        raise RuntimeError("the store cannot be read")

    handed, _ = asyncio.run(exchange(get, broken))
    assert handed.startswith(b"HTTP/1.1 200 OK\r\n"), handed[:200]
    assert handed.endswith(script.encode())
    assert lab.events() == 1
