"""The lab.toml schema: one pydantic model per section, and `LabConfig`, the whole file.

Unknown keys are errors (a typo must not silently disable a setting). Checks that span several
keys live in problems.py, the power drivers' own keys in power_options.py.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pixiebox.config.values import (
    Duration,
    HttpsUrl,
    IPRange,
    Listen,
    MacAddress,
    WebUrl,
    check_hostname,
    check_interface_name,
)

#: Environment variables with this prefix override single keys of lab.toml.
ENV_PREFIX = "PIXIEBOX_"


class Section(BaseModel):
    """Unknown keys are errors, not silently ignored: a typo must not disable a setting."""

    model_config = ConfigDict(extra="forbid")


class LabSection(Section):
    name: str = "homelab"
    domain: str = "lab.internal"
    # A machine that was booting or up and has not been heard from for this long is shown as
    # off (powered off, or crashed).
    off_after: Duration = 600
    # A reload (SIGHUP, an enrollment) of a file listing no machines is refused while the
    # running lab has some: that is an emptied or truncated save far more often than a wish.
    allow_no_machines: bool = False


DhcpMode = Literal["proxy", "reservation", "full"]


class NetworkSection(Section):
    interface: Annotated[str, AfterValidator(check_interface_name)] = "eth0"
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


class DnsSection(Section):
    # Sources for which names that are not the lab's are forwarded upstream; anyone else gets
    # REFUSED (no open resolver). Empty: the lab subnet ([network] subnet or the interface's).
    forward_for: list[IPv4Network] = Field(default_factory=list)
    # DNS over TCP (RFC 7766) holds a connection per client: a neighbour opening many must not
    # take the descriptors the boot protocols need.
    tcp_connections_per_source: int = Field(default=8, ge=1, le=1024)


UnknownPolicy = Literal["discover", "enroll", "ignore"]


class BootSection(Section):
    unknown: UnknownPolicy = "discover"
    ssh_keys: list[str] = Field(default_factory=list)
    assets: Path = Path("/var/lib/pixiebox/assets")
    image: str = "osie"
    # Machines that asked to boot but are not in lab.toml are remembered (the dashboard lists
    # them, `pixiebox enroll` names them); any MAC on the home LAN can ask, so their number is
    # capped and those not heard from again are forgotten.
    max_discovered: int = Field(default=1000, ge=10, le=100_000)
    forget_discovered_after: Duration = 7 * 86400
    # Every x86-64 UEFI machine, unknown ones included, gets the signed chain (Debian's shim,
    # signed by Microsoft's UEFI CA, then Debian's signed GRUB) instead of iPXE, which firmware
    # with Secure Boot on refuses. shim also boots with Secure Boot off, so this is safe for a
    # lab that mixes both. A machine's own `secure_boot` overrides it.
    secure_boot: bool = False


#: The architectures an image can name its own build for, in mkosi's spelling (its
#: `Architecture=` values, which `./build.sh osie --arch` takes): [images.NAME.arch.arm64].
ArchName = Literal["x86-64", "arm64", "armhf", "riscv64"]
ARCH_NAMES: tuple[ArchName, ...] = get_args(ArchName)


class ImageArch(Section):
    """[images.NAME.arch.<arch>]: the image's build for one architecture, which a machine whose
    firmware reports that architecture boots instead of the base (core.decision). Its kernel,
    initrds and device trees are its own: an arm64 kernel cannot use an x86 initrd's modules,
    and a device tree belongs to one architecture's boards."""

    kernel: str
    initrd: list[str] = Field(default_factory=list)
    # None: the base image's command line (consoles differ by board, so it can be replaced).
    cmdline: str | None = None
    fdtdir: str = ""
    fdt: str = ""


class ImageSection(Section):
    kernel: str
    initrd: list[str] = Field(default_factory=list)
    cmdline: str = ""
    # U-Boot boards (pxelinux.cfg) need the device tree of the board, which the kernel does not
    # carry on ARM: `fdtdir` is a directory of .dtb files (U-Boot picks its board's by its
    # `fdtfile` variable), `fdt` one named file; paths under [boot] assets like the kernel's.
    fdtdir: str = ""
    fdt: str = ""
    # Builds for other architectures; a machine of an architecture not listed boots the above.
    arch: dict[ArchName, ImageArch] = Field(default_factory=dict)


