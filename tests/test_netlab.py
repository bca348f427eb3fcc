"""The integration-test lab itself, proven against real dnsmasq and ISC dhclient."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import netlab
import pytest
from netlab import (
    DHCPACK,
    DHCPOFFER,
    Segment,
    pxe_discover,
    pxe_request_4011,
    read_dhclient_events,
    run_dhclient,
    start_dhclient_daemon,
    start_dnsmasq_router,
    wait_dhclient_event,
    wait_until,
)

Require = Callable[..., None]

UUID = bytes.fromhex("4c4c4544004d3510804bb4c04f4a5331")
CLIENT_MAC = "02:00:00:77:00:10"
RANGE = ("10.77.0.50", "10.77.0.99")


def _in_range(ip: str) -> bool:
    lo, hi = (ipaddress.IPv4Address(a) for a in RANGE)
    return lo <= ipaddress.IPv4Address(ip) <= hi


def _resolv_digest() -> str:
    try:
        return hashlib.sha256(Path("/etc/resolv.conf").read_bytes()).hexdigest()
    except FileNotFoundError:
        return "absent"


# --------------------------------------------------------------------------- pure helpers


def test_wait_until_returns_truthy_value() -> None:
    calls = iter([0, None, "", "ready"])
    assert wait_until(lambda: next(calls), timeout=2.0, interval=0.01) == "ready"


def test_wait_until_times_out_with_message() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match="the thing"):
        wait_until(lambda: False, timeout=0.3, interval=0.05, message="the thing")
    assert time.monotonic() - start < 2.0


# --------------------------------------------------------------------------- segment


def test_segment_links_hosts(segment: Segment) -> None:
    a = segment.add_host("a", mac="02:00:00:77:00:0a", ip="10.77.0.10/24")
    b = segment.add_host("b", ip="10.77.0.11/24")

    assert a.name.startswith(netlab.RUN_PREFIX) and a.name.endswith("-a")
    assert a.iface == "eth0"
    assert a.mac == "02:00:00:77:00:0a"
    assert a.addresses() == ["10.77.0.10/24"]
    assert set(segment.namespaces) <= set(netlab.list_namespaces())

    # Frames cross the bridge (ARP + ICMP, inside the segment only).
    a.run(["busybox", "ping", "-c", "1", "-W", "2", "10.77.0.11"], timeout=10)
    neigh = a.run(["ip", "-j", "neigh", "show", "dev", "eth0"]).stdout
    assert b.mac in {n.get("lladdr") for n in json.loads(neigh)}

    # IPv6 is off, so the links stay quiet.
    assert a.run(["cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"]).stdout.strip() == "1"
    assert "inet6" not in a.run(["ip", "addr", "show", "dev", "eth0"]).stdout

    bridge = json.loads(segment.switch.run(["ip", "-j", "-d", "link", "show", "br0"]).stdout)[0]
    info = bridge["linkinfo"]["info_data"]
    assert info["mcast_snooping"] == 0
    assert info["forward_delay"] == 0
    assert info["stp_state"] == 0


def test_run_timeout_kills_process_group(segment: Segment) -> None:
    host = segment.add_host("a")
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        host.run(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.5)
    assert time.monotonic() - start < 5.0
    assert netlab.namespace_pids(host.name) == []


def test_teardown_removes_namespaces_and_processes(tmp_path: Path, netlab_require: Require) -> None:
    netlab_require("dnsmasq")
    seg = Segment(tmp_path / "lab")
    try:
        router = seg.add_host("router", ip="10.77.0.1/24")
        client = seg.add_host("client")
        dnsmasq = start_dnsmasq_router(router, *RANGE)
        # A process tree killed as a group, and one that escapes into its own session
        # (only the per-namespace sweep can find that one).
        tree = client.popen(["sh", "-c", "sleep 600 & sleep 600"], tmp_path / "tree.log")
        pidfile = tmp_path / "escaped.pid"
        client.run(["sh", "-c", f"setsid sleep 600 >/dev/null 2>&1 & echo $! > {pidfile}"])
        escaped = int(pidfile.read_text())
        names = seg.namespaces
        assert len(names) == 3
        assert set(names) <= set(netlab.list_namespaces())
        assert dnsmasq.poll() is None and tree.poll() is None
    finally:
        seg.close()

    assert dnsmasq.poll() is not None
    assert tree.poll() is not None
    wait_until(lambda: not Path(f"/proc/{escaped}/ns").exists(), 5.0, message="escaped sleep gone")
    listed = netlab.list_namespaces()
    assert not set(names) & set(listed)
    assert [ns for ns in listed if ns.startswith(netlab.RUN_PREFIX)] == []
    seg.close()  # idempotent
    with pytest.raises(RuntimeError):
        seg.add_host("late")


def test_routed_host_reaches_the_segment_through_its_router(
    tmp_path: Path, netlab_require: Require
) -> None:
    netlab_require()
    seg = Segment(tmp_path / "lab")
    try:
        lab = seg.add_host("lab", ip="10.84.0.10/24")
        router, routed = seg.add_routed_host("router", "far", "10.84.0.254/24", "10.85.0.0/24")
        assert router.addresses() == ["10.84.0.254/24"]
        assert routed.addresses() == ["10.85.0.5/24"]
        assert routed.name.endswith("-far") and router.name.endswith("-router")
        with pytest.raises(ValueError, match="already used"):
            seg.add_routed_host("router2", "far", "10.84.0.253/24", "10.86.0.0/24")

        # Without the return route the segment host cannot answer (no default route).
        no_route = routed.run(["busybox", "ping", "-c", "1", "-W", "1", "10.84.0.10"], check=False)
        assert no_route.returncode != 0
        lab.add_route("10.85.0.0/24", via="10.84.0.254")
        routed.run(["busybox", "ping", "-c", "1", "-W", "2", "10.84.0.10"], timeout=10)

        # Off-link: the segment host only knows the router's MAC, never the routed address.
        neigh = json.loads(lab.run(["ip", "-j", "neigh", "show", "dev", "eth0"]).stdout)
        assert {n["dst"]: n.get("lladdr") for n in neigh} == {"10.84.0.254": router.mac}
        names = seg.namespaces
        assert len(names) == 4  # switch, lab, router, routed host
        assert set(names) <= set(netlab.list_namespaces())
    finally:
        seg.close()
    assert not set(names) & set(netlab.list_namespaces())


# --------------------------------------------------------------------------- dhclient


def test_dhclient_gets_lease_from_dnsmasq(
    segment: Segment, workdir: Path, netlab_require: Require
) -> None:
    netlab_require("dnsmasq", "dhclient")
    resolv_before = _resolv_digest()
    router = segment.add_host("router", ip="10.77.0.1/24")
    client = segment.add_host("client", mac=CLIENT_MAC)
    start_dnsmasq_router(
        router,
        *RANGE,
        extra_args=["--dhcp-option=option:dns-server,10.77.0.53", "--domain=lab.test"],
    )

    lease = run_dhclient(client, workdir)

    assert _in_range(lease.ip)
    assert lease.subnet_mask == "255.255.255.0"
    assert lease.server_id == "10.77.0.1"
    assert lease.router == "10.77.0.1"
    assert lease.dns == ("10.77.0.53",)
    assert lease.domain == "lab.test"
    assert lease.lease_time == 120
    assert lease.reason == "BOUND"
    assert client.addresses() == [f"{lease.ip}/24"]
    events = read_dhclient_events(netlab.dhclient_events_path(client, workdir))
    assert [e["reason"] for e in events] == ["PREINIT", "BOUND"]
    assert _resolv_digest() == resolv_before


def test_run_dhclient_without_server_fails_within_timeout(
    segment: Segment, workdir: Path, netlab_require: Require
) -> None:
    netlab_require("dhclient")
    client = segment.add_host("client")
    start = time.monotonic()
    with pytest.raises(AssertionError, match="BOUND"):
        run_dhclient(client, workdir, timeout=2.0)
    assert time.monotonic() - start < 2.0 + 2 * netlab.KILL_GRACE
    assert netlab.namespace_pids(client.name) == []
    assert client.addresses() == []


def test_dhclient_daemon_bound_and_cleaned_up(
    segment: Segment, workdir: Path, netlab_require: Require
) -> None:
    netlab_require("dnsmasq", "dhclient")
    router = segment.add_host("router", ip="10.77.0.1/24")
    client = segment.add_host("client")
    start_dnsmasq_router(router, *RANGE, ping_check=False)

    proc, events = start_dhclient_daemon(client, workdir)
    bound = wait_dhclient_event(events, {"BOUND"}, timeout=20.0, proc=proc)

    assert _in_range(bound["new_ip_address"])
    assert client.addresses() == [f"{bound['new_ip_address']}/24"]
    assert proc.poll() is None  # still running, would RENEW at T1
    names = segment.namespaces
    segment.close()
    assert proc.poll() is not None
    assert not set(names) & set(netlab.list_namespaces())


# --------------------------------------------------------------------------- PXE client


def test_pxe_discover_gets_offer_from_pxe_capable_dnsmasq(
    segment: Segment, tmp_path: Path, netlab_require: Require
) -> None:
    netlab_require("dnsmasq", "tcpdump")
    server = segment.add_host("pxe", ip="10.77.0.1/24")
    client = segment.add_host("client", mac=CLIENT_MAC)
    pcap = tmp_path / "segment.pcap"
    capture = segment.capture(pcap)
    start_dnsmasq_router(
        server, *RANGE, ping_check=False, extra_args=["--dhcp-boot=undionly.kpxe,server,10.77.0.1"]
    )

    # A PXE ROM's parameter request list without 66/67: dnsmasq uses the BOOTP fields.
    params = [1, 3, 43, 54, 60, 97, 128, 129, 130]
    replies = pxe_discover(client, arch=0, uuid=UUID, params=params)

    offers = [r for r in replies if r.message_type == DHCPOFFER]
    assert len(offers) == 1, replies
    offer = offers[0]
    assert offer.file == "undionly.kpxe"
    assert offer.sname == "server"
    assert offer.siaddr == "10.77.0.1"
    assert offer.src_ip == "10.77.0.1"
    assert offer.src_mac == server.mac
    assert (offer.src_port, offer.dst_port) == (67, 68)
    assert offer.flags & 0x8000
    assert _in_range(offer.yiaddr)
    assert offer.option(54) == ipaddress.IPv4Address("10.77.0.1").packed

    # The default list asks for 66/67, and then dnsmasq moves them into options.
    replies = pxe_discover(client, arch=0, uuid=UUID, user_class="iPXE")
    (offer,) = [r for r in replies if r.message_type == DHCPOFFER]
    assert (offer.file, offer.sname) == ("", "")
    assert offer.option_text(67) == offer.boot_file == "undionly.kpxe"
    assert offer.option_text(66) == "server"
    assert offer.src_mac == server.mac

    segment.stop(capture)
    assert pcap.stat().st_size > 24  # more than the pcap header


def test_pxe_request_4011_gets_ack_from_dnsmasq_pxe_service(
    segment: Segment, netlab_require: Require
) -> None:
    netlab_require("dnsmasq")
    server = segment.add_host("pxe", ip="10.77.0.1/24")
    client = segment.add_host("client", mac=CLIENT_MAC, ip="10.77.0.60/24")
    start_dnsmasq_router(
        server,
        *RANGE,
        ping_check=False,
        extra_args=['--pxe-service=x86PC,"Network boot",undionly'],
    )

    # dnsmasq numbers its boot services from 0x8000 and ignores 4011 requests without
    # option 43 / PXE_BOOT_ITEM naming one of them.
    assert pxe_request_4011(client, "10.77.0.1", arch=0, uuid=UUID, client_ip="10.77.0.60") == []
    replies = pxe_request_4011(
        client, "10.77.0.1", arch=0, uuid=UUID, client_ip="10.77.0.60", boot_item=(0x8000, 0)
    )

    acks = [r for r in replies if r.message_type == DHCPACK]
    assert len(acks) == 1, replies
    ack = acks[0]
    assert (ack.src_ip, ack.src_port) == ("10.77.0.1", 4011)
    assert (ack.dst_ip, ack.dst_port, ack.dst_mac) == ("10.77.0.60", 68, CLIENT_MAC)
    assert ack.src_mac == server.mac
    assert ack.file == "undionly.0"  # dnsmasq appends ".0" for BIOS (arch 0)
    assert ack.option_text(60) == "PXEClient"
    assert ack.option(43) == bytes.fromhex("470480000000ff")
