"""Test peers on top of the virtual lab (pixiebox.virtlab.netns): ISC dhclient and a scapy
PXE client, run inside a segment's namespaces.  The segment machinery itself is re-exported
here so tests keep one import.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixiebox.virtlab.netns import (  # noqa: F401  (re-exported for the tests)
    BRIDGE,
    COMMAND_TIMEOUT,
    IFACE,
    KILL_GRACE,
    NS_PREFIX,
    RUN_PREFIX,
    CommandError,
    Host,
    Segment,
    _tail,
    _tool,
    delete_namespaces,
    kill_process_group,
    leftover_namespaces,
    list_namespaces,
    namespace_pids,
    prerequisite_problem,
    run_command,
    start_dnsmasq_router,
    wait_until,
)

TESTS_DIR = Path(__file__).resolve().parent
PXECLIENT = TESTS_DIR / "pxeclient.py"
DHCLIENT_SCRIPT = TESTS_DIR / "dhclient-script.sh"
_LEASE_REASONS = frozenset({"BOUND", "RENEW", "REBIND", "REBOOT"})

# --------------------------------------------------------------------------- dhclient


@dataclass(frozen=True)
class Lease:
    """A lease as reported to the dhclient script."""

    ip: str
    subnet_mask: str | None
    server_id: str | None
    router: str | None
    dns: tuple[str, ...]
    lease_time: int | None
    domain: str | None
    hostname: str | None
    reason: str = "BOUND"
    next_server: str | None = None
    filename: str | None = None

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.ip}/{self.subnet_mask or '255.255.255.255'}")

    @property
    def cidr(self) -> str:
        return self.interface.with_prefixlen

    @classmethod
    def from_event(cls, event: Mapping[str, str]) -> Lease:
        def opt(key: str) -> str | None:
            return event.get(key) or None

        lease_time = opt("new_dhcp_lease_time")
        return cls(
            ip=event["new_ip_address"],
            subnet_mask=opt("new_subnet_mask"),
            server_id=opt("new_dhcp_server_identifier"),
            router=(opt("new_routers") or "").split()[0] if opt("new_routers") else None,
            dns=tuple((event.get("new_domain_name_servers") or "").split()),
            lease_time=int(lease_time) if lease_time else None,
            domain=opt("new_domain_name"),
            hostname=opt("new_host_name"),
            reason=event.get("reason", ""),
            next_server=opt("new_next_server"),
            filename=opt("new_filename"),
        )


def read_dhclient_events(path: Path | str) -> list[dict[str, str]]:
    """Events written by dhclient-script.sh, one dict per script invocation."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # drop a possibly incomplete last line
    return [json.loads(line) for line in lines if line.strip()]


def wait_dhclient_event(
    events_path: Path | str,
    reasons: Iterable[str] = _LEASE_REASONS,
    timeout: float = 20.0,
    *,
    after: int = 0,
    proc: subprocess.Popen[Any] | None = None,
) -> dict[str, str]:
    """Wait for an event with one of ``reasons`` at index >= ``after``; return it.

    If ``proc`` (the dhclient) exits first, raises AssertionError.
    """
    wanted = frozenset(reasons)

    def find() -> dict[str, str] | None:
        events = read_dhclient_events(events_path)
        for event in events[after:]:
            if event.get("reason") in wanted:
                return event
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"dhclient exited ({proc.returncode}) before {sorted(wanted)}")
        return None

    return wait_until(find, timeout, 0.1, f"dhclient event {sorted(wanted)} in {events_path}")


def _dhclient_script(workdir: Path) -> Path:
    if os.access(DHCLIENT_SCRIPT, os.X_OK):
        return DHCLIENT_SCRIPT
    copy = workdir / DHCLIENT_SCRIPT.name  # mode bit lost (e.g. checkout): use a copy
    shutil.copyfile(DHCLIENT_SCRIPT, copy)
    copy.chmod(copy.stat().st_mode | stat.S_IXUSR | stat.S_IRUSR)
    return copy


