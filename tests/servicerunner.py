"""What the small service runners (tftp_serve.py, syslog_serve.py) share: run one asyncio
service in a test namespace with debug logging, and count the sockets it leaves behind."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any


def open_sockets() -> int:
    """Sockets this process holds (the event loop has some of its own)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return count


def write_stats(path: Path | None, stats: Mapping[str, int]) -> None:
    """Atomically, so the test never reads half a file."""
    if path is None:
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(dict(stats)))
    partial.replace(path)


def run(service: Coroutine[Any, Any, None], level: int = logging.DEBUG) -> int:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    asyncio.run(service)
    return 0
