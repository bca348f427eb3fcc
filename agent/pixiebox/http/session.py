"""Signing in to the dashboard with the API token: the session cookie, the CSRF rule, sign-out.

A browser cannot send `Authorization: Bearer` from a page without keeping the token where the
page's script can read it (localStorage: any script injection takes it, and it never expires).
So the page trades the token once for a session cookie that script cannot read (HttpOnly),
that the browser sends only to this site's own requests (SameSite=Strict), and that ends.

**Sessions are random ids kept in memory, not signed cookies.** A signed, expiring value
(HMAC with a key made from the token) would survive an agent restart, and the lab is powered off
at the wall every night; but sign-out must revoke the value on the server, and a revocation
list in memory would be forgotten at the next start, bringing a signed-out cookie back to life
until it expires (seven days). Writing revocations to disk makes the state database hold login
state for a convenience. Random ids in memory make every rule simple and fail safe: sign-out
forgets the id, a restart signs everyone out (one paste of the token in the morning), and
nothing on disk can be stolen to sign in. Only each id's SHA-256 is kept, compared with
`hmac.compare_digest`'s constant time, and at most `MAX_SESSIONS` are held (the oldest goes).

**CSRF.** A cookie is sent by the browser whoever made the page that sends the request, so an
action authorized by the cookie alone could be triggered by any site the owner visits. An action
with the cookie therefore also needs `X-Pixiebox-CSRF: 1` (a custom header: a page of another
origin can only send it after a CORS preflight, which this server never approves), and an
`Origin` header, when the browser sends one, must be this request's own scheme://host.
`Authorization: Bearer` (the CLI) needs neither: a browser never adds it on its own.

Sign-in attempts are limited per source address (`SIGNINS_PER_MINUTE`, net.limits.Quota): the
API is TCP, so a source address is a real host that completed a handshake, not a forged field;
a guesser gets 10 tries a minute against a 256-bit token. Each refusal is an `api.refused`
event in the lab's log (mac ""), a few a minute per reason at most, so a guesser cannot fill
the event table.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pixiebox.core.inventory import Inventory
from pixiebox.events import Kind
from pixiebox.http.params import body_error
from pixiebox.net.limits import Quota
from pixiebox.net.paths import printable

log = logging.getLogger("pixiebox.api")

COOKIE = "pixiebox_session"
#: How long a session lasts (the cookie's Max-Age, and on the server).
LIFETIME = 7 * 24 * 3600
#: The header every cookie-authorized action must carry (its value: "1").
CSRF_HEADER = "x-pixiebox-csrf"
#: Sessions held at once; beyond it the oldest is forgotten (a few browsers use one lab).
MAX_SESSIONS = 64
#: Sign-in attempts per source address and minute, right or wrong.
SIGNINS_PER_MINUTE = 10
#: Distinct sources the per-source quota remembers before it starts afresh: a bound on its
#: table (net.limits.Quota keeps every key it saw).
MAX_SOURCES = 1024
#: api.refused events (and log lines) per reason and minute.
REFUSALS_RECORDED = 5


def wrong_token(token_file: Path) -> str:
    """What a wrong or empty token is told: where the right one is, by the configured path."""
    return (
        f"that is not this agent's API token: copy it from {token_file} on the appliance "
        "(lab.toml [api] token_file; readable by root only)"
    )


NO_CREDENTIALS = (
    "this call changes the lab: send Authorization: Bearer <token> "
    "(the token is in [api] token_file)"
)


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str


class SessionView(BaseModel):
    signed_in: bool


class Refusal(StrEnum):
    """The `reason` of an api.refused event."""

    WRONG_TOKEN = "wrong-token"
    RATE_LIMITED = "rate-limited"
    BAD_BEARER = "bad-bearer"
    CSRF = "csrf"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def source_of(request: Request) -> str:
    return request.client.host if request.client is not None else ""


class Sessions:
    """The signed-in browsers of one agent (the module's doc says why in memory)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: SHA-256 of a session id -> when it expires (clock time), oldest first.
        self._live: OrderedDict[bytes, float] = OrderedDict()
        self._signins = Quota(SIGNINS_PER_MINUTE, 60.0, clock)
        self._sources: set[str] = set()
        self._refusals = Quota(REFUSALS_RECORDED, 60.0, clock)

    def open(self) -> str:
        """A new session id (256 random bits)."""
        value = secrets.token_urlsafe(32)
        self._live[_digest(value)] = self._clock() + LIFETIME
        while len(self._live) > MAX_SESSIONS:
            self._live.popitem(last=False)
        return value

    def valid(self, value: str | None) -> bool:
        if not value:
            return False
        wanted = _digest(value)
        now = self._clock()
        found = False
        for digest, expires in list(self._live.items()):
            if expires <= now:
                del self._live[digest]
            elif hmac.compare_digest(digest, wanted):
                found = True
        return found

    def revoke(self, value: str | None) -> None:
        if value:
            self._live.pop(_digest(value), None)

    def admit_signin(self, source: str) -> bool:
        """False: this source has tried too often this minute."""
        if source not in self._sources and len(self._sources) >= MAX_SOURCES:
            self._signins = Quota(SIGNINS_PER_MINUTE, 60.0, self._clock)
            self._sources.clear()
        self._sources.add(source)
        return self._signins.admit(source) is not None

    def refused(self, inventory: Inventory, request: Request, reason: Refusal, said: str) -> None:
        """An api.refused event in the lab's log and a log line, a few a minute per reason."""
        left_out = self._refusals.admit(reason)
        if left_out is None:
            return
        source = source_of(request)
        more = f" ({left_out} more like this not recorded)" if left_out else ""
        path = printable(request.url.path)[:120]  # a client's path: one log line, escaped
        message = f"{request.method} {path} from {source} refused ({reason}){more}"
        log.warning("%s", message)
        inventory.lifecycle.note(
            "", Kind.API_REFUSED, f"{message}: {said}", {"source": source, "reason": str(reason)}
        )


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not every browser sends it on same-origin requests
    host = request.headers.get("host", "")
    return bool(host) and origin.strip().lower() == f"{request.url.scheme}://{host}".lower()


def action_refusal(
    request: Request, token: str, sessions: Sessions, inventory: Inventory
) -> Response | None:
    """None when the request may change the lab: `Authorization: Bearer <token>`, or a valid
    session cookie with the CSRF header from this origin (the module's doc). Else the answer:
    401 with no credentials or a wrong bearer token, 403 for a cookie without the CSRF rule."""
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            _digest(given.strip()), _digest(token)
        ):
            return None
        said = wrong_token(inventory.config.api.token_file)
        sessions.refused(inventory, request, Refusal.BAD_BEARER, said)
        return _error(401, NO_CREDENTIALS)
    if not sessions.valid(request.cookies.get(COOKIE)):
        return _error(401, NO_CREDENTIALS)
    if request.headers.get(CSRF_HEADER, "").strip() != "1" or not _same_origin(request):
        said = (
            "a signed-in browser's action needs the header X-Pixiebox-CSRF: 1 and must come "
            "from the dashboard's own page; nothing was changed"
        )
        sessions.refused(inventory, request, Refusal.CSRF, said)
        return _error(403, said)
    return None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message, "problems": []}, status, headers=headers)


