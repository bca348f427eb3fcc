"""Changing lab.toml without losing anything the user wrote.

lab.toml is the user's file: enrolling a machine (`pixiebox enroll`, the API, `[boot] unknown =
"enroll"`) or changing one must leave every comment, blank line, key order, quoting style and
line ending outside the edited text byte-for-byte as it was. So edits are made on the text, as
insertions and replacements planned by textedit.py on the statements tomlscan.py finds.

Every edit is checked before anything is written: the edited text must parse to the same data
as before plus exactly the change, and the whole file must pass `check_config`, so a duplicate
MAC, name or address is refused with the messages `pixiebox check` gives. The write itself is
safewrite.py's: atomic, and serialised by a lock file next to lab.toml.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from pixiebox.config.load import check_config
from pixiebox.config.problems import EnrollError, Problem
from pixiebox.config.safewrite import locked, read, real_path, replace_checked
from pixiebox.config.schema import LabConfig
from pixiebox.config.textedit import (
    MACHINE_KEYS,
    Plan,
    machines_layout,
    plan_enroll,
    plan_update,
    toml_fields,
)
from pixiebox.config.values import normalize_mac

__all__ = [
    "MACHINE_KEYS",
    "EnrollError",
    "Enrollment",
    "enroll",
    "next_free_ip",
    "next_free_name",
    "update_machine",
]

_MAC_HINT = 'write six hex pairs, e.g. "f4:4d:30:64:7a:3a" (dashes and dots also work)'


@dataclass(frozen=True)
class Enrollment:
    name: str
    mac: str
    ip: IPv4Address | None
    line: int  # the line of the new [[machines]] header (of the new entry in `machines = [...]`)


# --- choosing names and addresses ---------------------------------------------------------


def next_free_name(config: LabConfig, prefix: str = "node") -> str:
    """prefix1, prefix2, … : the first one no machine has."""
    used = {machine.name for machine in config.machines}
    number = 1
    while f"{prefix}{number}" in used:
        number += 1
    return f"{prefix}{number}"


def next_free_ip(config: LabConfig, used: Iterable[IPv4Address] = ()) -> IPv4Address | None:
    """The lowest host address of [network] subnet that nothing else has: not the network or
    broadcast address, the gateway, the server, the pool, a machine's ip, nor one of `used`
    (the leases handed out). None when there is none, or no subnet is configured."""
    network = config.network
    subnet = network.subnet
    if subnet is None:
        return None
    taken = {int(address) for address in used}
    taken |= {int(m.ip) for m in config.machines if m.ip is not None}
    taken |= {int(a) for a in (network.gateway, network.server_ip) if a is not None}
    pool = network.pool
    candidate = int(subnet.network_address) + 1
    last = int(subnet.broadcast_address) - 1
    while candidate <= last:
        if pool is not None and int(pool.first) <= candidate <= int(pool.last):
            candidate = int(pool.last) + 1
        elif candidate in taken:
            candidate += 1
        else:
            return IPv4Address(candidate)
    return None


# --- the public edits ----------------------------------------------------------------------


def enroll(
    path: Path,
    mac: str,
    name: str | None = None,
    ip: str | None = None,
    *,
    image: str | None = None,
    power: dict[str, object] | None = None,
) -> Enrollment:
    """Add a machine to lab.toml: a `[[machines]]` block after the last one (or at the end of
    the file), or an entry at the end of `machines = [...]`. The name defaults to the next free
    nodeN; the MAC may be spelled any usual way. Raises EnrollError (nothing written) when the
    resulting file would not pass `pixiebox check`."""
    target = real_path(path)
    with _refusals(target), locked(target):
        bom, text, before = _read(target)
        config, data = _valid_original(target, text)
        index = len(config.machines)
        try:
            canonical_mac = normalize_mac(mac)
        except ValueError as exc:
            raise EnrollError([Problem(("machines", index, "mac"), str(exc), _MAC_HINT)]) from None
        wanted = name.strip().lower() if name is not None and name.strip() else None
        fields: dict[str, object] = {
            "name": wanted or next_free_name(config),
            "mac": canonical_mac,
        }
        if ip is not None:
            fields["ip"] = str(ip).strip()
        if image is not None:
            fields["image"] = image
        if power is not None:
            fields["power"] = power
        values = toml_fields(fields, ("machines", index))
        plan = plan_enroll(text, machines_layout(text, data), values)
        candidate = plan.apply(text)
        machines = data.get("machines", [])
        _verify(candidate, {**data, "machines": [*machines, values]})
        _commit(target, text, candidate, before, plan, bom)
        line = candidate.count("\n", 0, plan.anchor) + 1
    address = IPv4Address(str(values["ip"])) if "ip" in values else None
    return Enrollment(str(values["name"]), canonical_mac, address, line)


def update_machine(path: Path, mac_or_name: str, **changes: object) -> None:
    """Change keys of one machine (found by MAC, any spelling, or by name): a value replaces
    the old one in place, a key it lacks is added among its keys, None removes the key. The
    rest of the file is kept byte-for-byte; the result must pass `pixiebox check`."""
    target = real_path(path)
    with _refusals(target), locked(target):
        bom, text, before = _read(target)
        config, data = _valid_original(target, text)
        index = _find_machine(config, mac_or_name)
        unknown = [key for key in changes if key not in MACHINE_KEYS]
        if unknown:
            raise EnrollError(
                [
                    Problem(
                        ("machines", index, key),
                        f"unknown key {key!r}",
                        f"known keys here: {', '.join(MACHINE_KEYS)}",
                    )
                    for key in unknown
                ]
            )
        if not changes:
            return
        fields: dict[str, object] = {}
        for key, value in changes.items():
            if value is None:
                continue
            if key == "name" and isinstance(value, str):
                value = value.strip().lower()
            elif key == "mac":
                try:
                    value = normalize_mac(value)
                except ValueError as exc:
                    raise EnrollError(
                        [Problem(("machines", index, "mac"), str(exc), _MAC_HINT)]
                    ) from None
            fields[key] = value
        values = toml_fields(fields, ("machines", index))
        removed = {key for key, value in changes.items() if value is None}
        plan = plan_update(text, machines_layout(text, data), index, values, removed)
        candidate = plan.apply(text)
        if candidate == text:
            return  # e.g. removing a key the machine does not have
        machines = list(data["machines"])
        entry = {k: v for k, v in machines[index].items() if k not in removed}
        machines[index] = {**entry, **values}
        _verify(candidate, {**data, "machines": machines})
        _commit(target, text, candidate, before, plan, bom)


# --- reading, checking, writing ------------------------------------------------------------


@contextlib.contextmanager
def _refusals(target: Path) -> Iterator[None]:
    """EnrollErrors that name the file they are about."""
    try:
        yield
    except EnrollError as exc:
        if exc.path is not None:
            raise
        raise EnrollError(exc.problems, target) from exc.__cause__


def _read(target: Path) -> tuple[str, str, os.stat_result]:
    """The file's BOM (or ""), its text after it, and its stat. A Windows editor starts the
    file with a BOM; the edits are planned on the TOML after it, and the file keeps it, so
    that the next save in that editor does not show the whole file as changed."""
    text, before = read(target)
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    return bom, text[len(bom) :], before


def _valid_original(target: Path, text: str) -> tuple[LabConfig, dict[str, Any]]:
    """The config as it is: a file that does not pass `pixiebox check` is not edited."""
    config, problems = check_config(target)
    errors = [p for p in problems if p.severity == "error"]
    if config is None or errors:
        raise EnrollError(
            [
                *errors,
                Problem(
                    (),
                    f"{target.name} has errors already; nothing was changed",
                    f"fix them first (pixiebox check --config {target})",
                ),
            ]
        )
    return config, tomllib.loads(text)


def _find_machine(config: LabConfig, mac_or_name: str) -> int:
    try:
        mac: str | None = normalize_mac(mac_or_name)
    except ValueError:
        mac = None
    name = mac_or_name.strip().lower()
    for index, machine in enumerate(config.machines):
        if machine.mac == mac or machine.name == name:
            return index
    known = ", ".join(m.name for m in config.machines) or "none"
    raise EnrollError(
        [Problem(("machines",), f"no machine {mac_or_name!r} in lab.toml", f"machines: {known}")]
    )


def _verify(candidate: str, expected: dict[str, Any]) -> None:
    """The edited text means exactly the old data plus the change, nothing else."""
    try:
        data = tomllib.loads(candidate)
    except tomllib.TOMLDecodeError:
        data = None
    if data != expected:
        raise EnrollError(
            [
                Problem(
                    ("machines",),
                    "cannot make this change without altering other parts of lab.toml; "
                    "nothing was changed",
                    "edit lab.toml by hand (pixiebox check verifies it)",
                )
            ]
        )


def _commit(
    target: Path, text: str, candidate: str, before: os.stat_result, plan: Plan, bom: str = ""
) -> None:
    """Write the candidate (after the original's BOM, if any) atomically once it passes
    `pixiebox check` where it is written (an error in it is reported at its line in the file
    as it is, when that line is not new)."""

    def check(temp: Path) -> None:
        config, problems = check_config(temp)
        errors = [p for p in problems if p.severity == "error"]
        if config is None or errors:
            raise EnrollError([plan.locate(p, text, candidate) for p in errors])

    replace_checked(target, bom + candidate, before, check)
