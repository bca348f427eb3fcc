"""Tests for `pixiebox check`: every mistake in lab.toml reported with its line and key path.

The command is run the way a user runs it (the installed console script, in a subprocess)
where the command-line behaviour itself matters: exit codes, stdout/stderr, the environment.
The other cases call `pixiebox.cli.main.main` in-process (same code path, minus interpreter
start-up) so that the whole file stays fast.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pixiebox.cli import main as cli
from pixiebox.config import (
    check_config,
    key_lines,
    line_for,
    normalize_mac,
    parse_duration,
)
from pixiebox.config.values import unicast_mac_problem

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "lab.toml"


def _console_script() -> str:
    beside = Path(sys.executable).with_name("pixiebox")
    if beside.exists():
        return str(beside)
    found = shutil.which("pixiebox")
    assert found, "the pixiebox console script is not installed"
    return found


PIXIEBOX = _console_script()

# [network] of most test files: "lo" exists in every network namespace, so no interface warning.
NETWORK = """\
[network]
interface = "lo"
server_ip = "192.168.1.64"
subnet = "192.168.1.0/24"
gateway = "192.168.1.254"
"""  # lines 1-5


# --- running the command and reading what it prints ----------------------------------------


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str


Main = Callable[..., Run]  # run_main(*args)
Check = Callable[[str], Run]  # check(toml_text)


@dataclass(frozen=True)
class Reported:
    """One problem as the user sees it: `PATH:LINE: SEVERITY: KEY: MESSAGE` + `hint:`."""

    path: str
    line: int | None
    severity: str
    key: str
    message: str
    hint: str


_PROBLEM = re.compile(
    r"^(?P<path>.+?):(?:(?P<line>\d+):)? (?P<severity>error|warning): "
    r"(?P<key>\S+): (?P<message>.*)$"
)
_HINT = re.compile(r"^    hint: (?P<hint>.*)$")
_TOTAL = re.compile(r"^(?P<path>.+): (?P<count>\d+) error\(s\); nothing was changed$")


def reported(run: Run) -> list[Reported]:
    """The problems on stderr; fails on any line that is not a problem, a hint or the total."""
    problems: list[Reported] = []
    for text in run.stderr.splitlines():
        if hint := _HINT.match(text):
            assert problems, f"hint before any problem: {text!r}"
            assert not problems[-1].hint, f"two hints for one problem: {text!r}"
            last = problems[-1]
            problems[-1] = Reported(
                last.path, last.line, last.severity, last.key, last.message, hint["hint"]
            )
        elif problem := _PROBLEM.match(text):
            line = int(problem["line"]) if problem["line"] else None
            problems.append(
                Reported(
                    problem["path"],
                    line,
                    problem["severity"],
                    problem["key"],
                    problem["message"],
                    "",
                )
            )
        elif total := _TOTAL.match(text):
            errors = [p for p in problems if p.severity == "error"]
            assert int(total["count"]) == len(errors), run.stderr
        else:
            pytest.fail(f"unexpected line on stderr: {text!r}\n{run.stderr}")
    return problems


def errors(run: Run) -> list[Reported]:
    return [p for p in reported(run) if p.severity == "error"]


def _no_traceback(run: Run) -> Run:
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    return run


def run_script(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Run:
    """The installed console script, with no PIXIEBOX_* variables but those given."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PIXIEBOX_")}
    environment.update(env or {})
    done = subprocess.run(
        [PIXIEBOX, "check", *args],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return _no_traceback(Run(done.returncode, done.stdout, done.stderr))


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PIXIEBOX_"):
            monkeypatch.delenv(name)


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str]) -> Main:
    """run_main(*args) -> Run: `pixiebox check ARGS` in-process (the script's own main)."""

    def run(*args: str) -> Run:
        code = cli.main(["check", *args])
        out = capsys.readouterr()
        return _no_traceback(Run(code, out.out, out.err))

    return run


