"""DHCPDECLINE and DHCPRELEASE change a lease only when they come from its holder (RFC 2131
4.3.3, 4.3.4), on the lab interface; declined addresses come back after the quarantine.

The attacks are forged with scapy (tests/dhcpforge.py) from another namespace on the segment;
the victims are ISC dhclient and a scapy client that sends a client identifier."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import netlab
import pytest
from agentproc import READY, RunningAgent, lab_toml
from pixiebox.config import LabConfig
from pixiebox.core.firmware import Assets
from pixiebox.core.inventory import Inventory
from pixiebox.core.urls import BootUrls
from pixiebox.dhcp.codec import BOOTREQUEST, MessageType, Opt, Packet, decode, encode
from pixiebox.dhcp.full import FullHandler
from pixiebox.dhcp.leases import AddressBook
from pixiebox.dhcp.policy import BootPolicy
from pixiebox.dhcp.reservation import REFUSALS_LOGGED, ReservationHandler
from pixiebox.events import Kind
from pixiebox.store.state import StateStore

FORGE = Path(__file__).resolve().parent / "dhcpforge.py"

SUBNET = "10.79.0.0/24"
GATEWAY = "10.79.0.1"
AGENT_IP = "10.79.0.2"
ATTACKER_IP = "10.79.0.66/24"
C1_MAC, C1_IP = "02:00:00:00:04:01", "10.79.0.31"
VICTIM = "02:00:00:00:04:10"
CLIENT_ID = "01020000000410"  # RFC 2132 9.14: type 1 (Ethernet) + the MAC, as iPXE sends it
OTHER_ID = "ff00000001000100"
DHCPNAK = 6


# --------------------------------------------------------------------------- in process


def handler(tmp_path: Path, kind: type[ReservationHandler] = FullHandler) -> ReservationHandler:
    config = LabConfig.model_validate({
        "network": {"subnet": "10.0.0.0/24", "pool": "10.0.0.100-10.0.0.103",
                    "lease_time": "1h"},
        "machines": [{"name": "c1", "mac": C1_MAC, "ip": "10.0.0.31"}],
    })  # fmt: skip
    store = StateStore(tmp_path / "state")
    inventory = Inventory(config, store)
    policy = BootPolicy(Assets(tmp_path / "assets"), BootUrls(IPv4Address("10.0.0.2")))
    book = AddressBook(store, config.network.pool)
    return kind(inventory, policy, book, IPv4Network("10.0.0.0/24"))


def packet(kind: MessageType, mac: str, client_id: str | None = None, **fields: str) -> Packet:
    options: dict[int, bytes] = {Opt.MESSAGE_TYPE: bytes((kind,))}
    if client_id is not None:
        options[Opt.CLIENT_ID] = bytes.fromhex(client_id)
    for name, code in (("requested", Opt.REQUESTED_IP), ("server", Opt.SERVER_ID)):
        if name in fields:
            options[code] = IPv4Address(fields[name]).packed
    chaddr = bytes.fromhex(mac.replace(":", ""))
    ciaddr = IPv4Address(fields.get("ciaddr", "0.0.0.0"))
    return decode(encode(Packet(op=BOOTREQUEST, xid=7, chaddr=chaddr, ciaddr=ciaddr,
                                options=options)))  # fmt: skip


def test_refusals_are_events_of_known_machines_only_and_touch_nothing_of_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dhcp = handler(tmp_path)
    lifecycle = dhcp.inventory.lifecycle
    ip = "10.0.0.31"
    ack = dhcp.handle(packet(MessageType.REQUEST, C1_MAC, CLIENT_ID, requested=ip), 67)
    assert ack is not None and ack.message_type is MessageType.ACK
    before = lifecycle.records()[C1_MAC]
    time.sleep(0.01)
    stranger = "02:00:00:00:04:99"
    forged = [
        packet(MessageType.DECLINE, C1_MAC, OTHER_ID, requested=ip, server="10.0.0.2"),
        packet(MessageType.RELEASE, C1_MAC, None, ciaddr=ip, server="10.0.0.2"),
        packet(MessageType.DECLINE, stranger, None, requested=ip, server="10.0.0.2"),
        packet(MessageType.RELEASE, stranger, CLIENT_ID, ciaddr=ip),
    ]
    with caplog.at_level("WARNING", logger="pixiebox.dhcp"):
        for message in forged:
            assert dhcp.handle(message, 67) is None
    lease = dhcp.book.lease_at(IPv4Address(ip))
    assert lease is not None and (lease.mac, lease.state, lease.client_id) == (
        C1_MAC, "bound", CLIENT_ID)  # fmt: skip
    # c1 is known: the refusals in its name are in its log; nothing of c1 moved.
    refused = [e.fields for e in lifecycle.events(C1_MAC) if e.kind == Kind.DHCP_REFUSED]
    assert refused == [{"reason": "decline-not-holder", "ip": ip},
                       {"reason": "release-not-holder", "ip": ip}]  # fmt: skip
    assert lifecycle.records()[C1_MAC] == before
    # The stranger is nobody the lab knows: log lines only, no machine record, no event.
    assert stranger not in lifecycle.records()
    assert lifecycle.events(stranger) == []
    assert lifecycle.events("") == []
    text = caplog.text
    assert f"ignored a DHCPDECLINE for {ip} sent with the MAC of c1 ({C1_MAC})" in text
    assert f"client identifier {CLIENT_ID}" in text
    assert f"ignored a DHCPRELEASE for {ip} sent with the MAC of unknown machine {stranger}" in text
    assert "is leased to 02:00:00:00:04:01" in text


def test_a_flood_of_forged_declines_is_logged_and_recorded_a_few_times_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dhcp = handler(tmp_path)
    forged = packet(MessageType.DECLINE, C1_MAC, None, requested="10.0.0.100", server="10.0.0.2")
    dhcp.inventory.record(C1_MAC, Kind.DHCP_LEASE, "bound", None, {"action": "bound"})
    with caplog.at_level("WARNING", logger="pixiebox.dhcp"):
        for _ in range(500):
            dhcp.handle(forged, 67)
    lines = [r for r in caplog.records if "ignored a DHCPDECLINE" in r.getMessage()]
    assert len(lines) == REFUSALS_LOGGED
    events = dhcp.inventory.lifecycle.events(C1_MAC)
    assert len([e for e in events if e.kind == Kind.DHCP_REFUSED]) == REFUSALS_LOGGED


def test_the_holders_decline_quarantines_its_address_in_reservation_mode_too(
    tmp_path: Path,
) -> None:
    dhcp = handler(tmp_path, ReservationHandler)
    ip = "10.0.0.31"
    assert dhcp.handle(packet(MessageType.REQUEST, C1_MAC, None, requested=ip), 67) is not None
    decline = packet(MessageType.DECLINE, C1_MAC, None, requested=ip, server="10.0.0.2")
    assert dhcp.handle(decline, 67) is None
    assert IPv4Address(ip) in dhcp.book.quarantined()
    assert IPv4Address(ip) in dhcp.held_addresses()
    events = dhcp.inventory.lifecycle.events(C1_MAC)
    assert events[-1].fields == {"action": "declined", "ip": ip}


# --------------------------------------------------------------------------- namespaces

#: The agent with another quarantine: AddressBook reads DECLINE_QUARANTINE when it is built.
_WITH_QUARANTINE = """
import sys
import pixiebox.dhcp.leases as leases
leases.DECLINE_QUARANTINE = float(sys.argv.pop(1))
from pixiebox.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class QuarantinedAgent(RunningAgent):
    """The real agent (`pixiebox serve`), its DHCP quarantine shortened for the test."""

    quarantine: float = 600.0

    def start(self, ready: str | None = READY, timeout: float = 20.0) -> QuarantinedAgent:
        self.log = self.host.log_path("agent")
        argv = [sys.executable, "-c", _WITH_QUARANTINE, str(self.quarantine), "serve",
                "--config", str(self.config), "--log-level", "debug"]  # fmt: skip
        self.proc = self.host.popen(argv, self.log)
        if ready is not None:
            self.wait_log(ready, timeout)
        return self


