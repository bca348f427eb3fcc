"""The environment a test of lab.toml handling needs: none of the PIXIEBOX_* variables of the
shell that runs pytest. pixiebox's settings read them over lab.toml, in any letter case
(pydantic-settings matches names case-insensitively), so one left set there would change what
such a test checks."""

from __future__ import annotations

import os

import pytest


def drop_pixiebox_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset every PIXIEBOX_* variable (any case) for the test `monkeypatch` belongs to."""
    for name in list(os.environ):
        if name.upper().startswith("PIXIEBOX_"):
            monkeypatch.delenv(name)
