"""The local API and the CLI against a running agent: discovery, enrollment without a restart,
the event stream, the token, OpenAPI and /metrics."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import netlab
from agentproc import RunningAgent, lab_toml, start_agent
from pixiebox.events import Kind, fields_of

SUBNET = "10.82.0.0/24"
AGENT_IP = "10.82.0.2"
C1_MAC, C1_IP = "02:00:00:00:82:01", "10.82.0.31"
STRANGER = "00:04:4b:00:82:99"  # an NVIDIA OUI, like the user's Jetson boards
UUID = bytes(range(16))


def api_lab(workdir: Path, token_file: Path, **kwargs: Any) -> str:
    """A test lab.toml (agentproc.lab_toml) with its token file and the API where it listens
    by default: the lab address and 127.0.0.1, port 8080."""
    text = lab_toml(assets=workdir / "assets", state=workdir / "state", **kwargs)
    return text.replace("[http]", f'[api]\ntoken_file = "{token_file}"\n[http]')


def api_agent(
    segment: netlab.Segment,
    workdir: Path,
    token_file: Path,
    edit: Callable[[str], str] = lambda text: text,
    **kwargs: Any,
) -> RunningAgent:
    """The agent on its own host of `segment`, with api_lab's configuration (`edit`ed)."""
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    return start_agent(agent_host, edit(api_lab(workdir, token_file, **kwargs)), workdir)


def pixiebox(host: netlab.Host, config: Path, *args: str, check: bool = True) -> str:
    result = host.run([sys.executable, "-m", "pixiebox.cli", *args, "--config", str(config)],
                      timeout=30, check=check)  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout + result.stderr


def curl(host: netlab.Host, *args: str) -> str:
    return host.run(["curl", "-sS", "--max-time", "10", *args]).stdout


def test_discover_enroll_and_boot_without_restart(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("dhclient", "curl")  # type: ignore[operator]
    token_file = workdir / "api-token"
    agent = api_agent(
        segment,
        workdir,
        token_file,
        mode="reservation",
        subnet=SUBNET,
        machines=[("c1", C1_MAC, C1_IP)],
    )
    agent_host = agent.host
    config = agent.config
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    # A machine nobody told Pixiebox about asks to boot: it is recorded, with its firmware.
    stranger = segment.add_host("stranger", mac=STRANGER)
    netlab.pxe_discover(stranger, arch=7, uuid=UUID)
    table = pixiebox(agent_host, config, "machines")
    row = next(line for line in table.splitlines() if STRANGER in line)
    assert "(unknown)" in row and "x86_64 UEFI" in row and "discovered" in row, table
    listed = json.loads(pixiebox(agent_host, config, "machines", "--json"))
    assert next(m for m in listed if m["mac"] == STRANGER)["vendor"] == "NVIDIA"
    assert any(line.startswith("c1 ") and "enrolled" in line for line in table.splitlines())
    # Changing the lab needs the token.
    url = f"http://{AGENT_IP}:8080/api/v1/machines/{STRANGER}/enroll"
    refused = agent_host.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", url]
    )
    assert refused.stdout == "401"
    # Enroll it with the CLI: lab.toml keeps everything it had, and the running agent uses it.
    before = config.read_text()
    said = pixiebox(agent_host, config, "enroll", STRANGER.upper().replace(":", "-"),
                    "--name", "c9", "--ip", "10.82.0.39")  # fmt: skip
    assert f"enrolled {STRANGER} as c9 at 10.82.0.39" in said, said
    after = config.read_text()
    assert after.startswith(before) and 'name = "c9"' in after[len(before) :]
    lease = netlab.run_dhclient(stranger, workdir / "stranger")
    assert lease.ip == "10.82.0.39" and lease.hostname == "c9"
    # Its timeline over the API, oldest first, names it now.
    events = json.loads(curl(agent_host, "http://127.0.0.1:8080/api/v1/machines/c9/events"))
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "machine.discovered" and "dhcp.lease" in kinds, kinds
    bound = next(e for e in events if e["fields"].get("action") == "bound")
    assert bound["fields"] == {"action": "bound", "ip": "10.82.0.39", "lease_time": 3600}
    enrolled = next(e for e in events if e["kind"] == "machine.enrolled")
    assert enrolled["fields"] == {"name": "c9", "ip": "10.82.0.39"}
    assert events[-1]["name"] == "c9"
    # A bad enrollment is refused with pixiebox check's words, nothing written.
    refused_text = pixiebox(agent_host, config, "enroll", "02:00:00:00:82:98", "--name", "c9",
                            check=False)  # fmt: skip
    assert "name c9 is already used" in refused_text
    assert config.read_text() == after


