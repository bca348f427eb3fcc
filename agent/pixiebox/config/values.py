"""The value types of lab.toml that other code checks too: MAC addresses, durations, URLs, host
and machine names, address ranges, listen addresses.

Each is a plain function (raising ValueError with a sentence a user can act on) and, where the
schema uses it, an `Annotated` type for pydantic. They live apart from the schema so that the
DHCP server, the power drivers' option models and the identity store can use the same rules
without importing the whole configuration.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Annotated
from urllib.parse import urlsplit

from netaddr import EUI, AddrFormatError, mac_unix_expanded
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

# --- MAC addresses ---------------------------------------------------------------------------


def normalize_mac(value: object) -> str:
    """Accept the spellings people copy from switches, BIOS screens and `ip link`
    (f4:4d:.., F4-4D-.., f44d.3064.7a3a) and keep one canonical form, so a MAC typed twice
    in two styles is still recognised as the same machine."""
    if not isinstance(value, str):
        raise ValueError('a MAC address must be a string such as "f4:4d:30:64:7a:3a"')
    text = value.strip()
    try:
        eui = EUI(text, version=48, dialect=mac_unix_expanded)
    except (AddrFormatError, TypeError, ValueError):
        raise ValueError(f"{value!r} is not a MAC address") from None
    return str(eui)


_ZERO_MAC = "00:00:00:00:00:00"
_BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
_MAC_REMEDY = "check the MAC on the machine's label or in `pixiebox machines`"


def unicast_mac_problem(mac: str) -> str | None:
    """Why `mac` (canonical, as normalize_mac gives it) cannot be a machine's network card, or
    None when it can.

    IEEE 802 reserves the I/G bit (the lowest bit of the first octet) for group addresses:
    multicast and the broadcast address ff:ff:ff:ff:ff:ff are destinations, never the source
    address of a card, and 00:00:00:00:00:00 is what firmware reports when it has none. A
    request that names one of them is forged or broken; accepting it would enroll, record or
    boot a machine that stands for every machine (or none). One rule for lab.toml, enrollment
    (CLI, API, [boot] unknown = "enroll"), the DHCP server and the inventory. Cheap enough
    for the DHCP hot path: two string compares and one hex digit."""
    if mac == _ZERO_MAC:
        return f"{mac} is the all-zero address: no network card has it; {_MAC_REMEDY}"
    if mac == _BROADCAST_MAC:
        return f"{mac} is the broadcast address: no network card has it; {_MAC_REMEDY}"
    if int(mac[1:2] or "0", 16) & 1:
        return (
            f"{mac} is a multicast address (its first octet is odd): no network card has it; "
            f"{_MAC_REMEDY}"
        )
    return None


def unicast_mac(value: object) -> str:
    """normalize_mac, refusing what cannot be a machine's card (`unicast_mac_problem`)."""
    mac = normalize_mac(value)
    problem = unicast_mac_problem(mac)
    if problem is not None:
        raise ValueError(problem)
    return mac


#: The pydantic error type of a machine MAC that is multicast, broadcast or all-zero.
MAC_NOT_UNICAST = "mac_not_unicast"


def _check_machine_mac(mac: str) -> str:
    problem = unicast_mac_problem(mac)
    if problem is not None:
        # Its own error type, so that lab.toml's problem gets no "write six hex pairs" hint:
        # the spelling is fine, the address is not a card's.
        raise PydanticCustomError(MAC_NOT_UNICAST, "{problem}", {"problem": problem})
    return mac


#: A machine's MAC in lab.toml: any usual spelling, kept canonical; never a group or zero MAC.
MacAddress = Annotated[str, BeforeValidator(normalize_mac), AfterValidator(_check_machine_mac)]

