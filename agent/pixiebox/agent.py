"""`pixiebox serve`: every service of the appliance in one asyncio process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import TypeVar

from pixiebox.boot.pxelinux import tftp_generator
from pixiebox.config import ConfigError, LabConfig, format_problem, load_config, split_listen
from pixiebox.config.labfile import EnrollError, enroll, next_free_ip, next_free_name
from pixiebox.config.load import reload_refusal
from pixiebox.config.schema import DEFAULT_API_PORT
from pixiebox.config.values import unicast_mac_problem
from pixiebox.core import wording
from pixiebox.core.firmware import Assets, Firmware, known_arches, packaged_ipxe_dir
from pixiebox.core.inventory import Inventory
from pixiebox.core.lifecycle import MachineState
from pixiebox.core.trixie import trixie_root
from pixiebox.core.trust import LabLink, redact
from pixiebox.core.urls import BootUrls
from pixiebox.dhcp.full import FullHandler
from pixiebox.dhcp.guard import find_other_dhcp_servers
from pixiebox.dhcp.leases import AddressBook
from pixiebox.dhcp.policy import BootPolicy
from pixiebox.dhcp.proxy import ProxyHandler
from pixiebox.dhcp.reservation import ReservationHandler
from pixiebox.dhcp.server import DhcpServer, Handler
from pixiebox.dns import DnsServer
from pixiebox.events import Kind
from pixiebox.http.api import ApiState, api_app, ensure_token, state_counts
from pixiebox.http.api_settings import LabText
from pixiebox.http.boot import BootEvent, BootHttpState, boot_app
from pixiebox.http.connlimit import HttpLimits
from pixiebox.http.metrics import PixieboxCollector, metrics_renderer
from pixiebox.http.server import BootHttpServer
from pixiebox.net.limits import raise_open_file_limit
from pixiebox.net.netif import interface_info, interface_names
from pixiebox.power.controller import PowerController
from pixiebox.store.identity import IDENTITY_DIR, IdentityError, IdentityStore
from pixiebox.store.state import StateStore
from pixiebox.syslog import SyslogMessage, SyslogReceiver
from pixiebox.tftp import TftpEvent, TftpLimits, TftpServer

log = logging.getLogger("pixiebox")

T = TypeVar("T")

#: Seconds a worker thread waits for the event loop to apply a reload.
LOOP_WAIT = 30.0
#: Seconds a stop waits for enrollments under way (each a lab.toml write and a reload).
STOP_WAIT = 5.0


#: The appliance's own DNS name in the lab domain (pixiebox.lab.internal).
APPLIANCE_NAME = "pixiebox"


class StartupError(Exception):
    """The agent cannot start; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Segment:
    """The lab network as the agent sees it on its interface."""

    interface: str
    mac: str
    server_ip: IPv4Address
    subnet: IPv4Network


def resolve_segment(config: LabConfig) -> Segment:
    name = config.network.interface
    info = interface_info(name)
    if info is None:
        raise StartupError(
            f"[network] interface = {name!r}: no such interface on this machine "
            f"(it has: {', '.join(interface_names())}); set it to the one facing the lab"
        )
    primary = info.primary
    server_ip = config.network.server_ip or (primary.ip if primary else None)
    if server_ip is None:
        raise StartupError(
            f"interface {name} has no IPv4 address and [network] server_ip is not set; "
            "give the interface an address (or set server_ip)"
        )
    if primary is not None and server_ip not in {a.ip for a in info.addresses}:
        log.warning(
            "[network] server_ip %s is not an address of %s (%s); machines will be told to "
            "fetch from an address this machine may not answer on",
            server_ip,
            name,
            ", ".join(str(a) for a in info.addresses),
        )
    subnet = config.network.subnet or (primary.network if primary else None)
    if subnet is None:
        raise StartupError(f"cannot tell the subnet of {name}; set [network] subnet")
    return Segment(name, info.mac or "00:00:00:00:00:00", server_ip, subnet)


