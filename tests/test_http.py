"""Boot HTTP: iPXE scripts, assets, pxelinux.cfg and keys, fetched by curl across a netns lab.

The server runs alone (tests/http_serve.py) in one namespace, curl in another. The generated
iPXE scripts are also run through a small interpreter of the iPXE commands they use (the
semantics of ipxe.org/scripting: `&&`, `||`, goto, a failing line ends the script), so the retry
loop and `exit 1` are exercised without a VM; the commands are checked against the strings of
Debian's iPXE build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import netlab
import pytest
from pixiebox.boot.ipxe_script import (
    FETCH_TRIES,
    MAX_RETRY_WAIT,
    ignore_script,
    initrd_names,
    ipxe_script,
    pxelinux_config,
)
from pixiebox.config import ImageSection, load_config
from pixiebox.core.firmware import arch_info, packaged_ipxe_dir
from pixiebox.core.trixie import trixie_root
from pixiebox.core.urls import BootUrls
from pixiebox.events import Kind, fields_of
from pixiebox.http.boot import Refused, arch_from_query, resolve_asset
from pixiebox.store.state import StateStore

HTTP_SERVE = Path(__file__).resolve().parent / "http_serve.py"
SUBNET = "10.77.0.0/24"
SERVER_IP = "10.77.0.1"  # unknown = "discover", zero-copy
CLIENT_IP = "10.77.0.2"  # c1's reserved address
UNKNOWN_IP = "10.77.0.61"  # where the unknown machine is
IGNORE_IP = "10.77.0.3"  # unknown = "ignore"
COPY_IP = "10.77.0.4"  # pathsend switched off: files are copied through Python
ENROLLED_MAC = "f4:4d:30:64:7a:3a"
UNKNOWN_MAC = "f4:4d:30:64:8e:0f"
BOARD_MAC = "00:04:4b:2a:7c:01"  # tk1: a Jetson TK1 (armv7 U-Boot) that boots osie's armhf build
BOARD_IP = "10.77.0.62"
SSH_KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample me@laptop", "ssh-rsa AAAAB3Nza you@desk"]
KERNEL = b"kernel " * 40_000  # 280 kB
INITRD = bytes(range(256)) * 4096  # 1 MiB
# The ipxe.efi the agent serves: trixie's (the appliance's) where build.sh unpacked it.
IPXE_EFI = packaged_ipxe_dir(trixie_root("ipxe")) / "ipxe.efi"
BIG_SIZE = 100 * 1000 * 1000


def lab_toml(*, assets: Path, state: Path, server_ip: str, unknown: str) -> str:
    keys = ", ".join(f'"{key}"' for key in SSH_KEYS)
    return f"""
