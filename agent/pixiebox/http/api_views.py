"""The dashboard's read endpoints: a machine's events a page at a time (newest page first, each
page in ascending order, the older ones behind a Link header), its boots as stage bars, what it
was given, the lab's timeline, the enroll form's suggestion and the settings page.

Reads are open like the rest of the API's (SECURITY.md): none of these carries a secret value.
They are built from the store and lab.toml on the event loop, except the settings' check of the
file on disk, which runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address
from urllib.parse import quote

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pixiebox import doctor
from pixiebox.config.values import unicast_mac
from pixiebox.core.inventory import Inventory
from pixiebox.events import Event
from pixiebox.http.api_boots import boots, given, timeline
from pixiebox.http.api_machines import find_machine
from pixiebox.http.api_settings import LabText, settings
from pixiebox.http.params import count_parameter, event_id_parameter

#: Events per page of a machine's log: by default, and at most.
EVENTS_DEFAULT, EVENTS_MAX = 100, 500
#: Boots per answer: by default, and at most.
BOOTS_DEFAULT, BOOTS_MAX = 20, 50
#: What a read without `limit` and `before` (and the `after=` catch-up) answers at most, as
#: before pages existed: `pixiebox events` and scripts read the body alone.
UNPAGED_LIMIT = 500

#: The name and address an enrollment that names neither would get now.
Suggest = Callable[[str], tuple[str, IPv4Address | None]]


class EnrollSuggestion(BaseModel):
    name: str
    ip: str | None


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message, "problems": []}, status)


def event_page(
    inventory: Inventory, mac: str, key: str, query: Mapping[str, str]
) -> tuple[list[Event], dict[str, str]]:
    """(events in ascending id order, headers). With `after`: the catch-up read as before
    (events after that id). Else the `limit` newest events below `before` (or the newest),
    and a Link to the page before them when there are older ones. Without `limit` or
    `before`, a page is as long as the whole answer was before pages existed. ValueError: a
    bad parameter, in a sentence."""
    after = event_id_parameter("after", query.get("after"))
    before = event_id_parameter("before", query.get("before"))
    paged = bool((query.get("limit") or "").strip()) or bool(before)
    default = EVENTS_DEFAULT if paged else UNPAGED_LIMIT
    limit = count_parameter("limit", query.get("limit"), default, EVENTS_MAX)
    lifecycle = inventory.lifecycle
    if after and not before:
        return lifecycle.events(mac, after=after, limit=limit), {}
    # A machine keeps at most doctor.EVENTS (the store trims older ones), so reading them all
    # is bounded; the store's query has no "before".
    kept = lifecycle.events(mac, after=after, limit=doctor.EVENTS)
    if before:
        kept = [e for e in kept if e.id < before]
    page = kept[-limit:]
    headers: dict[str, str] = {}
    if len(kept) > len(page):
        link = f"/api/v1/machines/{quote(key, safe=':')}/events?before={page[0].id}&limit={limit}"
        headers["Link"] = f'<{link}>; rel="next"'
    return page, headers


class ViewHandlers:
    """GET handlers of the endpoints above; api.api_app routes to them."""

    def __init__(
        self,
        inventory: Inventory,
        suggest: Suggest | None,
        lab_text: Callable[[], LabText | None] | None,
        server_ip: IPv4Address | None,
    ) -> None:
        self.inventory = inventory
        self.suggest = suggest
        self.lab_text = lab_text
        self.server_ip = server_ip

    def _events(self, mac: str) -> list[Event]:
        return self.inventory.lifecycle.events(mac, limit=doctor.EVENTS)

    async def enroll_suggestion(self, request: Request) -> Response:
        """What POST .../enroll with an empty body would choose now; nothing is written."""
        raw = str(request.path_params["mac"])
        try:
            mac = unicast_mac(raw)
        except ValueError as exc:
            return _error(400, str(exc))
        view = find_machine(self.inventory, mac)
        if view is None:
            return _error(404, doctor.unknown_machine(raw))
        if view.enrolled:
            return _error(409, f"{mac} is already enrolled as {view.name}")
        if self.suggest is None:
            return _error(503, "enrolling is not available in this agent")
        name, ip = self.suggest(mac)
        suggestion = EnrollSuggestion(name=name, ip=str(ip) if ip is not None else None)
        return JSONResponse(suggestion.model_dump())

    async def boots(self, request: Request) -> Response:
        key = str(request.path_params["key"])
        view = find_machine(self.inventory, key)
        if view is None:
            return _error(404, doctor.unknown_machine(key))
        try:
            limit = count_parameter("limit", request.query_params.get("limit"), BOOTS_DEFAULT,
                                    BOOTS_MAX)  # fmt: skip
        except ValueError as exc:
            return _error(400, str(exc))
        found = boots(self._events(view.mac), limit, time.time())
        return JSONResponse([boot.model_dump(mode="json") for boot in found])

    async def given(self, request: Request) -> Response:
        key = str(request.path_params["key"])
        view = find_machine(self.inventory, key)
        if view is None:
            return _error(404, doctor.unknown_machine(key))
        network = self.inventory.config.network
        # Where Pixiebox hands out addresses it also hands out the router and itself as the
        # DNS server (dhcp.reservation); in proxy mode the home router did, unseen.
        ours = network.dhcp_mode != "proxy"
        server = network.server_ip or self.server_ip
        answer = given(
            self._events(view.mac),
            image=view.image,
            ip=view.ip,
            gateway=str(network.gateway) if ours and network.gateway is not None else None,
            dns=[str(server)] if ours and server is not None else [],
        )
        return JSONResponse(answer.model_dump(mode="json"))

    async def timeline(self, request: Request) -> Response:
        """The enrolled machines in lab.toml's order (a discovered one is not part of a lab-up
        round)."""
        machines = [(m.mac, m.name, self._events(m.mac)) for m in self.inventory.config.machines]
        return JSONResponse(timeline(machines, time.time()).model_dump(mode="json"))

    async def settings(self, request: Request) -> Response:
        loaded = self.lab_text() if self.lab_text is not None else None
        if loaded is None:
            return _error(503, "this agent does not keep the lab.toml it loaded")
        view = await asyncio.to_thread(settings, loaded)
        return JSONResponse(view.model_dump(mode="json"))
