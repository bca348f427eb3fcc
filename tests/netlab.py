"""Network-namespace lab for integration tests.

A :class:`Segment` is one isolated L2 network: a "switch" namespace holding a Linux
bridge, plus one namespace per :class:`Host`, each with a veth ``eth0`` whose peer is
enslaved to the bridge.  Nothing is created in the root namespace: the veth pair is
created inside the host namespace with its peer placed straight into the switch
namespace, so deleting the namespaces removes every link.

Real peers (dnsmasq as a home router, ISC dhclient, a scapy PXE client) run inside
the namespaces via ``ip netns exec``, each in its own session so that it can be
killed as a process group.  :meth:`Segment.close` (also run from ``atexit``) kills
tracked processes, then any other process still living in one of the segment's
namespaces, then deletes the namespaces.

Requires root and a working ``ip netns``.  Helpers that run as subprocesses
(``pxeclient.py``, ``dhclient-script.sh``) are referenced by file path.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

T = TypeVar("T")

TESTS_DIR = Path(__file__).resolve().parent
PXECLIENT = TESTS_DIR / "pxeclient.py"
DHCLIENT_SCRIPT = TESTS_DIR / "dhclient-script.sh"

NS_PREFIX = "pxb"
#: Prefix of every namespace created by this process (unique per test run).
RUN_PREFIX = f"{NS_PREFIX}{os.getpid()}-"
IFACE = "eth0"
BRIDGE = "br0"
#: Seconds between SIGTERM and SIGKILL when stopping a process group.
KILL_GRACE = 3.0
#: Default bound for one helper command (ip, sysctl, ss, ...).
COMMAND_TIMEOUT = 15.0

_ROLE_RE = re.compile(r"[a-z][a-z0-9]{0,9}")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_LEASE_REASONS = frozenset({"BOUND", "RENEW", "REBIND", "REBOOT"})


class CommandError(subprocess.CalledProcessError):
    """A helper command failed; ``str()`` includes its output."""

    def __str__(self) -> str:
        out = (self.stdout or "").strip()
        err = (self.stderr or "").strip()
        return f"{super().__str__()}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"


# --------------------------------------------------------------------------- processes


def run_command(
    argv: Sequence[str],
    *,
    timeout: float = COMMAND_TIMEOUT,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a new session, captured, text mode, killed as a group on timeout."""
    args = [str(a) for a in argv]
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        kill_process_group(proc)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr) from exc
    except BaseException:
        kill_process_group(proc)
        raise
    result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, args, stdout, stderr)
    return result


def kill_process_group(proc: subprocess.Popen[Any], grace: float = KILL_GRACE) -> int | None:
    """SIGTERM the process group led by ``proc``, wait ``grace`` s, then SIGKILL it.

    Only signals the group while the leader has not been reaped (so the group id
    cannot have been recycled).  Returns the exit status, or None if it never died.
    """
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.1,
    message: str = "",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError (with ``message``) once ``timeout`` seconds have passed.
    Exceptions raised by the predicate propagate.
    """
    interval = max(interval, 0.01)
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    value = predicate()
    if value:
        return value
    raise AssertionError(f"timed out after {timeout:g}s waiting: {message or predicate!r}")


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    return run_command(argv, check=check)


def _sysctl(ns: str, *assignments: str) -> None:
    run_command(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *assignments])


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return data[-limit:].decode("utf-8", "replace")


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


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for base in ("/usr/sbin", "/sbin", "/usr/bin"):
        candidate = Path(base, name)
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(name)


# --------------------------------------------------------------------------- segment


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
        if not _ROLE_RE.fullmatch(role) or role == "sw":
            raise ValueError(f"role must match {_ROLE_RE.pattern} and not be 'sw': {role!r}")
        if any(h.role == role for h in self.hosts):
            raise ValueError(f"role {role!r} already used in this segment")
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
