"""The dashboard's routes: `/` (the page) and `/ui/{file}` (its script and style), served from the
files shipped in the package (pixiebox/http/ui), on the API's listener.

Only the files in `FILES` are ever served: the name in the URL is looked up in that fixed table,
never joined to a path, so `/ui/../x`, encoded variants and files a packager left beside them are
404 without a path rule to get wrong. The files are read once, when the app is built (they are
part of the release, not data), and answered from memory with an ETag.

The page is plain ES modules (app.js imports the others by their /ui/ URL: no build step, no
library), each listed in `FILES`; a module the table lacks is a 404 and the page does not start,
which tests/test_dashboard.py catches by following every import.

The page runs with `Content-Security-Policy: default-src 'self'` and no inline script or style:
it is served to anyone on the LAN and a signed-in browser carries a session that can power
machines off, so a machine name or syslog line that smuggles markup into the page must not be
able to run script or send data to another host (the page builds its DOM with textContent,
never innerHTML; SVG with createElementNS and setAttribute).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pixiebox.events import Kind

#: Every file the dashboard ships, and its content type. Nothing else is served under /ui/.
FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "auth.js": "text/javascript; charset=utf-8",
    "live.js": "text/javascript; charset=utf-8",
    "format.js": "text/javascript; charset=utf-8",
    "machines.js": "text/javascript; charset=utf-8",
    "machine.js": "text/javascript; charset=utf-8",
    "lab.js": "text/javascript; charset=utf-8",
    "settings.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

#: The event stream names each event by its kind (`event: dhcp.offer`), and an EventSource only
#: delivers named events to listeners for those names: the page learns every kind from this
#: attribute of its <html>, filled in here, so a kind added to pixiebox.events is never missed.
KINDS_PLACEHOLDER = "@KINDS@"

SECURITY_HEADERS: dict[str, str] = {
    # No inline script or style, nothing from another origin, no framing (clickjacking of the
    # power and enroll buttons), no form posting elsewhere.
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class _File:
    body: bytes
    media_type: str
    etag: str


def _load() -> dict[str, _File]:
    ui = resources.files("pixiebox.http").joinpath("ui")
    loaded: dict[str, _File] = {}
    for name, media_type in FILES.items():
        body = ui.joinpath(name).read_bytes()
        if name == "index.html":
            kinds = " ".join(kind.value for kind in Kind)
            body = body.replace(KINDS_PLACEHOLDER.encode(), kinds.encode())
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        loaded[name] = _File(body, media_type, etag)
    return loaded


def _answer(request: Request, shipped: _File) -> Response:
    # no-cache: the browser keeps the file but asks each time (a 304 costs nothing), so an
    # upgraded agent's page is never mixed with an old script.
    headers = {**SECURITY_HEADERS, "ETag": shipped.etag, "Cache-Control": "no-cache"}
    given = request.headers.get("if-none-match", "")
    if shipped.etag in (tag.strip().removeprefix("W/") for tag in given.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(shipped.body, media_type=shipped.media_type, headers=headers)


def dashboard_routes() -> list[Route]:
    """`/` and `/ui/{file}`, to mount on the API app."""
    files = _load()

    async def index(request: Request) -> Response:
        return _answer(request, files["index.html"])

    async def ui_file(request: Request) -> Response:
        shipped = files.get(str(request.path_params["file"]))
        if shipped is None:
            return Response("no such dashboard file\n", status_code=404,
                            media_type="text/plain; charset=utf-8",
                            headers=SECURITY_HEADERS)  # fmt: skip
        return _answer(request, shipped)

    return [
        Route("/", index, methods=["GET"]),  # Starlette answers HEAD for GET routes
        Route("/ui/{file}", ui_file, methods=["GET"]),
    ]