[lab]
name = "test"
[network]
interface = "eth0"
server_ip = "{server_ip}"
subnet = "{SUBNET}"
[boot]
unknown = "{unknown}"
assets = "{assets}"
image = "osie"
ssh_keys = [{keys}]
[images.osie]
kernel = "osie/vmlinuz"
initrd = ["osie/initrd"]
cmdline = "console=tty0 console=ttyS0,115200"
[images.osie.arch.arm64]
kernel = "osie-arm64/vmlinuz"
initrd = ["osie-arm64/initrd"]
cmdline = "console=ttyAMA0,115200"
[images.osie.arch.armhf]
kernel = "osie-armhf/vmlinuz"
initrd = ["osie-armhf/initrd"]
fdtdir = "osie-armhf/dtbs"
[images.big]
kernel = "osie/vmlinuz"
initrd = ["big/initrd.img"]
[state]
dir = "{state}"
[http]
listen = "{server_ip}:80"
[[machines]]
name = "c1"
mac = "{ENROLLED_MAC}"
ip = "{CLIENT_IP}"
[[machines]]
name = "tk1"
mac = "{BOARD_MAC}"
ip = "{BOARD_IP}"
"""


@dataclass
class Server:
    host: netlab.Host
    ip: str
    config: Path
    proc: subprocess.Popen[bytes]
    log: Path
    pid: int = 0

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, needle: str, timeout: float = 10.0, after: int = 0) -> str:
        def seen() -> str | None:
            text = self.text()
            if needle in text[after:]:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{text[-3000:]}")
            return None

        return netlab.wait_until(seen, timeout, 0.05, f"{needle!r} in:\n{self.text()[-3000:]}")

    def events(self, after: int = 0) -> list[dict[str, Any]]:
        """The machine events http_serve.py printed after offset `after` of its output."""
        return [json.loads(line[6:]) for line in self.text()[after:].splitlines()
                if line.startswith("EVENT ")]  # fmt: skip

    def wait_event(self, kind: str, after: int = 0, timeout: float = 10.0) -> dict[str, Any]:
        """The first event of `kind` printed after offset `after`."""

        def seen() -> dict[str, Any] | None:
            return next((e for e in self.events(after) if e["kind"] == kind), None)

        shown = f"a {kind} event in:\n{self.text()[-3000:]}"
        event: dict[str, Any] = netlab.wait_until(seen, timeout, 0.05, shown)
        # Only the fields the catalogue (pixiebox.events.KINDS) documents for that kind.
        assert set(event["fields"]) <= set(fields_of(Kind(kind))), event
        return event

    def sendfile_bytes(self) -> int:
        """Bytes this process has sent with os.sendfile(2) so far (http_serve.py counts)."""
        mark = len(self.text())
        os.kill(self.pid, signal.SIGUSR1)
        text = self.wait_log("SENDFILE ", after=mark)
        found = re.findall(r"SENDFILE calls=\d+ bytes=(\d+)", text[mark:])
        return int(found[-1])


def start_server(host: netlab.Host, ip: str, config_text: str, workdir: Path, *args: str) -> Server:
    config = workdir / f"lab-{host.role}.toml"
    config.write_text(config_text)
    log = host.log_path("http")
    proc = host.popen([sys.executable, str(HTTP_SERVE), str(config), *args], log)
    server = Server(host, ip, config, proc, log)
    text = server.wait_log("READY", timeout=20)
    server.pid = int(re.findall(r"READY \S+ pid=(\d+)", text)[0])
    return server


@dataclass
class BootLab:
    segment: netlab.Segment
    assets: Path
    workdir: Path
    client: netlab.Host
    server: Server
    ignoring: Server
    copying: Server
    #: The unknown machine (UNKNOWN_MAC) on the segment.
    unknown: netlab.Host
    #: tk1, the armv7 U-Boot board (BOARD_MAC).
    board: netlab.Host
    urls: BootUrls = field(init=False)

    def __post_init__(self) -> None:
        self.urls = BootUrls(IPv4Address(SERVER_IP))

    def curl(
        self, url: str, *args: str, check: bool = True, host: netlab.Host | None = None
    ) -> subprocess.CompletedProcess[str]:
        """curl from c1 (the client), or from `host`."""
        return (host or self.client).run(
            ["curl", "-sS", "--path-as-is", "--max-time", "60", *args, url], check=check
        )

    def status(self, url: str, *args: str) -> int:
        result = self.curl(url, "-o", "/dev/null", "-w", "%{http_code}", *args, check=False)
        return int(result.stdout or 0)


@pytest.fixture(scope="module")
def boot_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootLab]:
    problem = netlab.prerequisite_problem(("curl",))
    if problem:
        pytest.fail(problem) if os.environ.get("CI") else pytest.skip(problem)
    workdir = tmp_path_factory.mktemp("http")
    assets = workdir / "assets"
    (assets / "osie").mkdir(parents=True)
    (assets / "osie" / "vmlinuz").write_bytes(KERNEL)
    (assets / "osie" / "initrd").write_bytes(INITRD)
    (assets / "ipxe").mkdir()
    (assets / "ipxe" / "snp.efi").write_bytes(b"arm64 iPXE stand-in")
    for build in ("osie-arm64", "osie-armhf"):
        (assets / build).mkdir()
        (assets / build / "vmlinuz").write_bytes(f"{build} kernel".encode())
        (assets / build / "initrd").write_bytes(f"{build} initrd".encode())
    (assets / "osie-armhf" / "dtbs").mkdir()
    (assets / "osie-armhf" / "dtbs" / "tegra124-jetson-tk1.dtb").write_bytes(b"\xd0\x0d\xfe\xed")
    # What the reservation handler records from tk1's DISCOVER (option 93 = 21, U-Boot.armv7)
    # before the board asks for its pxelinux.cfg: this HTTP-only lab runs no DHCP server.
    armv7 = arch_info(21)
    assert armv7 is not None
    seeded = StateStore(workdir / "srv")
    try:
        seeded.record_seen(BOARD_MAC, armv7.cpu, str(armv7.firmware))
    finally:
        seeded.close()
    with netlab.Segment(workdir / "segment") as segment:
        hosts = {
            role: segment.add_host(role, ip=f"{ip}/24")
            for role, ip in (("srv", SERVER_IP), ("srvi", IGNORE_IP), ("srvc", COPY_IP))
        }
        client = segment.add_host("client", mac=ENROLLED_MAC, ip=f"{CLIENT_IP}/24")

        def server(role: str, ip: str, unknown: str, *args: str) -> Server:
            text = lab_toml(assets=assets, state=workdir / role, server_ip=ip, unknown=unknown)
            return start_server(hosts[role], ip, text, workdir, *args)

        lab = BootLab(
            segment,
            assets,
            workdir,
            client,
            server("srv", SERVER_IP, "discover"),
            server("srvi", IGNORE_IP, "ignore"),
            server("srvc", COPY_IP, "discover", "--no-pathsend"),
            segment.add_host("unknown", mac=UNKNOWN_MAC, ip=f"{UNKNOWN_IP}/24"),
            segment.add_host("board", mac=BOARD_MAC, ip=f"{BOARD_IP}/24"),
        )
        yield lab


def url(path: str, ip: str = SERVER_IP) -> str:
    return f"http://{ip}{path}"


# --------------------------------------------------------------------------- assets


def test_range_head_and_conditional_get(boot_lab: BootLab) -> None:
    kernel = url("/assets/osie/vmlinuz")
    for first, last in ((0, 0), (1000, 1999), (len(KERNEL) - 10, len(KERNEL) - 1)):
        piece = boot_lab.workdir / "piece"
        head = boot_lab.curl(kernel, "-r", f"{first}-{last}", "-D", "-", "-o", str(piece)).stdout
        assert head.startswith("HTTP/1.1 206"), head
        assert f"content-range: bytes {first}-{last}/{len(KERNEL)}" in head.lower()
        assert piece.read_bytes() == KERNEL[first : last + 1]
    suffix = boot_lab.client.run(["curl", "-sS", "-r", "-7", kernel]).stdout
    assert suffix.encode() == KERNEL[-7:]
    assert boot_lab.status(kernel, "-r", f"{len(KERNEL)}-") == 416

    # GRUB's HTTP client reads the length only from "Content-Length: " spelled so, and under
    # Secure Boot will not load a kernel of unknown length (docs/firmware-quirks.md#36).
    got = boot_lab.curl(kernel, "-D", "-", "-o", "/dev/null").stdout
    assert f"\nContent-Length: {len(KERNEL)}\n" in got, got
    head = boot_lab.curl(kernel, "-I").stdout.lower()
    assert head.startswith("http/1.1 200")
    assert f"content-length: {len(KERNEL)}" in head
    assert "accept-ranges: bytes" in head
    last_modified = re.search(r"last-modified: (.+)", head)
    etag = re.search(r'etag: ("[^"]+")', head)
    assert last_modified and etag
    assert boot_lab.status(kernel, "-H", f"If-Modified-Since: {last_modified.group(1)}") == 304
    assert boot_lab.status(kernel, "-H", f"If-None-Match: {etag.group(1)}") == 304
    older = formatdate((boot_lab.assets / "osie" / "vmlinuz").stat().st_mtime - 3600, usegmt=True)
    assert boot_lab.status(kernel, "-H", f"If-Modified-Since: {older}") == 200
    assert boot_lab.status(kernel, "-H", "If-Modified-Since: not a date") == 200


def test_kernel_and_initrd_on_one_keep_alive_connection(boot_lab: BootLab) -> None:
    out_kernel = boot_lab.workdir / "kernel.out"
    out_initrd = boot_lab.workdir / "initrd.out"
    mark = len(boot_lab.server.text())
    result = boot_lab.client.run(
        ["curl", "-sSv", url("/assets/osie/vmlinuz"), "-o", str(out_kernel),
         url("/assets/osie/initrd"), "-o", str(out_initrd)]
    )  # fmt: skip
    assert "Re-using existing connection" in result.stderr, result.stderr
    assert out_kernel.read_bytes() == KERNEL
    assert out_initrd.read_bytes() == INITRD
    kernel = boot_lab.server.wait_event("http.kernel", after=mark)
    initrd = boot_lab.server.wait_event("http.initrd", after=mark)
    assert kernel["who"] == initrd["who"] == ENROLLED_MAC
    assert kernel["fields"]["file"] == "/assets/osie/vmlinuz"
    assert kernel["fields"]["bytes"] == len(KERNEL) and kernel["fields"]["seconds"] >= 0
    assert (initrd["fields"]["file"], initrd["fields"]["bytes"]) == ("/assets/osie/initrd", 2**20)
    # The log line for people names the machine and what it does next.
    text = boot_lab.server.text()[mark:]
    assert re.search(
        rf"c1 \({ENROLLED_MAC}, {CLIENT_IP}\) received the kernel osie/vmlinuz "
        r"\(273\.4 KiB in [\d.]+ s\); next: initrd osie/initrd",
        text,
    ), text
    assert "received the initrd osie/initrd (1.0 MiB in " in text


TRAVERSALS = [
    "/assets/../../etc/passwd",
    "/assets/%2e%2e/%2e%2e/etc/passwd",
    "/assets/osie/%2E%2E/%2e%2e/%2e%2e/etc/passwd",
    "/assets/..%2f..%2f..%2fetc%2fpasswd",
    "/assets/osie/../../../../etc/passwd",
]


def test_traversal_is_refused_and_logged_once_per_burst(boot_lab: BootLab) -> None:
    """Every form is refused; the log line is an outsider's to cause at will, so a burst of
    them is one line (net.limits.LogLimiter), the rest counted on the next."""
    mark = len(boot_lab.server.text())
    for path in TRAVERSALS * 4:
        result = boot_lab.curl(url(path), "-w", "\n%{http_code}", check=False)
        body, _, status = result.stdout.rpartition("\n")
        assert status == "403", (path, result.stdout)
        assert "root:" not in body
    boot_lab.server.wait_log("climbs out of the assets directory", after=mark)
    assert boot_lab.server.text()[mark:].count("climbs out of the assets directory") == 1


def test_symlink_out_of_the_root_is_refused_and_one_inside_is_served(boot_lab: BootLab) -> None:
    (boot_lab.assets / "osie" / "passwd").symlink_to("/etc/passwd")
    (boot_lab.assets / "osie" / "current").symlink_to("vmlinuz")
    mark = len(boot_lab.server.text())
    assert boot_lab.status(url("/assets/osie/passwd")) == 403
    boot_lab.server.wait_log("leads outside the assets directory (to /etc/passwd)", after=mark)
    assert boot_lab.curl(url("/assets/osie/current")).stdout.encode() == KERNEL
    assert boot_lab.status(url("/assets/osie/missing")) == 404
    assert boot_lab.status(url("/assets/osie")) == 404  # a directory
    # `//` is a client joining URLs carelessly, not an escape: served, never redirected.
    assert boot_lab.status(url("/assets//osie//vmlinuz")) == 200


def test_boot_urls_are_never_redirected(boot_lab: BootLab) -> None:
    for path in (f"/boot/{ENROLLED_MAC}.ipxe/", "/ssh.keys/", "/ipxe/snp.efi/"):
        assert boot_lab.status(url(path)) == 404, path


def test_ipxe_binaries_for_http_boot(boot_lab: BootLab) -> None:
    assert boot_lab.curl(url("/ipxe/snp.efi")).stdout == "arm64 iPXE stand-in"
    assert boot_lab.status(url("/ipxe/snp.efi"), "-I") == 200
    if Path("/usr/lib/ipxe/undionly.kpxe").is_file():  # Debian's ipxe package
        size = Path("/usr/lib/ipxe/undionly.kpxe").stat().st_size
        head = boot_lab.curl(url("/ipxe/undionly.kpxe"), "-I").stdout.lower()
        assert f"content-length: {size}" in head
    mark = len(boot_lab.server.text())
    assert boot_lab.status(url("/ipxe/nope.efi")) == 404
    boot_lab.server.wait_log("asked for the iPXE build nope.efi", after=mark)


# --------------------------------------------------------------------------- scripts


def test_script_for_an_enrolled_machine(boot_lab: BootLab) -> None:
    mark = len(boot_lab.server.text())
    script = boot_lab.curl(url("/boot/F4-4D-30-64-7A-3A.ipxe"), "-D", "-").stdout
    head, _, script = script.partition("\n\n")
    assert "content-type: text/plain" in head.lower()
    assert script.startswith("#!ipxe\n")
    kernel_line = next(line for line in script.splitlines() if line.startswith("kernel "))
    assert f"http://{SERVER_IP}/assets/osie/vmlinuz" in kernel_line
    assert "initrd=initrd " in kernel_line
    assert "pixiebox.name=c1" in kernel_line
    assert f"pixiebox.mac={ENROLLED_MAC}" in kernel_line
    assert f"pixiebox.url=http://{SERVER_IP} " in kernel_line
    assert "console=tty0 console=ttyS0,115200" in kernel_line
    assert "BOOTIF=01-${mac:hexhyp}" in kernel_line
    assert "pixiebox.arch=${buildarch}" in kernel_line
    assert f"initrd --name initrd http://{SERVER_IP}/assets/osie/initrd" in script
    assert "prompt" not in script
    boot_lab.server.wait_log(
        f"c1 ({ENROLLED_MAC}) fetched its iPXE script; next: kernel osie/vmlinuz", after=mark
    )
    event = boot_lab.server.wait_event("http.script", after=mark)
    assert event["who"] == ENROLLED_MAC
    assert event["fields"] == {"file": "/boot/F4-4D-30-64-7A-3A.ipxe", "image": "osie",
                               "kernel": "osie/vmlinuz", "initrds": "osie/initrd"}  # fmt: skip
    # What iPXE fetches next is what the script names.
    for fetched in re.findall(rf"http://{SERVER_IP}/assets/\S+", script):
        assert boot_lab.status(fetched) == 200, fetched


def test_script_for_an_unknown_machine_under_discover_boots_the_default_image(
    boot_lab: BootLab,
) -> None:
    mark = len(boot_lab.server.text())
    script = boot_lab.curl(
        url(f"/boot/{UNKNOWN_MAC}.ipxe?arch=x86_64&platform=efi"), host=boot_lab.unknown
    ).stdout
    assert "osie/vmlinuz" in script and "initrd=initrd" in script
    assert re.search(r" pixiebox\.token=\S{20,} ", script), script
    assert "pixiebox.name=" not in script
    assert f"pixiebox.mac={UNKNOWN_MAC}" in script
    boot_lab.server.wait_log(
        f"unknown machine {UNKNOWN_MAC} fetched its iPXE script (default image osie); "
        "next: kernel osie/vmlinuz",
        after=mark,
    )
    # Recorded as discovered, with the firmware iPXE reported.
    store = StateStore(boot_lab.workdir / "srv")
    try:
        seen = {machine.mac: machine for machine in store.seen_machines()}
    finally:
        store.close()
    assert (seen[UNKNOWN_MAC].arch, seen[UNKNOWN_MAC].firmware) == ("x86_64", "UEFI")


def test_a_path_that_is_no_mac_gets_a_plain_400(boot_lab: BootLab) -> None:
    result = boot_lab.curl(url("/boot/not-a-mac.ipxe"), "-w", "\n%{http_code}", check=False)
    body, _, status = result.stdout.rpartition("\n")
    assert status == "400"
    assert "'not-a-mac' is not a MAC address" in body


def test_unknown_machine_under_ignore_exits_1_with_the_reason(boot_lab: BootLab) -> None:
    ignoring = boot_lab.ignoring
    mark = len(ignoring.text())
    script = boot_lab.curl(
        url(f"/boot/{UNKNOWN_MAC}.ipxe", IGNORE_IP), host=boot_lab.unknown
    ).stdout
    assert script.startswith("#!ipxe\n")
    assert "kernel" not in script
    assert script.rstrip().endswith("exit 1")
    assert (
        f"echo Pixiebox: unknown machine {UNKNOWN_MAC} is not booted ([boot] unknown = ignore); "
        f"enroll it with: pixiebox enroll {UNKNOWN_MAC} --name NAME" in script
    )
    ignoring.wait_log(
        f"unknown machine {UNKNOWN_MAC} fetched its iPXE script; told it to move on", after=mark
    )
    ignored = ignoring.wait_event("boot.ignored", after=mark)
    assert ignored["who"] == UNKNOWN_MAC
    assert ignored["fields"] == {"reason": "unknown-ignored", "protocol": "http"}
    # An enrolled machine still boots there, and U-Boot gets no config for the unknown one.
    assert "pixiebox.name=c1" in boot_lab.curl(url(f"/boot/{ENROLLED_MAC}.ipxe", IGNORE_IP)).stdout
    unknown_cfg = f"/pxelinux.cfg/01-{UNKNOWN_MAC.replace(':', '-')}"
    assert boot_lab.curl(url(unknown_cfg, IGNORE_IP), "-o", "/dev/null", "-w", "%{http_code}",
                         host=boot_lab.unknown, check=False).stdout == "404"  # fmt: skip


def test_a_script_fetched_for_another_mac_carries_no_token_and_records_nothing(
    boot_lab: BootLab,
) -> None:
    """c1 asks for the unknown machine's script: what it boots is public, but c1 is not that
    machine (the neighbour table says so), so no boot token and nothing in that machine's name."""
    other = "f4:4d:30:64:99:01"
    mark = len(boot_lab.server.text())
    script = boot_lab.curl(url(f"/boot/{other}.ipxe")).stdout
    assert script.startswith("#!ipxe") and "osie/vmlinuz" in script
    assert "pixiebox.token=" not in script
    # Not a machine the lab knows: the refusal goes to the lab's own log, not a new record.
    boot_lab.server.wait_log(
        f"refused boot token to {CLIENT_IP}: the neighbour table names another", after=mark
    )
    assert not [e for e in boot_lab.server.events(mark) if e["who"] == other]

    def stored_refusals() -> list[Any] | None:
        # The log line comes before the loop turn's commit: on a loaded machine, a read right
        # after it can miss the event.
        store = StateStore(boot_lab.workdir / "srv")
        try:
            assert other not in {machine.mac for machine in store.seen_machines()}
            found = [e for e in store.events("") if e.kind == "secret.refused"]
        finally:
            store.close()
        return found or None

    refused = netlab.wait_until(stored_refusals, 10.0, 0.1, "the stored secret.refused event")
    assert refused[-1].fields == {
        "secret": "boot-token",
        "ip": CLIENT_IP,
        "reason": "not-owner",
        "seen_mac": ENROLLED_MAC,
    }


