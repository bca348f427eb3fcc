"""A real power cut of the appliance image, and the seed's morning after it (issue 13).

The appliance disk image boots in QEMU in full mode; two node VMs PXE-boot the OSIE from it to
`up`, and three ISC dhclient hosts get pool leases. Within milliseconds of the last ACK every
QEMU is killed with SIGKILL, as a hand on the wall switch would: the guest gets no shutdown and
no sync, so what sat in its page cache is gone. The disk keeps only what the guest wrote to the
virtual disk before that: QEMU writes a raw image straight through to the host file (vm.py's
cache=unsafe only skips the host flush of a guest's flush, and a QEMU SIGKILL does not lose the
host's page cache), so exactly what the guest's kernel had written survives, as on a stick whose
writes completed. Then all three VMs are powered on at once from the same disk, nobody touching
anything: every ACKed lease must still be held (a new MAC is not given any of those addresses,
and each holder gets its own back), and both nodes must reach `up` again by themselves.

The nodes' firmware has its boot retry on (SeaBIOS's reboot-timeout, NODE_BOOT_RETRY), as a lab
that must come back alone needs: powered on together with the appliance, a node's PXE DHCP gives
up after about 30 s, long before the appliance answers (about 2 minutes here, under TCG). With
QEMU's default the firmware then halts at "No bootable device." until a hand (or a power
driver able to reset it) does; wait_for names that case.

Everything under TCG on a loaded machine: every wait is long, and bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import netlab
import pytest
import vmlab
from pixiebox.events import Kind
from pixiebox.virtlab import appliance_lab

REPO = Path(__file__).resolve().parent.parent

APPLIANCE_IP, LAPTOP_IP = appliance_lab.APPLIANCE_IP, appliance_lab.LAPTOP_IP
NODES = [("node1", "52:54:00:89:01:01", "10.89.0.31"), ("node2", "52:54:00:89:01:02", "10.89.0.32")]
#: One address more than there are holders: a stranger must get exactly the one left.
POOL = "10.89.0.100-10.89.0.103"
POOL_ADDRESSES = {f"10.89.0.{n}" for n in range(100, 104)}
HOLDERS = [("h1", "02:00:00:89:02:01"), ("h2", "02:00:00:89:02:02"), ("h3", "02:00:00:89:02:03")]
STRANGER = ("stranger", "02:00:00:89:02:09")
BOOT_TIMEOUT = 900.0  # the appliance under TCG on a loaded 2-core machine: kernel, systemd, agent
NODE_TIMEOUT = 900.0  # iPXE, a 12 MB kernel and a 52 MB initrd over TCG, systemd, metadata
LEASE_TIMEOUT = 60.0
NODE_BOOT_RETRY = 30.0  # s between "No bootable device." and the firmware's next attempt
UP = ("up", "joined")


def public_key(tmp_path: Path) -> str:
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tester@laptop", "-f", str(key)],
        check=True,
        timeout=30,
    )
    return key.with_suffix(".pub").read_text().strip()


def tails(machines: list[vmlab.VM]) -> str:
    return "\n".join(vm.tails() for vm in machines)


def given_up(vm: vmlab.VM) -> bool:
    """SeaBIOS found nothing to boot and, with QEMU's default boot-fail wait (-1), halts for
    good: "No bootable device." without "Retrying in N seconds" is its last line."""
    lines = [line for line in vm.console_text().splitlines() if line.strip()]
    return bool(lines) and "No bootable device." in lines[-1] and "Retrying" not in lines[-1]


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float,
    machines: list[vmlab.VM],
    *,
    also: list[str] | None = None,
) -> Any:
    """Poll `check` until it is truthy. Fail with every VM's tails (and the problems `also`
    found before) when `timeout` runs out, a QEMU exits, or a node's firmware gave up."""
    started = time.monotonic()
    deadline = started + timeout
    stuck: list[str] = []
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if any(vm.proc.poll() is not None for vm in machines):
            break
        stuck = [vm.name for vm in machines if vm.name != "appliance" and given_up(vm)]
        if stuck:
            break
        time.sleep(3)
    hint = (
        f'; {", ".join(stuck)}: the firmware gave up network boot ("No bootable device.") '
        "and waits for a hand"
        if stuck
        else ""
    )
    before = "".join(f"\nand before that: {problem}" for problem in also or [])
    waited = f"{time.monotonic() - started:.0f} s (at most {timeout:.0f} s)"
    pytest.fail(f"{what} not seen in {waited}{hint}{before}\n{tails(machines)}", pytrace=False)