@pytest.fixture
def needs_peers(netlab_require: object) -> None:
    netlab_require("dhclient")  # type: ignore[operator]


def start(
    segment: netlab.Segment, workdir: Path, mode: str, *, quarantine: float = 600.0,
    **kwargs: object,
) -> tuple[QuarantinedAgent, netlab.Host]:  # fmt: skip
    host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    config = workdir / "lab.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    config.write_text(lab_toml(
        mode=mode, subnet=SUBNET, gateway=GATEWAY, assets=workdir / "assets",
        state=workdir / "state", machines=[("c1", C1_MAC, C1_IP)], **kwargs,  # type: ignore[arg-type]
    ))  # fmt: skip
    return QuarantinedAgent(host, config, quarantine=quarantine).start(), host


def forge(
    host: netlab.Host, mode: str, *, timeout: float = 1.0, iface: str | None = None,
    **options: str | None,
) -> list[netlab.Reply]:  # fmt: skip
    argv = [sys.executable, str(FORGE), mode, "--iface", iface or host.iface,
            "--timeout", str(timeout)]  # fmt: skip
    for name, value in options.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", value]
    out = host.run(argv, timeout=timeout * 2 + 30)
    return [netlab.Reply.from_json(r) for r in json.loads(out.stdout)["replies"]]


