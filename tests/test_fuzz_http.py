"""Issue 13 item 7: what boot HTTP reads from a request, fuzzed (hypothesis).

The app is driven in-process through ASGI, as uvicorn drives it (fuzzing.AsgiClient): Range
and If-Range (parsed by Starlette's FileResponse, which answers a bad one 400 or 416 itself),
If-None-Match and If-Modified-Since (`boot._not_modified`), asset paths (`net.paths`),
`?arch=`/`?platform=`, pxelinux names, the Authorization header and phone-home bodies. The
rule: every request gets an answer below 500; a 500 is Starlette's answer to an exception the
app let through, a bug. Where it holds, more: a 206 lies within the file and carries exactly
the bytes asked for. The API's parameters are in test_fuzz_api.py.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from fuzzing import (
    C1,
    FILES,
    JSON_BODIES,
    KERNEL,
    MTIME,
    Answer,
    AsgiClient,
    boot_lab,
    fuzz,
    latin1,
)
from hypothesis import given
from hypothesis import strategies as st


@dataclass
class Boot:
    app: Any
    client: AsgiClient

    def request(self, *args: Any, **kwargs: Any) -> Answer:
        return self.client.request(self.app, *args, **kwargs)


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    with boot_lab(tmp_path_factory.mktemp("fuzz-http")) as app, asyncio.Runner() as runner:
        yield Boot(app, AsgiClient(runner))


# --------------------------------------------------------------------------- Range and If-*

_offset = st.integers(0, len(KERNEL) + 2).map(str)
_position = st.one_of(
    _offset,
    _offset,
    _offset,
    st.sampled_from(["", " 5", "0x10", "-0", "9" * 30, "9" * 5000, "1e3", "\u0661", "+3"]),
)


@st.composite
def ranges(draw: st.DrawFn) -> str:
    """Range headers (RFC 9110 14.2) in the forms clients send, and broken ones."""
    unit = draw(st.sampled_from(["bytes", "bytes", "bytes", "BYTES", " bytes ", "items", ""]))
    specs = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3, 120]))):
        shape = draw(st.sampled_from(["a-b", "a-b", "a-b", "a-", "-b", "-", "a", ""]))
        start, end = draw(_position), draw(_position)
        numbers = all(part.isdigit() and len(part) < 9 for part in (start, end))
        if numbers and int(start) > int(end) and draw(st.booleans()):
            start, end = end, start  # mostly in order, as a client asks
        specs.append(shape.replace("a", start).replace("b", end))
    separator = draw(st.sampled_from(["=", "=", "=", "", "=="]))
    return f"{unit}{separator}{', '.join(specs)}" if draw(st.integers(0, 9)) else draw(st.text())


_dates = st.one_of(
    st.integers(0, 2**33).map(lambda t: email.utils.formatdate(t, usegmt=True)),
    st.sampled_from(
        [
            email.utils.formatdate(MTIME, usegmt=True),
            "Mon, 32 Foo 2026 99:99:99 GMT",
            "Tue, 01 Jan 10000 00:00:00 GMT",
            "Thu, 01 Jan 1970 00:00:00 +9999",
            "Fri, 31 Dec 9999 23:59:59 -2359",
            "0",
            "",
        ]
    ),
    st.text(max_size=30),
)
_etags = st.one_of(
    st.sampled_from(["*", "W/*", '"x"', 'W/"x", "y"', ",,", ""]), st.text(max_size=20)
)


@st.composite
def file_headers(draw: st.DrawFn) -> dict[str, str]:
    headers: dict[str, str] = {}
    if draw(st.integers(0, 4)):
        headers["range"] = draw(ranges())
    if draw(st.integers(0, 3)) == 0:
        headers["if-range"] = draw(st.one_of(_dates, _etags))
    if draw(st.integers(0, 3)) == 0:
        headers["if-none-match"] = draw(_etags)
    if draw(st.integers(0, 3)) == 0:
        headers["if-modified-since"] = draw(_dates)
    return {key: latin1(value) for key, value in headers.items()}


def content_range(value: str, size: int) -> tuple[int, int]:
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", value)
    assert match, value
    start, end, total = (int(g) for g in match.groups())
    assert 0 <= start <= end < size == total, value  # within the file
    return start, end


def check_file_answer(answer: Answer, method: str, content: bytes) -> set[int] | None:
    """What a file answer must be; the offsets of the file it sent (None: no bytes of it)."""
    size = len(content)
    assert answer.status in (200, 206, 304, 400, 416), answer
    if answer.status == 200:
        assert answer.body == (b"" if method == "HEAD" else content)
        assert int(answer.headers["content-length"]) == size
        return set(range(size))
    if answer.status == 304:
        assert answer.body == b""
    elif answer.status == 416:
        assert answer.headers["content-range"] == f"bytes */{size}"
    elif answer.status == 206 and answer.headers["content-type"].startswith("multipart/"):
        boundary = answer.headers["content-type"].split("boundary=", 1)[1]
        if method == "HEAD":
            return None
        assert int(answer.headers["content-length"]) == len(answer.body)
        parts = answer.body.split(f"--{boundary}".encode())
        assert parts[0] == b"" and parts[-1] == b"--"
        sent: set[int] = set()
        previous_end = -2
        for part in parts[1:-1]:
            head, _, data = part.partition(b"\r\n\r\n")
            line = next(h for h in head.decode().split("\r\n") if h.lower().startswith("content-r"))
            start, end = content_range(line.split(":", 1)[1].strip(), size)
            assert data == content[start : end + 1] + b"\r\n"
            assert start > previous_end + 1  # merged: no overlap, no adjacent parts
            previous_end = end
            sent |= set(range(start, end + 1))
        return sent
    elif answer.status == 206:
        start, end = content_range(answer.headers["content-range"], size)
        assert int(answer.headers["content-length"]) == end - start + 1
        assert answer.body == (b"" if method == "HEAD" else content[start : end + 1])
        return set(range(start, end + 1))
    return None


@fuzz(200)
@given(
    st.sampled_from(["GET", "GET", "HEAD"]),
    st.sampled_from(sorted(FILES)),
    file_headers(),
)
def test_range_and_conditional_headers_give_the_files_own_bytes(
    boot: Boot, method: str, name: str, headers: dict[str, str]
) -> None:
    answer = boot.request(method, f"/assets/{name}", headers=headers)
    check_file_answer(answer, method, FILES[name])


@st.composite
def satisfiable_ranges(draw: st.DrawFn) -> tuple[str, set[int]]:
    """A Range of 1-4 satisfiable byte ranges (RFC 9110 14.1.2) and the offsets it asks for."""
    size = len(KERNEL)
    specs: list[str] = []
    wanted: set[int] = set()
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["first-last", "first-", "-suffix"]))
        if kind == "first-last":
            first = draw(st.integers(0, size - 1))
            last = draw(st.integers(first, size + 5))
            specs.append(f"{first}-{last}")
            wanted |= set(range(first, min(last, size - 1) + 1))
        elif kind == "first-":
            first = draw(st.integers(0, size - 1))
            specs.append(f"{first}-")
            wanted |= set(range(first, size))
        else:
            suffix = draw(st.integers(1, size + 5))
            specs.append(f"-{suffix}")
            wanted |= set(range(max(size - suffix, 0), size))
    return "bytes=" + draw(st.sampled_from([",", ", ", " , "])).join(specs), wanted


@fuzz(120)
@given(satisfiable_ranges())
def test_satisfiable_ranges_get_exactly_the_bytes_asked_for(
    boot: Boot, built: tuple[str, set[int]]
) -> None:
    header, wanted = built
    answer = boot.request("GET", "/assets/osie/vmlinuz", headers={"range": header})
    assert answer.status == 206, (header, answer.status)
    assert check_file_answer(answer, "GET", KERNEL) == wanted, header


# --------------------------------------------------------------------------- other boot URLs

_path_words = st.sampled_from(
    [
        "osie",
        "vmlinuz",
        "..",
        ".",
        "",
        "%2e%2e",
        "ipxe",
        "ipxe.efi",
        "secret",
        "\x00",
        "~",
        "a" * 300,
    ]
)
_paths = st.one_of(
    st.lists(_path_words, max_size=6).map("/".join),
    st.text(max_size=40),
)
_macs = st.one_of(
    st.sampled_from([C1, C1.upper(), C1.replace(":", "-"), "020000001331", "ff:ff:ff:ff:ff:ff"]),
    st.text(max_size=24),
)
_query = st.one_of(
    st.lists(
        st.tuples(
            st.sampled_from(["arch", "platform", "mac", "after", "x", ""]),
            st.one_of(
                st.sampled_from(["x86_64", "arm64", "efi", "pcbios", "7", "99999", "\u00b2"]),
                st.text(max_size=12),
            ),
        ),
        max_size=3,
    ).map(lambda pairs: "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs)),
    st.text(max_size=30).map(lambda t: quote(t, safe="=&%")),
)


@st.composite
def boot_requests(draw: st.DrawFn) -> tuple[str, str, str, dict[str, str], bytes]:
    kind = draw(st.sampled_from(["asset", "script", "pxelinux", "ipxe", "metadata", "phone"]))
    query = draw(_query)
    headers: dict[str, str] = {}
    body = b""
    if kind == "asset":
        method, path = draw(st.sampled_from(["GET", "HEAD"])), f"/assets/{draw(_paths)}"
    elif kind == "script":
        method, path = "GET", f"/boot/{draw(_macs)}.ipxe"
    elif kind == "pxelinux":
        name = draw(st.one_of(st.just("default"), _macs.map(lambda m: f"01-{m}"), _paths))
        method, path = "GET", f"/pxelinux.cfg/{name}"
    elif kind == "ipxe":
        method, path = draw(st.sampled_from(["GET", "HEAD"])), f"/ipxe/{draw(_paths)}"
    elif kind == "metadata":
        method, path = "GET", "/metadata"
        scheme = draw(st.sampled_from(["Bearer ", "bearer  ", "Basic ", "", "Bearer"]))
        headers["authorization"] = latin1(scheme + draw(st.text(max_size=30)))
    else:
        method, path, body = "POST", "/api/v1/phone-home", draw(JSON_BODIES)
    return method, path, query, headers, body


@fuzz(400)
@given(boot_requests())
def test_every_boot_url_answers_below_500(
    boot: Boot, built: tuple[str, str, str, dict[str, str], bytes]
) -> None:
    method, path, query, headers, body = built
    answer = boot.request(method, path, query, headers, body)
    if path.startswith("/assets/") and answer.status in (200, 206):
        # Only files of the assets directory are ever sent.
        assert answer.body in (b"", *FILES.values()) or answer.body in KERNEL, path


def test_the_phone_home_body_nested_past_the_recursion_limit_is_a_400(boot: Boot) -> None:
    """Found by the fuzzer above: json.loads raises RecursionError, not ValueError, on
    deeply nested arrays (an unauthenticated POST from anyone on the LAN)."""
    answer = boot.request("POST", "/api/v1/phone-home", body=b"[" * 4000)
    assert answer.status == 400 and b"not JSON" in answer.body


def test_the_file_bytes_are_what_the_fixture_wrote(boot: Boot) -> None:
    """The check of a 206's body above cannot pass on a wrong file: whole-file GETs match."""
    for name, content in FILES.items():
        check_file_answer(boot.request("GET", f"/assets/{name}"), "GET", content)
    whole = boot.request("GET", "/assets/osie/vmlinuz", headers={"range": "bytes=0-"})
    assert whole.status == 206 and whole.body == KERNEL
