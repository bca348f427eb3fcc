"""How Pixiebox words things for people, in one place so that every sentence agrees.

Sizes are binary (KiB, MiB: what `ls -lh` and the kernel print, and what a boot file's size is
measured in); durations are short ("1.4 s", "3 min"); a machine is "c1 (f4:4d:…)" when it is in
lab.toml and "unknown machine f4:4d:…" when it is not; an unknown machine's sentence always ends
with the command that enrolls it. Code never reads these sentences back: it reads an event's
kind and fields (pixiebox.events).
"""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB")


def size(count: int) -> str:
    """ "512 bytes", "4.0 KiB", "12.3 MiB": binary units, one decimal."""
    if count < 1024:
        return f"{count} bytes"
    value = float(count)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def span(seconds: float) -> str:
    """How long something took or has been going on: "0.4 s", "42 s", "7 min", "3.5 h"."""
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def timeout(seconds: float) -> str:
    """A configured wait as lab.toml writes it: "90s", "5m", "1m30s"."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    return f"{whole // 60}m{whole % 60}s" if whole % 60 else f"{whole // 60}m"


def machine(mac: str, name: str | None, ip: object | None = None) -> str:
    """A machine in a sentence: "c1 (f4:4d:…)", "c1 (f4:4d:…, 10.0.0.5)", or
    "unknown machine f4:4d:…" when lab.toml does not name it."""
    where = f", {ip}" if ip is not None else ""
    if name is not None:
        return f"{name} ({mac}{where})"
    return f"unknown machine {mac}{f' ({ip})' if ip is not None else ''}"


def enroll_hint(mac: str, *, with_ip: bool = False) -> str:
    """The command that puts an unknown machine into lab.toml."""
    return f"pixiebox enroll {mac} --name NAME{' --ip ADDRESS' if with_ip else ''}"
