"""The lab.toml schema and its loader.

One file configures the whole appliance, so every mistake in it must be reported the way a
person fixes it: the key path, the line, what is wrong and a hint, all problems at once, never a
traceback. The schema is pydantic (types, defaults, unknown keys); the checks that span several
keys (duplicates, addresses outside the subnet, a pool overlapping a reservation) live in
`consistency_problems`, so that they run even when one machine entry is malformed.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Annotated, Any, Literal

from netaddr import EUI, AddrFormatError, mac_unix_expanded
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_PATH = Path("config/lab.toml")
CONFIG_PATH_ENV = "PIXIEBOX_CONFIG"
ENV_PREFIX = "PIXIEBOX_"


# --- value types ---------------------------------------------------------------------------


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


MacAddress = Annotated[str, BeforeValidator(normalize_mac)]

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

_HOSTNAME_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_hostname(value: str) -> str:
    """Machine names become DNS names (`c1.lab.internal`) and hostnames: one RFC 1123 label."""
    if not _HOSTNAME_LABEL.match(value):
        raise ValueError(f"{value!r} is not a valid machine name")
    return value


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


# --- sections ------------------------------------------------------------------------------


class Section(BaseModel):
    """Unknown keys are errors, not silently ignored: a typo must not disable a setting."""

    model_config = ConfigDict(extra="forbid")


class LabSection(Section):
    name: str = "homelab"
    domain: str = "lab.internal"
    # A machine that was booting or up and has not been heard from for this long is shown as
    # off (powered off, or crashed).
    off_after: Duration = 600


DhcpMode = Literal["proxy", "reservation", "full"]


class NetworkSection(Section):
    interface: str = "eth0"
    server_ip: IPv4Address | None = None
    subnet: IPv4Network | None = None
    gateway: IPv4Address | None = None
    dns: list[IPv4Address] = Field(default_factory=list)
    dhcp_mode: DhcpMode = "proxy"
    pool: IPRange | None = None
    lease_time: Duration = 3600
    # Checked before answering in reservation/full mode: a second DHCP server on a household
    # LAN breaks everyone's network, so starting beside one must be a deliberate choice.
    allow_other_dhcp_servers: bool = False
    dhcp_probe_time: Duration = 2

    @field_validator("lease_time")
    @classmethod
    def _lease_not_tiny(cls, value: int) -> int:
        if value < 10:
            raise ValueError("a lease shorter than 10 seconds would keep every client renewing")
        return value


UnknownPolicy = Literal["discover", "enroll", "ignore"]


class BootSection(Section):
    unknown: UnknownPolicy = "discover"
    ssh_keys: list[str] = Field(default_factory=list)
    assets: Path = Path("/var/lib/pixiebox/assets")
    image: str = "osie"


class ImageSection(Section):
    kernel: str
    initrd: list[str] = Field(default_factory=list)
    cmdline: str = ""


def default_images() -> dict[str, ImageSection]:
    return {
        "osie": ImageSection(
            kernel="osie/vmlinuz",
            initrd=["osie/initrd"],
            cmdline="console=tty0 console=ttyS0,115200",
        )
    }


def split_listen(value: str) -> tuple[str, int]:
    """("host", port) from "host:port" or ":port" (every address)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'{value!r} is not an address and port such as ":80" or "0.0.0.0:8080"')
    return host or "0.0.0.0", int(port)


def _valid_listen(value: str) -> str:
    split_listen(value)
    return value


Listen = Annotated[str, AfterValidator(_valid_listen)]


class HttpSection(Section):
    listen: Listen = ":80"


class ApiSection(Section):
    listen: Listen = "0.0.0.0:8080"
    token_file: Path = Path("/var/lib/pixiebox/api-token")


class StateSection(Section):
    dir: Path = Path("/var/lib/pixiebox/state")


