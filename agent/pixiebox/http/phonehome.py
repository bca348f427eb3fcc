"""`POST /api/v1/phone-home`: the booted OS says it is up, or that it joined Kubernetes.

A phone-home moves a machine's state, so it is attributed only by evidence (core.trust,
SECURITY.md): the machine the kernel's neighbour entry on the lab interface names at the source
address. `?mac=` is a claim: it must name that same machine, or the phone-home is refused (an
attacker's own address never marks another machine up). The "up" report retires the machine's
boot token: from then on its metadata is not handed out again until its next boot.
"""

from __future__ import annotations

import json
import logging
from ipaddress import IPv4Address

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from pixiebox.config import normalize_mac
from pixiebox.core.evidence import Source
from pixiebox.core.inventory import Inventory
from pixiebox.events import Fields, Kind

log = logging.getLogger("pixiebox.http.phonehome")

#: What a phone-home may report; the empty body of older clients means "up".
PHONE_HOME_STATES = ("up", "joined")
#: Bytes of a phone-home body read at most: it is one small JSON object.
PHONE_HOME_MAX = 4096


async def phone_home_state(request: Request) -> str:
    """The state a phone-home reports ("up" or "joined"), else the sentence that refuses it."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > PHONE_HOME_MAX:
            return f"the phone-home body is over {PHONE_HOME_MAX} bytes\n"
    if not body.strip():
        return "up"
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # "[[[[..." past json's nesting limit: RecursionError
        return 'the phone-home body is not JSON; send nothing, or {"state": "up" | "joined"}\n'
    state = document.get("state", "up") if isinstance(document, dict) else None
    if state not in PHONE_HOME_STATES:
        return f'unknown phone-home state {state!r}; send {{"state": "up" | "joined"}}\n'
    return str(state)


def _address_fields(ip: IPv4Address | None) -> Fields:
    return {"ip": str(ip)} if ip is not None else {}


async def phone_home_response(
    inventory: Inventory, request: Request, ip: IPv4Address | None
) -> Response:
    """The answer to a phone-home from `ip` (see the module docstring)."""
    report = await phone_home_state(request)
    if report not in PHONE_HOME_STATES:
        return PlainTextResponse(report, 400)
    claimed: str | None = None
    if request.query_params.get("mac"):
        try:
            claimed = normalize_mac(request.query_params["mac"])
        except ValueError:
            return PlainTextResponse("mac is not a MAC address\n", 400)
    verdict = inventory.prove(ip, claimed)
    mac = verdict.mac
    if mac is None or ip is None:
        sentence = inventory.refuse(claimed, "phone-home", ip, verdict)
        return PlainTextResponse(
            f"{sentence}; a phone-home counts only from the machine's own address on the lab "
            "segment\n",
            403 if claimed is not None else 404,
        )
    inventory.learn(mac, ip, Source.PHONE_HOME)
    who = inventory.describe_address(ip)
    if report == "joined":
        inventory.record(
            mac, Kind.OS_JOINED, f"its Kubernetes node is running (kubelet healthy) at {ip}",
            ip, _address_fields(ip),
        )  # fmt: skip
        log.info("%s phoned home: joined Kubernetes", who)
        return PlainTextResponse("ok\n")
    inventory.tokens.retire(mac)
    inventory.record(mac, Kind.OS_UP, f"the OS is up at {ip}", ip, _address_fields(ip))
    log.info("%s phoned home: the OS is up", who)
    return PlainTextResponse("ok\n")
