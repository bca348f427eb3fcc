"""Finding, reading and checking lab.toml: `check_config` (every problem, with its line) and
`load_config` (the config, or ConfigError), with the environment's PIXIEBOX_* overrides.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import EnvSettingsSource

from pixiebox.config.problems import (
    ConfigError,
    Problem,
    consistency_problems,
    problems_from_validation,
)
from pixiebox.config.schema import (
    ENV_PREFIX,
    BootSection,
    ImageSection,
    LabConfig,
    MachineSection,
    NetworkSection,
    default_images,
)
from pixiebox.config.tomlscan import Loc, key_lines, line_for

DEFAULT_CONFIG_PATH = Path("config/lab.toml")
CONFIG_PATH_ENV = "PIXIEBOX_CONFIG"


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


def _environment() -> dict[str, Any]:
    """The PIXIEBOX_* overrides as pydantic-settings reads them for LabConfig (same prefix,
    `__` nesting, JSON for lists), as nested data: {"network": {"dhcp_mode": "full"}}."""
    return EnvSettingsSource(LabConfig)()


def _env_overrides(data: dict[str, Any]) -> dict[str, Any]:
    """The file's data with the environment's overrides applied, for the per-section pass.

    pydantic-settings applies them itself when it builds a whole LabConfig; this pass validates
    section by section (after the whole failed), which pydantic-settings has no call for, so
    its source is read here and merged the way it merges (a key at a time within a section)."""
    result = dict(data)
    for section, values in _environment().items():
        if isinstance(values, dict) and isinstance(result.get(section, {}), dict):
            result[section] = {**result.get(section, {}), **values}
        else:
            result[section] = values
    return result


def _blame_environment(problems: Iterable[Problem]) -> list[Problem]:
    """Say so when the bad value came from a PIXIEBOX_* variable: the file's line shows another.

    pydantic-settings reports only the key, not the variable it read: the variable's name as
    it is spelled in the environment is looked up here."""
    spelled = {name.lower(): name for name in os.environ}
    names: dict[Loc, str] = {}
    for section, values in _environment().items():
        if isinstance(values, dict):
            for key in values:
                wanted = f"{ENV_PREFIX}{section}__{key}".lower()
                names[(section, key)] = spelled.get(wanted, wanted.upper())
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
    return config, _with_lines(_blame_environment(problems), key_lines(text))
