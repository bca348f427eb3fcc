"""The keys of each power driver in lab.toml (`power = { driver = "...", ... }`), as models.

They live in the config package, apart from the drivers (pixiebox.power), so that `pixiebox
check` validates a machine's power entry with the very model its driver is later built from,
without importing the drivers and the libraries they load (sushy, pyghmi, asyncssh, qemu.qmp).
The drivers import their model from here; this module never imports pixiebox.power.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from pixiebox.config.schema import PowerDriver, PowerSection
from pixiebox.config.values import Host, WebUrl, normalize_mac

#: Bound for one network exchange with a plug, BMC or node (connect + answer). A plug on the
#: LAN answers in milliseconds; one that has not answered in this long is not there.
NETWORK_TIMEOUT = 10.0
#: Bound for one QMP exchange with a local QEMU.
QMP_TIMEOUT = 10.0


class DriverOptions(BaseModel):
    """A driver's own keys in lab.toml (everything in `power = { ... }` but `driver`).

    Unknown keys are errors: `pasword = "..."` silently ignored would leave a plug unpowered
    with no hint why."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _require_password(password: str | None, password_file: Path | None) -> None:
    if password is None and password_file is None:
        raise ValueError(
            "password or password_file is needed (password_file keeps it out of lab.toml)"
        )


# --- wol ---------------------------------------------------------------------------------------


def _secureon_password(value: object) -> object:
    """SecureOn passwords are written like a MAC ("aa:bb:cc:dd:ee:ff")."""
    if not isinstance(value, str):
        return value
    try:
        return normalize_mac(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a SecureOn password: write six hex pairs like a MAC address, "
            '"aa:bb:cc:dd:ee:ff"'
        ) from None


class WolOptions(DriverOptions):
    port: int = Field(default=9, ge=1, le=65535)
    # Where to send instead of the lab subnet's broadcast address (a directed broadcast).
    address: IPv4Address | None = None
    password: Annotated[str, BeforeValidator(_secureon_password)] | None = None
    # Send out of this interface instead of [network] interface.
    interface: str | None = None


# --- ssh ---------------------------------------------------------------------------------------


class SshOptions(DriverOptions):
    user: str = "root"
    # Where to log in; the machine's IP when unset.
    host: str | None = None
    port: int = Field(default=22, ge=1, le=65535)
    off_command: str = "poweroff"
    cycle_command: str = "reboot"
    # The node's host public key ("ssh-ed25519 AAAA..."), for a machine whose host key the
    # appliance does not keep (one that does not boot the OSIE).
    host_key: str | None = None
    timeout: float = Field(default=NETWORK_TIMEOUT, gt=0, le=120)


# --- BMCs --------------------------------------------------------------------------------------


class RedfishOptions(DriverOptions):
    url: WebUrl  # the BMC, e.g. "https://10.0.0.20" (the service root /redfish/v1 is added)
    username: str
    password: str | None = None
    password_file: Path | None = None
    # The system's id ("1", "System.Embedded.1") or path ("/redfish/v1/Systems/1"); unset:
    # the BMC's only system.
    system: str | None = None
    verify_tls: bool = True
    # Boot from the network once before `on` and `cycle`.
    pxe_once: bool = True
    timeout: float = Field(default=NETWORK_TIMEOUT * 3, gt=0, le=300)

    @model_validator(mode="after")
    def _has_password(self) -> RedfishOptions:
        _require_password(self.password, self.password_file)
        return self


class IpmiOptions(DriverOptions):
    host: Host
    port: int = Field(default=623, ge=1, le=65535)
    user: str
    password: str | None = None
    password_file: Path | None = None
    # Boot from the network once before `on` and `cycle`.
    pxe_once: bool = True
    timeout: float = Field(default=NETWORK_TIMEOUT * 3, gt=0, le=300)

    @model_validator(mode="after")
    def _has_password(self) -> IpmiOptions:
        _require_password(self.password, self.password_file)
        return self


# --- smart plugs -------------------------------------------------------------------------------


class PlugOptions(DriverOptions):
    host: Host
    # Seconds the relay stays open in `cycle`, long enough for the NUC's capacitors to drain
    # (a shorter blip may not reset it).
    cycle_wait: float = Field(default=5.0, ge=0, le=300)
    timeout: float = Field(default=NETWORK_TIMEOUT, gt=0, le=120)


