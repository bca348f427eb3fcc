"""Reservation and full mode against ISC dhclient, the rogue-DHCP guard, and hostile packets."""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

import netlab
import pytest
from agentproc import READY, RunningAgent, lab_toml, start_agent

SUBNET = "10.78.0.0/24"
GATEWAY = "10.78.0.1"
AGENT_IP = "10.78.0.2"
C1_MAC, C1_IP = "02:00:00:00:03:01", "10.78.0.31"
POOL = "10.78.0.100-10.78.0.110"


@pytest.fixture(autouse=True)
def _needs(netlab_require: object) -> None:
    netlab_require("dnsmasq", "dhclient")  # type: ignore[operator]


def agent(
    segment: netlab.Segment, workdir: Path, mode: str, ready: str | None = READY, **kwargs: object
) -> RunningAgent:
    host = next((h for h in segment.hosts if h.role == "agent"), None)
    if host is None:
        host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    config = lab_toml(
        mode=mode, subnet=SUBNET, gateway=GATEWAY, assets=workdir / "assets",
        state=workdir / "state", machines=[("c1", C1_MAC, C1_IP)], **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    return start_agent(host, config, workdir, ready=ready)


def stale_lease(workdir: Path, role: str, ip: str) -> None:
    """A dhclient lease file claiming `ip`, so dhclient starts with an INIT-REBOOT REQUEST."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"dhclient-{role}.leases").write_text(textwrap.dedent(f"""\
        lease {{
          interface "eth0";
          fixed-address {ip};
          option subnet-mask 255.255.255.0;
          option dhcp-server-identifier {AGENT_IP};
          renew 4 2037/01/01 00:00:00;
          rebind 4 2037/01/01 00:00:00;
          expire 4 2037/01/01 00:00:00;
        }}
        """))  # fmt: skip


def test_reservation_gives_the_reserved_address_with_options_and_keeps_it_across_restart(
    segment: netlab.Segment, workdir: Path
) -> None:
    running = agent(segment, workdir, "reservation", lease_time="10m")
    c1 = segment.add_host("c1", mac=C1_MAC)
    lease = netlab.run_dhclient(c1, workdir / "c1")
    assert lease.ip == C1_IP
    assert lease.server_id == AGENT_IP
    assert lease.router == GATEWAY
    assert lease.hostname == "c1"
    assert lease.domain == "lab.test"
    assert lease.subnet_mask == "255.255.255.0"
    assert int(lease.lease_time or 0) == 600
    assert f"{C1_IP}/24" in c1.addresses()
    assert running.stop() == 0
    assert "Pixiebox stopped" in running.text()
    running.start()
    again = netlab.run_dhclient(c1, workdir / "c1")  # INIT-REBOOT with its lease file
    assert again.ip == C1_IP


def test_reservation_stays_silent_to_unknown_machines_and_says_so(
    segment: netlab.Segment, workdir: Path
) -> None:
    running = agent(segment, workdir, "reservation")
    stranger = segment.add_host("stranger", mac="02:00:00:00:03:99")
    with pytest.raises(AssertionError):
        netlab.run_dhclient(stranger, workdir / "stranger", timeout=6)
    text = running.wait_log("unknown machine 02:00:00:00:03:99 asked for an address")
    assert "reservation mode answers only machines in lab.toml" in text
    assert "pixiebox enroll 02:00:00:00:03:99" in text


def test_reservation_naks_a_wrong_address_then_gives_the_right_one(
    segment: netlab.Segment, workdir: Path
) -> None:
    running = agent(segment, workdir, "reservation")
    c1 = segment.add_host("c1", mac=C1_MAC)
    stale_lease(workdir / "c1", "c1", "10.78.0.77")
    lease = netlab.run_dhclient(c1, workdir / "c1")
    assert lease.ip == C1_IP
    assert "sent NAK: 10.78.0.77 is not yours" in running.text()


def test_full_mode_pool_lease_renews_survives_restart_and_is_never_given_away(
    segment: netlab.Segment, workdir: Path
) -> None:
    running = agent(segment, workdir, "full", pool=POOL, lease_time="20s")
    first = segment.add_host("first", mac="02:00:00:00:03:10")
    proc, events = netlab.start_dhclient_daemon(first, workdir / "first")
    bound = netlab.wait_dhclient_event(events, ("BOUND",), 20, proc=proc)
    ip = bound["new_ip_address"]
    assert ip in {f"10.78.0.{n}" for n in range(100, 111)}
    # RFC 2131 4.4.5: the client renews by unicast at T1 = 10 s and keeps its address.
    renewed = netlab.wait_dhclient_event(events, ("RENEW",), 25, proc=proc)
    assert renewed["new_ip_address"] == ip
    segment.stop(proc)
    assert running.stop() == 0
    running.start()
    # Another MAC claiming that address is refused, then gets a different one.
    second = segment.add_host("second", mac="02:00:00:00:03:20")
    stale_lease(workdir / "second", "second", ip)
    other = netlab.run_dhclient(second, workdir / "second")
    assert other.ip != ip
    assert f"sent NAK: {ip} is not yours" in running.text()
    # The first machine gets its address back after the restart.
    assert netlab.run_dhclient(first, workdir / "first").ip == ip


def test_reservation_mode_refuses_to_start_beside_another_dhcp_server(
    segment: netlab.Segment, workdir: Path
) -> None:
    router = segment.add_host("router", ip=f"{GATEWAY}/24")
    netlab.start_dnsmasq_router(router, "10.78.0.150", "10.78.0.200", ping_check=False)
    running = agent(segment, workdir, "reservation", ready=None)
    assert running.wait_exit(20) == 1
    text = running.text()
    assert "another DHCP server answers on eth0" in text
    assert GATEWAY in text and router.mac in text
    assert 'dhcp_mode = "proxy"' in text and "allow_other_dhcp_servers" in text
    assert "Traceback" not in text


def test_serve_stops_cleanly_on_ctrl_c(segment: netlab.Segment, workdir: Path) -> None:
    running = agent(segment, workdir, "proxy")
    assert running.stop(signal.SIGINT) == 0
    assert "Pixiebox stopped" in running.text()


FUZZER = r"""
import os, random, socket, struct, sys
rng = random.Random(int(sys.argv[1]))
target = sys.argv[2]
def valid():
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, rng.getrandbits(32), 0, 0x8000,
                       bytes(4), bytes(4), bytes(4), bytes(4), os.urandom(6) + bytes(10),
                       bytes(64), bytes(128))
    opts = bytes([53, 1, 1, 60, 9]) + b"PXEClient" + bytes([93, 2, 0, 0, 97, 17, 0])
    opts += os.urandom(16)
    return head + b"\x63\x82\x53\x63" + opts + b"\xff"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
