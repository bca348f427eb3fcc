"""Power drivers (placeholder until the drivers land): `spec_problems` checks one driver's keys."""

from __future__ import annotations

from ..config import PowerSection


def spec_problems(spec: PowerSection) -> list[tuple[str, str, str]]:
    """(key, message, hint) for each problem with one power entry's driver-specific keys."""
    return []
