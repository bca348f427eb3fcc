"""What the fuzz tests (test_fuzz_*.py, issue 13 item 7) share: CI's settings, a watch on the
log for the tracebacks a server's last-resort handler writes when a packet broke it, and an
in-process ASGI client for the HTTP apps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pixiebox.config import LabConfig
from pixiebox.core.firmware import Assets
from pixiebox.core.inventory import Inventory
from pixiebox.core.urls import BootUrls
from pixiebox.http.boot import BootHttpState, boot_app
from pixiebox.store.identity import IdentityStore
from pixiebox.store.state import StateStore


def fuzz(examples: int) -> settings:
    """Bounded (all fuzz files together run in about a minute), reproducible (derandomized, no
    example database: CI sees the same examples on every run) and without a deadline (the
    machine runs other tests beside these)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


class Records(logging.Handler):
    """The records a logger tree writes at `level` or above."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def with_traceback(self) -> list[logging.LogRecord]:
        return [record for record in self.records if record.exc_info]

    def text(self) -> str:
        formatter = logging.Formatter()
        return "\n".join(formatter.format(record) for record in self.records)


@contextlib.contextmanager
def log_records(name: str = "pixiebox", level: int = logging.ERROR) -> Iterator[Records]:
    """Collect what `name`'s loggers write at `level` or above while the block runs."""
    handler = Records(level)
    logger = logging.getLogger(name)
    saved = logger.level
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


# --------------------------------------------------------------------------- HTTP apps

C1 = "02:00:00:00:13:31"
KERNEL = bytes(range(256)) * 7 + b"tail"  # 1796 bytes, every offset tells its position
FILES = {"osie/vmlinuz": KERNEL, "osie/initrd": b"x", "empty": b""}
#: Some mtime of the assets in the past, so If-Modified-Since has both sides to land on.
MTIME = 1_700_000_000


@contextlib.contextmanager
def boot_lab(root: Path) -> Iterator[Any]:
    """The boot HTTP app of a lab under `root`: one machine, an image's files in the assets
    (FILES, dated MTIME), an iPXE build, and a file just outside the assets."""
    assets = root / "assets"
    for name, content in FILES.items():
        path = assets / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, (MTIME, MTIME))
    (assets / "ipxe").mkdir()
    (assets / "ipxe" / "ipxe.efi").write_bytes(b"MZ")
    (root / "secret").write_text("outside the assets")
    config = LabConfig.model_validate({
        "network": {"subnet": "10.53.0.0/24", "server_ip": "10.53.0.2"},
        "boot": {"assets": str(assets), "ssh_keys": ["ssh-ed25519 AAAA test"]},
        "machines": [{"name": "c1", "mac": C1, "ip": "10.53.0.31"}],
    })  # fmt: skip
    store = StateStore(root / "state")
    try:
        inventory = Inventory(config, store)
        urls = BootUrls(IPv4Address("10.53.0.2"))
        identities = IdentityStore(root / "identity")
        yield boot_app(BootHttpState(inventory, urls, Assets(assets), identities=identities))
    finally:
        store.close()


@dataclass
class Answer:
    """What the app sent: status, headers, the body, and the exception it let through."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: BaseException | None = None


async def _call(app: Any, scope: dict[str, Any], body: bytes) -> Answer:
    answer = Answer()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # ASGI 2.4: nothing waits for a disconnect
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer.status = int(message["status"])
            answer.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")
            if message.get("more_body") and "event-stream" in answer.headers.get(
                "content-type", ""
            ):
                raise OSError("the client hung up")  # an event stream never ends by itself

    try:
        await asyncio.wait_for(app(scope, receive, send), 10)
    except Exception as exc:
        if "event-stream" not in answer.headers.get("content-type", ""):
            answer.error = exc
    return answer


class AsgiClient:
    """Drives ASGI apps in-process as uvicorn does, on one event loop for all requests (a loop,
    and the thread pool FileResponse opens files in, per request would cost more than the
    requests)."""

    def __init__(self, runner: asyncio.Runner) -> None:
        self.runner = runner

    def request(
        self,
        app: Any,
        method: str,
        path: str,
        query: str = "",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> Answer:
        """One request as uvicorn hands it to the app (ASGI 2.4: send() raises on a gone
        client); it must get an answer below 500."""
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": quote(path).encode(), "query_string": query.encode("latin-1"),
            "root_path": "", "client": ("10.53.0.77", 40000), "server": ("10.53.0.2", 80),
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in (headers or {}).items()],
        }  # fmt: skip
        with log_records() as seen:
            answer = self.runner.run(_call(app, scope, body))
        what = f"{method} {path}?{query} {headers} {body[:80]!r}"
        assert answer.error is None and answer.status != 500, f"{what}: {answer.error!r}"
        assert not seen.with_traceback(), f"{what}\n{seen.text()}"
        # 503: a service this lab does not have (power control).
        assert 200 <= answer.status < 500 or answer.status == 503, what
        return answer


def latin1(text: str) -> str:
    """A header value as HTTP carries it: bytes, read by Starlette as latin-1."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


#: Request bodies: JSON as clients send it, nested past json's recursion limit, and not JSON.
JSON_BODIES = st.one_of(
    st.sampled_from(
        [b"", b"{}", b'{"state": "up"}', b'{"state": "joined"}', b'{"state": ["up"]}', b"null"]
    ),
    st.integers(1, 5000).map(lambda n: b"[" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.binary(max_size=64),
    st.text(max_size=40).map(str.encode),
    st.just(b" " * 5000),
)
