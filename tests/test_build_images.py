"""`build.sh osie|appliance`: what the image build says when upstream binaries are missing.

k3s and Telegraf come from their projects' release pages (image/upstream.txt), which a build
machine may not reach. The build must then say so in one line and go on without them, or fail
with that line under --require-upstream, and never use a download whose sha256 is wrong. The
list is pointed (PIXIEBOX_UPSTREAM_FILE) at servers in this test: a closed port on loopback, and
a small HTTP server serving a file whose pinned sha256 does not match.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OSIE_INITRD = REPO / "out" / "osie" / "osie.cpio.zst"


def build(args: list[str], upstream: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIXIEBOX_UPSTREAM_FILE": str(upstream)}
    return subprocess.run(
        ["./build.sh", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )


@pytest.fixture
def built_osie() -> None:
    if not OSIE_INITRD.exists():
        message = "the OSIE is not built: run sudo ./build.sh osie (build.sh test does)"
        if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    if os.geteuid() != 0:
        pytest.skip("build.sh builds images as root")


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """http://127.0.0.1:PORT/ serving one small 'binary' (loopback only)."""
    root = tmp_path / "www"
    root.mkdir()
    payload = b"#!/bin/sh\necho not really k3s\n"
    (root / "k3s").write_bytes(payload)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", payload
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def upstream_list(tmp_path: Path, k3s_url: str, k3s_sha: str = "-") -> Path:
    path = tmp_path / "upstream.txt"
    path.write_text(
        "# test list\n"
        f"k3s       v9.9.9+test  {k3s_url}  {k3s_sha}  {k3s_url}.sha256\n"
        "telegraf  9.9.9  http://127.0.0.1:9/telegraf.tar.gz  -  http://127.0.0.1:9/x.sha256\n"
    )
    return path


def test_unreachable_upstream_is_one_line_and_the_osie_is_built_without_it(
    built_osie: None, tmp_path: Path
) -> None:
    result = build(["osie"], upstream_list(tmp_path, "http://127.0.0.1:9/k3s"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "not included" in line]
    # One line per binary: what, where, curl's reason, and that the build goes on.
    assert len(lines) == 2, result.stderr[-3000:]
    assert re.fullmatch(
        r"build\.sh: k3s v9\.9\.9\+test not included: http://127\.0\.0\.1:9/k3s is unreachable "
        r"\(Failed to connect to 127\.0\.0\.1 port 9 .*\); the image is built without it\.",
        lines[0],
    ), lines[0]
    assert lines[1].startswith("build.sh: telegraf 9.9.9 not included: "), lines[1]
    assert "without k3s, without Telegraf" in result.stderr


def test_require_upstream_makes_an_unreachable_binary_an_error(
    built_osie: None, tmp_path: Path
) -> None:
    upstream = upstream_list(tmp_path, "http://127.0.0.1:9/k3s")
    result = build(["osie", "--require-upstream"], upstream)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("build.sh: error: k3s v9.9.9+test: cannot download "), last
    assert "http://127.0.0.1:9/k3s (Failed to connect" in last
    assert last.endswith("and --require-upstream is set")


def test_a_download_with_the_wrong_sha256_is_never_used(
    built_osie: None, tmp_path: Path, file_server: tuple[str, bytes]
) -> None:
    url, payload = file_server
    wrong = hashlib.sha256(payload + b"tampered").hexdigest()
    result = build(["osie"], upstream_list(tmp_path, f"{url}/k3s", wrong))
    assert result.returncode == 1
    assert f"k3s v9.9.9+test: sha256 mismatch for {url}/k3s (expected {wrong}): not used" in (
        result.stderr
    )
    assert not (REPO / "out" / "osie-input" / "tree" / "usr" / "local" / "bin" / "k3s").exists()