def machines_by_mac(laptop: netlab.Host) -> dict[str, dict[str, Any]]:
    views = appliance_lab.api_get(laptop, "/api/v1/machines") or []
    return {view["mac"]: view for view in views if view.get("mac")}


def last_up(laptop: netlab.Host, mac: str) -> float:
    """The time (the appliance's clock) of the machine's last phone-home, 0 if none."""
    events = appliance_lab.api_get(laptop, f"/api/v1/machines/{mac}/events") or []
    return max((float(e["time"]) for e in events if e.get("kind") == Kind.OS_UP), default=0.0)


def nodes_up(laptop: netlab.Host, after: dict[str, float]) -> dict[str, dict[str, Any]] | None:
    """Every node's view once each is up with a phone-home later than `after[mac]`."""
    views = machines_by_mac(laptop)
    for _, mac, _ in NODES:
        view = views.get(mac)
        if view is None or view.get("state") not in UP or last_up(laptop, mac) <= after[mac]:
            return None
    return views


def start_appliance(segment: netlab.Segment, disk: Path, workdir: Path) -> vmlab.VM:
    return vmlab.start_vm(
        segment, "appliance", appliance_lab.APPLIANCE_MAC, firmware="bios", memory_mb=1536,
        disk=disk, workdir=workdir,
    )  # fmt: skip


def start_node(segment: netlab.Segment, name: str, mac: str, workdir: Path) -> vmlab.VM:
    return vmlab.start_vm(
        segment, name, mac, firmware="bios", memory_mb=1024, workdir=workdir,
        boot_retry=NODE_BOOT_RETRY,
    )  # fmt: skip


def bound_leases(events: dict[str, Path]) -> dict[str, str]:
    """{role: address} of the holders whose dhclient reported BOUND so far."""
    found: dict[str, str] = {}
    for role, path in events.items():
        for event in netlab.read_dhclient_events(path):
            if event.get("reason") == "BOUND":
                found[role] = event["new_ip_address"]
    return found


def power_cut(machines: list[vmlab.VM]) -> float:
    """SIGKILL every QEMU at once: no ACPI, no shutdown, no sync for the guests. Returns
    time.monotonic() when the last signal was sent."""
    for vm in machines:
        os.kill(vm.proc.pid, signal.SIGKILL)  # QEMU itself: `ip netns exec` exec()s it
    done = time.monotonic()
    for vm in machines:
        vm.proc.wait(timeout=30)
        vm.stop()  # its tap device and QMP socket
    return done