def test_pxelinux_cfg_for_u_boot(boot_lab: BootLab) -> None:
    name = f"01-{ENROLLED_MAC.replace(':', '-')}"
    mark = len(boot_lab.server.text())
    text = boot_lab.curl(url(f"/pxelinux.cfg/{name}")).stdout
    served = boot_lab.server.wait_event("http.pxelinux", after=mark)
    assert (served["who"], served["fields"]) == (
        ENROLLED_MAC,
        {"file": f"pxelinux.cfg/{name}", "image": "osie", "kernel": "osie/vmlinuz"},
    )
    config = load_config(boot_lab.server.config)
    expected = pxelinux_config(
        boot_lab.urls, config.images["osie"], mac=ENROLLED_MAC, name="c1", image_name="osie"
    )
    # The board asked from its own address: its boot token is on the kernel command line.
    assert re.search(r" pixiebox\.token=\S{20,} ", text), text
    assert re.sub(r" pixiebox\.token=\S+", "", text) == expected
    lines = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert lines[:3] == ["DEFAULT pixiebox", "PROMPT 0", "LABEL pixiebox"]
    assert "KERNEL osie/vmlinuz" in lines
    assert "INITRD osie/initrd" in lines
    append = next(line for line in lines if line.startswith("APPEND "))
    assert f"BOOTIF=01-{ENROLLED_MAC.replace(':', '-')}" in append
    assert "pixiebox.name=c1" in append and "initrd=" not in append
    # `default` from c1's address is c1's file; U-Boot's UUID and hex-IP names are not served.
    default = boot_lab.curl(url("/pxelinux.cfg/default")).stdout
    assert re.sub(r" pixiebox\.token=\S+", "", default) == expected
    assert boot_lab.status(url("/pxelinux.cfg/0A4D0002")) == 404
    assert boot_lab.status(url("/pxelinux.cfg/0A4D")) == 404


