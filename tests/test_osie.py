"""The OSIE's runtime (overlays/osie): the real scripts, run with bash on this machine under a
scratch root (PIXIEBOX_ROOT) against metadata the real agent code builds; against a real agent in
network namespaces for the fetch with back-off, the phone-homes and journal forwarding; and on
loop-device disks for "never formats a disk unasked"."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import netlab
import pytest
import yaml
from agentproc import lab_toml, start_agent
from osie_tools import (
    APPLIANCE,
    INFLUX_TOKEN,
    IP,
    MAC,
    OVERLAY,
    SCRIPTS,
    UNITS,
    USER_KEY,
    LoopDisk,
    metadata,
    require,
    run_script,
    script_env,
    write_cmdline,
)
from pixiebox.events import Kind
from pixiebox.store.identity import AGENT_TOKEN_FILE, IdentityError, IdentityStore

MIB = 1 << 20
DISK_SIZE = 64 * MIB


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def configure(tmp_path: Path, document: dict[str, Any], **extra: str) -> tuple[Path, str]:
    """Run pixiebox-osie on `document`; (the scratch root, what it said)."""
    root = tmp_path / "root"
    write_cmdline(root, f"console=ttyS0 pixiebox.url=http://{APPLIANCE} pixiebox.mac={MAC} "
                  "pixiebox.name=c1")  # fmt: skip
    doc = tmp_path / "metadata.json"
    doc.write_text(json.dumps(document))
    result = run_script("pixiebox-osie", root, PIXIEBOX_METADATA=str(doc), **extra)
    assert result.returncode == 0, result.stdout
    return root, result.stdout


# --------------------------------------------------------------------------- the agent's side


def test_the_agent_token_is_one_per_lab_private_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = IdentityStore(state / "identity").agent_token()
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    path = state / AGENT_TOKEN_FILE
    assert path.read_text() == first and mode_of(path) == 0o600
    assert IdentityStore(state / "identity").agent_token() == first  # an agent restart
    path.write_text("a::b\n")
    with pytest.raises(IdentityError, match="k3s agent token"):
        IdentityStore(state / "identity").agent_token()


def test_metadata_gives_k3s_disk_and_syslog_and_no_token_without_a_server(
    tmp_path: Path,
) -> None:
    document = metadata(tmp_path, disk="/dev/disk/by-id/nvme-test", format="if-blank")
    kubernetes = document["kubernetes"]
    assert kubernetes["token"] == (tmp_path / "state" / AGENT_TOKEN_FILE).read_text()
    assert re.fullmatch(r"[0-9a-f]{32}", kubernetes["node_password"])
    assert kubernetes["node_labels"] == {"pixiebox.io/lab": "homelab"}
    assert document["disk"] == {"path": "/dev/disk/by-id/nvme-test", "format": "if-blank",
                                "mount": "/var/openebs/local"}  # fmt: skip
    assert document["appliance"]["syslog"] == {"host": APPLIANCE, "port": 514}
    # The same machine in a lab without Kubernetes: no token, and no token file made.
    other = tmp_path / "other"
    other.mkdir()
    plain = metadata(other, server=None, name="My Lab!")
    assert plain["kubernetes"]["token"] is None and plain["disk"] is None
    assert plain["kubernetes"]["node_labels"] == {"pixiebox.io/lab": "My-Lab"}
    assert not (other / "state" / AGENT_TOKEN_FILE).exists()


# --------------------------------------------------------------------------- files it writes


def test_pixiebox_osie_writes_the_machine_from_its_metadata(tmp_path: Path) -> None:
    require("jq")
    document = metadata(tmp_path)
    root = tmp_path / "root"
    # The image's own host keys (the same in every OSIE) must not survive.
    (root / "etc" / "ssh").mkdir(parents=True)
    for name in ("ssh_host_rsa_key", "ssh_host_rsa_key.pub", "ssh_host_ecdsa_key"):
        (root / "etc" / "ssh" / name).write_text("image key\n")
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n")
    root, said = configure(tmp_path, document)

    assert (root / "etc" / "hostname").read_text() == "c1\n"
    ssh_dir = root / "root" / ".ssh"
    assert (ssh_dir / "authorized_keys").read_text() == USER_KEY + "\n"
    assert mode_of(ssh_dir) == 0o700 and mode_of(ssh_dir / "authorized_keys") == 0o600
    assert sorted(p.name for p in (root / "etc" / "ssh").iterdir()) == [
        "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]  # fmt: skip
    key = root / "etc" / "ssh" / "ssh_host_ed25519_key"
    assert key.read_text() == document["ssh_host_key"]["private"]
    assert mode_of(key) == 0o600
    assert key.with_suffix(".pub").read_text() == document["ssh_host_key"]["public"] + "\n"
    if shutil.which("ssh-keygen"):
        shown = subprocess.run(["ssh-keygen", "-l", "-f", str(key)], capture_output=True,
                               text=True, timeout=30, check=True).stdout.split()[1]  # fmt: skip
        assert f"SSH host key {shown}, kept by the appliance" in said

    config = yaml.safe_load((root / "etc/rancher/k3s/config.yaml").read_text())
    assert config["server"] == f"https://{APPLIANCE}:6443"
    assert config["token"] == document["kubernetes"]["token"]
    assert (config["node-name"], config["node-ip"]) == ("c1", IP)
    assert config["node-label"] == ["pixiebox.io/lab=homelab"]
    assert any(arg.startswith("eviction-hard=memory.available<") for arg in config["kubelet-arg"])
    assert mode_of(root / "etc/rancher/k3s/config.yaml") == 0o600  # it holds the token
    password = root / "etc/rancher/node/password"
    assert password.read_text() == document["kubernetes"]["node_password"] + "\n"
    assert mode_of(password) == 0o600
    assert "k3s is not in this OSIE image (/usr/local/bin/k3s is missing" in said

    telegraf = tomllib.loads((root / "etc/telegraf/telegraf.conf").read_text())
    (output,) = telegraf["outputs"]["influxdb_v2"]
    assert output == {"urls": [f"http://{APPLIANCE}:8086"], "token": "${INFLUX_TOKEN}",
                      "organization": "home", "bucket": "lab"}  # fmt: skip
    assert set(telegraf["inputs"]) == {"cpu", "mem", "disk", "diskio", "net", "system", "kernel",
                                       "processes"}  # fmt: skip
    assert telegraf["global_tags"] == {"lab": "homelab"}
    assert telegraf["agent"]["hostname"] == "c1"  # Telegraf's host tag
    assert INFLUX_TOKEN not in (root / "etc/telegraf/telegraf.conf").read_text()
    env = root / "etc/telegraf/telegraf.env"
    assert env.read_text() == f'INFLUX_TOKEN="{INFLUX_TOKEN}"\n' and mode_of(env) == 0o600
    assert "Telegraf is not in this OSIE image" in said

    netlogd = configparser.ConfigParser()
    netlogd.optionxform = str  # type: ignore[assignment,method-assign]
    netlogd.read(root / "etc/systemd/netlogd.conf.d/pixiebox.conf")
    assert dict(netlogd["Network"]) == {"Address": f"{APPLIANCE}:514", "Protocol": "udp",
                                        "LogFormat": "rfc5424"}  # fmt: skip
    assert mode_of(root / "run/pixiebox/metadata.json") == 0o600

    # Every boot runs it again: nothing piles up.
    configure(tmp_path, document)
    assert (root / "etc/hosts").read_text() == (
        "127.0.0.1\tlocalhost\n127.0.1.1\tc1.lab.test c1\t# pixiebox\n"
    )


def test_with_the_binaries_it_says_they_join_and_ship(tmp_path: Path) -> None:
    require("jq")
    bin_dir = tmp_path / "root" / "usr" / "local" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("k3s", "telegraf"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    _, said = configure(tmp_path, metadata(tmp_path))
    assert f"k3s agent joins https://{APPLIANCE}:6443 as node c1" in said
    assert f"Telegraf ships this machine's metrics to http://{APPLIANCE}:8086" in said


def test_no_kubernetes_or_telemetry_means_nothing_is_started_and_it_says_so(
    tmp_path: Path,
) -> None:
    require("jq")
    root, _ = configure(tmp_path, metadata(tmp_path))  # a previous boot's files (none in RAM,
    assert (root / "etc/rancher/k3s/config.yaml").exists()  # but a re-run must not keep them)
    other = tmp_path / "lab2"
    other.mkdir()
    _, said = configure(tmp_path, metadata(other, server=None, telemetry_url=None))
    assert not (root / "etc/rancher/k3s/config.yaml").exists()
    assert not (root / "etc/telegraf/telegraf.conf").exists()
    assert not (root / "etc/telegraf/telegraf.env").exists()
    lines = said.splitlines()
    assert lines.count("pixiebox: no [kubernetes] server in the appliance's lab.toml: this "
                       "machine does not join Kubernetes") == 1  # fmt: skip
    assert lines.count("pixiebox: no [telemetry] url in the appliance's lab.toml: Telegraf is "
                       "not started") == 1  # fmt: skip


def test_awkward_strings_stay_strings_in_yaml_toml_and_the_environment_file(
    tmp_path: Path,
) -> None:
    require("jq")
    document = metadata(tmp_path, name='lab "one"\n[x]')
    document["telemetry"] |= {"org": 'o"r\\g\n= 1', "bucket": "b'u", "token": 'to"k\\en$x'}
    document["kubernetes"]["token"] = 'tok: "en"\n- x'
    root, _ = configure(tmp_path, document)
    telegraf = tomllib.loads((root / "etc/telegraf/telegraf.conf").read_text())
    assert telegraf["outputs"]["influxdb_v2"][0]["organization"] == 'o"r\\g\n= 1'
    assert telegraf["global_tags"]["lab"] == 'lab "one"\n[x]'
    config = yaml.safe_load((root / "etc/rancher/k3s/config.yaml").read_text())
    assert config["token"] == 'tok: "en"\n- x'
    # systemd reads the environment file: ask it what the variable is.
    if shutil.which("systemd-run") is None or shutil.which("systemctl") is None:
        return
    probe = subprocess.run(
        ["systemd-run", "--quiet", "--wait", "--pipe", "--collect",
         f"--property=EnvironmentFile={root / 'etc/telegraf/telegraf.env'}",
         "/usr/bin/printenv", "INFLUX_TOKEN"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if probe.returncode != 0 and "System has not been booted with systemd" in probe.stderr:
        return
    if probe.returncode == 0:
        assert probe.stdout == 'to"k\\en$x\n'


def test_no_url_on_the_command_line_is_said_and_configures_nothing(tmp_path: Path) -> None:
    require("jq")
    root = tmp_path / "root"
    write_cmdline(root, "console=ttyS0 quiet")
    result = run_script("pixiebox-osie", root)
    assert result.returncode == 0
    assert "no pixiebox.url= on the kernel command line" in result.stdout
    assert not (root / "run" / "pixiebox").exists()


def test_metadata_of_another_machine_is_refused(tmp_path: Path) -> None:
    require("jq")
    document = metadata(tmp_path)
    document["mac"] = "02:00:00:00:85:99"
    root = tmp_path / "root"
    # Served by a real HTTP server on loopback (python's), which answers with the wrong document.
    served = tmp_path / "www"
    served.mkdir()
    (served / "metadata").write_text(json.dumps(document))
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
         str(served)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...)"
        port = re.search(r"port (\d+)", line)
        assert port is not None, line
        write_cmdline(root, f"pixiebox.url=http://127.0.0.1:{port.group(1)} pixiebox.mac={MAC}")
        result = run_script("pixiebox-osie", root, PIXIEBOX_MAX_TRIES="2")
    finally:
        server.terminate()
        server.wait(10)
    assert result.returncode == 1
    assert (
        f"the appliance answered with the metadata of 02:00:00:00:85:99, but this machine is {MAC}"
    ) in result.stdout
    assert not (root / "etc" / "ssh").exists()


# --------------------------------------------------------------------------- units


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def words(parser: configparser.ConfigParser, section: str, key: str) -> set[str]:
    return set(parser.get(section, key, fallback="").split())


def test_units_order_the_boot() -> None:
    osie = unit(UNITS / "pixiebox-osie.service")
    assert words(osie, "Unit", "After") == {"network-online.target"}
    assert osie["Service"]["Type"] == "oneshot" and osie["Service"]["TimeoutStartSec"] == "infinity"
    dropins = OVERLAY / "etc" / "systemd" / "system"
    after_osie = {
        "pixiebox-disk": unit(UNITS / "pixiebox-disk.service"),
        "pixiebox-phone-home": unit(UNITS / "pixiebox-phone-home.service"),
        "k3s-agent": unit(UNITS / "k3s-agent.service"),
        "telegraf": unit(UNITS / "telegraf.service"),
        "ssh": unit(dropins / "ssh.service.d" / "pixiebox.conf"),
        "systemd-netlogd": unit(dropins / "systemd-netlogd.service.d" / "pixiebox.conf"),
    }
    for name, parsed in after_osie.items():
        assert "pixiebox-osie.service" in words(parsed, "Unit", "After"), name
    # The disk is mounted before k3s starts and before the machine says it is up; "up" comes
    # once sshd listens and the journal is forwarded.
    assert {"k3s-agent.service", "pixiebox-phone-home.service"} <= words(
        after_osie["pixiebox-disk"], "Unit", "Before")  # fmt: skip
    assert "pixiebox-disk.service" in words(after_osie["k3s-agent"], "Unit", "After")
    assert {"ssh.service", "systemd-netlogd.service", "pixiebox-disk.service"} <= words(
        after_osie["pixiebox-phone-home"], "Unit", "After")  # fmt: skip
    joined = unit(UNITS / "pixiebox-joined.service")
    assert {"k3s-agent.service", "pixiebox-phone-home.service"} <= words(joined, "Unit", "After")
    assert joined["Service"]["Type"] == "simple"  # nothing, boot included, waits for it
    # Without the binary, or without the settings, k3s and Telegraf are skipped, not failed.
    skipped = (
        ("k3s-agent", "k3s", "/etc/rancher/k3s/config.yaml"),
        ("telegraf", "telegraf", "/etc/telegraf/telegraf.conf"),
    )
    for name, binary, settings in skipped:
        parsed = after_osie[name]
        assert parsed["Unit"]["ConditionFileIsExecutable"] == f"/usr/local/bin/{binary}"
        assert parsed["Unit"]["ConditionPathExists"] == settings
    assert after_osie["k3s-agent"]["Service"]["ExecStart"] == "/usr/local/bin/k3s agent"
    assert after_osie["ssh"]["Unit"]["ConditionPathExists"] == "/etc/ssh/ssh_host_ed25519_key"
    # Enabled both ways: links in the image and a preset.
    wants = dropins / "multi-user.target.wants"
    preset = (OVERLAY / "usr/lib/systemd/system-preset/10-pixiebox.preset").read_text()
    for name in ("pixiebox-osie", "pixiebox-disk", "pixiebox-phone-home", "pixiebox-joined",
                 "k3s-agent", "telegraf"):  # fmt: skip
        link = wants / f"{name}.service"
        assert (
            link.is_symlink() and str(link.readlink()) == f"/usr/lib/systemd/system/{name}.service"
        )
        assert f"enable {name}.service" in preset
    for path in UNITS.glob("*.service"):
        for command in re.findall(r"(?m)^Exec\w*=-?(\S+)", path.read_text()):
            if command.startswith("/usr/lib/pixiebox/"):
                assert (OVERLAY / command.lstrip("/")).stat().st_mode & 0o111, command
    network = unit(OVERLAY / "etc/systemd/network/80-pixiebox-dhcp.network")
    assert network["Match"]["Name"] == "en* eth*"
    assert network["DHCPv4"]["ClientIdentifier"] == "mac"


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    require("systemd-analyze")
    host_units = Path("/usr/lib/systemd/system")
    if not (host_units / "sysinit.target").exists():
        require("systemd's own units in /usr/lib/systemd/system")
    # The overlay on top of this machine's systemd units, with stand-ins for the programs the
    # image has (k3s and Telegraf are fetched by build.sh, kill and modprobe are packages'):
    # verify then judges only our files.
    root = tmp_path / "root"
    shutil.copytree(OVERLAY, root, symlinks=True)
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True,
                    dirs_exist_ok=True, copy_function=_copy_if_absent)  # fmt: skip
    for program in ("usr/local/bin/k3s", "usr/local/bin/telegraf", "bin/kill", "sbin/modprobe"):
        (root / program).parent.mkdir(parents=True, exist_ok=True)
        (root / program).write_text("#!/bin/sh\n")
        (root / program).chmod(0o755)
    names = ["pixiebox-osie", "pixiebox-disk", "pixiebox-phone-home", "pixiebox-joined",
             "k3s-agent", "telegraf"]  # fmt: skip
    units = [str(root / "usr/lib/systemd/system" / f"{name}.service") for name in names]
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", *units],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def _copy_if_absent(source: str, target: str) -> object:
    """copytree's copy function that keeps the overlay's files where both have one."""
    if Path(target).exists() or Path(target).is_symlink():
        return target
    return shutil.copy2(source, target)


def test_scripts_pass_shellcheck() -> None:
    require("shellcheck")
    scripts = sorted(p for p in SCRIPTS.iterdir() if p.is_file())
    result = subprocess.run(["shellcheck", "-x", "-s", "bash", *map(str, scripts)],
                            capture_output=True, text=True, timeout=120, check=False,
                            cwd=SCRIPTS)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_packages_list_names_what_the_scripts_call() -> None:
    listed = {line.split("#")[0].strip()
              for line in (OVERLAY / "PACKAGES").read_text().splitlines()} - {""}  # fmt: skip
    assert {"curl", "jq", "openssh-server", "systemd-netlogd", "util-linux", "e2fsprogs",
            "udev", "systemd"} <= listed  # fmt: skip
    assert not {name for name in listed if name.startswith("python")}


# --------------------------------------------------------------------------- a real agent

SUBNET = "10.85.0.0/24"


def osie_lab(workdir: Path) -> str:
    token_file = workdir / "influx-token"
    token_file.write_text(INFLUX_TOKEN + "\n")
    text = lab_toml(mode="reservation", subnet=SUBNET, assets=workdir / "assets",
                    state=workdir / "state", machines=[("c1", MAC, IP)])  # fmt: skip
    text = text.replace("[boot]\n", f'[boot]\nssh_keys = ["{USER_KEY}"]\n')
    text = text.replace("[http]", f'[api]\nlisten = "0.0.0.0:8080"\n'
                        f'token_file = "{workdir / "api-token"}"\n[http]')  # fmt: skip
    return text + (
        f'[kubernetes]\nserver = "https://{APPLIANCE}:6443"\n'
        f'[telemetry]\nurl = "http://{APPLIANCE}:8086"\norg = "home"\nbucket = "lab"\n'
        f'token_file = "{token_file}"\n'
    )


def env_argv(root: Path, script: str, **extra: str) -> list[str]:
    """argv running `script` under env(1) with the test environment (Host.run takes no env)."""
    pairs = [f"{k}={v}" for k, v in script_env(root, **extra).items()]
    return ["env", "-i", *pairs, "bash", str(SCRIPTS / script)]


def wait_for_text(path: Path, needle: str, timeout: float, proc: subprocess.Popen[bytes]) -> str:
    def seen() -> str | None:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before saying {needle!r}:\n{text}")
        return None

    return netlab.wait_until(seen, timeout, 0.2, f"never said {needle!r}")


def api(host: netlab.Host, path: str) -> Any:
    out = host.run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:8080{path}"]).stdout
    return json.loads(out)


@pytest.fixture
def lab_hosts(
    netlab_require: Callable[..., None], segment: netlab.Segment
) -> Iterator[tuple[netlab.Host, netlab.Host]]:
    netlab_require("curl", "jq")
    yield segment.add_host("agent", ip=f"{APPLIANCE}/24"), segment.add_host(
        "c1", mac=MAC, ip=f"{IP}/24")  # fmt: skip


def test_a_node_waits_for_a_late_appliance_then_comes_up_joins_and_logs(
    lab_hosts: tuple[netlab.Host, netlab.Host], segment: netlab.Segment, workdir: Path
) -> None:
    agent_host, node = lab_hosts
    root = workdir / "c1-root"
    agent = start_agent(agent_host, osie_lab(workdir), workdir)
    # The agent makes the lab's k3s agent token as it starts (before it serves anything), so the
    # appliance's k3s server, reading the same file, can start before any node asks.
    text = agent.text()
    assert -1 < text.find("made the lab's k3s agent token") < text.find("Pixiebox serving")
    # The node's iPXE fetches its script: the kernel command line it boots with, boot token and
    # all (what iPXE would pass to the kernel).
    script = node.run(["curl", "-sS", "--max-time", "10", f"http://{APPLIANCE}/boot/{MAC}.ipxe"])
    kernel = next(line for line in script.stdout.splitlines() if line.startswith("kernel "))
    arguments = kernel.partition(" && ")[0].split()[4:]  # after `kernel --name NAME URL`
    cmdline = " ".join(arg for arg in arguments if "${" not in arg)
    token = re.search(r"pixiebox\.token=(\S+)", cmdline)
    assert token and f"pixiebox.mac={MAC}" in cmdline, script.stdout
    write_cmdline(root, cmdline)
    # Then the appliance goes down (a power blip) while the node boots: it asks before the agent
    # runs again, and waits.
    assert agent.stop() == 0
    log = node.log_path("pixiebox-osie")
    osie = node.popen(env_argv(root, "pixiebox-osie"), log)
    wait_for_text(log, "try 2, trying again in 2 s", 60, osie)
    assert "the appliance did not answer: the connection was refused" in log.read_text()
    agent.start()  # the boot token was on disk before the script went out: it still counts
    assert osie.wait(120) == 0, log.read_text()
    said = log.read_text()
    assert re.search(r"got this machine's metadata from http://\S+ after \d+ tries", said), said
    agent.wait_log(f"c1 ({MAC}, {IP}) fetched its metadata")
    assert (root / "etc/hostname").read_text() == "c1\n"
    config = yaml.safe_load((root / "etc/rancher/k3s/config.yaml").read_text())
    assert config["token"] == (workdir / "state" / AGENT_TOKEN_FILE).read_text()
    stored = workdir / "state" / "identity" / MAC
    assert (root / "etc/rancher/node/password").read_text() == (
        stored / "k3s-node-password").read_text()  # fmt: skip
    assert (root / "etc/ssh/ssh_host_ed25519_key").read_text() == (
        stored / "ssh_host_ed25519_key").read_text()  # fmt: skip

    # Up: the phone-home after sshd and the disk, saying what the firmware's SecureBoot
    # variable says (efivarfs: 4 bytes of attributes, then 1 for on).
    efivar = root / "sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
    efivar.parent.mkdir(parents=True)
    efivar.write_bytes(b"\x06\x00\x00\x00\x01")
    up = node.run(env_argv(root, "pixiebox-phone-home"), timeout=120)
    assert "phoned home: the appliance at http://10.85.0.2 shows c1 up" in up.stdout, up.stdout
    machine = api(agent_host, "/api/v1/machines/c1")
    assert machine["state"] == "up" and machine["secure_boot"] == "on", machine
    # Up: its boot token is retired, so the metadata is not handed out again in this boot.
    again = node.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
                      "-H", f"Authorization: Bearer {token.group(1)}",
                      f"http://{APPLIANCE}/metadata"])  # fmt: skip
    assert again.stdout == "401"

    # Its journal, as systemd-netlogd sends it (netlog-protocol.c format_rfc5424 with the
    # address pixiebox-osie configured), lands in its event log.
    address = (root / "etc/systemd/netlogd.conf.d/pixiebox.conf").read_text()
    host, port = re.search(r"(?m)^Address=(\S+):(\d+)$", address).groups()  # type: ignore[union-attr]
    line = ('<30>1 2025-11-26T01:02:03.123456+00:00 c1 k3s 812 - - '
            'level=info msg="Starting k3s agent v1.33"')  # fmt: skip
    node.run(["bash", "-c", f"printf %s {shlex.quote(line)} >/dev/udp/{host}/{port}"])

    def syslogged() -> dict[str, Any] | None:
        events = api(agent_host, "/api/v1/machines/c1/events")
        return next((e for e in events if e["kind"] == Kind.SYSLOG), None)

    event = netlab.wait_until(syslogged, 20, 0.3, "the netlogd line never reached c1's events")
    assert event["message"] == 'k3s[812]: level=info msg="Starting k3s agent v1.33"'

    # Joined: pixiebox-joined waits for the kubelet's /healthz (a stand-in server here: no k3s
    # binary on this machine), then says so.
    joined_log = node.log_path("pixiebox-joined")
    joined = node.popen(env_argv(root, "pixiebox-joined", PIXIEBOX_KUBELET_POLL="1",
                                 PIXIEBOX_KUBELET_HEALTHZ="http://127.0.0.1:10248/healthz"),
                        joined_log)  # fmt: skip
    wait_for_text(joined_log, "waiting for the kubelet to answer healthy", 30, joined)
    assert api(agent_host, "/api/v1/machines/c1")["state"] == "up"
    kubelet = node.popen([sys.executable, str(Path(__file__).parent / "osie_kubelet.py"),
                          "127.0.0.1", "10248"], node.log_path("kubelet"))  # fmt: skip
    assert joined.wait(60) == 0, joined_log.read_text()
    assert "phoned home: the appliance shows c1 joined" in joined_log.read_text()
    segment.stop(kubelet)
    machine = api(agent_host, "/api/v1/machines/c1")
    assert machine["state"] == "joined"
    events = api(agent_host, "/api/v1/machines/c1/events")
    assert [e["kind"] for e in events if e["kind"] in (Kind.OS_UP, Kind.OS_JOINED)] == [
        Kind.OS_UP, Kind.OS_JOINED]  # fmt: skip

    # A phone-home that says something else is refused in words.
    for body, expected in (("{", "not JSON"), ('{"state": "ready"}', "unknown phone-home state")):
        refused = node.run(["curl", "-sS", "--max-time", "10", "-w", " %{http_code}", "--data",
                            body, f"http://{APPLIANCE}/api/v1/phone-home"])  # fmt: skip
        assert expected in refused.stdout and refused.stdout.endswith(" 400"), refused.stdout


# --------------------------------------------------------------------------- disks


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[Callable[[str], LoopDisk]]:
    """`disks(name)`: a 64 MiB sparse file on a loop device; all detached (and unmounted)
    afterwards, also on failure."""
    require("losetup", "blkid", "wipefs", "mkfs.ext4", "findmnt", "blockdev", "jq", root=True,
            loop=True)  # fmt: skip
    made: list[LoopDisk] = []

    def make(name: str) -> LoopDisk:
        disk = LoopDisk(tmp_path / f"{name}.img")
        made.append(disk.attach(DISK_SIZE))
        return disk

    try:
        yield make
    finally:
        for disk in reversed(made):
            disk.close()


def disk_setup(tmp_path: Path, disk: LoopDisk, format: str | None) -> tuple[Path, str]:
    """Run pixiebox-osie, then pixiebox-disk, for a machine whose lab.toml names `disk`."""
    document = metadata(tmp_path, disk=disk.device, format=format or "never")
    if format is None:  # the key absent from lab.toml: its default
        assert document["disk"]["format"] == "never"
    root, _ = configure(tmp_path, document)
    result = run_script("pixiebox-disk", root)
    assert result.returncode == 0, result.stdout
    return root / "var/openebs/local", result.stdout


def ext4_with_a_file(tmp_path: Path, disk: LoopDisk) -> str:
    """Make ext4 on `disk` holding volume/data.txt; its UUID."""
    subprocess.run(["mkfs.ext4", "-q", "-L", "mydata", disk.device], check=True, timeout=120)
    mnt = tmp_path / "prepare"
    mnt.mkdir()
    subprocess.run(["mount", disk.device, str(mnt)], check=True, timeout=60)
    try:
        (mnt / "volume").mkdir()
        (mnt / "volume" / "data.txt").write_text("kept across boots\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    return disk.probe()["UUID"]


def test_a_blank_disk_with_if_blank_is_formatted_and_mounted(
    tmp_path: Path, disks: Callable[[str], LoopDisk]
) -> None:
    disk = disks("blank")
    target, said = disk_setup(tmp_path, disk, "if-blank")
    probe = disk.probe()
    assert (probe["TYPE"], probe["LABEL"]) == ("ext4", "pixiebox-data"), probe
    assert disk.mounts() == [str(target)], said
    assert f"{disk.device} is blank" in said and "formatting it as ext4" in said
    assert f"{disk.device} mounted at /var/openebs/local (ext4," in said
    (target / "pvc-1").mkdir()  # OpenEBS makes a directory per volume: it is writable
    # The next boot (RAM is empty again) mounts it and does not format it again.
    uuid = probe["UUID"]
    subprocess.run(["umount", str(target)], check=True, timeout=60)
    next_boot = tmp_path / "next-boot"
    next_boot.mkdir()
    target, again = disk_setup(next_boot, disk, "if-blank")
    assert disk.probe()["UUID"] == uuid
    assert "formatting" not in again and "formats only blank disks: mounting it" in again
    assert (target / "pvc-1").is_dir()


@pytest.mark.parametrize("format", [None, "if-blank"])
def test_a_disk_with_a_filesystem_is_mounted_never_formatted(
    tmp_path: Path, disks: Callable[[str], LoopDisk], format: str | None
) -> None:
    disk = disks("ext4")
    uuid = ext4_with_a_file(tmp_path, disk)
    target, said = disk_setup(tmp_path, disk, format)
    assert disk.probe()["UUID"] == uuid and disk.probe()["LABEL"] == "mydata"
    assert (target / "volume" / "data.txt").read_text() == "kept across boots\n"
    assert "formatting" not in said
    if format is None:
        assert (
            f"{disk.device} has ext4 (UUID {uuid}) and format is not set: never formatted; "
            "mounting it" in said
        )
    else:
        assert 'format = "if-blank" formats only blank disks: mounting it as it is' in said


def test_a_partition_table_without_a_filesystem_is_not_formatted_even_with_if_blank(
    tmp_path: Path, disks: Callable[[str], LoopDisk]
) -> None:
    require("sfdisk")
    disk = disks("gpt")
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk.device],
                   input="label: gpt\n,\n", text=True, check=True, timeout=60)  # fmt: skip
    before = disk.digest()
    target, said = disk_setup(tmp_path, disk, "if-blank")
    assert disk.digest() == before  # not one byte written
    assert disk.mounts() == [] and not target.exists()
    assert f"{disk.device} has a partition table (gpt)" in said
    assert "not formatting: its partitions may hold data" in said


def test_a_blank_disk_without_if_blank_is_left_alone(
    tmp_path: Path, disks: Callable[[str], LoopDisk]
) -> None:
    disk = disks("blank")
    before = disk.digest()
    _, said = disk_setup(tmp_path, disk, None)
    assert disk.digest() == before and disk.mounts() == []
    assert f'{disk.device} is blank but format is not "if-blank": not formatting' in said


def test_data_without_a_signature_is_not_formatted(
    tmp_path: Path, disks: Callable[[str], LoopDisk]
) -> None:
    disk = disks("data")
    with open(disk.device, "r+b") as handle:  # a wiped partition table, data left behind
        handle.seek(DISK_SIZE - 4096)
        handle.write(b"someone's database page" * 10)
    before = disk.digest()
    assert disk.probe() == {}
    _, said = disk_setup(tmp_path, disk, "if-blank")
    assert disk.digest() == before and disk.mounts() == []
    assert "its first or last MiB is not all zeros: it may hold data; not formatting" in said


def test_a_missing_disk_or_none_named_still_boots(tmp_path: Path) -> None:
    require("jq")
    document = metadata(tmp_path, disk="/dev/disk/by-id/pixiebox-test-no-such-disk")
    root, _ = configure(tmp_path, document)
    result = run_script("pixiebox-disk", root, PIXIEBOX_DISK_WAIT="1")
    assert result.returncode == 0
    assert (
        "/dev/disk/by-id/pixiebox-test-no-such-disk did not appear within 1 s; not "
        "mounted" in result.stdout
    )
    root, _ = configure(tmp_path, metadata(tmp_path))
    result = run_script("pixiebox-disk", root)
    assert result.returncode == 0
    assert "no data disk named for this machine in lab.toml" in result.stdout
