"""Stable node identities (SSH host key, k3s node password) and GET /metadata.

Unit tests for the identity store and the metadata answer; then a real agent in network
namespaces, asked with curl by the machine itself, by a stranger and by an impostor, before and
after a restart, in reservation and proxy mode.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import netlab
import pytest
from agentproc import RunningAgent, lab_toml, start_agent
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pixiebox.config import LabConfig, check_config
from pixiebox.core import inventory as inventory_module
from pixiebox.core.evidence import Source
from pixiebox.core.inventory import Inventory
from pixiebox.core.urls import BootUrls
from pixiebox.events import Kind
from pixiebox.http import metadata as metadata_module
from pixiebox.http.metadata import metadata_response
from pixiebox.power.ssh import power_public_key
from pixiebox.store.identity import (
    HOST_KEY_FILE,
    HOST_PUBLIC_FILE,
    NODE_PASSWORD,
    NODE_PASSWORD_FILE,
    IdentityError,
    IdentityStore,
    new_node_password,
)
from pixiebox.store.state import StateStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "lab.toml"

MAC_A = "02:00:00:00:84:01"
MAC_B = "02:00:00:00:84:02"
USER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMetadataTestKeyForPixieboxOnly test@lab"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the identity store ------------------------------------------------------------------------


def test_identity_is_made_once_and_kept_across_stores(tmp_path: Path) -> None:
    root = tmp_path / "state" / "identity"
    first = IdentityStore(root).for_machine(MAC_A)
    store = IdentityStore(root)
    assert store.for_machine(MAC_A) == first
    assert store.for_machine(MAC_A) is store.for_machine(MAC_A)  # cached after the first read
    # A new store (an agent restart) reads the same files back.
    again = IdentityStore(root).for_machine(MAC_A.upper().replace(":", "-"))
    assert again == first
    assert again.mac == MAC_A
    assert NODE_PASSWORD.fullmatch(first.node_password)
    assert first.ssh_host_key.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert first.ssh_host_public.startswith("ssh-ed25519 ")


def test_files_are_private(tmp_path: Path) -> None:
    root = tmp_path / "identity"
    IdentityStore(root).for_machine(MAC_A)
    directory = root / MAC_A
    assert mode_of(root) == 0o700
    assert mode_of(directory) == 0o700
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted([HOST_KEY_FILE, HOST_PUBLIC_FILE, NODE_PASSWORD_FILE])  # no temp files
    for name in names:
        assert mode_of(directory / name) == 0o600, name


def test_loosened_modes_are_tightened(tmp_path: Path) -> None:
    root = tmp_path / "identity"
    IdentityStore(root).for_machine(MAC_A)
    (root / MAC_A).chmod(0o755)
    (root / MAC_A / HOST_KEY_FILE).chmod(0o644)
    IdentityStore(root).for_machine(MAC_A)
    assert mode_of(root / MAC_A) == 0o700
    assert mode_of(root / MAC_A / HOST_KEY_FILE) == 0o600


def test_machines_get_distinct_identities(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path / "identity")
    a, b = store.for_machine(MAC_A), store.for_machine(MAC_B)
    assert a.ssh_host_key != b.ssh_host_key
    assert a.ssh_host_public != b.ssh_host_public
    assert a.node_password != b.node_password


def test_private_key_parses_and_public_line_matches(tmp_path: Path) -> None:
    root = tmp_path / "identity"
    identity = IdentityStore(root).for_machine(MAC_A)
    key = serialization.load_ssh_private_key(identity.ssh_host_key.encode(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    derived = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert identity.ssh_host_public.split()[:2] == derived.decode().split()[:2]
    on_disk = (root / MAC_A / HOST_PUBLIC_FILE).read_text()
    assert on_disk.split()[:2] == identity.ssh_host_public.split()[:2]
    assert (root / MAC_A / HOST_KEY_FILE).read_text() == identity.ssh_host_key


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_ssh_keygen_agrees(tmp_path: Path) -> None:
    root = tmp_path / "identity"
    identity = IdentityStore(root).for_machine(MAC_A)
    result = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(root / MAC_A / HOST_KEY_FILE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.split()[:2] == identity.ssh_host_public.split()[:2]


def test_node_passwords_are_random_hex() -> None:
    passwords = {new_node_password() for _ in range(200)}
    assert len(passwords) == 200
    assert all(re.fullmatch(r"[0-9a-f]{32}", password) for password in passwords)


def test_not_a_mac_is_refused_and_makes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "identity"
    for bad in ("../../etc", "", "02:00:00:00:84"):
        with pytest.raises(ValueError):
            IdentityStore(root).for_machine(bad)
    assert not root.exists()


def test_concurrent_first_use_gives_one_identity(tmp_path: Path) -> None:
    root = tmp_path / "identity"
    # Several threads on one store, and two stores (as two processes would) at once.
    stores = [IdentityStore(root), IdentityStore(root)]
    results: list[Any] = []
    barrier = threading.Barrier(8)

    def ask(index: int) -> None:
        barrier.wait(5)
        results.append(stores[index % 2].for_machine(MAC_A))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 8
    assert len({(r.ssh_host_key, r.node_password) for r in results}) == 1
    assert IdentityStore(root).for_machine(MAC_A) == results[0]


def test_a_missing_public_file_is_written_again_from_the_private_key(tmp_path: Path) -> None:
    root = tmp_path / "identity"
    identity = IdentityStore(root).for_machine(MAC_A)
    (root / MAC_A / HOST_PUBLIC_FILE).unlink()
    assert IdentityStore(root).for_machine(MAC_A) == identity
    assert (root / MAC_A / HOST_PUBLIC_FILE).read_text().split()[:2] == (
        identity.ssh_host_public.split()[:2]
    )


def test_a_damaged_key_is_reported_not_replaced(tmp_path: Path) -> None:
    root = tmp_path / "identity"
    IdentityStore(root).for_machine(MAC_A)
    key_file = root / MAC_A / HOST_KEY_FILE
    key_file.write_text("not a key\n")
    with pytest.raises(IdentityError, match=re.escape(str(key_file))):
        IdentityStore(root).for_machine(MAC_A)
    assert key_file.read_text() == "not a key\n"
    password_file = root / MAC_B / NODE_PASSWORD_FILE
    IdentityStore(root).for_machine(MAC_B)
    password_file.write_text("nope\n")
    with pytest.raises(IdentityError, match="node password"):
        IdentityStore(root).for_machine(MAC_B)


def test_repr_hides_the_secrets(tmp_path: Path) -> None:
    identity = IdentityStore(tmp_path / "identity").for_machine(MAC_A)
    text = repr(identity)
    assert identity.node_password not in text and "PRIVATE KEY" not in text


# --- lab.toml -------------------------------------------------------------------------------


def test_example_documents_the_new_sections_and_they_validate(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    assert "[kubernetes]" in text and "[telemetry]" in text
    # The commented example keys, switched on, are a valid file.
    keys = ("server", "url", "org", "bucket", "token_file")
    enabled = re.sub(rf"(?m)^# ({'|'.join(keys)}) = ", r"\1 = ", text)
    assert enabled.count("\nserver = ") == 1 and enabled.count("\ntoken_file = ") == 2
    path = tmp_path / "lab.toml"
    path.write_text(enabled)
    config, problems = check_config(path)
    assert config is not None, problems
    assert [p for p in problems if p.severity == "error"] == []
    assert config.kubernetes.server == "https://192.168.1.64:6443"
    assert config.telemetry.url == "http://192.168.1.64:8086"
    assert config.telemetry.token_file == Path("/var/lib/pixiebox/influxdb-token")
    # And off by default.
    assert LabConfig().kubernetes.server is None and LabConfig().telemetry.url is None


@pytest.mark.parametrize(
    ("section", "value"),
    [("kubernetes", "http://10.0.0.1:6443"), ("kubernetes", "10.0.0.1:6443"),
     ("telemetry", "influx:8086"), ("telemetry", "http://host:port")],
)  # fmt: skip
def test_a_bad_url_is_reported_with_its_key_and_line(
    tmp_path: Path, section: str, value: str
) -> None:
    key = "server" if section == "kubernetes" else "url"
    path = tmp_path / "lab.toml"
    path.write_text(f'[lab]\nname = "x"\n[{section}]\n{key} = "{value}"\n')
    config, problems = check_config(path)
    assert config is None
    (problem,) = problems
    assert problem.loc == (section, key) and problem.line == 4
    assert value in problem.message


# --- the metadata answer, in process -------------------------------------------------------

RESERVED_IP = IPv4Address("10.84.0.31")
URLS = BootUrls(IPv4Address("10.84.0.2"))


@pytest.fixture
def no_arp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test process's own ARP cache plays no part."""
    monkeypatch.setattr(inventory_module, "neighbour_mac", lambda ip: None)
    monkeypatch.setattr(metadata_module, "neighbour_mac", lambda ip: None)