def test_a_board_gets_the_build_for_the_architecture_dhcp_recorded(boot_lab: BootLab) -> None:
    """tk1's DHCP recorded option 93 = 21 (armv7 U-Boot): its pxelinux.cfg names osie's armhf
    build and its device trees, with no per-machine configuration."""
    name = f"01-{BOARD_MAC.replace(':', '-')}"
    mark = len(boot_lab.server.text())
    text = boot_lab.curl(url(f"/pxelinux.cfg/{name}"), host=boot_lab.board).stdout
    served = boot_lab.server.wait_event("http.pxelinux", after=mark)
    assert (served["who"], served["fields"]) == (
        BOARD_MAC,
        {"file": f"pxelinux.cfg/{name}", "image": "osie", "kernel": "osie-armhf/vmlinuz"},
    )
    lines = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert "KERNEL osie-armhf/vmlinuz" in lines
    assert "INITRD osie-armhf/initrd" in lines
    assert "FDTDIR osie-armhf/dtbs" in lines
    assert not [line for line in lines if line.startswith("FDT ")]
    append = next(line for line in lines if line.startswith("APPEND "))
    # The base's command line (the armhf table names none), the recorded CPU, its own token.
    assert append.startswith("APPEND console=tty0 console=ttyS0,115200 ")
    assert "pixiebox.name=tk1" in append and "pixiebox.arch=arm32" in append
    assert re.search(r" pixiebox\.token=\S{20,} ", append), append
    # What U-Boot fetches next is there (over TFTP; the same assets over HTTP here).
    for path in ("vmlinuz", "initrd", "dtbs/tegra124-jetson-tk1.dtb"):
        assert boot_lab.status(url(f"/assets/osie-armhf/{path}")) == 200, path
    # Still recorded as the armv7 U-Boot board DHCP saw (not a fixed armv8 guess).
    store = StateStore(boot_lab.workdir / "srv")
    try:
        seen = {machine.mac: machine for machine in store.seen_machines()}
    finally:
        store.close()
    assert (seen[BOARD_MAC].arch, seen[BOARD_MAC].firmware) == ("arm32", "U-Boot")


