"""A real browser for tests: Debian's headless Chromium driven by Selenium, in a netlab host.

The agent serves its pages inside a network namespace, so the browser must sit in another
namespace of the same segment, as a person's laptop would. ChromeDriver runs in the root namespace
(the Selenium client talks to it on loopback there) and starts Chromium through a two-line wrapper,
``exec ip netns exec NS chromium "$@"``. ChromeDriver's usual link to Chromium is a DevTools TCP
port on 127.0.0.1, which a process in another namespace cannot reach, so the browser is started
with ``--remote-debugging-pipe``: DevTools then runs over inherited file descriptors 3 and 4, which
``ip netns exec`` and ``exec`` pass through unchanged. Only Chromium's sockets live in the host's
namespace: every request the page makes leaves through that host's ``eth0``.

Selenium Manager would download a driver (nothing outside the package registries is reachable):
the Service names /usr/bin/chromedriver, which makes Selenium skip it. Both come from Debian's
``chromium`` and ``chromium-driver`` (build.sh installs them), so their versions always match.

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

import contextlib
import json
import os
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import netlab
import pytest
from pixiebox.virtlab.procs import tail, tool
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

#: The real binary: /usr/bin/chromium is Debian's launcher script, which adds Google API keys,
#: extensions and GPU flags from /etc/chromium.d that a test wants none of.
CHROMIUM = Path("/usr/lib/chromium/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "out" / "screenshots"
#: Bounded waits: on a loaded 2-core CI machine a page update can take seconds, never a minute.
WAIT = 20.0
#: Pages at a laptop's size (the issue also asks for 360 px wide: ``viewport(360, 800)``).
WINDOW = (1280, 800)

#: Chromium's own traffic (component updates, safe browsing, sync, translate, field trials,
#: metrics, DNS prefetch of links) would be requests the page did not make; none of it may run.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # the tests run as root, where Chromium's sandbox refuses to start
    "--remote-debugging-pipe",  # see the module doc: no DevTools TCP port across namespaces
    "--disable-dev-shm-usage",  # a small /dev/shm (containers, CI) crashes renderers
    "--no-first-run",
    "--no-default-browser-check",
    "--no-proxy-server",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,"
    "NetworkPrediction,InterestFeedContentSuggestions,CertificateTransparencyComponentUpdater,"
    "AutofillServerCommunication,PrivacySandboxSettings4",
    "--password-store=basic",
    "--mute-audio",
    "--hide-scrollbars",
)

#: Schemes of URLs that never leave the browser; everything else counts as a request.
LOCAL_SCHEMES = frozenset({"data", "blob", "about"})

T = TypeVar("T")


def browser_problem() -> str | None:
    """Why no browser test can run here (None if one can)."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return (
                f"browser tests need {path} (apt-get install {package}, or sudo ./build.sh setup)"
            )
    return None


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (this browser's private profile path)."""
    pids = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


class Browser:
    """One headless Chromium in one netlab host, and what its pages requested."""

    def __init__(self, host: netlab.Host, workdir: Path) -> None:
        self.host = host
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.profile = workdir / "profile"
        self.driver_log = workdir / "chromedriver.log"
        self._requests: list[str] = []
        wrapper = workdir / "chromium-in-netns"
        wrapper.write_text(f'#!/bin/sh\nexec {tool("ip")} netns exec {host.name} {CHROMIUM} "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
        options = webdriver.ChromeOptions()
        options.binary_location = str(wrapper)
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        self._service = Service(executable_path=str(CHROMEDRIVER), log_output=str(self.driver_log))
        try:
            self.driver: webdriver.Chrome = webdriver.Chrome(service=self._service, options=options)
            self.driver.set_page_load_timeout(WAIT)
            self.viewport(*WINDOW)
            # Forget the start page's own loads (Chromium's new-tab page): only what the test's
            # pages request is recorded.
            self.driver.get("about:blank")
            self._drain()
            self._requests.clear()
        except BaseException:
            self.close()
            raise

    # -- pages -------------------------------------------------------------------------------

    def open(self, url: str) -> None:
        """Load ``url`` (returns once the document has loaded; scripts may still be working)."""
        self.driver.get(url)

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

    def text(self, css: str) -> str:
        """The visible text of the first element matching ``css`` ('' when there is none)."""
        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].text if found else ""

    def wait_text(self, css: str, expected: str, timeout: float = WAIT) -> str:
        """Wait until the element ``css`` shows text containing ``expected``; return that text."""

        def shown(driver: WebDriver) -> str | None:
            text = self.text(css)
            return text if expected in text else None

        return str(self.wait_for(shown, f"{css!r} showing {expected!r}", timeout))

    def viewport(self, width: int, height: int) -> None:
        """Make the page ``width`` x ``height`` CSS pixels, as a phone or laptop screen shows it.

        Headless Chromium's window size includes window decorations it never draws, so the
        page would be smaller than asked; DevTools' device metrics set the page's own size.
        """
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )

    def screenshot(self, name: str) -> Path:
        """Save the visible page to out/screenshots/NAME.png (look at it)."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        if not self.driver.save_screenshot(str(path)):
            pytest.fail(f"browser: screenshot {path} could not be written", pytrace=False)
        return path

    # -- what the page did -------------------------------------------------------------------

    def _drain(self) -> None:
        """Move the DevTools log's new request events into ``_requests`` (reading empties it)."""
        log: list[dict[str, Any]] = self.driver.get_log("performance")  # type: ignore[no-untyped-call]
        for entry in log:
            message = json.loads(entry["message"])["message"]
            params: dict[str, Any] = message.get("params", {})
            if message.get("method") == "Network.requestWillBeSent":
                self._requests.append(str(params["request"]["url"]))
            elif message.get("method") == "Network.webSocketCreated":
                self._requests.append(str(params["url"]))

    def requests(self) -> list[str]:
        """Every URL the test's pages requested so far, in order (redirects included)."""
        self._drain()
        return list(self._requests)

    def requests_outside(self, *origins: str) -> list[str]:
        """The requests that went anywhere but ``origins`` (``scheme://host:port``)."""
        allowed = {_origin(o) for o in origins}
        return [
            url
            for url in self.requests()
            if urlsplit(url).scheme not in LOCAL_SCHEMES and _origin(url) not in allowed
        ]

    def console(self) -> list[str]:
        """The page's console messages and JavaScript errors so far (reading empties the log)."""
        try:
            log: list[dict[str, Any]] = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
            return [str(entry.get("message", "")) for entry in log]
        except WebDriverException as exc:
            return [f"(console unavailable: {exc.msg})"]

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Quit the browser; kill whatever of it is left (by its private profile path)."""
        driver = getattr(self, "driver", None)
        try:
            if driver is not None:
                with contextlib.suppress(WebDriverException, OSError):
                    driver.quit()
        finally:
            self._service.stop()
            for pid in _pids_using(str(self.profile)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    default = {"http": 80, "ws": 80, "https": 443, "wss": 443}.get(parts.scheme)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or default}"


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
