"""`GET /metadata`: what a booted node needs to become itself, answered by its source address.

The OSIE fetches it once it is up (overlays/osie/usr/lib/pixiebox/pixiebox-osie): its name and
hostname, the SSH keys to let in, its own SSH host key and k3s node password (the same on every
boot, see identity.py), the k3s server to join and the lab's agent token, where to ship
telemetry and its journal, and which local disk to mount for persistent volumes.

Released only to its owner (core.trust, SECURITY.md): the request must come from the lab segment,
from the address the kernel's neighbour entry ties to that machine's MAC, and carry the boot
token of the machine's current boot (`Authorization: Bearer`, from the kernel command line of the
script this agent served it). A MAC merely named anywhere is no evidence. Secrets (its host key
and node password, the k3s agent token, the telemetry token) go only to enrolled machines; a
merely discovered one gets its generated name and the public parts. Every refusal is a
secret.refused event; every release a metadata.sent event listing the secrets sent.

The document (JSON):

    {"name": "c1" | null, "mac": "f4:4d:30:64:7a:3a", "hostname": "c1" | "node-f44d30647a3a",
     "domain": "lab.internal", "fqdn": "c1.lab.internal", "ip": "192.168.1.31", "lab": "homelab",
     "ssh_authorized_keys": ["ssh-ed25519 AAAA... me@laptop"],
     "ssh_host_key": {"private": "-----BEGIN OPENSSH PRIVATE KEY-----\\n...", "public": "ssh-..."}
                     | null (not enrolled),
     "kubernetes": {"server": "https://192.168.1.64:6443" | null,
                    "token": "<the lab's k3s agent token>" | null (null when server is null),
                    "node_name": "c1", "node_password": "<32 hex digits>" | null,
                    "node_labels": {"pixiebox.io/lab": "homelab"}},
     "telemetry": {"url": ... | null, "org": ... | null, "bucket": ... | null, "token": ... | null},
     "disk": {"path": "/dev/disk/by-id/...", "format": "never" | "if-blank",
              "mount": "/var/openebs/local"} | null,
     "appliance": {"url": "http://192.168.1.64", "dns": ["192.168.1.254"],
                   "syslog": {"host": "192.168.1.64", "port": 514}}}
"""

from __future__ import annotations

import asyncio
import logging
import re
from ipaddress import IPv4Address
from pathlib import Path

from starlette.responses import JSONResponse, PlainTextResponse, Response

from pixiebox.config import LabConfig, MachineSection
from pixiebox.core.decision import Silence
from pixiebox.core.inventory import Inventory
from pixiebox.core.trust import Refusal, Verdict
from pixiebox.core.urls import BootUrls
from pixiebox.events import Kind
from pixiebox.store.identity import IdentityError, IdentityStore, NodeIdentity
from pixiebox.syslog import SYSLOG_PORT

log = logging.getLogger("pixiebox.http.metadata")

_NO_STORE = {"Cache-Control": "no-store"}

JsonObject = dict[str, object]

#: Where the OSIE mounts a machine's data disk: the default base path of OpenEBS LocalPV
#: hostpath volumes, so a StorageClass needs no extra setting.
OPENEBS_HOSTPATH = "/var/openebs/local"
#: The node label that names the lab a node belongs to.
LAB_LABEL = "pixiebox.io/lab"

_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def label_value(text: str) -> str:
    """`text` as a Kubernetes label value: at most 63 of [A-Za-z0-9_.-], starting and ending
    alphanumeric (a lab named "My Lab" is labelled "My-Lab"); "" when nothing is left."""
    value = _LABEL_UNSAFE.sub("-", text.strip())
    value = re.sub(r"^[^A-Za-z0-9]+", "", value)[:63]
    return re.sub(r"[^A-Za-z0-9]+$", "", value)


def hostname_for(mac: str, machine: MachineSection | None) -> str:
    """The enrolled name, else `node-<mac without colons>` (a valid DNS label either way)."""
    return machine.name if machine is not None else "node-" + mac.replace(":", "")


def read_token(path: Path | None) -> str | None:
    """The telemetry token from [telemetry] token_file; None when unset or unreadable."""
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        log.warning(
            "[telemetry] token_file %s cannot be read (%s); the nodes get no telemetry token",
            path,
            getattr(exc, "strerror", None) or exc,
        )
        return None
    return token or None


def build_metadata(
    config: LabConfig,
    urls: BootUrls,
    mac: str,
    ip: IPv4Address,
    machine: MachineSection | None,
    identity: NodeIdentity | None,
    agent_token: str | None = None,
    power_key: str | None = None,
    telemetry_token: str | None = None,
) -> JsonObject:
    """The metadata document of the machine `mac` at `ip` (see the module docstring).
    `identity` is None for a machine that is not enrolled (it gets no node identity);
    `agent_token` is the lab's k3s agent token, given when [kubernetes] server is set;
    `power_key` the appliance's power SSH key (the ssh power driver logs in with it)."""
    hostname = hostname_for(mac, machine)
    domain = config.lab.domain
    telemetry = config.telemetry
    server = config.kubernetes.server
    lab = label_value(config.lab.name)
    disk: JsonObject | None = None
    if machine is not None and machine.disk is not None:
        disk = {"path": machine.disk, "format": machine.format, "mount": OPENEBS_HOSTPATH}
    return {
        "name": machine.name if machine is not None else None,
        "mac": mac,
        "hostname": hostname,
        "domain": domain,
        "fqdn": f"{hostname}.{domain}" if domain else hostname,
        "ip": str(ip),
        "lab": config.lab.name,
        "ssh_authorized_keys": [key.strip() for key in config.boot.ssh_keys if key.strip()]
        + ([power_key] if power_key else []),
        "ssh_host_key": None
        if identity is None
        else {"private": identity.ssh_host_key, "public": identity.ssh_host_public},
        "kubernetes": {
            "server": server,
            "token": agent_token if server is not None else None,
            "node_name": hostname,
            "node_password": None if identity is None else identity.node_password,
            "node_labels": {LAB_LABEL: lab} if lab else {},
        },
        "telemetry": {
            "url": telemetry.url,
            "org": telemetry.org,
            "bucket": telemetry.bucket,
            "token": telemetry_token,
        },
        "disk": disk,
        "appliance": {
            "url": urls.base,
            "dns": [str(address) for address in config.network.dns],
            "syslog": {"host": str(urls.server_ip), "port": SYSLOG_PORT},
        },
    }


