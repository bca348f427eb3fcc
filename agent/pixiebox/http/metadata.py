"""`GET /metadata`: what a booted node needs to become itself, answered by its source address.

The OSIE fetches it once it is up (overlays/osie/usr/lib/pixiebox/pixiebox-osie): its name and
hostname, the SSH keys to let in, its own SSH host key and k3s node password (the same on every
boot, see identity.py), the k3s server to join and the lab's agent token, where to ship
telemetry and its journal, and which local disk to mount for persistent volumes. A machine is
known by the address it asks from, by the address evidence (core.evidence: its reservation, its
lease, its DHCP request, the neighbour entry seen when it fetched its script, or the ARP cache),
never by a MAC it merely named (anyone can fetch /boot/<another mac>.ipxe); where the ARP cache
knows that address it must name the same MAC. So a machine gets only its own secrets: an
address that maps to no machine that booted through Pixiebox gets a 404 and nothing else.

The document (JSON):

    {"name": "c1" | null, "mac": "f4:4d:30:64:7a:3a", "hostname": "c1" | "node-f44d30647a3a",
     "domain": "lab.internal", "fqdn": "c1.lab.internal", "ip": "192.168.1.31", "lab": "homelab",
     "ssh_authorized_keys": ["ssh-ed25519 AAAA... me@laptop"],
     "ssh_host_key": {"private": "-----BEGIN OPENSSH PRIVATE KEY-----\\n...", "public": "ssh-..."},
     "kubernetes": {"server": "https://192.168.1.64:6443" | null,
                    "token": "<the lab's k3s agent token>" | null (null when server is null),
                    "node_name": "c1", "node_password": "<32 hex digits>",
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
from pixiebox.core.urls import BootUrls
from pixiebox.events import Kind
from pixiebox.net.netif import neighbour_mac
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
    identity: NodeIdentity,
    agent_token: str | None = None,
    power_key: str | None = None,
) -> JsonObject:
    """The metadata document of the machine `mac` at `ip` (see the module docstring).
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
        "ssh_host_key": {"private": identity.ssh_host_key, "public": identity.ssh_host_public},
        "kubernetes": {
            "server": server,
            "token": agent_token if server is not None else None,
            "node_name": hostname,
            "node_password": identity.node_password,
            "node_labels": {LAB_LABEL: lab} if lab else {},
        },
        "telemetry": {
            "url": telemetry.url,
            "org": telemetry.org,
            "bucket": telemetry.bucket,
            "token": read_token(telemetry.token_file),
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


def _machine_at(inventory: Inventory, ip: IPv4Address) -> tuple[str | None, str]:
    """(MAC of the machine asking from `ip`, or None with the reason for the log)."""
    mac = inventory.mac_at(ip)
    if mac is None:
        return None, "no machine is known at that address"
    # A reservation only says which MAC *should* be there, and what was learned may be old; on
    # the lab's own segment the kernel saw who really sent this request.
    seen = neighbour_mac(str(ip))
    if seen is not None and seen != mac:
        return None, (
            f"it is {inventory.name_of(mac)}'s address, yet the ARP cache says {seen} sent "
            "the request (a machine on another's address)"
        )
    decision = inventory.decide(mac, None)
    if decision.known:
        return mac, ""
    # Not enrolled: answer only a machine that booted through Pixiebox (any other device on the
    # LAN has a MAC in the ARP cache too, but no business with a node identity).
    if mac not in inventory.lifecycle.records():
        return None, f"{mac} there never booted through Pixiebox"
    if decision.silent is Silence.UNKNOWN_IGNORED:
        return None, f'unknown machine {mac} there is not booted ([boot] unknown = "ignore")'
    return mac, ""


async def metadata_response(
    inventory: Inventory,
    urls: BootUrls,
    identities: IdentityStore | None,
    ip: IPv4Address | None,
) -> Response:
    """The answer to `GET /metadata` from `ip`: its own document, 404 or 503."""
    if identities is None:
        return _refuse(503, "metadata is not configured")
    if ip is None:
        log.warning("a client without an IPv4 address asked for /metadata; answered 404")
        return _refuse(404, "cannot tell which machine is asking: no IPv4 source address")
    mac, reason = _machine_at(inventory, ip)
    if mac is None:
        log.warning("%s asked for /metadata, but %s; answered 404", ip, reason)
        return _refuse(
            404,
            f"no machine is known at {ip}: metadata is served only to a machine that booted "
            "through Pixiebox, asking from its own address",
        )
    config = inventory.config
    joins = config.kubernetes.server is not None

    def identity_and_token() -> tuple[NodeIdentity, str | None]:
        return identities.for_machine(mac), identities.agent_token() if joins else None

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
        identity, agent_token = await asyncio.to_thread(identity_and_token)
        ssh_power_key = await asyncio.to_thread(power_key)
    except IdentityError as exc:
        log.error("cannot give %s its metadata: %s", inventory.describe_address(ip), exc)
        return _refuse(500, "this machine's stored identity cannot be read; see the appliance log")
    document = build_metadata(
        config, urls, mac, ip, inventory.who_is(mac), identity, agent_token, ssh_power_key
    )
    who = inventory.describe_address(ip)
    log.info("%s fetched its metadata", who)
    inventory.record(mac, Kind.METADATA_SENT, "fetched its metadata", ip, {"ip": str(ip)})
    return JSONResponse(document, headers=_NO_STORE)
