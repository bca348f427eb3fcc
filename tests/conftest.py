"""Shared fixtures: network-namespace lab (see netlab.py)."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import FrameType

import netlab
import pytest
import vmlab

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
    # Turn SIGTERM into KeyboardInterrupt so fixture finalizers (namespace teardown) run.
    in_main = threading.current_thread() is threading.main_thread()
    if in_main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)


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
    try:
        result = subprocess.run(
            ["bash", str(BUILD_TESTOS), str(TESTOS_DIR)],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{BUILD_TESTOS} did not finish in 900 s", pytrace=False)
    if result.returncode != 0:
        pytest.fail(f"{BUILD_TESTOS} failed:\n{result.stderr.strip()}", pytrace=False)
    return TESTOS_DIR / "vmlinuz", TESTOS_DIR / "initrd"
