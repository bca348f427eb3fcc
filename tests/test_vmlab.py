"""The VM harness: QEMU machines on a netlab segment boot the test OS, directly and by PXE.

A "router" host runs dnsmasq (DHCP, and TFTP for UEFI's own PXE client) and a plain HTTP server
holding the test OS and an iPXE script; no Pixiebox agent takes part yet.  Boot times (power-on
to ``PIXIEBOX-TESTOS: up``) are printed and recorded as the ``boot_seconds`` property: they are
measurements, never assertions.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import netlab
import pytest
import vmlab

IPXE_EFI = Path("/usr/lib/ipxe/ipxe.efi")

ROUTER_IP = "10.79.0.1"
RANGE = ("10.79.0.100", "10.79.0.150")
HTTP_PORT = 8000
URL = f"http://{ROUTER_IP}:{HTTP_PORT}"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPixieboxTestKeyOnly test@pixiebox"
UP = "PIXIEBOX-TESTOS: up"
ADDRESS_RE = re.compile(r"PIXIEBOX-TESTOS: address (\S+) via (\S+)")
BOOT_TIMEOUT = 120.0  # direct boot
PXE_BOOT_TIMEOUT = 240.0  # firmware + iPXE + downloads under TCG, on a loaded 2-core machine


def _skip_or_fail(problem: str) -> None:
    if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
        pytest.fail(f"CI=true but VM prerequisite missing: {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture
def vm_require(netlab_require: Callable[..., None]) -> None:
    netlab_require("dnsmasq", vmlab.QEMU)


def start_http_server(host: netlab.Host, directory: Path) -> None:
    """``python3 -m http.server`` on ``host``, serving ``directory``; returns once listening."""
    proc = host.popen(
        [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", ROUTER_IP,
         "--directory", str(directory)],
        host.log_path("http"),
    )  # fmt: skip

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"http.server exited with {proc.returncode}")
        out = host.run(["ss", "-H", "-tln"], timeout=5.0).stdout
        return f":{HTTP_PORT} " in out

    netlab.wait_until(listening, 10.0, 0.05, f"http.server on {host.name}:{HTTP_PORT}")


def serve_dir(workdir: Path, testos: tuple[Path, Path] | None = None, name: str = "") -> Path:
    """The HTTP root: ssh.keys; with ``testos`` its kernel, initrd and a boot.ipxe for ``name``."""
    root = workdir / "http"
    root.mkdir()
    (root / "ssh.keys").write_text(f"{SSH_KEY}\n")
    if testos is not None:
        kernel, initrd = testos
        shutil.copyfile(kernel, root / "vmlinuz")
        shutil.copyfile(initrd, root / "initrd")
        # initrd=initrd: Linux's EFI stub loads the initrd by that name from iPXE's image
        # files (this 2019 iPXE has no LoadFile2 initrd); the BIOS path ignores it.
        # BOOTIF lets the test OS pick the NIC iPXE booted from.
        (root / "boot.ipxe").write_text(
            "#!ipxe\n"
            "echo Pixiebox test boot.ipxe for ${netX/mac}\n"
            f"kernel {URL}/vmlinuz initrd=initrd console=ttyS0 pixiebox.url={URL}"
            f" pixiebox.name={name} BOOTIF=01-${{netX/mac:hexhyp}}\n"
            f"initrd {URL}/initrd\n"
            "boot\n"
        )
    return root


def assert_booted(vm: vmlab.VM, text: str, name: str) -> float:
    """The test OS's lines: an address from dnsmasq's range, the key, ``up NAME``."""
    match = ADDRESS_RE.search(text)
    assert match, text[-3000:]
    address = ipaddress.IPv4Interface(match.group(1))
    low, high = (ipaddress.IPv4Address(a) for a in RANGE)
    assert low <= address.ip <= high, f"{vm.name} got {address}, not from dnsmasq's {RANGE}"
    assert address.network == ipaddress.IPv4Network("10.79.0.0/24")
    assert f"PIXIEBOX-TESTOS: key {SSH_KEY}" in text
    assert f"{UP} {name}\n" in text
    return vm.elapsed()


def report_boot(record_property: Callable[[str, object], None], label: str, seconds: float) -> None:
    record_property("boot_seconds", round(seconds, 1))
    print(f"\n{label}: power-on to up in {seconds:.1f} s ({vmlab._accel()})")


def test_test_os_direct_boot_gets_address_and_keys(
    vm_require: None,
    testos: tuple[Path, Path],
    segment: netlab.Segment,
    workdir: Path,
    record_property: Callable[[str, object], None],
) -> None:
    router = segment.add_host("router", ip=f"{ROUTER_IP}/24")
    netlab.start_dnsmasq_router(router, *RANGE, ping_check=False)
    start_http_server(router, serve_dir(workdir))
    kernel, initrd = testos
    vm = vmlab.start_vm(
        segment, "t1", "52:54:00:79:00:01", firmware="bios",
        kernel=kernel, initrd=initrd,
        append=f"console=ttyS0 pixiebox.url={URL} pixiebox.name=t1",
        workdir=workdir,
    )  # fmt: skip
    text = vm.wait_console(f"{UP} t1", BOOT_TIMEOUT)
    seconds = assert_booted(vm, text, "t1")
    assert "PIXIEBOX-TESTOS: started" in text
    match = ADDRESS_RE.search(text)
    assert match and match.group(2) == "eth0", "the test OS did not use the VM's one NIC"
    report_boot(record_property, "direct boot (bios)", seconds)


@pytest.mark.parametrize(
    ("firmware", "pxe"),
    [("bios", "ipxe-rom"), ("uefi", "ipxe-rom"), ("uefi", "native")],
)
def test_vm_pxe_boots_the_test_os_through_an_ipxe_script(
    vm_require: None,
    testos: tuple[Path, Path],
    segment: netlab.Segment,
    workdir: Path,
    record_property: Callable[[str, object], None],
    firmware: vmlab.Firmware,
    pxe: vmlab.Pxe,
) -> None:
    tftp_root = workdir / "tftp"
    tftp_root.mkdir()
    shutil.copyfile(IPXE_EFI, tftp_root / "ipxe.efi")
    name = f"pxe-{firmware}-{pxe}".replace("ipxe-rom", "rom")
    router = segment.add_host("router", ip=f"{ROUTER_IP}/24")
    netlab.start_dnsmasq_router(
        router, *RANGE, ping_check=False,
        extra_args=[
            # iPXE (the ROM, or ipxe.efi once chained) says so in its user class: give it the
            # script URL; give UEFI's own PXE client (x86-64 UEFI, arch 7) ipxe.efi by TFTP.
            "--dhcp-userclass=set:ipxe,iPXE",
            "--dhcp-match=set:efi64,option:client-arch,7",
            f"--dhcp-boot=tag:ipxe,{URL}/boot.ipxe",
            "--dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi",
            "--enable-tftp", f"--tftp-root={tftp_root}",
            "--user=root",  # pytest's tmp dirs are 0700: dnsmasq as nobody could not read them
        ],
    )  # fmt: skip
    start_http_server(router, serve_dir(workdir, testos, name))
    vm = vmlab.start_vm(
        segment, name, "52:54:00:79:00:02", firmware=firmware, pxe=pxe, workdir=workdir
    )
    text = vm.wait_console(f"{UP} {name}", PXE_BOOT_TIMEOUT)
    seconds = assert_booted(vm, text, name)
    assert "Pixiebox test boot.ipxe for 52:54:00:79:00:02" in text  # iPXE ran our script
    # Which PXE client did the first DHCP: EDK2's own (then TFTP) or the iPXE ROM.
    assert ("Start PXE over IPv4" in text) is (pxe == "native")
    report_boot(record_property, f"PXE boot ({firmware}, {pxe})", seconds)
