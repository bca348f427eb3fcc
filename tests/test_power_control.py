"""Verified power actions through the real agent, its API and `pixiebox power`, with the real
drivers against real peers: smart plugs (Tasmota, Shelly Gen2, a generic HTTP one) served by
tests/powerpeers.py on the documented endpoints, whose relays power fake machines (a namespace
that gets its address and phones home to the agent when its plug switches on, and loses its
address when it switches off), and a Wake-on-LAN listener in a machine's namespace.

Nothing is mocked: "on" is verified by the machine's phone-home reaching the agent, "off" by the
plug's reading or by real silence (no ping answer)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import netlab
from agentproc import RunningAgent, lab_toml, start_agent
from pixiebox.events import Kind, fields_of

TESTS = Path(__file__).resolve().parent
SUBNET = "10.83.0.0/24"
AGENT_IP = "10.83.0.2"
API = f"http://{AGENT_IP}:8080"
TASMOTA_IP, SHELLY_IP, HTTP_PLUG_IP = "10.83.0.5", "10.83.0.6", "10.83.0.7"
MACHINES = {  # name: (MAC, reserved IP)
    "c1": ("02:00:00:00:83:01", "10.83.0.31"),
    "c2": ("02:00:00:00:83:02", "10.83.0.32"),
    "c3": ("02:00:00:00:83:03", "10.83.0.33"),
    "c4": ("02:00:00:00:83:04", "10.83.0.34"),
    "c5": ("02:00:00:00:83:05", "10.83.0.35"),
}
POWER = {
    # on: the Tasmota plug is not wired to c1 (never brings it up), the Shelly one is; off:
    # ssh first (graceful; no sshd answers), then the plugs.
    "c1": f'power = [{{ driver = "ssh" }}, {{ driver = "tasmota", host = "{TASMOTA_IP}" }}, '
    f'{{ driver = "shelly", host = "{SHELLY_IP}" }}]',
    # A generic HTTP outlet that cannot read its state: off is seen as silence.
    "c2": f'power = {{ driver = "http", on = {{ method = "POST", url = "http://{HTTP_PLUG_IP}/on" '
    f'}}, off = {{ method = "POST", url = "http://{HTTP_PLUG_IP}/off" }}, cycle_wait = 1 }}',
    "c3": 'power = { driver = "wol" }',  # its namespace answers the magic packet
    # c4: no power control at all
    "c5": 'power = { driver = "wol" }',  # nothing answers: never comes up
}


def lab(workdir: Path, token_file: Path) -> str:
    text = lab_toml(mode="proxy", subnet=SUBNET, assets=workdir / "assets",
                    state=workdir / "state",
                    machines=[(n, mac, ip) for n, (mac, ip) in MACHINES.items()])  # fmt: skip
    text = text.replace(
        "[http]",
        f'[api]\nlisten = "0.0.0.0:8080"\ntoken_file = "{token_file}"\n'
        '[power]\non_timeout = "8s"\noff_timeout = "8s"\noff_settle = "2s"\n[http]',
    )
    for name, power in POWER.items():
        text = text.replace(f'name = "{name}"\n', f'name = "{name}"\n{power}\n')
    return text


def machine_on(host: netlab.Host, ip: str) -> str:
    """What the fake machine does when its power comes: address up, OS boots, phones home."""
    return (f"ip -n {host.name} addr add {ip}/24 dev eth0 && ip netns exec {host.name} "
            f"curl -sS --max-time 10 -X POST http://{AGENT_IP}/api/v1/phone-home")  # fmt: skip


def machine_off(host: netlab.Host) -> str:
    return f"ip -n {host.name} addr flush dev eth0"


def pixiebox(host: netlab.Host, config: Path, *args: str, timeout: float = 120) -> tuple[int, str]:
    result = host.run([sys.executable, "-m", "pixiebox.cli", *args, "--config", str(config)],
                      timeout=timeout, check=False)  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout + result.stderr


def post(host: netlab.Host, path: str, body: str, token: str) -> tuple[int, Any]:
    out = host.run(["curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}", "-X", "POST",
                    "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/json",
                    "-d", body, API + path]).stdout  # fmt: skip
    text, _, status = out.rpartition("\n")
    return int(status), json.loads(text) if text.strip() else None


def get(host: netlab.Host, path: str) -> Any:
    return json.loads(host.run(["curl", "-sS", "--max-time", "10", API + path]).stdout)


#: The events a power action writes into a machine's log.
POWER_KINDS = (Kind.POWER_ON, Kind.POWER_OFF, Kind.POWER_CYCLE, Kind.MACHINE_OFF)


def steps(host: netlab.Host, name: str) -> list[dict[str, Any]]:
    """The power events of `name`, oldest first, each {"kind", "message", "fields"}: the test
    reads kinds and fields; messages are for people."""
    return [e for e in get(host, f"/api/v1/machines/{name}/events") if e["kind"] in POWER_KINDS]


def step(event: dict[str, Any]) -> tuple[str, str | None, str | None, str | None]:
    """(kind, driver, outcome, reason) of a power event."""
    fields = event["fields"]
    return event["kind"], fields.get("driver"), fields.get("outcome"), fields.get("reason")


def start_lab(
    segment: netlab.Segment, workdir: Path
) -> tuple[RunningAgent, dict[str, netlab.Host], Path]:
    token_file = workdir / "api-token"
    machines = {name: segment.add_host(name, mac=mac) for name, (mac, _) in MACHINES.items()}
    plugs = segment.add_host("plugs", ip=f"{TASMOTA_IP}/24")
    for ip in (SHELLY_IP, HTTP_PLUG_IP):
        plugs.add_address(f"{ip}/24")
    plug_log = workdir / "plug-calls.jsonl"
    wires = []
    for ip, name in ((SHELLY_IP, "c1"), (HTTP_PLUG_IP, "c2")):
        wires += ["--wire", ip, machine_on(machines[name], MACHINES[name][1]),
                  machine_off(machines[name])]  # fmt: skip
    plugs_proc = plugs.popen([sys.executable, str(TESTS / "powerpeers.py"), "plugs",
                              "--log", str(plug_log), *wires], plugs.log_path("plugs"))  # fmt: skip
    wol_log = machines["c3"].log_path("wol")
    machines["c3"].popen([sys.executable, str(TESTS / "powerpeers.py"), "wol", MACHINES["c3"][0],
                          machine_on(machines["c3"], MACHINES["c3"][1])], wol_log)  # fmt: skip
    for proc, log, word in ((plugs_proc, segment.log_of(plugs_proc), "plugs listening"),
                            (None, wol_log, "wol listening")):  # fmt: skip
        netlab.wait_until(lambda log=log, word=word: word in log.read_text(), 10, 0.1,
                          f"{word}: {log}")  # fmt: skip
        assert proc is None or proc.poll() is None
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    agent = start_agent(agent_host, lab(workdir, token_file), workdir)
    return agent, machines, token_file


def test_power_actions_are_verified_and_fall_back_along_the_chain(
    netlab_require: Callable[..., None], segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl")
    agent, _, token_file = start_lab(segment, workdir)
    host, config = agent.host, agent.config
    token = token_file.read_text().strip()

    # c1 on: the Tasmota plug clicks but c1 is not plugged into it; after on_timeout the
    # Shelly plug is tried, c1 phones home, and only that counts.
    code, out = pixiebox(host, config, "power", "c1", "on")
    assert code == 0, out
    assert f"power on by tasmota at {TASMOTA_IP} sent; waiting up to 8s for it to phone home" \
        in out, out  # fmt: skip
    assert f"not up after 8s; trying shelly at {SHELLY_IP}" in out, out
    assert f"after power on by shelly at {SHELLY_IP}" in out.splitlines()[-1], out
    c1 = get(host, "/api/v1/machines/c1")
    assert (c1["state"], c1["power"]) == ("up", "on")
    assert c1["power_control"] == ["ssh", "tasmota", "shelly"]
    code, table = pixiebox(host, config, "machines")
    row = next(line for line in table.splitlines() if line.startswith("c1 "))
    assert " up " in row and "on (ssh+tasmota+shelly)" in row, table

    # c1 off: graceful first (ssh, which nothing answers), then the hard cut, seen as the
    # plug reading off.
    code, out = pixiebox(host, config, "power", "c1", "off")
    assert code == 0, out
    assert out.splitlines()[-1].startswith(
        f"c1: powered off by tasmota at {TASMOTA_IP} (it reads off, 0.0 W)"), out  # fmt: skip
    said = [step(e) for e in steps(host, "c1")]
    ssh_failed = next(i for i, s in enumerate(said) if s[:3] == ("power.off", "ssh", "failed"))
    assert said[ssh_failed + 1] == ("power.off", "tasmota", "sent", None), said
    assert said[-2:] == [("power.off", "tasmota", "done", None),
                         ("machine.off", None, None, None)], said  # fmt: skip
    assert steps(host, "c1")[-1]["fields"] == {"cause": "power", "was": "up"}
    c1 = get(host, "/api/v1/machines/c1")
    assert (c1["state"], c1["power"]) == ("off", "off")
    calls = [json.loads(line) for line in (workdir / "plug-calls.jsonl").read_text().splitlines()]
    assert {"plug": TASMOTA_IP, "method": "GET", "path": "/cm?cmnd=Power%20Off"} in calls, calls
    assert any(c["plug"] == SHELLY_IP and c["path"] == "/rpc/Switch.Set?id=0&on=true"
               for c in calls), calls  # fmt: skip
    code, out = pixiebox(host, config, "power", "c1", "status")
    assert code == 0 and f"c1: off (tasmota at {TASMOTA_IP} reads off)" in out, out

    # c2: an outlet that cannot read its state; off is seen as silence (no ping answer).
    code, out = pixiebox(host, config, "power", "c2", "on")
    assert code == 0 and f"after power on by http at {HTTP_PLUG_IP}" in out, out
    code, out = pixiebox(host, config, "power", "c2", "off")
    assert code == 0, out
    assert f"c2: powered off by http at {HTTP_PLUG_IP} (silent for 2s and no ping answer at " \
        f"{MACHINES['c2'][1]})" in out, out  # fmt: skip
    # ... and a cycle (off, on) is seen done when it phones home again.
    code, out = pixiebox(host, config, "power", "c2", "cycle")
    assert code == 0 and f"after power cycle by http at {HTTP_PLUG_IP}" in out, out
    assert get(host, "/api/v1/machines/c2")["state"] == "up"

    # c3: Wake-on-LAN, answered by the listener in its namespace.
    code, out = pixiebox(host, config, "power", "c3", "on")
    assert code == 0 and "after power on by wol" in out, out
    code, out = pixiebox(host, config, "power", "c3", "on")  # already up: nothing to do
    assert code == 0 and "already on: it answers ping at 10.83.0.33" in out, out
    code, out = pixiebox(host, config, "power", "c3", "off")
    assert code == 2 and "no driver of c3's power chain (wol) can off it" in out, out

    # c5: the magic packet goes unanswered; while the agent waits, a second action on c5 is
    # refused, and the first one ends in failure (exit status 2).
    waiting = host.popen([sys.executable, "-m", "pixiebox.cli", "power", "c5", "on",
                          "--config", str(config)], workdir / "c5-on.log")  # fmt: skip
    netlab.wait_until(lambda: ("power.on", "wol", "sent", None) in map(step, steps(host, "c5")),
                      20, 0.2, "c5's power on to start")  # fmt: skip
    status, body = post(host, "/api/v1/machines/c5/power", '{"action": "status"}', token)
    assert status == 409 and body["error"].startswith("c5 is busy: power on started"), body
    assert waiting.wait(60) == 2
    out = (workdir / "c5-on.log").read_text()
    assert "not up after 8s; no other driver to try" in out, out
    assert "c5: power on failed: not up after trying wol" in out, out
    c5_steps = [step(e) for e in steps(host, "c5")]
    assert c5_steps[-3:] == [("power.on", "wol", "sent", None),
                             ("power.on", "wol", "timeout", "not-up"),
                             ("power.on", None, "failed", "not-up")], c5_steps  # fmt: skip

    # Refusals, each a sentence and exit status 1.
    code, out = pixiebox(host, config, "power", "c4", "on")
    assert code == 1 and 'c4 has no power control: add power = { driver = "wol" }' in out, out
    code, out = pixiebox(host, config, "power", "nosuch", "on")
    assert code == 1 and "no machine named or with MAC 'nosuch'" in out, out
    status, body = post(host, "/api/v1/machines/c1/power", '{"action": "on"}', "wrong")
    assert status == 401 and "Bearer" in body["error"], body
    status, body = post(host, "/api/v1/machines/c1/power", '{"action": "dance"}', token)
    assert status == 400 and "on, off, cycle or status" in body["error"], body
    wrong = workdir / "wrong-token"
    wrong.write_text("not-the-token\n")
    other = workdir / "other.toml"
    other.write_text(config.read_text().replace(str(token_file), str(wrong)))
    code, out = pixiebox(host, other, "power", "c1", "status")
    assert code == 1 and f"the token sent was read from {wrong}" in out, out

    # The whole lab. c1's Shelly relay is still on from before although c1 was switched off
    # by the other plug: `on` would change nothing, so the Shelly plug cycles it. c2 and c3 are
    # up already, c4 has no power control, c5 never comes up: a straggler, with the doctor's
    # verdict.
    code, out = pixiebox(host, config, "lab", "up", "--stagger", "0")
    assert code == 2, out
    assert "lab up: 3 of 4 machine(s) with power control up after" in out, out
    assert re.search(r"^c1\s+up\s+[\d.]+ s\s+-\s+tasmota at 10.83.0.5, shelly at", out, re.M), out
    c1_steps = [step(e) for e in steps(host, "c1")]
    assert ("power.on", "shelly", "sent", "relay-on") in c1_steps, c1_steps
    for name in ("c2", "c3"):
        assert re.search(rf"^{name}\s+already up\s+-\s", out, re.M), out
    assert re.search(r"^c4\s+skipped\s", out, re.M), out
    assert "no power control: skipped: c4" in out, out
    stragglers = out.split("stragglers:", 1)[1]
    assert "c5: power on failed: not up after trying wol" in stragglers, out
    assert "doctor: " in stragglers, out
    code, out = pixiebox(host, config, "lab", "down")
    assert code == 2, out
    assert "lab down: 2 of 4 machine(s) with power control off after" in out, out
    for name in ("c1", "c2"):
        assert re.search(rf"^{name}\s+off\s+[\d.]+ s\s", out, re.M), out
    not_off = out.split("not off:", 1)[1]
    assert "c3: no driver of c3's power chain (wol) can off it" in not_off, out

    # Every power event carries only the fields the catalogue documents for its kind.
    for name in MACHINES:
        for event in steps(host, name):
            assert set(event["fields"]) <= set(fields_of(Kind(event["kind"]))), event

    openapi = get(host, "/api/v1/openapi.json")
    assert "post" in openapi["paths"]["/api/v1/machines/{key}/power"]
    assert "PowerOutcome" in openapi["components"]["schemas"]


def test_power_without_a_running_agent_says_so(tmp_path: Path) -> None:
    config = tmp_path / "lab.toml"
    config.write_text('[network]\n[api]\nlisten = "127.0.0.1:9"\n'
                      f'token_file = "{tmp_path / "token"}"\n')  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "pixiebox.cli", "power", "c1", "on",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert "no Pixiebox agent answers at http://127.0.0.1:9" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_check_names_a_driver_key_that_is_missing(tmp_path: Path) -> None:
    config = tmp_path / "lab.toml"
    config.write_text('[network]\n[[machines]]\nname = "c1"\nmac = "02:00:00:00:83:01"\n'
                      'power = [{ driver = "wol" }, { driver = "tasmota" }]\n')  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "pixiebox.cli", "check", "--config",
                             str(config)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "machines[0].power[1].host" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
