"""lab.toml as a hostile or careless editor leaves it (issue 13, item 5): nesting deep enough
to exhaust the parser's recursion, a UTF-8 BOM from a Windows editor, an empty or truncated
file, and a flood of unknown keys. Each is one clear problem with its line, never a traceback,
and checking it stays cheap.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import netlab
import pytest
from agentproc import lab_toml, start_agent
from cleanenv import drop_pixiebox_variables
from pixiebox.config import LabConfig, check_config, labfile, load_config
from pixiebox.config.load import MAX_BYTES, MAX_DEPTH, MAX_PROBLEMS, reload_refusal
from test_check import NETWORK, PIXIEBOX


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    drop_pixiebox_variables(monkeypatch)


MACHINE = """
# the first node, on the left of the shelf
[[machines]]
name = "c1"
mac = "52:54:00:00:00:01"
ip = "192.168.1.11"
"""


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PIXIEBOX, "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- nesting -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["[" * 10_000 + "]" * 10_000, "{b = " * 10_000 + "1" + "}" * 10_000],
    ids=["arrays", "inline-tables"],
)
def test_deep_nesting_is_an_error_with_its_line(tmp_path: Path, value: str) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(f"{NETWORK}\n# a comment\na = {value}\n")
    config, problems = check_config(path)
    assert config is None
    assert [(p.line, p.message) for p in problems] == [
        (8, f"nested more than {MAX_DEPTH} levels deep")
    ]
    run = run_check(path)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and "RecursionError" not in run.stderr
    assert f"lab.toml:8: error: (file): nested more than {MAX_DEPTH} levels deep" in run.stderr
    with pytest.raises(Exception) as raised:
        load_config(path)
    assert "nested more than" in str(raised.value)


def test_deep_dotted_keys_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(NETWORK + "[lab]\n" + ".".join(["x"] * 5000) + " = 1\n")
    config, problems = check_config(path)
    assert config is None
    assert [p.message for p in problems] == [f"nested more than {MAX_DEPTH} levels deep"]
    assert problems[0].line == 7


def test_brackets_in_strings_and_comments_do_not_count(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    deep = "[" * 100
    path.write_text(
        f'{NETWORK}# {deep}\n[lab]\nname = "{deep}"\n'
        f"domain = '{{{{{{{{' # {deep}\n"
        f'[boot]\nkernel_args = """\n{deep}\n"""\n'
    )
    _, problems = check_config(path)
    assert not any("nested" in p.message for p in problems), problems


def test_nesting_up_to_the_limit_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    path.write_text(f"a = {ok}\n{NETWORK}")  # at the top: under [network] it is one deeper
    _, problems = check_config(path)
    assert [p.message for p in problems] == ["unknown key 'a'"]
    path.write_text(f"{NETWORK}a = {ok}\n")
    _, problems = check_config(path)
    assert [(p.line, p.message) for p in problems] == [
        (6, f"nested more than {MAX_DEPTH} levels deep")
    ]


# --- a BOM ---------------------------------------------------------------------------------------


def test_a_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    path.write_bytes(("\ufeff" + NETWORK + MACHINE).encode())
    config, problems = check_config(path)
    assert problems == []
    assert config is not None and config.machines[0].name == "c1"
    assert run_check(path).returncode == 0


def test_enrolling_keeps_the_bom_and_the_comments(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    original = ("\ufeff" + NETWORK + MACHINE).encode()
    path.write_bytes(original)
    done = labfile.enroll(path, "52:54:00:00:00:02", ip="192.168.1.12")
    after = path.read_bytes()
    assert after.startswith(original)
    assert after.count(b"\xef\xbb\xbf") == 1
    assert b"# the first node, on the left of the shelf" in after
    config = load_config(path)
    assert [m.name for m in config.machines] == ["c1", done.name]
    labfile.update_machine(path, done.name, ip="192.168.1.13")
    assert path.read_bytes().startswith(original)
    assert str(load_config(path).machines[1].ip) == "192.168.1.13"


# --- [network] -----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "# nothing yet\n", '[lab]\nname = "x"\n'])
def test_a_file_without_network_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(content)
    config, problems = check_config(path)
    assert config is None and len(problems) == 1
    assert problems[0].message.startswith("lab.toml has no [network] section")
    assert "interface" in problems[0].hint
    run = run_check(path)
    assert run.returncode == 1 and "OK" not in run.stdout
    assert "no [network] section" in run.stderr


def test_the_example_has_network() -> None:
    example = Path(__file__).resolve().parents[1] / "config" / "lab.toml"
    _, problems = check_config(example)
    assert not [p for p in problems if p.severity == "error"]


# --- a reload that would remove every machine ---------------------------------------------------


def _config(text: str, tmp_path: Path) -> LabConfig:
    path = tmp_path / "lab.toml"
    path.write_text(text)
    return load_config(path)


def test_a_reload_that_removes_every_machine_is_refused(tmp_path: Path) -> None:
    running = _config(NETWORK + MACHINE, tmp_path)
    emptied = _config(NETWORK, tmp_path)
    refusal = reload_refusal(tmp_path / "lab.toml", running, emptied)
    assert refusal is not None
    assert str(tmp_path / "lab.toml") in refusal
    assert "allow_no_machines = true" in refusal
    assert "\n" not in refusal
    allowed = _config(NETWORK + "[lab]\nallow_no_machines = true\n", tmp_path)
    assert reload_refusal(tmp_path / "lab.toml", running, allowed) is None
    assert reload_refusal(tmp_path / "lab.toml", running, running) is None
    assert reload_refusal(tmp_path / "lab.toml", emptied, emptied) is None


def test_a_truncated_file_is_refused_by_validation(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    full = NETWORK + MACHINE
    path.write_text(full[: full.index("mac =") + 9])
    config, problems = check_config(path)
    assert config is None
    assert [(p.line, p.message) for p in problems] == [
        (10, "not valid TOML: Unterminated string (at end of document)")
    ]


# --- many problems -------------------------------------------------------------------------------


def test_at_most_fifty_problems_then_a_count(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(NETWORK + "".join(f"key{i} = 1\n" for i in range(900)))
    _, problems = check_config(path)
    assert MAX_PROBLEMS == 50
    assert len(problems) == 51
    assert problems[-1].message == "... and 850 more problems"
    run = run_check(path)
    assert run.returncode == 1
    assert run.stderr.count("unknown key") == 50
    assert "... and 850 more problems" in run.stderr
    assert f"{path}: 900 error(s); nothing was changed" in run.stderr


def test_a_huge_file_is_refused_quickly(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(NETWORK + "".join(f"k{i} = 1\n" for i in range(900_000)))
    started = time.monotonic()
    run = run_check(path)
    assert time.monotonic() - started < 10
    assert run.returncode == 1
    assert len(run.stderr) < 10_000
    assert "at most" in run.stderr and "Traceback" not in run.stderr


def test_a_file_at_the_size_limit_is_checked_in_bounded_time(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    keys = "".join(f"k{i} = 1\n" for i in range(200_000))
    text = NETWORK + keys
    text = text[: MAX_BYTES - 100]
    text = text[: text.rindex("\n") + 1]
    path.write_text(text)
    started = time.monotonic()
    run = run_check(path)
    assert time.monotonic() - started < 20
    assert run.returncode == 1
    assert len(run.stderr) < 20_000
    assert "more problems" in run.stderr


# --- serve refuses to start, in the same words ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (f"{NETWORK}a = {'[' * 10_000}{']' * 10_000}\n", "lab.toml:6: error: (file): nested more"),
        ("", "no [network] section"),
        ("\ufeff" + NETWORK + "".join(f"k{i} = 1\n" for i in range(900)), "... and 850 more"),
    ],
    ids=["deep", "empty", "many"],
)
def test_serve_refuses_to_start_with_one_bounded_message(
    tmp_path: Path, text: str, said: str
) -> None:
    """Nothing is bound or started: the file is checked first, so this needs no namespace."""
    path = tmp_path / "lab.toml"
    path.write_text(text)
    run = subprocess.run(
        [PIXIEBOX, "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1
    assert run.stderr.startswith(f"cannot start: {path} has errors:")
    assert said in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr) < 20_000


# --- the running agent (namespaces) --------------------------------------------------------------

SUBNET = "10.87.0.0/24"
AGENT_IP = "10.87.0.2"
C1_MAC, C1_IP = "02:00:00:00:87:01", "10.87.0.31"


def test_sighup_with_an_emptied_or_truncated_file_keeps_the_machines(
    netlab_require: Callable[..., None], segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("dhclient")
    text = lab_toml(mode="reservation", subnet=SUBNET, assets=workdir / "assets",
                    state=workdir / "state", machines=[("c1", C1_MAC, C1_IP)])  # fmt: skip
    agent = start_agent(segment.add_host("agent", ip=f"{AGENT_IP}/24"), text, workdir)
    # An editor's truncated save that still parses: [network] and all, no machines.
    emptied = text[: text.index("[[machines]]")]
    agent.config.write_text(emptied)
    agent.proc.send_signal(signal.SIGHUP)
    log = agent.wait_log("lists no machines")
    (line,) = [line for line in log.splitlines() if "lists no machines" in line]
    assert str(agent.config) in line and "allow_no_machines = true" in line
    # Cut inside the machine entry: refused by validation, as before.
    agent.config.write_text(text[: text.index("mac =") + 12])
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_log("keeping the previous settings:")
    c1 = segment.add_host("c1", mac=C1_MAC)
    assert netlab.run_dhclient(c1, workdir / "c1").ip == C1_IP
    # Meant: said in the file, then applied.
    agent.config.write_text(emptied.replace('domain = "lab.test"\n', 'domain = "lab.test"\n'
                                            "allow_no_machines = true\n"))  # fmt: skip
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_log(": 0 machines")
    assert "Traceback" not in agent.text()
