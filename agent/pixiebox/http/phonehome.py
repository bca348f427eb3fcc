"""`POST /api/v1/phone-home`: the booted OS says it is up, or that it joined Kubernetes.

A phone-home moves a machine's state, so it is attributed only by evidence (core.trust,
SECURITY.md): the machine the kernel's neighbour entry on the lab interface names at the source
address. `?mac=` is a claim: it must name that same machine, or the phone-home is refused (an
attacker's own address never marks another machine up). The "up" report retires the machine's
boot token: from then on its metadata is not handed out again until its next boot.

The "up" report may say whether Secure Boot is on (`"secure_boot": "on" | "off"`, issue 16): only
the booted OS can tell, from the firmware's SecureBoot variable in efivarfs; the agent sees
nothing of it on the wire (shim and a signed GRUB fetch the same files either way). It is the
machine's own claim, not evidence: any OS that can phone home for the machine can say "on", so
it is stored and shown as what the machine reported (`os.up`'s field, the machine's
`secure_boot` in the API) and nothing is decided on it. Older OSes send no key: nothing is shown.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from ipaddress import IPv4Address

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from pixiebox.config import normalize_mac
from pixiebox.core.evidence import Source
from pixiebox.core.inventory import Inventory
from pixiebox.events import FieldValue, Kind
from pixiebox.http.params import shown

log = logging.getLogger("pixiebox.http.phonehome")

#: What a phone-home may report; the empty body of older clients means "up".
PHONE_HOME_STATES = ("up", "joined")
#: What the optional `secure_boot` key may say (absent: the OS did not report it).
SECURE_BOOT_VALUES = ("on", "off")
#: Bytes of a phone-home body read at most: it is one small JSON object.
PHONE_HOME_MAX = 4096
#: What a refusal tells the OS to send instead.
_SEND = '{"state": "up" | "joined", "secure_boot": "on" | "off" (optional)}'


@dataclass(frozen=True, slots=True)
class PhoneHome:
    """What a phone-home body says: the state, and Secure Boot as the OS reports it (None: not
    reported)."""

    state: str
    secure_boot: str | None = None


async def phone_home_report(request: Request) -> PhoneHome | str:
    """What a phone-home reports, else the sentence that refuses it (a 400)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > PHONE_HOME_MAX:
            return f"the phone-home body is over {PHONE_HOME_MAX} bytes\n"
    if not body.strip():
        return PhoneHome("up")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # "[[[[..." past json's nesting limit: RecursionError
        return f"the phone-home body is not JSON; send nothing, or {_SEND}\n"
    if not isinstance(document, dict):
        return f"the phone-home body is not a JSON object; send nothing, or {_SEND}\n"
    state = document.get("state", "up")
    if state not in PHONE_HOME_STATES:
        return f"unknown phone-home state {shown(state)}; send {_SEND}\n"
    secure_boot = document.get("secure_boot")
    if secure_boot is not None and secure_boot not in SECURE_BOOT_VALUES:
        return (
            f'secure_boot must be "on" or "off" (or left out), not {shown(secure_boot)}; the '
            "OS reads it from the SecureBoot variable in efivarfs\n"
        )
    return PhoneHome(str(state), None if secure_boot is None else str(secure_boot))


def _address_fields(ip: IPv4Address | None) -> dict[str, FieldValue]:
    return {"ip": str(ip)} if ip is not None else {}


async def phone_home_response(
    inventory: Inventory, request: Request, ip: IPv4Address | None
) -> Response:
    """The answer to a phone-home from `ip` (see the module docstring)."""
    report = await phone_home_report(request)
    if isinstance(report, str):
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
    if report.state == "joined":
        inventory.record(
            mac, Kind.OS_JOINED, f"its Kubernetes node is running (kubelet healthy) at {ip}",
            ip, _address_fields(ip),
        )  # fmt: skip
        log.info("%s phoned home: joined Kubernetes", who)
        return PlainTextResponse("ok\n")
    inventory.tokens.retire(mac)
    fields = _address_fields(ip)
    said = ""
    if report.secure_boot is not None:
        fields["secure_boot"] = report.secure_boot
        said = f" (it reports Secure Boot {report.secure_boot})"
    inventory.record(mac, Kind.OS_UP, f"the OS is up at {ip}{said}", ip, fields)
    log.info("%s phoned home: the OS is up%s", who, said)
    return PlainTextResponse("ok\n")
