"""lab.toml for the VM tests that boot the test OS (scripts/build-testos.sh, the `testos`
fixture) from the agent in reservation mode, and the assets directory it is served from: the
part test_restarts.py and test_lab_power.py write alike, each adding its own [boot] keys,
sections and machines."""

from __future__ import annotations

import shutil
from pathlib import Path


def install_testos(workdir: Path, testos: tuple[Path, Path]) -> Path:
    """workdir/assets with the test OS's kernel and initrd under testos/ (as
    lab_toml_for_testos() names them); returns that assets directory."""
    assets = workdir / "assets"
    (assets / "testos").mkdir(parents=True, exist_ok=True)
    for source in testos:
        shutil.copyfile(source, assets / "testos" / source.name)
    return assets


def lab_toml_for_testos(
    name: str, subnet: str, workdir: Path, *, boot: str = "", sections: str = ""
) -> str:
    """lab.toml's head for lab `name`: reservation mode on the VM segment's eth0 in `subnet`, the
    test OS in workdir/assets (install_testos) as the OSIE image, state in workdir/state. `boot`
    is more [boot] lines, `sections` more sections (each text ends in a newline); the caller
    appends its [[machines]]."""
    return f"""
[lab]
name = "{name}"
domain = "lab.test"
[network]
interface = "eth0"
subnet = "{subnet}"
dhcp_mode = "reservation"
dhcp_probe_time = "1s"
[boot]
{boot}assets = "{workdir / "assets"}"
[images.osie]
kernel = "testos/vmlinuz"
initrd = ["testos/initrd"]
cmdline = "console=ttyS0"
{sections}[state]
dir = "{workdir / "state"}"
"""