@pytest.fixture
def check(tmp_path: Path, run_main: Main) -> Check:
    """check(toml_text) -> Run: `pixiebox check --config lab.toml` in-process."""

    def run(text: str) -> Run:
        return run_main("--config", str(write(tmp_path, text)))

    return run


def write(tmp_path: Path, text: str, name: str = "lab.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def line_of(path: Path, prefix: str) -> int:
    """The number of the one uncommented line that starts with prefix."""
    found = [
        number
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if text.startswith(prefix)
    ]
    assert len(found) == 1, (prefix, found)
    return found[0]


def one_error(run: Run) -> Reported:
    assert run.code == 1, run
    found = errors(run)
    assert len(found) == 1, run.stderr
    return found[0]


# --- 1. the shipped example ------------------------------------------------------------------


def test_shipped_example_passes() -> None:
    run = run_script("--config", str(EXAMPLE))
    assert run.code == 0, run.stderr
    assert errors(run) == []  # (a warning is fine: eth0 need not exist here)
    lines = run.stdout.splitlines()
    assert lines[0] == f"{EXAMPLE}: OK"
    assert "proxy mode" in run.stdout
    assert "machines: 2" in lines
    assert re.search(r"^\s+c1\s+f4:4d:30:64:7a:3a\s+192\.168\.1\.31\s", run.stdout, re.M)
    assert re.search(r"^\s+c2\s+f4:4d:30:64:7a:3b\s+192\.168\.1\.32\s", run.stdout, re.M)
    assert len(lines) < 25, "the summary should fit on one screen"


# --- 2. MAC spellings --------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["F4-4D-30-64-7A-3A", "f44d.3064.7a3a", "F4:4D:30:64:7A:3A"])
def test_mac_spellings_accepted_and_normalised(check: Check, spelling: str) -> None:
    run = check(NETWORK + f'\n[[machines]]\nname = "c1"\nmac = "{spelling}"\n')
    assert run.code == 0, run.stderr
    assert run.stderr == ""
    assert re.search(r"^\s+c1\s+f4:4d:30:64:7a:3a\s", run.stdout, re.M), run.stdout
    assert spelling not in run.stdout


@pytest.mark.parametrize("spelling", ["zz:zz:zz:zz:zz:zz", "f4:4d:30:64:7a", "12345"])
def test_bad_mac_rejected(check: Check, spelling: str) -> None:
    run = check(
        NETWORK
        + f"""
[[machines]]
name = "c1"
mac = "{spelling}"
ip = "192.168.1.31"
"""
    )
    error = one_error(run)
    assert (error.line, error.key) == (9, "machines[0].mac")
    assert repr(spelling) in error.message
    assert "f4:4d:30:64:7a:3a" in error.hint
    assert run.stdout == ""


GROUP_MACS = [
    ("01:00:5E:00:00:01", "01:00:5e:00:00:01 is a multicast address (its first octet is odd)"),
    ("ff-ff-ff-ff-ff-ff", "ff:ff:ff:ff:ff:ff is the broadcast address"),
    ("000000000000", "00:00:00:00:00:00 is the all-zero address"),
]
NO_CARD = ": no network card has it; check the MAC on the machine's label or in `pixiebox machines`"


@pytest.mark.parametrize(("spelling", "why"), GROUP_MACS)
def test_group_and_zero_macs_are_config_errors(check: Check, spelling: str, why: str) -> None:
    run = check(NETWORK + f'\n[[machines]]\nname = "c1"\nmac = "{spelling}"\n')
    error = one_error(run)
    assert (error.line, error.key) == (9, "machines[0].mac")
    assert error.message == why + NO_CARD
    assert error.hint == ""  # not "write six hex pairs": the spelling is not the problem


@pytest.mark.parametrize(
    ("mac", "problem"),
    [
        ("f4:4d:30:64:7a:3a", None),
        ("02:00:00:00:00:01", None),  # locally administered, unicast: a VM's NIC
        ("fe:ff:ff:ff:ff:ff", None),
        ("01:00:5e:00:00:01", "multicast"),  # IPv4 multicast
        ("33:33:00:00:00:01", "multicast"),  # IPv6 multicast
        ("ab:cd:ef:01:02:03", "multicast"),
        ("ff:ff:ff:ff:ff:ff", "broadcast"),
        ("00:00:00:00:00:00", "all-zero"),
    ],
)
def test_unicast_mac_problem(mac: str, problem: str | None) -> None:
    said = unicast_mac_problem(mac)
    if problem is None:
        assert said is None
    else:
        assert said is not None and said.startswith(f"{mac} is ") and problem in said


@pytest.mark.parametrize(("spelling", "why"), GROUP_MACS)
def test_enroll_command_refuses_group_and_zero_macs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spelling: str, why: str
) -> None:
    path = write(tmp_path, NETWORK)
    code = cli.main(["enroll", spelling, "--name", "c9", "--config", str(path)])
    out = capsys.readouterr()
    assert code == 1
    assert out.err == f"pixiebox: {why}{NO_CARD}\n" and out.out == ""
    assert path.read_text() == NETWORK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab.toml"]  # not even a lock file


