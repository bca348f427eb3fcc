"""The API's OpenAPI 3.1 document (GET /api/v1/openapi.json): every route, its parameters and
answers, the schemas taken from the pydantic models, so the document cannot drift from what the
handlers send. Its own module: the document grew with the dashboard's endpoints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from pixiebox import doctor
from pixiebox.http.api_boots import BootView, GivenView, StageView, TimelineView
from pixiebox.http.api_machines import openapi_parameters
from pixiebox.http.api_settings import SettingsView
from pixiebox.http.api_views import (
    BOOTS_DEFAULT,
    BOOTS_MAX,
    EVENTS_DEFAULT,
    EVENTS_MAX,
    EnrollSuggestion,
)
from pixiebox.http.params import MAX_EVENT_ID
from pixiebox.http.session import SessionView, SignIn

#: An action takes the bearer token (the CLI) or a signed-in browser's session (http.session).
ACTION_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"session": []}]

#: An action with a session cookie but not the CSRF rule (http.session).
CSRF_REFUSED = {
    "description": "a session cookie without X-Pixiebox-CSRF: 1, or from another origin",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorView"}}},
}

DASHBOARD_MODELS: tuple[type[BaseModel], ...] = (
    EnrollSuggestion,
    StageView,
    BootView,
    GivenView,
    TimelineView,
    SettingsView,
    SignIn,
    SessionView,
)


def openapi_document(models: Sequence[type[BaseModel]]) -> dict[str, Any]:
    """The API's OpenAPI 3.1 document, its schemas taken from the pydantic models (`models`:
    those of http.api, which imports this module; the dashboard's are added here)."""

    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    def lab_action(summary: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "security": ACTION_SECURITY,
                "requestBody": {"content": {"application/json": {"schema": ref("LabRequest")}}},
                "responses": {
                    "200": ok(ref("LabReport")),
                    "401": ok(ref("ErrorView"), "no or wrong token"),
                    "403": CSRF_REFUSED,
                },
            }
        }

    key = {"name": "key", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "a machine's name or MAC"}  # fmt: skip
    missing = ok(ref("ErrorView"), "no such machine")
    after = {"name": "after", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 0, "maximum": MAX_EVENT_ID},
             "description": "only events with a larger id"}  # fmt: skip
    mac = {"name": "mac", "in": "query", "required": False, "schema": {"type": "string"},
           "description": "only this machine's events"}  # fmt: skip
    bad_after = ok(ref("ErrorView"), "after is not an event id")
    before = {"name": "before", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 0, "maximum": MAX_EVENT_ID},
              "description": "only events with a smaller id (the Link's next page)"}  # fmt: skip
    events_limit = {"name": "limit", "in": "query", "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": EVENTS_MAX,
                               "default": EVENTS_DEFAULT},
                    "description": "events per page (without it and `before`: up to 500, as "
                    "before pages existed)"}  # fmt: skip
    link = {"Link": {"schema": {"type": "string"},
                     "description": 'the page of older events (rel="next"), absent on the '
                     "oldest"}}  # fmt: skip
    bad = ok(ref("ErrorView"), "a parameter is malformed")
    session = {
        "get": {
            "summary": "whether this browser is signed in (never 401)",
            "responses": {"200": ok(ref("SessionView"))},
        },
        "post": {
            "summary": "sign a browser in with the API token: sets the HttpOnly, "
            "SameSite=Strict cookie pixiebox_session (7 days, or until sign-out or an agent "
            "restart); sign-in attempts are limited per source address",
            "requestBody": {"content": {"application/json": {"schema": ref("SignIn")}}},
            "responses": {
                "200": ok(ref("SessionView"), "signed in"),
                "400": ok(ref("ErrorView"), 'the body is not {"token": "..."}'),
                "401": ok(ref("ErrorView"), "not this agent's token (an api.refused event)"),
                "429": ok(ref("ErrorView"), "too many attempts from this address"),
            },
        },
        "delete": {
            "summary": "sign out: the session is revoked on the server and the cookie cleared",
            "security": ACTION_SECURITY,
            "responses": {
                "200": ok(ref("SessionView"), "signed out"),
                "403": ok(ref("ErrorView"), "a cookie without the CSRF header or origin"),
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Pixiebox local API", "version": "1"},
        "components": {
            "schemas": {
                m.__name__: m.model_json_schema(ref_template="#/components/schemas/{model}")
                for m in (*models, *DASHBOARD_MODELS)
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "pixiebox_session",
                    "description": "from POST /api/v1/session; an action with it also needs "
                    "the header X-Pixiebox-CSRF: 1 and, when the browser sends Origin, this "
                    "server's own origin (else 403)",
                },
            },
        },
        "paths": {
            "/api/v1/machines": {
                "get": {
                    "summary": "machines, enrolled (lab.toml's order) then discovered (first "
                    "seen first), a page at a time: the next page's URL is in the Link header "
                    '(rel="next"), the number of machines that match in X-Total-Count',
                    "parameters": list(openapi_parameters()),
                    "responses": {
                        "200": {
                            **ok({"type": "array", "items": ref("MachineView")}),
                            "headers": {
                                "Link": {
                                    "schema": {"type": "string"},
                                    "description": 'the next page (rel="next"), absent on the last',
                                },
                                "X-Total-Count": {
                                    "schema": {"type": "integer"},
                                    "description": "machines that match, on every page",
                                },
                            },
                        },
                        "400": ok(ref("ErrorView"), "a parameter is malformed"),
                    },
                }
            },
            "/api/v1/machines/{key}": {
                "get": {
                    "summary": "one machine",
                    "parameters": [key],
                    "responses": {"200": ok(ref("MachineView")), "404": missing},
                }
            },
            "/api/v1/machines/{key}/events": {
                "get": {
                    "summary": "a machine's event log a page at a time, each page oldest "
                    "first: the newest page, or the one below `before`; with `after`, the "
                    "events after that id (catching up)",
                    "parameters": [key, after, before, events_limit],
                    "responses": {
                        "200": {
                            **ok({"type": "array", "items": ref("EventView")}),
                            "headers": link,
                        },
                        "400": bad,
                        "404": missing,
                    },
                }
            },
            "/api/v1/lab/events": {
                "get": {
                    "summary": "the lab's own log, oldest first: refusals of secrets no "
                    "machine could be named for (SECURITY.md)",
                    "parameters": [after],
                    "responses": {
                        "200": ok({"type": "array", "items": ref("EventView")}),
                        "400": bad_after,
                    },
                }
            },
            "/api/v1/machines/{key}/doctor": {
                "get": {
                    "summary": "why did (or didn't) the machine boot: its last boot attempts "
                    "as a timeline, and a verdict in plain words",
                    "parameters": [key, *doctor.QUERY_PARAMETERS],
                    "responses": {
                        "200": ok(ref("DoctorReport")),
                        "400": ok(ref("ErrorView"), "a parameter is not a number of seconds"),
                        "404": missing,
                    },
                }
            },
            "/api/v1/machines/{mac}/enroll": {
                "get": {
                    "summary": "what an enrollment with an empty body would choose now: the "
                    "next free name and (where Pixiebox hands out addresses) address; nothing "
                    "is written",
                    "parameters": [{**key, "name": "mac", "description": "the machine's MAC"}],
                    "responses": {
                        "200": ok(ref("EnrollSuggestion")),
                        "400": ok(ref("ErrorView"), "not a unicast MAC"),
                        "404": missing,
                        "409": ok(ref("ErrorView"), "already enrolled"),
                    },
                },
                "post": {
                    "summary": "add a discovered machine to lab.toml",
                    "security": ACTION_SECURITY,
                    "parameters": [{**key, "name": "mac", "description": "the machine's MAC"}],
                    "requestBody": {
                        "content": {"application/json": {"schema": ref("EnrollRequest")}}
                    },
                    "responses": {
                        "201": ok(ref("MachineView"), "enrolled"),
                        "400": ok(ref("ErrorView"), "not a unicast MAC, or a bad body"),
                        "401": ok(ref("ErrorView"), "no or wrong token"),
                        "403": CSRF_REFUSED,
                        "409": ok(ref("ErrorView"), "refused: the problems say why"),
                    },
                },
            },
            "/api/v1/machines/{key}/power": {
                "post": {
                    "summary": "switch a machine on, off, power-cycle it, or read its power; "
                    "answers when the result is seen (phone-home, power reading, silence), "
                    "trying the next driver of its chain when one does not work",
                    "security": ACTION_SECURITY,
                    "parameters": [key],
                    "requestBody": {
                        "content": {"application/json": {"schema": ref("PowerRequest")}}
                    },
                    "responses": {
                        "200": ok(ref("PowerOutcome"), "the outcome: `outcome` is ok or failed"),
                        "400": ok(ref("ErrorView"), 'the body is not {"action": ...}'),
                        "401": ok(ref("ErrorView"), "no or wrong token"),
                        "403": CSRF_REFUSED,
                        "404": missing,
                        "409": ok(
                            ref("ErrorView"),
                            "no power control in lab.toml, or "
                            "another power action on it is in progress",
                        ),
                    },
                }
            },
            "/api/v1/machines/{key}/boots": {
                "get": {
                    "summary": "the machine's last boot attempts (the doctor's), oldest first, "
                    "each with its stages in boot-chain order, their times and bytes",
                    "parameters": [
                        key,
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": BOOTS_MAX,
                                "default": BOOTS_DEFAULT,
                            },
                        },
                    ],
                    "responses": {
                        "200": ok({"type": "array", "items": ref("BootView")}),
                        "400": bad,
                        "404": missing,
                    },
                }
            },
            "/api/v1/machines/{key}/given": {
                "get": {
                    "summary": "what the machine was given: image, kernel, initrds, addresses, "
                    "and which secrets were released when and to which address (never a value)",
                    "parameters": [key],
                    "responses": {"200": ok(ref("GivenView")), "404": missing},
                }
            },
            "/api/v1/lab/timeline": {
                "get": {
                    "summary": "every enrolled machine's latest boot, and the time from the "
                    "first power-on (or DHCP request) of the current round to the last up",
                    "responses": {"200": ok(ref("TimelineView"))},
                }
            },
            "/api/v1/settings": {
                "get": {
                    "summary": "lab.toml as the agent last loaded it, every secret value "
                    'replaced by "(hidden)" on its own lines, and what pixiebox check says '
                    "about the file now",
                    "responses": {"200": ok(ref("SettingsView"))},
                }
            },
            "/api/v1/session": session,
            "/api/v1/lab/up": lab_action(
                "power on every machine with power control, staggered, and report each one's "
                "time to up (and joined), with the boot doctor's verdict for stragglers"
            ),
            "/api/v1/lab/down": lab_action(
                "power off every machine with power control, graceful drivers first, and "
                "report what is off"
            ),
            "/api/v1/events": {
                "get": {
                    "summary": "server-sent events: each event as it happens, after replaying "
                    "those after the Last-Event-ID header (or ?after=)",
                    "parameters": [after, mac],
                    "responses": {
                        "200": {"description": "text/event-stream of EventView"},
                        "400": ok(ref("ErrorView"), "after or mac is malformed"),
                    },
                }
            },
        },
    }
