"""Proxy mode beside a real home router (dnsmasq): boot information only, never an address."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import netlab
import pytest
from agentproc import RunningAgent, lab_toml, start_agent

SUBNET = "10.77.0.0/24"
ROUTER_IP = "10.77.0.1"
AGENT_IP = "10.77.0.2"
ENROLLED_MAC = "02:00:00:00:02:01"
UUID = bytes(range(1, 17))
OPTION_97 = b"\x00" + UUID  # RFC 4578 2.3: type 0, then the 16-byte UUID


@dataclass
class ProxyLab:
    segment: netlab.Segment
    router: netlab.Host
    agent_host: netlab.Host
    agent: RunningAgent
    client: netlab.Host
    workdir: Path


@pytest.fixture(scope="module")
def proxy_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyLab]:
    if netlab.prerequisite_problem(("dnsmasq", "dhclient", "tcpdump")):
        pytest.fail("netlab prerequisites missing") if os.environ.get("CI") else pytest.skip(
            str(netlab.prerequisite_problem(("dnsmasq", "dhclient", "tcpdump")))
        )
    workdir = tmp_path_factory.mktemp("proxy")
    assets = workdir / "assets"
    (assets / "ipxe").mkdir(parents=True)
    (assets / "ipxe" / "ipxe-arm64.efi").write_bytes(b"arm64 iPXE stand-in")
    with netlab.Segment(workdir / "segment") as segment:
        router = segment.add_host("router", ip=f"{ROUTER_IP}/24")
        netlab.start_dnsmasq_router(router, "10.77.0.100", "10.77.0.150", ping_check=False)
        agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
        config = lab_toml(
            mode="proxy", subnet=SUBNET, assets=assets, state=workdir / "state",
            machines=[("c1", ENROLLED_MAC, None)],
        )  # fmt: skip
        agent = start_agent(agent_host, config, workdir)
        client = segment.add_host("client", mac=ENROLLED_MAC)
        yield ProxyLab(segment, router, agent_host, agent, client, workdir)


def replies_from(replies: list[netlab.Reply], ip: str) -> list[netlab.Reply]:
    return [reply for reply in replies if reply.src_ip == ip]


@pytest.mark.parametrize(
    ("arch", "boot_file", "skips_discovery"),
    [(0, "undionly.kpxe", True), (7, "ipxe.efi", False), (9, "ipxe.efi", False),
     (11, "ipxe-arm64.efi", False)],
)  # fmt: skip
def test_pxe_client_gets_boot_file_for_its_arch_and_address_from_router(
    proxy_lab: ProxyLab, arch: int, boot_file: str, skips_discovery: bool
) -> None:
    replies = netlab.pxe_discover(proxy_lab.client, arch=arch, uuid=UUID)
    ours = replies_from(replies, AGENT_IP)
    router = replies_from(replies, ROUTER_IP)
    assert len(ours) == 1, replies
    offer = ours[0]
    assert offer.message_type == netlab.DHCPOFFER
    assert offer.yiaddr == "0.0.0.0"  # proxy: never an address
    assert offer.file == boot_file
    assert offer.siaddr == AGENT_IP  # docs/firmware-quirks.md#2: next-server set
    assert offer.option(54) == bytes(map(int, AGENT_IP.split(".")))
    assert offer.option_text(60) == "PXEClient"
    assert offer.option(97) == OPTION_97
    # BIOS: skip boot-server discovery; UEFI: no option 43, it asks on 4011 (quirk #3).
    assert (offer.option(43) == b"\x06\x01\x08\xff") is skips_discovery
    assert offer.option(43) is None or skips_discovery
    # The address comes from the home router, which knows nothing about booting.
    assert router and router[0].yiaddr.startswith("10.77.0.1")
    assert not router[0].file


def test_ipxe_client_gets_its_script_url(proxy_lab: ProxyLab) -> None:
    replies = netlab.pxe_discover(proxy_lab.client, arch=0, uuid=UUID, user_class="iPXE")
    (offer,) = replies_from(replies, AGENT_IP)
    assert offer.file == f"http://{AGENT_IP}/boot/{ENROLLED_MAC}.ipxe"


def test_uefi_follow_up_on_port_4011_is_acked_with_the_boot_file(proxy_lab: ProxyLab) -> None:
    host = proxy_lab.segment.add_host("uefi", mac="02:00:00:00:02:07", ip="10.77.0.120/24")
    replies = netlab.pxe_request_4011(host, AGENT_IP, arch=7, uuid=UUID, client_ip="10.77.0.120")
    (ack,) = replies_from(replies, AGENT_IP)
    assert ack.message_type == netlab.DHCPACK
    assert ack.file == "ipxe.efi"
    assert ack.dst_ip == "10.77.0.120"
    assert ack.option(97) == OPTION_97


def test_rom_without_uuid_is_answered_and_a_malformed_uuid_is_not(proxy_lab: ProxyLab) -> None:
    # docs/firmware-quirks.md#1: some ROMs omit option 97; a present one must be 17 bytes, type 0.
    assert replies_from(netlab.pxe_discover(proxy_lab.client, arch=0, uuid=None), AGENT_IP)
    bad = netlab.pxe_discover(
        proxy_lab.client, arch=0, uuid=None, extra_options={97: b"\x01\x02\x03"}
    )
    assert not replies_from(bad, AGENT_IP)


def test_unknown_machine_is_recorded_and_logged_with_how_to_enroll(proxy_lab: ProxyLab) -> None:
    mac = "02:00:00:00:02:99"
    replies = netlab.pxe_discover(proxy_lab.client, arch=0, uuid=UUID, mac=mac)
    (offer,) = replies_from(replies, AGENT_IP)
    assert offer.file == "undionly.kpxe"
    text = proxy_lab.agent.wait_log(f"unknown machine {mac} (x86_64 BIOS) asked to boot")
    assert "recorded as discovered" in text
    assert f"pixiebox enroll {mac} --name" in text


def test_plain_dhcp_client_gets_its_address_from_the_router_and_nothing_from_us(
    proxy_lab: ProxyLab,
) -> None:
    host = proxy_lab.segment.add_host("laptop", mac="02:00:00:00:02:42")
    pcap = proxy_lab.workdir / "agent-out.pcap"
    capture = proxy_lab.agent_host.popen(
        ["tcpdump", "-i", "eth0", "-n", "-U", "-w", str(pcap), f"udp and src host {AGENT_IP}"],
        proxy_lab.agent_host.log_path("tcpdump"),
    )
    netlab.wait_until(pcap.exists, 5, message="tcpdump did not start")
    lease = netlab.run_dhclient(host, proxy_lab.workdir / "laptop")
    proxy_lab.segment.stop(capture)
    assert lease.server_id == ROUTER_IP
    assert lease.ip.startswith("10.77.0.1")
    sent = proxy_lab.agent_host.run(["tcpdump", "-r", str(pcap), "-n"], check=False).stdout
    assert sent.strip() == "", f"the agent answered a non-PXE client:\n{sent}"