s.bind(("0.0.0.0", 68))
sent = 0
for i in range(int(sys.argv[3])):
    kind = i % 4
    if kind == 0:
        data = os.urandom(rng.randrange(0, 700))
    elif kind == 1:
        data = valid()[: rng.randrange(0, 300)]
    elif kind == 2:
        data = bytearray(valid())
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(236, len(data))] = rng.randrange(256)
        data = bytes(data)
    else:
        data = valid()[:240] + os.urandom(rng.randrange(0, 400))
    dest = ("255.255.255.255", 67) if i % 3 == 0 else (target, 4011 if i % 3 == 1 else 67)
    s.sendto(data, dest)
    sent += 1
print(sent)
"""


def test_thousands_of_random_and_truncated_packets_leave_the_server_answering(
    segment: netlab.Segment, workdir: Path
) -> None:
    running = agent(segment, workdir, "proxy")
    attacker = segment.add_host("attacker", ip="10.78.0.66/24")
    script = workdir / "fuzz.py"
    script.write_text(FUZZER)
    out = attacker.run([sys.executable, str(script), "7", AGENT_IP, "4000"], timeout=120)
    assert out.stdout.strip() == "4000"
    client = segment.add_host("client", mac="02:00:00:00:03:55")
    replies = netlab.pxe_discover(client, arch=0, uuid=bytes(range(16)))
    assert [r.file for r in replies if r.src_ip == AGENT_IP] == ["undionly.kpxe"]
    assert running.proc.poll() is None
    assert "Traceback" not in running.text()
    assert "malformed DHCP packet" in running.text()
