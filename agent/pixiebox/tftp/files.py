"""What file a TFTP request names: the engine's Handler for boot files.

A name is looked up in the served root, then in each fallback place (net.paths.Place: the
assets' ipxe/ directory, Debian's ipxe package), then asked of `generate` (files on no disk,
such as U-Boot's pxelinux.cfg/01-<mac>); "not found" says every place looked in. Which names
may be served at all is net.paths' rule, the same as boot HTTP's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from pixiebox.core.raspi import expected_miss as raspi_expected_miss
from pixiebox.net.paths import (
    PathRefused,
    Place,
    candidates,
    inside,
    open_file,
    printable,
    segments,
)
from pixiebox.tftp.engine import NotFound
from pixiebox.tftp.packets import ERR_ACCESS, Refused
from pixiebox.tftp.transfers import Source

#: generate(path, client_ip): the content of a file that is on no disk; or a file on disk under
#: another name, as (directory, name in it), opened under net.paths' rule (a Raspberry Pi's
#: `<serial>/start4.elf` is the firmware directory's start4.elf: boot.raspi); or None.
Generate = Callable[[str, str], bytes | tuple[Path, str] | None]

# Files firmware asks for first and is fine without: answered "not found" at once and logged at
# debug level. iPXE tries autoexec.ipxe (docs/firmware-quirks.md#25, tinkerbell/tinkerbell#424); the
# Raspberry Pi 3 ROM needs "file not found" for bootsig.bin (#27, raspberrypi/documentation
# boot-net.adoc), possibly under its <serial>/ prefix.
EXPECTED_MISSING = {
    "autoexec.ipxe": "iPXE looks for it before running its own script (docs/firmware-quirks.md#25)",
    "bootsig.bin": "the Raspberry Pi ROM expects 'not found' for it (docs/firmware-quirks.md#27)",
    # U-Boot's `dhcp` downloads the boot file DHCP named before `pxe get` reads pxelinux.cfg/.
    "pxelinux.0": "U-Boot's dhcp command fetches it before pxe get (docs/firmware-quirks.md#30)",
}
# Debian's signed network GRUB (the signed chain, docs/firmware-quirks.md#33) probes its prefix
# /grub before it sources grub/grub.cfg: x86_64-efi/grub.cfg, grub.cfg-amd64 (its memdisk
# config) and normal mode's x86_64-efi/*.lst; none is needed, all modules are built in.
EXPECTED_MISSING_PATHS = {
    "grub/x86_64-efi/": "Debian's signed GRUB probes it (docs/firmware-quirks.md#33)",
    "grub/grub.cfg-amd64": "Debian's signed GRUB probes it (docs/firmware-quirks.md#33)",
}


def expected_missing(path: str) -> str | None:
    """Why a missing `path` is normal (logged at debug level), or None."""
    for prefix, why in EXPECTED_MISSING_PATHS.items():
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            return why
    return EXPECTED_MISSING.get(path.rsplit("/", 1)[-1].lower()) or raspi_expected_miss(path)


def normalise(name: str) -> str:
    """The requested name as a path relative to a served directory, or Refused.

    Windows clients send `\\` (docs/firmware-quirks.md#18, dnsmasq src/tftp.c); the rest (a leading
    `/` means the root, `..` is refused) is net.paths', as for boot HTTP."""
    try:
        return "/".join(segments(name.replace("\\", "/")))
    except PathRefused as refused:
        raise _refused(refused) from None


def _refused(refused: PathRefused) -> Refused:
    return Refused(ERR_ACCESS, printable(refused.detail), reason=refused.reason)


def generated(content: bytes) -> Source:
    """`content` as a Source: in a memfd, so the engine reads it like any file."""
    fd = os.memfd_create("pixiebox-tftp", os.MFD_CLOEXEC)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return Source(fd, len(content), "generated")


def places_for(root: Path, fallback_dirs: Sequence[tuple[str, Path] | Place]) -> list[Place]:
    """The root, then the fallback places. A (prefix, directory) pair outside the root names a
    package directory (links followed, as Debian's /usr/lib/ipxe needs); one inside it does
    not (a link in the assets must stay in the assets)."""
    places = [Place(root)]
    real_root = os.path.realpath(root)
    for item in fallback_dirs:
        if isinstance(item, Place):
            places.append(item)
            continue
        prefix, directory = item
        packaged = not inside(os.path.realpath(directory), real_root)
        places.append(Place(Path(directory), prefix, packaged))
    return places


class BootFiles:
    """Opens what a TFTP client names: in `places` (the root first), else from `generate`."""

    def __init__(self, places: Sequence[Place], generate: Generate | None = None) -> None:
        self.places = list(places)
        self.generate = generate
        first, *rest = self.places
        where = [str(first.directory), *(f"{p.directory} (as {p.prefix or '/'})" for p in rest)]
        self.where = ", then ".join(where)

    def open(self, name: str, client_ip: str) -> tuple[str, Source]:
        path = normalise(name)
        looked: list[str] = []
        for place, relative in candidates(self.places, path):
            try:
                opened = open_file(place.directory, relative, packaged=place.packaged)
            except PathRefused as refused:
                raise _refused(refused) from None
            if opened is not None:
                return path, Source(opened.fd, opened.size, printable(opened.path))
            looked.append(printable(str(place.directory / relative)))
        if self.generate is not None:
            content = self.generate(path, client_ip)
            if isinstance(content, tuple):
                directory, name = content
                try:
                    opened = open_file(directory, name)
                except PathRefused as refused:
                    raise _refused(refused) from None
                if opened is not None:
                    return path, Source(opened.fd, opened.size, printable(opened.path))
            elif content is not None:
                return path, generated(content)
            looked.append("generated files")
        raise NotFound(path, looked, expected_missing(path))
