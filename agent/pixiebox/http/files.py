"""File responses of boot HTTP that say how they ended (kernels, initrds, iPXE builds), and
conditional GETs of them.

Split from http.boot, which says what each end means for the machine (its log line and event).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path

from starlette.responses import FileResponse
from starlette.types import Message, Receive, Scope, Send

from pixiebox.http.server import PATHSEND


def not_modified(headers: Mapping[str, str], etag: str, mtime: float) -> bool:
    """RFC 9110 13.1.2/13.1.3: If-None-Match wins over If-Modified-Since."""
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or etag in tags
    if_modified_since = headers.get("if-modified-since")
    if if_modified_since is None:
        return False
    try:
        since = parsedate_to_datetime(if_modified_since)
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return int(mtime) <= since.timestamp()


TransferDone = Callable[[int, bool, int, BaseException | None], None]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a file response ended: status, whether to its last byte, bytes sent, the error that
    cut it short, and seconds from the request to the end."""

    status: int
    complete: bool
    sent: int
    error: BaseException | None
    seconds: float


class TrackedFile(FileResponse):
    """A FileResponse that reports how it ended: (status, complete, bytes sent, error).

    With the pathsend extension the server sends the whole file in one message and raises an
    OSError from send() when the client is gone; streamed (Range) responses end either with the
    final body message or, when the client disconnects, without it."""

    def __init__(self, path: Path, stat_result: os.stat_result, on_done: TransferDone) -> None:
        super().__init__(path, stat_result=stat_result)
        self._on_done = on_done
        self._size = stat_result.st_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 0
        complete = False
        sent = 0

        async def tracked(message: Message) -> None:
            nonlocal status, complete, sent
            await send(message)
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
            elif kind == PATHSEND:
                sent, complete = self._size, True
            elif kind == "http.response.body":
                sent += len(message.get("body", b""))
                complete = not message.get("more_body", False)

        error: BaseException | None = None
        try:
            await super().__call__(scope, receive, tracked)
        except OSError as exc:
            # The client went away mid-file (ClientGone) or the file could not be read: the
            # response cannot be finished either way, and the log says which.
            error = exc
            complete = False
        self._on_done(status, complete, sent, error)
