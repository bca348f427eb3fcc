"""The agent's side of the signed chain (issue 16): which machines get shim instead of iPXE
(core.decision), what DHCP hands them (dhcp.policy), the files TFTP serves them (core.firmware,
tftp.files) and the GRUB configuration rendered for them (boot.grub_cfg). Plain data, no root;
GRUB's own parser (grub-script-check, grub-common 2.12) reads every rendered configuration."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from pixiebox.boot.grub_cfg import (
    BOOTSTRAP,
    bootstrap_config,
    grub_config,
    grub_for,
    http_path,
    nothing_config,
)
from pixiebox.boot.ipxe_script import FETCH_TRIES
from pixiebox.boot.pxelinux import tftp_generator
from pixiebox.config import ImageSection, LabConfig
from pixiebox.core.decision import (
    Chain,
    LabView,
    Loader,
    Silence,
    decide,
    secure_boot_summary,
)
from pixiebox.core.evidence import Source
from pixiebox.core.firmware import SHIM, SIGNED_GRUB, ArchInfo, Assets, arch_info
from pixiebox.core.inventory import Inventory
from pixiebox.core.urls import BootUrls
from pixiebox.dhcp.codec import MessageType
from pixiebox.dhcp.policy import BootPolicy
from pixiebox.dhcp.proxy import ProxyHandler
from pixiebox.events import Kind
from pixiebox.store.state import StateStore
from pixiebox.tftp.engine import NotFound
from pixiebox.tftp.files import BootFiles, expected_missing, places_for
from test_decision import FakeBackend, packet

NUC = "02:00:00:00:00:01"  # secure_boot = true
OLD = "02:00:00:00:00:02"  # secure_boot = false
PLAIN = "02:00:00:00:00:03"  # follows [boot]
STRANGER = "02:00:00:00:00:99"
SERVER = IPv4Address("10.77.0.2")
NUC_IP = IPv4Address("10.77.0.31")


def config(*, default: bool = False, unknown: str = "discover") -> LabConfig:
    return LabConfig.model_validate({
        "network": {"subnet": "10.77.0.0/24"},
        "boot": {"unknown": unknown, "secure_boot": default},
        "images": {"osie": {"kernel": "osie/vmlinuz", "initrd": ["osie/initrd"],
                            "cmdline": "console=tty0 console=ttyS0,115200"}},
        "machines": [{"name": "nuc", "mac": NUC, "secure_boot": True},
                     {"name": "old", "mac": OLD, "secure_boot": False},
                     {"name": "plain", "mac": PLAIN}],
    })  # fmt: skip


def arch(code: int) -> ArchInfo:
    info = arch_info(code)
    assert info is not None
    return info


def everything(name: str) -> bool:
    return True


# --- the decision ----------------------------------------------------------------------------


def test_a_machine_with_secure_boot_gets_the_signed_chain_on_x86_64_uefi_only() -> None:
    lab = LabView.of(config())
    assert decide(lab, NUC, arch(7)).chain is Chain.SIGNED
    for code in (2, 8, 9):  # docs/firmware-quirks.md#12: all x86-64 UEFI
        assert decide(lab, NUC, arch(code)).chain is Chain.SIGNED
    # No Secure Boot to pass on BIOS, no x86-64 shim for ARM, and UEFI HTTP boot is not done
    # this way: iPXE as before.
    for code in (0, 11, 16, 22):
        assert decide(lab, NUC, arch(code)).chain is Chain.IPXE, code
    # An iPXE script fetch cannot tell the firmware: only iPXE makes one.
    assert decide(lab, NUC, None).chain is Chain.IPXE
    assert decide(lab, PLAIN, arch(7)).chain is Chain.IPXE
    assert decide(lab, STRANGER, arch(7)).chain is Chain.IPXE


def test_boot_secure_boot_is_the_default_for_every_machine_unknown_ones_included() -> None:
    lab = LabView.of(config(default=True))
    assert decide(lab, PLAIN, arch(7)).chain is Chain.SIGNED
    assert decide(lab, STRANGER, arch(7)).chain is Chain.SIGNED
    assert decide(lab, OLD, arch(7)).chain is Chain.IPXE  # its own false wins
    ignored = decide(LabView.of(config(default=True, unknown="ignore")), STRANGER, arch(7))
    assert ignored.silent is Silence.UNKNOWN_IGNORED


def test_the_signed_chain_needs_shim_and_grub_and_never_falls_back_to_ipxe() -> None:
    lab = LabView.of(config())
    both = decide(lab, NUC, arch(7), loaders=lambda n: n in {SHIM, SIGNED_GRUB, "ipxe.efi"})
    assert both.boots and both.loader == Loader(SHIM, SHIM)
    # Firmware with Secure Boot on would refuse ipxe.efi: nothing, so it moves on.
    for present in ({SHIM, "ipxe.efi"}, {SIGNED_GRUB, "ipxe.efi"}):
        missing = decide(lab, NUC, arch(7), loaders=lambda n, p=present: n in p)  # type: ignore[misc]
        assert missing.loader is None and missing.silent is Silence.NO_LOADER
    assert decide(lab, PLAIN, arch(7), loaders=everything).loader == Loader("ipxe.efi", "ipxe.efi")


def test_check_explains_both_keys() -> None:
    text = secure_boot_summary(config())
    assert "iPXE ([boot] secure_boot = false)" in text
    assert "signed chain" in text and "for nuc (secure_boot = true)" in text
    assert "signed/shimx64.efi" in text and "signed/grubx64.efi" in text
    text = secure_boot_summary(config(default=True))
    assert "every x86-64 UEFI machine, unknown ones included" in text
    assert "iPXE for old (secure_boot = false)" in text
    plain = LabConfig.model_validate({})
    assert plain.boot.secure_boot is False
    assert "signed/" not in secure_boot_summary(plain)


def test_lab_toml_rejects_a_non_boolean_secure_boot() -> None:
    with pytest.raises(ValueError, match="secure_boot"):
        LabConfig.model_validate({"machines": [{"name": "a", "mac": NUC, "secure_boot": "maybe"}]})


# --- DHCP and the files ----------------------------------------------------------------------


def assets(tmp_path: Path, *names: str) -> Assets:
    root = tmp_path / "assets"
    (root / "ipxe").mkdir(parents=True)
    for name in ("ipxe/ipxe.efi", "ipxe/undionly.kpxe", *names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    return Assets(root, system_ipxe=tmp_path / "none")


def proxy(tmp_path: Path, files: Assets, **kw: bool) -> tuple[ProxyHandler, FakeBackend]:
    backend = FakeBackend(LabView.of(config(**kw)))
    return ProxyHandler(backend, BootPolicy(files, BootUrls(SERVER))), backend


def test_dhcp_hands_shim_to_a_uefi_machine_with_secure_boot(tmp_path: Path) -> None:
    handler, backend = proxy(tmp_path, assets(tmp_path, SHIM, SIGNED_GRUB))
    reply = handler.handle(packet(MessageType.DISCOVER, NUC, 7), 67)
    assert reply is not None and reply.file == b"signed/shimx64.efi"
    assert reply.siaddr == SERVER  # shim fetches grubx64.efi from siaddr (rhboot/shim netboot.c)
    fields = backend.events[-1][2]
    assert fields is not None and fields["boot_file"] == "signed/shimx64.efi"
    # The same machine as a BIOS PC, and a machine without secure_boot: iPXE.
    bios = handler.handle(packet(MessageType.DISCOVER, NUC, 0), 67)
    assert bios is not None and bios.file == b"undionly.kpxe"
    plain = handler.handle(packet(MessageType.DISCOVER, PLAIN, 7), 67)
    assert plain is not None and plain.file == b"ipxe.efi"


def test_dhcp_stays_silent_when_the_signed_chain_is_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handler, _ = proxy(tmp_path, assets(tmp_path, SHIM), default=True)  # no GRUB
    assert handler.handle(packet(MessageType.DISCOVER, STRANGER, 7), 67) is None
    line = next(r.getMessage() for r in caplog.records if "Secure Boot" in r.getMessage())
    assert "grubnetx64.efi.signed" in line and "signed/grubx64.efi" in line


def test_tftp_serves_the_signed_files_and_not_a_link_out_of_the_assets(tmp_path: Path) -> None:
    files = assets(tmp_path, SHIM, SIGNED_GRUB)
    assert files.signed_binary(SIGNED_GRUB) == (files.root / SIGNED_GRUB).resolve()
    served = BootFiles(places_for(files.root, files.fallback_places))
    # shim asks for grubx64.efi in the directory of the boot file DHCP named.
    path, source = served.open("signed/grubx64.efi", str(NUC_IP))
    assert (path, source.size) == ("signed/grubx64.efi", len(SIGNED_GRUB))
    os.close(source.fd)
    outside = tmp_path / "elsewhere.efi"
    outside.write_bytes(b"x")
    (files.root / SIGNED_GRUB).unlink()
    (files.root / SIGNED_GRUB).symlink_to(outside)
    assert files.signed_binary(SIGNED_GRUB) is None
    assert files.loader_file(SIGNED_GRUB) is None


def test_grubs_probes_are_expected_misses() -> None:
    for probe in ("grub/x86_64-efi/grub.cfg", "grub/x86_64-efi/command.lst", "grub/grub.cfg-amd64"):
        assert expected_missing(probe) is not None, probe
    assert expected_missing("grub/grub.cfg") is None
    assert expected_missing("autoexec.ipxe") is not None  # the old rule still holds


# --- the GRUB configuration ------------------------------------------------------------------

URLS = BootUrls(SERVER)
OSIE = ImageSection(kernel="osie/vmlinuz", initrd=["osie/initrd", "extra/a b.cpio"],
                    cmdline="console=tty0 console=ttyS0,115200")  # fmt: skip


def grub_syntax(text: str, tmp_path: Path) -> None:
    """GRUB's own parser reads `text` (grub-common's grub-script-check)."""
    tool = shutil.which("grub-script-check")
    if tool is None:
        problem = "grub-script-check not found (grub-common; build.sh installs it for images)"
        if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
            pytest.fail(f"CI=true but prerequisite missing: {problem}", pytrace=False)
        pytest.skip(problem)
    path = tmp_path / "grub.cfg"
    path.write_text(text)
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{text}"


def test_the_config_boots_kernel_and_initrds_over_http_with_the_ipxe_command_line(
    tmp_path: Path,
) -> None:
    text = grub_config(URLS, OSIE, mac=NUC, name="nuc", image_name="osie", token="T0KEN")
    linux = next(line for line in text.splitlines() if line.lstrip().startswith("if linux "))
    assert linux.split()[2] == "'(http,10.77.0.2)/assets/osie/vmlinuz'"
    words = re.findall(r"'([^']*)'", linux)[1:]
    assert words == [
        "console=tty0", "console=ttyS0,115200", "pixiebox.url=http://10.77.0.2",
        f"pixiebox.mac={NUC}", "pixiebox.name=nuc", "pixiebox.token=T0KEN",
        "pixiebox.arch=x86_64", "BOOTIF=01-02-00-00-00-00-01",
    ]  # fmt: skip
    initrd = next(line for line in text.splitlines() if line.lstrip().startswith("if initrd "))
    assert "'(http,10.77.0.2)/assets/osie/initrd' '(http,10.77.0.2)/assets/extra/a%20b.cpio'" in (
        initrd
    )
    assert text.count(f"for pxb_try in {' '.join(map(str, range(1, FETCH_TRIES + 1)))}; do") == 2
    assert "  exit 1\n" in text and text.rstrip().endswith("exit 1")  # back to the firmware
    assert text.index("if linux") < text.index("if initrd") < text.index("\nboot\n")
    grub_syntax(text, tmp_path)


def test_the_config_keeps_grub_from_expanding_or_splitting_what_lab_toml_says(
    tmp_path: Path,
) -> None:
    odd = ImageSection(kernel="k/vmlinuz", cmdline="quiet x=$HOME y='a;b' z=\"c\"")
    text = grub_config(BootUrls(SERVER, 8080), odd, mac=NUC, name=None, image_name="odd")
    assert "(http,10.77.0.2:8080)/assets/k/vmlinuz" in text
    assert "'x=$HOME'" in text and "'y='\\''a;b'\\'''" in text
    assert "initrd" not in text.split("# ", 2)[1]  # no initrd line for an image without one
    assert "pixiebox.token" not in text
    grub_syntax(text, tmp_path)
    grub_syntax(bootstrap_config(), tmp_path)
    grub_syntax(nothing_config(NUC, "it's nothing"), tmp_path)


def test_http_path_quotes_like_boot_urls() -> None:
    assert http_path(URLS, "/a b/c") == "(http,10.77.0.2)/assets/a%20b/c"
    assert URLS.asset("/a b/c").endswith("/assets/a%20b/c")


def inventory(tmp_path: Path, **kw: bool | str) -> Inventory:
    return Inventory(config(**kw), StateStore(tmp_path / "state"))  # type: ignore[arg-type]


def test_grub_files_over_tftp_give_the_token_to_the_proven_machine_only(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    generate = tftp_generator(inv, URLS)
    bootstrap = generate(BOOTSTRAP, str(NUC_IP))
    assert bootstrap is not None and b"source $prefix/grub.cfg-$net_default_mac" in bootstrap
    # GRUB names the MAC as $net_default_mac prints it: lower-case, colons.
    name = f"grub/grub.cfg-{NUC}"
    # Nothing ties NUC to this address yet: a config without the token, and a refusal.
    stranger = generate(name, str(NUC_IP))
    assert stranger is not None and b"pixiebox.token" not in stranger
    assert any(e.kind == Kind.SECRET_REFUSED for e in inv.lifecycle.events(NUC))
    inv.learn(NUC, NUC_IP, Source.DHCP_REQUEST)
    owner = generate(name, str(NUC_IP))
    assert owner is not None
    token = re.search(rb"'pixiebox\.token=([^']+)'", owner)
    assert token is not None and inv.tokens.check(NUC, token.group(1).decode()) is None
    assert b"pixiebox.name=nuc" in owner
    # Not a MAC file, or a MAC written another way: not found.
    assert generate("grub/grub.cfg-amd64", str(NUC_IP)) is None
    assert generate("grub/grub.cfg-02-00-00-00-00-01", str(NUC_IP)) is None


def test_grub_files_for_ignored_and_imageless_machines(tmp_path: Path) -> None:
    inv = inventory(tmp_path, unknown="ignore")
    inv.learn(STRANGER, NUC_IP, Source.DHCP_REQUEST)
    assert grub_for(inv, URLS, f"grub/grub.cfg-{STRANGER}", NUC_IP) is None
    lab = config().model_copy(update={"images": {}})
    inv = Inventory(lab, StateStore(tmp_path / "state2"))
    inv.learn(NUC, NUC_IP, Source.DHCP_REQUEST)
    text = grub_for(inv, URLS, f"grub/grub.cfg-{NUC}", NUC_IP)
    assert text is not None and "[images.osie]" in text and text.rstrip().endswith("exit 1")


def test_tftp_answers_grub_files_from_the_generator(tmp_path: Path) -> None:
    files = assets(tmp_path, SHIM, SIGNED_GRUB)
    inv = inventory(tmp_path)
    served = BootFiles(places_for(files.root, files.fallback_places), tftp_generator(inv, URLS))
    path, source = served.open("/grub/grub.cfg", str(NUC_IP))  # GRUB sends the leading /
    assert path == BOOTSTRAP and source.size == len(bootstrap_config())
    os.close(source.fd)
    with pytest.raises(NotFound) as missed:
        served.open("/grub/x86_64-efi/command.lst", str(NUC_IP))
    assert missed.value.expected is not None
