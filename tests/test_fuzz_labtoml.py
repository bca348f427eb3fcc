"""Issue 13 item 7: lab.toml, fuzzed (hypothesis) through the path `pixiebox check` takes.

lab.toml is edited by hand, on any laptop, by people who make every mistake once; SIGHUP and
`serve` read it the same way. The rule: any bytes give a config or a list of problems (each
with its line), never a traceback: `pixiebox check` exits 0 or 1 and prints sentences,
`check_config` returns, `load_config` raises ConfigError and nothing else. Inputs: the shipped
config/lab.toml with lines deleted, duplicated, cut, re-valued and re-encoded; TOML documents
built from the schema's own keys with values of every TOML type (nested past the depth limit
too); and plain text.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st
from pixiebox.cli.main import main
from pixiebox.config import ConfigError, LabConfig, check_config, format_problem, load_config
from pixiebox.config.load import MAX_PROBLEMS

SAMPLE = (Path(__file__).resolve().parent.parent / "config" / "lab.toml").read_text()
SAMPLE_LINES = SAMPLE.splitlines(keepends=True)
#: The keys of the shipped file, by section: what a person edits (and misspells).
KEYS = sorted(
    {line.split("=", 1)[0].strip() for line in SAMPLE_LINES if "=" in line and line[0] != "#"}
)
SECTIONS = sorted(
    {line.strip() for line in SAMPLE_LINES if line.startswith("[")}
    | {"[[machines]]", "[machines.power]", "[images.x]", "[power.wol]", "[[images]]", "[]"}
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory for the files, and an environment without PIXIEBOX_* overrides (they
    would take the place of what the file says)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("PIXIEBOX_"):
                patch.delenv(name)
        yield tmp_path_factory.mktemp("fuzz-labtoml")


# --------------------------------------------------------------------------- what is asserted


def check(directory: Path, data: bytes, *, load: bool = True) -> None:
    """check_config's invariants, load_config's one exception (`load`: it costs a parse, and
    is check_config's result filtered), and `pixiebox check` itself."""
    path = directory / "lab.toml"
    path.write_bytes(data)
    lines = data.count(b"\n") + 1
    config, problems = check_config(path)
    assert config is None or isinstance(config, LabConfig)
    assert len(problems) <= MAX_PROBLEMS + 1  # then one that counts the rest
    if config is None:
        assert any(p.severity == "error" for p in problems), "no config and no reason"
    for problem in problems:
        assert problem.line is None or 1 <= problem.line <= lines, (problem, lines)
        assert problem.message and "Traceback" not in problem.message
        format_problem(path, problem)
    if load:
        with contextlib.suppress(ConfigError):
            load_config(path)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", "--config", str(path)])
    assert code in (0, 1), err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert (code == 0) == ("OK" in out.getvalue())


# --------------------------------------------------------------------------- strategies

_scalars = st.one_of(
    st.sampled_from(
        [
            '"eth0"',
            '"192.168.1.64"',
            '"10m"',
            '"5s"',
            '"proxy"',
            '"full"',
            "true",
            "false",
            "0",
            "-1",
            "65536",
            "1e400",
            "inf",
            "nan",
            "-inf",
            "0x1F",
            "1_000",
            "9" * 30,
            '""',
            "''",
            '"\\u0000"',
            '"a\\u0000b"',
            '"\\uD800"',
            '"\\x41"',
            "1979-05-27T07:32:00Z",
            "07:32:00",
            "1979-05-27",
            '"""multi\nline"""',
            '"f4:4d:30:64:7a:3a"',
            '"01:00:5e:00:00:01"',
            '"192.168.1.200-192.168.1.250"',
            '"192.168.1.0/24"',
            '"::1"',
            '"300.1.1.1"',
            '"-5m"',
            '"1y"',
            '"http://x"',
        ]
    ),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.text(max_size=20).map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
        st.lists(st.tuples(st.sampled_from(KEYS), inner), max_size=3).map(
            lambda pairs: "{" + ", ".join(f"{k} = {v}" for k, v in pairs) + "}"
        ),
    ),
    max_leaves=8,
)
_deep = st.integers(30, 3000).map(lambda n: "[" * n + "1" + "]" * n)
_lines = st.one_of(
    st.tuples(st.sampled_from(KEYS), st.one_of(_values, _deep)).map(
        lambda kv: f"{kv[0]} = {kv[1]}"
    ),
    st.sampled_from(SECTIONS),
    st.sampled_from(["", "# comment", "x", "=", "a.b.c.d = 1", '"quoted key" = 1', "[a.b.c]"]),
    st.integers(30, 200).map(lambda n: ".".join(["k"] * n) + " = 1"),  # dotted keys nest too
    st.text(max_size=30),
)


