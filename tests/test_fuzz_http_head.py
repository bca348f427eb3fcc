"""Issue 13 item 7: the bytes of an HTTP request, fuzzed (hypothesis) through the protocol the
agent serves boot HTTP with.

`server.PathsendProtocol` is uvicorn's httptools protocol plus the limits of http.connlimit,
which reads the request head itself: it counts the head's bytes against max_header_bytes
(431 past it), then hands them to llhttp; uvicorn turns the request line and headers into the
ASGI scope (percent-decoding, the query string) and the boot app answers. Here a protocol is
fed requests as hostile or broken clients send them (bad request lines, raw non-ASCII and
%-escapes in the path, folded, oversized and duplicate headers, bad Content-Length and
chunking, pipelined requests, every read boundary) over a fake transport, and must answer each
with a status below 500, or close, and never log a traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fuzzing import C1, JSON_BODIES, boot_lab, fuzz, log_records
from hypothesis import given
from hypothesis import strategies as st
from pixiebox.http.connlimit import HttpLimits, LimitedState
from pixiebox.http.server import PathsendProtocol

#: Small enough that the fuzzer reaches it; the default is 16 KiB.
MAX_HEADER_BYTES = 1024
STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")


@dataclass
class FakeTransport:
    """What a protocol sees of a TCP connection: the bytes it wrote, and whether it closed."""

    written: bytearray = field(default_factory=bytearray)
    closing: bool = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closing = True

    abort = close

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # "sslcontext": any value turns the pathsend extension off (a fake transport cannot
        # sendfile); files then go out as body chunks, through the same protocol.
        return {
            "peername": ("10.53.0.77", 40000),
            "sockname": ("10.53.0.2", 80),
            "sslcontext": object(),
        }.get(name, default)


@dataclass
class Server:
    config: uvicorn.Config
    runner: asyncio.Runner

    def serve(self, chunks: list[bytes]) -> tuple[bytes, bool]:
        """Feed one connection `chunks`, then hang up: (what it wrote, whether it closed)."""
        return self.runner.run(self._serve(chunks))

    async def _serve(self, chunks: list[bytes]) -> tuple[bytes, bool]:
        state = LimitedState(HttpLimits(max_header_bytes=MAX_HEADER_BYTES), "boot HTTP")
        loop = asyncio.get_running_loop()
        protocol = PathsendProtocol(
            config=self.config, server_state=state, app_state={}, _loop=loop
        )
        transport = FakeTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        for chunk in chunks:
            if transport.closing:
                break
            protocol.data_received(chunk)
            await self._settle(state)
        closed = transport.closing
        protocol.connection_lost(None)
        await self._settle(state)
        return bytes(transport.written), closed

    @staticmethod
    async def _settle(state: LimitedState) -> None:
        """Let the requests in flight answer, pipelined ones included (bounded)."""
        idle = 0
        for _ in range(100):
            if state.tasks:
                idle = 0
                pending = asyncio.gather(*list(state.tasks), return_exceptions=True)
                await asyncio.wait_for(pending, 10)
            else:
                idle += 1
                if idle > 3:
                    return
                await asyncio.sleep(0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with boot_lab(tmp_path_factory.mktemp("fuzz-head")) as app, asyncio.Runner() as runner:
        config = uvicorn.Config(
            app, http=PathsendProtocol, ws="none", lifespan="off", interface="asgi3",
            log_config=None, access_log=False, proxy_headers=False, server_header=False,
        )  # fmt: skip
        config.load()
        yield Server(config, runner)


# --------------------------------------------------------------------------- strategies

_targets = st.one_of(
    st.sampled_from(
        [
            b"/assets/osie/vmlinuz",
            b"/assets/osie/initrd",
            b"/assets/empty",
            f"/boot/{C1}.ipxe?arch=x86_64&platform=efi".encode(),
            b"/pxelinux.cfg/default",
            b"/ipxe/ipxe.efi",
            b"/ssh.keys",
            b"/metadata",
            b"/api/v1/phone-home",
            b"/assets/%2e%2e/secret",
            b"/assets/%ff%fe",
            b"/assets/\xff\xfe",
            b"/a%00b",
            b"/%",
            b"/%zz",
            b"*",
            b"http://x/assets/empty",
            b"//assets//empty",
            b"",
            b"/assets/" + b"a" * 2000,
            b"/boot/x.ipxe?" + b"&" * 500,
            b"/?a=%ff&b=\xff",
        ]
    ),
    st.sampled_from([b"/assets/osie/vmlinuz", f"/boot/{C1}.ipxe".encode(), b"/metadata"]),
    st.binary(max_size=30).map(lambda b: b"/" + b),
)
_headers = st.sampled_from(
    [
        b"Host: pixiebox", b"Range: bytes=0-9", b"Range: bytes=5-1,-3", b"If-None-Match: *",
        b"If-Modified-Since: Mon, 32 Foo 2026", b"Authorization: Bearer x",
        b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 99999999999999999999",
        b"Content-Length: 0", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
        b"Connection: close", b"Connection: keep-alive", b"Connection: upgrade",
        b"Upgrade: websocket", b"Expect: 100-continue", b"X-Folded: a\r\n b", b"NoColon",
        b"Bad Name: x", b": empty", b"X: \x00\x01\x7f\xff", b"X-Long: " + b"v" * 1500,
        b"Last-Event-ID: 3",
    ]
)  # fmt: skip


_good_targets = st.sampled_from(
    [
        b"/assets/osie/vmlinuz", b"/assets/empty", f"/boot/{C1}.ipxe?arch=arm64".encode(),
        b"/pxelinux.cfg/default", b"/ssh.keys", b"/metadata", b"/api/v1/phone-home",
        b"/assets/%2e%2e/secret", b"/assets/osie/../osie/initrd",
    ]
)  # fmt: skip
_good_headers = st.sampled_from(
    [
        b"Host: pixiebox", b"Range: bytes=0-9", b"Range: bytes=5-1,-3", b"If-None-Match: *",
        b"Authorization: Bearer x", b"Connection: close", b"Connection: keep-alive",
    ]
)  # fmt: skip


@st.composite
def request_bytes(draw: st.DrawFn, *, clean: bool = False) -> bytes:
    """One request; `clean`: well formed, as a firmware or curl sends it."""
    methods = [b"GET"] * 4 + [b"HEAD", b"POST", b"POST", b"PUT", b"OPTIONS", b"get", b"G\0T"]
    method = draw(st.sampled_from(methods[:6] if clean else methods))
    versions = [b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTX"]
    version = draw(st.sampled_from(versions[:5] if clean else versions))
    eol = b"\r\n" if clean else draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    target = draw(_good_targets if clean else _targets)
    lines = [method + b" " + target + b" " + version]
    junk = st.binary(max_size=20)
    headers = _good_headers if clean else st.one_of(_headers, _headers, _headers, junk)
    lines += draw(st.lists(headers, max_size=4))
    body = b""
    if method in (b"POST", b"PUT"):
        body = draw(JSON_BODIES)
        chunked = draw(st.booleans())
        if chunked:
            lines.append(b"Transfer-Encoding: chunked")
            wrong = 0 if clean else draw(st.sampled_from([0, 0, 3, -len(body)]))
            body = f"{len(body) + wrong:x}".encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
        else:
            wrong = 0 if clean else draw(st.sampled_from([0, 0, -1, 2]))
            lines.append(b"Content-Length: %d" % (len(body) + wrong))
    return eol.join(lines) + eol + eol + body


@st.composite
def connections(draw: st.DrawFn) -> list[bytes]:
    """One connection's bytes (1-3 pipelined requests, or noise) cut into reads."""
    requests = st.one_of(request_bytes(), request_bytes(clean=True))
    data = b"".join(draw(st.lists(requests, min_size=1, max_size=3)))
    if draw(st.integers(0, 5)) == 0:
        data = draw(st.binary(max_size=200))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


