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
from pixiebox.core.inventory import Inventory
from pixiebox.core.urls import BootUrls
from pixiebox.events import Kind
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
    # Nor a group or zero MAC: no machine has one, so no identity is ever made for it.
    for bad in ("../../etc", "", "02:00:00:00:84", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01",
                "00:00:00:00:00:00"):  # fmt: skip
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
    path.write_text(f'[lab]\nname = "x"\n[{section}]\n{key} = "{value}"\n[network]\n')
    config, problems = check_config(path)
    assert config is None
    (problem,) = problems
    assert problem.loc == (section, key) and problem.line == 4
    assert value in problem.message


# --- the metadata answer, in process -------------------------------------------------------

RESERVED_IP = IPv4Address("10.84.0.31")
URLS = BootUrls(IPv4Address("10.84.0.2"))


@pytest.fixture
def arp(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The neighbour table the inventory reads (address -> MAC), instead of the test process's
    own ARP cache."""
    table: dict[str, str] = {}
    monkeypatch.setattr(
        inventory_module, "neighbour_mac", lambda ip, device=None: table.get(str(ip))
    )
    return table


@pytest.fixture
def lab(tmp_path: Path, arp: dict[str, str]) -> Iterator[Inventory]:
    token_file = tmp_path / "influx-token"
    token_file.write_text("influx-secret\n")
    config = LabConfig(
        lab={"domain": "lab.test"},
        network={"dns": ["10.84.0.254"], "subnet": "10.84.0.0/24"},
        boot={"ssh_keys": [USER_KEY, "  "]},
        kubernetes={"server": "https://10.84.0.2:6443"},
        telemetry={"url": "http://10.84.0.2:8086", "org": "home", "bucket": "lab",
                   "token_file": str(token_file)},
        machines=[{"name": "c1", "mac": MAC_A, "ip": str(RESERVED_IP)}],
    )  # fmt: skip
    store = StateStore(tmp_path / "state")
    arp[str(RESERVED_IP)] = MAC_A  # c1 is on the segment at its reserved address
    try:
        yield Inventory(config, store)
    finally:
        store.close()


def answer(
    inventory: Inventory, identities: IdentityStore | None, ip: str | None, token: str | None
) -> tuple[int, str, dict[str, str]]:
    response = asyncio.run(
        metadata_response(inventory, URLS, identities, IPv4Address(ip) if ip else None, token)
    )
    return response.status_code, bytes(response.body).decode(), dict(response.headers)


def refusals(inventory: Inventory, mac: str = "") -> list[dict[str, object]]:
    return [dict(e.fields) for e in inventory.lifecycle.events(mac) if e.kind == "secret.refused"]


def test_the_reserved_machine_gets_its_document(lab: Inventory, tmp_path: Path) -> None:
    identities = IdentityStore(tmp_path / "identity")
    token = lab.tokens.issue(MAC_A)
    status, body, headers = answer(lab, identities, str(RESERVED_IP), token)
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
    assert (sent.kind, sent.fields) == (
        Kind.METADATA_SENT,
        {"ip": str(RESERVED_IP), "secrets": "ssh-host-key,node-password,k3s-token,telemetry-token"},
    )


def test_the_boot_token_is_required_and_retired(lab: Inventory, tmp_path: Path) -> None:
    identities = IdentityStore(tmp_path / "identity")
    for token, reason in ((None, "no-token"), ("guessed", "bad-token")):
        status, body, _ = answer(lab, identities, str(RESERVED_IP), token)
        assert status == 401 and "BEGIN" not in body, body
        assert refusals(lab, MAC_A)[-1] == {"secret": "metadata", "ip": str(RESERVED_IP),
                                            "reason": reason, "seen_mac": MAC_A}  # fmt: skip
    first = lab.tokens.issue(MAC_A)
    second = lab.tokens.issue(MAC_A)  # the machine booted again: only the newest counts
    assert answer(lab, identities, str(RESERVED_IP), first)[0] == 401
    assert answer(lab, identities, str(RESERVED_IP), second)[0] == 200
    lab.tokens.retire(MAC_A)  # its OS phoned home
    assert answer(lab, identities, str(RESERVED_IP), second)[0] == 401
    # The same refusal again within a minute is not recorded twice.
    count = len(refusals(lab, MAC_A))
    answer(lab, identities, str(RESERVED_IP), second)
    assert len(refusals(lab, MAC_A)) == count


def test_an_unknown_machine_that_booted_gets_a_name_and_no_secrets(
    lab: Inventory, tmp_path: Path, arp: dict[str, str]
) -> None:
    identities = IdentityStore(tmp_path / "identity")
    ip = "10.84.0.60"
    arp[ip] = MAC_B
    status, _, _ = answer(lab, identities, ip, None)
    assert status == 404
    assert refusals(lab)[-1]["reason"] == "not-booted"
    # It fetched its script from that address, where the kernel's neighbour entry named it.
    lab.seen(MAC_B, None)
    token = lab.tokens.issue(MAC_B)
    status, body, _ = answer(lab, identities, ip, token)
    assert status == 200, body
    document = json.loads(body)
    assert document["name"] is None
    assert document["hostname"] == document["kubernetes"]["node_name"] == "node-020000008402"
    assert document["fqdn"] == "node-020000008402.lab.test"
    # Not enrolled: no node identity, no k3s token, no telemetry token, nothing made for it.
    assert document["ssh_host_key"] is None
    assert document["kubernetes"]["node_password"] is None
    assert document["kubernetes"]["token"] is None
    assert document["telemetry"]["token"] is None
    assert not (tmp_path / "identity" / MAC_B).exists()
    sent = [e for e in lab.lifecycle.events(MAC_B) if e.kind == Kind.METADATA_SENT]
    assert sent[-1].fields == {"ip": ip, "secrets": ""}


def test_unknown_machines_get_nothing_under_unknown_ignore(
    tmp_path: Path, arp: dict[str, str]
) -> None:
    config = LabConfig(boot={"unknown": "ignore"})
    store = StateStore(tmp_path / "state")
    arp["10.84.0.60"] = MAC_B
    try:
        inventory = Inventory(config, store)
        inventory.seen(MAC_B, None)
        token = inventory.tokens.issue(MAC_B)
        status, body, _ = answer(
            inventory, IdentityStore(tmp_path / "identity"), "10.84.0.60", token
        )
    finally:
        store.close()
    assert status == 404, body
    assert not (tmp_path / "identity").exists()


def test_no_address_or_no_store(lab: Inventory, tmp_path: Path) -> None:
    status, body, _ = answer(lab, None, str(RESERVED_IP), None)
    assert (status, body) == (503, "metadata is not configured\n")
    status, _, _ = answer(lab, IdentityStore(tmp_path / "identity"), None, None)
    assert status == 404


def test_the_neighbour_table_must_name_the_machine(
    lab: Inventory, tmp_path: Path, arp: dict[str, str]
) -> None:
    identities = IdentityStore(tmp_path / "identity")
    token = lab.tokens.issue(MAC_A)
    # Another machine on c1's reserved address: the reservation says who should be there, the
    # neighbour table who is. It is a machine that never booted here: nothing for it.
    arp[str(RESERVED_IP)] = MAC_B
    status, body, _ = answer(lab, identities, str(RESERVED_IP), token)
    assert status == 404 and "BEGIN" not in body
    assert not (tmp_path / "identity" / MAC_A).exists()
    # No neighbour entry at all (a routed source with a lab address cannot complete TCP).
    del arp[str(RESERVED_IP)]
    lab._neighbours.clear()
    assert answer(lab, identities, str(RESERVED_IP), token)[0] == 404
    # Outside the lab subnet: refused before anything is looked up.
    assert answer(lab, identities, "10.85.0.5", token)[0] == 404
    assert refusals(lab)[-1] == {"secret": "metadata", "ip": "10.85.0.5", "reason": "off-link"}
    arp[str(RESERVED_IP)] = MAC_A
    lab._neighbours.clear()
    assert answer(lab, identities, str(RESERVED_IP), token)[0] == 200


def test_an_unreadable_telemetry_token_is_null(lab: Inventory, tmp_path: Path) -> None:
    (tmp_path / "influx-token").unlink()
    token = lab.tokens.issue(MAC_A)
    status, body, _ = answer(lab, IdentityStore(tmp_path / "identity"), str(RESERVED_IP), token)
    assert status == 200
    assert json.loads(body)["telemetry"]["token"] is None


def test_a_damaged_identity_is_a_500_without_secrets(lab: Inventory, tmp_path: Path) -> None:
    root = tmp_path / "identity"
    IdentityStore(root).for_machine(MAC_A)
    (root / MAC_A / NODE_PASSWORD_FILE).write_text("garbage\n")
    token = lab.tokens.issue(MAC_A)
    status, body, _ = answer(lab, IdentityStore(root), str(RESERVED_IP), token)
    assert status == 500 and "garbage" not in body and "BEGIN" not in body


# --- a real agent ------------------------------------------------------------------------------

SUBNET = "10.84.0.0/24"
AGENT_IP = "10.84.0.2"
C1_MAC, C1_IP = "02:00:00:00:84:31", "10.84.0.31"
NODE_MAC = "02:00:00:00:84:07"
INFLUX_TOKEN = "influx-write-token-84"


def fetch(
    host: netlab.Host, path: str = "/metadata", token: str | None = None
) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of GET http://AGENT<path> from `host` (with a boot token)."""
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    raw = host.run(
        ["curl", "-sS", "-i", "--max-time", "10", *auth, f"http://{AGENT_IP}{path}"]
    ).stdout
    head, _, body = raw.replace("\r\n", "\n").partition("\n\n")
    status_line, *header_lines = head.split("\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def boot_token(host: netlab.Host, mac: str) -> str | None:
    """The pixiebox.token= of the iPXE script `host` gets for `mac` (None: the script has none)."""
    status, _, script = fetch(host, f"/boot/{mac}.ipxe")
    assert status == 200 and script.startswith("#!ipxe"), script
    found = re.search(r"pixiebox\.token=(\S+)", script)
    return found.group(1) if found else None


def metadata_of(host: netlab.Host, token: str | None) -> dict[str, Any]:
    status, headers, body = fetch(host, token=token)
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

    token = boot_token(c1, C1_MAC)
    assert token is not None
    first = metadata_of(c1, token)
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

    assert metadata_of(c1, token) == first  # the same on a second request

    # A host at another address gets a sentence, and none of c1's secrets, even with c1's token.
    stranger = segment.add_host("stranger", ip="10.84.0.77/24")
    status, headers, body = fetch(stranger, token=token)
    assert status == 404, body
    assert headers.get("cache-control") == "no-store"
    assert body.startswith("no machine is known at 10.84.0.77")
    assert not any(secret in body for secret in secrets_of(first))
    assert "ssh-ed25519" not in body
    assert re.search(r"WARNING refused metadata to 10\.84\.0\.77: that machine never booted",
                     agent.wait_log("refused metadata to 10.84.0.77"))  # fmt: skip

    # After a restart of the agent: the same host key, node password and agent token, and the
    # boot token of c1's current boot is still known (it was on disk before the script went).
    assert agent.stop() == 0
    agent.start()
    assert metadata_of(c1, token) == first


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

    c1_token, node_token = boot_token(c1, C1_MAC), boot_token(node, NODE_MAC)
    assert c1_token and node_token and c1_token != node_token
    c1_data = metadata_of(c1, c1_token)
    assert (c1_data["name"], c1_data["mac"], c1_data["ip"]) == ("c1", C1_MAC, "10.84.0.50")
    node_data = metadata_of(node, node_token)
    assert node_data["name"] is None
    assert (node_data["mac"], node_data["ip"]) == (NODE_MAC, "10.84.0.51")
    assert node_data["hostname"] == node_data["kubernetes"]["node_name"] == "node-020000008407"
    # Merely discovered: no node identity and no k3s agent token.
    assert node_data["ssh_host_key"] is None
    assert node_data["kubernetes"]["node_password"] is None
    assert node_data["kubernetes"]["token"] is None and node_data["telemetry"]["token"] is None
    assert c1_data["kubernetes"]["token"] == (workdir / "state" / "k3s-agent-token").read_text()
    agent.wait_log(f"unknown machine {NODE_MAC} (10.84.0.51) fetched its metadata (no secrets")
    # Each machine's token opens only its own metadata.
    assert fetch(node, token=c1_token)[0] == 401

    # Naming another machine's MAC in a script URL does not hand over its secrets: a named MAC
    # is no evidence of who is at an address; the kernel's neighbour entry is, and it names the
    # impostor, so its script carries no token and c1's state does not move.
    assert boot_token(impostor, C1_MAC) is None
    status, _, body = fetch(impostor, token=c1_token)
    assert status == 404, body
    assert not any(secret in body for secret in secrets_of(c1_data))
    agent.wait_log("refused c1's boot token to 10.84.0.52: the neighbour table names")

    # After a restart the identities are the same and the current boots' tokens still count.
    assert agent.stop() == 0
    agent.start()
    assert metadata_of(node, node_token) == node_data
    assert metadata_of(c1, c1_token) == c1_data
