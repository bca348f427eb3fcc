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
from pixiebox.config.tomlscan import Loc, key_lines, line_for, too_deep

DEFAULT_CONFIG_PATH = Path("config/lab.toml")
CONFIG_PATH_ENV = "PIXIEBOX_CONFIG"

#: How deep arrays, inline tables and dotted keys may nest. lab.toml needs 4 at most (a
#: machine's power chain); tomllib and pydantic recurse, so 10,000 levels would be a
#: RecursionError instead of a problem with its line.
MAX_DEPTH = 32
#: The largest lab.toml read. A lab of a thousand commented machines is ~300 KB; checking is
#: linear but not cheap (a 10 MB file of unknown keys took ~30 s and printed 157 MB).
MAX_BYTES = 1 << 20
#: Problems reported at most; then one more says how many were left out. A file that is
#: wrong a thousand times is fixed from the top, not read to the end.
MAX_PROBLEMS = 50


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


def _deepest(data: dict[str, Any]) -> Loc | None:
    """The path of a value nested more than MAX_DEPTH deep (dotted keys and [a.b.c] headers
    nest without brackets, so the scan before parsing does not see them), followed down to
    its first leaf (the key whose line is known), or None. Loops, not recursion: the depth is
    what is being measured."""
    stack: list[tuple[Loc, Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if len(path) > MAX_DEPTH:
            while isinstance(value, (dict, list)) and value:
                key, value = next(iter(value.items())) if isinstance(value, dict) else (0, value[0])
                path = (*path, key)
            return path
        if isinstance(value, dict):
            stack += [((*path, str(k)), v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [((*path, i), v) for i, v in enumerate(value)]
    return None


def _bounded(problems: list[Problem], left_out: int = 0) -> list[Problem]:
    """At most MAX_PROBLEMS, then one that counts the rest."""
    left_out += max(len(problems) - MAX_PROBLEMS, 0)
    if not left_out:
        return problems
    more = Problem(
        (),
        f"... and {left_out} more problems",
        "fix the ones above and run pixiebox check again",
        count=left_out,
    )
    return [*problems[:MAX_PROBLEMS], more]


def reload_refusal(path: Path, running: LabConfig, new: LabConfig) -> str | None:
    """Why a reload of `new` must not replace `running`, in one log line; None if it may.

    A file that lists no machines while the running lab has some is far more often a
    truncated save, an editor's empty buffer or a half-copied file than a wish to forget the
    lab; applying it would stop answering every machine at once. The file says so when it is
    meant: [lab] allow_no_machines = true."""
    if not running.machines or new.machines or new.lab.allow_no_machines:
        return None
    return (
        f"{path} lists no machines but the running lab has {len(running.machines)}; keeping "
        "the previous settings. Restore the [[machines]] entries (an editor may have saved a "
        "truncated file), or add allow_no_machines = true under [lab] and send SIGHUP again"
    )


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
        with open(file, "rb") as stream:
            raw = stream.read(MAX_BYTES + 1)
        # utf-8-sig: Windows editors (Notepad) start the file with a BOM, which TOML forbids.
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        return None, [
            Problem((), f"no such file: {file}", "pass --config PATH or set PIXIEBOX_CONFIG")
        ]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem((), f"cannot read {file}: {exc}")]
    if len(raw) > MAX_BYTES:
        return None, [
            Problem(
                (),
                f"the file is larger than {MAX_BYTES // 1024} KiB; Pixiebox reads at most that",
                "lab.toml describes a lab by hand: check that this is the right file",
            )
        ]
    deep_line = too_deep(text, MAX_DEPTH)
    if deep_line is not None:
        return None, [_too_deep(deep_line)]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"at line (\d+)", str(exc))
        # "at end of document": a truncated file, whose last line is where to look.
        last = text.count("\n") + (0 if text.endswith("\n") else 1)
        return None, [
            Problem(
                (),
                f"not valid TOML: {exc}",
                'check quotes and brackets, e.g. name = "c1"',
                line=int(match.group(1)) if match else max(last, 1),
            )
        ]
    deep = _deepest(data)
    if deep is not None:
        return None, [_too_deep(line_for(key_lines(text), deep))]
    problems: list[Problem] = []
    left_out = 0
    config: LabConfig | None = None
    try:
        config = LabConfig(**data)
    except ValidationError as exc:
        # Only the problems that will be shown are worded (a "did you mean" each).
        problems += problems_from_validation(exc, limit=MAX_PROBLEMS)
        left_out = exc.error_count() - len(problems)
    if "network" not in data:
        # Every section has defaults, so an empty (or emptied) file would pass as a lab on
        # eth0 with no machines: say what it lacks instead.
        config = None
        problems.append(
            Problem(
                ("network",),
                "lab.toml has no [network] section",
                'add one with at least interface = "eth0" (the interface facing the lab '
                "machines); see config/lab.toml for server_ip, subnet and dhcp_mode",
            )
        )
    if config is not None:
        machines = list(enumerate(config.machines))
        problems += consistency_problems(config.network, config.boot, config.images, machines)
    else:
        problems += consistency_problems(*_validated_parts(_env_overrides(data)))
    located = _with_lines(_blame_environment(problems), key_lines(text))
    return config, _bounded(located, left_out)


def _too_deep(line: int | None) -> Problem:
    return Problem(
        (),
        f"nested more than {MAX_DEPTH} levels deep",
        "lab.toml needs a few levels at most: check the brackets and braces from this line",
        line=line,
    )