# --------------------------------------------------------------------------- the tests


def check(server: Server, chunks: list[bytes]) -> list[int]:
    with log_records("uvicorn") as uvicorn_log, log_records() as our_log:
        written, _ = server.serve(chunks)
    assert not uvicorn_log.with_traceback(), uvicorn_log.text()
    assert not our_log.with_traceback(), our_log.text()
    statuses = [int(code) for code in STATUS.findall(written)]
    assert all(100 <= code < 500 for code in statuses), (statuses, chunks)
    if written:
        assert written.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), written[:80]
    return statuses


@fuzz(300)
@given(connections())
def test_any_bytes_on_a_connection_get_answers_below_500(
    server: Server, chunks: list[bytes]
) -> None:
    check(server, chunks)


def test_a_head_over_the_limit_is_431_at_every_read_boundary(server: Server) -> None:
    head = b"GET /assets/empty HTTP/1.1\r\nX-Long: " + b"v" * MAX_HEADER_BYTES + b"\r\n\r\n"
    for cut in range(0, len(head), 37):
        assert check(server, [head[:cut], head[cut:]]) == [431]


def test_every_cut_of_a_request_is_answered_once_complete(server: Server) -> None:
    request = b"GET /assets/osie/vmlinuz HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n"
    for cut in range(len(request) + 1):
        assert check(server, [request[:cut], request[cut:]]) == [206]
        assert check(server, [request[:cut]]) == ([206] if cut == len(request) else [])