def dhclient_events_path(host: Host, workdir: Path | str) -> Path:
    """Where dhclient-script.sh writes ``host``'s events (one JSON object per line)."""
    return Path(workdir) / f"dhclient-{host.role}.events.jsonl"


def _start_dhclient(
    host: Host, workdir: Path, *, once: bool
) -> tuple[subprocess.Popen[bytes], Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    stem = f"dhclient-{host.role}"
    conf = workdir / f"{stem}.conf"
    # Our own config so the host's /etc/dhcp/dhclient.conf plays no part.
    conf.write_text(
        "initial-interval 2;\n"
        "backoff-cutoff 4;\n"
        "request subnet-mask, broadcast-address, time-offset, routers,\n"
        "        domain-name, domain-name-servers, host-name;\n"
    )
    events = dhclient_events_path(host, workdir)
    argv = [
        _tool("dhclient"),
        "-4",
        *(["-1"] if once else []),
        "-d",
        "-v",
        "-cf", str(conf),
        "-sf", str(_dhclient_script(workdir)),
        "-lf", str(workdir / f"{stem}.leases"),
        "-pf", str(workdir / f"{stem}.pid"),
        "-e", f"PIXIEBOX_EVENTS={events}",
        host.iface,
    ]  # fmt: skip
    proc = host.popen(argv, host.log_path("dhclient"))
    return proc, events


def run_dhclient(host: Host, workdir: Path | str, timeout: float = 20.0) -> Lease:
    """Run ISC dhclient once until it has a lease, stop it, return the lease.

    The address stays configured on ``eth0`` (dhclient exits silently on SIGTERM).
    """
    already = len(read_dhclient_events(dhclient_events_path(host, workdir)))
    proc, events = _start_dhclient(host, Path(workdir), once=True)
    try:
        event = wait_dhclient_event(events, _LEASE_REASONS, timeout, after=already, proc=proc)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_tail(host.segment.log_of(proc))}") from None
    finally:
        host.segment.stop(proc)
    return Lease.from_event(event)


def start_dhclient_daemon(host: Host, workdir: Path | str) -> tuple[subprocess.Popen[bytes], Path]:
    """Start dhclient in the foreground, renewing forever; returns (process, events file)."""
    return _start_dhclient(host, Path(workdir), once=False)


# --------------------------------------------------------------------------- PXE client


@dataclass(frozen=True)
class Reply:
    """A BOOTREPLY captured by pxeclient.py."""

    src_ip: str
    src_mac: str
    src_port: int
    dst_ip: str
    dst_mac: str
    dst_port: int
    xid: int
    flags: int
    ciaddr: str
    yiaddr: str
    siaddr: str
    giaddr: str
    sname: str
    file: str
    options: dict[int, str] = field(default_factory=dict)
    message_type: int = 0  # 0: no option 53 (plain BOOTP)

    def option(self, code: int) -> bytes | None:
        value = self.options.get(code)
        return None if value is None else bytes.fromhex(value)

    @property
    def boot_file(self) -> str:
        """The boot file: the ``file`` field, else option 67.

        dnsmasq puts the boot file in option 67 (and leaves ``file`` empty) when the
        client lists 67 in its parameter request list, as PXE ROMs do.
        """
        return self.file or (self.option_text(67) or "")

    def option_text(self, code: int) -> str | None:
        value = self.option(code)
        return None if value is None else value.rstrip(b"\0").decode("utf-8", "replace")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reply:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["options"] = {int(k): str(v) for k, v in data["options"].items()}
        return cls(**values)


DHCPOFFER = 2
DHCPACK = 5