def test_event_stream_delivers_a_boot_in_order(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl")  # type: ignore[operator]
    agent = api_agent(
        segment,
        workdir,
        workdir / "t",
        mode="proxy",
        subnet=SUBNET,
        machines=[("c1", C1_MAC, None)],
    )
    agent_host = agent.host
    stream_out = workdir / "sse.txt"
    follower = agent_host.popen(["curl", "-sN", "http://127.0.0.1:8080/api/v1/events"], stream_out)
    netlab.wait_until(lambda: ": connected" in stream_out.read_text(), 10, message="SSE")
    c1 = segment.add_host("c1", mac=C1_MAC, ip="10.82.0.50/24")
    netlab.pxe_discover(c1, arch=0, uuid=UUID, user_class="iPXE")
    curl(c1, f"http://{AGENT_IP}/boot/{C1_MAC}.ipxe")
    curl(c1, "-X", "POST", f"http://{AGENT_IP}/api/v1/phone-home")

    def kinds() -> list[str] | None:
        data = [json.loads(line[6:]) for line in stream_out.read_text().splitlines()
                if line.startswith("data: ")]  # fmt: skip
        found = [e["kind"] for e in data if e["mac"] == C1_MAC]
        return found if "os.up" in found else None

    assert netlab.wait_until(kinds, 10, message="events over SSE") == [
        "dhcp.offer",
        "http.script",
        "os.up",
    ]
    segment.stop(follower)
    table = pixiebox(agent_host, agent.config, "machines")
    assert any(line.startswith("c1 ") and " up " in f"{line} " for line in table.splitlines())
    document = json.loads(curl(agent_host, "http://127.0.0.1:8080/api/v1/openapi.json"))
    assert "/api/v1/machines/{mac}/enroll" in document["paths"]
    # The machine's syslog lines land in its event log.
    c1.run(["logger", "-n", AGENT_IP, "-P", "514", "-d", "--rfc3164", "-t", "osie",
            "kubelet started"])  # fmt: skip

    def syslog_event() -> dict[str, str] | None:
        events = json.loads(curl(agent_host, "http://127.0.0.1:8080/api/v1/machines/c1/events"))
        return next((e for e in events if e["kind"] == "syslog"), None)

    logged = netlab.wait_until(syslog_event, 10, message="syslog event")
    assert logged["message"].endswith("osie: kubelet started"), logged
    assert logged["fields"] == {"severity": "notice", "facility": "user", "app": "osie"}
    metrics = curl(agent_host, "http://127.0.0.1:8080/metrics")
    assert 'pixiebox_machines{state="up"} 1.0' in metrics
    assert 'pixiebox_dhcp_packets_total{outcome="answered"}' in metrics
    assert 'pixiebox_dhcp_requests_by_type_total{type="DISCOVER"} 1.0' in metrics
    assert "pixiebox_boot_duration_seconds_count 1.0" in metrics  # DHCP to phone-home, once


def test_secure_boot_as_the_os_reports_it_at_phone_home(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    """Issue 16: the OS says whether Secure Boot is on; the API, `pixiebox machines` and the
    os.up event show what its latest "up" said. A bad value is refused in words, changing
    nothing; an old OS (an empty body) still comes up, reporting nothing."""
    netlab_require("curl")  # type: ignore[operator]
    agent = api_agent(
        segment, workdir, workdir / "t", mode="proxy", subnet=SUBNET,
        machines=[("c1", C1_MAC, None)],
    )  # fmt: skip
    c1 = segment.add_host("c1", mac=C1_MAC, ip="10.82.0.50/24")
    netlab.pxe_discover(c1, arch=7, uuid=UUID)
    api = "http://127.0.0.1:8080/api/v1/machines/c1"

    def phone_home(body: str) -> tuple[str, str]:
        """(status, answer) of a phone-home from c1 itself (the proven machine)."""
        out = curl(c1, "-w", " %{http_code}", "-H", "Content-Type: application/json",
                   "--data", body, f"http://{AGENT_IP}/api/v1/phone-home?mac={C1_MAC}")  # fmt: skip
        answer, _, status = out.rpartition(" ")
        return status, answer

    def ups() -> list[dict[str, Any]]:
        events = json.loads(curl(agent.host, f"{api}/events"))
        return [e for e in events if e["kind"] == "os.up"]

    def row() -> str:
        table = pixiebox(agent.host, agent.config, "machines")
        return next(line for line in table.splitlines() if line.startswith("c1 "))

    # An old OS: an empty body still means up; nothing is reported.
    assert phone_home("") == ("200", "ok\n")
    machine = json.loads(curl(agent.host, api))
    assert machine["state"] == "up" and machine["secure_boot"] is None, machine
    assert "secure_boot" not in ups()[-1]["fields"]
    assert "Secure Boot" not in row()
    # A value that is neither "on" nor "off" is a 400 naming the key; nothing changes.
    for bad in ('"maybe"', "true", "1", '"ON"'):
        status, answer = phone_home(f'{{"state": "up", "secure_boot": {bad}}}')
        assert status == "400" and "secure_boot" in answer and '"on" or "off"' in answer, answer
    assert len(ups()) == 1
    assert json.loads(curl(agent.host, api))["secure_boot"] is None
    # On: the API, the CLI's table (and --json) and the event say so.
    assert phone_home('{"state": "up", "secure_boot": "on"}')[0] == "200"
    assert json.loads(curl(agent.host, api))["secure_boot"] == "on"
    assert ups()[-1]["fields"]["secure_boot"] == "on"
    assert "x86_64 UEFI, Secure Boot" in row()
    listed = json.loads(pixiebox(agent.host, agent.config, "machines", "--json"))
    assert next(m for m in listed if m["mac"] == C1_MAC)["secure_boot"] == "on"
    listing = json.loads(curl(agent.host, "http://127.0.0.1:8080/api/v1/machines"))
    assert next(m for m in listing if m["mac"] == C1_MAC)["secure_boot"] == "on"
    # The latest "up" counts: off, then an OS that says nothing.
    assert phone_home('{"secure_boot": "off"}')[0] == "200"
    assert json.loads(curl(agent.host, api))["secure_boot"] == "off"
    assert "Secure Boot" not in row()
    assert phone_home("")[0] == "200"
    assert json.loads(curl(agent.host, api))["secure_boot"] is None
    # A "joined" report does not touch it (only "up" reports it).
    assert phone_home('{"state": "up", "secure_boot": "on"}')[0] == "200"
    assert phone_home('{"state": "joined", "secure_boot": "off"}')[0] == "200"
    assert json.loads(curl(agent.host, api))["secure_boot"] == "on"
    # The API's document describes the field.
    document = json.loads(curl(agent.host, "http://127.0.0.1:8080/api/v1/openapi.json"))
    field = document["components"]["schemas"]["MachineView"]["properties"]["secure_boot"]
    assert {"enum": ["on", "off"], "type": "string"} in field["anyOf"], field


def test_events_carry_kind_message_and_fields_over_the_api_and_the_stream(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl")  # type: ignore[operator]
    agent = api_agent(
        segment, workdir, workdir / "t", mode="proxy", subnet=SUBNET,
        machines=[("c1", C1_MAC, None)],
    )  # fmt: skip
    stream_out = workdir / "sse.txt"
    follower = agent.host.popen(["curl", "-sN", "http://127.0.0.1:8080/api/v1/events"], stream_out)
    netlab.wait_until(lambda: ": connected" in stream_out.read_text(), 10, message="SSE")
    # A UEFI PXE ROM (arch 7) asks to boot and is offered its loader.
    c1 = segment.add_host("c1", mac=C1_MAC, ip="10.82.0.50/24")
    replies = netlab.pxe_discover(c1, arch=7, uuid=UUID)
    (offer,) = [r for r in replies if r.src_ip == AGENT_IP]
    assert offer.file == "ipxe.efi"
    events = json.loads(curl(agent.host, "http://127.0.0.1:8080/api/v1/machines/c1/events"))
    assert events, "no events"
    for event in events:
        assert isinstance(event["kind"], str) and event["message"], event
        # Only the fields the catalogue (pixiebox.events.KINDS) documents for that kind.
        assert set(event["fields"]) <= set(fields_of(Kind(event["kind"]))), event
    (offered,) = [e for e in events if e["kind"] == "dhcp.offer"]
    assert offered["fields"] == {
        "mode": "proxy",
        "port": 67,
        "firmware": "UEFI",
        "arch": "x86_64",
        "ipxe": False,
        "boot_file": "ipxe.efi",
    }
    assert "ipxe.efi" in offered["message"]  # the sentence for people says it too

    def streamed() -> list[dict[str, Any]] | None:
        data = [json.loads(line[6:]) for line in stream_out.read_text().splitlines()
                if line.startswith("data: ")]  # fmt: skip
        mine = [e for e in data if e["mac"] == C1_MAC]
        return mine if len(mine) >= len(events) else None

    seen = netlab.wait_until(streamed, 10, message="the same events over SSE")
    segment.stop(follower)
    shown = [{k: e[k] for k in ("id", "kind", "message", "fields")} for e in seen]
    assert shown == [{k: e[k] for k in ("id", "kind", "message", "fields")} for e in events]
    # The stream's `event:` line is the kind too, so a client can filter without parsing JSON.
    assert "event: dhcp.offer\n" in stream_out.read_text()


def test_unknown_enroll_adds_a_new_machine_with_the_next_free_name_and_address(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("dhclient")  # type: ignore[operator]
    agent = api_agent(
        segment,
        workdir,
        workdir / "t",
        mode="reservation",
        subnet=SUBNET,
        machines=[("c1", C1_MAC, C1_IP)],
        unknown="enroll",
    )
    stranger = segment.add_host("stranger", mac=STRANGER)
    netlab.pxe_discover(stranger, arch=0, uuid=UUID)  # unknown: recorded and enrolled

    def enrolled() -> dict[str, Any] | None:
        url = f"http://127.0.0.1:8080/api/v1/machines/{STRANGER}/events"
        events = json.loads(curl(agent.host, url))
        return next((e for e in events if e["kind"] == "machine.enrolled"), None)

    event = netlab.wait_until(enrolled, 10, message="the machine.enrolled event")
    assert event["fields"] == {"name": "node1", "ip": "10.82.0.1"}, event
    assert 'name = "node1"' in agent.config.read_text()
    # The next request is answered with the new reservation, no restart.
    lease = netlab.run_dhclient(stranger, workdir / "stranger")
    assert (lease.ip, lease.hostname) == ("10.82.0.1", "node1")


def test_lab_names_resolve_through_the_agent_and_the_rest_is_forwarded(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("dig", "dnsmasq", "dhclient")  # type: ignore[operator]
    # The home router doubles as the upstream resolver, as on most LANs.
    router = segment.add_host("router", ip="10.82.0.1/24")
    router.popen(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                  "--interface=eth0", "--bind-interfaces", "--port=53",
                  "--address=/example.test/10.9.9.9"], router.log_path("dns"))  # fmt: skip
    api_agent(
        segment,
        workdir,
        workdir / "t",
        mode="reservation",
        subnet=SUBNET,
        gateway="10.82.0.1",
        machines=[("c1", C1_MAC, C1_IP)],
        edit=lambda text: text.replace('domain = "lab.test"', 'domain = "lab.internal"'),
    )
    c1 = segment.add_host("c1", mac=C1_MAC)
    lease = netlab.run_dhclient(c1, workdir / "c1")
    assert lease.dns == (AGENT_IP,)  # DHCP points the lab at the appliance's DNS

    def dig(*args: str) -> str:
        return c1.run(["dig", "+short", "+time=3", "+tries=2", f"@{AGENT_IP}", *args]).stdout

    assert dig("c1.lab.internal").split() == [C1_IP]
    assert dig("-x", C1_IP).split() == ["c1.lab.internal."]
    assert dig("pixiebox.lab.internal").split() == [AGENT_IP]
    netlab.wait_until(lambda: dig("www.example.test").split() == ["10.9.9.9"], 10,
                      message="forwarded name")  # fmt: skip
    status = c1.run(["dig", "+time=3", f"@{AGENT_IP}", "nosuch.lab.internal"]).stdout
    assert "status: NXDOMAIN" in status


def test_sighup_reloads_lab_toml_and_an_invalid_file_keeps_the_old_settings(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("dhclient")  # type: ignore[operator]
    agent = api_agent(
        segment,
        workdir,
        workdir / "t",
        mode="reservation",
        subnet=SUBNET,
        machines=[("c1", C1_MAC, C1_IP)],
    )
    # Edited by hand: a new machine, then SIGHUP; it is served without a restart.
    with agent.config.open("a") as file:
        file.write('\n[[machines]]\nname = "c5"\nmac = "02:00:00:00:82:05"\nip = "10.82.0.35"\n')
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_log("reloaded")
    c5 = segment.add_host("c5", mac="02:00:00:00:82:05")
    assert netlab.run_dhclient(c5, workdir / "c5").ip == "10.82.0.35"
    # A broken edit is refused with pixiebox check's words; the agent keeps serving.
    agent.config.write_text(agent.config.read_text().replace('ip = "10.82.0.35"', 'ip = "nope"'))
    agent.proc.send_signal(signal.SIGHUP)
    text = agent.wait_log("keeping the previous settings")
    assert "machines[1].ip" in text and "Traceback" not in text
    c1 = segment.add_host("c1", mac=C1_MAC)
    assert netlab.run_dhclient(c1, workdir / "c1").ip == C1_IP


GROUP_MACS = ("01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00")


def test_group_and_zero_macs_are_never_enrolled_answered_or_recorded(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    # No network card has a multicast, broadcast or zero MAC: a request naming one is forged,
    # and would otherwise enroll, record or boot "every machine".
    netlab_require("curl")  # type: ignore[operator]
    token_file = workdir / "api-token"
    agent = api_agent(segment, workdir, token_file, mode="proxy", subnet=SUBNET,
                      machines=[("c1", C1_MAC, None)], unknown="enroll")  # fmt: skip
    host, config = agent.host, agent.config
    before = config.read_text()
    bearer = f"Authorization: Bearer {token_file.read_text().strip()}"
    for mac in GROUP_MACS:
        url = f"http://127.0.0.1:8080/api/v1/machines/{mac}/enroll"
        said = curl(host, "-X", "POST", "-H", bearer, "-w", "\n%{http_code}", url)
        body, _, status = said.rpartition("\n")
        assert status == "400", said
        error = json.loads(body)["error"]
        assert error.startswith(f"{mac} is ") and "no network card has it" in error, error
    refused = pixiebox(host, config, "enroll", "01-00-5E-00-00-01", "--name", "c9", check=False)
    assert "01:00:5e:00:00:01 is a multicast address (its first octet is odd)" in refused
    # DHCP from a host that forges chaddr (its frames carry its own Ethernet source: a bridge
    # drops frames from a group source) gets no answer, and no machine is recorded or enrolled.
    forger_mac, forger_ip = "02:00:00:00:82:60", "10.82.0.60"
    forger = segment.add_host("forger", mac=forger_mac, ip=f"{forger_ip}/24")
    for mac in GROUP_MACS:
        replies = netlab.pxe_request_4011(
            forger, AGENT_IP, arch=7, uuid=UUID, client_ip=forger_ip, mac=mac, timeout=1.5
        )
        assert [r for r in replies if r.src_ip == AGENT_IP] == [], mac
    metrics = curl(host, "http://127.0.0.1:8080/metrics")
    assert 'pixiebox_dhcp_packets_total{outcome="not-unicast"} 3.0' in metrics
    listed = {m["mac"] for m in json.loads(pixiebox(host, config, "machines", "--json"))}
    assert listed.isdisjoint(GROUP_MACS), listed
    assert config.read_text() == before
    # The same request with the forger's own MAC is answered, recorded and enrolled: the path
    # refused above is the one a real machine takes.
    replies = netlab.pxe_request_4011(forger, AGENT_IP, arch=7, uuid=UUID, client_ip=forger_ip)
    assert [r for r in replies if r.src_ip == AGENT_IP], replies
    netlab.wait_until(lambda: forger_mac in config.read_text(), 10, message="auto-enrollment")


def test_bad_parameters_of_a_running_agent_are_400_sentences(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    """Issue 13: `?after=abc` answered 500 with a traceback in the log; every bad parameter is
    now a 400 naming it (tests/test_api_params.py has the whole list, in-process)."""
    netlab_require("curl")  # type: ignore[operator]
    agent = api_agent(segment, workdir, workdir / "api-token", mode="proxy", subnet=SUBNET,
                      machines=[("c1", C1_MAC, None)])  # fmt: skip
    base = "http://127.0.0.1:8080/api/v1"
    cases = [
        ("after", [f"{base}/machines/c1/events?after=abc"]),
        ("after", [f"{base}/lab/events?after=-1"]),
        ("after", [f"{base}/machines/c1/events?after=1{'0' * 30}"]),
        ("after", [f"{base}/events?after=abc"]),
        ("Last-Event-ID", ["-H", "Last-Event-ID: x", f"{base}/events"]),
        ("mac", [f"{base}/events?mac=nonsense"]),
        ("boot_timeout", [f"{base}/machines/c1/doctor?boot_timeout=soon"]),
    ]
    for name, args in cases:
        said = curl(agent.host, "-w", "\n%{http_code}", *args)
        body, _, status = said.rpartition("\n")
        assert status == "400", said
        error = json.loads(body)["error"]
        assert error.startswith(name) or f"the {name} header" in error, error
    good = curl(agent.host, "-w", "\n%{http_code}", f"{base}/machines/c1/events?after=0")
    assert good.endswith("\n200"), good
    assert "Traceback" not in agent.text()