def _url(value: str, schemes: tuple[str, ...]) -> str:
    """`value` if it is an absolute URL with one of `schemes` and a host."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value.strip())
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(f"{value!r} is not a URL") from None
    if parts.scheme not in schemes or not parts.hostname:
        wanted = " or ".join(f"{scheme}://" for scheme in schemes)
        raise ValueError(f"{value!r} is not a URL starting with {wanted} and a host")
    return value.strip()


class KubernetesSection(Section):
    # The API server the lab's nodes join, e.g. "https://192.168.1.64:6443"; each node gets it
    # in its metadata with the lab's k3s agent token. None: the nodes are not told to join.
    server: Annotated[str, AfterValidator(lambda v: _url(v, ("https",)))] | None = None


class TelemetrySection(Section):
    # The InfluxDB the nodes' Telegraf ships to; handed to each node in its metadata.
    url: Annotated[str, AfterValidator(lambda v: _url(v, ("http", "https")))] | None = None
    org: str | None = None
    bucket: str | None = None
    # A file holding the InfluxDB write token (kept out of lab.toml); read on every request.
    token_file: Path | None = None


PowerDriver = Literal["wol", "ssh", "redfish", "ipmi", "tasmota", "shelly", "http", "qemu"]


class PowerSection(BaseModel):
    """Driver-specific keys are checked by each driver (`pixiebox.power.spec_problems`); only
    the driver name is fixed here."""

    model_config = ConfigDict(extra="allow")

    driver: PowerDriver

    def options(self) -> dict[str, Any]:
        """The driver's own keys (everything but `driver`)."""
        return dict(self.model_extra or {})


class PowerSettings(Section):
    """[power]: how long a power action may take before it counts as failed (and the next
    driver of a machine's chain is tried), and the pause between machines in `lab up` so that
    a rack of NUCs does not draw its inrush current at once."""

    on_timeout: Duration = 300
    off_timeout: Duration = 120
    stagger: Duration = 5
    # How `on` is seen: the OS phoning home (the OSIE does), or the machine answering ping
    # (an OS that does not phone home, e.g. one installed on the machine's own disk).
    verify_on: Literal["phone-home", "ping"] = "phone-home"
    # `off` without a driver that can read the power: this long with no DHCP, boot request,
    # phone-home, syslog line or ping answer from the machine counts as off.
    off_settle: Duration = 15


DiskFormat = Literal["never", "if-blank"]


def _disk_path(value: str) -> str:
    if not value.startswith("/dev/"):
        raise ValueError(
            f"{value!r} is not a device path; name the disk by a stable path such as "
            '"/dev/disk/by-id/nvme-Samsung_SSD_980_S64DNX0R123456"'
        )
    return value


class MachineSection(Section):
    name: Annotated[str, BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v)]
    mac: MacAddress
    ip: IPv4Address | None = None
    image: str | None = None
    # One driver, or a chain tried in order for each action it can do: e.g. `on` by wol, then
    # a smart plug if the node never came up; `off` by ssh (graceful), then the plug.
    power: PowerSection | list[PowerSection] | None = None
    # A local disk for persistent volumes, mounted by the OSIE at the OpenEBS host path. It is
    # never formatted unless format = "if-blank" and the disk carries no partition table,
    # filesystem or other signature.
    disk: Annotated[str, AfterValidator(_disk_path)] | None = None
    format: DiskFormat = "never"

    def power_chain(self) -> list[PowerSection]:
        if self.power is None:
            return []
        return self.power if isinstance(self.power, list) else [self.power]

    @field_validator("name")
    @classmethod
    def _name_is_hostname(cls, value: str) -> str:
        return check_hostname(value)


class LabConfig(BaseSettings):
    """The whole of lab.toml. Environment variables override single keys
    (`PIXIEBOX_NETWORK__DHCP_MODE=full`), which is how a systemd drop-in or a test changes one
    setting without editing the file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    lab: LabSection = Field(default_factory=LabSection)
    network: NetworkSection = Field(default_factory=NetworkSection)
    boot: BootSection = Field(default_factory=BootSection)
    images: dict[str, ImageSection] = Field(default_factory=default_images)
    http: HttpSection = Field(default_factory=HttpSection)
    api: ApiSection = Field(default_factory=ApiSection)
    state: StateSection = Field(default_factory=StateSection)
    kubernetes: KubernetesSection = Field(default_factory=KubernetesSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    power: PowerSettings = Field(default_factory=PowerSettings)
    machines: list[MachineSection] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init arguments; the environment overrides them.
        return (env_settings, init_settings)


# --- problems ------------------------------------------------------------------------------

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    loc: Loc
    message: str
    hint: str = ""
    severity: Literal["error", "warning"] = "error"
    line: int | None = None


def format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(file)"


def format_problem(path: Path, problem: Problem) -> str:
    where = f"{path}:{problem.line}" if problem.line else str(path)
    text = f"{where}: {problem.severity}: {format_loc(problem.loc)}: {problem.message}"
    if problem.hint:
        text += f"\n    hint: {problem.hint}"
    return text


class ConfigError(Exception):
    """lab.toml could not be used; `problems` says why, each with its key and line."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(format_problem(path, p) for p in problems))


# --- locating keys in the file -------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\.\"']+)\s*=")


