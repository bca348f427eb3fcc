"""The agent serves Debian trixie's iPXE builds (arm64 UEFI machines among them) only once
build.sh has unpacked the whole package. The arm64 UEFI boot itself (AAVMF's PXE → trixie's
ipxe-arm64.efi → the script → the arm64 test OS up) is in tests/test_arm_boards.py, where one
agent boots it beside the U-Boot boards.
"""

from __future__ import annotations

from pathlib import Path

from pixiebox.core.firmware import SYSTEM_IPXE_DIR, packaged_ipxe_dir


def test_the_agent_serves_trixies_ipxe_only_once_build_sh_unpacked_all_of_it(
    tmp_path: Path,
) -> None:
    unpacked = tmp_path / "ipxe_1.21.1+git20250501.dad20602+dfsg-1"
    assert packaged_ipxe_dir(None) == SYSTEM_IPXE_DIR  # not pinned
    assert packaged_ipxe_dir(unpacked) == SYSTEM_IPXE_DIR  # not fetched
    (unpacked / "usr" / "lib" / "ipxe").mkdir(parents=True)
    assert packaged_ipxe_dir(unpacked) == SYSTEM_IPXE_DIR  # dpkg-deb -x under way: no .unpacked
    (unpacked / ".unpacked").touch()
    assert packaged_ipxe_dir(unpacked) == unpacked / "usr" / "lib" / "ipxe"