@pytest.mark.timeout(2 * BOOT_TIMEOUT + 2 * NODE_TIMEOUT + 600)
def test_a_power_cut_loses_no_acked_lease_and_the_lab_comes_back_by_itself(
    images: tuple[Path, Path],
    segment: netlab.Segment,
    netlab_require: Callable[..., None],
    vms: list[vmlab.VM],
    tmp_path: Path,
) -> None:
    netlab_require(vmlab.QEMU, "mcopy", "curl", "dhclient", "ssh-keygen")
    disk = tmp_path / "stick.raw"
    lab = appliance_lab.lab_toml(NODES, [public_key(tmp_path)], mode="full", pool=POOL)
    appliance_lab.flash(images[0], disk, lab)
    laptop = segment.add_host("laptop", ip=f"{LAPTOP_IP}/24")
    holders = {role: segment.add_host(role, mac=mac) for role, mac in HOLDERS}
    leases_dir = tmp_path / "dhclient"

    # --- the evening: the appliance, both nodes up, three fresh leases ------------------------
    evening = tmp_path / "evening"
    appliance = start_appliance(segment, disk, evening)
    vms.append(appliance)
    # The API lists the two enrolled nodes from its first answer on.
    wait_for("the appliance's API", lambda: machines_by_mac(laptop), BOOT_TIMEOUT, [appliance])
    api_up_evening = appliance.elapsed()
    nodes = [start_node(segment, name, mac, evening) for name, mac, _ in NODES]
    vms.extend(nodes)
    never = {mac: 0.0 for _, mac, _ in NODES}
    views = wait_for("both nodes up in the appliance's API", lambda: nodes_up(laptop, never),
                     NODE_TIMEOUT, [appliance, *nodes])  # fmt: skip
    nodes_up_evening = max(node.elapsed() for node in nodes)
    assert [views[mac]["ip"] for _, mac, _ in NODES] == [ip for _, _, ip in NODES]
    evening_up = {mac: last_up(laptop, mac) for _, mac, _ in NODES}

    daemons = {
        role: netlab.start_dhclient_daemon(host, leases_dir) for role, host in holders.items()
    }
    events = {role: path for role, (_, path) in daemons.items()}
    deadline = time.monotonic() + LEASE_TIMEOUT
    while len(acked := bound_leases(events)) < len(HOLDERS):
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in daemons.values()):
            logs = f"{segment.log_summary()}\n{tails([appliance])}"
            pytest.fail(f"leases: only {acked} in {LEASE_TIMEOUT:.0f} s\n{logs}", pytrace=False)
        time.sleep(0.005)
    seen_all = time.monotonic()
    cut_after_ms = (power_cut([appliance, *nodes]) - seen_all) * 1000  # the wall switch
    for proc, _ in daemons.values():
        segment.stop(proc)  # the holders were switched off too (no RELEASE: dhclient -d on TERM)
    assert set(acked.values()) <= POOL_ADDRESSES and len(set(acked.values())) == len(HOLDERS)
    print(
        f"\nevening: appliance API up {api_up_evening:.0f} s after power-on, both nodes up "
        f"{nodes_up_evening:.0f} s after theirs; leases {acked}; power cut "
        f"{cut_after_ms:.1f} ms after the last ACK was seen"
    )

    # --- the morning: everything powered on at once, nobody touching anything -----------------
    morning = tmp_path / "morning"
    appliance = start_appliance(segment, disk, morning)
    nodes = [start_node(segment, name, mac, morning) for name, mac, _ in NODES]
    vms.extend([appliance, *nodes])
    wait_for("the appliance's API after the power cut", lambda: machines_by_mac(laptop),
             BOOT_TIMEOUT, [appliance])  # fmt: skip
    api_up_morning = appliance.elapsed()
    print(f"morning: appliance API up {api_up_morning:.0f} s after power-on (all three at once)")

    # A machine never seen before asks first: it must get the one address nobody holds.
    # (Lease problems are collected, so that the nodes' morning is still watched.)
    lost: list[str] = []
    stranger = segment.add_host(STRANGER[0], mac=STRANGER[1])
    fresh = netlab.run_dhclient(stranger, leases_dir, timeout=LEASE_TIMEOUT).ip
    lost += [
        f"{STRANGER[1]} was given {ip}, ACKed to {role} before the power cut: that lease was lost"
        for role, ip in acked.items()
        if ip == fresh
    ]
    assert fresh in POOL_ADDRESSES
    for role, host in holders.items():  # INIT-REBOOT from each holder's lease file
        again = netlab.run_dhclient(host, leases_dir, timeout=LEASE_TIMEOUT)
        if again.ip != acked[role]:
            lost.append(f"{role} ({host.mac}) had {acked[role]} before the cut, now {again.ip}")

    views = wait_for("both nodes up again after the power cut",
                     lambda: nodes_up(laptop, evening_up), BOOT_TIMEOUT + NODE_TIMEOUT,
                     [appliance, *nodes], also=lost)  # fmt: skip
    nodes_up_morning = max(node.elapsed() for node in nodes)
    assert [views[mac]["ip"] for _, mac, _ in NODES] == [ip for _, _, ip in NODES]
    print(
        f"morning: both nodes up {nodes_up_morning:.0f} s after power-on; the stranger got {fresh}"
    )
    assert not lost, f"ACKed leases lost in the power cut (ACKed {acked}): {lost}"
