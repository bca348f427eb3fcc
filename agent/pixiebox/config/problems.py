"""What is wrong with lab.toml, said the way a person fixes it: the key path, the line, what is
wrong and a hint, every problem at once, never a traceback.

pydantic's validation errors become `Problem`s here (with "did you mean" for unknown keys), and
the checks that span several keys (duplicates, addresses outside the subnet, a pool overlapping
a reservation, each power entry's driver keys) live in `consistency_problems`, which takes the
sections separately so that it runs even when one machine entry is malformed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from pixiebox.config.power_options import DRIVER_OPTIONS, KEY_HINTS, driver_options
from pixiebox.config.schema import (
    ARCH_NAMES,
    BootSection,
    ImageArch,
    ImageSection,
    LabConfig,
    MachineSection,
    NetworkSection,
    PowerSection,
)
from pixiebox.config.tomlscan import Loc

__all__ = [
    "ConfigError",
    "EnrollError",
    "Loc",
    "Problem",
    "clean_message",
    "consistency_problems",
    "driver_option_problems",
    "error_count",
    "format_loc",
    "format_problem",
    "problems_from_validation",
    "spec_problems",
]


@dataclass(frozen=True, slots=True)
class Problem:
    loc: Loc
    message: str
    hint: str = ""
    severity: Literal["error", "warning"] = "error"
    line: int | None = None
    #: How many problems this one stands for: the last of a bounded list says "... and N more
    #: problems" and counts N, so that "N error(s)" stays true.
    count: int = 1


def error_count(problems: list[Problem]) -> int:
    """The errors among `problems`, counting those a bounded list left out."""
    return sum(p.count for p in problems if p.severity == "error")


def format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(file)"


def format_problem(path: Path, problem: Problem) -> str:
    where = f"{path}:{problem.line}" if problem.line else str(path)
    text = f"{where}: {problem.severity}: {format_loc(problem.loc)}: {problem.message}"
    if problem.hint:
        text += f"\n    hint: {problem.hint}"
    return text


class ConfigError(Exception):
    """lab.toml could not be used; `problems` says why, each with its key and line."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(format_problem(path, p) for p in problems))


class EnrollError(Exception):
    """A change to lab.toml was refused and nothing was written; `problems` says why, each with
    its key path, a hint and (when it is in the file as it is) a line, like `pixiebox check`."""

    def __init__(self, problems: list[Problem], path: Path | None = None) -> None:
        self.problems = problems
        self.path = path
        where = path if path is not None else Path("lab.toml")
        super().__init__("\n".join(format_problem(where, p) for p in problems))


# --- pydantic errors to problems ---------------------------------------------------------------


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The section model that owns the last key of loc, for "did you mean" suggestions."""
    model: Any = LabConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if model is LabConfig and part == "images":
            model = ImageSection
            continue
        if model is ImageSection and part == "arch":
            model = ImageArch
            continue
        field = model.model_fields.get(part)
        if field is None:
            if model in (ImageSection, ImageArch):  # an image's name, an architecture's
                continue
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


_HINTS: dict[tuple[str, str], str] = {
    ("network", "dhcp_mode"): 'one of "proxy" (beside your router), "reservation" or "full"',
    ("boot", "unknown"): 'one of "discover", "enroll" or "ignore"',
    ("network", "lease_time"): 'write a duration like "90s", "30m", "1h", "1h30m" or "2d"',
    ("network", "dhcp_probe_time"): 'write a duration like "2s"',
    ("network", "pool"): 'write the first and last address: "192.168.1.200-192.168.1.250"',
    ("network", "subnet"): 'a network in CIDR form, e.g. "192.168.1.0/24"',
}


def _hint_for(loc: Loc, error_type: str) -> str:
    named = tuple(p for p in loc if isinstance(p, str))
    if named[-1:] == ("mac",) and error_type != "mac_not_unicast":  # values.MAC_NOT_UNICAST
        return 'write six hex pairs, e.g. "f4:4d:30:64:7a:3a" (dashes and dots also work)'
    if named[-1:] == ("ip",) or error_type.startswith("ip_v4"):
        return 'write a dotted IPv4 address such as "192.168.1.31"'
    if named[-1:] == ("name",) and named[:1] == ("machines",):
        return "use lower-case letters, digits and dashes (it becomes a DNS name)"
    if named[-1:] == ("driver",):
        return f"one of {', '.join(DRIVER_OPTIONS)}"
    if len(named) == 3 and named[0] == "images" and named[2] == "arch":
        return f'a table per architecture: [images.{named[1]}.arch.arm64] with kernel = "..."'
    if len(named) == 5 and named[0] == "images" and named[2] == "arch" and named[4] == "kernel":
        return (
            f"[images.{named[1]}.arch.{named[3]}] names that architecture's own kernel "
            "(initrd, cmdline, fdtdir and fdt are optional)"
        )
    key = (named[-2], named[-1]) if len(named) >= 2 else ("", "")
    return _HINTS.get(key, "")


def clean_message(error: Any) -> str:
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if error["type"] == "literal_error":
        message = f"{error['input']!r} is not allowed; " + message.replace(
            "Input should", "it must"
        )
    elif error["type"] == "missing":
        message = "this key is required"
    return message


#: What people write for the architectures an image names (Debian's, the kernel's, iPXE's, the
#: firmware table's), and the name lab.toml takes: mkosi's.
_ARCH_ALIASES = {
    "amd64": "x86-64",
    "x86_64": "x86-64",
    "x64": "x86-64",
    "i386": "x86-64",
    "i686": "x86-64",
    "aarch64": "arm64",
    "armv8": "arm64",
    "arm": "armhf",
    "arm32": "armhf",
    "armv7": "armhf",
    "armv7l": "armhf",
    "armel": "armhf",
    "riscv": "riscv64",
}


def _arch_problem(loc: Loc, image: str, key: str) -> Problem:
    """An [images.NAME.arch.<key>] table whose key is no architecture: at the table's line."""
    close = _ARCH_ALIASES.get(key.lower()) or next(
        iter(difflib.get_close_matches(key, ARCH_NAMES, n=1, cutoff=0.6)), None
    )
    names = f"{', '.join(ARCH_NAMES)} (mkosi's names)"
    hint = f"did you mean {close!r}? Architectures: {names}" if close else f"one of {names}"
    hint += f"; a machine of any other architecture boots [images.{image}] itself"
    return Problem(loc, f"{key!r} is not an architecture an image can name", hint)