@pytest.fixture
def lab(tmp_path: Path, no_arp: None) -> Iterator[Inventory]:
    token_file = tmp_path / "influx-token"
    token_file.write_text("influx-secret\n")
    config = LabConfig(
        lab={"domain": "lab.test"},
        network={"dns": ["10.84.0.254"]},
        boot={"ssh_keys": [USER_KEY, "  "]},
        kubernetes={"server": "https://10.84.0.2:6443"},
        telemetry={"url": "http://10.84.0.2:8086", "org": "home", "bucket": "lab",
                   "token_file": str(token_file)},
        machines=[{"name": "c1", "mac": MAC_A, "ip": str(RESERVED_IP)}],
    )  # fmt: skip
    store = StateStore(tmp_path / "state")
    try:
        yield Inventory(config, store)
    finally:
        store.close()


def answer(
    inventory: Inventory, identities: IdentityStore | None, ip: str | None
) -> tuple[int, str, dict[str, str]]:
    response = asyncio.run(
        metadata_response(inventory, URLS, identities, IPv4Address(ip) if ip else None)
    )
    return response.status_code, bytes(response.body).decode(), dict(response.headers)


def test_the_reserved_machine_gets_its_document(lab: Inventory, tmp_path: Path) -> None:
    identities = IdentityStore(tmp_path / "identity")
    status, body, headers = answer(lab, identities, str(RESERVED_IP))
    assert status == 200, body
    assert headers["cache-control"] == "no-store"
    document = json.loads(body)
    identity = identities.for_machine(MAC_A)
    assert document == {
        "name": "c1",
        "mac": MAC_A,
        "hostname": "c1",
        "domain": "lab.test",
        "fqdn": "c1.lab.test",
        "ip": "10.84.0.31",
        "lab": "homelab",
        # The user's keys, then the appliance's own (the ssh power driver logs in with it).
        "ssh_authorized_keys": [USER_KEY, power_public_key(tmp_path)],
        "ssh_host_key": {"private": identity.ssh_host_key, "public": identity.ssh_host_public},
        "kubernetes": {
            "server": "https://10.84.0.2:6443",
            "token": identities.agent_token(),
            "node_name": "c1",
            "node_password": identity.node_password,
            "node_labels": {"pixiebox.io/lab": "homelab"},
        },
        "telemetry": {
            "url": "http://10.84.0.2:8086",
            "org": "home",
            "bucket": "lab",
            "token": "influx-secret",
        },
        "disk": None,
        "appliance": {
            "url": "http://10.84.0.2",
            "dns": ["10.84.0.254"],
            "syslog": {"host": "10.84.0.2", "port": 514},
        },
    }
    (sent,) = lab.lifecycle.events(MAC_A)
    assert (sent.kind, sent.fields) == (Kind.METADATA_SENT, {"ip": str(RESERVED_IP)})


