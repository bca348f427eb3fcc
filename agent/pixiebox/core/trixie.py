"""Where `./build.sh trixie` unpacked the Debian trixie packages pinned in image/trixie.txt.

The lab's hosts run bookworm, which lacks what the signed chain and the newer firmware need
(shim-signed, Debian's signed GRUB, OVMF with Microsoft's keys enrolled, a 2025 iPXE); build.sh
downloads the pinned .debs, checks their sha256 and unpacks each with `dpkg-deb -x` into
`<cache>/trixie/<package>_<version>/` (writing `.unpacked` last), never installing them. The
virtual lab and the tests find the files here, by the same pins.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The pins, next to build.sh (agent/pixiebox/core/ → the repository root).
PINS = Path(__file__).resolve().parents[3] / "image" / "trixie.txt"


def cache_root() -> Path:
    return Path(os.environ.get("PIXIEBOX_IMAGE_CACHE") or "/var/cache/pixiebox")


def trixie_root(package: str) -> Path | None:
    """The directory `package` is unpacked in, by its pinned version; None when not pinned."""
    try:
        lines = PINS.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[0] == package:
            return cache_root() / "trixie" / f"{package}_{fields[1]}"
    return None


def trixie_file(package: str, relative: str) -> Path:
    """`relative` (e.g. usr/share/OVMF/OVMF_VARS_4M.ms.fd) of the pinned `package`.

    Raises FileNotFoundError with one sentence when it is not unpacked (yet)."""
    root = trixie_root(package)
    if root is None:
        raise FileNotFoundError(f"trixie's {package} is not pinned in {PINS}")
    path = root / relative
    if not (root / ".unpacked").is_file() or not path.is_file():
        raise FileNotFoundError(
            f"{relative} of trixie's {package} is not in {root}: run sudo ./build.sh trixie"
            f" (pins: {PINS})"
        )
    return path


__all__ = ["PINS", "cache_root", "trixie_file", "trixie_root"]
