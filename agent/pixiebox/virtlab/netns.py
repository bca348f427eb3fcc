"""Virtual lab networks: isolated L2 segments built from network namespaces.

A :class:`Segment` is one isolated L2 network: a "switch" namespace holding a Linux
bridge, plus one namespace per :class:`Host`, each with a veth ``eth0`` whose peer is
enslaved to the bridge.  Nothing is created in the root namespace: the veth pair is
created inside the host namespace with its peer placed straight into the switch
namespace, so deleting the namespaces removes every link.  A host may also sit off the
bridge, on a veth pair to another host (:meth:`Segment.add_linked_host`): a second network of
that host, or a routed subnet behind a router (:meth:`Segment.add_routed_host`).

Programs (dnsmasq as a home router, the agent, QEMU machines) run inside the namespaces via
``ip netns exec``, each in its own session so that it can be killed as a process group.
:meth:`Segment.close` (also run from ``atexit``) kills tracked processes, then any other
process still living in one of the segment's namespaces, then deletes the namespaces.

The integration tests and ``pixiebox demo`` (the virtual lab) share this code, so the demo is
what the tests prove.  Requires root and a working ``ip netns``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import itertools
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

# Re-exported (``X as X``): the tests, the demo and the bench import them from here.
from pixiebox.virtlab.procs import COMMAND_TIMEOUT as COMMAND_TIMEOUT
from pixiebox.virtlab.procs import KILL_GRACE as KILL_GRACE
from pixiebox.virtlab.procs import CommandError as CommandError
from pixiebox.virtlab.procs import kill_process_group as kill_process_group
from pixiebox.virtlab.procs import run_command as run_command
from pixiebox.virtlab.procs import tail as _tail
from pixiebox.virtlab.procs import tool as _tool
from pixiebox.virtlab.procs import wait_until as wait_until

NS_PREFIX = "pxb"
#: Prefix of every namespace created by this process (unique per test run).
RUN_PREFIX = f"{NS_PREFIX}{os.getpid()}-"
IFACE = "eth0"
BRIDGE = "br0"
#: A router's link to the host behind it (Segment.add_routed_host); one per router namespace.
ROUTED_IFACE = "eth1"

_ROLE_RE = re.compile(r"[a-z][a-z0-9]{0,9}")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    return run_command(argv, check=check)


def _sysctl(ns: str, *assignments: str) -> None:
    run_command(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *assignments])


# --------------------------------------------------------------------------- namespaces


def list_namespaces() -> list[str]:
    """Names of all network namespaces known to ``ip netns``."""
    out = run_command(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(ns: str) -> list[int]:
    result = run_command(["ip", "netns", "pids", ns], check=False)
    return [int(tok) for tok in result.stdout.split() if tok.isdigit()]


def _kill_namespace_processes(ns: str, grace: float = KILL_GRACE) -> None:
    """Kill every process whose network namespace is ``ns`` (all started by us)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = namespace_pids(ns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not namespace_pids(ns), grace, 0.1, f"processes in {ns}")


def delete_namespaces(names: Iterable[str]) -> list[str]:
    """Kill processes in and delete the given namespaces; return error descriptions."""
    errors: list[str] = []
    existing = set(list_namespaces())
    for ns in names:
        if ns not in existing:
            continue
        try:
            _kill_namespace_processes(ns)
            run_command(["ip", "netns", "del", ns])
        except (subprocess.SubprocessError, OSError) as exc:
            errors.append(f"{ns}: {exc}")
    return errors


def leftover_namespaces(prefix: str = RUN_PREFIX) -> list[str]:
    """Namespaces whose names start with ``prefix`` (default: this run's)."""
    return [ns for ns in list_namespaces() if ns.startswith(prefix)]


def prerequisite_problem(tools: Sequence[str] = ()) -> str | None:
    """Why this lab cannot run here (None if it can): root, ``ip netns``, ``tools``."""
    if os.geteuid() != 0:
        return "netlab needs root (network namespaces)"
    for tool in ("ip", "bridge", *tools):
        try:
            _tool(tool)
        except FileNotFoundError:
            return f"netlab needs {tool!r} (not found on PATH or in /usr/sbin)"
    return _netns_problem()


@functools.cache
def _netns_problem() -> str | None:
    """Probe once per process: can we add and delete a namespace?"""
    probe = f"{RUN_PREFIX}probe"
    try:
        if probe not in list_namespaces():
            run_command(["ip", "netns", "add", probe])
        run_command(["ip", "netns", "del", probe])
    except (subprocess.SubprocessError, OSError) as exc:
        return f"'ip netns' is unavailable: {exc}"
    return None


# --------------------------------------------------------------------------- segment


def _check_link_subnet(subnet: str) -> ipaddress.IPv4Network:
    network = ipaddress.IPv4Network(subnet)
    if network.prefixlen > 29:
        raise ValueError(f"subnet {subnet!r} is too small: need at least a /29")
    return network