# --- durations -------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+)\s*(d|h|m|s)")
_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: object) -> int:
    """Seconds from "90s", "30m", "1h", "1h30m", "2d" or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError('a duration must be a string like "1h" or a number of seconds')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError('a duration must be a string like "1h" or a number of seconds')
    text = value.strip().lower().replace(" ", "")
    if text.isdigit():
        return int(text)
    pos = 0
    total = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"{value!r} is not a duration")
    return total


Duration = Annotated[int, BeforeValidator(parse_duration)]

# --- names -----------------------------------------------------------------------------------

_HOSTNAME_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_hostname(value: str) -> str:
    """Machine names become DNS names (`c1.lab.internal`) and hostnames: one RFC 1123 label."""
    if not _HOSTNAME_LABEL.match(value):
        raise ValueError(f"{value!r} is not a valid machine name")
    return value


def check_interface_name(value: str) -> str:
    """Linux's rule for a network interface name (dev_valid_name): 1 to 15 bytes, not "." or
    "..", no "/", ":" or whitespace; anything else can never name a link, and a NUL would reach
    the kernel's calls as a truncated name."""
    if not value or len(value.encode()) > 15 or value in {".", ".."}:
        raise ValueError(f"{value!r} is not a network interface name (1 to 15 characters)")
    if any(c in "/:" or c.isspace() or not c.isprintable() for c in value):
        raise ValueError(
            f"{value!r} is not a network interface name: no '/', ':', spaces or control characters"
        )
    return value


_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?(:\d{1,5})?$")


def check_host(value: str) -> str:
    """A peer's host name or address (a plug, a BMC), optionally with a port: no scheme, no
    path, because the driver builds the URL itself."""
    text = value.strip()
    if "://" in text or "/" in text:
        raise ValueError(
            f"{value!r} is not a host: write only the plug's name or address, e.g. "
            '"192.168.1.50" or "plug-c1.lan"'
        )
    if not _HOST.match(text):
        raise ValueError(f"{value!r} is not a host name or address")
    return text


Host = Annotated[str, AfterValidator(check_host)]

# --- URLs ------------------------------------------------------------------------------------


def check_url(value: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
    """`value` if it is an absolute URL with one of `schemes` and a host."""
    try:
        parts = urlsplit(value.strip())
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(f"{value!r} is not a URL") from None
    if parts.scheme not in schemes or not parts.hostname:
        wanted = " or ".join(f"{scheme}://" for scheme in schemes)
        raise ValueError(f"{value!r} is not a URL starting with {wanted} and a host")
    return value.strip()


def _check_https_url(value: str) -> str:
    return check_url(value, ("https",))


#: An http:// or https:// URL with a host.
WebUrl = Annotated[str, AfterValidator(check_url)]
#: An https:// URL with a host.
HttpsUrl = Annotated[str, AfterValidator(_check_https_url)]

# --- addresses -------------------------------------------------------------------------------


def split_listen(value: str) -> tuple[str, int]:
    """("host", port) from "host:port" or ":port" (every address)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'{value!r} is not an address and port such as ":80" or "0.0.0.0:8080"')
    return host or "0.0.0.0", int(port)


def _check_listen(value: str) -> str:
    split_listen(value)
    return value


Listen = Annotated[str, AfterValidator(_check_listen)]


class IPRange(BaseModel):
    """An inclusive address range, written "first-last" in lab.toml."""

    model_config = ConfigDict(frozen=True)

    first: IPv4Address
    last: IPv4Address

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split("-")]
            if len(parts) != 2:
                raise ValueError(f"{value!r} is not a range")
            return {"first": parts[0], "last": parts[1]}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> IPRange:
        if int(self.first) > int(self.last):
            raise ValueError(f"the range starts at {self.first}, after its end {self.last}")
        return self

    def __contains__(self, address: object) -> bool:
        return isinstance(address, IPv4Address) and self.first <= address <= self.last

    def __iter__(self) -> Iterator[IPv4Address]:  # type: ignore[override]
        for value in range(int(self.first), int(self.last) + 1):
            yield IPv4Address(value)

    def __len__(self) -> int:
        return int(self.last) - int(self.first) + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"