def leases(workdir: Path) -> dict[str, tuple[str, str, str]]:
    """The agent's leases on disk: address -> (mac, state, client id)."""
    with sqlite3.connect(f"file:{workdir / 'state' / 'pixiebox.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT ip, mac, state, client_id FROM leases").fetchall()
    return {ip: (mac, state, cid) for ip, mac, state, cid in rows}


def recorded(workdir: Path) -> tuple[set[str], list[tuple[str, str, dict[str, object]]]]:
    """The machines the agent has records of, and its events (mac, kind, fields)."""
    with sqlite3.connect(f"file:{workdir / 'state' / 'pixiebox.db'}?mode=ro", uri=True) as db:
        macs = {row[0] for row in db.execute("SELECT mac FROM machines")}
        rows = db.execute("SELECT mac, kind, fields FROM events ORDER BY id").fetchall()
    return macs, [(mac, kind, json.loads(fields)) for mac, kind, fields in rows]


def rx_packets(host: netlab.Host, link: str) -> int:
    out = host.run(["ip", "-j", "-s", "link", "show", "dev", link]).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def only(replies: list[netlab.Reply], message_type: int) -> netlab.Reply:
    matching = [r for r in replies if r.message_type == message_type]
    assert len(matching) == 1, replies
    return matching[0]


@pytest.mark.usefixtures("needs_peers")
@pytest.mark.parametrize("mode", ["reservation", "full"])
def test_forged_decline_and_release_leave_a_dhclient_lease_and_its_renewal_intact(
    segment: netlab.Segment, workdir: Path, mode: str
) -> None:
    running, _ = start(segment, workdir, mode, pool="10.79.0.100-10.79.0.110", lease_time="20s")
    mac = C1_MAC if mode == "reservation" else VICTIM
    victim = segment.add_host("victim", mac=mac)
    proc, events = netlab.start_dhclient_daemon(victim, workdir / "victim")
    ip = netlab.wait_dhclient_event(events, ("BOUND",), 20, proc=proc)["new_ip_address"]
    assert ip == C1_IP or mode == "full"
    holder = leases(workdir)[ip]
    assert holder[:2] == (mac, "bound")
    attacker = segment.add_host("attacker", ip=ATTACKER_IP)
    forge(attacker, "decline", mac=attacker.mac, requested_ip=ip, server_id=AGENT_IP)
    forge(attacker, "release", mac=attacker.mac, ciaddr=ip, server_id=AGENT_IP)
    if holder[2]:  # dhclient sent a client identifier: the victim's chaddr without it
        forge(attacker, "decline", mac=mac, requested_ip=ip, server_id=AGENT_IP,
              client_id=OTHER_ID)  # fmt: skip
    running.wait_log(f"ignored a DHCPRELEASE for {ip} sent with the MAC of unknown machine "
                     f"{attacker.mac}: {ip} is leased to {mac}")  # fmt: skip
    assert f"ignored a DHCPDECLINE for {ip} sent with the MAC of unknown machine" in running.text()
    assert leases(workdir)[ip] == holder
    machines, logged = recorded(workdir)
    assert attacker.mac not in machines  # a forger cannot create machine records
    assert all(m != attacker.mac for m, _, _ in logged)
    # RFC 2131 4.4.5: at T1 (10 s) dhclient renews, and keeps its address.
    after = len(netlab.read_dhclient_events(events))
    renewed = netlab.wait_dhclient_event(events, ("RENEW",), 25, after=after, proc=proc)
    assert renewed["new_ip_address"] == ip
    assert "sent NAK" not in running.text()
    assert leases(workdir)[ip][:2] == (mac, "bound")
    segment.stop(proc)