# --- 3. duplicates -----------------------------------------------------------------------------

TWO_MACHINES = (
    NETWORK
    + """
[[machines]]
name = "{n1}"
mac = "{m1}"
ip = "{i1}"

[[machines]]
name = "{n2}"
mac = "{m2}"
ip = "{i2}"
"""
)  # second machine: name line 13, mac 14, ip 15


@pytest.mark.parametrize(
    ("values", "line", "key", "message"),
    [
        pytest.param(
            {"m1": "F4-4D-30-64-7A-3A", "m2": "f44d.3064.7a3a"},
            14,
            "machines[1].mac",
            "MAC f4:4d:30:64:7a:3a is already used by machine 'c1' (machines[0])",
            id="mac-two-spellings",
        ),
        pytest.param(
            {"n2": "C1"},
            13,
            "machines[1].name",
            "name c1 is already used by machine 'c1' (machines[0])",
            id="name",
        ),
        pytest.param(
            {"i2": "192.168.1.31"},
            15,
            "machines[1].ip",
            "IP 192.168.1.31 is already used by machine 'c1' (machines[0])",
            id="ip",
        ),
    ],
)
def test_duplicate_reported_on_second_occurrence(
    check: Check, values: dict[str, str], line: int, key: str, message: str
) -> None:
    fields = {
        "n1": "c1",
        "m1": "f4:4d:30:64:7a:3a",
        "i1": "192.168.1.31",
        "n2": "c2",
        "m2": "f4:4d:30:64:7a:3b",
        "i2": "192.168.1.32",
    }
    run = check(TWO_MACHINES.format(**{**fields, **values}))
    error = one_error(run)
    assert (error.line, error.key, error.message) == (line, key, message)
    assert error.hint.startswith("each machine needs its own")


# --- 4. machine addresses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "message"),
    [
        ("10.0.0.5", "10.0.0.5 (machine 'c1') is outside the subnet 192.168.1.0/24"),
        ("192.168.1.254", "192.168.1.254 (machine 'c1') is the gateway address"),
        ("192.168.1.64", "192.168.1.64 (machine 'c1') is the server_ip address"),
        ("192.168.1.255", "192.168.1.255 is the broadcast address of 192.168.1.0/24"),
    ],
)
def test_bad_machine_ip(check: Check, ip: str, message: str) -> None:
    run = check(NETWORK + f'\n[[machines]]\nname = "c1"\nmac = "f4:4d:30:64:7a:3a"\nip = "{ip}"\n')
    error = one_error(run)
    assert (error.line, error.key, error.message) == (10, "machines[0].ip", message)
    assert error.hint