#: The serial consoles of the ARM OSIE builds: a PL011 (ttyAMA0: QEMU's virt board, most arm64
#: servers) or an 8250 (ttyS0: a Jetson TK1). The kernel skips a console= whose device does not
#: exist, so one command line serves both kinds of board.
ARM_CONSOLES = "console=ttyS0,115200 console=ttyAMA0,115200"


def default_images() -> dict[str, ImageSection]:
    """What the appliance carries (build.sh cmd_appliance): the OSIE for x86-64, arm64 and armhf,
    each ARM one with its kernel's device trees, so that a lab.toml without [images] boots an
    ARM board its own build rather than the x86 kernel."""
    return {
        "osie": ImageSection(
            kernel="osie/vmlinuz",
            initrd=["osie/initrd"],
            cmdline="console=tty0 console=ttyS0,115200",
            arch={
                arch: ImageArch(
                    kernel=f"osie-{arch}/vmlinuz",
                    initrd=[f"osie-{arch}/initrd"],
                    cmdline=ARM_CONSOLES,
                    fdtdir=f"osie-{arch}/dtbs",
                )
                for arch in ("arm64", "armhf")
            },
        )
    }


class TftpSection(Section):
    # A TFTP transfer is cheap to start and costs the server a socket until it ends: a client
    # that sends RRQs and never ACKs (or spoofs their sources) must not hold them all.
    max_transfers: int = Field(default=256, ge=1, le=10_000)
    max_transfers_per_client: int = Field(default=8, ge=1, le=1000)
    # The largest RFC 2349 `timeout` a client may ask for; a larger one is not acknowledged
    # and the server keeps its own (a client asking 255 s would hold a transfer for minutes).
    max_client_timeout: Duration = Field(default=5, ge=1, le=255)
    # A transfer whose client has sent nothing for this long is ended and its socket freed.
    idle_timeout: Duration = Field(default=10, ge=1, le=3600)


class HttpSection(Section):
    listen: Listen = ":80"
    # Boot HTTP and the API alike: a client must send its request head within header_timeout
    # and in at most max_header_bytes; connections are capped per source address and in total
    # so that slow or hostile clients cannot hold every descriptor.
    header_timeout: Duration = Field(default=10, ge=1, le=3600)
    max_header_bytes: int = Field(default=16384, ge=1024, le=1 << 20)
    max_connections: int = Field(default=512, ge=8, le=100_000)
    max_connections_per_source: int = Field(default=64, ge=1, le=100_000)


#: The API's port when [api] listen is unset.
DEFAULT_API_PORT = 8080


class ApiSection(Section):
    # Unset (the default): the appliance's lab address, accepting connections from the lab
    # interface only, and 127.0.0.1 (the CLI on the appliance), both on DEFAULT_API_PORT.
    # "host:port" listens there alone; "0.0.0.0:8080" exposes the API on every network the
    # appliance is on: meant for a management network, the token guards every change.
    listen: Listen | None = None
    token_file: Path = Path("/var/lib/pixiebox/api-token")


class StateSection(Section):
    dir: Path = Path("/var/lib/pixiebox/state")


class KubernetesSection(Section):
    # The API server the lab's nodes join, e.g. "https://192.168.1.64:6443"; each node gets it
    # in its metadata with the lab's k3s agent token. None: the nodes are not told to join.
    server: HttpsUrl | None = None


class TelemetrySection(Section):
    # The InfluxDB the nodes' Telegraf ships to; handed to each node in its metadata.
    url: WebUrl | None = None
    org: str | None = None
    bucket: str | None = None
    # A file holding the InfluxDB write token (kept out of lab.toml); read on every request.
    token_file: Path | None = None


PowerDriver = Literal["wol", "ssh", "redfish", "ipmi", "tasmota", "shelly", "http", "qemu"]


class PowerSection(BaseModel):
    """Driver-specific keys are checked by the driver's option model (power_options.py,
    `spec_problems`); only the driver name is fixed here."""

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
    # true: this machine (x86-64 UEFI) boots through the signed chain, shim then GRUB, so it
    # needs no visit to its firmware setup to turn Secure Boot off; false: iPXE even when
    # [boot] secure_boot is on; unset: as [boot] secure_boot says.
    secure_boot: bool | None = None

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
    dns: DnsSection = Field(default_factory=DnsSection)
    boot: BootSection = Field(default_factory=BootSection)
    tftp: TftpSection = Field(default_factory=TftpSection)
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
