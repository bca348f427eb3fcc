"""The lab's trust boundary (SECURITY.md), tried as an attacker on the LAN would.

One agent (proxy mode, so the home router's addresses are static here) serves every check; the
attackers are a host on the lab segment with its own MAC ("impostor") and a host one hop away
behind a router namespace ("remote"). Each check also shows that the real machine still gets
what it needs. The spoofed DHCPDECLINE is in test_dhcp_decline.py, the DNS open resolver in
test_dns.py, the TFTP error texts in test_tftp.py, file modes in test_file_modes.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netlab
import pytest
from agentproc import RunningAgent, lab_toml, start_agent

SUBNET = "10.88.0.0/24"
AGENT_IP = "10.88.0.2"
ROUTER_IP = "10.88.0.254"
REMOTE_NET = "10.89.0.0/24"
REMOTE_IP = "10.89.0.5"  # Segment.add_routed_host's host address there
C1_MAC, C1_IP = "02:00:00:00:88:31", "10.88.0.31"
C2_MAC, C2_IP = "02:00:00:00:88:32", "10.88.0.32"
C3_MAC, C3_IP = "02:00:00:00:88:33", "10.88.0.33"
IMPOSTOR_IP = "10.88.0.52"


@dataclass
class Lab:
    agent_host: netlab.Host
    agent: RunningAgent
    c1: netlab.Host
    c2: netlab.Host
    c3: netlab.Host
    impostor: netlab.Host
    remote: netlab.Host
    workdir: Path

    def get(
        self, host: netlab.Host, path: str, *args: str, token: str | None = None
    ) -> tuple[int, str]:
        """(status, body) of a request to the boot HTTP server from `host`."""
        auth = ["-H", f"Authorization: Bearer {token}"] if token else []
        out = host.run(["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *auth, *args,
                        f"http://{AGENT_IP}{path}"]).stdout  # fmt: skip
        body, _, status = out.rpartition("\n")
        return int(status), body

    def api(self, path: str) -> Any:
        """The agent's API, from inside its namespace (it listens on the lab address and
        loopback by default)."""
        out = self.agent_host.run(["curl", "-sS", "--max-time", "10",
                                   f"http://127.0.0.1:8080{path}"]).stdout  # fmt: skip
        return json.loads(out)

    def boot_token(self, host: netlab.Host, mac: str) -> str | None:
        """The pixiebox.token= of `mac`'s iPXE script as `host` gets it (None: no token)."""
        status, script = self.get(host, f"/boot/{mac}.ipxe")
        assert status == 200 and script.startswith("#!ipxe"), script
        found = re.search(r"pixiebox\.token=(\S+)", script)
        return found.group(1) if found else None

    def refusals(self, key: str | None = None) -> list[dict[str, Any]]:
        """secret.refused fields in a machine's log, or in the lab's own (key None)."""
        path = f"/api/v1/machines/{key}/events" if key else "/api/v1/lab/events"
        return [e["fields"] for e in self.api(path) if e["kind"] == "secret.refused"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    problem = netlab.prerequisite_problem(("curl", "dig"))
    if problem:
        pytest.fail(problem) if os.environ.get("CI") else pytest.skip(problem)
    workdir = tmp_path_factory.mktemp("security")
    with netlab.Segment(workdir / "segment") as segment:
        agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
        _router, remote = segment.add_routed_host("router", "remote", f"{ROUTER_IP}/24",
                                                  REMOTE_NET)  # fmt: skip
        agent_host.add_route(REMOTE_NET, via=ROUTER_IP)
        text = lab_toml(
            mode="proxy", subnet=SUBNET, assets=workdir / "assets", state=workdir / "state",
            machines=[("c1", C1_MAC, None), ("c2", C2_MAC, None), ("c3", C3_MAC, None)],
        )  # fmt: skip
        text += f'[kubernetes]\nserver = "https://{AGENT_IP}:6443"\n'
        agent = start_agent(agent_host, text, workdir)
        yield Lab(
            agent_host,
            agent,
            segment.add_host("c1", mac=C1_MAC, ip=f"{C1_IP}/24"),
            segment.add_host("c2", mac=C2_MAC, ip=f"{C2_IP}/24"),
            segment.add_host("c3", mac=C3_MAC, ip=f"{C3_IP}/24"),
            segment.add_host("impostor", ip=f"{IMPOSTOR_IP}/24"),
            remote,
            workdir,
        )


def test_a_routed_host_gets_no_metadata_even_with_the_machines_token(lab: Lab) -> None:
    token = lab.boot_token(lab.c1, C1_MAC)
    assert token is not None
    # Behind a router: c1's script (public) comes without a token, and even c1's real token
    # opens nothing from there.
    assert lab.boot_token(lab.remote, C1_MAC) is None
    status, body = lab.get(lab.remote, "/metadata", token=token)
    assert status == 404 and "BEGIN" not in body and token not in body, body
    assert {"secret": "boot-token", "ip": REMOTE_IP, "reason": "off-link"} in lab.refusals("c1")
    assert {"secret": "metadata", "ip": REMOTE_IP, "reason": "off-link"} in lab.refusals()
    # `pixiebox events` shows the lab's own log: who was refused what.
    shown = lab.agent_host.run([sys.executable, "-m", "pixiebox.cli", "events", "--config",
                                str(lab.agent.config)]).stdout  # fmt: skip
    assert f"refused metadata to {REMOTE_IP}: not on the lab segment" in shown, shown
    # The real c1 still gets its own, and the log says which secrets went to it and when.
    status, body = lab.get(lab.c1, "/metadata", token=token)
    assert status == 200, body
    document = json.loads(body)
    assert document["name"] == "c1" and document["kubernetes"]["token"]
    assert "BEGIN OPENSSH PRIVATE KEY" in document["ssh_host_key"]["private"]
    sent = [e for e in lab.api("/api/v1/machines/c1/events") if e["kind"] == "metadata.sent"]
    assert sent[-1]["fields"] == {
        "ip": C1_IP, "secrets": "ssh-host-key,node-password,k3s-token"}  # fmt: skip


def dig(host: netlab.Host, name: str) -> str:
    return host.run(["dig", "+short", "+time=2", "+tries=1", f"@{AGENT_IP}", name]).stdout.strip()


def test_another_mac_fetching_a_machines_script_moves_nothing(lab: Lab) -> None:
    assert lab.boot_token(lab.c3, C3_MAC) is not None
    assert dig(lab.c3, "c3.lab.test") == C3_IP
    before = lab.api("/api/v1/machines/c3")
    events_before = lab.api("/api/v1/machines/c3/events")
    # The impostor asks for c3's script, then for metadata with whatever it has.
    assert lab.boot_token(lab.impostor, C3_MAC) is None
    status, body = lab.get(lab.impostor, "/metadata")
    assert status == 404 and "BEGIN" not in body
    # c3's name, address, state and last sighting are where they were; its log only gained
    # the refusal, which names the impostor's MAC.
    assert dig(lab.c3, "c3.lab.test") == dig(lab.impostor, "c3.lab.test") == C3_IP
    after = lab.api("/api/v1/machines/c3")
    assert {k: after[k] for k in ("ip", "state", "last_seen")} == {
        k: before[k] for k in ("ip", "state", "last_seen")}  # fmt: skip
    added = lab.api("/api/v1/machines/c3/events")[len(events_before) :]
    assert [(e["kind"], e["fields"]) for e in added] == [
        ("secret.refused", {"secret": "boot-token", "ip": IMPOSTOR_IP, "reason": "not-owner",
                            "seen_mac": lab.impostor.mac}),
    ]  # fmt: skip


def send_syslog(host: netlab.Host, line: str) -> None:
    host.run(["bash", "-c", f"printf %s {shlex.quote(line)} >/dev/udp/{AGENT_IP}/514"])


def test_forged_phone_homes_and_syslog_lines_change_nothing(lab: Lab) -> None:
    token = lab.boot_token(lab.c2, C2_MAC)
    assert token is not None and lab.api("/api/v1/machines/c2")["state"] == "booting"
    # A phone-home naming c2, from the impostor on the segment and from the routed host.
    for host, source in ((lab.impostor, IMPOSTOR_IP), (lab.remote, REMOTE_IP)):
        status, body = lab.get(host, f"/api/v1/phone-home?mac={C2_MAC}", "--data", "")
        assert status == 403, body
        assert f"refused c2's phone-home to {source}" in body
    assert lab.api("/api/v1/machines/c2")["state"] == "booting"
    # A syslog line that claims to be c2 (its HOSTNAME) from the impostor's address, then a
    # genuine one from c2: only the genuine one is in c2's log.
    send_syslog(lab.impostor, "<30>1 2026-12-04T10:00:00Z c2 k3s 1 - - forged by the impostor")
    send_syslog(lab.c2, "<30>1 2026-12-04T10:00:01Z c2 k3s 1 - - genuine from c2 "
                "pixiebox.token=" + token)  # fmt: skip

    def syslogged() -> list[str] | None:
        lines = [e["message"] for e in lab.api("/api/v1/machines/c2/events")
                 if e["kind"] == "syslog"]  # fmt: skip
        return lines if any("genuine" in line for line in lines) else None

    lines = netlab.wait_until(syslogged, 10, 0.2, "c2's genuine syslog line never arrived")
    assert not any("forged" in line for line in lines), lines
    # A boot token in a line (the kernel prints its command line) never lands in the log.
    assert token not in json.dumps(lab.api("/api/v1/machines/c2/events"))
    assert any("pixiebox.token=<redacted>" in line for line in lines), lines
    # c2 itself: its metadata with its token, its phone-home (which retires the token).
    assert lab.get(lab.c2, "/metadata", token=token)[0] == 200
    status, body = lab.get(lab.c2, f"/api/v1/phone-home?mac={C2_MAC}", "--data", "")
    assert (status, body.strip()) == (200, "ok"), body
    assert lab.api("/api/v1/machines/c2")["state"] == "up"
    assert lab.get(lab.c2, "/metadata", token=token)[0] == 401


def test_the_routed_host_is_off_link(lab: Lab) -> None:
    """What the evidence rule rests on: after talking to the routed host, the agent's neighbour
    table has an entry for its router, none for it."""
    assert lab.get(lab.remote, "/ssh.keys")[0] == 200
    neighbours = lab.agent_host.run(["ip", "-4", "neigh", "show", "dev", "eth0"]).stdout
    assert REMOTE_IP not in neighbours and ROUTER_IP in neighbours, neighbours