# --- 5. the pool -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        pytest.param(
            "192.168.2.10-192.168.2.20",
            "the pool 192.168.2.10-192.168.2.20 is not inside the subnet 192.168.1.0/24",
            id="outside-subnet",
        ),
        pytest.param(
            "192.168.1.20-192.168.1.40",
            "the pool 192.168.1.20-192.168.1.40 overlaps the reservation of machine 'c1' "
            "(192.168.1.31, machines[0])",
            id="overlaps-reservation",
        ),
        pytest.param(
            "192.168.1.60-192.168.1.70",
            "the pool 192.168.1.60-192.168.1.70 contains the server_ip 192.168.1.64",
            id="contains-server",
        ),
        pytest.param(
            "192.168.1.200-192.168.1.254",
            "the pool 192.168.1.200-192.168.1.254 contains the gateway 192.168.1.254",
            id="contains-gateway",
        ),
    ],
)
def test_bad_pool(check: Check, pool: str, message: str) -> None:
    run = check(
        NETWORK
        + f"""\
dhcp_mode = "full"
pool = "{pool}"

[[machines]]
name = "c1"
mac = "f4:4d:30:64:7a:3a"
ip = "192.168.1.31"
"""
    )
    error = one_error(run)
    assert (error.line, error.key, error.message) == (7, "network.pool", message)
    assert error.hint


def test_full_mode_needs_a_pool(check: Check) -> None:
    run = check(NETWORK + 'dhcp_mode = "full"\n')
    error = one_error(run)
    # No pool key to point at: the line of its table, [network].
    assert (error.line, error.key) == (1, "network.pool")
    assert error.message == "full mode hands out addresses but no pool is set"
    assert "pool =" in error.hint and "reservation" in error.hint


def test_pool_is_fine_outside_reservations(check: Check) -> None:
    run = check(NETWORK + 'dhcp_mode = "full"\npool = "192.168.1.100-192.168.1.199"\n')
    assert run.code == 0, run.stderr
    assert "full mode" in run.stdout and "pool 192.168.1.100-192.168.1.199" in run.stdout


# --- 6. unknown keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "key", "hint"),
    [
        pytest.param(
            '[network]\ninterfase = "lo"\n',
            2,
            "network.interfase",
            "did you mean 'interface'?",
            id="interfase",
        ),
        pytest.param(
            '[network]\ninterface = "lo"\nleas_time = "1h"\n',
            3,
            "network.leas_time",
            "did you mean 'lease_time'?",
            id="leas_time",
        ),
        pytest.param(
            '[network]\ninterface = "lo"\n\n[netwrok]\ndhcp_mode = "full"\n',
            4,
            "netwrok",
            "did you mean 'network'?",
            id="netwrok-section",
        ),
        pytest.param(
            '[network]\ninterface = "lo"\n\n[[machine]]\nname = "c1"\n',
            4,
            "machine",
            "did you mean 'machines'?",
            id="machine-array",
        ),
        pytest.param(
            '[network]\ninterface = "lo"\n[[machines]]\nnmae = "c1"\nname = "c1"\n'
            'mac = "f4:4d:30:64:7a:3a"\n',
            4,
            "machines[0].nmae",
            "did you mean 'name'?",
            id="nmae-in-machine",
        ),
        pytest.param(
            '[network]\ninterface = "lo"\n[images.osie]\nkernal = "osie/vmlinuz"\n'
            'kernel = "osie/vmlinuz"\n',
            4,
            "images.osie.kernal",
            "did you mean 'kernel'?",
            id="kernal-in-image",
        ),
    ],
)
def test_unknown_key_suggests_the_right_one(
    check: Check, text: str, line: int, key: str, hint: str
) -> None:
    error = one_error(check(text))
    assert (error.line, error.key) == (line, key)
    assert error.message == f"unknown key {key.split('.')[-1]!r}"
    assert error.hint == hint


def test_unknown_machine_key_without_close_match_lists_the_keys(check: Check) -> None:
    run = check(
        NETWORK
        + """
[[machines]]
name = "c1"
mac = "f4:4d:30:64:7a:3a"

[[machines]]
name = "c2"
mac = "f4:4d:30:64:7a:3b"
adress = "192.168.1.32"
"""
    )
    error = one_error(run)
    assert (error.line, error.key) == (14, "machines[1].adress")
    assert error.message == "unknown key 'adress'"
    assert error.hint == "known keys here: name, mac, ip, image, power, disk, format, secure_boot"