def test_the_ipxe_script_names_the_build_for_the_architecture_ipxe_reports(
    boot_lab: BootLab,
) -> None:
    script_url = url(f"/boot/{UNKNOWN_MAC}.ipxe")

    def kernel_line(query: str) -> str:
        script = boot_lab.curl(script_url + query, host=boot_lab.unknown).stdout
        return next(line for line in script.splitlines() if line.startswith("kernel "))

    arm64 = kernel_line("?arch=arm64")  # iPXE's ${buildarch} on arm64 UEFI
    assert f"http://{SERVER_IP}/assets/osie-arm64/vmlinuz " in arm64
    assert "initrd=initrd " in arm64 and "console=ttyAMA0,115200 " in arm64
    assert "console=ttyS0" not in arm64
    # No ?arch: what was recorded for the MAC stands (DHCP's option 93 in a real lab).
    assert "/assets/osie-arm64/vmlinuz " in kernel_line("")
    # An x86-64 UEFI iPXE: the base image.
    x86 = kernel_line("?arch=x86_64&platform=efi")
    assert "/assets/osie/vmlinuz " in x86 and "console=ttyS0,115200 " in x86
    # The arm64 build's initrd is what an arm64 script fetches.
    script = boot_lab.curl(script_url + "?arch=arm64", host=boot_lab.unknown).stdout
    assert f"initrd --name initrd http://{SERVER_IP}/assets/osie-arm64/initrd" in script


def _without_date(head: str) -> str:
    return "\n".join(line for line in head.splitlines() if not line.lower().startswith("date:"))


def test_a_script_fetched_again_at_once_is_the_same_answer_and_one_event(
    boot_lab: BootLab,
) -> None:
    """iPXE fetches its script once per boot: the same URL again from the machine at once is
    the same step (http.script_cache). The server's protocol answers it (no ASGI app) with the
    bytes the app sent, the same boot token, and no second event or log line."""
    server = boot_lab.server
    mark = len(server.text())
    target = url(f"/boot/{ENROLLED_MAC.upper()}.ipxe?again=1")
    # Three fetches, the last two on one keep-alive connection.
    first = boot_lab.curl(target, "-D", "-").stdout.replace("\r\n", "\n")
    both = boot_lab.curl(target, "-D", "-", target, "-D", "-").stdout.replace("\r\n", "\n")
    head, _, body = first.partition("\n\n")
    assert re.search(r" pixiebox\.token=\S{20,} ", body), body
    assert both == first * 2 or _without_date(both) == _without_date(first * 2), (first, both)
    assert head.startswith("HTTP/1.1 200 OK\n") and "\nContent-Length: " in head, head
    assert "cache-control: no-store" in head and "content-type: text/plain" in head, head
    server.wait_event("http.script", after=mark)
    time.sleep(0.5)  # a second event would have been printed by now
    kinds = [e["kind"] for e in server.events(mark)]
    assert kinds == ["http.script"], kinds
    assert server.text()[mark:].count("fetched its iPXE script; next") == 1, server.text()[mark:]
    # HTTP/1.0 (each request its own connection): the answer ends the connection, and says so
    # the way the application's answer does.
    old = url(f"/boot/{ENROLLED_MAC.upper()}.ipxe?again=10")
    answers = [boot_lab.curl(old, "--http1.0", "-D", "-").stdout.replace("\r\n", "\n")
               for _ in range(2)]  # fmt: skip
    assert "connection: close" in answers[0].partition("\n\n")[0], answers[0]
    assert _without_date(answers[0]) == _without_date(answers[1])


_PIPELINED = """
import socket, sys
requests = b"".join(
    b"GET " + path.encode() + b" HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" for path in sys.argv[2:]
)
with socket.create_connection((sys.argv[1], 80), timeout=10) as sock:
    last = b"GET /ssh.keys HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n"
    sock.sendall(requests + last)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
sys.stdout.write(received.decode())
"""