def test_an_unknown_machine_that_booted_gets_a_generated_hostname(
    lab: Inventory, tmp_path: Path
) -> None:
    identities = IdentityStore(tmp_path / "identity")
    ip = "10.84.0.60"
    status, _, _ = answer(lab, identities, ip)
    assert status == 404
    # It fetched its script from that address, where the kernel's neighbour entry named it.
    lab.seen(MAC_B, None)
    lab.learn(MAC_B, IPv4Address(ip), Source.NEIGHBOUR)
    status, body, _ = answer(lab, identities, ip)
    assert status == 200, body
    document = json.loads(body)
    assert document["name"] is None
    assert document["hostname"] == document["kubernetes"]["node_name"] == "node-020000008402"
    assert document["fqdn"] == "node-020000008402.lab.test"
    assert document["ssh_host_key"]["public"] == identities.for_machine(MAC_B).ssh_host_public


def test_unknown_machines_get_nothing_under_unknown_ignore(tmp_path: Path, no_arp: None) -> None:
    config = LabConfig(boot={"unknown": "ignore"})
    store = StateStore(tmp_path / "state")
    try:
        inventory = Inventory(config, store)
        inventory.seen(MAC_B, None)
        inventory.learn(MAC_B, IPv4Address("10.84.0.60"), Source.NEIGHBOUR)
        status, body, _ = answer(inventory, IdentityStore(tmp_path / "identity"), "10.84.0.60")
    finally:
        store.close()
    assert status == 404, body
    assert not (tmp_path / "identity").exists()


def test_no_address_or_no_store(lab: Inventory, tmp_path: Path) -> None:
    status, body, _ = answer(lab, None, str(RESERVED_IP))
    assert (status, body) == (503, "metadata is not configured\n")
    status, _, _ = answer(lab, IdentityStore(tmp_path / "identity"), None)
    assert status == 404