def _pxe_args(
    host: Host,
    arch: int,
    uuid: bytes | None,
    user_class: str | None,
    vendor_class: str | None,
    timeout: float,
    mac: str | None,
    params: Sequence[int] | None,
    extra_options: Mapping[int, bytes],
) -> list[str]:
    if not 0 <= arch <= 0xFFFF:
        raise ValueError(f"arch out of range: {arch}")
    if uuid is not None and len(uuid) != 16:
        raise ValueError("uuid must be 16 bytes")
    args = [
        "--iface", host.iface,
        "--mac", (mac or host.mac).lower(),
        "--arch", str(arch),
        "--vendor-class", vendor_class or f"PXEClient:Arch:{arch:05d}:UNDI:003016",
        "--timeout", str(timeout),
    ]  # fmt: skip
    if uuid is not None:
        args += ["--uuid", uuid.hex()]
    if user_class is not None:
        args += ["--user-class", user_class]
    if params is not None:
        args += ["--params", ",".join(str(int(c)) for c in params)]
    for code, value in extra_options.items():
        args += ["--option", f"{int(code)}:{bytes(value).hex()}"]
    return args


def _run_pxeclient(host: Host, args: list[str], timeout: float) -> list[Reply]:
    result = host.run([sys.executable, str(PXECLIENT), *args], timeout=timeout + 30.0)
    data = json.loads(result.stdout)
    return [Reply.from_json(r) for r in data["replies"]]


def pxe_discover(
    host: Host,
    *,
    arch: int,
    uuid: bytes | None,
    user_class: str | None = None,
    vendor_class: str | None = None,
    timeout: float = 3.0,
    mac: str | None = None,
    params: Sequence[int] | None = None,
    extra_options: Mapping[int, bytes] | None = None,
) -> list[Reply]:
    """Broadcast one PXE DHCPDISCOVER from ``host`` and return all replies for its xid.

    Sent from 0.0.0.0:68 to 255.255.255.255:67 with the broadcast flag and options
    53, 55 (``params``, default: a PXE ROM's list incl. 66/67), 57, 60, 93, 94, 97
    (if ``uuid``), 77 (if ``user_class``; raw like iPXE) and ``extra_options``.
    Replies are collected for ``timeout`` seconds.
    """
    args = _pxe_args(
        host, arch, uuid, user_class, vendor_class, timeout, mac, params, extra_options or {}
    )
    return _run_pxeclient(host, ["discover", *args], timeout)


def pxe_request_4011(
    host: Host,
    server_ip: str,
    *,
    arch: int,
    uuid: bytes | None,
    client_ip: str,
    user_class: str | None = None,
    vendor_class: str | None = None,
    timeout: float = 3.0,
    mac: str | None = None,
    server_port: int = 4011,
    src_port: int = 68,
    boot_item: tuple[int, int] | None = None,
    params: Sequence[int] | None = None,
    extra_options: Mapping[int, bytes] | None = None,
) -> list[Reply]:
    """Unicast a PXE DHCPREQUEST (ciaddr=client_ip) to server_ip:4011; return replies.

    ``client_ip`` must already be configured on the host's eth0.  ``boot_item``
    (type, layer) adds option 43 with PXE_BOOT_ITEM (71), as a PXE ROM does after a
    boot-menu choice; dnsmasq ignores 4011 requests without it.
    """
    args = _pxe_args(
        host, arch, uuid, user_class, vendor_class, timeout, mac, params, extra_options or {}
    )
    if boot_item is not None:
        args += ["--boot-item", f"{int(boot_item[0])}:{int(boot_item[1])}"]
    args += [
        "--client-ip", client_ip,
        "--server-ip", server_ip,
        "--server-port", str(server_port),
        "--src-port", str(src_port),
    ]  # fmt: skip
    return _run_pxeclient(host, ["request4011", *args], timeout)


__all__ = [
    "DHCPACK",
    "DHCPOFFER",
    "RUN_PREFIX",
    "CommandError",
    "Host",
    "Lease",
    "Reply",
    "Segment",
    "delete_namespaces",
    "dhclient_events_path",
    "kill_process_group",
    "leftover_namespaces",
    "list_namespaces",
    "prerequisite_problem",
    "pxe_discover",
    "pxe_request_4011",
    "read_dhclient_events",
    "run_command",
    "run_dhclient",
    "start_dhclient_daemon",
    "start_dnsmasq_router",
    "wait_dhclient_event",
    "wait_until",
]
