"""The README's screenshot: the dashboard at a laptop's size, from this machine's browser.

    sudo ./build.sh demo --os out/testos --machines 4 --keep      # in one terminal
    sudo .venv/bin/python -m bench.dashboard_shot http://127.0.0.1:8080/ docs/dashboard.png

Opens the URL in headless Chromium (the root namespace: the demo's forwarder is on loopback),
waits until the machine list shows at least --rows rows and the page says it is live, and
saves the visible 1280x800 page as a PNG.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .dashboard import start_browser
from .lab import BenchError

READY = """return document.querySelectorAll("#rows tr[data-mac]").length >= arguments[0]
  && document.querySelector("#live")?.dataset.state === "live";"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=1, help="wait for this many machine rows")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds for late updates")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pixiebox-shot-") as workdir:
        try:
            browser = start_browser(None, Path(workdir))
        except BenchError as exc:
            print(f"dashboard_shot: {exc}", file=sys.stderr)
            return 1
        try:
            browser.open(args.url)
            deadline = time.monotonic() + 60
            while not browser.js(READY, args.rows):
                if time.monotonic() > deadline:
                    print(f"dashboard_shot: fewer than {args.rows} rows", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            time.sleep(args.settle)
            if not browser.driver.save_screenshot(args.out):
                print(f"dashboard_shot: cannot write {args.out}", file=sys.stderr)
                return 1
        finally:
            browser.close()
    print(f"{args.out}: {Path(args.out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