def test_the_arp_cache_must_agree_with_the_claimed_mac(
    lab: Inventory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identities = IdentityStore(tmp_path / "identity")
    monkeypatch.setattr(metadata_module, "neighbour_mac", lambda ip: MAC_B)
    status, body, _ = answer(lab, identities, str(RESERVED_IP))
    assert status == 404 and "BEGIN" not in body
    assert not (tmp_path / "identity" / MAC_A).exists()
    monkeypatch.setattr(metadata_module, "neighbour_mac", lambda ip: MAC_A)
    assert answer(lab, identities, str(RESERVED_IP))[0] == 200


def test_an_unreadable_telemetry_token_is_null(lab: Inventory, tmp_path: Path) -> None:
    (tmp_path / "influx-token").unlink()
    status, body, _ = answer(lab, IdentityStore(tmp_path / "identity"), str(RESERVED_IP))
    assert status == 200
    assert json.loads(body)["telemetry"]["token"] is None


def test_a_damaged_identity_is_a_500_without_secrets(lab: Inventory, tmp_path: Path) -> None:
    root = tmp_path / "identity"
    IdentityStore(root).for_machine(MAC_A)
    (root / MAC_A / NODE_PASSWORD_FILE).write_text("garbage\n")
    status, body, _ = answer(lab, IdentityStore(root), str(RESERVED_IP))
    assert status == 500 and "garbage" not in body and "BEGIN" not in body


# --- a real agent ------------------------------------------------------------------------------

SUBNET = "10.84.0.0/24"
AGENT_IP = "10.84.0.2"
C1_MAC, C1_IP = "02:00:00:00:84:31", "10.84.0.31"
NODE_MAC = "02:00:00:00:84:07"
INFLUX_TOKEN = "influx-write-token-84"


def fetch(host: netlab.Host, path: str = "/metadata") -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of GET http://AGENT<path> from `host`."""
    raw = host.run(["curl", "-sS", "-i", "--max-time", "10", f"http://{AGENT_IP}{path}"]).stdout
    head, _, body = raw.replace("\r\n", "\n").partition("\n\n")
    status_line, *header_lines = head.split("\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def metadata_of(host: netlab.Host) -> dict[str, Any]:
    status, headers, body = fetch(host)
    assert status == 200, body
    assert headers.get("cache-control") == "no-store"
    document: dict[str, Any] = json.loads(body)
    return document


def lab_config(workdir: Path, mode: str, machines: list[tuple[str, str, str | None]]) -> str:
    token_file = workdir / "influx-token"
    token_file.write_text(INFLUX_TOKEN + "\n")
    token_file.chmod(0o600)
    text = lab_toml(
        mode=mode, subnet=SUBNET, assets=workdir / "assets", state=workdir / "state",
        machines=machines, gateway="10.84.0.254",
    )  # fmt: skip
    assert text.count("[boot]\n") == 1
    text = text.replace("[boot]\n", f'[boot]\nssh_keys = ["{USER_KEY}"]\n')
    return text + (
        "[kubernetes]\n"
        f'server = "https://{AGENT_IP}:6443"\n'
        "[telemetry]\n"
        f'url = "http://{AGENT_IP}:8086"\n'
        'org = "home"\n'
        'bucket = "lab"\n'
        f'token_file = "{token_file}"\n'
    )


def secrets_of(document: dict[str, Any]) -> list[str]:
    return [
        document["ssh_host_key"]["private"],
        document["ssh_host_key"]["private"].splitlines()[1],
        document["kubernetes"]["node_password"],
        document["kubernetes"]["token"],
        document["telemetry"]["token"],
    ]


def test_reserved_machine_gets_its_own_metadata_and_keeps_it_across_restarts(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("dhclient", "curl")  # type: ignore[operator]
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    agent = start_agent(
        agent_host, lab_config(workdir, "reservation", [("c1", C1_MAC, C1_IP)]), workdir
    )
    c1 = segment.add_host("c1", mac=C1_MAC)
    lease = netlab.run_dhclient(c1, workdir / "c1")
    assert (lease.ip, lease.hostname) == (C1_IP, "c1")

    first = metadata_of(c1)
    assert (first["name"], first["mac"], first["ip"]) == ("c1", C1_MAC, C1_IP)
    assert (first["hostname"], first["domain"], first["fqdn"]) == ("c1", "lab.test", "c1.lab.test")
    user_key, appliance_key = first["ssh_authorized_keys"]
    assert user_key == USER_KEY
    assert appliance_key.startswith("ssh-ed25519 ")
    assert first["kubernetes"]["server"] == f"https://{AGENT_IP}:6443"
    assert first["kubernetes"]["node_name"] == "c1"
    assert NODE_PASSWORD.fullmatch(first["kubernetes"]["node_password"])
    agent_token = (workdir / "state" / "k3s-agent-token").read_text()
    assert first["kubernetes"]["token"] == agent_token
    assert first["telemetry"] == {"url": f"http://{AGENT_IP}:8086", "org": "home",
                                  "bucket": "lab", "token": INFLUX_TOKEN}  # fmt: skip
    assert first["appliance"] == {"url": f"http://{AGENT_IP}", "dns": ["10.84.0.254"],
                                  "syslog": {"host": AGENT_IP, "port": 514}}  # fmt: skip
    key = serialization.load_ssh_private_key(
        first["ssh_host_key"]["private"].encode(), password=None
    )
    assert isinstance(key, Ed25519PrivateKey)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert first["ssh_host_key"]["public"].split()[:2] == public.decode().split()[:2]
    agent.wait_log(f"c1 ({C1_MAC}, {C1_IP}) fetched its metadata")
    # Kept on the appliance, private.
    directory = workdir / "state" / "identity" / C1_MAC
    assert mode_of(directory) == 0o700
    assert (directory / HOST_KEY_FILE).read_text() == first["ssh_host_key"]["private"]
    assert all(mode_of(path) == 0o600 for path in directory.iterdir())

    assert metadata_of(c1) == first  # the same on a second request

    # A host at another address gets a sentence, and none of c1's secrets.
    stranger = segment.add_host("stranger", ip="10.84.0.77/24")
    status, headers, body = fetch(stranger)
    assert status == 404, body
    assert headers.get("cache-control") == "no-store"
    assert body.startswith("no machine is known at 10.84.0.77")
    assert not any(secret in body for secret in secrets_of(first))
    assert "ssh-ed25519" not in body
    agent.wait_log("10.84.0.77 asked for /metadata")
    assert re.search(r"WARNING 10\.84\.0\.77 asked for /metadata", agent.text())

    # After a restart of the agent: the same host key, node password and agent token.
    assert agent.stop() == 0
    agent.start()
    assert metadata_of(c1) == first


def test_proxy_mode_answers_by_the_address_a_script_was_fetched_from(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl")  # type: ignore[operator]
    agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    agent: RunningAgent = start_agent(
        agent_host, lab_config(workdir, "proxy", [("c1", C1_MAC, None)]), workdir
    )
    # In proxy mode the home router hands out addresses: these are "its" leases.
    c1 = segment.add_host("c1", mac=C1_MAC, ip="10.84.0.50/24")
    node = segment.add_host("node", mac=NODE_MAC, ip="10.84.0.51/24")
    impostor = segment.add_host("impostor", ip="10.84.0.52/24")

    # A machine that never booted through Pixiebox gets nothing.
    status, _, _ = fetch(node)
    assert status == 404

    for host, mac in ((c1, C1_MAC), (node, NODE_MAC)):
        status, _, script = fetch(host, f"/boot/{mac}.ipxe")
        assert status == 200 and script.startswith("#!ipxe"), script
    c1_data = metadata_of(c1)
    assert (c1_data["name"], c1_data["mac"], c1_data["ip"]) == ("c1", C1_MAC, "10.84.0.50")
    node_data = metadata_of(node)
    assert node_data["name"] is None
    assert (node_data["mac"], node_data["ip"]) == (NODE_MAC, "10.84.0.51")
    assert node_data["hostname"] == node_data["kubernetes"]["node_name"] == "node-020000008407"
    assert node_data["ssh_host_key"] != c1_data["ssh_host_key"]
    assert node_data["kubernetes"]["node_password"] != c1_data["kubernetes"]["node_password"]
    assert node_data["kubernetes"]["token"] == c1_data["kubernetes"]["token"]  # one per lab
    agent.wait_log(f"unknown machine {NODE_MAC} (10.84.0.51) fetched its metadata")

    # Naming another machine's MAC in a script URL does not hand over its secrets: a named MAC
    # is no evidence of who is at an address; the kernel's neighbour entry is, and it names the
    # impostor, which never booted through Pixiebox.
    status, _, _ = fetch(impostor, f"/boot/{C1_MAC}.ipxe")
    assert status == 200
    status, _, body = fetch(impostor)
    assert status == 404, body
    assert not any(secret in body for secret in secrets_of(c1_data))
    agent.wait_log(
        f"10.84.0.52 asked for /metadata, but {impostor.mac} there never booted through Pixiebox"
    )

    # After a restart, the agent has forgotten what it learned from script URLs; the ARP cache
    # and the recorded boots still tell who is who, and the identities are the same.
    assert agent.stop() == 0
    agent.start()
    assert metadata_of(node) == node_data
    assert metadata_of(c1) == c1_data