# --- 7. enumerations ---------------------------------------------------------------------------


def test_unknown_dhcp_mode_names_the_allowed_values(check: Check) -> None:
    error = one_error(check(NETWORK + 'dhcp_mode = "fulll"\n'))
    assert (error.line, error.key) == (6, "network.dhcp_mode")
    assert error.message.startswith("'fulll' is not allowed")
    for mode in ("'proxy'", "'reservation'", "'full'"):
        assert mode in error.message
    assert error.hint.startswith("one of")


# --- 8. durations ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1 fortnight", "10x"])
def test_bad_duration_rejected(check: Check, value: str) -> None:
    error = one_error(check(NETWORK + f'lease_time = "{value}"\n'))
    assert (error.line, error.key) == (6, "network.lease_time")
    assert error.message == f"{value!r} is not a duration"
    assert '"1h30m"' in error.hint


@pytest.mark.parametrize(
    ("value", "seconds"), [('"1h30m"', 5400), ('"90s"', 90), ('"2d"', 172800), ("3600", 3600)]
)
def test_good_duration_accepted(tmp_path: Path, value: str, seconds: int) -> None:
    config, problems = check_config(write(tmp_path, NETWORK + f"lease_time = {value}\n"))
    assert problems == []
    assert config is not None and config.network.lease_time == seconds


def test_tiny_lease_rejected(check: Check) -> None:
    error = one_error(check(NETWORK + 'lease_time = "5s"\n'))
    assert (error.line, error.key) == (6, "network.lease_time")
    assert "shorter than 10 seconds" in error.message


# --- 9. a missing interface is a warning -------------------------------------------------------


def test_missing_interface_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, '[network]\ninterface = "nosuch0"\n')
    run = run_script("--config", str(path))
    assert run.code == 0, run.stderr
    [warning] = reported(run)
    assert (warning.path, warning.line, warning.severity, warning.key) == (
        str(path),
        2,
        "warning",
        "network.interface",
    )
    assert "'nosuch0'" in warning.message and "lo" in warning.message
    assert "another machine" in warning.hint
    assert run.stdout.startswith(f"{path}: OK\n")
    assert "proxy mode on nosuch0" in run.stdout


def test_missing_interface_warning_sorted_among_errors(check: Check) -> None:
    run = check(
        '[network]\ninterface = "nosuch0"\nsubnet = "192.168.1.0/24"\n'
        '[[machines]]\nname = "c1"\nmac = "f4:4d:30:64:7a:3a"\nip = "10.0.0.1"\n'
    )
    assert run.code == 1
    assert [(p.line, p.severity, p.key) for p in reported(run)] == [
        (2, "warning", "network.interface"),
        (7, "error", "machines[0].ip"),
    ]


# --- 10. every mistake at once ----------------------------------------------------------------

MANY_MISTAKES = """\
[netwrok]
interface = "lo"

[network]
interfase = "lo"
subnet = "192.168.1.0/24"
server_ip = "192.168.1.64"
dhcp_mode = "fulll"
lease_time = "1 fortnight"

[boot]
image = "nope"

[[machines]]
name = "c1"
mac = "f4:4d:30:64:7a:3a"
ip = "192.168.1.31"

[[machines]]
name = "c2"
mac = "F4-4D-30-64-7A-3A"
ip = "10.0.0.2"

[[machines]]
name = "c3"
mac = "f4:4d:30:64:7a"
"""