def _refuse(status: int, text: str) -> Response:
    return PlainTextResponse(text + "\n", status, headers=_NO_STORE)


def secrets_in(document: JsonObject) -> list[str]:
    """The names of the secrets a metadata document holds (the metadata.sent event's list)."""
    kubernetes = document["kubernetes"]
    telemetry = document["telemetry"]
    assert isinstance(kubernetes, dict) and isinstance(telemetry, dict)
    held = {
        "ssh-host-key": document["ssh_host_key"] is not None,
        "node-password": kubernetes["node_password"] is not None,
        "k3s-token": kubernetes["token"] is not None,
        "telemetry-token": telemetry["token"] is not None,
    }
    return [name for name, present in held.items() if present]


def _not_known(ip: IPv4Address) -> Response:
    return _refuse(
        404,
        f"no machine is known at {ip}: metadata is served only to a machine that booted "
        "through Pixiebox, asking from its own address on the lab segment",
    )


async def metadata_response(
    inventory: Inventory,
    urls: BootUrls,
    identities: IdentityStore | None,
    ip: IPv4Address | None,
    token: str | None = None,
) -> Response:
    """The answer to `GET /metadata` from `ip` with the boot `token`: its own document, or
    404 / 401 / 503 (see the module docstring)."""
    if identities is None:
        return _refuse(503, "metadata is not configured")
    if ip is None:
        log.warning("a client without an IPv4 address asked for /metadata; answered 404")
        return _refuse(404, "cannot tell which machine is asking: no IPv4 source address")
    verdict = inventory.prove(ip)
    mac = verdict.mac
    if mac is None:
        inventory.refuse(None, "metadata", ip, verdict)
        return _not_known(ip)
    decision = inventory.decide(mac, None)
    # Not enrolled: answer only a machine that booted through Pixiebox (any other device on the
    # LAN has a neighbour entry too, but no business with a node's metadata).
    if not decision.known and (
        not inventory.knows(mac) or decision.silent is Silence.UNKNOWN_IGNORED
    ):
        inventory.refuse(None, "metadata", ip, Verdict(None, Refusal.NOT_BOOTED, mac))
        return _not_known(ip)
    refusal = inventory.tokens.check(mac, token)
    if refusal is not None:
        sentence = inventory.refuse(mac, "metadata", ip, Verdict(None, refusal, mac))
        return _refuse(
            401,
            f"{sentence}: metadata is handed out once per boot, to the machine this appliance "
            "booted, with the pixiebox.token= of its kernel command line (reboot it through "
            "Pixiebox)",
        )
    config = inventory.config
    enrolled = decision.known
    joins = config.kubernetes.server is not None and enrolled

    def identity_and_tokens() -> tuple[NodeIdentity | None, str | None, str | None]:
        if not enrolled:
            return None, None, None
        return (
            identities.for_machine(mac),
            identities.agent_token() if joins else None,
            read_token(config.telemetry.token_file),
        )

    def power_key() -> str | None:
        # Beside the identities, in [state] dir: made on first use, like the host keys.
        # Imported here: asyncssh takes a quarter of a second to import, which the agent's
        # start (DHCP must answer within 1.5 s of it) should not pay for a first metadata call.
        from pixiebox.power.ssh import power_public_key

        try:
            return power_public_key(identities.root.parent)
        except OSError as exc:
            log.error("the nodes cannot be powered off over SSH: %s", exc)
            return None

    try:
        # The first request makes a key and fsyncs files: off the event loop.
        identity, agent_token, telemetry_token = await asyncio.to_thread(identity_and_tokens)
        ssh_power_key = await asyncio.to_thread(power_key)
    except IdentityError as exc:
        log.error("cannot give %s its metadata: %s", inventory.describe_address(ip), exc)
        return _refuse(500, "this machine's stored identity cannot be read; see the appliance log")
    document = build_metadata(
        config, urls, mac, ip, inventory.who_is(mac), identity, agent_token, ssh_power_key,
        telemetry_token,
    )  # fmt: skip
    secrets = secrets_in(document)
    who = inventory.describe_address(ip)
    sent = ", ".join(secrets) if secrets else "no secrets (not enrolled)"
    log.info("%s fetched its metadata (%s)", who, sent)
    inventory.record(
        mac, Kind.METADATA_SENT, f"fetched its metadata: {sent}", ip,
        {"ip": str(ip), "secrets": ",".join(secrets)},
    )  # fmt: skip
    return JSONResponse(document, headers=_NO_STORE)