def _split_dotted(key: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in key.split("."))


def key_lines(text: str) -> dict[Loc, int]:
    """Line numbers of the tables and keys of a TOML text, by key path.

    tomllib forgets positions, and an error that says "machines[3].mac" without a line makes
    people count `[[machines]]` blocks by hand. This follows headers and `key =` lines, which
    is all lab.toml uses; a key inside an inline table maps to its parent's line."""
    lines: dict[Loc, int] = {}
    table: Loc = ()
    array_counts: dict[Loc, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(raw)
        if header and not raw.lstrip().startswith("#"):
            path = _split_dotted(header.group(2))
            if header.group(1) == "[[":
                index = array_counts.get(path, 0)
                array_counts[path] = index + 1
                # The array itself is at its first block: "[[machine]]" (unknown key) has a line.
                lines.setdefault(path, number)
                table = (*path, index)
            else:
                table = path
            lines.setdefault(table, number)
            continue
        key = _KEY.match(raw)
        if key:
            lines.setdefault((*table, *_split_dotted(key.group(1))), number)
    return lines


def line_for(lines: dict[Loc, int], loc: Loc) -> int | None:
    """The line of the longest prefix of loc that the file has (a missing key → its table)."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


# --- pydantic errors to problems -----------------------------------------------------------


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The section model that owns the last key of loc, for "did you mean" suggestions."""
    model: Any = LabConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if model is LabConfig and part == "images":
            model = ImageSection
            continue
        field = model.model_fields.get(part)
        if field is None:
            if model is ImageSection:
                continue
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


_HINTS: dict[tuple[str, str], str] = {
    ("network", "dhcp_mode"): 'one of "proxy" (beside your router), "reservation" or "full"',
    ("boot", "unknown"): 'one of "discover", "enroll" or "ignore"',
    ("network", "lease_time"): 'write a duration like "90s", "30m", "1h", "1h30m" or "2d"',
    ("network", "dhcp_probe_time"): 'write a duration like "2s"',
    ("network", "pool"): 'write the first and last address: "192.168.1.200-192.168.1.250"',
    ("network", "subnet"): 'a network in CIDR form, e.g. "192.168.1.0/24"',
}


def _hint_for(loc: Loc, error_type: str) -> str:
    named = tuple(p for p in loc if isinstance(p, str))
    if named[-1:] == ("mac",):
        return 'write six hex pairs, e.g. "f4:4d:30:64:7a:3a" (dashes and dots also work)'
    if named[-1:] == ("ip",) or error_type.startswith("ip_v4"):
        return 'write a dotted IPv4 address such as "192.168.1.31"'
    if named[-1:] == ("name",) and named[:1] == ("machines",):
        return "use lower-case letters, digits and dashes (it becomes a DNS name)"
    if named[-1:] == ("driver",):
        return "one of wol, ssh, redfish, ipmi, tasmota, shelly, http, qemu"
    key = (named[-2], named[-1]) if len(named) >= 2 else ("", "")
    return _HINTS.get(key, "")


def _clean_message(error: Any) -> str:
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if error["type"] == "literal_error":
        message = f"{error['input']!r} is not allowed; " + message.replace(
            "Input should", "it must"
        )
    elif error["type"] == "missing":
        message = "this key is required"
    return message


def problems_from_validation(error: ValidationError) -> list[Problem]:
    problems = []
    for item in error.errors():
        loc: Loc = tuple(item["loc"])
        if item["type"] == "extra_forbidden":
            key = str(loc[-1])
            model = _model_at(loc)
            choices = list(model.model_fields) if model else []
            close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else (f"known keys here: {', '.join(choices)}" if choices else "")
            )
            problems.append(Problem(loc, f"unknown key {key!r}", hint))
            continue
        problems.append(Problem(loc, _clean_message(item), _hint_for(loc, item["type"])))
    return problems


# --- checks that span several keys ---------------------------------------------------------


def _duplicates(
    machines: list[tuple[int, MachineSection]], field: str, what: str
) -> Iterator[Problem]:
    seen: dict[object, tuple[int, MachineSection]] = {}
    for index, machine in machines:
        value = getattr(machine, field)
        if value is None:
            continue
        if value in seen:
            first_index, first = seen[value]
            yield Problem(
                ("machines", index, field),
                f"{what} {value} is already used by machine {first.name!r} "
                f"(machines[{first_index}])",
                f"each machine needs its own {what}",
            )
        else:
            seen[value] = (index, machine)


