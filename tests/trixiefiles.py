"""Files of the Debian trixie packages pinned in image/trixie.txt (pixiebox.core.trixie), for
the tests: a test that needs one skips without it, and fails on CI, where `./build.sh test` has
fetched them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pixiebox.core.trixie import trixie_file


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def trixie_file_or_skip(package: str, relative: str) -> Path:
    """`relative` of the pinned `package`; skips (fails on CI) when it is not unpacked."""
    try:
        return trixie_file(package, relative)
    except FileNotFoundError as exc:
        if on_ci():
            pytest.fail(f"CI=true but a Secure Boot prerequisite is missing: {exc}", pytrace=False)
        pytest.skip(str(exc))
