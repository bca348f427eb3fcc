"""Talking to the running agent's local API, for the CLI."""

from __future__ import annotations

import json
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
        request = self._request(method, path, body)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
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