def boot_urls(config: LabConfig, segment: Segment) -> BootUrls:
    _, http_port = split_listen(config.http.listen)
    return BootUrls(segment.server_ip, http_port)


def build_handler(
    config: LabConfig, segment: Segment, inventory: Inventory, store: StateStore, assets: Assets
) -> Handler:
    policy = BootPolicy(assets, boot_urls(config, segment))
    mode = config.network.dhcp_mode
    if mode == "proxy":
        return ProxyHandler(inventory, policy)
    pool = config.network.pool if mode == "full" else None
    book = AddressBook(store, pool)
    handler_class = FullHandler if mode == "full" else ReservationHandler
    return handler_class(inventory, policy, book, segment.subnet)


async def guard_segment(config: LabConfig, segment: Segment) -> None:
    """Refuse reservation/full mode beside another DHCP server (see dhcp.guard)."""
    network = config.network
    if network.dhcp_mode == "proxy":
        return
    if network.allow_other_dhcp_servers:
        log.warning(
            "not checking for other DHCP servers: [network] allow_other_dhcp_servers = true"
        )
        return
    log.info(
        "listening %ss for other DHCP servers on %s before answering",
        network.dhcp_probe_time,
        segment.interface,
    )
    others = await asyncio.to_thread(
        find_other_dhcp_servers, segment.interface, segment.mac, float(network.dhcp_probe_time)
    )
    if others:
        names = "; ".join(f"{o.ip} (MAC {o.mac}, offered {o.offered})" for o in others)
        raise StartupError(
            f"another DHCP server answers on {segment.interface}: {names}. Refusing to start in "
            f"{network.dhcp_mode} mode, because two DHCP servers on one network break it. "
            'Either set dhcp_mode = "proxy" in [network] (Pixiebox then only adds boot '
            "information and leaves addresses to that server), switch that server off, or, if "
            "it is configured to ignore the lab machines, set allow_other_dhcp_servers = true"
        )


def _mac_for(inventory: Inventory, who: str) -> tuple[str | None, IPv4Address | None]:
    """(MAC, IP) for a protocol's `who`: a MAC already, or an address to look up (by evidence
    only, on the lab segment: core.trust)."""
    try:
        ip = IPv4Address(who)
    except ValueError:
        return who, None
    return inventory.prove(ip, strict=False).mac, ip


def tftp_recorder(inventory: Inventory) -> Callable[[TftpEvent], None]:
    """TFTP outcomes as events of the machine at the client's address."""

    def record(event: TftpEvent) -> None:
        mac, ip = _mac_for(inventory, event.client_ip)
        if mac is None:
            return
        if event.kind == "sent":
            sent = event.bytes or event.size or 0
            inventory.record(
                mac, Kind.TFTP_SENT,
                f"fetched {event.path} ({wording.size(sent)} in {wording.span(event.seconds)}) "
                "over TFTP", ip,
                {"file": event.path, "bytes": sent, "seconds": round(event.seconds, 3),
                 "blksize": event.blksize},
            )  # fmt: skip
        else:
            inventory.record(
                mac, Kind.TFTP_FAILED, f"TFTP {event.path}: {event.detail}", ip,
                {"file": event.path, "reason": event.reason or _TFTP_REASONS[event.kind],
                 "detail": event.detail},
            )  # fmt: skip

    return record


#: A failed TFTP request's `reason` field (pixiebox.events), by the TFTP server's outcome.
_TFTP_REASONS = {"not_found": "not-found", "refused": "refused", "aborted": "aborted"}


def http_recorder(inventory: Inventory) -> Callable[[BootEvent], None]:
    """Boot HTTP steps as events of the machine (named by MAC, or found at the address)."""

    def record(event: BootEvent) -> None:
        mac, ip = _mac_for(inventory, event.who)
        if mac is not None:
            inventory.record(mac, event.kind, event.message, ip, event.fields)

    return record