def problems_from_validation(error: ValidationError, limit: int | None = None) -> list[Problem]:
    """The first `limit` (all if None) of `error`'s problems: each unknown key costs a "did
    you mean" search, which a file of 100,000 typos should not pay for problems never shown."""
    problems = []
    for item in error.errors()[:limit]:
        loc: Loc = tuple(item["loc"])
        if loc[-1:] == ("[key]",) and loc[-3:-2] == ("arch",) and len(loc) >= 5:
            # pydantic places a bad dict key at ("images", NAME, "arch", KEY, "[key]").
            problems.append(_arch_problem(loc[:-1], str(loc[-4]), str(loc[-2])))
            continue
        if item["type"] == "extra_forbidden":
            key = str(loc[-1])
            model = _model_at(loc)
            choices = list(model.model_fields) if model else []
            close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else (f"known keys here: {', '.join(choices)}" if choices else "")
            )
            problems.append(Problem(loc, f"unknown key {key!r}", hint))
            continue
        problems.append(Problem(loc, clean_message(item), _hint_for(loc, item["type"])))
    return problems


# --- a power entry's driver keys ---------------------------------------------------------------


def driver_option_problems(
    spec: PowerSection, error: ValidationError
) -> list[tuple[str, str, str]]:
    """(key, message, hint) for each error of one power entry's driver keys."""
    model_of_driver = DRIVER_OPTIONS[spec.driver]
    hints = KEY_HINTS.get(spec.driver, {})
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"] if not str(part).startswith("function-")]
        key = ".".join(loc)
        last = loc[-1] if loc else ""
        if item["type"] == "extra_forbidden":
            model: Any = model_of_driver
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
            problems.append((key, f"the {spec.driver} driver needs {last!r}", hints.get(last, "")))
        else:
            problems.append((key, clean_message(item), hints.get(last, "")))
    return problems


def spec_problems(spec: PowerSection) -> list[tuple[str, str, str]]:
    """(key, message, hint) for each problem with one power entry's driver-specific keys."""
    try:
        driver_options(spec)
    except ValidationError as exc:
        return driver_option_problems(spec, exc)
    return []


# --- checks that span several keys -------------------------------------------------------------


def _duplicates(
    machines: list[tuple[int, MachineSection]], field: str, what: str
) -> Iterator[Problem]:
    seen: dict[object, tuple[int, MachineSection]] = {}
    for index, machine in machines:
        value = getattr(machine, field)
        if value is None:
            continue
        if value in seen:
            first_index, first = seen[value]
            yield Problem(
                ("machines", index, field),
                f"{what} {value} is already used by machine {first.name!r} "
                f"(machines[{first_index}])",
                f"each machine needs its own {what}",
            )
        else:
            seen[value] = (index, machine)


