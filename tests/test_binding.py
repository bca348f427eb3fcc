"""The lab's trust boundary at the sockets: boot HTTP, TFTP and DNS answer only on the lab
interface, the API on the lab address and loopback unless [api] listen says otherwise, and the
neighbour table counts only entries on the lab interface.

The agent's namespace has a second network (a management LAN: a veth to another namespace, in
another subnet) whose host is what a machine on another network of the appliance looks like. It
can reach the agent's addresses, the lab address too (Linux takes a packet for any local
address on any interface), so only the device binding keeps it out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import netlab
import pytest
from agentproc import RunningAgent, lab_toml, start_agent
from pixiebox.client.api import ApiClient
from pixiebox.config import load_config
from pixiebox.net.netif import arp_lookup, neighbour_mac

SUBNET = "10.86.0.0/24"
AGENT_IP = "10.86.0.2"
CLIENT_IP = "10.86.0.30"
MGMT_SUBNET = "10.87.0.0/24"
AGENT_MGMT_IP, MGMT_IP = "10.87.0.1", "10.87.0.5"  # add_linked_host: the 1st and 5th address

# --------------------------------------------------------------------------- /proc/net/arp

ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
10.86.0.30       0x1         0x2         02:00:00:86:00:1E     *        eth0
10.87.0.5        0x1         0x2         02:00:00:87:00:05     *        eth1
10.86.0.31       0x1         0x0         00:00:00:00:00:00     *        eth0
10.86.0.32       0x1         0x6         02:00:00:86:00:20     *        eth0
10.86.0.33       0x1         0x2         00:00:00:00:00:00     *        eth0
10.86.0.40       0x1         0x0         02:00:00:86:00:28     *        eth0
10.86.0.50       0x1         0x2         02:00:00:86:00:32     *        eth1
10.86.0.50       0x1         0x2         02:00:00:86:00:33     *        eth0
"""


def test_arp_lookup_finds_complete_entries() -> None:
    assert arp_lookup(ARP, "10.86.0.30") == "02:00:00:86:00:1e"
    assert arp_lookup(ARP, "10.86.0.30", "eth0") == "02:00:00:86:00:1e"
    assert arp_lookup(ARP, "10.86.0.32", "eth0") == "02:00:00:86:00:20"  # permanent + complete
    assert arp_lookup(ARP, "10.86.0.99") is None


def test_arp_lookup_counts_only_the_given_device() -> None:
    # A management LAN's host is not a lab machine, whatever its address.
    assert arp_lookup(ARP, "10.87.0.5") == "02:00:00:87:00:05"
    assert arp_lookup(ARP, "10.87.0.5", "eth0") is None
    # The same address on two networks: the lab's entry, not the first line.
    assert arp_lookup(ARP, "10.86.0.50", "eth0") == "02:00:00:86:00:33"
    assert arp_lookup(ARP, "10.86.0.50", "eth1") == "02:00:00:86:00:32"


@pytest.mark.parametrize("ip", ["10.86.0.31", "10.86.0.33", "10.86.0.40"])
def test_arp_lookup_ignores_incomplete_entries(ip: str) -> None:
    """Flags 0x0 (resolving, or failed) or the all-zero MAC: nobody answered there."""
    assert arp_lookup(ARP, ip) is None
    assert arp_lookup(ARP, ip, "eth0") is None


def test_arp_lookup_survives_odd_lines() -> None:
    assert arp_lookup("", "10.86.0.30") is None
    header = ARP.splitlines()[0]
    odd = f"{header}\n10.86.0.30 0x1\n10.86.0.30 0x1 zz 02:00:00:86:00:1e * eth0\n"
    assert arp_lookup(odd, "10.86.0.30") is None


def test_neighbour_mac_reads_the_table_file(tmp_path: Path) -> None:
    table = tmp_path / "arp"
    table.write_text(ARP)
    assert neighbour_mac("10.86.0.30", table, device="eth0") == "02:00:00:86:00:1e"
    assert neighbour_mac("10.87.0.5", table, device="eth0") is None
    assert neighbour_mac("10.87.0.5", table) == "02:00:00:87:00:05"
    assert neighbour_mac("10.86.0.30", tmp_path / "missing") is None


# --------------------------------------------------------------------------- the sockets


def _lab(segment: netlab.Segment, workdir: Path, api: str | None) -> tuple[
    RunningAgent, netlab.Host, netlab.Host
]:  # fmt: skip
    """The agent on the lab segment with a management LAN beside it; (agent, client, mgmt)."""
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    mgmt = segment.add_linked_host(agent_host, "mgmt", MGMT_SUBNET)
    client = segment.add_host("client", ip=f"{CLIENT_IP}/24")
    text = lab_toml(mode="reservation", subnet=SUBNET, assets=workdir / "assets",
                    state=workdir / "state")  # fmt: skip
    listen = f'listen = "{api}"\n' if api is not None else ""
    text = text.replace("[http]", f'[api]\n{listen}token_file = "{workdir / "t"}"\n[http]')
    return start_agent(agent_host, text, workdir), client, mgmt