def test_pipelined_requests_are_answered_in_order_around_kept_scripts(boot_lab: BootLab) -> None:
    """A kept script answered by the server's protocol never overtakes a request before it on
    the same connection that the application is still answering (HTTP/1.1 pipelining)."""
    script = f"/boot/{ENROLLED_MAC}.ipxe?pipelined=1"
    kept = boot_lab.curl(url(script)).stdout
    paths = [script, "/ssh.keys", script, "/assets/osie/missing", script]
    out = boot_lab.client.run([sys.executable, "-c", _PIPELINED, SERVER_IP, *paths]).stdout
    answers = re.split(r"(?=HTTP/1\.1 \d{3} )", out)[1:]
    assert [a.split()[1] for a in answers] == ["200", "200", "200", "404", "200", "200"], out
    bodies = [a.replace("\r\n", "\n").partition("\n\n")[2] for a in answers]
    assert bodies[0] == bodies[2] == bodies[4] == kept
    assert bodies[1].splitlines() == bodies[5].splitlines() == SSH_KEYS
    assert "connection: close" in answers[5].lower()


def test_another_client_never_gets_a_kept_script(boot_lab: BootLab) -> None:
    """A script kept for c1 (with its boot token) is c1's alone: the same URL from another
    machine is answered in full, without a token, and records a refusal."""
    target = url(f"/boot/{ENROLLED_MAC}.ipxe?kept=1")
    assert "pixiebox.token=" in boot_lab.curl(target).stdout
    mark = len(boot_lab.server.text())
    other = boot_lab.curl(target, host=boot_lab.unknown).stdout
    assert other.startswith("#!ipxe") and "pixiebox.token=" not in other
    assert "pixiebox.name=c1" in other
    boot_lab.server.wait_log(f"refused c1's boot token to {UNKNOWN_IP}", after=mark)


def test_ssh_keys(boot_lab: BootLab) -> None:
    result = boot_lab.curl(url("/ssh.keys"), "-D", "-").stdout
    head, _, body = result.partition("\n\n")
    assert "content-type: text/plain" in head.lower()
    assert body.splitlines() == SSH_KEYS
    assert body.endswith("\n")


# --------------------------------------------------------------------------- zero copy


def _strace_sendfile_bytes(output: str) -> int:
    """Sum of what sendfile(2) returned in `strace -e trace=sendfile` output."""
    return sum(int(n) for n in re.findall(r"sendfile\(.*?\)\s+=\s+(\d+)", output))


