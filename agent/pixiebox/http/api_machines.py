"""The API's machines: one machine as it is shown (`MachineView`), finding one by name or MAC, and
the listing GET /api/v1/machines with filters and pages.

The listing runs on the event loop that answers DHCP, and any device on the LAN can add
discovered machines (up to [boot] max_discovered), so a page costs what it shows, never a walk of
the inventory: enrolled machines come from lab.toml (a person's list), discovered ones from an
index walk of the store that starts at the page's key (keyset paging: a page stays right while a
DHCP storm adds and forgets machines, where an offset would skip or repeat them).

The body stays a JSON array of machines, as before pages existed; what a client needs for the
next page is in headers: `Link: <...>; rel="next"` (RFC 8288) and `X-Total-Count` (machines that
match the filters, on every page).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode

from pydantic import BaseModel, Field

from pixiebox.config import MachineSection, normalize_mac
from pixiebox.core.decision import decide
from pixiebox.core.inventory import Inventory
from pixiebox.core.lifecycle import MachineState
from pixiebox.core.oui import vendor_of
from pixiebox.http.params import bool_parameter, choices_parameter, count_parameter, shown
from pixiebox.power.base import PowerState
from pixiebox.power.views import PowerView, derived_power
from pixiebox.store.state import MachineRecord

#: Machines per page when the client does not say, and at most. Existing callers that read the
#: body alone (a lab of a few dozen machines) get every machine in one page; a page of the
#: largest size costs the event loop about 10 ms to build (20 µs a machine), not seconds.
DEFAULT_LIMIT = 100
MAX_LIMIT = 500

#: How a discovered machine's API state is stored: a record without a state is discovered.
_STORED: dict[MachineState, tuple[str, ...]] = {
    MachineState.DISCOVERED: ("", MachineState.DISCOVERED),
    MachineState.ENROLLED: (),  # only lab.toml's machines are enrolled
}

#: A cursor as the Link header gives it: where the enrolled part goes on (an index into
#: lab.toml's machines), or the key of the last discovered machine of the page before.
_ENROLLED_CURSOR = re.compile(r"e~(\d{1,9})")
_DISCOVERED_CURSOR = re.compile(r"d~([0-9.e+-]{1,32})~([0-9a-f:]{17})")


class MachineView(BaseModel):
    name: str | None
    mac: str
    ip: str | None
    arch: str | None
    firmware: str | None
    vendor: str | None
    state: MachineState
    enrolled: bool
    image: str | None
    first_seen: float | None
    last_seen: float | None
    #: Last known power state: read by a driver, seen by a verified action, or from events.
    power: PowerState = PowerState.UNKNOWN
    power_since: float | None = None
    power_detail: str = ""
    #: The drivers of its power chain in lab.toml (empty: no power control).
    power_control: list[str] = []
    #: What its OS said at its latest phone-home: the machine's own claim, not verified.
    secure_boot: Literal["on", "off"] | None = Field(
        default=None,
        description="Secure Boot as the machine's OS reported it at its latest phone-home "
        "(its own claim, not verified by the agent); null: not reported",
    )


PowerOf = Callable[[str, MachineRecord | None], PowerView]

#: A stored Secure Boot report as the API shows it (anything else, "" included: not reported).
_REPORTED: dict[str, Literal["on", "off"]] = {"on": "on", "off": "off"}


def machine_view(
    inventory: Inventory,
    mac: str,
    record: MachineRecord | None,
    machine: MachineSection | None,
    power_of: PowerOf | None = None,
) -> MachineView:
    """How the API shows `mac`: `machine` is its lab.toml entry (None: discovered)."""
    power = power_of(mac, record) if power_of is not None else derived_power(record)
    if machine is not None and machine.ip:
        ip: str | None = str(machine.ip)
    else:
        ip = record.ip or None if record else None
    return MachineView(
        power=power.state, power_since=power.since, power_detail=power.detail,
        power_control=[spec.driver for spec in machine.power_chain()] if machine else [],
        name=machine.name if machine else None, mac=mac, ip=ip,
        arch=record.arch or None if record else None,
        firmware=record.firmware or None if record else None, vendor=vendor_of(mac),
        state=inventory.lifecycle.state_of(record, enrolled=machine is not None),
        enrolled=machine is not None, image=decide(inventory.lab, mac, None).image_name,
        first_seen=record.first_seen if record else None,
        last_seen=record.last_seen if record else None,
        secure_boot=_REPORTED.get(record.secure_boot) if record else None,
    )  # fmt: skip


def find_machine(
    inventory: Inventory, key: str, power_of: PowerOf | None = None
) -> MachineView | None:
    """A machine by name or MAC (any spelling): lab.toml's first, then the store's record."""
    try:
        mac: str | None = normalize_mac(key)
    except ValueError:
        mac = None
    name = key.lower()
    for machine in inventory.lab.config.machines:
        if machine.mac == mac or machine.name == name:
            record = inventory.lifecycle.record_of(machine.mac)
            return machine_view(inventory, machine.mac, record, machine, power_of)
    record = inventory.lifecycle.record_of(mac) if mac is not None else None
    if mac is None or record is None:
        return None
    return machine_view(inventory, mac, record, None, power_of)


@dataclass(frozen=True, slots=True)
class MachineQuery:
    """GET /api/v1/machines's parameters, read strictly (ValueError: a 400 sentence)."""

    states: frozenset[MachineState] | None
    enrolled: bool | None
    limit: int
    #: Where the page starts: ("e", index into lab.toml's machines) or ("d", (first_seen, mac)).
    start: tuple[str, Any] | None

    @classmethod
    def read(cls, query: Any) -> MachineQuery:
        """From the request's query parameters (a Starlette QueryParams or a dict)."""
        states = choices_parameter("state", query.get("state"), [str(s) for s in MachineState])
        return cls(
            states=frozenset(MachineState(s) for s in states) if states is not None else None,
            enrolled=bool_parameter("enrolled", query.get("enrolled")),
            limit=count_parameter("limit", query.get("limit"), DEFAULT_LIMIT, MAX_LIMIT),
            start=_cursor(query.get("cursor")),
        )

    def link(self, cursor: str) -> str:
        """The path and query of the page that starts at `cursor`, these filters kept."""
        params: list[tuple[str, str]] = []
        if self.states is not None:
            params.append(("state", ",".join(sorted(self.states))))
        if self.enrolled is not None:
            params.append(("enrolled", str(self.enrolled).lower()))
        params += [("limit", str(self.limit)), ("cursor", cursor)]
        return f"/api/v1/machines?{urlencode(params)}"