def syslog_recorder(inventory: Inventory) -> Callable[[SyslogMessage], None]:
    """Syslog lines as events of the machine that sent them (by source address)."""

    def record(message: SyslogMessage) -> None:
        # By the evidence at the source address, never by the HOSTNAME the line claims.
        mac = inventory.prove(message.source, strict=False).mac
        if mac is not None:
            inventory.record(
                mac, Kind.SYSLOG, redact(message.line), message.source,
                {"severity": message.severity_name, "facility": message.facility_name,
                 "app": message.app},
            )  # fmt: skip

    return record


def prepare_assets(root: Path) -> Assets:
    """The assets directory, created empty on first start (a fresh appliance has none yet)."""
    if not root.is_dir():
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"[boot] assets = {str(root)!r} does not exist and cannot be created: "
                f"{exc.strerror}; create it or point assets at a directory"
            ) from None
        log.info("created the empty assets directory %s (kernels, initrds, iPXE builds)", root)
    # The packaged iPXE: trixie's (2025, arm64 and riscv64 too) where build.sh unpacked it.
    return Assets(root, packaged_ipxe_dir(trixie_root("ipxe")))


def check_loaders(assets: Assets) -> None:
    """Every iPXE build Debian's ipxe package provides must be there, or x86 machines cannot
    boot at all; builds for other CPUs are the user's to add, so their absence is only noted."""
    missing = sorted({info.loader for info in known_arches() if info.in_debian_package
                      and assets.ipxe_binary(info.loader) is None})  # fmt: skip
    if missing:
        raise StartupError(
            f"iPXE build(s) {', '.join(missing)} not found in {assets.root / 'ipxe'} nor "
            f"{assets.system_ipxe}: install Debian's ipxe package (apt-get install ipxe) or copy "
            f"them to {assets.root / 'ipxe'}"
        )
    extra = sorted({f"{info.loader} ({info.cpu} {info.firmware})" for info in known_arches()
                    if not info.in_debian_package and info.firmware is not Firmware.UBOOT
                    and assets.ipxe_binary(info.loader) is None})  # fmt: skip
    if extra:  # bookworm's ipxe has x86 only; trixie's (./build.sh trixie) has arm64 and riscv64
        log.info("not in %s nor %s, so those machines will not be answered: %s",
                 assets.root / "ipxe", assets.system_ipxe, ", ".join(extra))  # fmt: skip


