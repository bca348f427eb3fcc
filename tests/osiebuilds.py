"""The OSIE builds in out/ (`./build.sh osie --arch ...`), for the tests that check or boot them.

`build.sh test` builds every architecture (the appliance carries them all). A test of a build
that is not there skips, saying the command that builds it, except on CI: there it fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from trixiefiles import on_ci

OUT = Path(__file__).resolve().parent.parent / "out"
OUT_DIR = {"x86-64": OUT / "osie", "arm64": OUT / "osie-arm64", "armhf": OUT / "osie-armhf"}


def built(arch: str) -> Path:
    """out/osie[-ARCH] holding a finished build of `arch` (kernel, initrd, ...)."""
    directory = OUT_DIR[arch]
    if not (directory / "osie.cpio.zst").exists():
        message = f"the {arch} OSIE is not built: sudo ./build.sh osie --arch {arch}"
        if on_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return directory
