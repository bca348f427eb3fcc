"""Shared fixtures: network-namespace lab (see netlab.py)."""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import CodeType, FrameType

import netlab
import pytest
import vmlab
from hypothesis import settings as hypothesis_settings

# Every property test draws the same examples on every run (CI's red must be reproducible, and a
# failure found once is found again), with no example database carried between runs and no
# per-example deadline on a loaded 2-core machine. HYPOTHESIS_PROFILE=explore draws anew.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, deadline=None)
hypothesis_settings.register_profile("explore", deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@functools.cache
def _netlab_problem(tools: tuple[str, ...] = ()) -> str | None:
    return netlab.prerequisite_problem(tools)


def _skip_or_fail(problem: str) -> None:
    """Skip locally; on CI a missing prerequisite is a failure."""
    if _on_ci():
        pytest.fail(f"CI=true but netlab prerequisite missing: {problem}", pytrace=False)
    pytest.skip(problem)


def _sigterm_to_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # Python programs the tests start (http.server, the agent) print lines the tests wait for;
    # block-buffered into a pipe those lines never come (sudo and CI do not pass this along).
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # Turn SIGTERM into KeyboardInterrupt so fixture finalizers (namespace teardown) run.
    in_main = threading.current_thread() is threading.main_thread()
    if in_main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)


# --------------------------------------------------------------------------- the netns marker
# `netns` marks the tests that need root: network namespaces (netlab), QEMU machines (vmlab),
# loop devices. `-m "not netns"` runs the rest as any user. The marker is put on automatically so
# that no new test can forget it: a test gets it when it uses one of conftest's namespace
# fixtures, or when it or a fixture of its test module uses netlab, vmlab or a loop disk, or skips
# after a root check (os.geteuid and pytest.skip), directly or through a helper function of the
# same module. A test that only branches on os.geteuid runs either way and is not marked.

TESTS = Path(__file__).resolve().parent
#: conftest fixtures that need root (its other fixtures, e.g. the leftover check, do not).
NETNS_FIXTURES = frozenset({"segment", "netlab_require", "testos"})
#: Global and attribute names whose use means "needs root".
_ROOT_NAMES = frozenset({"netlab", "vmlab", "LoopDisk"})
#: Names that, used together, are a root gate: `if os.geteuid() != 0: pytest.skip(...)`.
_ROOT_GATE = frozenset({"geteuid", "skip"})


def _code_names(code: CodeType) -> set[str]:
    """The global and attribute names `code` and the functions nested in it use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _code_names(const)
    return names


def _reaches_root(func: object, seen: set[object]) -> bool:
    code = getattr(func, "__code__", None)
    if not isinstance(code, CodeType) or func in seen:
        return False
    seen.add(func)
    names = _code_names(code)
    if names & _ROOT_NAMES or names >= _ROOT_GATE:
        return True
    module = getattr(func, "__module__", None)
    scope: dict[str, object] = getattr(func, "__globals__", {})
    return any(
        inspect.isfunction(helper) and helper.__module__ == module and _reaches_root(helper, seen)
        for helper in (scope.get(name) for name in names)
    )


def _in_test_module(func: object) -> bool:
    code = getattr(func, "__code__", None)
    if not isinstance(code, CodeType):
        return False
    path = Path(code.co_filename)
    return path.parent == TESTS and path.name.startswith("test_")


def needs_netns(item: pytest.Item) -> bool:
    """Whether `item` needs root (the rule above)."""
    names = set(getattr(item, "fixturenames", ()))
    if names & NETNS_FIXTURES:
        return True
    info = getattr(item, "_fixtureinfo", None)
    definitions = getattr(info, "name2fixturedefs", {})
    for name in names:
        for definition in definitions.get(name, ()):
            func = definition.func
            if _in_test_module(func) and _reaches_root(func, set()):
                return True
    function = getattr(item, "function", None)
    return function is not None and _reaches_root(function, set())


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if needs_netns(item):
            item.add_marker(pytest.mark.netns)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture(scope="session", autouse=True)
def _netlab_no_leftover_namespaces() -> Iterator[None]:
    """At the end of the session, fail loudly if this run left a namespace behind."""
    yield
    if shutil.which("ip") is None or os.geteuid() != 0:
        return
    leftovers = netlab.leftover_namespaces()
    if leftovers:
        errors = netlab.delete_namespaces(leftovers)
        pytest.fail(
            f"netlab: namespaces left behind by this run: {leftovers} "
            f"(deleted now; errors: {errors or 'none'})",
            pytrace=False,
        )


@pytest.fixture
def netlab_require() -> Callable[..., None]:
    """``netlab_require("dnsmasq", ...)``: skip (fail on CI) unless root, ip netns, tools."""

    def require(*tools: str) -> None:
        problem = _netlab_problem(tuple(tools))
        if problem:
            _skip_or_fail(problem)

    return require


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Per-test scratch directory for peers' state files (leases, configs, events)."""
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def segment(
    request: pytest.FixtureRequest, tmp_path: Path, netlab_require: Callable[..., None]
) -> Iterator[netlab.Segment]:
    """A fresh L2 segment; everything in it is torn down after the test."""
    netlab_require()
    seg = netlab.Segment(tmp_path / "netlab")
    try:
        yield seg
    finally:
        reports = request.node.stash.get(_REPORTS, {})
        if any(r.failed for r in reports.values()):
            print(f"netlab logs of {request.node.nodeid}:\n{seg.log_summary()}")
        seg.close()


REPO = Path(__file__).resolve().parent.parent
BUILD_TESTOS = REPO / "scripts" / "build-testos.sh"
TESTOS_DIR = REPO / "out" / "testos"


@pytest.fixture(scope="session")
def testos() -> tuple[Path, Path]:
    """(vmlinuz, initrd) of the test OS, built (or found up to date) in out/testos."""
    problem = vmlab.prerequisite_problem()
    if problem:
        _skip_or_fail(problem)
    _build_testos([], TESTOS_DIR)
    return TESTOS_DIR / "vmlinuz", TESTOS_DIR / "initrd"


def _build_testos(options: list[str], out: Path) -> None:
    """scripts/build-testos.sh OPTIONS OUT (cached by its stamp), or the test fails saying why."""
    what = " ".join([str(BUILD_TESTOS), *options])
    try:
        result = subprocess.run(
            ["bash", str(BUILD_TESTOS), *options, str(out)],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish in 900 s", pytrace=False)
    if result.returncode != 0:
        pytest.fail(f"{what} failed:\n{result.stderr.strip()}", pytrace=False)


APPLIANCE_RAW = REPO / "out" / "appliance" / "appliance.raw"
OSIE_DIR = REPO / "out" / "osie"


@pytest.fixture(scope="session")
def images() -> tuple[Path, Path]:
    """(appliance.raw, OSIE dir), built by `./build.sh appliance` (build.sh test runs it)."""
    missing = [
        p for p in (APPLIANCE_RAW, OSIE_DIR / "vmlinuz", OSIE_DIR / "initrd") if not p.exists()
    ]
    if missing:
        names = ", ".join(map(str, missing))
        message = f"images not built ({names}): run sudo ./build.sh appliance"
        if _on_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return APPLIANCE_RAW, OSIE_DIR


@pytest.fixture
def vms() -> Iterator[list[vmlab.VM]]:
    """VMs a test started (append them); every one is stopped at the end, also on failure."""
    started: list[vmlab.VM] = []
    try:
        yield started
    finally:
        for vm in started:
            vm.stop()