class Agent:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self._stop = asyncio.Event()
        self._inventory: Inventory | None = None
        self._handler: Handler | None = None
        self._reload_lock = threading.Lock()
        self._segment: Segment | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Enrollments under way in worker threads (`_enroll_later`).
        self._enrolling: set[asyncio.Future[None]] = set()
        self.lab_text: LabText | None = None  #: lab.toml as last loaded (the settings page)

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()  # before any service can enroll a machine
        # From the first moment: a SIGTERM while the agent starts (the DHCP guard listens for
        # seconds) is a clean stop too, not the default action's death between two writes.
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)  # read off the loop
        raise_open_file_limit()  # every connection and transfer is a descriptor (net.limits)
        config = load_config(self.config_path)
        self.lab_text = self._loaded_text()
        segment = self._segment = resolve_segment(config)
        store = StateStore(config.state.dir)
        try:
            link = LabLink(segment.interface, segment.subnet)
            inventory = self._inventory = Inventory(config, store, link)
            assets = prepare_assets(config.boot.assets)
            handler = self._handler = build_handler(config, segment, inventory, store, assets)
            await guard_segment(config, segment)
            check_loaders(assets)
            if self._stop.is_set():
                log.info("Pixiebox stopped before it served")
                return
            async with contextlib.AsyncExitStack() as services:
                await self._start_services(services, config, segment, inventory, handler, assets)
                inventory.on_unknown = self._enroll_later
                log.info(
                    "Pixiebox serving lab %r on %s (%s, %s) in %s mode with %d machines",
                    config.lab.name, segment.interface, segment.server_ip, segment.subnet,
                    config.network.dhcp_mode, len(config.machines),
                )  # fmt: skip
                await self._stop.wait()
            # Every service has stopped and recorded its last events; enrollments under way
            # record theirs too, then the store commits the rest and closes (finally).
            await self._last_writes()
            log.info("Pixiebox stopped")
        finally:
            store.close()

    def _enroll_later(self, mac: str) -> None:
        """[boot] unknown = "enroll", off the DHCP path: lab.toml is written and fsynced in a
        worker thread, which a stop waits for (`_last_writes`)."""
        loop = self._loop
        if loop is None or self._stop.is_set():
            return
        future = loop.run_in_executor(None, self.auto_enroll, mac)
        self._enrolling.add(future)
        future.add_done_callback(self._enrolling.discard)

    async def _last_writes(self) -> None:
        """Let what the stopped services handed over land before the store closes: callbacks
        they scheduled for the next loop turn, and enrollments under way (bounded)."""
        await asyncio.sleep(0)
        if self._enrolling:
            await asyncio.wait(self._enrolling, timeout=STOP_WAIT)
        await asyncio.sleep(0)

    async def _start_services(
        self,
        services: contextlib.AsyncExitStack,
        config: LabConfig,
        segment: Segment,
        inventory: Inventory,
        handler: Handler,
        assets: Assets,
    ) -> None:
        """Every service, each closed by `services` (also when a later one fails to start)."""
        # DHCP starts last: a machine answered by DHCP fetches its boot file at once, and a
        # firmware's PXE ROM fetches it only once (a refused connection ends its boot at "No
        # bootable device"), so TFTP and HTTP must already listen when the first offer leaves
        # (docs/firmware-quirks.md#32).
        dhcp = DhcpServer(handler, segment.interface)
        urls = boot_urls(config, segment)
        tftp = TftpServer(
            assets.root,
            interface=segment.interface,
            fallback_dirs=assets.fallback_places,
            describe=lambda ip: inventory.describe_address(IPv4Address(ip)),
            generate=tftp_generator(inventory, urls),
            on_event=tftp_recorder(inventory),
            limits=TftpLimits.of(config.tftp),
        )
        await tftp.start()
        services.callback(tftp.close)
        http_host, http_port = split_listen(config.http.listen)
        # Per-MAC SSH host keys and k3s node passwords, served to each machine in its /metadata.
        identities = IdentityStore(config.state.dir / IDENTITY_DIR)
        await asyncio.to_thread(identities.tighten_existing)  # 0600/0700 after a copy or restore
        if config.kubernetes.server is not None:
            # The appliance's k3s server reads the same file (--agent-token-file): made now, it
            # is there before the first node asks for its metadata.
            try:
                await asyncio.to_thread(identities.agent_token)
            except (IdentityError, OSError) as exc:
                log.error("the lab's k3s agent token cannot be made or read: %s", exc)
        boot_state = BootHttpState(
            inventory, urls, assets, http_recorder(inventory), identities=identities
        )
        # Only the lab interface: /metadata answers by source address (SECURITY.md).
        http = BootHttpServer(boot_app(boot_state), http_host, http_port, device=segment.interface,
                              limits=HttpLimits.of(config.http))  # fmt: skip
        await http.start()
        services.push_async_callback(http.stop)
        appliance = (APPLIANCE_NAME, segment.server_ip)
        dns = DnsServer(
            domain=config.lab.domain,
            records=lambda: inventory.dns_records(appliance),
            # No [network] dns: the router is the usual resolver of a home LAN.
            upstreams=config.network.dns
            or ([config.network.gateway] if config.network.gateway else []),
            # The current lab.toml's list (a reload applies at once); empty: the lab subnet.
            forward_for=lambda: inventory.config.dns.forward_for or [segment.subnet],
            listen_ip=str(segment.server_ip),
            interface=segment.interface,
            tcp_per_source=config.dns.tcp_connections_per_source,
        )
        await dns.start()
        services.push_async_callback(dns.close)
        syslog = SyslogReceiver(
            syslog_recorder(inventory),
            interface=segment.interface,
            describe=inventory.describe_address,
        )
        await syslog.start()
        services.callback(syslog.close)
        collector = PixieboxCollector(
            {
                "dhcp_packets": ("DHCP packets by outcome", dhcp.stats),
                "dhcp_requests_by_type": ("DHCP requests by message type", dhcp.by_type),
                "http_boot_files": (
                    "boot files sent over HTTP: bytes, complete, broken",
                    boot_state.stats,
                ),
                "http_boot_connections": (
                    "boot HTTP connections refused, evicted or timed out, by reason",
                    http.stats,
                ),
                "tftp_requests": ("TFTP requests by outcome, and bytes sent", tftp.stats),
                "syslog_lines": ("syslog datagrams by outcome", syslog.stats),
                "dns_queries": ("DNS queries by outcome", dns.stats),
            },
            lambda: machine_state_counts(inventory),
            lambda: inventory.lifecycle.boot_durations,
        )
        # Verified power actions (power/controller.py); actions still running when the agent
        # stops are cancelled, their events saying how far they got.
        power = PowerController(inventory, subnet=segment.subnet, identities=identities)
        services.push_async_callback(power.close)
        api_state = ApiState(
            inventory,
            ensure_token(config.api.token_file),
            self.enroll,
            metrics_renderer(collector),
            power=power,
            suggest=self.suggest,
            lab_text=lambda: self.lab_text,
            server_ip=segment.server_ip,
        )
        if config.api.listen is None:  # the lab address (lab interface only) and loopback
            lab_ip = str(segment.server_ip)
            api = BootHttpServer(api_app(api_state), lab_ip, DEFAULT_API_PORT, pathsend=False,
                                 device=segment.interface, loopback=True,
                                 limits=HttpLimits.of(config.http), name="API")  # fmt: skip
        else:
            api_host, api_port = split_listen(config.api.listen)
            api = BootHttpServer(api_app(api_state), api_host, api_port, pathsend=False,
                                 limits=HttpLimits.of(config.http), name="API")  # fmt: skip
        await api.start()
        services.push_async_callback(api.stop)

        async def stop_taking_work() -> None:
            # Unwound first of these (last in, first out): no DHCP request is answered and no
            # TFTP transfer starts any more, the transfers under way end with an ERROR to their
            # clients and their events, and both HTTP servers drain side by side, each within
            # http.server's bound, so a stop takes seconds rather than their sum. The callbacks
            # above then find them closed; the store closes after all of them (Agent.run).
            dhcp.close()
            tftp.close()
            await asyncio.gather(http.stop(), api.stop())

        services.push_async_callback(stop_taking_work)
        await dhcp.start()
        services.callback(dhcp.close)
        watcher = asyncio.create_task(
            inventory.lifecycle.watch_silence(
                lambda: float(inventory.config.lab.off_after), inventory.name_of
            )
        )
        services.callback(watcher.cancel)

    def suggest(self, mac: str = "") -> tuple[str, IPv4Address | None]:
        """The name and address an enrollment naming neither gets (the API's empty body, [boot]
        unknown = "enroll", the dashboard's form shows it first); nothing is written."""
        inventory, handler = self._inventory, self._handler
        if inventory is None:
            return "node1", None
        config = inventory.config
        ip = None
        if config.network.dhcp_mode != "proxy" and handler is not None:
            # The leases change on the event loop: read them there.
            held = self._on_loop(handler.held_addresses)
            if self._segment is not None:  # the appliance's own address, even when detected
                held.add(self._segment.server_ip)
            ip = next_free_ip(config, held)
        return next_free_name(config), ip

    def enroll(self, mac: str, name: str | None, ip: IPv4Address | None) -> str:
        """Add `mac` to lab.toml (comments kept, validated, atomic) and reload it. Naming
        neither: `suggest`'s address, and its name chosen under lab.toml's lock."""
        if name is None and ip is None:
            ip = self.suggest(mac)[1]
        try:
            done = enroll(self.config_path, mac, name, str(ip) if ip is not None else None)
        except EnrollError as exc:
            raise ValueError(
                "\n".join(format_problem(self.config_path, p) for p in exc.problems)
            ) from None
        self.reload()
        return done.name

    def auto_enroll(self, mac: str) -> None:
        """[boot] unknown = "enroll": add a machine that just showed up (`suggest`'s choice)."""
        inventory = self._inventory
        if inventory is None or unicast_mac_problem(mac) is not None:
            return  # a multicast, broadcast or zero MAC is never a machine (Inventory.seen)
        ip = self.suggest(mac)[1]
        try:
            name = self.enroll(mac, None, ip)
        except ValueError as exc:
            log.error('could not enroll %s ([boot] unknown = "enroll"):\n%s', mac, exc)
            return
        except Exception:
            log.exception('enrolling %s ([boot] unknown = "enroll") failed', mac)
            return
        message = f'enrolled as {name}{f" at {ip}" if ip else ""} ([boot] unknown = "enroll")'
        log.info("%s: %s", mac, message)
        # Events reach the API's live streams, which belong to the event loop.
        if self._loop is not None:
            fields = {"name": name, **({"ip": str(ip)} if ip is not None else {})}
            self._loop.call_soon_threadsafe(
                inventory.record, mac, Kind.MACHINE_ENROLLED, message, None, fields
            )

    def _on_loop(self, call: Callable[[], T]) -> T:
        """`call()` run on the event loop, where the protocols read the lab and the leases, and
        waited for: from a worker thread through call_soon_threadsafe, directly on the loop."""
        loop = self._loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            return call()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(call())
            except BaseException as exc:
                done.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed: no protocol reads the lab any more
            return call()
        return done.result(LOOP_WAIT)

    def reload(self) -> None:
        """SIGHUP or an enrollment: re-read lab.toml; keep the running config if the new one is
        invalid."""
        inventory, handler, loop = self._inventory, self._handler, self._loop
        if inventory is None or handler is None:
            return
        try:
            on_loop = loop is not None and asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop and loop is not None:
            # SIGHUP: parse and validate the file in a worker thread, like enrollments do, so
            # reloads are applied in the order they were read and the loop never waits for
            # the lock below.
            loop.run_in_executor(None, self.reload)
            return
        with self._reload_lock:  # one reload at a time, each applied before the next is read
            self._reload(inventory, handler)

    def _reload(self, inventory: Inventory, handler: Handler) -> None:
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("lab.toml changed but is invalid; keeping the previous settings:\n%s", exc)
            return
        refusal = reload_refusal(self.config_path, inventory.config, config)
        if refusal is not None:
            log.error("%s", refusal)
            return
        if config.network != inventory.config.network:
            log.warning("[network] changed: restart the agent for that part to take effect")

        text = self._loaded_text()

        def apply() -> None:
            # One step on the loop: no request is answered with the new config beside the old
            # MAC index, or the new machines beside the old reservations.
            inventory.reload(config)
            handler.reload()
            self.lab_text = text

        try:
            self._on_loop(apply)
        except concurrent.futures.TimeoutError:
            log.error("lab.toml was read but the agent is too busy to apply it; send SIGHUP again")
            return
        log.info("reloaded %s: %d machines", self.config_path, len(config.machines))

    def stop(self) -> None:
        self._stop.set()

    def _loaded_text(self) -> LabText | None:
        """lab.toml's text, read just after it was loaded (for the dashboard's settings)."""
        try:
            text = self.config_path.read_bytes().decode("utf-8-sig", errors="replace")
        except OSError:
            return None
        return LabText(self.config_path.resolve(), text, time.time())


def machine_state_counts(inventory: Inventory) -> dict[MachineState, int]:
    return state_counts(inventory)  # one GROUP BY: a scrape builds no view per machine
