"""The agent's services together, as a U-Boot board and a PXE ROM see them: one `pixiebox serve`
answering DHCP, TFTP and HTTP on the same interface."""

from __future__ import annotations

import re
from pathlib import Path

import netlab
from agentproc import lab_toml, recorded, start_agent
from pixiebox.core.firmware import packaged_ipxe_dir
from pixiebox.core.trixie import trixie_root
from pixiebox.events import Event, Kind

SUBNET = "10.81.0.0/24"
AGENT_IP = "10.81.0.2"
BOARD_MAC, BOARD_IP = "02:00:00:00:81:01", "10.81.0.41"


def test_uboot_board_gets_pxelinux_over_tftp_and_http_and_x86_gets_ipxe_over_tftp(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl")  # type: ignore[operator]
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    config = lab_toml(
        mode="reservation",
        subnet=SUBNET,
        assets=workdir / "assets",
        state=workdir / "state",
        machines=[("tk1", BOARD_MAC, BOARD_IP)],
    )  # fmt: skip  (boots the default image's arm64 build: osie-arm64/vmlinuz + initrd)
    agent = start_agent(agent_host, config, workdir)
    board = segment.add_host("board", mac=BOARD_MAC, ip=f"{BOARD_IP}/24")
    # U-Boot (arch 22) is offered pxelinux.0's directory, then asks for pxelinux.cfg/01-<mac>.
    replies = netlab.pxe_discover(board, arch=22, uuid=None, vendor_class="U-Boot.armv8")
    (offer,) = [r for r in replies if r.src_ip == AGENT_IP]
    assert (offer.yiaddr, offer.file) == (BOARD_IP, "pxelinux.0")
    wanted = f"pxelinux.cfg/01-{BOARD_MAC.replace(':', '-')}"
    over_tftp = board.run(["curl", "-sS", "--max-time", "10", f"tftp://{AGENT_IP}/{wanted}"])
    over_http = board.run(["curl", "-sS", "--max-time", "10", f"http://{AGENT_IP}/{wanted}"])
    # The same file both ways, each with a boot token of its own (the board asked from its own
    # address: core.trust), the latest replacing the one before.
    tokens = [re.findall(r" pixiebox\.token=(\S+)", got.stdout) for got in (over_tftp, over_http)]
    assert [len(found) for found in tokens] == [1, 1] and tokens[0] != tokens[1], tokens
    untokened = [re.sub(r" pixiebox\.token=\S+", "", got.stdout) for got in (over_tftp, over_http)]
    assert untokened[0] == untokened[1]
    text = over_tftp.stdout
    # An armv8 board with no [images] in lab.toml: the default image's arm64 build, with its
    # device trees (config.schema.default_images), not the x86 kernel.
    assert "KERNEL osie-arm64/vmlinuz" in text and "INITRD osie-arm64/initrd" in text, text
    assert "FDTDIR osie-arm64/dtbs" in text, text
    assert "pixiebox.name=tk1" in text and f"pixiebox.url=http://{AGENT_IP}" in text
    assert "tk1 (02:00:00:00:81:01) fetched pxelinux.cfg/01-" in agent.text()
    # U-Boot's earlier guesses (UUID, hex IP) are a fast "not found", not a hang.
    miss = board.run(["curl", "-sS", "--max-time", "10", f"tftp://{AGENT_IP}/pxelinux.cfg/0A51"],
                     check=False)  # fmt: skip
    assert miss.returncode == 68  # TFTP file not found
    # Debian's x86 iPXE builds come from its ipxe package: trixie's where build.sh unpacked it,
    # else /usr/lib/ipxe (bookworm's ipxe.efi is a link into /boot there).
    packaged = packaged_ipxe_dir(trixie_root("ipxe"))
    for name in ("undionly.kpxe", "ipxe.efi"):
        fetched = workdir / name
        board.run(
            ["curl", "-sS", "--max-time", "20", "-o", str(fetched), f"tftp://{AGENT_IP}/{name}"]
        )
        assert fetched.read_bytes() == (packaged / name).read_bytes()

    # Each step is in tk1's event log as a kind and its facts (the board is known by address).
    def steps() -> list[Event] | None:
        found = recorded(workdir / "state", BOARD_MAC)
        return found if sum(e.kind == Kind.TFTP_SENT for e in found) >= 3 else None

    events = netlab.wait_until(steps, 10, message="tk1's TFTP events")
    offered = next(e for e in events if e.kind == Kind.DHCP_OFFER)
    assert (offered.get("boot_file"), offered.get("firmware"), offered.get("ip")) == (
        "pxelinux.0", "U-Boot", BOARD_IP
    )  # fmt: skip
    served = next(e for e in events if e.kind == Kind.HTTP_PXELINUX)
    assert served.fields == {"file": wanted, "image": "osie", "kernel": "osie-arm64/vmlinuz"}
    sent = {e.get("file"): e for e in events if e.kind == Kind.TFTP_SENT}
    assert set(sent) == {wanted, "undionly.kpxe", "ipxe.efi"}, sent
    size = (packaged / "ipxe.efi").stat().st_size
    assert sent["ipxe.efi"].get("bytes") == size
    assert sent["ipxe.efi"].get("blksize") == 512  # curl asks for no larger block
    missed = next(e for e in events if e.kind == Kind.TFTP_FAILED)
    assert missed.fields["file"] == "pxelinux.cfg/0A51"
    assert missed.get("reason") == "not-found"