@st.composite
def mutated_sample(draw: st.DrawFn) -> bytes:
    """The shipped lab.toml as a person (or a crashed editor) leaves it."""
    lines = list(SAMPLE_LINES)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["value", "value", "insert", "delete", "duplicate"]))
        if action == "value" and "=" in lines[at] and not lines[at].startswith("#"):
            key = lines[at].split("=", 1)[0]
            lines[at] = f"{key}= {draw(_values)}\n"
        elif action in ("insert", "value"):
            lines.insert(at, draw(_lines) + "\n")
        elif action == "delete":
            del lines[at : at + draw(st.integers(1, 20))]
        else:
            lines.insert(at, lines[at])
        if not lines:
            lines = [""]
    text = "".join(lines)
    if draw(st.integers(0, 4)) == 0:
        text = text[: draw(st.integers(0, len(text)))]  # a save cut short
    data = text.encode("utf-8", "surrogatepass")
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["bom", "crlf", "latin-1", "utf-16", "nul"]))
    if encoding == "bom":
        data = b"\xef\xbb\xbf" + data
    elif encoding == "crlf":
        data = data.replace(b"\n", b"\r\n")
    elif encoding == "latin-1":
        data = data.replace(b"homelab", b"h\xf6melab")
    elif encoding == "utf-16":
        data = text.encode("utf-16")
    elif encoding == "nul":
        data = data.replace(b"\n", b"\n\x00", 1)
    return data


@st.composite
def built(draw: st.DrawFn) -> bytes:
    """A document of the schema's sections and keys with values of any type."""
    body = [draw(_lines) for _ in range(draw(st.integers(0, 12)))]
    if draw(st.booleans()):
        body.insert(0, '[network]\ninterface = "eth0"')
    return "\n".join(body).encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- the tests


@fuzz(200)
@given(mutated_sample())
def test_any_edit_of_the_shipped_file_is_a_config_or_problems(workdir: Path, data: bytes) -> None:
    check(workdir, data)


@fuzz(200)
@given(st.one_of(built(), st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_any_document_is_a_config_or_problems(workdir: Path, data: bytes) -> None:
    check(workdir, data)


def test_every_cut_of_the_shipped_file(workdir: Path) -> None:
    """A save cut short at each line, and in the middle of a few."""
    data = SAMPLE.encode()
    cuts = {at + 1 for at, byte in enumerate(data) if byte == ord("\n")}
    cuts |= set(range(0, len(data), 401))
    for cut in sorted(cuts):
        check(workdir, data[:cut], load=False)
    check(workdir, data)  # and the whole file


#: Values that are wrong for (nearly) every key, each of another kind.
HOSTILE = ['"a\\u0000b"', '""', "1e400", "[[-1], {}]"]


def test_every_key_of_the_shipped_file_with_every_hostile_value(workdir: Path) -> None:
    """Each key's value replaced by each kind of wrong value, one at a time: a problem with the
    key's line (or a config, where the value happens to fit), never a traceback."""
    for at, line in enumerate(SAMPLE_LINES):
        if "=" not in line or line.startswith("#"):
            continue
        key = line.split("=", 1)[0]
        for value in HOSTILE:
            text = "".join([*SAMPLE_LINES[:at], f"{key}= {value}\n", *SAMPLE_LINES[at + 1 :]])
            check(workdir, text.encode(), load=False)
