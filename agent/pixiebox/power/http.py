"""A generic HTTP power driver, for any plug, PDU or home-automation hub with an HTTP API.

Each action is one request written in lab.toml:

    [machines.power]
    driver = "http"
    on  = { method = "POST", url = "http://pdu.lan/outlet/3", body = '{"state": 1}',
            headers = { "Content-Type" = "application/json" } }
    off = { method = "POST", url = "http://pdu.lan/outlet/3", body = '{"state": 0}' }
    status = { url = "http://pdu.lan/outlet/3", pointer = "/state", on_value = 1 }

`status` says which answers mean "on": a JSON pointer (RFC 6901) into the JSON answer and the
value found there when on, or a regular expression found in the body when on. Without a `cycle`
request, cycle is off, `cycle_wait` seconds, on.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pixiebox.config.power_options import HttpOptions, HttpRequest
from pixiebox.power.base import PowerAction, PowerState, PowerTarget
from pixiebox.power.plugs import HttpDriverBase, cycle_by_off_on


def resolve_pointer(document: Any, pointer: str) -> Any:
    """The value at `pointer` (RFC 6901) in `document`; KeyError when there is none."""
    if pointer == "":
        return document
    value = document
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict):
            value = value[token]
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            raise KeyError(pointer)
    return value


def _same(found: Any, wanted: Any) -> bool:
    if isinstance(found, str) and isinstance(wanted, str):
        return found.strip().lower() == wanted.strip().lower()
    return bool(found == wanted and type(found) is type(wanted))


class HttpDriver(HttpDriverBase):
    name = "http"
    graceful = False

    def __init__(self, target: PowerTarget, options: HttpOptions) -> None:
        super().__init__(target, options.timeout, options.verify_tls)
        self.options = options
        actions = {PowerAction(a) for a in ("on", "off", "status") if getattr(options, a)}
        if options.cycle or (options.on and options.off):
            actions.add(PowerAction.CYCLE)
        self.actions = frozenset(actions)

    async def _send(self, request: HttpRequest) -> str:
        host = request.url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
        response = await self.request(
            request.method,
            request.url,
            where=f"power endpoint at {host}",
            content=request.body,
            headers=request.headers or None,
        )
        return response.text

    async def on(self) -> None:
        if self.options.on is None:
            raise self.cannot(PowerAction.ON)
        await self._send(self.options.on)

    async def off(self) -> None:
        if self.options.off is None:
            raise self.cannot(PowerAction.OFF)
        await self._send(self.options.off)

    async def cycle(self) -> None:
        if self.options.cycle is not None:
            await self._send(self.options.cycle)
        elif self.options.on is not None and self.options.off is not None:
            await cycle_by_off_on(self, self.options.cycle_wait)
        else:
            raise self.cannot(PowerAction.CYCLE)

    async def status(self) -> PowerState:
        request = self.options.status
        if request is None:
            return PowerState.UNKNOWN
        text = await self._send(request)
        if request.regex is not None:
            return PowerState.ON if re.search(request.regex, text) else PowerState.OFF
        assert request.pointer is not None
        try:
            found = resolve_pointer(json.loads(text), request.pointer)
        except (json.JSONDecodeError, KeyError):
            raise self.error(
                f"the status answer has nothing at {request.pointer!r}: {text.strip()[:200]!r}"
            ) from None
        return PowerState.ON if _same(found, request.on_value) else PowerState.OFF