def _power_problems(index: int, machine: MachineSection) -> list[Problem]:
    """Each power driver checks its own keys (a plug without `host`, ipmi without `user`)."""
    from pixiebox.power import spec_problems  # the drivers import this module

    problems = []
    chain = machine.power_chain()
    for position, spec in enumerate(chain):
        base: Loc = ("machines", index, "power")
        if isinstance(machine.power, list):
            base = (*base, position)
        for key, message, hint in spec_problems(spec):
            problems.append(Problem((*base, key) if key else base, message, hint))
    return problems


def consistency_problems(
    network: NetworkSection | None,
    boot: BootSection | None,
    images: dict[str, ImageSection] | None,
    machines: list[tuple[int, MachineSection]],
) -> list[Problem]:
    """Checks across keys. Takes the sections separately (and machines with their index in
    the file) so they can run on whatever part of a broken file did validate."""
    problems: list[Problem] = []
    problems += _duplicates(machines, "mac", "MAC")
    problems += _duplicates(machines, "name", "name")
    problems += _duplicates(machines, "ip", "IP")
    if images is not None:
        known = ", ".join(sorted(images)) or "none"
        if boot is not None and boot.image not in images:
            problems.append(
                Problem(
                    ("boot", "image"),
                    f"no image named {boot.image!r}",
                    f"define [images.{boot.image}] or pick one of: {known}",
                )
            )
        for index, machine in machines:
            if machine.image is not None and machine.image not in images:
                problems.append(
                    Problem(
                        ("machines", index, "image"),
                        f"no image named {machine.image!r}",
                        f"define [images.{machine.image}] or pick one of: {known}",
                    )
                )
    for index, machine in machines:
        if machine.format == "if-blank" and machine.disk is None:
            problems.append(
                Problem(
                    ("machines", index, "format"),
                    'format = "if-blank" but no disk is named',
                    'add disk = "/dev/disk/by-id/..." for this machine, or remove format',
                )
            )
        problems += _power_problems(index, machine)
    if network is None:
        return problems
    subnet = network.subnet
    infra = {a: k for k, a in (("gateway", network.gateway), ("server_ip", network.server_ip)) if a}
    if subnet is not None:
        for key, address in (("gateway", network.gateway), ("server_ip", network.server_ip)):
            if address is not None and address not in subnet:
                problems.append(
                    Problem(
                        ("network", key),
                        f"{address} is outside the subnet {subnet}",
                        "fix the address or [network] subnet",
                    )
                )
        for index, machine in machines:
            if machine.ip is None:
                continue
            if machine.ip not in subnet:
                problems.append(
                    Problem(
                        ("machines", index, "ip"),
                        f"{machine.ip} (machine {machine.name!r}) is outside the subnet {subnet}",
                        f"pick an address in {subnet} or fix [network] subnet",
                    )
                )
            elif machine.ip in (subnet.network_address, subnet.broadcast_address):
                problems.append(
                    Problem(
                        ("machines", index, "ip"),
                        f"{machine.ip} is the "
                        f"{'network' if machine.ip == subnet.network_address else 'broadcast'} "
                        f"address of {subnet}",
                        "pick a host address",
                    )
                )
    for index, machine in machines:
        if machine.ip is not None and machine.ip in infra:
            problems.append(
                Problem(
                    ("machines", index, "ip"),
                    f"{machine.ip} (machine {machine.name!r}) is the {infra[machine.ip]} address",
                    "pick a free address",
                )
            )
    pool = network.pool
    if pool is not None:
        if subnet is not None and (pool.first not in subnet or pool.last not in subnet):
            problems.append(
                Problem(
                    ("network", "pool"),
                    f"the pool {pool} is not inside the subnet {subnet}",
                    f"choose a range inside {subnet}",
                )
            )
        for address, key in infra.items():
            if address in pool:
                problems.append(
                    Problem(
                        ("network", "pool"),
                        f"the pool {pool} contains the {key} {address}",
                        "start or end the pool so that it leaves that address out",
                    )
                )
        for index, machine in machines:
            if machine.ip is not None and machine.ip in pool:
                problems.append(
                    Problem(
                        ("network", "pool"),
                        f"the pool {pool} overlaps the reservation of machine {machine.name!r} "
                        f"({machine.ip}, machines[{index}])",
                        "move the reservation out of the pool or shrink the pool",
                    )
                )
    elif network.dhcp_mode == "full":
        problems.append(
            Problem(
                ("network", "pool"),
                "full mode hands out addresses but no pool is set",
                'add pool = "first-last" in [network], or use dhcp_mode = "reservation"',
            )
        )
    return problems


