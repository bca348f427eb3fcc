"""Debian's headless Chromium driven by Selenium, inside a network namespace of the lab.

One copy for the browser tests (tests/browser.py adds pytest's fixture and failures on top) and
the dashboard benchmark (bench/dashboard.py, bench/dashboard_shot.py).

The agent serves its pages inside a network namespace, so the browser must sit in another
namespace of the same segment, as a person's laptop would. ChromeDriver runs in the root namespace
(the Selenium client talks to it on loopback there) and starts Chromium through a two-line wrapper,
``exec ip netns exec NS chromium "$@"``. ChromeDriver's usual link to Chromium is a DevTools TCP
port on 127.0.0.1, which a process in another namespace cannot reach, so the browser is started
with ``--remote-debugging-pipe``: DevTools then runs over inherited file descriptors 3 and 4, which
``ip netns exec`` and ``exec`` pass through unchanged. Only Chromium's sockets live in the
namespace: every request the page makes leaves through that namespace's interfaces. Without a
namespace (``None``) Chromium runs in the root one (the README's screenshot, taken through the
demo's loopback forwarder).

Selenium Manager would download a driver (nothing outside the package registries is reachable):
the Service names /usr/bin/chromedriver, which makes Selenium skip it. Both come from Debian's
``chromium`` and ``chromium-driver`` (build.sh installs them), so their versions always match.

Selenium is in the ``test`` extra only, not on the appliance: it is imported where a browser
starts, so importing this module never needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .procs import tool

if TYPE_CHECKING:
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.chrome.webdriver import WebDriver

#: The real binary: /usr/bin/chromium is Debian's launcher script, which adds Google API keys,
#: extensions and GPU flags from /etc/chromium.d that a test wants none of.
CHROMIUM = Path("/usr/lib/chromium/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
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


def problem() -> str | None:
    """Why no browser can start here (None if one can)."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"a browser needs {path} (apt-get install {package}, or sudo ./build.sh setup)"
    return None


def pids_using(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (a browser's private profile path)."""
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


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url``, the port spelled out even when it is the default."""
    parts = urlsplit(url)
    default = {"http": 80, "ws": 80, "https": 443, "wss": 443}.get(parts.scheme)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or default}"


class Chromium:
    """One headless Chromium in network namespace ``namespace`` (None: the root one).

    ``record_requests`` keeps DevTools' network log so that ``requests()`` can say what the
    pages asked for (the tests' "no request leaves the agent" check); the benchmark turns it off,
    since ChromeDriver buffering every request's events would be part of what it measures.
    """

    def __init__(
        self,
        namespace: str | None,
        workdir: Path,
        *,
        page_load_timeout: float = 20.0,
        record_requests: bool = True,
    ) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.profile = workdir / "profile"
        self.driver_log = workdir / "chromedriver.log"
        self._record = record_requests
        self._requests: list[str] = []
        binary = CHROMIUM
        if namespace is not None:
            binary = workdir / "chromium-in-netns"
            binary.write_text(
                f'#!/bin/sh\nexec {tool("ip")} netns exec {namespace} {CHROMIUM} "$@"\n'
            )
            binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
        options = webdriver.ChromeOptions()
        options.binary_location = str(binary)
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}"):
            options.add_argument(flag)
        if record_requests:
            options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        self._service: Service = Service(
            executable_path=str(CHROMEDRIVER), log_output=str(self.driver_log)
        )
        try:
            self.driver: WebDriver = webdriver.Chrome(service=self._service, options=options)
            self.driver.set_page_load_timeout(page_load_timeout)
            self.viewport(*WINDOW)
            if record_requests:
                # Forget the start page's own loads (Chromium's new-tab page): only what the
                # caller's pages request is recorded.
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

    def cdp(self, command: str, params: dict[str, Any] | None = None) -> Any:
        """A DevTools command's answer."""
        return self.driver.execute_cdp_cmd(command, params or {})

    def js(self, script: str, *args: Any) -> Any:
        """What ``script`` (a function body: ``return ...``) returns in the page."""
        return self.driver.execute_script(script, *args)

    def text(self, css: str) -> str:
        """The visible text of the first element matching ``css`` ('' when there is none)."""
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].text if found else ""

    def viewport(self, width: int, height: int) -> None:
        """Make the page ``width`` x ``height`` CSS pixels, as a phone or laptop screen shows it.

        Headless Chromium's window size includes window decorations it never draws, so the
        page would be smaller than asked; DevTools' device metrics set the page's own size.
        """
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )

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
        """Every URL the pages requested so far, in order (redirects included)."""
        if not self._record:
            raise RuntimeError("this browser was started with record_requests=False")
        self._drain()
        return list(self._requests)

    def requests_outside(self, *origins: str) -> list[str]:
        """The requests that went anywhere but ``origins`` (``scheme://host:port``)."""
        allowed = {origin(o) for o in origins}
        return [
            url
            for url in self.requests()
            if urlsplit(url).scheme not in LOCAL_SCHEMES and origin(url) not in allowed
        ]

    def console(self) -> list[str]:
        """The page's console messages and JavaScript errors so far (reading empties the log)."""
        from selenium.common.exceptions import WebDriverException

        try:
            log: list[dict[str, Any]] = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
            return [str(entry.get("message", "")) for entry in log]
        except WebDriverException as exc:
            return [f"(console unavailable: {exc.msg})"]

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Quit the browser; kill whatever of it is left (by its private profile path)."""
        from selenium.common.exceptions import WebDriverException

        driver = getattr(self, "driver", None)
        try:
            if driver is not None:
                with contextlib.suppress(WebDriverException, OSError):
                    driver.quit()
        finally:
            self._service.stop()
            for pid in pids_using(str(self.profile)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
