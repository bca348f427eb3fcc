"""Power drivers against real peers: a magic-packet listener in another namespace, a real sshd,
sushy-tools' Redfish emulator, OpenIPMI's ipmi_sim, HTTP servers that implement exactly the
documented Tasmota and Shelly (Gen1, Gen2) endpoints, real QEMU through QMP, and the virtual
lab's Wake-on-LAN responder. Plus `pixiebox check` naming a driver's bad keys with their line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import netlab
import pytest
import vmlab
from pixiebox.config import PowerSection
from pixiebox.power import PowerError, PowerState, PowerTarget, make_driver, spec_problems
from pixiebox.power.qemu import QemuDriver
from pixiebox.power.ssh import power_key_path, power_public_key
from pixiebox.power.wol import magic_packet
from pixiebox.virtlab import wake

TESTS = Path(__file__).resolve().parent
POWER_RUN = TESTS / "power_run.py"
MAC = "52:54:00:6c:01:0a"


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_tool(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None and not Path(name).exists():
            message = f"{name} is not installed (build.sh installs it)"
            if _on_ci():
                pytest.fail(f"CI=true but {message}", pytrace=False)
            pytest.skip(message)


def target(tmp_path: Path, **changes: Any) -> PowerTarget:
    fields: dict[str, Any] = {
        "name": "c1",
        "mac": MAC,
        "ip": None,
        "interface": "lo",
        "broadcast": None,
        "state_dir": tmp_path / "state",
        "ssh_host_public": None,
    }
    fields.update(changes)
    return PowerTarget(**fields)


def driver(spec: dict[str, Any], tgt: PowerTarget) -> Any:
    return make_driver(PowerSection.model_validate(spec), tgt)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- pixiebox check names each driver's bad keys ---------------------------------------------

CHECK_TOML = """\
[network]
interface = "lo"
subnet = "192.168.1.0/24"

[[machines]]
name = "c1"
mac = "f4:4d:30:64:7a:01"
power = { driver = "tasmota" }

[[machines]]
name = "c2"
mac = "f4:4d:30:64:7a:02"
power = [{ driver = "wol" }, { driver = "ssh", usr = "root" }]

[[machines]]
name = "c3"
mac = "f4:4d:30:64:7a:03"
power = { driver = "redfish", url = "ftp://bmc", username = "admin", password = "x" }

[[machines]]
name = "c4"
mac = "f4:4d:30:64:7a:04"
power = { driver = "shelly", host = "http://plug/relay" }
"""


def test_pixiebox_check_names_the_power_key_and_line(tmp_path: Path) -> None:
    config = tmp_path / "lab.toml"
    config.write_text(CHECK_TOML)
    script = Path(sys.executable).with_name("pixiebox")
    done = subprocess.run(
        [str(script), "check", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("PIXIEBOX_")},
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "Traceback" not in out
    lines = {
        "machines[0].power.host": (8, "the tasmota driver needs 'host'"),
        "machines[1].power[1].usr": (13, "did you mean 'user'?"),
        "machines[2].power.url": (18, "'ftp://bmc' is not a URL"),
        "machines[3].power.host": (23, "is not a host"),
    }
    for key, (line, words) in lines.items():
        found = [text for text in out.splitlines() if f":{line}: error: {key}:" in text]
        assert found, f"{key} at line {line} not reported:\n{out}"
        block = out[out.index(found[0]) :].split("\n", 2)
        assert words in "\n".join(block[:2]), out


def test_spec_problems_are_empty_for_good_entries() -> None:
    good = [
        {"driver": "wol", "password": "aa-bb-cc-dd-ee-ff", "port": 7},
        {"driver": "ssh"},
        {"driver": "tasmota", "host": "plug-c1.lan", "relay": 2, "password_file": "/etc/p"},
        {"driver": "shelly", "host": "10.0.0.5:8080", "generation": 1},
        {"driver": "qemu", "qmp": "/run/c1.qmp"},
        {"driver": "ipmi", "host": "10.0.0.21", "user": "ADMIN", "password": "x"},
        {"driver": "http", "on": {"url": "http://pdu/o/3", "method": "POST", "body": "1"},
         "status": {"url": "http://pdu/o/3", "pointer": "/state", "on_value": 1}},
    ]  # fmt: skip
    for spec in good:
        assert spec_problems(PowerSection.model_validate(spec)) == [], spec


def test_make_driver_refuses_a_bad_entry_naming_the_machine(tmp_path: Path) -> None:
    with pytest.raises(PowerError, match=r"ipmi power of c1 .*needs 'host'.*pixiebox check"):
        driver({"driver": "ipmi", "user": "a", "password": "b"}, target(tmp_path))


# --- wol: the magic packet, received byte for byte in another namespace ----------------------

LISTENER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
sock.settimeout(60)
with open(sys.argv[2], "a") as out:
    while True:
        data, peer = sock.recvfrom(2048)
        out.write(peer[0] + " " + data.hex() + "\\n")
        out.flush()
"""


