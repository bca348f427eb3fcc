"""A real browser for tests: the pytest layer over pixiebox.virtlab.chromium.

pixiebox.virtlab.chromium starts Debian's headless Chromium through ChromeDriver inside a network
namespace (the wrapper, the flags, DevTools over a pipe, the request log: read its module doc);
the dashboard benchmark uses the same class. This module adds what only tests want: a browser in
a netlab host, waits and screenshots that fail the test, and the ``browser_in`` fixture that skips
(or, on CI, fails) when Chromium is not installed.

Use in a test module::

    pytest_plugins = ["browser"]  # the browser_in fixture; `import browser` only after it

    def test_page(segment, browser_in):
        page = browser_in(segment.add_host("laptop", ip="10.0.0.9/24"))
        page.open("http://10.0.0.1:8080/")
        page.wait_text("#status", "up")
        page.screenshot("status")
        assert page.requests_outside("http://10.0.0.1:8080") == []
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import netlab
import pytest
from pixiebox.virtlab.chromium import Chromium
from pixiebox.virtlab.chromium import problem as browser_problem
from pixiebox.virtlab.procs import tail
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "out" / "screenshots"
#: Bounded waits: on a loaded 2-core CI machine a page update can take seconds, never a minute.
WAIT = 20.0

T = TypeVar("T")


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


class Browser(Chromium):
    """One headless Chromium in one netlab host, and what its pages requested."""

    def __init__(self, host: netlab.Host, workdir: Path) -> None:
        self.host = host
        super().__init__(host.name, workdir, page_load_timeout=WAIT)

    def wait_for(
        self, condition: Callable[[WebDriver], T], message: str, timeout: float = WAIT
    ) -> T:
        """The first truthy value of ``condition(driver)``, polled until ``timeout``; else fail."""
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(condition)
        except TimeoutException:
            pytest.fail(
                f"browser: {message} did not happen within {timeout:g} s "
                f"(page {self.driver.current_url}; console: {self.console()[-5:]})",
                pytrace=False,
            )

    def wait_text(self, css: str, expected: str, timeout: float = WAIT) -> str:
        """Wait until the element ``css`` shows text containing ``expected``; return that text."""

        def shown(driver: WebDriver) -> str | None:
            text = self.text(css)
            return text if expected in text else None

        return str(self.wait_for(shown, f"{css!r} showing {expected!r}", timeout))

    def screenshot(self, name: str) -> Path:
        """Save the visible page to out/screenshots/NAME.png (look at it)."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        if not self.driver.save_screenshot(str(path)):
            pytest.fail(f"browser: screenshot {path} could not be written", pytrace=False)
        return path


@pytest.fixture
def browser_in(
    segment: netlab.Segment, tmp_path: Path
) -> Iterator[Callable[[netlab.Host], Browser]]:
    """``browser_in(host)``: a headless Chromium in that netlab host, quit after the test.

    Skips when Chromium is not installed; on CI (CI=true) that is a failure, as for netlab's
    prerequisites. It depends on ``segment`` so that browsers quit before the namespaces go.
    """
    problem = browser_problem()
    if problem:
        if _on_ci():
            pytest.fail(
                f"CI=true but a browser test prerequisite is missing: {problem}", pytrace=False
            )
        pytest.skip(problem)
    browsers: list[Browser] = []

    def start(host: netlab.Host) -> Browser:
        browser = Browser(host, tmp_path / f"browser{len(browsers) + 1}-{host.role}")
        browsers.append(browser)
        return browser

    try:
        yield start
    finally:
        for browser in reversed(browsers):
            browser.close()
            print(f"chromedriver log tail ({browser.host.role}):\n{tail(browser.driver_log)}")
