"""The benchmark's network and servers: one segment (bridge) with a server namespace and a
client namespace, and each server under test started and stopped inside the server namespace.

Everything runs in namespaces made by virtlab's Segment, so every packet stays on the bridge and
Segment.close() (also from atexit) kills every process and removes every namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pixiebox.virtlab import netns

SUBNET = "10.77.0.0/16"
SERVER_IP = "10.77.0.1"
CLIENT_IP = "10.77.0.2"
GATEWAY = "10.77.0.254"  # nobody: the lab names are all answered locally
POOL = ("10.77.1.0", "10.77.250.255")  # 64,000 addresses: room for every perfdhcp client
DOMAIN = "lab.bench"
#: Enrolled machines (DNS names, per-machine iPXE scripts): c001.. at 10.77.0.101..
MACHINES = 100
ROOT = Path(__file__).resolve().parent.parent
READY = "Pixiebox serving"


def machine(index: int) -> tuple[str, str, str]:
    """(name, MAC, IP) of enrolled machine `index` (1-based)."""
    return (
        f"c{index:03d}",
        f"02:be:00:00:{index >> 8:02x}:{index & 0xFF:02x}",
        f"10.77.0.{100 + index}",
    )


class BenchError(Exception):
    """A server would not start or a client tool failed; the message says which and why."""


def tool(name: str) -> str:
    for base in ("", "/usr/sbin/", "/sbin/"):
        path = (
            shutil.which(name)
            if not base
            else (base + name if Path(base + name).exists() else None)
        )
        if path:
            return path
    raise BenchError(f"{name} is not installed: run sudo ./build.sh bench (it installs it)")


class Lab:
    """Segment + server host + client host; one server process at a time."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o755)  # tftpd-hpa, dnsmasq and nginx workers drop privileges
        self.segment = netns.Segment(workdir / "segment")
        try:
            self.server = self.segment.add_host("srv", ip=f"{SERVER_IP}/16")
            # The client is machine 1 (its MAC): the iPXE script it fetches is its own, so the
            # benchmark measures the real path (a boot token issued and stored per script), not
            # the one for a bystander naming another MAC (SECURITY.md).
            self.client = self.segment.add_host("cli", mac=machine(1)[1], ip=f"{CLIENT_IP}/16")
        except BaseException:
            self.segment.close()
            raise
        self.assets = workdir / "assets"
        self.assets.mkdir(exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._count = 0

    def close(self) -> None:
        self.stop()
        self.segment.close()

    # -- files ------------------------------------------------------------------

    def make_file(self, name: str, size: int) -> Path:
        path = self.assets / name
        if not path.exists() or path.stat().st_size != size:
            with path.open("wb") as out:
                chunk = os.urandom(1 << 20)
                for _ in range(size >> 20):
                    out.write(chunk)
                out.write(chunk[: size & ((1 << 20) - 1)])
        os.chmod(path, 0o644)
        return path

    def fresh_dir(self, stem: str) -> Path:
        self._count += 1
        path = self.workdir / f"{stem}-{self._count}"
        path.mkdir(parents=True)
        os.chmod(path, 0o755)
        return path

    # -- server processes -------------------------------------------------------

    def stop(self) -> None:
        if self._proc is not None:
            self.segment.stop(self._proc)
            self._proc = None

    def _start(
        self,
        argv: Sequence[str],
        name: str,
        ports: Sequence[str],
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in the server namespace; return once it listens on every `ports`
        entry ("udp:67", "tcp:80")."""
        self.stop()
        log = self.server.log_path(name)
        proc = self.server.popen(argv, log, env=env)
        self._proc = proc

        def listening() -> bool:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise BenchError(f"{name} exited with {proc.returncode}: {tail}")
            udp = self.server.run(["ss", "-H", "-uln"], timeout=5.0).stdout
            tcp = self.server.run(["ss", "-H", "-tln"], timeout=5.0).stdout
            for port in ports:
                kind, number = port.split(":")
                text = udp if kind == "udp" else tcp
                if not re.search(rf":{number}\s", text):
                    return False
            return True

        try:
            netns.wait_until(listening, timeout, 0.05, f"{name} listening on {', '.join(ports)}")
        except AssertionError as exc:
            raise BenchError(
                f"{name} did not start: {exc}\n{log.read_text(errors='replace')[-2000:]}"
            ) from None
        return proc

    def pixiebox_config(self, mode: str = "full", state: Path | None = None) -> Path:
        state = state or self.fresh_dir("pixiebox-state")
        lines = [
            "# Written by the benchmark (bench/lab.py): full mode with a big pool.",
            "[lab]",
            'name = "bench"',
            f'domain = "{DOMAIN}"',
            "[network]",
            'interface = "eth0"',
            f'server_ip = "{SERVER_IP}"',
            f'subnet = "{SUBNET}"',
            f'gateway = "{GATEWAY}"',
            f'dhcp_mode = "{mode}"',
            'lease_time = "1h"',
            "allow_other_dhcp_servers = true",
            *([f'pool = "{POOL[0]}-{POOL[1]}"'] if mode == "full" else []),
            "[boot]",
            'unknown = "discover"',
            f'assets = "{self.assets}"',
            "[images.osie]",
            'kernel = "vmlinuz"',
            'initrd = ["initrd-100m.img"]',
            'cmdline = "console=ttyS0"',
            "[http]",
            'listen = ":80"',
            "[tftp]",
            "# tftp-20's clients are 20 curls from one address: over the default of 8 per",
            '# client, transfers would be refused as "server busy" (tests/test_tftp.py too).',
            "max_transfers_per_client = 64",
            "[api]",
            f'listen = "{SERVER_IP}:8080"',
            f'token_file = "{state / "api-token"}"',
            "[state]",
            f'dir = "{state}"',
        ]
        for index in range(1, MACHINES + 1):
            name, mac, ip = machine(index)
            lines += ["[[machines]]", f'name = "{name}"', f'mac = "{mac}"', f'ip = "{ip}"']
        path = state / "lab.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def pixiebox_argv(self, config: Path) -> list[str]:
        return [sys.executable, "-m", "pixiebox.cli", "serve", "--config", str(config)]

    def start_pixiebox(self, mode: str = "full") -> subprocess.Popen[bytes]:
        config = self.pixiebox_config(mode)
        return self._start(
            self.pixiebox_argv(config), "pixiebox", ["udp:67", "udp:69", "udp:53", "tcp:80"]
        )

    def start_kea(self) -> subprocess.Popen[bytes]:
        run = self.fresh_dir("kea")
        config = {
            "Dhcp4": {
                "interfaces-config": {"interfaces": ["eth0"], "dhcp-socket-type": "udp"},
                "lease-database": {
                    "type": "memfile",
                    "persist": True,
                    "lfc-interval": 0,
                    "name": str(run / "leases4.csv"),
                },
                "valid-lifetime": 3600,
                "subnet4": [
                    {
                        "id": 1,
                        "subnet": SUBNET,
                        "pools": [{"pool": f"{POOL[0]} - {POOL[1]}"}],
                        "option-data": [{"name": "routers", "data": GATEWAY}],
                    }
                ],
                "loggers": [
                    {
                        "name": "kea-dhcp4",
                        "severity": "WARN",
                        "output_options": [{"output": "stdout"}],
                    }
                ],
            }
        }
        path = run / "kea-dhcp4.conf"
        path.write_text(json.dumps(config, indent=2))
        env = {**os.environ, "KEA_LOCKFILE_DIR": str(run), "KEA_PIDFILE_DIR": str(run)}
        return self._start([tool("kea-dhcp4"), "-c", str(path)], "kea", ["udp:67"], env=env)

    def _dnsmasq(
        self, name: str, extra: Sequence[str], ports: Sequence[str]
    ) -> subprocess.Popen[bytes]:
        run = self.fresh_dir(name)
        argv = [
            tool("dnsmasq"),
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--interface=eth0",
            "--bind-interfaces",
            "--user=root",
            "--group=root",
            f"--pid-file={run / 'pid'}",
            f"--log-facility={run / 'log'}",
            *extra,
        ]
        return self._start(argv, name, ports)

    def start_dnsmasq_dhcp(self) -> subprocess.Popen[bytes]:
        leases = self.fresh_dir("dnsmasq-leases") / "leases"
        return self._dnsmasq(
            "dnsmasq-dhcp",
            [
                "--port=0",
                f"--dhcp-range={POOL[0]},{POOL[1]},1h",
                "--dhcp-lease-max=100000",
                "--no-ping",
                "--dhcp-authoritative",
                f"--dhcp-leasefile={leases}",
                f"--dhcp-option=option:router,{GATEWAY}",
            ],
            ["udp:67"],
        )

    def start_dnsmasq_tftp(self) -> subprocess.Popen[bytes]:
        return self._dnsmasq(
            "dnsmasq-tftp",
            ["--port=0", "--enable-tftp", f"--tftp-root={self.assets}", "--tftp-max=100"],
            ["udp:69"],
        )

    def start_dnsmasq_dns(self) -> subprocess.Popen[bytes]:
        records = [
            f"--host-record={name}.{DOMAIN},{ip}"
            for name, _, ip in map(machine, range(1, MACHINES + 1))
        ]
        return self._dnsmasq(
            "dnsmasq-dns",
            ["--port=53", f"--listen-address={SERVER_IP}", "--cache-size=1000", *records],
            ["udp:53"],
        )

    def start_tftpd_hpa(self) -> subprocess.Popen[bytes]:
        argv = [
            tool("in.tftpd"),
            "--foreground",
            "--secure",
            "--user",
            "root",
            "--address",
            f"{SERVER_IP}:69",
            str(self.assets),
        ]
        return self._start(argv, "tftpd-hpa", ["udp:69"])

    def start_nginx(self) -> subprocess.Popen[bytes]:
        run = self.fresh_dir("nginx")
        conf = run / "nginx.conf"
        # One worker with sendfile: the anchor. The boot files live under /assets/ as
        # in Pixiebox, so both are asked for the same URL.
        conf.write_text(f"""
daemon off;
master_process on;
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    server {{
        listen {SERVER_IP}:80;
        root {self.workdir};
    }}
}}
""")
        return self._start([tool("nginx"), "-c", str(conf), "-p", str(run)], "nginx", ["tcp:80"])

    @contextlib.contextmanager
    def server_pinned(self, cpu: int) -> Iterator[None]:
        """The running server process, every thread and child of it (and so every one it
        starts meanwhile), on CPU `cpu` only; all CPUs again afterwards."""
        assert self._proc is not None
        everywhere = os.sched_getaffinity(0)

        def set_tree(pid: int, cpus: set[int]) -> None:
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(int(task), cpus)
                        children = Path(f"/proc/{pid}/task/{task}/children").read_text()
                        for child in children.split():
                            set_tree(int(child), cpus)

        set_tree(self._proc.pid, {cpu})
        try:
            yield
        finally:
            if self._proc is not None:
                set_tree(self._proc.pid, everywhere)

    # -- client side ------------------------------------------------------------

    def client_run(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return self.client.run(argv, timeout=timeout, check=False)

    def client_popen(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        """A client process in the client namespace, output captured (bounded by the caller)."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.client.name, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )


def now() -> float:
    return time.monotonic()
