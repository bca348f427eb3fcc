"""The local API under /api/v1 (JSON, with an OpenAPI document) and /metrics.

Reading is open to the LAN (it is the lab's own dashboard data); anything that changes the lab
needs the bearer token from [api] token_file, created with mode 0600 on first start, or a
dashboard session signed in with it (http.session: the cookie, the CSRF rule). The dashboard's
read endpoints are in http.api_views, the OpenAPI document in http.openapi.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pixiebox import doctor
from pixiebox.config.values import unicast_mac
from pixiebox.core.inventory import Inventory
from pixiebox.doctor.machine import diagnose_machine
from pixiebox.events import Event, FieldValue, Kind
from pixiebox.http.api_machines import (
    MachineQuery,
    MachineView,
    PowerOf,
    find_machine,
    machine_page,
)

# agent.py and older callers import these from here.
from pixiebox.http.api_machines import machine_views as machine_views
from pixiebox.http.api_machines import state_counts as state_counts
from pixiebox.http.api_settings import LabText
from pixiebox.http.api_views import Suggest, ViewHandlers, event_page
from pixiebox.http.dashboard import dashboard_routes
from pixiebox.http.openapi import openapi_document
from pixiebox.http.params import body_error, event_id_parameter, mac_parameter
from pixiebox.http.session import SessionHandlers, Sessions, action_refusal
from pixiebox.power.base import PowerAction
from pixiebox.power.controller import NoPowerControl, PowerBusy, PowerController
from pixiebox.power.lab import LabReport, LabRequest, lab_down, lab_up
from pixiebox.power.views import PowerOutcome
from pixiebox.store.private import FILE_MODE, private_dir, replace_file, tighten

log = logging.getLogger("pixiebox.api")

#: How often an idle server-sent-events stream sends a comment, so proxies and clients notice
#: a dead connection (and the server notices a gone client).
SSE_KEEPALIVE = 15.0


def ensure_token(path: Path) -> str:
    """The API token, created (random, mode 0600 whatever the umask: whoever reads it can
    change the lab) when the file does not exist yet; an existing one is set back to 0600."""
    try:
        token = path.read_text().strip()
        if token:
            tighten(path, FILE_MODE)
            return token
    except FileNotFoundError:
        pass
    private_dir(path.parent, tighten_existing=False)  # may be shared (/var/lib/pixiebox)
    token = secrets.token_urlsafe(32)
    replace_file(path, token + "\n")
    log.info("created the API token in %s (mode 0600)", path)
    return token


class EventView(BaseModel):
    """One event as the API shows it: code reads `kind` and `fields`, people read `message`
    (pixiebox.events lists every kind and its fields)."""

    id: int
    mac: str
    name: str | None
    time: float
    kind: str
    fields: dict[str, FieldValue]
    message: str


class EnrollRequest(BaseModel):
    # A misspelt key ({"nmae": "c3"}) would otherwise enroll the machine under the next free
    # name, and a name cannot be changed through the API.
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    ip: IPv4Address | None = None


class PowerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: PowerAction


class ErrorView(BaseModel):
    error: str
    problems: list[str] = []


@dataclass
class ApiState:
    inventory: Inventory
    token: str
    #: Adds a machine to lab.toml and reloads; returns its name. Raises ValueError with the
    #: problems (one per line) when the enrollment is refused.
    enroll: Callable[[str, str | None, IPv4Address | None], str]
    metrics: Callable[[], bytes] | None = None
    #: Runs verified power actions; None: power control is not available.
    power: PowerController | None = None
    #: The name and address an enrollment with an empty body gets (Agent.suggest).
    suggest: Suggest | None = None
    #: lab.toml as the agent last loaded it (GET /api/v1/settings).
    lab_text: Callable[[], LabText | None] | None = None
    #: The appliance's lab address (the DNS server it hands out), when known.
    server_ip: IPv4Address | None = None
    #: Signed-in dashboard browsers (http.session).
    sessions: Sessions = field(default_factory=Sessions)


def event_view(inventory: Inventory, event: Event) -> EventView:
    machine = inventory.who_is(event.mac)
    return EventView(id=event.id, mac=event.mac, name=machine.name if machine else None,
                     time=event.time, kind=event.kind, fields=dict(event.fields),
                     message=event.message)  # fmt: skip


def _json(model: BaseModel | list[Any], status: int = 200) -> Response:
    if isinstance(model, list):
        body = [item.model_dump(mode="json") for item in model]
        return JSONResponse(body, status)
    return JSONResponse(model.model_dump(mode="json"), status)


def _error(status: int, message: str, problems: list[str] | None = None) -> Response:
    return _json(ErrorView(error=message, problems=problems or []), status)


class _Handlers:
    def __init__(self, state: ApiState) -> None:
        self.state = state

    @property
    def inventory(self) -> Inventory:
        return self.state.inventory

    @property
    def power_of(self) -> PowerOf | None:
        return self.state.power.power_of if self.state.power is not None else None

    def _refused(self, request: Request) -> Response | None:
        """None when the request may change the lab: the bearer token, or a dashboard session
        with the CSRF rule (http.session); else its 401 or 403."""
        state = self.state
        return action_refusal(request, state.token, state.sessions, state.inventory)

    async def machines(self, request: Request) -> Response:
        """A page of machines (http.api_machines: filters, keyset pages, Link header)."""
        try:
            query = MachineQuery.read(request.query_params)
        except ValueError as exc:
            return _error(400, str(exc))
        page = machine_page(self.inventory, query, self.power_of)
        body = [view.model_dump(mode="json") for view in page.machines]
        return JSONResponse(body, headers=page.headers(query))

    async def machine(self, request: Request) -> Response:
        key = str(request.path_params["key"])
        view = find_machine(self.inventory, key, self.power_of)
        if view is None:
            return _error(404, f"no machine named or with MAC {key!r}")
        return _json(view)

    async def machine_events(self, request: Request) -> Response:
        key = str(request.path_params["key"])
        view = find_machine(self.inventory, key)
        if view is None:
            return _error(404, f"no machine named or with MAC {key!r}")
        try:
            events, headers = event_page(self.inventory, view.mac, key, request.query_params)
        except ValueError as exc:
            return _error(400, str(exc))
        body = [event_view(self.inventory, e).model_dump(mode="json") for e in events]
        return JSONResponse(body, headers=headers)

    async def lab_events(self, request: Request) -> Response:
        """The lab's own log (MAC ""): refusals of secrets no machine could be named for, e.g.
        a routed host asking for /metadata (core.trust)."""
        try:
            after = event_id_parameter("after", request.query_params.get("after"))
        except ValueError as exc:
            return _error(400, str(exc))
        events = self.inventory.lifecycle.events("", after=after)
        return _json([event_view(self.inventory, e) for e in events])

    async def machine_doctor(self, request: Request) -> Response:
        """Why did (or didn't) this machine boot: its last boot attempts and a verdict."""
        key = str(request.path_params["key"])
        view = find_machine(self.inventory, key)
        if view is None:
            return _error(404, doctor.unknown_machine(key))
        query = request.query_params
        try:
            timeout = doctor.seconds_parameter(query, "boot_timeout", doctor.DEFAULT_BOOT_TIMEOUT)
            settle = doctor.seconds_parameter(query, "settle", doctor.DEFAULT_SETTLE)
        except ValueError as exc:
            return _error(400, str(exc))
        diagnosis = diagnose_machine(
            self.inventory, view.mac, state=view.state, name=view.name or view.mac,
            enrolled=view.enrolled, now=time.time(), boot_timeout=timeout, settle=settle,
        )  # fmt: skip
        return _json(doctor.report(diagnosis, view.mac))

    async def enroll(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        raw = str(request.path_params["mac"])
        try:
            mac = unicast_mac(raw)  # never a multicast, broadcast or zero MAC
        except ValueError as exc:
            return _error(400, str(exc))
        try:
            body = await request.body()
            wanted = EnrollRequest.model_validate_json(body or b"{}")
        except ValidationError as exc:
            return _error(400, body_error(exc, '{"name": "c3", "ip": "192.168.1.53"} (both '
                          "optional)"), [str(e["msg"]) for e in exc.errors()])  # fmt: skip
        try:
            name = await asyncio.to_thread(self.state.enroll, mac, wanted.name, wanted.ip)
        except ValueError as exc:
            return _error(409, f"{mac} was not enrolled", str(exc).splitlines())
        view = find_machine(self.inventory, mac)
        log.info("enrolled %s as %s through the API", mac, name)
        fields: dict[str, FieldValue] = {"name": name}
        if view is not None and view.ip is not None:
            fields["ip"] = str(view.ip)
        self.inventory.record(mac, Kind.MACHINE_ENROLLED, f"enrolled as {name} through the API",
                              fields=fields)  # fmt: skip
        return _json(view, 201) if view else _error(500, "enrolled but not found after reload")

    async def power(self, request: Request) -> Response:
        """A verified power action; answers when it is seen done (or not) with the outcome.
        A second action on a machine that is busy is refused (409), not queued."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        key = str(request.path_params["key"])
        view = find_machine(self.inventory, key)
        if view is None:
            return _error(404, doctor.unknown_machine(key))
        try:
            wanted = PowerRequest.model_validate_json(await request.body() or b"{}")
        except ValidationError as exc:
            return _error(400, body_error(exc, '{"action": "on"}, with on, off, cycle or '
                          "status"))  # fmt: skip
        machine = self.inventory.who_is(view.mac)
        if machine is None:
            return _error(409, f"{view.mac} is not in lab.toml, so it has no power control: "
                          f"enroll it (pixiebox enroll {view.mac} --name NAME), then add "
                          "power = { driver = \"...\" } to its entry")  # fmt: skip
        if self.state.power is None:
            return _error(503, "power control is not running in this agent")
        try:
            outcome = await self.state.power.act(machine, wanted.action)
        except (NoPowerControl, PowerBusy) as exc:
            return _error(409, str(exc))
        return _json(outcome)

    async def _lab(self, request: Request, up: bool) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            wanted = LabRequest.model_validate_json(await request.body() or b"{}")
        except ValidationError as exc:
            problems = [str(e["msg"]) for e in exc.errors()]
            return _error(400, body_error(exc, '{"stagger": 5, "timeout": 300} (seconds, '
                          "both optional)"), problems)  # fmt: skip
        if self.state.power is None:
            return _error(503, "power control is not running in this agent")
        power = self.state.power
        if up:
            job = asyncio.ensure_future(lab_up(power, wanted.stagger, wanted.timeout))
        else:
            job = asyncio.ensure_future(lab_down(power, wanted.timeout))
        # Like a single action, the whole-lab one finishes even if the caller stops waiting.
        return _json(await asyncio.shield(job))

    async def lab_up(self, request: Request) -> Response:
        return await self._lab(request, up=True)

    async def lab_down(self, request: Request) -> Response:
        return await self._lab(request, up=False)

    async def events(self, request: Request) -> Response:
        """Server-sent events: every event as it happens (`?mac=` for one machine), after
        replaying those after `Last-Event-ID` (or `?after=`), so a reconnecting client misses
        nothing."""
        # A reconnecting EventSource sends back the id it last saw: the header wins.
        header = request.headers.get("last-event-id")
        try:
            only = mac_parameter("mac", request.query_params.get("mac"))
            if header is not None and header.strip():
                start = event_id_parameter("the Last-Event-ID header", header)
            else:
                start = event_id_parameter("after", request.query_params.get("after"))
        except ValueError as exc:
            return _error(400, str(exc))
        lifecycle = self.inventory.lifecycle

        def frame(event: Event) -> str:
            data = json.dumps(event_view(self.inventory, event).model_dump(mode="json"))
            return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"

        async def stream() -> AsyncIterator[str]:
            async with lifecycle.subscription() as queue:
                last = start
                if start:
                    for event in lifecycle.events(only, after=start, limit=10_000):
                        last = event.id
                        yield frame(event)
                yield ": connected\n\n"
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if event.id <= last or (only and event.mac != only):
                        continue
                    last = event.id
                    yield frame(event)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(MODELS))

    async def metrics(self, request: Request) -> Response:
        if self.state.metrics is None:
            return Response("", media_type="text/plain")
        return Response(self.state.metrics(), media_type="text/plain; version=0.0.4")


#: The models of this module's answers and bodies, for the OpenAPI document.
MODELS = (MachineView, EventView, EnrollRequest, ErrorView, doctor.DoctorReport, PowerRequest,
          PowerOutcome, LabRequest, LabReport)  # fmt: skip


def api_app(state: ApiState) -> Starlette:
    handlers = _Handlers(state)
    views = ViewHandlers(state.inventory, state.suggest, state.lab_text, state.server_ip)
    session = SessionHandlers(state.token, state.sessions, state.inventory)
    routes = [
        Route("/api/v1/machines", handlers.machines, methods=["GET"]),
        Route("/api/v1/machines/{key}", handlers.machine, methods=["GET"]),
        Route("/api/v1/machines/{key}/events", handlers.machine_events, methods=["GET"]),
        Route("/api/v1/machines/{key}/doctor", handlers.machine_doctor, methods=["GET"]),
        Route("/api/v1/machines/{key}/boots", views.boots, methods=["GET"]),
        Route("/api/v1/machines/{key}/given", views.given, methods=["GET"]),
        Route("/api/v1/machines/{mac}/enroll", views.enroll_suggestion, methods=["GET"]),
        Route("/api/v1/machines/{mac}/enroll", handlers.enroll, methods=["POST"]),
        Route("/api/v1/lab/timeline", views.timeline, methods=["GET"]),
        Route("/api/v1/settings", views.settings, methods=["GET"]),
        Route("/api/v1/session", session.status, methods=["GET"]),
        Route("/api/v1/session", session.sign_in, methods=["POST"]),
        Route("/api/v1/session", session.sign_out, methods=["DELETE"]),
        Route("/api/v1/machines/{key}/power", handlers.power, methods=["POST"]),
        Route("/api/v1/lab/events", handlers.lab_events, methods=["GET"]),
        Route("/api/v1/lab/up", handlers.lab_up, methods=["POST"]),
        Route("/api/v1/lab/down", handlers.lab_down, methods=["POST"]),
        Route("/api/v1/events", handlers.events, methods=["GET"]),
        Route("/api/v1/openapi.json", handlers.openapi, methods=["GET"]),
        Route("/metrics", handlers.metrics, methods=["GET"]),
        *dashboard_routes(),  # / and /ui/{file}: the dashboard, in the package
    ]
    return Starlette(routes=routes)