def run_in(host: netlab.Host, action: str, spec: dict[str, Any], tgt: dict[str, Any]) -> Any:
    done = host.run(
        [sys.executable, str(POWER_RUN), action, json.dumps(spec), json.dumps(tgt)], timeout=90
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def expected_magic(mac: str, password: str = "") -> bytes:
    """Built independently of the driver: the sync stream, then the MAC 16 times."""
    return (
        bytes([0xFF] * 6)
        + bytes(int(x, 16) for x in mac.split(":")) * 16
        + bytes(int(x, 16) for x in password.split(":") if password)
    )


@pytest.mark.parametrize(
    ("options", "port", "password"),
    [
        ({}, 9, ""),
        ({"password": "01:02:03:0a:0b:0c"}, 9, "01:02:03:0a:0b:0c"),
        ({"port": 7, "address": "10.61.0.20"}, 7, ""),  # directed to the node's address
    ],
)
def test_magic_packet_arrives_byte_for_byte(
    segment: netlab.Segment, tmp_path: Path, options: dict[str, Any], port: int, password: str
) -> None:
    appliance = segment.add_host("appl", ip="10.61.0.2/24")
    node = segment.add_host("node", ip="10.61.0.20/24")
    received = tmp_path / "received.txt"
    log = node.log_path("listener")
    proc = node.popen([sys.executable, "-c", LISTENER, str(port), str(received)], log)
    netlab.wait_until(lambda: "listening" in log.read_text() or proc.poll() is not None, 15)
    result = run_in(
        appliance, "on", {"driver": "wol", **options},
        {"name": "c1", "mac": MAC, "interface": "eth0", "broadcast": "10.61.0.255",
         "state_dir": str(tmp_path)},
    )  # fmt: skip
    assert result == {"ok": True, "state": None}
    lines = netlab.wait_until(
        lambda: received.exists() and received.read_text().splitlines(), 15, 0.1, "the packet"
    )
    source, payload = lines[0].split()
    assert source == "10.61.0.2"
    assert bytes.fromhex(payload) == expected_magic(MAC, password)
    assert magic_packet(MAC, password or None) == expected_magic(MAC, password)
    assert len(bytes.fromhex(payload)) == (108 if password else 102)


def test_wol_on_a_missing_interface_names_it(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("SO_BINDTODEVICE needs root")
    wol = driver({"driver": "wol"}, target(tmp_path, interface="nosuch0"))
    with pytest.raises(PowerError, match="no network interface 'nosuch0'"):
        run(wol.on())
    assert wol.actions == frozenset({"on"})
    with pytest.raises(PowerError, match="cannot off"):
        run(wol.off())


# --- Tasmota and Shelly: servers implementing exactly their documented endpoints ------------


@dataclass
class Plug:
    """One relay plug's state and every request it was sent (path + query, as received)."""

    kind: str  # tasmota | shelly1 | shelly2
    on: bool = False
    watts: float = 7.5
    calls: list[str] = field(default_factory=list)
    basic_auth: tuple[str, str] | None = None
    tasmota_password: str | None = None


def _plug_handler(plug: Plug) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def answer(self, status: int, document: Any) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            plug.calls.append(self.path)
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if plug.kind == "tasmota":
                self.tasmota(url.path, query)
            elif plug.kind == "shelly1":
                self.shelly1(url.path, query)
            else:
                self.shelly2(url.path, query)

        def tasmota(self, path: str, query: dict[str, str]) -> None:
            if path != "/cm" or "cmnd" not in query:
                return self.answer(404, {})
            if plug.tasmota_password is not None and (
                query.get("user") != "admin" or query.get("password") != plug.tasmota_password
            ):
                return self.answer(401, {"WARNING": "Need user=<username>&password=<password>"})
            command = query["cmnd"].split()
            if command[0].lower() == "power":
                if len(command) > 1:
                    word = command[1].lower()
                    plug.on = (not plug.on) if word == "toggle" else word in ("on", "1")
                return self.answer(200, {"POWER": "ON" if plug.on else "OFF"})
            if command == ["Status", "8"]:
                return self.answer(
                    200, {"StatusSNS": {"ENERGY": {"Power": plug.watts if plug.on else 0}}}
                )
            return self.answer(200, {"Command": "Unknown"})

        def shelly1(self, path: str, query: dict[str, str]) -> None:
            if plug.basic_auth is not None:
                expected = "Basic " + base64.b64encode(":".join(plug.basic_auth).encode()).decode()
                if self.headers.get("Authorization") != expected:
                    return self.answer(401, {})
            if path == "/relay/0":
                if "turn" in query:
                    plug.on = query["turn"] == "on"
                return self.answer(200, {"ison": plug.on, "has_timer": False, "source": "http"})
            if path == "/meter/0":
                return self.answer(200, {"power": plug.watts if plug.on else 0.0, "is_valid": True})
            return self.answer(404, {})

        def shelly2(self, path: str, query: dict[str, str]) -> None:
            if path == "/rpc/Switch.Set" and query.get("id") == "0" and "on" in query:
                was = plug.on
                plug.on = query["on"] == "true"
                return self.answer(200, {"was_on": was})
            if path == "/rpc/Switch.GetStatus" and query.get("id") == "0":
                return self.answer(200, {"id": 0, "source": "http", "output": plug.on,
                                         "apower": plug.watts if plug.on else 0.0,
                                         "voltage": 230.1})  # fmt: skip
            return self.answer(404, {"code": 404, "message": "No handler"})

    return Handler


@pytest.fixture
def plug_server() -> Iterator[Callable[[Plug], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(plug: Plug) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _plug_handler(plug))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_tasmota_on_off_cycle_status_and_power(
    plug_server: Callable[[Plug], str], tmp_path: Path
) -> None:
    plug = Plug("tasmota", tasmota_password="s3cret&x")
    host = plug_server(plug)
    tasmota = driver(
        {"driver": "tasmota", "host": host, "password": "s3cret&x", "cycle_wait": 0},
        target(tmp_path),
    )
    auth = "user=admin&password=s3cret%26x&"
    assert run(tasmota.status()) == PowerState.OFF
    run(tasmota.on())
    assert plug.on
    assert run(tasmota.status()) == PowerState.ON
    assert run(tasmota.power_watts()) == 7.5
    run(tasmota.cycle())
    assert plug.on
    run(tasmota.off())
    assert not plug.on
    assert plug.calls == [
        f"/cm?{auth}cmnd=Power",
        f"/cm?{auth}cmnd=Power%20On",
        f"/cm?{auth}cmnd=Power",
        f"/cm?{auth}cmnd=Status%208",
        f"/cm?{auth}cmnd=Power%20Off",
        f"/cm?{auth}cmnd=Power%20On",
        f"/cm?{auth}cmnd=Power%20Off",
    ]
    wrong = driver({"driver": "tasmota", "host": host, "password": "nope"}, target(tmp_path))
    with pytest.raises(PowerError, match="refused the credentials"):
        run(wrong.on())
    assert not plug.on


def test_shelly_gen1_relay_and_meter(plug_server: Callable[[Plug], str], tmp_path: Path) -> None:
    plug = Plug("shelly1", basic_auth=("admin", "pw"))
    host = plug_server(plug)
    shelly = driver(
        {"driver": "shelly", "host": host, "generation": 1, "password": "pw", "cycle_wait": 0},
        target(tmp_path),
    )
    run(shelly.on())
    assert run(shelly.status()) == PowerState.ON
    assert run(shelly.power_watts()) == 7.5
    run(shelly.cycle())
    run(shelly.off())
    assert run(shelly.status()) == PowerState.OFF
    assert plug.calls == [
        "/relay/0?turn=on", "/relay/0", "/meter/0",
        "/relay/0?turn=off", "/relay/0?turn=on", "/relay/0?turn=off", "/relay/0",
    ]  # fmt: skip


def test_shelly_gen2_rpc(plug_server: Callable[[Plug], str], tmp_path: Path) -> None:
    plug = Plug("shelly2")
    host = plug_server(plug)
    shelly = driver({"driver": "shelly", "host": host, "cycle_wait": 0}, target(tmp_path))
    assert run(shelly.status()) == PowerState.OFF
    run(shelly.on())
    assert plug.on
    assert run(shelly.power_watts()) == 7.5
    run(shelly.cycle())
    run(shelly.off())
    assert not plug.on
    assert run(shelly.power_watts()) == 0.0
    assert plug.calls == [
        "/rpc/Switch.GetStatus?id=0", "/rpc/Switch.Set?id=0&on=true",
        "/rpc/Switch.GetStatus?id=0", "/rpc/Switch.Set?id=0&on=false",
        "/rpc/Switch.Set?id=0&on=true", "/rpc/Switch.Set?id=0&on=false",
        "/rpc/Switch.GetStatus?id=0",
    ]  # fmt: skip


def test_generic_http_driver(plug_server: Callable[[Plug], str], tmp_path: Path) -> None:
    plug = Plug("tasmota")
    host = plug_server(plug)
    spec = {
        "driver": "http",
        "on": {"url": f"http://{host}/cm?cmnd=Power%20On"},
        "off": {"url": f"http://{host}/cm?cmnd=Power%20Off"},
        "status": {"url": f"http://{host}/cm?cmnd=Power", "pointer": "/POWER", "on_value": "ON"},
        "cycle_wait": 0,
    }
    http = driver(spec, target(tmp_path))
    assert run(http.status()) == PowerState.OFF
    run(http.on())
    assert run(http.status()) == PowerState.ON
    run(http.cycle())
    assert plug.on
    by_regex = driver(
        {"driver": "http", "status": {"url": f"http://{host}/cm?cmnd=Power", "regex": '"ON"'}},
        target(tmp_path),
    )
    assert run(by_regex.status()) == PowerState.ON
    assert by_regex.actions == frozenset({"status"})
    with pytest.raises(PowerError, match="cannot on"):
        run(by_regex.on())


def test_an_unreachable_plug_is_named(tmp_path: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    tasmota = driver({"driver": "tasmota", "host": closed}, target(tmp_path))
    with pytest.raises(PowerError, match=f"unreachable Tasmota plug at {closed}: .*refused"):
        run(tasmota.on())
    # A plug that accepts the connection and never answers: the bounded timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        shelly = driver({"driver": "shelly", "host": host, "timeout": 1}, target(tmp_path))
        with pytest.raises(PowerError, match=f"unreachable Shelly Gen2 plug at {host}: no answer"):
            run(shelly.status())


# --- qemu: a real QEMU through its QMP socket ------------------------------------------------


def start_bare_qemu(workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A QEMU with nothing to boot, started off (-S), with its QMP socket."""
    qmp = workdir / "vm.qmp"
    proc = subprocess.Popen(
        [shutil.which(vmlab.QEMU) or vmlab.QEMU, "-machine", "q35", "-accel", vmlab._accel(),
         "-m", "64", "-nodefaults", "-display", "none", "-no-shutdown", "-S",
         "-qmp", f"unix:{qmp},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    netlab.wait_until(lambda: qmp.exists() or proc.poll() is not None, 30, 0.1, "QMP socket")
    return proc, qmp


async def run_state(qemu: QemuDriver) -> str:
    async with qemu.session() as client:
        return await qemu.run_state(client)


def test_qemu_driver_through_qmp(tmp_path: Path) -> None:
    require_tool(vmlab.QEMU)
    proc, qmp = start_bare_qemu(tmp_path)
    try:
        qemu = driver({"driver": "qemu", "qmp": str(qmp)}, target(tmp_path))
        assert run(run_state(qemu)) == "prelaunch"
        assert run(qemu.status()) == PowerState.OFF
        run(qemu.on())
        assert run(run_state(qemu)) == "running"
        assert run(qemu.status()) == PowerState.ON
        run(qemu.off())
        assert run(run_state(qemu)) == "paused"
        assert run(qemu.status()) == PowerState.OFF
        run(qemu.on())  # from paused: reset, then run
        assert run(run_state(qemu)) == "running"
        run(qemu.cycle())
        assert run(run_state(qemu)) == "running"
        run(qemu.off())
        run(qemu.cycle())  # cycling a machine that is off turns it on
        assert run(qemu.status()) == PowerState.ON
    finally:
        netlab.kill_process_group(proc)
    gone = driver({"driver": "qemu", "qmp": str(qmp)}, target(tmp_path))
    with pytest.raises(PowerError, match="cannot reach the VM's QMP socket"):
        run(gone.status())


# --- the virtual lab's Wake-on-LAN responder -------------------------------------------------


def test_wake_responder_matches_frames() -> None:
    frame = b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x09" + b"\x08\x00" + b"\x00" * 28
    assert wake.magic_macs(frame + expected_magic(MAC)) == {MAC}
    assert wake.magic_macs(frame + expected_magic(MAC, "01:02:03:04:05:06")) == {MAC}
    assert wake.magic_macs(frame + expected_magic(MAC)[:-1]) == set()
    assert wake.magic_macs(b"\xff" * 200) == set()


def test_a_magic_packet_powers_on_a_vm(segment: netlab.Segment, tmp_path: Path) -> None:
    problem = vmlab.prerequisite_problem("bios")
    if problem:
        require_tool(problem)  # skips locally, fails on CI, naming what is missing
    vm = vmlab.start_vm(
        segment, "c1", MAC, firmware="bios", workdir=tmp_path / "vm", powered_on=False
    )
    assert vm.qmp is not None
    netlab.wait_until(lambda: vm.qmp is not None and vm.qmp.exists(), 30, 0.1, "QMP socket")
    qemu = driver({"driver": "qemu", "qmp": str(vm.qmp)}, target(tmp_path))
    assert run(qemu.status()) == PowerState.OFF
    log = segment.switch.log_path("wake")
    responder = segment.switch.popen(
        [sys.executable, "-m", "pixiebox.virtlab.wake", "--interface", netlab.BRIDGE,
         "--vm", f"{MAC}={vm.qmp}"],
        log,
    )  # fmt: skip
    netlab.wait_until(
        lambda: wake.READY in log.read_text() or responder.poll() is not None, 30, 0.1, "wake"
    )
    assert responder.poll() is None, log.read_text()
    appliance = segment.add_host("appl", ip="10.62.0.2/24")
    wol_target = {"name": "c1", "mac": MAC, "interface": "eth0", "broadcast": "10.62.0.255",
                  "state_dir": str(tmp_path)}  # fmt: skip
    for _ in range(2):  # on from prelaunch (never started), then from a hard off
        assert run_in(appliance, "on", {"driver": "wol"}, wol_target)["ok"]
        netlab.wait_until(
            lambda: run(qemu.status()) == PowerState.ON, 30, 0.5, f"VM on\n{log.read_text()}"
        )
        run(qemu.off())
        assert run(qemu.status()) == PowerState.OFF
    assert log.read_text().count(f"magic packet for {MAC}: powered the VM on") == 2
    vm.stop()


# --- ssh: a real sshd in a namespace ---------------------------------------------------------

RECORDER = """#!/bin/sh
# ForceCommand: record what the appliance asked for; a "poweroff" drops the connection the way
# a node going down does (its sshd dies before the exit status is sent).
echo "$(id -un) $SSH_ORIGINAL_COMMAND" >> {record}
case "$SSH_ORIGINAL_COMMAND" in
  poweroff) kill -KILL $PPID ;;
  reboot) exit 0 ;;
  *) echo "unexpected command" >&2; exit 3 ;;
esac
"""


@dataclass
class Sshd:
    host: netlab.Host
    address: str
    host_public: str
    record: Path


def keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)],
        check=True, timeout=30,
    )  # fmt: skip
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture
def sshd(segment: netlab.Segment, tmp_path: Path) -> Sshd:
    require_tool("/usr/sbin/sshd", "ssh-keygen")
    work = tmp_path / "sshd"
    work.mkdir(mode=0o755)
    host_public = keygen(work / "host_key")
    record = work / "commands.txt"
    recorder = work / "recorder.sh"
    recorder.write_text(RECORDER.format(record=record))
    recorder.chmod(0o755)
    authorized = work / "authorized_keys"
    authorized.write_text(power_public_key(tmp_path / "state") + "\n")
    config = work / "sshd_config"
    config.write_text(
        f"ListenAddress 10.63.0.20\nPort 22\nHostKey {work / 'host_key'}\n"
        f"PidFile {work / 'sshd.pid'}\nAuthorizedKeysFile {authorized}\nStrictModes no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"PermitRootLogin prohibit-password\nForceCommand {recorder}\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    node = segment.add_host("node", ip="10.63.0.20/24")
    log = node.log_path("sshd")
    proc = node.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], log)

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited: {log.read_text()}")
        return ":22 " in node.run(["ss", "-H", "-tln"], timeout=5).stdout

    netlab.wait_until(listening, 15, 0.1, "sshd listening")
    return Sshd(node, "10.63.0.20", host_public, record)


def test_ssh_poweroff_and_reboot_on_a_real_sshd(
    segment: netlab.Segment, sshd: Sshd, tmp_path: Path
) -> None:
    appliance = segment.add_host("appl", ip="10.63.0.2/24")
    node = {"name": "c1", "mac": MAC, "ip": sshd.address, "state_dir": str(tmp_path / "state"),
            "ssh_host_public": sshd.host_public}  # fmt: skip
    key = power_key_path(tmp_path / "state")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert oct(key.parent.stat().st_mode & 0o777) == "0o700"
    # poweroff: the connection drops before an exit status; that is success.
    assert run_in(appliance, "off", {"driver": "ssh"}, node) == {"ok": True, "state": None}
    assert run_in(appliance, "cycle", {"driver": "ssh"}, node) == {"ok": True, "state": None}
    assert sshd.record.read_text().splitlines() == ["root poweroff", "root reboot"]
    failing = run_in(appliance, "off", {"driver": "ssh", "off_command": "halt -p"}, node)
    assert not failing["ok"] and "'halt -p' on 10.63.0.20 failed (exit 3)" in failing["error"]


def test_ssh_refuses_a_host_with_the_wrong_host_key(
    segment: netlab.Segment, sshd: Sshd, tmp_path: Path
) -> None:
    appliance = segment.add_host("appl", ip="10.63.0.2/24")
    impostor = keygen(tmp_path / "other_key")
    node = {"name": "c1", "mac": MAC, "ip": sshd.address, "state_dir": str(tmp_path / "state"),
            "ssh_host_public": impostor}  # fmt: skip
    result = run_in(appliance, "off", {"driver": "ssh"}, node)
    assert not result["ok"]
    assert "ssh power of c1" in result["error"]
    assert "the SSH host key at 10.63.0.20 is not c1's" in result["error"]
    assert not sshd.record.exists()  # nothing ran
    # And a machine whose host key the appliance does not know yet is not logged in to either.
    unknown = run_in(appliance, "off", {"driver": "ssh"}, {**node, "ssh_host_public": None})
    assert "no known SSH host key" in unknown["error"]


# --- redfish: sushy-tools' emulator with its fake driver -------------------------------------


@pytest.fixture
def redfish_emulator(tmp_path: Path) -> Iterator[str]:
    emulator = Path(sys.executable).with_name("sushy-emulator")
    require_tool(str(emulator))
    port = free_port()
    config = tmp_path / "emulator.conf"
    config.write_text(
        "SUSHY_EMULATOR_FAKE_DRIVER = True\n"
        'SUSHY_EMULATOR_LISTEN_IP = "127.0.0.1"\n'
        f"SUSHY_EMULATOR_LISTEN_PORT = {port}\n"
        f'SUSHY_EMULATOR_STATE_DIR = "{tmp_path / "emulator-state"}"\n'
        'SUSHY_EMULATOR_FAKE_SYSTEMS = [{"uuid": "27946b59-9e44-4fa7-8e91-f3527a1ef094", '
        '"name": "c1", "power_state": "Off", "external_notifier": False, '
        f'"nics": [{{"mac": "{MAC}", "ip": "127.0.0.9"}}]}}]\n'
    )
    log = (tmp_path / "emulator.log").open("wb")
    proc = subprocess.Popen(
        [str(emulator), "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def answering() -> bool:
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "emulator.log").read_text())
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        netlab.wait_until(answering, 60, 0.2, "sushy-emulator")
        yield f"http://127.0.0.1:{port}"
    finally:
        netlab.kill_process_group(proc)
        log.close()


def test_redfish_against_the_sushy_emulator(
    redfish_emulator: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = {"driver": "redfish", "url": redfish_emulator, "username": "admin", "password": "pw"}
    redfish = driver(spec, target(tmp_path))
    assert run(redfish.status()) == PowerState.OFF
    with caplog.at_level(logging.DEBUG, logger="sushy.connector"):
        run(redfish.on())
    patches = [r.getMessage() for r in caplog.records if "HTTP request: PATCH" in r.getMessage()]
    assert patches and "'BootSourceOverrideTarget': 'Pxe'" in patches[0]
    assert "'BootSourceOverrideEnabled': 'Once'" in patches[0]
    # The emulator's fake hardware applies power changes 1-11 s later.
    netlab.wait_until(lambda: run(redfish.status()) == PowerState.ON, 40, 1, "Redfish on")
    target_boot, _ = run(redfish.boot_override())
    assert target_boot == "Pxe"
    run(redfish.cycle())
    netlab.wait_until(lambda: run(redfish.status()) == PowerState.ON, 40, 1, "after cycle")
    run(redfish.off())
    netlab.wait_until(lambda: run(redfish.status()) == PowerState.OFF, 40, 1, "Redfish off")
    named = driver({**spec, "system": "nosuch"}, target(tmp_path))
    with pytest.raises(PowerError, match="not found"):
        run(named.status())
    closed = driver({**spec, "url": f"http://127.0.0.1:{free_port()}"}, target(tmp_path))
    with pytest.raises(PowerError, match=r"unreachable Redfish BMC at 127\.0\.0\.1"):
        run(closed.status())


# --- ipmi: OpenIPMI's ipmi_sim ---------------------------------------------------------------


@dataclass
class IpmiSim:
    port: int
    powered: Path  # the fake machine writes here each time the BMC powers it on


@pytest.fixture
def ipmi_sim(tmp_path: Path) -> Iterator[IpmiSim]:
    require_tool("ipmi_sim")
    work = tmp_path / "ipmi"
    (work / "state").mkdir(parents=True)
    port = free_port()
    powered = work / "powered.txt"
    machine = work / "machine.sh"
    # The "machine": ipmi_sim runs startcmd to power on and kills it to power off.
    machine.write_text(f"#!/bin/sh\necho on >> {powered}\nexec sleep 3600\n")
    machine.chmod(0o755)
    (work / "lan.conf").write_text(
        f'name "pxbtest"\nset_working_mc 0x20\n  startlan 1\n    addr 127.0.0.1 {port}\n'
        "    priv_limit admin\n"
        + "".join(f"    allowed_auths_{p} none md2 md5 straight\n"
                  for p in ("callback", "user", "operator", "admin"))
        + "    guid a123456789abcdefa123456789abcdef\n  endlan\n"
        # Chassis control needs the VM serial interface configured (nothing connects to it).
        f"  serial 15 127.0.0.1 {free_port()} codec VM\n"
        f'  startcmd "{machine}"\n  startnow false\n  poweroff_wait 0\n  kill_wait 2\n'
        '  user 2 true "admin" "secret" admin 10 none md2 md5 straight\n'
    )  # fmt: skip
    # mc_setbmc first: without it this ipmi_sim (2.0.33) crashes in mc_add.
    (work / "bmc.emu").write_text(
        "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n"
    )
    log = (work / "sim.log").open("wb")
    # Its console reads stdin (-n, no console, crashes here): an open pipe that never speaks.
    proc = subprocess.Popen(
        ["ipmi_sim", "-c", "lan.conf", "-f", "bmc.emu", "-s", str(work / "state")],
        cwd=work, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip

    def bound() -> bool:
        if proc.poll() is not None:
            raise AssertionError((work / "sim.log").read_text())
        done = subprocess.run(["ss", "-H", "-uln"], capture_output=True, text=True, timeout=5)
        return f"127.0.0.1:{port} " in done.stdout

    try:
        netlab.wait_until(bound, 20, 0.1, "ipmi_sim listening")
        yield IpmiSim(port, powered)
    finally:
        netlab.kill_process_group(proc)
        log.close()


def powered_on(sim: IpmiSim, times: int) -> None:
    """The fake machine was started `times` times in all. ipmi_sim says "on" once it has
    started the machine's process; the process writes its line a moment later (CI saw the
    status first under load), so the file is waited for, bounded."""

    def lines() -> list[str]:
        return sim.powered.read_text().splitlines() if sim.powered.exists() else []

    netlab.wait_until(lambda: len(lines()) >= times, 10, 0.1, f"the machine started {times}x")
    assert lines() == ["on"] * times


def test_ipmi_against_ipmi_sim(ipmi_sim: IpmiSim, tmp_path: Path) -> None:
    spec = {"driver": "ipmi", "host": "127.0.0.1", "port": ipmi_sim.port, "user": "admin",
            "password": "secret"}  # fmt: skip
    ipmi = driver(spec, target(tmp_path))
    assert run(ipmi.status()) == PowerState.OFF
    run(ipmi.on())
    netlab.wait_until(lambda: run(ipmi.status()) == PowerState.ON, 20, 0.5, "IPMI on")
    powered_on(ipmi_sim, 1)
    run(ipmi.off())
    netlab.wait_until(lambda: run(ipmi.status()) == PowerState.OFF, 20, 0.5, "IPMI off")
    run(ipmi.cycle())  # off → "boot" powers it on
    netlab.wait_until(lambda: run(ipmi.status()) == PowerState.ON, 20, 0.5, "IPMI cycle")
    powered_on(ipmi_sim, 2)
    wrong = driver({**spec, "password": "wrong", "timeout": 20}, target(tmp_path))
    with pytest.raises(PowerError, match=f"IPMI BMC at 127.0.0.1:{ipmi_sim.port}"):
        run(wrong.status())


def test_ipmi_unreachable_bmc_is_named(tmp_path: Path) -> None:
    port = free_port()
    ipmi = driver(
        {"driver": "ipmi", "host": "127.0.0.1", "port": port, "user": "a", "password": "b",
         "timeout": 5},
        target(tmp_path),
    )  # fmt: skip
    with pytest.raises(PowerError, match=f"IPMI BMC at 127.0.0.1:{port}"):
        run(ipmi.status())