def _cursor(raw: str | None) -> tuple[str, Any] | None:
    text = (raw or "").strip().lower()
    if not text:
        return None
    enrolled = _ENROLLED_CURSOR.fullmatch(text)
    if enrolled is not None:
        return ("e", int(enrolled[1]))
    discovered = _DISCOVERED_CURSOR.fullmatch(text)
    if discovered is not None:
        try:
            return ("d", (float(discovered[1]), discovered[2]))
        except ValueError:
            pass
    raise ValueError(
        f'cursor must be one a page\'s Link header (rel="next") gave, not {shown(raw)}; '
        "leave it out for the first page"
    )


@dataclass(frozen=True, slots=True)
class MachinePage:
    machines: list[MachineView]
    #: Machines that match the filters, on every page.
    total: int
    #: The cursor of the next page; None: this is the last.
    next: str | None

    def headers(self, query: MachineQuery) -> dict[str, str]:
        headers = {"X-Total-Count": str(self.total)}
        if self.next is not None:
            headers["Link"] = f'<{query.link(self.next)}>; rel="next"'
        return headers


def machine_page(
    inventory: Inventory, query: MachineQuery, power_of: PowerOf | None = None
) -> MachinePage:
    """One page of GET /api/v1/machines: lab.toml's machines in its order, then the discovered
    ones by when they were first seen."""
    lifecycle = inventory.lifecycle
    machines = inventory.lab.config.machines
    enrolled_macs = [machine.mac for machine in machines]
    records = lifecycle.records_of(enrolled_macs)  # lab.toml's size: a person's list

    def wanted(state: MachineState) -> bool:
        return query.states is None or state in query.states

    views: list[MachineView] = []
    following: str | None = None
    enrolled_total = 0
    if query.enrolled is not False:
        first = query.start[1] if query.start is not None and query.start[0] == "e" else 0
        if query.start is not None and query.start[0] == "d":
            first = len(machines)  # the page before ended among the discovered
        for index, machine in enumerate(machines):
            record = records.get(machine.mac)
            if not wanted(lifecycle.state_of(record, enrolled=True)):
                continue
            enrolled_total += 1
            if index < first or following is not None:
                continue
            if len(views) == query.limit:
                following = f"e~{index}"
                continue
            views.append(machine_view(inventory, machine.mac, record, machine, power_of))
    if query.enrolled is True:
        return MachinePage(views, enrolled_total, following)
    stored: list[str] | None = None
    if query.states is not None:
        stored = [s for state in sorted(query.states) for s in _STORED.get(state, (state,))]
    total = enrolled_total + lifecycle.count(enrolled_macs, stored)
    if following is not None:
        return MachinePage(views, total, following)
    after = query.start[1] if query.start is not None and query.start[0] == "d" else None
    room = query.limit - len(views)
    page = lifecycle.page(after, room + 1, enrolled_macs, stored)
    if len(page) > room:
        page = page[:room]
        last = page[-1] if page else None
        if last is not None:
            following = f"d~{last.first_seen!r}~{last.mac}"
        elif views:
            following = f"e~{len(machines)}"  # the page is full of enrolled ones
    views += [machine_view(inventory, r.mac, r, None, power_of) for r in page]
    return MachinePage(views, total, following)