@pytest.mark.usefixtures("needs_peers")
def test_only_the_holder_on_the_lab_interface_declines_and_the_quarantine_ends(
    segment: netlab.Segment, workdir: Path
) -> None:
    quarantine = 12.0
    pool = "10.79.0.100-10.79.0.100"  # one address: who gets it shows the quarantine
    running, agent_host = start(segment, workdir, "full", pool=pool, quarantine=quarantine)
    victim = segment.add_host("victim", mac=VICTIM)
    ack = only(forge(victim, "lease", mac=VICTIM, client_id=CLIENT_ID), netlab.DHCPACK)
    ip = ack.yiaddr
    assert ip == "10.79.0.100"
    victim.add_address(f"{ip}/24")  # the renewal's ACK is unicast to it
    assert leases(workdir)[ip] == (VICTIM, "bound", CLIENT_ID)

    # Forged on the segment: another chaddr; the victim's chaddr with another client
    # identifier, or none.
    attacker = segment.add_host("attacker", ip=ATTACKER_IP)
    for mac, cid in ((attacker.mac, None), (VICTIM, OTHER_ID), (VICTIM, None)):
        forge(attacker, "decline", mac=mac, client_id=cid, requested_ip=ip, server_id=AGENT_IP)
        forge(attacker, "release", mac=mac, client_id=cid, ciaddr=ip, server_id=AGENT_IP)
    running.wait_log(f"client identifier {CLIENT_ID}, this one no client identifier")
    # The holder's very DECLINE, but from another network the agent is attached to: the DHCP
    # sockets are bound to the lab interface and never hear it.
    mgmt = segment.add_host("mgmt")
    agent_host.run(["ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1",
                    "netns", mgmt.name])  # fmt: skip
    agent_host.run(["ip", "addr", "add", "192.168.79.2/24", "dev", "eth1"])
    agent_host.run(["ip", "link", "set", "eth1", "up"])
    mgmt.run(["ip", "link", "set", "eth1", "up"])
    netlab.wait_until(
        lambda: "LOWER_UP" in agent_host.run(["ip", "link", "show", "eth1"]).stdout,
        5.0, 0.1, "eth1 up",
    )  # fmt: skip
    received = rx_packets(agent_host, "eth1")
    forge(mgmt, "decline", iface="eth1", mac=VICTIM, client_id=CLIENT_ID, requested_ip=ip,
          server_id=AGENT_IP)  # fmt: skip
    assert rx_packets(agent_host, "eth1") > received  # it did reach the agent's namespace

    assert leases(workdir)[ip] == (VICTIM, "bound", CLIENT_ID)
    machines, logged = recorded(workdir)
    assert attacker.mac not in machines
    refused = [(kind, fields) for mac, kind, fields in logged if mac == VICTIM
               and kind == Kind.DHCP_REFUSED]  # fmt: skip
    assert refused == [(Kind.DHCP_REFUSED, {"reason": f"{verb}-not-holder", "ip": ip})
                       for _ in range(2) for verb in ("decline", "release")]  # fmt: skip
    # The victim renews and gets an ACK for the same address.
    renewal = forge(victim, "renew", mac=VICTIM, client_id=CLIENT_ID, ciaddr=ip)
    assert only(renewal, netlab.DHCPACK).yiaddr == ip
    assert f"declined {ip}" not in running.text()

    # The holder's own DECLINE, on the lab segment, is honoured: the address is quarantined.
    forge(victim, "decline", mac=VICTIM, client_id=CLIENT_ID, requested_ip=ip,
          server_id=AGENT_IP, timeout=0.2)  # fmt: skip
    declined_at = time.monotonic()
    running.wait_log(f"declined {ip}: another host on the LAN is using that address")
    assert leases(workdir)[ip] == ("", "declined", "")
    newcomer = segment.add_host("newcomer", mac="02:00:00:00:04:20")
    assert forge(newcomer, "lease", mac=newcomer.mac, timeout=1.0) == []
    assert time.monotonic() - declined_at < quarantine  # that was still within the quarantine
    assert "the pool 10.79.0.100-10.79.0.100 is exhausted" in running.text()
    # After the quarantine the address is free again.
    time.sleep(max(0.0, declined_at + quarantine + 0.5 - time.monotonic()))
    ack = only(forge(newcomer, "lease", mac=newcomer.mac), netlab.DHCPACK)
    assert ack.yiaddr == ip
    assert leases(workdir)[ip][:2] == (newcomer.mac, "bound")