def test_every_mistake_reported_in_one_run_sorted_by_line(tmp_path: Path) -> None:
    path = write(tmp_path, MANY_MISTAKES)
    run = run_script("--config", str(path))
    assert run.code == 1
    assert run.stdout == ""
    found = errors(run)
    assert [(p.line, p.key) for p in found] == [
        (1, "netwrok"),
        (5, "network.interfase"),
        (8, "network.dhcp_mode"),
        (9, "network.lease_time"),
        (12, "boot.image"),
        (21, "machines[1].mac"),
        (22, "machines[1].ip"),
        (26, "machines[2].mac"),
    ]
    assert all(p.path == str(path) for p in found)
    assert all(p.hint for p in found), run.stderr
    assert run.stderr.rstrip().endswith(f"{path}: 8 error(s); nothing was changed")


# --- 11./12. files that cannot be read ---------------------------------------------------------


def test_broken_toml_is_one_error_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[network]\ninterface = "lo"\ndhcp_mode = "full\nlease_time = "1h"\n')
    run = run_script("--config", str(path))
    error = one_error(run)
    assert (error.line, error.key) == (3, "(file)")
    assert error.message.startswith("not valid TOML")
    assert error.hint
    assert run.stdout == ""


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    run = run_script("--config", str(path))
    error = one_error(run)
    assert (error.path, error.line) == (str(path), None)
    assert error.message == f"no such file: {path}"
    assert "--config" in error.hint and "PIXIEBOX_CONFIG" in error.hint
    assert run.stdout == ""


def test_default_path_when_nothing_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_main: Main
) -> None:
    monkeypatch.chdir(tmp_path)
    run = run_main()
    error = one_error(run)
    assert error.message == "no such file: config/lab.toml"


# --- 13. the environment -----------------------------------------------------------------------


def test_environment_overrides_a_key(monkeypatch: pytest.MonkeyPatch, run_main: Main) -> None:
    monkeypatch.setenv("PIXIEBOX_NETWORK__DHCP_MODE", "reservation")
    run = run_main("--config", str(EXAMPLE))
    assert run.code == 0, run.stderr
    assert "reservation mode" in run.stdout
    assert "proxy mode" not in run.stdout


def test_bad_environment_value_is_reported() -> None:
    run = run_script("--config", str(EXAMPLE), env={"PIXIEBOX_NETWORK__DHCP_MODE": "bogus"})
    error = one_error(run)
    assert error.key == "network.dhcp_mode"
    assert error.line == line_of(EXAMPLE, "dhcp_mode =")
    assert error.message.startswith("'bogus' is not allowed")
    # The file says "proxy" on that line: the message must say where 'bogus' came from.
    assert "PIXIEBOX_NETWORK__DHCP_MODE" in error.message


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, NETWORK, name="elsewhere.toml")
    run = run_script(cwd=tmp_path / "..", env={"PIXIEBOX_CONFIG": str(path)})
    assert run.code == 0, run.stderr
    assert run.stdout.startswith(f"{path}: OK\n")


def test_explicit_config_beats_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_main: Main
) -> None:
    path = write(tmp_path, NETWORK)
    monkeypatch.setenv("PIXIEBOX_CONFIG", str(tmp_path / "absent.toml"))
    run = run_main("--config", str(path))
    assert run.code == 0, run.stderr
    assert run.stdout.startswith(f"{path}: OK\n")


# --- 14. images --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "known"),
    [
        ("", "osie"),
        (
            '\n[images.tiny]\nkernel = "tiny/vmlinuz"\n\n[images.big]\nkernel = "big/vmlinuz"\n',
            "big, tiny",
        ),
    ],
)
def test_unknown_boot_image_names_the_known_ones(check: Check, images: str, known: str) -> None:
    error = one_error(check(NETWORK + '\n[boot]\nimage = "nope"\n' + images))
    assert (error.line, error.key) == (8, "boot.image")
    assert error.message == "no image named 'nope'"
    assert error.hint == f"define [images.nope] or pick one of: {known}"


def test_unknown_machine_image(check: Check) -> None:
    error = one_error(
        check(NETWORK + '\n[[machines]]\nname = "c1"\nmac = "f4:4d:30:64:7a:3a"\nimage = "nope"\n')
    )
    assert (error.line, error.key) == (10, "machines[0].image")
    assert "osie" in error.hint