def machine_views(inventory: Inventory, power_of: PowerOf | None = None) -> list[MachineView]:
    """Every machine, page after page (tests and tools; the agent itself counts states with
    `state_counts`, which reads no page)."""
    views: list[MachineView] = []
    start: tuple[str, Any] | None = None
    while True:
        query = MachineQuery(None, None, MAX_LIMIT, start)
        page = machine_page(inventory, query, power_of)
        views += page.machines
        if page.next is None:
            return views
        start = _cursor(page.next)


def state_counts(inventory: Inventory) -> dict[MachineState, int]:
    """How many machines are in each state (the /metrics gauge), from one GROUP BY and lab.toml:
    no view is built."""
    lifecycle = inventory.lifecycle
    enrolled = [machine.mac for machine in inventory.lab.config.machines]
    counts: dict[MachineState, int] = {}
    records = lifecycle.records_of(enrolled)
    for mac in enrolled:
        state = lifecycle.state_of(records.get(mac), enrolled=True)
        counts[state] = counts.get(state, 0) + 1
    for stored, count in lifecycle.stored_states(enrolled).items():
        state = MachineState(stored) if stored in _STATES else MachineState.DISCOVERED
        counts[state] = counts.get(state, 0) + count
    return counts


_STATES = frozenset(str(state) for state in MachineState)


def openapi_parameters() -> Sequence[dict[str, Any]]:
    """GET /api/v1/machines's query parameters, for the OpenAPI document."""
    states = [str(state) for state in MachineState]
    return [
        {"name": "state", "in": "query", "required": False, "schema": {"type": "string"},
         "description": f"only machines in these states, comma-separated: {', '.join(states)}"},
        {"name": "enrolled", "in": "query", "required": False, "schema": {"type": "boolean"},
         "description": "true: only lab.toml's machines; false: only discovered ones"},
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                    "default": DEFAULT_LIMIT},
         "description": "machines per page"},
        {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
         "description": 'where the page starts: from the Link header (rel="next") of the page '
         "before; absent for the first page"},
    ]  # fmt: skip
