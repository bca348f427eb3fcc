"""The API's query parameters, headers and JSON bodies, read strictly: a bad one is a 400
with one sentence naming it, its value and what it may be (never a 500 with a traceback, never
silently read as a default that hides the client's bug)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from pixiebox.config import normalize_mac

#: The largest event id: SQLite's INTEGER (a larger Python int makes sqlite3 raise).
MAX_EVENT_ID = 2**63 - 1


def shown(raw: object) -> str:
    """A client's value quoted in an error sentence, cut short: the sentence is for a person,
    and an echo of a megabyte parameter would make the error the flood."""
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


def event_id_parameter(name: str, raw: str | None) -> int:
    """An event id from a query parameter or header (`after`, Last-Event-ID); 0 when absent.
    ValueError names the parameter, the value and what is allowed: a client that sent
    `after=abc` or `after=-1` asked for something, and silently replaying from 0 (or a 500)
    would hide its bug."""
    text = (raw or "").strip()
    if not text:
        return 0
    # isdigit() alone would let "²" through to int(); the length check keeps int() off a
    # 100,000-digit string (CPython refuses those with its own ValueError).
    if text.isascii() and text.isdigit() and len(text) <= 19 and int(text) <= MAX_EVENT_ID:
        return int(text)
    raise ValueError(
        f"{name} must be an event id, a whole number from 0 to {MAX_EVENT_ID}, not {shown(raw)}"
    )


def mac_parameter(name: str, raw: str | None) -> str | None:
    """A MAC from a query parameter (any usual spelling); None when absent."""
    if raw is None or not raw.strip():
        return None
    try:
        return normalize_mac(raw)
    except ValueError:
        raise ValueError(
            f"{name} must be a MAC address like 52:54:00:12:34:56, not {shown(raw)}"
        ) from None


def count_parameter(name: str, raw: str | None, default: int, maximum: int) -> int:
    """A whole number from 1 to `maximum` (a page's `limit`); `default` when absent. A larger
    one is refused, not cut down: a client asking for 5,000 and silently getting 1,000 would
    take the page for everything."""
    text = (raw or "").strip()
    if not text:
        return default
    if text.isascii() and text.isdigit() and len(text) <= 9 and 1 <= int(text) <= maximum:
        return int(text)
    raise ValueError(
        f"{name} must be a whole number from 1 to {maximum}, not {shown(raw)}; "
        'follow the Link header (rel="next") for the next page'
    )


def bool_parameter(name: str, raw: str | None) -> bool | None:
    """`true` or `false` (any case); None when absent."""
    text = (raw or "").strip().lower()
    if not text:
        return None
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(f"{name} must be true or false, not {shown(raw)}")


def choices_parameter(name: str, raw: str | None, allowed: Sequence[str]) -> list[str] | None:
    """One or more of `allowed`, comma-separated (`state=up,joined`); None when absent."""
    text = (raw or "").strip()
    if not text:
        return None
    chosen = [part.strip().lower() for part in text.split(",")]
    wrong = [part for part in chosen if part not in allowed]
    if wrong or len(chosen) > len(allowed):
        raise ValueError(
            f"{name} must be one or more of {', '.join(allowed)} (comma-separated), "
            f"not {shown(raw)}"
        )
    return chosen


def body_error(exc: ValidationError, example: str) -> str:
    """One sentence for a JSON body that does not fit its model: which key, its value, and
    what it may be, then an example of a good body."""
    problems: list[str] = []
    for error in exc.errors():
        kind, loc, msg = error["type"], error["loc"], str(error["msg"])
        key = ".".join(str(part) for part in loc)
        if kind == "json_invalid":
            problems.append(f"the body is not JSON ({msg.removeprefix('Invalid JSON: ')})")
        elif not key:
            problems.append(f"the body must be a JSON object, not {shown(error['input'])}")
        elif kind == "missing":
            problems.append(f"the body has no {key}")
        elif kind == "extra_forbidden":
            problems.append(f"the body has an unknown key {key!r}")
        else:
            problems.append(
                f"the body's {key} is {shown(error['input'])}: "
                f"{msg[0].lower()}{msg[1:]}"  # pydantic's "Input should be ..."
            )
    return f"{'; '.join(problems[:5])}; send JSON like {example}"