# --- loading -------------------------------------------------------------------------------


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH))


def _validated_parts(
    data: dict[str, Any],
) -> tuple[
    NetworkSection | None,
    BootSection | None,
    dict[str, ImageSection] | None,
    list[tuple[int, MachineSection]],
]:
    """Each section validated on its own, skipping those that do not, so that cross-key checks
    still run on a file with one broken entry."""

    def attempt(model: Any, value: Any) -> Any:
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            if not isinstance(value, dict):
                return None
            # Drop the broken keys (their defaults stand in) and try once more, so that a typo
            # in dhcp_mode does not hide a machine outside the subnet.
            broken = {item["loc"][0] for item in exc.errors() if item["loc"]}
        try:
            return model.model_validate({k: v for k, v in value.items() if k not in broken})
        except ValidationError:
            return None

    network = attempt(NetworkSection, data.get("network", {}))
    boot = attempt(BootSection, data.get("boot", {}))
    images: dict[str, ImageSection] | None = default_images()
    if "images" in data:
        raw_images = data["images"]
        images = {}
        if isinstance(raw_images, dict):
            for name, raw in raw_images.items():
                image = attempt(ImageSection, raw)
                if image is None:
                    images = None
                    break
                images[name] = image
    machines = []
    raw_machines = data.get("machines", [])
    if isinstance(raw_machines, list):
        for index, raw in enumerate(raw_machines):
            machine = attempt(MachineSection, raw)
            if machine is not None:
                machines.append((index, machine))
    return network, boot, images, machines


def _env_overrides(data: dict[str, Any]) -> dict[str, Any]:
    """The file's data with PIXIEBOX_* overrides applied, for the per-section pass."""
    overrides: dict[str, Any] = {}
    for name, value in os.environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_PATH_ENV or "__" not in name:
            continue
        section, _, key = name.removeprefix(ENV_PREFIX).lower().partition("__")
        overrides.setdefault(section, {})[key] = value
    result = dict(data)
    for section, values in overrides.items():
        if isinstance(result.get(section, {}), dict):
            result[section] = {**result.get(section, {}), **values}
    return result


def _blame_environment(problems: Iterable[Problem]) -> list[Problem]:
    """Say so when the bad value came from a PIXIEBOX_* variable: the file's line shows another."""
    names: dict[Loc, str] = {}
    for name in os.environ:
        if name.startswith(ENV_PREFIX) and name != CONFIG_PATH_ENV and "__" in name:
            section, _, key = name.removeprefix(ENV_PREFIX).lower().partition("__")
            names[(section, key)] = name
    return [
        replace(p, message=f"{p.message} (set by ${names[p.loc[:2]]}, which overrides the file)")
        if p.loc[:2] in names
        else p
        for p in problems
    ]


def _with_lines(problems: Iterable[Problem], lines: dict[Loc, int]) -> list[Problem]:
    located = [
        Problem(p.loc, p.message, p.hint, p.severity, line_for(lines, p.loc)) for p in problems
    ]
    return sorted(located, key=lambda p: p.line or 0)


def load_config(path: str | os.PathLike[str] | None = None) -> LabConfig:
    """Load and fully validate lab.toml; raise ConfigError with every problem found."""
    config, problems = check_config(path)
    errors = [p for p in problems if p.severity == "error"]
    if config is None or errors:
        raise ConfigError(config_path(path), errors)
    return config


def check_config(
    path: str | os.PathLike[str] | None = None,
) -> tuple[LabConfig | None, list[Problem]]:
    """Validate lab.toml: the config (None if unusable) and every problem with its line."""
    file = config_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [
            Problem((), f"no such file: {file}", "pass --config PATH or set PIXIEBOX_CONFIG")
        ]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem((), f"cannot read {file}: {exc}")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"at line (\d+)", str(exc))
        return None, [
            Problem(
                (),
                f"not valid TOML: {exc}",
                'check quotes and brackets, e.g. name = "c1"',
                line=int(match.group(1)) if match else None,
            )
        ]
    lines = key_lines(text)
    problems: list[Problem] = []
    config: LabConfig | None = None
    try:
        config = LabConfig(**data)
    except ValidationError as exc:
        problems += problems_from_validation(exc)
    if config is not None:
        machines = list(enumerate(config.machines))
        problems += consistency_problems(config.network, config.boot, config.images, machines)
    else:
        problems += consistency_problems(*_validated_parts(_env_overrides(data)))
    return config, _with_lines(_blame_environment(problems), lines)
