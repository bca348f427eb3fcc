"""A configuration file named after a MAC: who gets what when a loader asks for it.

U-Boot asks for pxelinux.cfg/01-<mac> and Debian's signed GRUB for grub/grub.cfg-<mac>
(boot.pxelinux, boot.grub_cfg). The MAC in the file name is only what the loader says: anyone on
the home LAN can ask for any machine's file. Both formats are answered by this one flow, and
only render what it settles:

- the machine the evidence shows at the asking address (core.trust) is recorded as booting and
  gets a boot token, written to disk before the file that carries it is sent;
- anyone else gets the same configuration without a token (a bystander learns nothing it could
  not read in lab.toml's image section), and the refusal is a secret.refused event;
- an unknown machine under `[boot] unknown = "ignore"`, or one whose image lab.toml lacks, gets
  nothing to boot, with the reason logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Address

from pixiebox.core.decision import BootDecision, BootImage, Silence
from pixiebox.core.firmware import ArchInfo
from pixiebox.core.inventory import Inventory

log = logging.getLogger("pixiebox.boot.claim")


@dataclass(frozen=True)
class Claim:
    """What the asker of a MAC's configuration file gets; the caller renders it."""

    verdict: BootDecision
    #: The image to render, None for nothing to boot (see `ignored` and `missing`).
    image: BootImage | None
    #: Only for the proven owner: the bystander's file names no machine.
    name: str | None
    token: str | None
    proven: bool
    #: Unknown machine under [boot] unknown = "ignore": not answered at all.
    ignored: bool = False

    @property
    def missing(self) -> str | None:
        """Why an enrolled machine has nothing to boot (its image is not in lab.toml)."""
        v = self.verdict
        if not self.proven or self.ignored or self.image is not None or v.image_name is None:
            return None
        return (
            f"{v.who} should boot image {v.image_name}, but lab.toml has no [images.{v.image_name}]"
        )


def claim(
    inventory: Inventory,
    mac: str,
    ip: IPv4Address | None,
    arch: ArchInfo | None,
    file: str,
    *,
    strict: bool,
) -> Claim:
    """Settle what the client at `ip` that asked for `file`, naming `mac`, gets. `arch` None:
    the loader does not say its firmware, and what DHCP recorded stands.

    `strict`: False over TFTP, where the kernel may have no neighbour entry for the client yet
    (core.inventory `prove`)."""
    owner = inventory.prove(ip, mac, strict=strict)
    verdict = inventory.decide(mac, arch)
    if not owner.proven:
        inventory.refuse(mac, "boot-token", ip, owner)
        return Claim(verdict, verdict.image, name=None, token=None, proven=False)
    inventory.seen(mac, arch)
    if verdict.silent is Silence.UNKNOWN_IGNORED:
        log.info(
            "%s fetched %s; not answered ([boot] unknown = ignore); "
            "enroll it with: pixiebox enroll %s --name NAME",
            verdict.who, file, mac,
        )  # fmt: skip
        return Claim(verdict, None, name=None, token=None, proven=True, ignored=True)
    found = verdict.image
    if found is None:
        result = Claim(verdict, None, name=None, token=None, proven=True)
        log.error("%s", result.missing)
        return result
    token = inventory.tokens.issue(mac)
    inventory.tokens.flush()  # on disk before the file that carries it is sent
    return Claim(verdict, found, name=verdict.name, token=token, proven=True)