ARCH_IMAGE = """
[images.osie]
kernel = "osie/vmlinuz"
initrd = ["osie/initrd"]

[images.osie.arch.{arch}]
kernel = "osie-arm64/vmlinuz"
"""  # the arch table's header is line 11 after NETWORK


@pytest.mark.parametrize(
    ("arch", "meant"),
    [("arm65", "arm64"), ("aarch64", "arm64"), ("amd64", "x86-64"), ("x86_64", "x86-64"),
     ("armv7", "armhf"), ("sparc", None)],
)  # fmt: skip
def test_an_unknown_architecture_is_named_at_its_line_with_the_allowed_ones(
    check: Check, arch: str, meant: str | None
) -> None:
    error = one_error(check(NETWORK + ARCH_IMAGE.format(arch=arch)))
    assert (error.line, error.key) == (11, f"images.osie.arch.{arch}")
    assert error.message == f"{arch!r} is not an architecture an image can name"
    assert "x86-64, arm64, armhf, riscv64" in error.hint
    assert error.hint.startswith(f"did you mean {meant!r}?" if meant else "one of x86-64")
    assert "[images.osie] itself" in error.hint


def test_architecture_tables_inline_and_their_keys_are_checked_like_any_other(
    check: Check,
) -> None:
    run = check(
        NETWORK
        + """
[images.osie]
kernel = "osie/vmlinuz"
arch = { arm65 = { kernel = "a" }, armhf = { kernal = "b" } }

[images.two]
kernel = "two/vmlinuz"

[images.two.arch.arm64]
initrd = ["two-arm64/initrd"]
"""
    )
    found = {(p.line, p.key): p for p in errors(run)}
    assert set(found) == {
        (9, "images.osie.arch.arm65"),
        (9, "images.osie.arch.armhf.kernal"),
        (9, "images.osie.arch.armhf.kernel"),
        (14, "images.two.arch.arm64.kernel"),
    }, run.stderr
    assert found[(9, "images.osie.arch.armhf.kernal")].hint == "did you mean 'kernel'?"
    missing = found[(14, "images.two.arch.arm64.kernel")]
    assert missing.message == "this key is required"
    assert "[images.two.arch.arm64] names that architecture's own kernel" in missing.hint


def test_check_says_which_build_each_architecture_boots(check: Check) -> None:
    run = check(
        NETWORK
        + ARCH_IMAGE.format(arch="arm64")
        + '\n[images.osie.arch.armhf]\nkernel = "osie-armhf/vmlinuz"\nfdtdir = "osie-armhf/dtbs"\n'
    )
    assert run.code == 0, run.stderr
    assert (
        "image osie: arm64 → osie-arm64/vmlinuz; armhf → osie-armhf/vmlinuz (fdtdir "
        "osie-armhf/dtbs); every other architecture (x86-64, riscv64) → osie/vmlinuz"
    ) in run.stdout.splitlines()


# --- unit tests: parse_duration, normalize_mac, key_lines --------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("1h", 3600),
        ("1h30m", 5400),
        ("2d", 172800),
        ("1d 2h", 93600),
        ("1H", 3600),
        ("600", 600),
        (3600, 3600),
        (0, 0),
    ],
)
def test_parse_duration(value: object, seconds: int) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["1 fortnight", "10x", "", "h", "1h30", "-5", "1.5h", -1, 1.5, True, None]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    "value",
    [
        "f4:4d:30:64:7a:3a",
        "F4:4D:30:64:7A:3A",
        "F4-4D-30-64-7A-3A",
        "f44d.3064.7a3a",
        "f44d30647a3a",
        " f4:4d:30:64:7a:3a ",
    ],
)
def test_normalize_mac(value: str) -> None:
    assert normalize_mac(value) == "f4:4d:30:64:7a:3a"


@pytest.mark.parametrize(
    "value",
    ["zz:zz:zz:zz:zz:zz", "f4:4d:30:64:7a", "12345", "f4:4d:30:64:7a:3a:00", "", 12345, None],
)
def test_normalize_mac_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="MAC address"):
        normalize_mac(value)