def _curl(host: netlab.Host, url: str) -> int:
    """curl's exit status: 0 an HTTP answer (any status), 7 refused, 28 no answer in time."""
    return host.run(["curl", "-s", "-o", "/dev/null", "--max-time", "3", url],
                    timeout=10, check=False).returncode  # fmt: skip


def test_boot_http_and_api_answer_only_on_the_lab_interface_by_default(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl", "dig")  # type: ignore[operator]
    agent, client, mgmt = _lab(segment, workdir, api=None)
    # The management LAN reaches the agent's namespace (the path is open)...
    mgmt.run(["busybox", "ping", "-c", "1", "-W", "2", AGENT_IP], timeout=10)

    # ...and the lab segment gets every service.
    assert _curl(client, f"http://{AGENT_IP}/boot/02:00:00:86:00:1e.ipxe") == 0
    assert _curl(client, f"http://{AGENT_IP}:8080/api/v1/machines") == 0
    # On the appliance itself: the lab address and loopback (the local CLI).
    assert _curl(agent.host, f"http://{AGENT_IP}:8080/api/v1/machines") == 0
    assert _curl(agent.host, "http://127.0.0.1:8080/api/v1/machines") == 0
    assert _curl(agent.host, f"http://{AGENT_MGMT_IP}:8080/api/v1/machines") == 7
    # The CLI finds it there from lab.toml alone ([api] listen unset: 127.0.0.1:8080).
    cli = agent.host.run([sys.executable, "-m", "pixiebox.cli", "machines", "--config",
                          str(agent.config)], timeout=30, check=False)  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr

    # The management LAN gets nothing, by either of the agent's addresses.
    for ip in (AGENT_IP, AGENT_MGMT_IP):
        assert _curl(mgmt, f"http://{ip}/boot/02:00:00:87:00:05.ipxe") == 7, ip
        assert _curl(mgmt, f"http://{ip}:8080/api/v1/machines") == 7, ip
        fetched = mgmt.run(["curl", "-s", "--max-time", "3", f"tftp://{ip}/undionly.kpxe"],
                           timeout=10, check=False)  # fmt: skip
        assert fetched.returncode != 0 and not fetched.stdout, ip
        dig = mgmt.run(["dig", f"@{ip}", "+time=1", "+tries=1", "pixiebox.lab.test"],
                       timeout=10, check=False)  # fmt: skip
        assert dig.returncode == 9, (ip, dig.stdout)  # 9: no reply from the server
    # The lab client's DNS works, so the silence above is the binding, not a dead server.
    answer = client.run(["dig", f"@{AGENT_IP}", "+short", "+time=2", "pixiebox.lab.test"])
    assert answer.stdout.split() == [AGENT_IP]
    assert "HTTP listening on" in agent.text()

    # A host routed to the lab segment comes in through the lab interface: the sockets take
    # it, and what it may have is for the services to decide (it is off-link).
    _, far = segment.add_routed_host("router", "far", "10.86.0.254/24", "10.85.0.0/24")
    agent.host.add_route("10.85.0.0/24", via="10.86.0.254")
    assert _curl(far, f"http://{AGENT_IP}/boot/02:00:00:85:00:05.ipxe") == 0
    assert _curl(far, f"http://{AGENT_IP}:8080/api/v1/machines") == 0


def test_api_listen_on_every_address_reaches_the_management_network(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl")  # type: ignore[operator]
    agent, client, mgmt = _lab(segment, workdir, api="0.0.0.0:8080")

    assert _curl(mgmt, f"http://{AGENT_MGMT_IP}:8080/api/v1/machines") == 0
    assert _curl(client, f"http://{AGENT_IP}:8080/api/v1/machines") == 0
    assert _curl(agent.host, "http://127.0.0.1:8080/api/v1/machines") == 0
    # Boot HTTP stays on the lab interface whatever the API does.
    assert _curl(mgmt, f"http://{AGENT_MGMT_IP}/boot/02:00:00:87:00:05.ipxe") == 7
    assert _curl(client, f"http://{AGENT_IP}/boot/02:00:00:86:00:1e.ipxe") == 0


# --------------------------------------------------------------------------- the CLI's address


@pytest.mark.parametrize(
    ("listen", "base"),
    [
        (None, "http://127.0.0.1:8080"),
        ("0.0.0.0:9000", "http://127.0.0.1:9000"),
        (":9001", "http://127.0.0.1:9001"),
        ("10.86.0.2:8080", "http://10.86.0.2:8080"),
    ],
)
def test_cli_finds_the_api_from_lab_toml(tmp_path: Path, listen: str | None, base: str) -> None:
    text = lab_toml(mode="proxy", subnet=SUBNET, assets=tmp_path / "a", state=tmp_path / "s",
                    gateway="10.86.0.1")  # fmt: skip
    line = f'listen = "{listen}"\n' if listen is not None else ""
    path = tmp_path / "lab.toml"
    path.write_text(text.replace("[http]", f"[api]\n{line}[http]"))
    config = load_config(path)
    assert config.api.listen == listen
    assert ApiClient.for_config(config).base == base
    assert ApiClient.for_config(config, "http://10.87.0.1:8080/").base == "http://10.87.0.1:8080"
