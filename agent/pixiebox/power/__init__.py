"""Power drivers: one module each, behind the interface in base.py.

`make_driver` builds the driver of one `power = { driver = ... }` entry of lab.toml;
`spec_problems` checks that entry's driver-specific keys for `pixiebox check`, with the same
model the driver is built from, so the check and the driver never disagree.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pixiebox.config import PowerSection
from pixiebox.power.base import (
    Options,
    PowerAction,
    PowerDriver,
    PowerError,
    PowerState,
    PowerTarget,
)


@dataclass(frozen=True)
class _Kind:
    options: type[Options]
    build: Callable[[PowerTarget, Any], PowerDriver]
    hints: dict[str, str]


def _kinds() -> dict[str, _Kind]:
    # Imported here: the drivers import config, which imports this package for its check.
    from pixiebox.power.http import HttpDriver, HttpOptions
    from pixiebox.power.ipmi import IpmiDriver, IpmiOptions
    from pixiebox.power.qemu import QemuDriver, QemuOptions
    from pixiebox.power.redfish import RedfishDriver, RedfishOptions
    from pixiebox.power.shelly import ShellyDriver, ShellyOptions
    from pixiebox.power.ssh import SshDriver, SshOptions
    from pixiebox.power.tasmota import TasmotaDriver, TasmotaOptions
    from pixiebox.power.wol import WolDriver, WolOptions

    plug = 'the plug\'s name or address, e.g. host = "192.168.1.50"'
    return {
        "wol": _Kind(WolOptions, WolDriver, {}),
        "ssh": _Kind(SshOptions, SshDriver, {}),
        "redfish": _Kind(
            RedfishOptions,
            RedfishDriver,
            {
                "url": 'the BMC\'s address, e.g. url = "https://10.0.0.20"',
                "username": 'the BMC login, e.g. username = "admin"',
            },
        ),
        "ipmi": _Kind(
            IpmiOptions,
            IpmiDriver,
            {
                "host": 'the BMC\'s address, e.g. host = "10.0.0.21"',
                "user": 'the BMC login, e.g. user = "ADMIN"',
            },
        ),
        "tasmota": _Kind(TasmotaOptions, TasmotaDriver, {"host": plug}),
        "shelly": _Kind(ShellyOptions, ShellyDriver, {"host": plug}),
        "http": _Kind(
            HttpOptions,
            HttpDriver,
            {"url": 'a full URL, e.g. url = "http://pdu.lan/outlet/3"'},
        ),
        "qemu": _Kind(
            QemuOptions,
            QemuDriver,
            {"qmp": 'the VM\'s QMP socket, e.g. qmp = "/run/pixiebox/c1.qmp"'},
        ),
    }


def _validate(spec: PowerSection) -> tuple[_Kind, Options]:
    kind = _kinds()[spec.driver]
    return kind, kind.options.model_validate(spec.options())


def make_driver(spec: PowerSection, target: PowerTarget) -> PowerDriver:
    """The driver for one power entry; PowerError (naming the machine) for a bad entry."""
    try:
        kind, options = _validate(spec)
    except ValidationError as exc:
        problems = "; ".join(
            f"{key or 'power'}: {message}" for key, message, _ in _problems(spec, exc)
        )
        raise PowerError(
            f"{spec.driver} power of {target.name} ({target.mac}) is misconfigured in lab.toml: "
            f"{problems} (run pixiebox check)"
        ) from None
    return kind.build(target, options)


def _message(item: Any) -> str:
    message = str(item["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if item["type"] == "literal_error":
        message = f"{item['input']!r} is not allowed; " + message.replace("Input should", "it must")
    return message


def _problems(spec: PowerSection, error: ValidationError) -> list[tuple[str, str, str]]:
    kind = _kinds()[spec.driver]
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"] if not str(part).startswith("function-")]
        key = ".".join(loc)
        last = loc[-1] if loc else ""
        if item["type"] == "extra_forbidden":
            model: Any = kind.options
            for part in loc[:-1]:  # a nested request table of the http driver
                field = model.model_fields.get(part)
                args = getattr(field.annotation, "__args__", ()) if field else ()
                model = next((a for a in args if isinstance(a, type)), None)
                if model is None or not hasattr(model, "model_fields"):
                    break
            choices = list(model.model_fields) if model is not None else []
            close = difflib.get_close_matches(last, choices, n=1, cutoff=0.6)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else f"the {spec.driver} driver knows: {', '.join(choices)}"
            )
            problems.append((key, f"unknown key {last!r} for the {spec.driver} driver", hint))
        elif item["type"] == "missing":
            problems.append(
                (key, f"the {spec.driver} driver needs {last!r}", kind.hints.get(last, ""))
            )
        else:
            problems.append((key, _message(item), kind.hints.get(last, "")))
    return problems


def spec_problems(spec: PowerSection) -> list[tuple[str, str, str]]:
    """(key, message, hint) for each problem with one power entry's driver-specific keys."""
    try:
        _validate(spec)
    except ValidationError as exc:
        return _problems(spec, exc)
    return []


__all__ = [
    "PowerAction",
    "PowerDriver",
    "PowerError",
    "PowerSection",
    "PowerState",
    "PowerTarget",
    "make_driver",
    "spec_problems",
]