class TasmotaOptions(PlugOptions):
    user: str = "admin"
    password: str | None = None
    password_file: Path | None = None
    # The relay of a multi-relay device (Power1, Power2, ...); None: the only one ("Power").
    relay: int | None = Field(default=None, ge=1, le=32)


class ShellyOptions(PlugOptions):
    generation: int = Field(default=2, ge=1, le=9)
    channel: int = Field(default=0, ge=0, le=15)
    user: str = "admin"  # Gen1 only: Gen2+ always authenticates as "admin"
    password: str | None = None
    password_file: Path | None = None


# --- generic http ------------------------------------------------------------------------------


def _pattern(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
    return value


def _pointer(value: str) -> str:
    if value and not value.startswith("/"):
        raise ValueError(f'{value!r} is not a JSON pointer: it starts with "/", e.g. "/POWER"')
    return value


class HttpRequest(DriverOptions):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    url: WebUrl
    body: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


class HttpStatusRequest(HttpRequest):
    pointer: Annotated[str, AfterValidator(_pointer)] | None = None
    on_value: Any = True
    regex: Annotated[str, AfterValidator(_pattern)] | None = None

    @model_validator(mode="after")
    def _says_how(self) -> HttpStatusRequest:
        if self.pointer is None and self.regex is None:
            raise ValueError(
                "status needs pointer (a JSON pointer and on_value) or regex to tell on from off"
            )
        return self


class HttpOptions(DriverOptions):
    on: HttpRequest | None = None
    off: HttpRequest | None = None
    cycle: HttpRequest | None = None
    status: HttpStatusRequest | None = None
    cycle_wait: float = Field(default=5.0, ge=0, le=300)
    timeout: float = Field(default=NETWORK_TIMEOUT, gt=0, le=120)
    verify_tls: bool = True

    @model_validator(mode="after")
    def _something(self) -> HttpOptions:
        if not (self.on or self.off or self.cycle or self.status):
            raise ValueError("the http driver needs at least one of on, off, cycle, status")
        return self


# --- qemu --------------------------------------------------------------------------------------


class QemuOptions(DriverOptions):
    qmp: Path  # the VM's QMP unix socket (-qmp unix:PATH,server=on,wait=off)
    timeout: float = Field(default=QMP_TIMEOUT, gt=0, le=120)


# --- by driver name ----------------------------------------------------------------------------

#: The option model of each driver named in schema.PowerDriver.
DRIVER_OPTIONS: dict[str, type[DriverOptions]] = {
    "wol": WolOptions,
    "ssh": SshOptions,
    "redfish": RedfishOptions,
    "ipmi": IpmiOptions,
    "tasmota": TasmotaOptions,
    "shelly": ShellyOptions,
    "http": HttpOptions,
    "qemu": QemuOptions,
}
# A driver named in the schema but without a model would pass `pixiebox check` unchecked.
assert set(DRIVER_OPTIONS) == set(get_args(PowerDriver)), "schema.PowerDriver != DRIVER_OPTIONS"

_PLUG_HOST = 'the plug\'s name or address, e.g. host = "192.168.1.50"'

#: What `pixiebox check` suggests for a missing or bad key, by driver and key.
KEY_HINTS: dict[str, dict[str, str]] = {
    "redfish": {
        "url": 'the BMC\'s address, e.g. url = "https://10.0.0.20"',
        "username": 'the BMC login, e.g. username = "admin"',
    },
    "ipmi": {
        "host": 'the BMC\'s address, e.g. host = "10.0.0.21"',
        "user": 'the BMC login, e.g. user = "ADMIN"',
    },
    "tasmota": {"host": _PLUG_HOST},
    "shelly": {"host": _PLUG_HOST},
    "http": {"url": 'a full URL, e.g. url = "http://pdu.lan/outlet/3"'},
    "qemu": {"qmp": 'the VM\'s QMP socket, e.g. qmp = "/run/pixiebox/c1.qmp"'},
}


def driver_options(spec: PowerSection) -> DriverOptions:
    """The validated options of one power entry; pydantic's ValidationError when they are bad
    (problems.spec_problems turns it into sentences)."""
    return DRIVER_OPTIONS[spec.driver].model_validate(spec.options())
