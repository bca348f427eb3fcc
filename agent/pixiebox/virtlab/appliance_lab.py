"""`pixiebox demo --appliance`: the user's whole story in virtual machines.

The appliance disk image (out/appliance/appliance.raw, what a user flashes to a USB stick) is
copied, gets its lab.toml written onto its FAT partition with mtools (what the user does from a
laptop), and boots in a QEMU machine on a private bridge; the lab's machines PXE-boot the OSIE
from it and are followed through the appliance's own API, from a "laptop" namespace on the same
bridge. Nothing runs on this machine but QEMU: the agent is the one inside the image.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pixiebox.virtlab import forward, netns, vm

#: mkosi.repart/00-esp.conf: the FAT partition (the ESP) is the first, at 1 MiB.
ESP_OFFSET = "1M"
SUBNET = "10.89.0.0/24"
APPLIANCE_IP = "10.89.0.2"
LAPTOP_IP = "10.89.0.10"
APPLIANCE_MAC = "52:54:00:89:00:02"


class ApplianceError(Exception):
    """The appliance lab cannot run; the message says why and what to do."""


def flash(image: Path, disk: Path, lab_toml: str) -> None:
    """`disk` becomes a copy of the appliance image with `lab_toml` on its FAT partition."""
    if shutil.which("mcopy") is None:
        raise ApplianceError("mtools is missing (apt-get install mtools; build.sh installs it)")
    subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True, timeout=600)
    staged = disk.with_name("lab.toml")
    staged.write_text(lab_toml, encoding="utf-8")
    subprocess.run(
        ["mcopy", "-o", "-i", f"{disk}@@{ESP_OFFSET}", str(staged), "::/pixiebox/lab.toml"],
        check=True,
        capture_output=True,
        timeout=60,
    )


def read_lab_toml(disk: Path) -> str:
    """lab.toml as it is on the disk's FAT partition (as a laptop would show it)."""
    shown = subprocess.run(
        ["mtype", "-i", f"{disk}@@{ESP_OFFSET}", "::/pixiebox/lab.toml"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return shown.stdout.replace("\r\n", "\n")


def lab_toml(
    machines: list[tuple[str, str, str]], keys: list[str], *, mode: str, pool: str | None = None
) -> str:
    """A lab.toml for the appliance alone on the bridge: it is the DHCP server (reservation
    or full mode: no home router here), at a fixed address; machines as (name, MAC, IP);
    `pool` ("first-last" in SUBNET) for full mode."""
    quoted = ", ".join(json.dumps(key) for key in keys)
    pool_line = f'pool = "{pool}"\n' if pool else ""
    blocks = "".join(
        f'\n[[machines]]\nname = "{name}"\nmac = "{mac}"\nip = "{ip}"\n'
        for name, mac, ip in machines
    )
    return f"""# lab.toml on the appliance's FAT partition, written by pixiebox demo --appliance.
[lab]
name = "vmlab"
domain = "lab.test"

[network]
interface = "eth0"
server_ip = "{APPLIANCE_IP}"
subnet = "{SUBNET}"
dhcp_mode = "{mode}"
{pool_line}dhcp_probe_time = "1s"

[boot]
ssh_keys = [{quoted}]
{blocks}"""


def api_get(laptop: netns.Host, path: str) -> Any:
    """GET the appliance's API from the laptop namespace; None while it does not answer."""
    result = laptop.run(
        ["curl", "-sf", "--max-time", "10", f"http://{APPLIANCE_IP}:8080{path}"],
        timeout=20,
        check=False,
    )
    if result.returncode != 0 or not result.stdout:
        return None
    return json.loads(result.stdout)


def run(args: argparse.Namespace, keys: list[str]) -> int:
    """Boot the appliance image and `args.machines` machines from it; 0 when all are up."""
    image = Path(args.appliance_image)
    if not image.is_file():
        raise ApplianceError(
            f"no appliance image at {image}: build it with sudo ./build.sh appliance"
        )
    count = args.machines
    machines = [
        (f"node{i}", f"52:54:00:89:01:{i:02x}", f"10.89.0.{30 + i}") for i in range(1, count + 1)
    ]
    workdir = Path(tempfile.mkdtemp(prefix="pixiebox-appliance-"))
    segment: netns.Segment | None = None
    dashboard: forward.Forwarder | None = None
    vms: list[vm.VM] = []
    ok = False
    try:
        disk = workdir / "stick.raw"
        print(f"flashing {image} to {disk} and writing lab.toml onto its FAT partition")
        flash(image, disk, lab_toml(machines, keys, mode="reservation"))
        segment = netns.Segment(workdir / "segment")
        laptop = segment.add_host("laptop", ip=f"{LAPTOP_IP}/24")
        started = time.monotonic()
        appliance = vm.start_vm(
            segment, "appliance", APPLIANCE_MAC, firmware="bios", memory_mb=1536, disk=disk,
            workdir=workdir,
        )  # fmt: skip
        vms.append(appliance)
        print(f"powered on the appliance (console: {appliance.console}); waiting for its API")
        deadline = started + args.timeout
        while api_get(laptop, "/api/v1/machines") is None:
            if time.monotonic() > deadline or appliance.proc.poll() is not None:
                raise ApplianceError(f"the appliance's API did not answer:\n{appliance.tails()}")
            time.sleep(3)
        print(f"appliance up at {APPLIANCE_IP} after {appliance.elapsed():.0f} s")
        port = getattr(args, "dashboard_port", forward.DEFAULT_PORT)
        dashboard = forward.Forwarder(laptop.name, 8080, port, target=APPLIANCE_IP).start()
        print(f"dashboard: {dashboard.url} (this machine only; sign in with the token in "
              "/var/lib/pixiebox/api-token on the appliance)", flush=True)  # fmt: skip
        for index, (name, mac, _) in enumerate(machines):
            firmware: vm.Firmware = "bios" if index % 2 == 0 else "uefi"
            vms.append(vm.start_vm(
                segment, name, mac, firmware=firmware, memory_mb=1536, workdir=workdir,
                pxe="ipxe-rom" if firmware == "bios" else "native",
            ))  # fmt: skip
            print(f"powered on {name} ({firmware.upper()}), MAC {mac}")
        seen: dict[str, str] = {}
        node_start = time.monotonic()
        while time.monotonic() < deadline:
            views = api_get(laptop, "/api/v1/machines") or []
            for view in views:
                name, state = view.get("name"), view.get("state")
                if name and seen.get(name) != state:
                    seen[name] = state
                    print(f"  {time.monotonic() - node_start:6.1f} s  {name:<8} {state}")
            if all(seen.get(name) in ("up", "joined") for name, _, _ in machines):
                ok = True
                break
            time.sleep(3)
        print(
            "all machines are up" if ok else f"not every machine was up within {args.timeout:g} s"
        )
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted; removing the lab")
        return 1
    finally:
        if dashboard is not None:
            dashboard.close()
        for machine in vms:
            machine.stop()
        if segment is not None:
            segment.close()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"consoles and logs kept in {workdir}")