def test_100_mb_initrd_goes_out_through_sendfile(boot_lab: BootLab) -> None:
    big = boot_lab.assets / "big" / "initrd.img"
    big.parent.mkdir(exist_ok=True)
    digest = hashlib.sha256()
    with big.open("wb") as file:
        for _ in range(BIG_SIZE // 1_000_000):
            chunk = os.urandom(1_000_000)
            digest.update(chunk)
            file.write(chunk)
    expected = digest.hexdigest()
    server = boot_lab.server
    out = boot_lab.workdir / "big.out"
    before = server.sendfile_bytes()
    tracer = _attach_strace(server.pid, boot_lab.workdir / "strace.out")
    mark = len(server.text())
    try:
        boot_lab.curl(url("/assets/big/initrd.img"), "-o", str(out))
    finally:
        traced = _detach_strace(tracer)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
    out.unlink()
    # The file went out through os.sendfile(2), counted by the process itself...
    assert server.sendfile_bytes() - before == BIG_SIZE
    # ...and seen by the kernel's syscall tracer, when strace is installed.
    if traced is not None:
        assert _strace_sendfile_bytes(traced) == BIG_SIZE, traced[-2000:]
    sent = server.wait_event("http.initrd", after=mark)
    assert (sent["fields"]["file"], sent["fields"]["bytes"]) == ("/assets/big/initrd.img", BIG_SIZE)
    server.wait_log(f"received the initrd big/initrd.img ({BIG_SIZE / 2**20:.1f} MiB", after=mark)

    # The same check fails for a server that streams the file through Python.
    copying = boot_lab.copying
    boot_lab.curl(url("/assets/big/initrd.img", COPY_IP), "-o", str(out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
    out.unlink()
    assert copying.sendfile_bytes() == 0

    # A Range request streams normally, exactly the bytes asked for.
    boot_lab.curl(url("/assets/big/initrd.img"), "-r", "50000000-50000099", "-o", str(out))
    with big.open("rb") as file:
        file.seek(50_000_000)
        assert out.read_bytes() == file.read(100)


def test_a_broken_off_download_is_logged_and_a_stop_cuts_transfers_short(
    boot_lab: BootLab, tmp_path: Path
) -> None:
    # Sparse and large: socket buffers swallow tens of megabytes before a slow reader stalls.
    big = boot_lab.assets / "osie" / "slow.img"
    with big.open("wb") as file:
        file.truncate(400_000_000)
    (boot_lab.assets / "osie" / "initrd").rename(boot_lab.assets / "osie" / "initrd.orig")
    (boot_lab.assets / "osie" / "initrd").symlink_to("slow.img")
    try:
        server = boot_lab.server
        mark = len(server.text())
        # The client gives up after a second, at 1 MB/s: far from the end.
        result = boot_lab.curl(
            url("/assets/osie/initrd"), "--limit-rate", "1M", "--max-time", "1", "-o", "/dev/null",
            check=False,
        )  # fmt: skip
        assert result.returncode == 28  # curl: operation timed out
        text = server.wait_log("broke off the download of the initrd osie/initrd", after=mark)
        assert f"c1 ({ENROLLED_MAC}, {CLIENT_IP}) broke off" in text[mark:]
        broken = server.wait_event("http.failed", after=mark)
        assert broken["who"] == ENROLLED_MAC
        assert broken["fields"]["file"] == "/assets/osie/initrd"
        assert broken["fields"]["reason"] == "broken" and broken["fields"]["status"] == 200
        assert 0 <= broken["fields"]["bytes"] < 400_000_000
        assert "Exception in ASGI application" not in text[mark:]
        assert "ASGI callable returned without completing" not in text[mark:]

        # Stopping the server while two slow transfers run (one sendfile, one streamed Range):
        # it waits a few seconds, then cuts them off and exits cleanly.
        slow = ["curl", "-sS", "--limit-rate", "1M", "--max-time", "30", "-o", "/dev/null"]
        initrd = url("/assets/osie/initrd")
        clients = [
            boot_lab.client.popen([*slow, "-r", "0-300000000", initrd], tmp_path / "range.log"),
            boot_lab.client.popen([*slow, initrd], tmp_path / "whole.log"),
        ]
        time.sleep(1.0)
        mark = len(server.text())
        started = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        assert server.proc.wait(20) == 0
        took = time.monotonic() - started
        text = server.text()[mark:]
        assert "cutting off 2 unfinished transfer(s)" in text, text
        assert "boot HTTP stopped" in text
        assert "Traceback" not in text and "Exception in ASGI" not in text, text
        assert took < 15, took
        for client in clients:  # still reading what the kernel buffered, at 1 MB/s
            boot_lab.segment.stop(client)
    finally:
        (boot_lab.assets / "osie" / "initrd").unlink()
        (boot_lab.assets / "osie" / "initrd.orig").rename(boot_lab.assets / "osie" / "initrd")
        if boot_lab.server.proc.poll() is not None:  # later tests get a server again
            old = boot_lab.server
            config = old.config.read_text()
            boot_lab.server = start_server(old.host, old.ip, config, boot_lab.workdir)


def _attach_strace(pid: int, output: Path) -> subprocess.Popen[bytes] | None:
    strace = shutil.which("strace")
    if strace is None:
        return None
    errors = output.with_suffix(".err")
    proc = subprocess.Popen(
        [strace, "-f", "-e", "trace=sendfile", "-e", "signal=none", "-o", str(output),
         "-p", str(pid)],
        stdout=subprocess.DEVNULL, stderr=errors.open("wb"), start_new_session=True,
    )  # fmt: skip
    netlab.wait_until(
        lambda: "attached" in errors.read_text(errors="replace") or proc.poll() is not None,
        10.0, 0.05, "strace attaching",
    )  # fmt: skip
    if proc.poll() is not None:
        raise AssertionError(f"strace failed: {errors.read_text(errors='replace')}")
    return proc


def _detach_strace(proc: subprocess.Popen[bytes] | None) -> str | None:
    if proc is None:
        return None
    proc.send_signal(signal.SIGINT)  # strace detaches and exits
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        netlab.kill_process_group(proc)
    output = Path(proc.args[proc.args.index("-o") + 1])  # type: ignore[union-attr]
    return output.read_text(errors="replace")


# --------------------------------------------------------------------------- the scripts, offline


class ScriptEnded(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass
class IpxeRun:
    """One run of a script through `run_ipxe`: what it printed, slept, fetched and booted."""

    status: int | None = None
    echoed: list[str] = field(default_factory=list)
    slept: list[int] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    images: dict[str, list[str]] = field(default_factory=dict)  # name -> [url, args...]
    booted: list[str] | None = None  # the kernel's arguments when `boot` ran


IPXE_COMMANDS = {"echo", "set", "inc", "iseq", "goto", "sleep", "kernel", "initrd", "imgfree"}
IPXE_COMMANDS |= {"boot", "exit"}
_SETTING = re.compile(r"\$\{([a-z_]+)(?::([a-z0-9]+))?\}")


def run_ipxe(
    script: str,
    fetch_ok: Callable[[str, int], bool] = lambda url, attempt: True,
    boot_ok: bool = True,
    max_steps: int = 5000,
) -> IpxeRun:
    """Run `script` the way iPXE's shell does (ipxe.org/scripting; src/core/exec.c): a line is
    commands joined by `&&` / `||`, each run or skipped by the status so far; `goto` ends the
    line; a line whose final status is a failure ends the script with it; `exit N` ends it with
    N. Downloads succeed as `fetch_ok(url, attempt)` says; a `boot` that works never returns."""
    lines = script.splitlines()
    assert lines[0] == "#!ipxe"
    labels = {line[1:].split()[0]: n for n, line in enumerate(lines) if line.startswith(":")}
    settings = {"buildarch": "x86_64", "platform": "efi", "mac": "52:54:00:12:34:56"}
    run = IpxeRun()
    attempts: dict[str, int] = {}

    def expand(word: str) -> str:
        def value(match: re.Match[str]) -> str:
            name, kind = match.group(1), match.group(2)
            assert name in settings, f"${{{name}}} is not set here"
            if kind == "hexhyp":
                return settings[name].replace(":", "-")
            assert kind is None, kind
            return settings[name]

        return _SETTING.sub(value, word)

    def execute(argv: list[str]) -> tuple[int, int | None]:
        """(status, goto line or None)."""
        if not argv:
            return 0, None  # an empty command succeeds (`cmd ||`)
        command, args = argv[0], [expand(arg) for arg in argv[1:]]
        assert command in IPXE_COMMANDS, f"unexpected iPXE command {command!r}"
        if command == "echo":
            run.echoed.append(" ".join(args))
        elif command == "set":
            name = args[0].split(":")[0]
            settings[name] = " ".join(args[1:])
        elif command == "inc":
            name = args[0]
            step = int(args[1]) if len(args) > 1 else 1
            settings[name] = str(int(settings.get(name, "0")) + step)
        elif command == "iseq":
            assert len(args) == 2, args
            return (0 if args[0] == args[1] else 1), None
        elif command == "goto":
            assert args[0] in labels, f"goto to a missing label {args[0]}"
            return 0, labels[args[0]]
        elif command == "sleep":
            run.slept.append(int(args[0]))
        elif command in ("kernel", "initrd"):
            assert args[0] == "--name", args
            name, target = args[1], args[2]
            attempts[target] = attempts.get(target, 0) + 1
            run.fetched.append(target)
            if not fetch_ok(target, attempts[target]):
                return 1, None
            run.images[name] = [target, *args[3:]]
        elif command == "imgfree":
            run.images.clear()
        elif command == "boot":
            if boot_ok:
                run.booted = run.images["kernel"][1:]
                raise ScriptEnded(0)
            return 1, None
        elif command == "exit":
            raise ScriptEnded(int(args[0]) if args else 0)
        return 0, None

    position = 1
    try:
        for _ in range(max_steps):
            if position >= len(lines):
                raise ScriptEnded(0)
            line = lines[position].strip()
            position += 1
            if not line or line.startswith(("#", ":")):
                continue
            assert "\t" not in line and "prompt" not in line.split()
            words = line.split()
            status, process, argv = 0, True, []
            jumped: int | None = None
            for word in [*words, None]:
                if word not in ("&&", "||", None):
                    argv.append(word)
                    continue
                if process:
                    status, jumped = execute(argv)
                    if jumped is not None:
                        break
                argv = []
                if word is not None:
                    process = status == 0 if word == "&&" else status != 0
            if jumped is not None:
                position = jumped + 1
            elif status != 0:
                raise ScriptEnded(status)
        raise AssertionError("the script did not end")
    except ScriptEnded as ended:
        run.status = ended.status
    return run


URLS = BootUrls(IPv4Address("192.168.1.64"))
OSIE = ImageSection(
    kernel="osie/vmlinuz", initrd=["osie/initrd", "extra/initrd"], cmdline="console=ttyS0,115200"
)


def osie_script(name: str | None = "c1") -> str:
    return ipxe_script(URLS, OSIE, mac=ENROLLED_MAC, name=name, image_name="osie")


def test_script_boots_with_every_initrd_named_on_the_command_line() -> None:
    run = run_ipxe(osie_script())
    assert run.status == 0
    assert run.booted is not None
    assert run.booted[:2] == ["initrd=initrd", "initrd=initrd-2"]
    assert set(run.images) == {"kernel", "initrd", "initrd-2"}
    assert run.images["initrd-2"][0] == "http://192.168.1.64/assets/extra/initrd"
    assert "BOOTIF=01-52-54-00-12-34-56" in run.booted
    assert "pixiebox.arch=x86_64" in run.booted
    assert "pixiebox.name=c1" in run.booted
    assert run.echoed[0] == f"Pixiebox: c1 ({ENROLLED_MAC}) boots image osie on x86_64 (efi)"
    assert run.slept == []


def test_script_retries_with_back_off_then_boots() -> None:
    kernel = URLS.asset("osie/vmlinuz")
    run = run_ipxe(osie_script(), lambda url, attempt: url != kernel or attempt > 4)
    assert run.status == 0 and run.booted is not None
    assert run.slept == [1, 2, 4, 8]
    assert run.fetched.count(kernel) == 5


def test_script_gives_up_after_ten_tries_and_exits_1_with_a_sentence() -> None:
    initrd = URLS.asset("extra/initrd")
    run = run_ipxe(osie_script(), lambda url, attempt: url != initrd)
    assert run.status == 1  # docs/firmware-quirks.md#24: 1 = next boot device
    assert run.booted is None
    assert run.fetched.count(initrd) == FETCH_TRIES
    assert run.slept == [1, 2, 4, 8] + [MAX_RETRY_WAIT] * (FETCH_TRIES - 5)
    assert run.echoed[-2] == f"Pixiebox: giving up on the initrd {initrd} after 10 attempts."
    assert "extra/initrd is in its [boot] assets directory" in run.echoed[-1]
    assert "http://192.168.1.64 is running" in run.echoed[-1]


def test_a_kernel_that_does_not_start_exits_1() -> None:
    run = run_ipxe(osie_script(), boot_ok=False)
    assert run.status == 1
    assert "did not start" in run.echoed[-1]


def test_ignore_script_says_why_and_exits_1() -> None:
    run = run_ipxe(ignore_script(UNKNOWN_MAC, "unknown machine\nis not booted"))
    assert run.status == 1
    assert run.echoed == [
        "Pixiebox: unknown machine is not booted",
        "Pixiebox: moving on to the next boot device.",
    ]
    assert run.fetched == []


@pytest.mark.skipif(not IPXE_EFI.is_file(), reason="Debian's ipxe package is not installed")
def test_every_command_and_setting_type_exists_in_debians_ipxe() -> None:
    """The words the scripts use are in the iPXE build the appliance ships (its command and
    setting-type tables are plain strings in ipxe.efi)."""
    strings = set(re.findall(rb"[\x20-\x7e]{2,}", IPXE_EFI.read_bytes()))
    script = osie_script() + ignore_script(UNKNOWN_MAC, "x")
    commands = {line.split()[0] for line in script.splitlines() if line[:1] not in ("#", ":", "")}
    for line in script.splitlines():
        commands |= set(re.findall(r"(?:&&|\|\|) (\w+)", line))
    assert commands <= IPXE_COMMANDS
    # The linker merges a string into the tail of a longer one ("boot" into "autoboot", "int32"
    # into "uint32"), so a word may only appear as the end of another.
    for word in sorted(commands | {"buildarch", "platform", "hexhyp", "int32"}):
        assert any(string.endswith(word.encode()) for string in strings), word


def test_initrd_names_are_unique_and_never_the_kernels() -> None:
    assert initrd_names(["a/initrd", "b/initrd", "c/kernel", "d/my file.img"]) == [
        "initrd", "initrd-2", "kernel-2", "my_file.img"
    ]  # fmt: skip


def test_pxelinux_config_without_a_mac_asks_u_boot_for_bootif() -> None:
    text = pxelinux_config(URLS, OSIE, mac=None, name=None, image_name="osie")
    assert "  IPAPPEND 2" in text
    assert "INITRD osie/initrd,extra/initrd" in text
    assert "U-Boot loads one initrd" in text
    assert text.index("INITRD") < text.index("APPEND")
    assert "pixiebox.mac" not in text


@pytest.mark.parametrize(
    ("arch", "platform", "expected"),
    [(None, None, (0, "x86_64", "BIOS")), ("i386", "pcbios", (0, "x86_64", "BIOS")),
     ("x86_64", "efi", (7, "x86_64", "UEFI")), ("arm64", None, (11, "arm64", "UEFI")),
     ("16", None, (16, "x86_64", "UEFI HTTP"))],
)  # fmt: skip
def test_arch_query(arch: str | None, platform: str | None, expected: tuple[int, str, str]) -> None:
    info = arch_from_query(arch, platform)
    assert info is not None
    assert (info.code, info.cpu, str(info.firmware)) == expected
    assert arch_from_query("mips", None) is None


def test_resolve_asset_stays_in_the_root(tmp_path: Path) -> None:
    root = tmp_path / "assets"
    (root / "osie").mkdir(parents=True)
    (root / "osie" / "vmlinuz").write_bytes(b"k")
    (tmp_path / "secret").write_text("s")
    (root / "osie" / "up").symlink_to("../../secret")
    assert resolve_asset(root, "osie//./vmlinuz")[0] == (root / "osie" / "vmlinuz").resolve()
    refusals = {"../secret": 403, "osie/up": 403, "osie/\0x": 403, "osie/none": 404, "": 404}
    for bad, status in {**refusals, "osie": 404}.items():
        with pytest.raises(Refused) as refused:
            resolve_asset(root, bad)
        assert refused.value.status == status, bad