KEY_LINES_TEXT = """\
# [network] in a comment is not a header
# interface = "eth9" in a comment is not a key
[network]
interface = "lo"  # [x] and key = 1 in a trailing comment
  # dhcp_mode = "full"
dhcp_mode = "proxy"

[images.osie]
kernel = "osie/vmlinuz"

[[machines]]
name = "a"

[[machines]]  # the second
name = "b"
mac = "f4:4d:30:64:7a:3b"
power = { driver = "wol", host = "b.lab" }

# [[machines]]
#[state]
# key = 1
[[machines]]
name = "c"
ip = "192.168.1.33"
"""


def test_key_lines() -> None:
    lines = key_lines(KEY_LINES_TEXT)
    assert lines[("network",)] == 3
    assert lines[("network", "interface")] == 4
    assert lines[("network", "dhcp_mode")] == 6
    assert lines[("images", "osie", "kernel")] == 9
    assert lines[("machines",)] == 11
    assert lines[("machines", 0, "name")] == 12
    assert lines[("machines", 1)] == 14
    assert lines[("machines", 1, "name")] == 15
    assert lines[("machines", 1, "mac")] == 16
    assert lines[("machines", 2)] == 22
    assert lines[("machines", 2, "name")] == 23
    assert lines[("machines", 2, "ip")] == 24
    # Nothing from the comments: no header, no key, no fourth machine.
    assert ("interface",) not in lines
    assert ("state",) not in lines
    assert ("x",) not in lines
    assert ("machines", 3) not in lines
    assert all(not (isinstance(k[-1], str) and k[-1] == "key") for k in lines)


def test_line_for() -> None:
    lines = key_lines(KEY_LINES_TEXT)
    # A key inside an inline table: its parent key's line.
    assert line_for(lines, ("machines", 1, "power", "driver")) == 17
    assert line_for(lines, ("machines", 1, "power", "host")) == 17
    # A key that is not in the file: its table's line.
    assert line_for(lines, ("machines", 2, "mac")) == 22
    assert line_for(lines, ("network", "pool")) == 3
    # Nothing at all: no line.
    assert line_for(lines, ("http", "listen")) is None
    assert line_for(lines, ()) is None


NESTED_TEXT = """\
[[machines]]
name = "a"
power = [
  { driver = "wol" },
  { driver = "tasmota", hots = "plug-a" },
]
notes = \"\"\"
fake = 1
[not.a.header]
\"\"\"

[[machines]]
name = "b"

[machines.power]
driver = "ipmi"
"""


def test_key_lines_follow_the_toml_structure() -> None:
    """One scanner (tomlscan) finds lines: elements of a multi-line array have their own line, a
    sub-table belongs to the array element above it, and a multi-line string holds no keys."""
    lines = key_lines(NESTED_TEXT)
    assert lines[("machines", 0, "power")] == 3
    assert lines[("machines", 0, "power", 1)] == 5
    assert line_for(lines, ("machines", 0, "power", 1, "hots")) == 5
    assert lines[("machines", 1, "power")] == 15
    assert lines[("machines", 1, "power", "driver")] == 16
    assert ("machines", 0, "fake") not in lines
    assert ("not", "a", "header") not in lines


def test_power_key_in_a_multi_line_chain_is_reported_at_its_own_line(check: Check) -> None:
    """Not at the `power = [` line: the tasmota entry's own, where `host` is misspelt."""
    run = check(
        NETWORK
        + '\n[[machines]]\nname = "c1"\nmac = "f4:4d:30:64:7a:3a"\npower = [\n'
        + '  { driver = "wol" },\n  { driver = "tasmota", hots = "plug-c1" },\n]\n'
    )
    found = {(error.key, error.line) for error in errors(run)}
    assert found == {("machines[0].power[1].hots", 12), ("machines[0].power[1].host", 12)}