def _power_problems(index: int, machine: MachineSection) -> list[Problem]:
    """Each power driver's own keys (a plug without `host`, ipmi without `user`)."""
    problems = []
    chain = machine.power_chain()
    for position, spec in enumerate(chain):
        base: Loc = ("machines", index, "power")
        if isinstance(machine.power, list):
            base = (*base, position)
        for key, message, hint in spec_problems(spec):
            problems.append(Problem((*base, key) if key else base, message, hint))
    return problems


def consistency_problems(
    network: NetworkSection | None,
    boot: BootSection | None,
    images: dict[str, ImageSection] | None,
    machines: list[tuple[int, MachineSection]],
) -> list[Problem]:
    """Checks across keys. Takes the sections separately (and machines with their index in
    the file) so they can run on whatever part of a broken file did validate."""
    problems: list[Problem] = []
    problems += _duplicates(machines, "mac", "MAC")
    problems += _duplicates(machines, "name", "name")
    problems += _duplicates(machines, "ip", "IP")
    if images is not None:
        known = ", ".join(sorted(images)) or "none"
        if boot is not None and boot.image not in images:
            problems.append(
                Problem(
                    ("boot", "image"),
                    f"no image named {boot.image!r}",
                    f"define [images.{boot.image}] or pick one of: {known}",
                )
            )
        for index, machine in machines:
            if machine.image is not None and machine.image not in images:
                problems.append(
                    Problem(
                        ("machines", index, "image"),
                        f"no image named {machine.image!r}",
                        f"define [images.{machine.image}] or pick one of: {known}",
                    )
                )
    for index, machine in machines:
        if machine.format == "if-blank" and machine.disk is None:
            problems.append(
                Problem(
                    ("machines", index, "format"),
                    'format = "if-blank" but no disk is named',
                    'add disk = "/dev/disk/by-id/..." for this machine, or remove format',
                )
            )
        problems += _power_problems(index, machine)
    if network is None:
        return problems
    subnet = network.subnet
    infra = {a: k for k, a in (("gateway", network.gateway), ("server_ip", network.server_ip)) if a}
    if subnet is not None:
        for key, address in (("gateway", network.gateway), ("server_ip", network.server_ip)):
            if address is not None and address not in subnet:
                problems.append(
                    Problem(
                        ("network", key),
                        f"{address} is outside the subnet {subnet}",
                        "fix the address or [network] subnet",
                    )
                )
        for index, machine in machines:
            if machine.ip is None:
                continue
            if machine.ip not in subnet:
                problems.append(
                    Problem(
                        ("machines", index, "ip"),
                        f"{machine.ip} (machine {machine.name!r}) is outside the subnet {subnet}",
                        f"pick an address in {subnet} or fix [network] subnet",
                    )
                )
            elif machine.ip in (subnet.network_address, subnet.broadcast_address):
                problems.append(
                    Problem(
                        ("machines", index, "ip"),
                        f"{machine.ip} is the "
                        f"{'network' if machine.ip == subnet.network_address else 'broadcast'} "
                        f"address of {subnet}",
                        "pick a host address",
                    )
                )
    for index, machine in machines:
        if machine.ip is not None and machine.ip in infra:
            problems.append(
                Problem(
                    ("machines", index, "ip"),
                    f"{machine.ip} (machine {machine.name!r}) is the {infra[machine.ip]} address",
                    "pick a free address",
                )
            )
    pool = network.pool
    if pool is not None:
        if subnet is not None and (pool.first not in subnet or pool.last not in subnet):
            problems.append(
                Problem(
                    ("network", "pool"),
                    f"the pool {pool} is not inside the subnet {subnet}",
                    f"choose a range inside {subnet}",
                )
            )
        for address, key in infra.items():
            if address in pool:
                problems.append(
                    Problem(
                        ("network", "pool"),
                        f"the pool {pool} contains the {key} {address}",
                        "start or end the pool so that it leaves that address out",
                    )
                )
        for index, machine in machines:
            if machine.ip is not None and machine.ip in pool:
                problems.append(
                    Problem(
                        ("network", "pool"),
                        f"the pool {pool} overlaps the reservation of machine {machine.name!r} "
                        f"({machine.ip}, machines[{index}])",
                        "move the reservation out of the pool or shrink the pool",
                    )
                )
    elif network.dhcp_mode == "full":
        problems.append(
            Problem(
                ("network", "pool"),
                "full mode hands out addresses but no pool is set",
                'add pool = "first-last" in [network], or use dhcp_mode = "reservation"',
            )
        )
    return problems
