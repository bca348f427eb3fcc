"""GRUB configuration for the signed chain: what Debian's signed GRUB reads after shim.

With Secure Boot on, firmware refuses iPXE; an x86-64 UEFI machine whose lab.toml entry (or
[boot]) says `secure_boot = true` is handed shim, which loads Debian's signed network GRUB
(core.firmware SHIM, SIGNED_GRUB; docs/firmware-quirks.md#33). That GRUB has the prefix `/grub`
built in and a memdisk configuration that, on the TFTP server shim came from, tries
`grub/x86_64-efi/grub.cfg`, `grub/grub.cfg-amd64` and then sources `grub/grub.cfg` (read out of
grubnetx64.efi.signed 2.12-9+deb13u4: its prefix and memdisk objects). Pixiebox answers:

- `grub/grub.cfg`, the same for every machine: it sources `grub/grub.cfg-<mac>` by the MAC GRUB
  booted from (`$net_default_mac`, "52:54:00:12:34:56"; MAAS names its files the same way);
- `grub/grub.cfg-<mac>`: that machine's configuration, rendered from the same decision as its
  iPXE script: kernel and initrds over HTTP, the same kernel command line, and the boot token
  only when the evidence shows the machine itself at the asking address (core.trust, as for
  pxelinux.cfg over TFTP); the same bounded retries with back-off; and on giving up, or with
  nothing to boot, a sentence on the console and `exit 1`, which returns to the firmware so
  that it tries its next boot device (docs/firmware-quirks.md#24 for iPXE's `exit`).

The text is generated without I/O (`grub_config`, `nothing_config`) so tests read every line.
"""

from __future__ import annotations

import logging
import re
from ipaddress import IPv4Address
from urllib.parse import quote

from pixiebox.boot.claim import claim
from pixiebox.boot.ipxe_script import FETCH_TRIES, MAX_RETRY_WAIT, kernel_arguments
from pixiebox.config import ImageSection, normalize_mac
from pixiebox.core import wording
from pixiebox.core.firmware import DEFAULT_ARCH, arch_info
from pixiebox.core.inventory import Inventory
from pixiebox.core.urls import BootUrls

log = logging.getLogger("pixiebox.boot.grub")

#: Debian's grubnetx64's built-in prefix, as a TFTP path (GRUB asks for "/grub/grub.cfg").
GRUB_DIR = "grub/"
BOOTSTRAP = GRUB_DIR + "grub.cfg"
#: What x86-64 UEFI reports (option 93 = 7); the signed chain is x86-64 UEFI only.
SIGNED_ARCH = arch_info(7) or DEFAULT_ARCH
_MAC_FILE = re.compile(r"grub\.cfg-([0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5})")


def _quoted(word: str) -> str:
    """One GRUB script word, taken literally: GRUB expands `$` and splits on spaces outside
    single quotes, which allow no escape, so a `'` closes, is escaped, and reopens."""
    return "'" + word.replace("'", "'\\''") + "'"


def _say(text: str) -> str:
    return "echo " + _quoted("Pixiebox: " + " ".join(text.split()))


def http_path(urls: BootUrls, path: str) -> str:
    """`path` under [boot] assets as a GRUB file name on boot HTTP: `(http,host[:port])/...`.
    Port 80 is left out, as in BootUrls.base."""
    host = str(urls.server_ip) if urls.port == 80 else f"{urls.server_ip}:{urls.port}"
    return f"(http,{host})/assets/{quote(path.lstrip('/'))}"


def _waits() -> list[tuple[int, int]]:
    """(from, to) doublings of the retry wait, largest first for an if/elif chain."""
    steps, wait = [], 1
    while wait < MAX_RETRY_WAIT:
        steps.append((wait, min(wait * 2, MAX_RETRY_WAIT)))
        wait *= 2
    return steps[::-1]


def _fetch(command: str, what: str, url: str, path: str, base: str) -> list[str]:
    """`command` (linux or initrd) tried FETCH_TRIES times with doubling waits, as the iPXE
    script does; then a sentence and `exit 1`. GRUB script has loops, `break` and `test`, but no
    arithmetic: the attempts are a word list and the doubling an if/elif chain."""
    tries = " ".join(str(n) for n in range(1, FETCH_TRIES + 1))
    lines = [
        "set pxb_ok=",
        "set pxb_wait=1",
        f"for pxb_try in {tries}; do",
        f"  if {command}; then set pxb_ok=1; break; fi",
        f'  if [ "$pxb_try" = "{FETCH_TRIES}" ]; then break; fi',
        f'  echo "Pixiebox: could not download {url} (attempt $pxb_try of {FETCH_TRIES}),'
        ' trying again in $pxb_wait s"',
        "  sleep $pxb_wait",
    ]
    chain = [
        f'{"if" if i == 0 else "elif"} [ "$pxb_wait" = "{a}" ]; then set pxb_wait={b}'
        for i, (a, b) in enumerate(_waits())
    ]
    if chain:
        lines.append("  " + "; ".join(chain) + "; fi")
    lines += [
        "done",
        'if [ -z "$pxb_ok" ]; then',
        "  " + _say(f"giving up on the {what} {url} after {FETCH_TRIES} attempts."),
        "  "
        + _say(
            f"Check that the Pixiebox appliance at {base} is running and reachable from this"
            f" machine, and that {path} is in its [boot] assets directory."
        ),
        # Back to the firmware, which tries its next boot device (docs/firmware-quirks.md#24).
        "  exit 1",
        "fi",
    ]
    return lines


