"""The real-browser tooling works: Chromium in one namespace loads a live page from another.

A plain ``python3 -m http.server`` stands in for the agent: the page's script fetches a second URL
and writes it into the DOM, the test waits on that text (no sleep), takes a screenshot, and checks
from both ends that the browser sat in its own host and asked nothing of anyone else.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import netlab

if TYPE_CHECKING:  # imported at run time by pytest_plugins, which must come first
    from browser import Browser

#: Brings the ``browser_in`` fixture (an import of it would be shadowed by the test's argument).
pytest_plugins = ["browser"]

WEB_IP = "10.71.0.1"
LAPTOP_IP = "10.71.0.2"
OTHER_IP = "10.71.0.3"
PORT = 8000

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>smoke</title><link rel="icon" href="data:,">
</head><body><h1>Browser smoke test</h1><p id="status">waiting</p>
<script>
fetch("/data.txt").then(r => r.text()).then(t => {
  document.getElementById("status").textContent = "fetched: " + t.trim();
});
</script></body></html>
"""

#: A page that also loads an image from another host: what requests_outside exists to catch.
LEAKY_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>leaky</title><link rel="icon" href="data:,">
</head><body><p id="status">leaky</p><img src="http://{OTHER_IP}:{PORT}/pixel.png" alt="">
</body></html>
"""


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


def _serve(host: netlab.Host, ip: str, site: Path) -> Path:
    """``python3 -m http.server`` on ``ip`` in ``host``; returns its log (one line a request)."""
    log = host.log_path("http")
    proc = host.popen(
        [sys.executable, "-m", "http.server", "--bind", ip, "--directory", str(site), str(PORT)],
        log,
    )
    netlab.wait_until(
        lambda: "Serving HTTP" in _text(log) or proc.poll() is not None,
        10.0,
        message=f"http.server on {ip}",
    )
    assert proc.poll() is None, f"http.server exited: {_text(log)}"
    return log


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_a_page_in_one_namespace_updates_in_a_browser_in_another(
    segment: netlab.Segment, browser_in: Callable[[netlab.Host], Browser], tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(PAGE)
    (site / "leaky.html").write_text(LEAKY_PAGE)
    (site / "data.txt").write_text("hello from the web host\n")
    other_site = tmp_path / "other"
    other_site.mkdir()
    web = segment.add_host("web", ip=f"{WEB_IP}/24")
    other = segment.add_host("other", ip=f"{OTHER_IP}/24")
    laptop = segment.add_host("laptop", ip=f"{LAPTOP_IP}/24")
    web_log = _serve(web, WEB_IP, site)
    other_log = _serve(other, OTHER_IP, other_site)
    origin = f"http://{WEB_IP}:{PORT}"

    page = browser_in(laptop)
    page.open(f"{origin}/")
    assert page.wait_text("#status", "fetched:") == "fetched: hello from the web host"
    assert _png_size(page.screenshot("browser-smoke")) == (1280, 800)
    page.viewport(360, 800)
    assert _png_size(page.screenshot("browser-smoke-360")) == (360, 800)

    assert page.requests() == [f"{origin}/", f"{origin}/data.txt"]
    assert page.requests_outside(origin) == []
    # The server saw the script's fetch come from the laptop's namespace, not from the root one.
    netlab.wait_until(
        lambda: f"{LAPTOP_IP} - - " in _text(web_log) and "/data.txt" in _text(web_log),
        5.0,
        message="http.server logging the fetch from the laptop",
    )

    # The check can fail: a page that loads from another host is caught, URL by URL.
    page.open(f"{origin}/leaky.html")
    page.wait_for(
        lambda driver: driver.execute_script("return document.images[0].complete"),
        "the other host's image to finish loading (404)",
    )
    assert page.requests_outside(origin) == [f"http://{OTHER_IP}:{PORT}/pixel.png"]
    assert "/pixel.png" in _text(other_log)
