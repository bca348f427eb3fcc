"""lab.toml: its schema, its checks, its loading and the edits the agent makes to it.

One file configures the whole appliance, so every mistake in it is reported the way a person
fixes it: the key path, the line, what is wrong and a hint, all problems at once, never a
traceback. The modules, from the bottom up:

- values.py: the value types others check too (MAC, duration, URL, host and machine names);
- tomlscan.py: the one TOML scanner (statements with offsets, the line of each key);
- schema.py: the sections as pydantic models, `LabConfig` the whole file;
- power_options.py: each power driver's keys, as models (the drivers import them from here);
- problems.py: `Problem`, pydantic errors to problems, the checks across keys;
- load.py: `check_config` / `load_config`, the path and the PIXIEBOX_* environment overrides;
- labfile.py (with textedit.py, safewrite.py): enrolling and changing machines in lab.toml.

May import pydantic, pydantic-settings, netaddr, tomlkit and the standard library; never
another pixiebox package (the power drivers, the store and every server import this one).
The names below are the package's public surface: `from pixiebox.config import X`.
"""

from pixiebox.config.load import (
    CONFIG_PATH_ENV,
    DEFAULT_CONFIG_PATH,
    check_config,
    config_path,
    load_config,
)
from pixiebox.config.problems import (
    ConfigError,
    EnrollError,
    Problem,
    consistency_problems,
    error_count,
    format_loc,
    format_problem,
    problems_from_validation,
    spec_problems,
)
from pixiebox.config.schema import (
    ARCH_NAMES,
    ENV_PREFIX,
    ApiSection,
    ArchName,
    BootSection,
    DhcpMode,
    DiskFormat,
    HttpSection,
    ImageArch,
    ImageSection,
    KubernetesSection,
    LabConfig,
    LabSection,
    MachineSection,
    NetworkSection,
    PowerDriver,
    PowerSection,
    PowerSettings,
    Section,
    StateSection,
    TelemetrySection,
    UnknownPolicy,
    default_images,
)
from pixiebox.config.tomlscan import Loc, key_lines, line_for
from pixiebox.config.values import (
    Duration,
    Host,
    HttpsUrl,
    IPRange,
    Listen,
    MacAddress,
    WebUrl,
    check_host,
    check_hostname,
    check_url,
    normalize_mac,
    parse_duration,
    split_listen,
)

__all__ = [
    "ARCH_NAMES",
    "CONFIG_PATH_ENV",
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "ApiSection",
    "ArchName",
    "BootSection",
    "ConfigError",
    "DhcpMode",
    "DiskFormat",
    "Duration",
    "EnrollError",
    "Host",
    "HttpSection",
    "HttpsUrl",
    "IPRange",
    "ImageArch",
    "ImageSection",
    "KubernetesSection",
    "LabConfig",
    "LabSection",
    "Listen",
    "Loc",
    "MacAddress",
    "MachineSection",
    "NetworkSection",
    "PowerDriver",
    "PowerSection",
    "PowerSettings",
    "Problem",
    "Section",
    "StateSection",
    "TelemetrySection",
    "UnknownPolicy",
    "WebUrl",
    "check_config",
    "check_host",
    "check_hostname",
    "check_url",
    "config_path",
    "consistency_problems",
    "default_images",
    "error_count",
    "format_loc",
    "format_problem",
    "key_lines",
    "line_for",
    "load_config",
    "normalize_mac",
    "parse_duration",
    "problems_from_validation",
    "spec_problems",
    "split_listen",
]
