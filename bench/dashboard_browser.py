"""Debian's headless Chromium for the benchmark, driven by Selenium: tests/browser.py's method
(the same flags; ChromeDriver in the root namespace starting Chromium through an
``ip netns exec`` wrapper, DevTools over a pipe, since a DevTools TCP port would be in another
namespace), without pytest. ``namespace=None`` runs the browser in the root namespace (the
README's screenshot, taken through the demo's loopback forwarder).
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

from .lab import BenchError, tool

#: The real binary: /usr/bin/chromium is Debian's launcher script (extra flags from /etc).
CHROMIUM = Path("/usr/lib/chromium/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 800)

#: As tests/browser.py: no request that the page did not make (updates, sync, prefetch, ...).
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--remote-debugging-pipe",
    "--disable-dev-shm-usage",
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


def problem() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"no {path}: apt-get install {package} (sudo ./build.sh setup installs it)"
    return None


class Browser:
    """One headless Chromium, in network namespace `namespace` (or the root one)."""

    def __init__(self, namespace: str | None, workdir: Path) -> None:
        why = problem()
        if why:
            raise BenchError(why)
        workdir.mkdir(parents=True, exist_ok=True)
        self.profile = workdir / "profile"
        binary = CHROMIUM
        if namespace is not None:
            binary = workdir / "chromium-in-netns"
            binary.write_text(
                f'#!/bin/sh\nexec {tool("ip")} netns exec {namespace} {CHROMIUM} "$@"\n'
            )
            binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
        options = webdriver.ChromeOptions()
        options.binary_location = str(binary)
        for flag in (*FLAGS, f"--user-data-dir={self.profile}"):
            options.add_argument(flag)
        self._service = Service(
            executable_path=str(CHROMEDRIVER), log_output=str(workdir / "chromedriver.log")
        )
        try:
            self.driver = webdriver.Chrome(service=self._service, options=options)
            self.driver.set_page_load_timeout(60)
            self.cdp(
                "Emulation.setDeviceMetricsOverride",
                {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
            )
        except BaseException:
            self.close()
            raise

    def cdp(self, command: str, params: dict[str, Any] | None = None) -> Any:
        return self.driver.execute_cdp_cmd(command, params or {})

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def open(self, url: str) -> None:
        self.driver.get(url)

    def close(self) -> None:
        driver = getattr(self, "driver", None)
        try:
            if driver is not None:
                with contextlib.suppress(WebDriverException, OSError):
                    driver.quit()
        finally:
            self._service.stop()
            marker = str(self.profile).encode()
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == os.getpid():
                    continue
                with contextlib.suppress(OSError):
                    if marker in (entry / "cmdline").read_bytes():
                        os.kill(int(entry.name), signal.SIGKILL)
