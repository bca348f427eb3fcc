"""What a machine runs after DHCP: its iPXE script, or its pxelinux.cfg when U-Boot asks.

Pure text generation, no I/O, so the HTTP and TFTP servers hand out the same words and the
tests can read every line. Each script says on the machine's console what it is doing, retries
its downloads (a lab often powers on before the appliance is up) and, when it gives up, says why
in a sentence and ends with `exit 1` so the firmware moves on to its next boot device.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from pixiebox.config import ImageSection
from pixiebox.core import wording
from pixiebox.core.urls import BootUrls

#: Downloads are tried this many times before the script gives up.
FETCH_TRIES = 10
#: Seconds between tries: 1, 2, 4, 8, then this cap (about 1.5 minutes in all).
MAX_RETRY_WAIT = 16

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
#: The kernel's image name in iPXE; no initrd may take it (a second image of the same name
#: replaces the first).
KERNEL_NAME = "kernel"


def initrd_names(paths: list[str]) -> list[str]:
    """The image names iPXE registers the initrds under: their base names, made unique.

    UEFI iPXE hands the initrds to the kernel by name, and the kernel's EFI stub loads only those
    named by `initrd=<name>` on its command line (docs/firmware-quirks.md#20), so the names must be
    distinct and survive the command line (no spaces)."""
    names: list[str] = []
    for path in paths:
        base = _NAME_UNSAFE.sub("_", PurePosixPath(path).name) or "initrd"
        name, counter = base, 1
        while name in names or name == KERNEL_NAME:
            counter += 1
            name = f"{base}-{counter}"
        names.append(name)
    return names


def _one_line(text: str) -> str:
    """A value that stays one script line: iPXE has no quoting, so newlines would start a new
    command."""
    return " ".join(text.split())


def kernel_arguments(
    urls: BootUrls, image: ImageSection, *, mac: str, name: str | None, token: str | None = None
) -> list[str]:
    """What the OSIE reads from /proc/cmdline to find the appliance and itself, and the boot
    token (core.trust) it presents for its metadata when this boot was served to the machine
    itself."""
    args = [image.cmdline] if image.cmdline.strip() else []
    args += [f"pixiebox.url={urls.base}", f"pixiebox.mac={mac}"]
    if name:
        args.append(f"pixiebox.name={name}")
    if token:
        args.append(f"pixiebox.token={token}")
    return [_one_line(arg) for arg in args]


def _fetch(label: str, command: str, url: str, what: str, path: str, base: str) -> list[str]:
    """One download in a bounded retry loop with doubling back-off.

    iPXE ends a script at the first failing command unless it is followed by `||`
    (ipxe.org/scripting, error handling), so every command that may fail carries one. The
    counters are typed int32 settings because `inc` adds to a number (ipxe.org/cmd/inc);
    `inc pxb_wait ${pxb_wait}` doubles the wait."""
    return [
        "set pxb_try:int32 0",
        "set pxb_wait:int32 1",
        f":{label}",
        f"{command} && goto {label}_ok ||",
        "inc pxb_try",
        f"iseq ${{pxb_try}} {FETCH_TRIES} && goto {label}_failed ||",
        # `kernel` both downloads and selects: iPXE's own line just above says which failed
        # (a download error, or "Exec format error" for an image of another architecture).
        f"echo Pixiebox: could not load {url} (attempt ${{pxb_try}} of {FETCH_TRIES}),"
        " trying again in ${pxb_wait} s",
        "sleep ${pxb_wait}",
        f"iseq ${{pxb_wait}} {MAX_RETRY_WAIT} || inc pxb_wait ${{pxb_wait}}",
        f"goto {label}",
        f":{label}_failed",
        f"echo Pixiebox: giving up on the {what} {url} after {FETCH_TRIES} attempts.",
        f"echo Check that the Pixiebox appliance at {base} is running and reachable from this"
        f" machine, and that {_one_line(path)} is in its [boot] assets directory, built for"
        " this machine's architecture.",
        # docs/firmware-quirks.md#24: `exit 0` opens the firmware's boot manager; 1 moves on to the
        # next boot device.
        "exit 1",
        f":{label}_ok",
    ]


def ipxe_script(
    urls: BootUrls,
    image: ImageSection,
    *,
    mac: str,
    name: str | None,
    image_name: str,
    token: str | None = None,
) -> str:
    """The iPXE script that boots `image` on the machine with `mac` (named `name` if enrolled)."""
    who = wording.machine(mac, name)
    names = initrd_names(image.initrd)
    # docs/firmware-quirks.md#20: UEFI iPXE boots via the kernel's EFI stub, which only loads the
    # initrds named on the command line; BIOS kernels ignore the argument.
    args = [f"initrd={n}" for n in names]
    args += kernel_arguments(urls, image, mac=mac, name=name, token=token)
    # iPXE expands these itself: the architecture of the running iPXE build and the MAC of the
    # interface it booted from, in pxelinux's BOOTIF form (01- = Ethernet).
    args += ["pixiebox.arch=${buildarch}", "BOOTIF=01-${mac:hexhyp}"]
    kernel_url = urls.asset(image.kernel)
    lines = [
        "#!ipxe",
        f"# Pixiebox boot script for {who}: image {image_name}",
        # No `prompt` anywhere: RPi 5 firmware hangs on one (docs/firmware-quirks.md#29).
        f"echo Pixiebox: {who} boots image {image_name} on ${{buildarch}} (${{platform}})",
        # Drop images loaded before this script (autoexec.ipxe, an earlier attempt): UEFI iPXE
        # would pass every registered image to the kernel as an initrd (docs/firmware-quirks.md#21).
        "imgfree",
    ]
    lines += _fetch(
        "pxb_kernel",
        f"kernel --name {KERNEL_NAME} {kernel_url} {' '.join(args)}",
        kernel_url,
        "kernel",
        image.kernel,
        urls.base,
    )
    for index, (path, initrd_name) in enumerate(zip(image.initrd, names, strict=True)):
        url = urls.asset(path)
        lines += _fetch(
            f"pxb_initrd{index}",
            f"initrd --name {initrd_name} {url}",
            url,
            "initrd",
            path,
            urls.base,
        )
    lines += [
        "echo Pixiebox: starting the kernel",
        "boot ||",
        f"echo Pixiebox: the kernel {kernel_url} did not start. Check that it is a Linux kernel"
        f" for ${{buildarch}} (${{platform}}) and that [images.{image_name}] names the right"
        " files.",
        "exit 1",
    ]
    return "\n".join(lines) + "\n"


def ignore_script(mac: str, reason: str) -> str:
    """A script that boots nothing: it says why on the console and hands the machine back to its
    firmware's next boot device (`exit 1`, docs/firmware-quirks.md#24)."""
    lines = [
        "#!ipxe",
        f"# Pixiebox: nothing to boot for {mac}",
        f"echo Pixiebox: {_one_line(reason)}",
        "echo Pixiebox: moving on to the next boot device.",
        "exit 1",
    ]
    return "\n".join(lines) + "\n"


def pxelinux_config(
    urls: BootUrls,
    image: ImageSection,
    *,
    mac: str | None,
    name: str | None,
    image_name: str,
    token: str | None = None,
    arch: str | None = None,
) -> str:
    """A pxelinux.cfg file for U-Boot's `pxe get` / `pxe boot` (ARM boards).

    KERNEL and INITRD are TFTP paths, not http:// URLs: U-Boot fetches them with the same getter
    as the config itself, which is TFTP (cmd/pxe.c do_get_tftp; Debian's u-boot-qemu 2023.01 has
    no other), and a URL would be asked for as a TFTP file name. The paths are relative to the
    directory of the DHCP boot file; Pixiebox hands U-Boot `pxelinux.0` at the TFTP root
    (firmware.py), so they are the [boot] assets paths exactly as lab.toml writes them, and the
    TFTP server must serve [boot] assets as its root.

    `mac` is None when the machine is not known (pxelinux.cfg/default): then `IPAPPEND 2` makes
    U-Boot add BOOTIF=01-<mac> itself. `arch`: the board's CPU as DHCP recorded it (ArchInfo.cpu),
    told to the OS as `pixiebox.arch` the way iPXE's ${buildarch} is.

    An ARM kernel finds its hardware in a device tree, which U-Boot fetches and hands it: `FDT`
    names one file, `FDTDIR` a directory in which U-Boot fetches its `fdtfile` variable (else
    `<soc>-<board>.dtb`): the board's own .dtb, e.g. tegra124-jetson-tk1.dtb. Without either,
    U-Boot passes the tree it has itself (`fdt_addr`, `fdtcontroladdr`), as QEMU's virt boards
    do. A named `FDT` that cannot be fetched fails the boot ("Skipping pixiebox for failure
    retrieving FDT"; U-Boot's boot/pxe_utils.c label_boot); a board's file missing from `FDTDIR`
    does not (U-Boot then hands over its own tree), nor is anything fetched by a U-Boot without
    `fdt_addr_r` (QEMU's)."""
    who = f"{name} ({mac})" if name and mac else (mac or "any machine")
    if mac is None:
        args = [_one_line(image.cmdline)] if image.cmdline.strip() else []
        args.append(f"pixiebox.url={urls.base}")
    else:
        args = kernel_arguments(urls, image, mac=mac, name=name, token=token)
        if arch:
            args.append(f"pixiebox.arch={_one_line(arch)}")
        args.append(f"BOOTIF=01-{mac.replace(':', '-')}")
    lines = [
        f"# Pixiebox pxelinux.cfg for {who}: image {image_name}",
        "# KERNEL and INITRD are TFTP paths under [boot] assets (U-Boot's pxe fetches over TFTP,",
        "# relative to the directory of pxelinux.0, the TFTP root).",
        "DEFAULT pixiebox",
        # No menu, no prompt: boot at once (docs/firmware-quirks.md#29 for the same reason on iPXE).
        "PROMPT 0",
        "LABEL pixiebox",
        f"  KERNEL {image.kernel}",
    ]
    if len(image.initrd) > 1:
        lines.append(
            "  # U-Boot loads one initrd file: concatenate these cpio archives into one for it"
        )
    if image.initrd:
        # Before APPEND: U-Boot would otherwise take an `initrd=` from the command line.
        lines.append(f"  INITRD {','.join(image.initrd)}")
    # One line each: U-Boot reads a value to the end of its line (a newline would start a
    # command of its own).
    if image.fdt.strip():
        lines.append(f"  FDT {_one_line(image.fdt)}")
    if image.fdtdir.strip():
        lines.append(f"  FDTDIR {_one_line(image.fdtdir)}")
    if mac is None:
        lines.append("  IPAPPEND 2")
    lines.append(f"  APPEND {' '.join(args)}")
    return "\n".join(lines) + "\n"
