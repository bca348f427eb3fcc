"""Talking to the running agent's local API, for the CLI."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixiebox.config import LabConfig, split_listen
from pixiebox.config.schema import DEFAULT_API_PORT


class ApiUnreachable(Exception):
    """No agent answers at the API address."""


class ApiRefused(Exception):
    """The agent answered with an error; the message is its explanation."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


#: Pages every_page follows at most: [boot] max_discovered may be 100,000, 500 a page.
MAX_PAGES = 250

_NEXT_LINK = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?', re.IGNORECASE)


def _next_link(header: str) -> str | None:
    """The target of a Link header's rel="next" (a path on the same agent), or None."""
    found = _NEXT_LINK.search(header)
    if found is None:
        return None
    target = found[1]
    return target if target.startswith("/") else None


@dataclass(frozen=True, slots=True)
class ApiClient:
    base: str
    token_file: Path | None = None
    timeout: float = 10.0

    @classmethod
    def for_config(cls, config: LabConfig, url: str | None = None) -> ApiClient:
        if url is None:
            # Unset [api] listen includes 127.0.0.1 (the CLI runs on the appliance).
            host, port = "127.0.0.1", DEFAULT_API_PORT
            if config.api.listen is not None:
                host, port = split_listen(config.api.listen)
                host = "127.0.0.1" if host in ("0.0.0.0", "") else host
            url = f"http://{host}:{port}"
        return cls(url.rstrip("/"), config.api.token_file)

    def _request(
        self, method: str, path: str, body: object | None = None
    ) -> urllib.request.Request:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if method != "GET" and self.token_file is not None:
            try:
                headers["Authorization"] = f"Bearer {self.token_file.read_text().strip()}"
            except OSError as exc:
                raise ApiRefused(
                    f"cannot read the API token {self.token_file}: {exc.strerror} "
                    "(run as root, or as a user that may read it)"
                ) from None
        return urllib.request.Request(self.base + path, data, headers, method=method)

    def call(self, method: str, path: str, body: object | None = None) -> Any:
        return self._call(method, path, body)[0]

    def every_page(self, path: str) -> list[Any]:
        """GET `path` and the pages its Link headers (rel="next", RFC 8288) lead to, joined: a
        listing (GET /api/v1/machines) is paged. Bounded: a listing that changes under the
        reader cannot make it loop."""
        items: list[Any] = []
        following: str | None = path
        for _ in range(MAX_PAGES):
            if following is None:
                return items
            page, link = self._call("GET", following)
            items += page
            following = _next_link(link)
        raise ApiRefused(f"{path} has more than {MAX_PAGES} pages; ask with filters")

    def _call(self, method: str, path: str, body: object | None = None) -> tuple[Any, str]:
        """The decoded answer and its Link header ("" without one)."""
        request = self._request(method, path, body)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                link = response.headers.get("Link", "")
                return json.loads(response.read() or b"null"), link
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read())
                message = detail.get("error", str(exc))
                problems = detail.get("problems") or []
            except (ValueError, AttributeError):
                message, problems = str(exc), []
            if exc.code == 401 and self.token_file is not None:
                problems = [f"(the token sent was read from {self.token_file}: it is not the "
                            "running agent's; use the lab.toml the agent runs with, or restart "
                            "the agent after replacing the file)"]  # fmt: skip
            raise ApiRefused("\n".join([message, *problems]), exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiUnreachable(
                f"no Pixiebox agent answers at {self.base} ({getattr(exc, 'reason', exc)}); "
                "is `pixiebox serve` running?"
            ) from None

    def stream(
        self, path: str, connected: threading.Event | None = None
    ) -> Iterator[dict[str, Any]]:
        """Server-sent events from `path`, as decoded JSON objects, until the stream ends.
        `connected` is set once the agent says the stream is live (nothing is missed after)."""
        request = urllib.request.Request(self.base + path, headers={"Accept": "text/event-stream"})
        try:
            response = urllib.request.urlopen(request, timeout=None)
        except (urllib.error.URLError, OSError) as exc:
            raise ApiUnreachable(f"no Pixiebox agent answers at {self.base} ({exc})") from None
        with response:
            for raw in response:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if line.startswith(": connected") and connected is not None:
                    connected.set()
                if line.startswith("data: "):
                    yield json.loads(line[6:])