def grub_config(
    urls: BootUrls,
    image: ImageSection,
    *,
    mac: str,
    name: str | None,
    image_name: str,
    token: str | None = None,
) -> str:
    """The grub.cfg-<mac> that boots `image` on the machine with `mac` through the signed chain:
    shim verifies the kernel (Debian's is signed); the initrds are not verified by anyone."""
    who = wording.machine(mac, name)
    args = kernel_arguments(urls, image, mac=mac, name=name, token=token)
    args += [f"pixiebox.arch={SIGNED_ARCH.cpu}", f"BOOTIF=01-{mac.replace(':', '-')}"]
    # Each word quoted on its own: GRUB joins the words with spaces, and would put a word that
    # contains a space into double quotes on the kernel command line.
    words = " ".join(_quoted(word) for arg in args for word in arg.split())
    kernel = http_path(urls, image.kernel)
    lines = [
        f"# Pixiebox GRUB configuration for {who}: image {image_name} (signed chain)",
        "set timeout=0",
        _say(f"{who} boots image {image_name} (Secure Boot chain: shim, GRUB)"),
    ]
    lines += _fetch(
        f"linux {_quoted(kernel)} {words}",
        "kernel",
        urls.asset(image.kernel),
        image.kernel,
        urls.base,
    )
    if image.initrd:
        initrds = " ".join(_quoted(http_path(urls, path)) for path in image.initrd)
        lines += _fetch(
            f"initrd {initrds}",
            "initrd",
            " ".join(urls.asset(path) for path in image.initrd),
            " and ".join(image.initrd),
            urls.base,
        )
    lines += [
        _say("starting the kernel"),
        "boot",
        _say(
            f"the kernel {urls.asset(image.kernel)} did not start. With Secure Boot on it must"
            f" be signed by a key shim trusts (Debian's kernels are); check that"
            f" [images.{image_name}] names the right files."
        ),
        "exit 1",
    ]
    return "\n".join(lines) + "\n"


def nothing_config(mac: str, reason: str) -> str:
    """A grub.cfg-<mac> that boots nothing: it says why and returns to the firmware."""
    lines = [
        f"# Pixiebox: nothing to boot for {mac}",
        _say(reason),
        _say("moving on to the next boot device."),
        "exit 1",
    ]
    return "\n".join(lines) + "\n"


def bootstrap_config() -> str:
    """grub/grub.cfg: the same for every machine; hands over to the machine's own file."""
    lines = [
        "# Pixiebox: Debian's signed GRUB (prefix /grub) sources this first; each machine's own",
        "# configuration is grub/grub.cfg-<its MAC>, the MAC GRUB booted from.",
        "source $prefix/grub.cfg-$net_default_mac",
        'echo "Pixiebox: no boot configuration for $net_default_mac; moving on to the next'
        ' boot device."',
        "exit 1",
    ]
    return "\n".join(lines) + "\n"


def grub_for(inventory: Inventory, urls: BootUrls, path: str, ip: IPv4Address | None) -> str | None:
    """The text of `path` (under grub/) for the client at `ip`, or None for "not found"."""
    if path == BOOTSTRAP:
        return bootstrap_config()
    match = _MAC_FILE.fullmatch(path.removeprefix(GRUB_DIR))
    if not path.startswith(GRUB_DIR) or match is None:
        return None
    mac = normalize_mac(match.group(1))
    got = claim(inventory, mac, ip, SIGNED_ARCH, path, strict=False)
    if got.image is None:
        return None if got.missing is None else nothing_config(mac, got.missing)
    if got.proven:
        log.info("%s fetched %s; next: kernel %s over HTTP", got.verdict.who, path,
                 got.image.kernel)  # fmt: skip
    return grub_config(urls, got.image.section, mac=mac, name=got.name,
                       image_name=got.image.name, token=got.token)  # fmt: skip