def _cookie(response: Response, value: str, max_age: int) -> None:
    # Written out rather than through http.cookies, which spells SameSite in lower case and
    # quotes some values. No Secure attribute: the appliance serves plain HTTP on the LAN
    # (SECURITY.md), where a Secure cookie would never be sent back.
    response.headers.append(
        "set-cookie",
        f"{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}",
    )


class SessionHandlers:
    """GET, POST and DELETE /api/v1/session."""

    def __init__(self, token: str, sessions: Sessions, inventory: Inventory) -> None:
        self.token = token
        self.sessions = sessions
        self.inventory = inventory

    async def status(self, request: Request) -> Response:
        signed_in = self.sessions.valid(request.cookies.get(COOKIE))
        return JSONResponse(SessionView(signed_in=signed_in).model_dump())

    async def sign_in(self, request: Request) -> Response:
        source = source_of(request)
        if not self.sessions.admit_signin(source):
            said = (
                f"too many sign-in attempts from {source}: wait a minute, then try again "
                "with the token from [api] token_file"
            )
            self.sessions.refused(self.inventory, request, Refusal.RATE_LIMITED, said)
            return _error(429, said, {"Retry-After": "60"})
        try:
            given = SignIn.model_validate_json(await request.body() or b"{}")
        except ValidationError as exc:
            return _error(400, body_error(exc, '{"token": "<the API token>"}'))
        if not given.token.strip() or not hmac.compare_digest(
            _digest(given.token.strip()), _digest(self.token)
        ):
            said = wrong_token(self.inventory.config.api.token_file)
            self.sessions.refused(self.inventory, request, Refusal.WRONG_TOKEN, said)
            return _error(401, said)
        response = JSONResponse(SessionView(signed_in=True).model_dump())
        _cookie(response, self.sessions.open(), LIFETIME)
        log.info("a browser at %s signed in", source)
        return response

    async def sign_out(self, request: Request) -> Response:
        """Ending a live session is an action (a foreign page must not sign the owner out);
        a cookie that is no session any more (revoked, expired, from before a restart) is only
        cleared."""
        value = request.cookies.get(COOKIE)
        if self.sessions.valid(value):
            refused = action_refusal(request, self.token, self.sessions, self.inventory)
            if refused is not None:
                return refused
            self.sessions.revoke(value)
        response = JSONResponse(SessionView(signed_in=False).model_dump())
        _cookie(response, "", 0)
        return response