@dataclass
class _Tracked:
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path
    ns: str


_LIVE_SEGMENTS: list[Segment] = []
_SEGMENT_IDS = itertools.count(1)


@dataclass(eq=False)
class Host:
    """One namespace attached to a segment through ``eth0``."""

    segment: Segment
    role: str
    name: str
    mac: str
    iface: str = IFACE

    def run(
        self,
        argv: Sequence[str],
        timeout: float = 30.0,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this namespace (captured, text mode, bounded)."""
        return run_command(
            ["ip", "netns", "exec", self.name, *argv], timeout=timeout, check=check, input=input
        )

    def popen(
        self,
        argv: Sequence[str],
        log_path: Path | str,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in this namespace, in a new session, output to ``log_path``.

        The process is tracked and killed (as a group) when the segment closes.
        """
        return self.segment._popen(self, argv, Path(log_path), env)

    def addresses(self) -> list[str]:
        """IPv4 addresses on ``iface`` as CIDR strings."""
        out = _ip("-j", "-4", "addr", "show", "dev", self.iface, ns=self.name).stdout
        addrs: list[str] = []
        for link in json.loads(out or "[]"):
            for info in link.get("addr_info", []):
                if info.get("family") == "inet":
                    addrs.append(f"{info['local']}/{info['prefixlen']}")
        return addrs

    def add_address(self, cidr: str) -> None:
        ipaddress.IPv4Interface(cidr)  # validate
        _ip("addr", "add", cidr, "dev", self.iface, ns=self.name)

    def flush_addresses(self) -> None:
        _ip("-4", "addr", "flush", "dev", self.iface, ns=self.name)

    def add_route(self, cidr: str, via: str) -> None:
        """Route ``cidr`` through the gateway ``via`` (an address on this host's link).

        A segment host that must answer a routed host (:meth:`Segment.add_routed_host`) needs
        this return route; the lab's namespaces have no default route.
        """
        network = ipaddress.IPv4Network(cidr)
        ipaddress.IPv4Address(via)
        _ip("route", "add", str(network), "via", via, ns=self.name)

    def log_path(self, stem: str) -> Path:
        """A fresh log path for this host in the segment's log directory."""
        return self.segment.new_path(f"{self.role}-{stem}", ".log")


class Segment:
    """One L2 network: a bridge in a switch namespace plus host namespaces."""

    def __init__(self, workdir: Path | str) -> None:
        self.workdir = Path(workdir)
        self.logdir = self.workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []
        self._tracked: list[_Tracked] = []
        self._paths = itertools.count(1)
        self._closed = False
        _LIVE_SEGMENTS.append(self)
        try:
            self.id, switch_ns = self._create_switch_namespace()
            self.switch = Host(self, "sw", switch_ns, "", iface=BRIDGE)
            self._setup_switch()
        except BaseException:
            self.close()
            raise

    # -- construction -------------------------------------------------------------

    def _create_switch_namespace(self) -> tuple[str, str]:
        existing = set(list_namespaces())
        for _ in range(100):
            seg_id = f"{RUN_PREFIX}{next(_SEGMENT_IDS)}"
            ns = f"{seg_id}-sw"
            if ns in existing or any(n.startswith(f"{seg_id}-") for n in existing):
                continue
            self._add_namespace(ns)
            return seg_id, ns
        raise RuntimeError("could not find a free segment name")

    def _add_namespace(self, ns: str) -> None:
        run_command(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        _ip("link", "set", "lo", "up", ns=ns)

    def _setup_switch(self) -> None:
        ns = self.switch.name
        with contextlib.suppress(subprocess.SubprocessError):
            # Only exists when br_netfilter is loaded; keep bridged frames out of netfilter.
            _sysctl(
                ns, "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-arptables=0"
            )
        _ip(
            "link", "add", BRIDGE, "type", "bridge",
            "forward_delay", "0", "stp_state", "0", "mcast_snooping", "0",
            ns=ns,
        )  # fmt: skip
        _ip("link", "set", BRIDGE, "up", ns=ns)
        self.switch.mac = self._link_mac(ns, BRIDGE)

    @staticmethod
    def _link_mac(ns: str, link: str) -> str:
        info = json.loads(_ip("-j", "link", "show", "dev", link, ns=ns).stdout)
        return str(info[0]["address"])

    def add_host(self, role: str, mac: str | None = None, ip: str | None = None) -> Host:
        """Create namespace ``<segment>-<role>`` with ``lo`` up and ``eth0`` on the bridge."""
        self._check_open()
        self._check_role(role)
        if mac is not None:
            mac = mac.lower()
            if not _MAC_RE.fullmatch(mac):
                raise ValueError(f"bad MAC {mac!r}")
        if ip is not None:
            ipaddress.IPv4Interface(ip)
        ns = f"{self.id}-{role}"
        peer = f"v{len(self.hosts)}{role}"[:15]
        self._add_namespace(ns)
        addr_args = ["address", mac] if mac else []
        _ip(
            "link", "add", IFACE, *addr_args, "type", "veth",
            "peer", "name", peer, "netns", self.switch.name,
            ns=ns,
        )  # fmt: skip
        _ip("link", "set", peer, "master", BRIDGE, "up", ns=self.switch.name)
        _ip("link", "set", IFACE, "up", ns=ns)
        host = Host(self, role, ns, self._link_mac(ns, IFACE))
        self.hosts.append(host)
        if ip is not None:
            host.add_address(ip)
        wait_until(
            lambda: self._link_ready(ns, peer), 5.0, 0.05, f"{ns}: eth0 up and bridge forwarding"
        )
        return host

    def _check_role(self, role: str) -> None:
        if not _ROLE_RE.fullmatch(role) or role == "sw":
            raise ValueError(f"role must match {_ROLE_RE.pattern} and not be 'sw': {role!r}")
        if any(h.role == role for h in self.hosts):
            raise ValueError(f"role {role!r} already used in this segment")

    def add_routed_host(
        self, router_role: str, host_role: str, router_ip: str, subnet: str
    ) -> tuple[Host, Host]:
        """A host one IPv4 hop away from the segment, behind a router; returns (router, host).

        This is what an off-link source looks like to the agent: its packets arrive from the
        router's MAC, and no neighbour entry on the segment names its address, so evidence
        from the neighbour table must never cover it.  The router is an ordinary segment host
        (namespace ``<segment>-<router_role>``, ``eth0`` on the bridge with ``router_ip``,
        e.g. "10.84.0.254/24") that forwards IPv4; the host is :meth:`add_linked_host` behind
        it (``subnet`` "10.85.0.0/24": the router's ``eth1`` 10.85.0.1, the host 10.85.0.5).
        Segment hosts that must answer it need the return route:
        ``agent.add_route("10.85.0.0/24", via="10.84.0.254")``.  Both namespaces are removed
        by :meth:`close`.
        """
        self._check_open()
        self._check_role(host_role)
        if host_role == router_role:
            raise ValueError(f"router and host need different roles: {host_role!r}")
        _check_link_subnet(subnet)
        router = self.add_host(router_role, ip=router_ip)
        _sysctl(router.name, "net.ipv4.ip_forward=1")
        return router, self.add_linked_host(router, host_role, subnet)

    def add_linked_host(
        self, gateway: Host, role: str, subnet: str, gateway_iface: str = ROUTED_IFACE
    ) -> Host:
        """Namespace ``<segment>-<role>`` joined to ``gateway`` by a veth pair outside the
        bridge: a second network of ``gateway`` (a routed subnet behind a router, a management
        LAN beside the agent's lab interface).  ``gateway_iface`` (in ``gateway``, at most 15
        characters, unused there) gets the first address of ``subnet``; the new host's
        ``eth0`` the fifth, with a default route via the first.  ``gateway`` forwards nothing
        unless told to (``add_routed_host`` does).  Removed by :meth:`close`.
        """
        self._check_open()
        self._check_role(role)
        network = _check_link_subnet(subnet)
        near, far = network[1], network[5]
        ns = f"{self.id}-{role}"
        self._add_namespace(ns)
        _ip(
            "link", "add", IFACE, "type", "veth",
            "peer", "name", gateway_iface, "netns", gateway.name,
            ns=ns,
        )  # fmt: skip
        prefix = network.prefixlen
        _ip("addr", "add", f"{near}/{prefix}", "dev", gateway_iface, ns=gateway.name)
        _ip("link", "set", gateway_iface, "up", ns=gateway.name)
        _ip("addr", "add", f"{far}/{prefix}", "dev", IFACE, ns=ns)
        _ip("link", "set", IFACE, "up", ns=ns)
        _ip("route", "add", "default", "via", str(near), ns=ns)
        host = Host(self, role, ns, self._link_mac(ns, IFACE))
        self.hosts.append(host)
        wait_until(
            lambda: (
                self._operstate(ns, IFACE) == "UP" == self._operstate(gateway.name, gateway_iface)
            ),
            5.0,
            0.05,
            f"{ns}: veth to {gateway.name} up",
        )
        return host

    @staticmethod
    def _operstate(ns: str, link: str) -> str:
        return str(json.loads(_ip("-j", "link", "show", "dev", link, ns=ns).stdout)[0]["operstate"])

    def _link_ready(self, ns: str, peer: str) -> bool:
        link = json.loads(_ip("-j", "link", "show", "dev", IFACE, ns=ns).stdout)[0]
        ports = json.loads(run_command(["bridge", "-n", self.switch.name, "-j", "link"]).stdout)
        port: dict[str, Any] = next((p for p in ports if p.get("ifname") == peer), {})
        return link.get("operstate") == "UP" and port.get("state") == "forwarding"

    # -- processes ----------------------------------------------------------------

    def new_path(self, stem: str, suffix: str) -> Path:
        """A not-yet-used path in the segment's log directory."""
        return self.logdir / f"{next(self._paths):02d}-{stem}{suffix}"

    def _popen(
        self, host: Host, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None
    ) -> subprocess.Popen[bytes]:
        self._check_open()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("ab")
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host.name, *[str(a) for a in argv]],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env) if env is not None else None,
            )
        except BaseException:
            log.close()
            raise
        self._tracked.append(_Tracked(proc, log, log_path, host.name))
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = KILL_GRACE) -> int | None:
        """Stop a process started with :meth:`Host.popen` (group SIGTERM, then SIGKILL)."""
        return kill_process_group(proc, grace)

    def log_of(self, proc: subprocess.Popen[Any]) -> Path:
        for tracked in self._tracked:
            if tracked.proc is proc:
                return tracked.log_path
        raise KeyError(proc.pid)

    def log_summary(self, limit: int = 3000) -> str:
        """Tails of all process logs (for failure reports)."""
        parts = []
        for tracked in self._tracked:
            status = tracked.proc.poll()
            parts.append(
                f"----- {tracked.log_path.name} (ns {tracked.ns}, pid {tracked.proc.pid}, "
                f"exit {status}) -----\n{_tail(tracked.log_path, limit)}"
            )
        return "\n".join(parts)

    def capture(self, pcap_path: Path | str) -> subprocess.Popen[bytes]:
        """Start tcpdump on the bridge (sees every frame of the segment)."""
        log = self.switch.log_path("tcpdump")
        proc = self.switch.popen(
            [_tool("tcpdump"), "-i", BRIDGE, "-n", "-U", "-Z", "root", "-w", str(pcap_path)], log
        )
        wait_until(
            lambda: "listening on" in _tail(log) or proc.poll() is not None,
            10.0,
            message="tcpdump start",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"tcpdump exited: {_tail(log)}")
        return proc

    # -- teardown -----------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("segment is closed")

    def close(self) -> None:
        """Kill all processes, delete all namespaces.  Idempotent; raises on leftovers."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for tracked in reversed(self._tracked):
            try:
                if kill_process_group(tracked.proc) is None:
                    errors.append(f"pid {tracked.proc.pid} did not die")
            finally:
                tracked.log.close()
        # Hosts first, the switch (bridge) last.
        errors += delete_namespaces(reversed(self._namespaces))
        with contextlib.suppress(ValueError):
            _LIVE_SEGMENTS.remove(self)
        remaining = set(self._namespaces) & set(list_namespaces())
        if remaining:
            errors.append(f"namespaces left behind: {sorted(remaining)}")
        if errors:
            raise RuntimeError("netlab cleanup failed: " + "; ".join(errors))

    def __enter__(self) -> Segment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@atexit.register
def _close_live_segments() -> None:
    for segment in list(_LIVE_SEGMENTS):
        with contextlib.suppress(Exception):
            segment.close()


# --------------------------------------------------------------------------- dnsmasq


def start_dnsmasq_router(
    host: Host,
    range_start: str,
    range_end: str,
    lease_time: str = "2m",
    extra_args: Sequence[str] = (),
    *,
    ping_check: bool = True,
    timeout: float = 10.0,
) -> subprocess.Popen[bytes]:
    """dnsmasq as a plain home-router DHCP server (no DNS, no PXE) on ``host``'s eth0.

    ``host`` needs an address in the range's subnet.  With ``ping_check`` (dnsmasq's
    default) the first OFFER for a new address is delayed ~3 s by the ICMP probe.
    Returns once dnsmasq listens on UDP port 67.
    """
    leasefile = host.segment.new_path(f"{host.role}-dnsmasq", ".leases")
    leasefile.touch()
    log = host.log_path("dnsmasq")
    argv = [
        _tool("dnsmasq"),
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        "--no-resolv",
        "--no-hosts",
        f"--interface={host.iface}",
        "--bind-interfaces",
        f"--dhcp-leasefile={leasefile}",
        f"--dhcp-range={range_start},{range_end},{lease_time}",
        "--log-dhcp",
        "--log-facility=-",
        *([] if ping_check else ["--no-ping"]),
        *extra_args,
    ]
    proc = host.popen(argv, log)

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited with {proc.returncode}:\n{_tail(log)}")
        out = host.run(["ss", "-H", "-uln"], timeout=5.0).stdout
        return re.search(r":67\s", out) is not None

    wait_until(listening, timeout, 0.05, f"dnsmasq listening on :67 in {host.name}")
    return proc
