"""The DNS server: the codec paths in process, then real peers in network namespaces.

Unit tests feed `DnsServer.answer` queries packed by dnslib and garbage: the fast path (answers
packed in advance) must give what the dnslib path gives, and nothing a packet holds may raise.
The integration tests run the server in its own namespace (tests/dns_serve.py), `dig` in a
client namespace, and dnsmasq as the upstream resolver in a third (local answers only: no
traffic leaves the segment). A routed client (a second subnet behind a router namespace) shows
the open-resolver rule: lab names for anyone who reaches the server, forwarding only for the
lab subnet. The senders at the bottom of this file (``python tests/test_dns.py
fuzz|flood ...``) run inside a client namespace.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import netlab
import pytest
from dnslib import EDNS0, QTYPE, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pixiebox.config import LabConfig
from pixiebox.dns import DnsServer
from pixiebox.dns import forward as dns_forward
from pixiebox.dns import zone as dns_zone

TESTS_DIR = Path(__file__).resolve().parent
DNS_SERVE = TESTS_DIR / "dns_serve.py"
THIS = Path(__file__).resolve()

DOMAIN = "lab.internal"
LAB_NET = "10.53.0.0/24"
DNS_IP = "10.53.0.2"
UPSTREAM_IP = "10.53.0.3"
CLIENT_IP = "10.53.0.10"
ATTACKER_IP = "10.53.0.66"
SILENT_IP = "10.53.0.99"  # on the segment, but nobody has it: queries to it vanish
C1_IP = "10.53.0.31"
ROUTER_IP = "10.53.0.254"
REMOTE_NET = "10.54.0.0/24"  # behind the router: off the lab segment
REMOTE_IP = "10.54.0.5"  # Segment.add_routed_host's host address in it
PRINTER_IP = "10.53.0.77"  # no machine's: the upstream has its PTR
RECORDS = {"c1": C1_IP, "pixiebox": DNS_IP}
BIG_ANSWERS = 100  # A records of big.example.test: ~1.7 KB, more than 512 bytes
#: A log line at warning level or above (dns_serve.py's format: time level logger: message).
LOUD = re.compile(r"^\S+ \S+ (?:WARNING|ERROR|CRITICAL) ", re.MULTILINE)

# --------------------------------------------------------------------------- in process


def server(
    records: Mapping[str, str] = RECORDS, forward_for: Sequence[str] = (LAB_NET,)
) -> DnsServer:
    table = {name: IPv4Address(ip) for name, ip in records.items()}
    networks = [IPv4Network(n) for n in forward_for]
    return DnsServer(
        domain=DOMAIN,
        records=lambda: table,
        upstreams=[IPv4Address(UPSTREAM_IP)],
        forward_for=lambda: networks,
    )


def query(name: str, qtype: str = "A", *, edns: bool = True, do: bool = False) -> bytes:
    # An explicit ID: dnslib would draw one from `random`, which hypothesis frowns upon.
    request = DNSRecord(DNSHeader(id=0x4242), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns:
        request.add_ar(EDNS0(udp_len=4096, flags="do" if do else ""))
    return bytes(request.pack())


def local(dns: DnsServer, data: bytes, source: tuple[str, int] = (CLIENT_IP, 5353)) -> DNSRecord:
    reply = dns.answer(data, source)
    assert isinstance(reply, bytes), f"not answered locally: {reply!r}"
    return DNSRecord.parse(reply)


FAST_CASES = [
    ("c1.lab.internal", "A"),
    ("c1.lab.internal", "ANY"),
    ("c1.lab.internal", "AAAA"),
    ("c1.lab.internal", "MX"),
    ("pixiebox.lab.internal", "A"),
    ("31.0.53.10.in-addr.arpa", "PTR"),
    ("31.0.53.10.in-addr.arpa", "TXT"),
    ("lab.internal", "SOA"),
    ("lab.internal", "NS"),
]


@pytest.mark.parametrize(("name", "qtype"), FAST_CASES)
@pytest.mark.parametrize("edns", [False, True])
def test_fast_path_answers_as_the_dnslib_path_does(name: str, qtype: str, edns: bool) -> None:
    dns = server()
    data = query(name, qtype, edns=edns, do=edns)
    fast = dns._fast(data)
    assert fast is not None, "a lab name should take the fast path"
    assert fast == dns._slow(data, ("10.53.0.10", 5353), False)


def test_a_record_is_authoritative_and_keeps_the_id_rd_cd_and_the_question_case() -> None:
    dns = server()
    request = DNSRecord.question("C1.Lab.INTERNAL")
    request.header.id = 0xBEEF
    request.header.cd = 1
    data = bytes(request.pack())
    reply = local(dns, data)
    assert reply.header.id == 0xBEEF
    assert (reply.header.qr, reply.header.aa, reply.header.rd, reply.header.ra) == (1, 1, 1, 1)
    assert reply.header.cd == 1
    assert str(reply.q.qname) == "C1.Lab.INTERNAL."
    assert [(str(rr.rdata), rr.ttl) for rr in reply.rr] == [(C1_IP, 60)]
    assert reply.ar == []  # no OPT in the query, none in the answer (RFC 6891 section 7)


def test_edns_is_answered_with_our_size_and_the_do_bit() -> None:
    reply = local(server(), query("c1.lab.internal", do=True))
    (opt,) = reply.ar
    assert (opt.rtype, opt.rclass, opt.ttl) == (41, 1232, 0x8000)


def test_unknown_name_is_nxdomain_with_the_soa_and_unknown_type_is_nodata() -> None:
    dns = server()
    nx = local(dns, query("nosuch.lab.internal"))
    assert (nx.header.rcode, nx.header.aa, nx.rr) == (3, 1, [])
    (soa,) = nx.auth
    assert str(soa.rname) == "lab.internal." and soa.rtype == 6
    nodata = local(dns, query("c1.lab.internal", "AAAA"))
    assert (nodata.header.rcode, nodata.rr, [str(rr.rname) for rr in nodata.auth]) == (
        0,
        [],
        ["lab.internal."],
    )
    deeper = local(dns, query("x.c1.lab.internal"))
    assert deeper.header.rcode == 3


def test_nxdomain_is_packed_after_the_first_query_within_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dns_zone, "NEGATIVE_CACHE", 2)
    dns = server()
    data = query("nosuch.lab.internal", "MX", do=True)
    assert dns._fast(data) is None
    first = local(dns, data)
    assert dns._fast(data) == dns._slow(data, ("10.53.0.10", 5353), False)
    assert local(dns, data) == first
    other_type = query("NoSuch.lab.internal", "TXT", edns=False)
    assert DNSRecord.parse(dns._fast(other_type)).header.rcode == 3
    for i in range(5):
        local(dns, query(f"n{i}.lab.internal"))
    assert dns._fast(query("n0.lab.internal")) is not None
    assert dns._fast(query("n1.lab.internal")) is None  # the bound was reached
    assert local(dns, query("n4.lab.internal")).header.rcode == 3


def test_names_with_dots_make_empty_non_terminals() -> None:
    dns = server({"n1.rack2": "10.53.0.41"})
    assert [str(rr.rdata) for rr in local(dns, query("N1.rack2.lab.internal")).rr] == ["10.53.0.41"]
    ent = local(dns, query("rack2.lab.internal"))
    assert (ent.header.rcode, ent.rr) == (0, [])  # RFC 8020: it exists, with nothing of its own


def test_other_names_and_unknown_reverse_names_are_forwarded() -> None:
    dns = server()
    for name, qtype in (("example.test", "A"), ("99.0.53.10.in-addr.arpa", "PTR")):
        job = dns.answer(query(name, qtype), ("10.53.0.10", 5353))
        assert not isinstance(job, bytes) and job is not None
        assert job.udp_size == 4096


def test_only_lab_clients_have_other_names_forwarded() -> None:
    dns = server()
    outside = (REMOTE_IP, 5353)
    # The lab's names, their PTRs and NXDOMAIN under the domain: answered to anyone.
    assert [str(rr.rdata) for rr in local(dns, query("c1.lab.internal"), outside).rr] == [C1_IP]
    ptr = local(dns, query("31.0.53.10.in-addr.arpa", "PTR", edns=False), outside)
    assert [str(rr.rdata) for rr in ptr.rr] == ["c1.lab.internal."]
    assert local(dns, query("nosuch.lab.internal", "TXT"), outside).header.rcode == 3
    # Anything that would be forwarded: REFUSED, no larger than the query (no amplification).
    for name, qtype, tcp in (
        ("example.test", "A", False),
        ("99.0.53.10.in-addr.arpa", "PTR", False),
        ("example.test", "ANY", True),
    ):
        data = query(name, qtype)
        reply = dns.answer(data, outside, tcp=tcp)
        assert isinstance(reply, bytes), reply
        refused = DNSRecord.parse(reply)
        assert (refused.header.rcode, refused.header.aa, refused.rr) == (5, 0, [])
        assert str(refused.q.qname) == f"{name}." and len(reply) <= len(data)
    assert dns.stats["refused"] == 3
    # The lab subnet still has them forwarded; a source that is no address has nothing.
    assert not isinstance(dns.answer(query("example.test"), (CLIENT_IP, 5353)), bytes)
    assert local(dns, query("example.test"), ("?", 0)).header.rcode == 5
    # An explicit list (lab.toml [dns] forward_for) replaces the lab subnet; empty: nobody.
    vpn = server(forward_for=[REMOTE_NET])
    assert not isinstance(vpn.answer(query("example.test"), outside), bytes)
    assert local(vpn, query("example.test")).header.rcode == 5
    assert local(server(forward_for=[]), query("example.test")).header.rcode == 5


def test_the_allow_list_is_read_again_when_it_changes() -> None:
    networks = [IPv4Network(LAB_NET)]
    table = {"c1": IPv4Address(C1_IP)}
    dns = DnsServer(
        domain=DOMAIN, records=lambda: table, upstreams=[], forward_for=lambda: networks
    )
    assert local(dns, query("example.test"), (REMOTE_IP, 53)).header.rcode == 5
    networks.append(IPv4Network(REMOTE_NET))  # a reloaded lab.toml
    assert not isinstance(dns.answer(query("example.test"), (REMOTE_IP, 53)), bytes)
    networks.clear()
    assert local(dns, query("example.test")).header.rcode == 5


def test_refusals_are_logged_once_per_source_a_minute_in_a_bounded_table(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dns_forward, "REFUSAL_LOG_SOURCES", 3)
    caplog.set_level(logging.WARNING, "pixiebox.dns")
    dns = server()
    now = [1000.0]
    dns.forward_for.clock = lambda: now[0]

    def lines(words: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if words in r.getMessage()]

    for _ in range(50):
        dns.answer(query("example.test"), (REMOTE_IP, 4000))
    (line,) = lines("refused to forward")
    assert "example.test" in line and REMOTE_IP in line and "[dns] forward_for" in line
    assert LAB_NET in line  # who may: the list as it stands
    now[0] += 30
    dns.answer(query("example.test"), (REMOTE_IP, 4000))
    assert len(lines("refused to forward")) == 1  # still within the minute
    now[0] += 31
    dns.answer(query("example.test"), (REMOTE_IP, 4000))
    assert len(lines("refused to forward")) == 2
    # A flood from many (spoofed) sources: two more fill the table of 3, the rest are counted
    # and summed up in one line a minute, and the table does not grow.
    for i in range(200):
        dns.answer(query("example.test"), (f"10.55.{i // 250}.{i % 250}", 4000))
    assert len(lines("refused to forward")) == 4
    assert len(lines("refusing to forward names for more than 3 sources")) == 1
    assert len(dns.forward_for._logged) == 3
    now[0] += 61  # the old lines expire: new sources are logged again
    dns.answer(query("example.test"), ("10.56.0.1", 4000))
    assert len(lines("refused to forward")) == 5
    assert dns.stats["refused"] == 50 + 2 + 200 + 1


def test_dns_forward_for_in_lab_toml() -> None:
    assert LabConfig().dns.forward_for == []  # the agent reads it as the lab subnet
    config = LabConfig.model_validate({"dns": {"forward_for": [LAB_NET, REMOTE_NET]}})
    assert config.dns.forward_for == [IPv4Network(LAB_NET), IPv4Network(REMOTE_NET)]
    with pytest.raises(ValueError, match="not a valid IPv4 network"):  # host bits set
        LabConfig.model_validate({"dns": {"forward_for": ["10.54.0.5/24"]}})


def test_records_are_reread_when_they_change_in_place() -> None:
    table = {"c1": IPv4Address(C1_IP)}
    dns = DnsServer(domain=DOMAIN, records=lambda: table, upstreams=[], forward_for=list)
    assert [str(rr.rdata) for rr in local(dns, query("c1.lab.internal")).rr] == [C1_IP]
    serial = local(dns, query("lab.internal", "SOA")).rr[0].rdata.times[0]
    table["c1"] = IPv4Address("10.53.0.32")
    table["c2"] = IPv4Address(C1_IP)
    assert [str(rr.rdata) for rr in local(dns, query("c1.lab.internal")).rr] == ["10.53.0.32"]
    ptr = local(dns, query("31.0.53.10.in-addr.arpa", "PTR"))
    assert [str(rr.rdata) for rr in ptr.rr] == ["c2.lab.internal."]
    assert local(dns, query("lab.internal", "SOA")).rr[0].rdata.times[0] > serial


def test_an_equal_view_of_the_records_does_not_rebuild_the_answers() -> None:
    calls = 0

    def records() -> dict[str, IPv4Address]:
        nonlocal calls
        calls += 1  # a new dict and new address objects on every call, same contents
        return {"c1": IPv4Address(C1_IP)}

    dns = DnsServer(domain=DOMAIN, records=records, upstreams=[], forward_for=list)
    zone = dns._current()
    for _ in range(5):
        assert local(dns, query("c1.lab.internal")).rr
    assert dns._current() is zone and calls == 7


def test_names_over_255_octets_are_malformed_not_a_failure() -> None:
    dns = server()
    long_name = b"".join(b"\x3c" + b"a" * 60 for _ in range(5))
    for suffix in (b"\x03lab\x08internal\x00", b"\x00"):
        data = struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0) + long_name + suffix + b"\x00\x01\x00\x01"
        assert dns.answer(data, ("10.53.0.66", 4444)) is None
    assert (dns.stats["malformed"], dns.stats["failed"]) == (2, 0)


def test_invalid_machine_names_are_skipped_not_fatal() -> None:
    dns = server({"ok": "10.53.0.50", "x" * 64: "10.53.0.51", "bad..name": "10.53.0.52"})
    assert local(dns, query("ok.lab.internal")).rr
    assert local(dns, query(f"{'x' * 63}.lab.internal")).header.rcode == 3


def test_odd_requests_get_the_rcodes_the_rfcs_name() -> None:
    dns = server()
    source = ("10.53.0.10", 5353)
    two = DNSRecord(q=DNSQuestion("c1.lab.internal"))
    two.add_question(DNSQuestion("pixiebox.lab.internal"))
    assert DNSRecord.parse(dns.answer(bytes(two.pack()), source)).header.rcode == 1  # FORMERR
    notify = DNSRecord.question("lab.internal")
    notify.header.opcode = 4
    assert DNSRecord.parse(dns.answer(bytes(notify.pack()), source)).header.rcode == 4  # NOTIMP
    badvers = DNSRecord.question("c1.lab.internal")
    badvers.add_ar(EDNS0(udp_len=1232, version=1))
    reply = DNSRecord.parse(dns.answer(bytes(badvers.pack()), source))
    assert (reply.header.rcode, reply.ar[0].ttl >> 24) == (0, 1)  # BADVERS: extended RCODE 16
    response = DNSRecord.question("c1.lab.internal").reply()
    assert dns.answer(bytes(response.pack()), source) is None
    chaos = DNSRecord.question("c1.lab.internal", "TXT", "CH")
    assert DNSRecord.parse(dns.answer(bytes(chaos.pack()), source)).header.rcode == 5
    assert dns.stats["ignored"] == 1
    assert (dns.stats["formerr"], dns.stats["notimp"], dns.stats["badvers"]) == (1, 1, 1)


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    base = bytearray(query(draw(st.sampled_from([n for n, _ in FAST_CASES] + ["x.example"]))))
    for _ in range(draw(st.integers(0, 6))):
        base[draw(st.integers(0, len(base) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(base)))
    return bytes(base[:cut]) + draw(st.binary(max_size=40))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=600), mangled()))
def test_fuzz_answer_never_raises(data: bytes) -> None:
    dns = server()
    result = dns.answer(data, ("10.53.0.66", 4444))
    assert dns.stats["failed"] == 0
    if isinstance(result, bytes):
        assert result[:2] == data[:2] and result[2] & 0x80  # our answer to that query


# --------------------------------------------------------------------------- the lab


@dataclass
class DigResult:
    status: str
    flags: set[str]
    answer: list[str]
    authority: list[str]
    text: str

    def values(self) -> list[str]:
        """The RDATA of each answer record."""
        return [line.split(None, 4)[4] for line in self.answer]


def _section(text: str, name: str) -> list[str]:
    match = re.search(rf";; {name} SECTION:\n(.*?)(?:\n\n|\Z)", text, re.S)
    return [] if match is None else [line for line in match.group(1).splitlines() if line]


@dataclass
class DnsLab:
    segment: netlab.Segment
    dns_host: netlab.Host
    client: netlab.Host
    upstream_host: netlab.Host
    upstream: subprocess.Popen[bytes] | None
    proc: subprocess.Popen[bytes]
    log: Path
    stats_path: Path
    workdir: Path

    def dig(self, *args: str, timeout: float = 8.0, host: netlab.Host | None = None) -> DigResult:
        """`dig` from the client namespace (or `host`); asserts that it got an answer."""
        argv = ["dig", f"@{DNS_IP}", "+tries=1", f"+timeout={int(timeout)}", *args]
        result = (host or self.client).run(argv, timeout=timeout * 3 + 10, check=False)
        text = result.stdout
        assert result.returncode == 0, f"dig {' '.join(args)} got no answer:\n{text}{result.stderr}"
        status = re.search(r"status: (\w+)", text)
        flags = re.search(r";; flags: ([a-z ]*);", text)
        assert status and flags, text
        return DigResult(
            status.group(1),
            set(flags.group(1).split()),
            _section(text, "ANSWER"),
            _section(text, "AUTHORITY"),
            text,
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stats(self) -> dict[str, int]:
        before = self.stats_path.stat().st_mtime_ns if self.stats_path.exists() else None
        self.proc.send_signal(signal.SIGUSR1)

        def written() -> dict[str, int] | None:
            if not self.stats_path.exists() or self.stats_path.stat().st_mtime_ns == before:
                return None
            data: dict[str, int] = json.loads(self.stats_path.read_text())
            return data

        try:
            return netlab.wait_until(written, 5.0, 0.05, "dns_serve.py stats")
        except AssertionError:  # written within the same mtime tick
            data: dict[str, int] = json.loads(self.stats_path.read_text())
            return data

    def stop(self) -> str:
        """SIGTERM the server; return its last line (what it left behind)."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(10) == 0, self.log_text()[-3000:]
        return self.log_text().rstrip().rsplit("\n", 1)[-1]

    def run_sender(self, host: netlab.Host, *args: str, timeout: float = 120) -> str:
        return host.run([sys.executable, str(THIS), *args], timeout=timeout).stdout


def start_upstream(host: netlab.Host, extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """dnsmasq as the home router's resolver: local answers only, nothing forwarded."""
    big = [f"--host-record=big.example.test,10.8.0.{i}" for i in range(1, BIG_ANSWERS + 1)]
    argv = [
        netlab._tool("dnsmasq"),
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=53",
        "--no-resolv",
        "--no-hosts",
        f"--interface={host.iface}",
        "--bind-interfaces",
        "--address=/example.test/10.9.9.9",
        "--host-record=up.example.test,10.9.9.8",
        f"--ptr-record={IPv4Address(PRINTER_IP).reverse_pointer},printer.home",
        *big,
        "--edns-packet-max=512",  # so big.example.test is truncated over UDP
        "--log-queries",
        "--log-facility=-",
        *extra,
    ]
    log = host.log_path("dnsmasq")
    proc = host.popen(argv, log)
    wait_listening(host, proc, log, "dnsmasq")
    return proc


def wait_listening(host: netlab.Host, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}):\n{netlab._tail(log)}")
        udp = host.run(["ss", "-H", "-uln"], timeout=5.0).stdout
        tcp = host.run(["ss", "-H", "-tln"], timeout=5.0).stdout
        return re.search(r":53\s", udp) is not None and re.search(r":53\s", tcp) is not None

    netlab.wait_until(listening, 10.0, 0.05, f"{what} listening on port 53 in {host.name}")


def start_lab(
    segment: netlab.Segment,
    workdir: Path,
    *,
    upstreams: Sequence[str] = (UPSTREAM_IP,),
    timeout: float = 1.0,
    extra: Sequence[str] = (),
    run_upstream: bool = True,
    forward_for: Sequence[str] = (LAB_NET,),
) -> DnsLab:
    dns_host = segment.add_host("dns", ip=f"{DNS_IP}/24")
    upstream_host = segment.add_host("up", ip=f"{UPSTREAM_IP}/24")
    client = segment.add_host("client", ip=f"{CLIENT_IP}/24")
    upstream = start_upstream(upstream_host) if run_upstream else None
    stats_path = workdir / "dns-stats.json"
    argv = [
        sys.executable,
        str(DNS_SERVE),
        "--domain", DOMAIN,
        *(f"--record={name}={ip}" for name, ip in RECORDS.items()),
        *(f"--upstream={ip}" for ip in upstreams),
        *(f"--forward-for={network}" for network in forward_for),
        "--listen-ip", DNS_IP,
        "--interface", dns_host.iface,
        "--timeout", str(timeout),
        "--stats", str(stats_path),
        *extra,
    ]  # fmt: skip
    log = dns_host.log_path("dns")
    proc = dns_host.popen(argv, log)
    netlab.wait_until(
        lambda: "DNS serving" in log.read_text() or proc.poll() is not None, 15.0, 0.05, "ready"
    )
    assert proc.poll() is None, f"dns_serve.py exited:\n{netlab._tail(log)}"
    return DnsLab(
        segment, dns_host, client, upstream_host, upstream, proc, log, stats_path, workdir
    )


def assert_quiet(lab: DnsLab) -> None:
    text = lab.log_text()
    assert "Traceback" not in text, text[-4000:]
    assert not LOUD.search(text), LOUD.findall(text)


def test_lab_names_answered_by_the_appliance(segment: netlab.Segment, workdir: Path) -> None:
    lab = start_lab(segment, workdir)
    a = lab.dig("c1.lab.internal", "A")
    assert (a.status, a.values()) == ("NOERROR", [C1_IP])
    assert "aa" in a.flags
    assert a.answer[0].split()[1] == "60"  # the TTL

    mixed = lab.dig("C1.LaB.InTeRnAl", "A")
    assert mixed.values() == [C1_IP]
    assert ";C1.LaB.InTeRnAl.\t" in mixed.text  # the question as asked (RFC 4343)
    assert lab.dig("pixiebox.lab.internal").values() == [DNS_IP]

    ptr = lab.dig("-x", C1_IP)
    assert (ptr.status, ptr.values()) == ("NOERROR", ["c1.lab.internal."])
    assert "aa" in ptr.flags

    nx = lab.dig("nosuch.lab.internal", "A")
    assert (nx.status, nx.answer) == ("NXDOMAIN", [])
    assert "aa" in nx.flags
    assert len(nx.authority) == 1 and nx.authority[0].split()[:4] == [
        "lab.internal.",
        "60",
        "IN",
        "SOA",
    ]

    nodata = lab.dig("c1.lab.internal", "AAAA")
    assert (nodata.status, nodata.answer) == ("NOERROR", [])
    assert "SOA" in nodata.authority[0]

    # The same over TCP, answered by the appliance too.
    assert lab.dig("+tcp", "c1.lab.internal").values() == [C1_IP]
    # dig without EDNS (a 512-byte client) and with the DNSSEC OK bit.
    assert lab.dig("+noedns", "c1.lab.internal").values() == [C1_IP]
    assert lab.dig("+dnssec", "c1.lab.internal").values() == [C1_IP]

    stats = lab.stats()
    assert stats["answered"] >= 9 and stats.get("forwarded", 0) == 0
    assert lab.stop().startswith("DNS stopped: tasks left 0, sockets left 0")
    assert_quiet(lab)


def test_other_names_are_forwarded_over_udp_and_tcp(segment: netlab.Segment, workdir: Path) -> None:
    lab = start_lab(segment, workdir)
    up = lab.dig("up.example.test")
    assert (up.status, up.values()) == ("NOERROR", ["10.9.9.8"])
    assert up.answer[0].split()[1] == "0"  # dnsmasq's answer (local-ttl 0), passed on

    tcp = lab.dig("+tcp", "www.example.test")
    assert tcp.values() == ["10.9.9.9"]
    # An address of no machine: its reverse name is the upstream's to answer.
    assert lab.dig("-x", PRINTER_IP).values() == ["printer.home."]
    # dnsmasq without servers refuses other names: its answer is passed on, not replaced.
    assert lab.dig("nowhere.test").status == "REFUSED"

    upstream_log = netlab._tail(lab.segment.log_of(lab.upstream), 20000) if lab.upstream else ""
    assert f"query[A] up.example.test from {DNS_IP}" in upstream_log
    assert f"query[A] www.example.test from {DNS_IP}" in upstream_log
    stats = lab.stats()
    assert stats["forwarded"] == 4 and stats["upstream_refused"] == 1
    assert lab.stop().startswith("DNS stopped: tasks left 0, sockets left 0")
    assert_quiet(lab)


def test_a_routed_client_gets_lab_names_and_refused_for_the_rest(
    segment: netlab.Segment, workdir: Path
) -> None:
    """No open resolver: a host one router away (another VLAN, a VPN) that reaches the server
    still resolves the lab's names, but has nothing forwarded: REFUSED, over UDP and TCP."""
    lab = start_lab(segment, workdir)
    _router, remote = segment.add_routed_host("router", "remote", f"{ROUTER_IP}/24", REMOTE_NET)
    lab.dns_host.add_route(REMOTE_NET, via=ROUTER_IP)
    assert remote.addresses() == [f"{REMOTE_IP}/24"]

    # From the lab subnet an outside name is forwarded, to the upstream the lab has.
    assert lab.dig("up.example.test").values() == ["10.9.9.8"]
    # From the routed host: the lab's names, their PTRs and NXDOMAIN, as for anyone.
    a = lab.dig("c1.lab.internal", host=remote)
    assert (a.status, a.values()) == ("NOERROR", [C1_IP]) and "aa" in a.flags
    assert lab.dig("-x", C1_IP, host=remote).values() == ["c1.lab.internal."]
    assert lab.dig("nosuch.lab.internal", host=remote).status == "NXDOMAIN"
    assert lab.dig("+tcp", "pixiebox.lab.internal", host=remote).values() == [DNS_IP]
    # ...but nothing that would be forwarded.
    for args in (("www.example.test",), ("+tcp", "up.example.test"), ("-x", PRINTER_IP)):
        refused = lab.dig(*args, host=remote)
        assert (refused.status, refused.answer) == ("REFUSED", []), refused.text
        assert "aa" not in refused.flags
    upstream_log = netlab._tail(lab.segment.log_of(lab.upstream), 20000) if lab.upstream else ""
    assert "up.example.test from" in upstream_log  # the lab client's query went upstream
    assert "www.example.test" not in upstream_log and "printer" not in upstream_log
    stats = lab.stats()
    assert (stats["refused"], stats["forwarded"]) == (3, 1), stats
    # One line for the routed source, however many refusals: not one per query.
    lines = [line for line in lab.log_text().splitlines() if "refused to forward" in line]
    assert len(lines) == 1 and REMOTE_IP in lines[0] and "[dns] forward_for" in lines[0], lines
    assert " WARNING " in lines[0]
    assert lab.stop().startswith("DNS stopped: tasks left 0, sockets left 0")
    assert "Traceback" not in lab.log_text()


def test_a_truncated_upstream_answer_is_fetched_over_tcp(
    segment: netlab.Segment, workdir: Path
) -> None:
    lab = start_lab(segment, workdir)
    # dnsmasq (edns-packet-max 512) truncates; the server asks again over TCP and, as the
    # client takes 4096 bytes, answers in one datagram.
    big = lab.dig("+bufsize=4096", "big.example.test")
    assert len(big.values()) == BIG_ANSWERS and "tc" not in big.flags
    assert "Truncated" not in big.text
    stats = lab.stats()
    assert stats["upstream_truncated"] == 1 and stats.get("truncated", 0) == 0

    # A 512-byte client gets TC and retries over TCP itself (dig does), through the server.
    small = lab.dig("+noedns", "big.example.test")
    assert len(small.values()) == BIG_ANSWERS
    assert "Truncated, retrying in TCP mode" in small.text
    assert lab.stats()["truncated"] == 1
    assert_quiet(lab)


def test_upstream_down_is_servfail_not_a_hang(segment: netlab.Segment, workdir: Path) -> None:
    lab = start_lab(segment, workdir, timeout=1.0)
    assert lab.upstream is not None
    assert lab.dig("up.example.test").values() == ["10.9.9.8"]
    lab.segment.stop(lab.upstream)  # the port is closed now: ICMP port unreachable

    assert lab.dig("up.example.test").status == "SERVFAIL"
    assert lab.dig("+tcp", "up.example.test").status == "SERVFAIL"
    # Lab names do not depend on the upstream.
    assert lab.dig("c1.lab.internal").values() == [C1_IP]
    stats = lab.stats()
    assert stats["servfail"] == 2 and stats["upstream_failed"] >= 2
    assert lab.stop().startswith("DNS stopped: tasks left 0, sockets left 0")
    assert_quiet(lab)


def test_silent_upstream_is_servfail_after_the_timeout(
    segment: netlab.Segment, workdir: Path
) -> None:
    lab = start_lab(segment, workdir, upstreams=[SILENT_IP], timeout=1.0, run_upstream=False)
    assert lab.dig("up.example.test", timeout=8).status == "SERVFAIL"
    assert lab.dig("+tcp", "up.example.test", timeout=8).status == "SERVFAIL"
    assert lab.stats()["servfail"] == 2
    assert_quiet(lab)


def test_the_next_upstream_answers_when_the_first_is_silent(
    segment: netlab.Segment, workdir: Path
) -> None:
    lab = start_lab(segment, workdir, upstreams=[SILENT_IP, UPSTREAM_IP], timeout=1.0)
    assert lab.dig("up.example.test", timeout=8).values() == ["10.9.9.8"]
    assert lab.dig("+tcp", "www.example.test", timeout=8).values() == ["10.9.9.9"]
    stats = lab.stats()
    assert stats["forwarded"] == 2 and stats["upstream_failed"] == 2
    assert_quiet(lab)


def test_changed_records_are_served_at_once(segment: netlab.Segment, workdir: Path) -> None:
    records_file = workdir / "records.json"
    lab = start_lab(segment, workdir, extra=["--records-file", str(records_file)])
    assert lab.dig("c1.lab.internal").values() == [C1_IP]
    records_file.write_text(json.dumps({"c2": C1_IP, "pixiebox": DNS_IP}))
    lab.proc.send_signal(signal.SIGHUP)
    netlab.wait_until(lambda: "DNS records reloaded" in lab.log_text(), 5.0, 0.05, "reload")
    assert lab.dig("c1.lab.internal").status == "NXDOMAIN"
    assert lab.dig("c2.lab.internal").values() == [C1_IP]
    assert lab.dig("-x", C1_IP).values() == ["c2.lab.internal."]
    assert_quiet(lab)


def test_thousands_of_garbage_packets_leave_the_server_answering(
    segment: netlab.Segment, workdir: Path
) -> None:
    lab = start_lab(segment, workdir)
    attacker = segment.add_host("attacker", ip=f"{ATTACKER_IP}/24")
    out = lab.run_sender(attacker, "fuzz", "--target", DNS_IP, "--count", "4000", "--seed", "7")
    assert out.split() == ["4000", "40"]
    assert lab.dig("c1.lab.internal").values() == [C1_IP]
    assert lab.dig("up.example.test").values() == ["10.9.9.8"]
    assert lab.dig("+tcp", "c1.lab.internal").values() == [C1_IP]
    stats = lab.stats()
    assert stats["malformed"] > 500, stats
    assert stats.get("failed", 0) == 0, stats
    assert lab.proc.poll() is None
    assert "malformed DNS packet" in lab.log_text()
    assert lab.stop().startswith("DNS stopped: tasks left 0, sockets left 0")
    assert_quiet(lab)


def test_a_flood_of_forwarded_queries_is_bounded(segment: netlab.Segment, workdir: Path) -> None:
    lab = start_lab(
        segment,
        workdir,
        upstreams=[SILENT_IP],
        timeout=2.0,
        run_upstream=False,
        extra=["--max-forwards", "8"],
    )
    out = lab.run_sender(lab.client, "flood", "--target", DNS_IP, "--count", "300")
    sent, servfail, unanswered = map(int, out.split())
    assert sent == 300
    # 8 wait on the silent upstream; the rest are refused at once rather than queued.
    assert servfail >= 280 and unanswered <= 20, out
    assert lab.dig("c1.lab.internal").values() == [C1_IP]
    stats = lab.stats()
    assert stats["busy"] >= 280, stats
    assert_quiet(lab)


# --------------------------------------------------------------------------- senders


def _valid_query(rng: random.Random) -> bytes:
    name = rng.choice(["c1.lab.internal", "nosuch.lab.internal", "up.example.test", "x.test"])
    request = DNSRecord.question(name, rng.choice(["A", "AAAA", "PTR", "ANY", "TXT"]))
    if rng.random() < 0.5:
        request.add_ar(EDNS0(udp_len=rng.choice([512, 1232, 4096])))
    return bytes(request.pack())


def fuzz(target: str, count: int, seed: int) -> None:
    """UDP garbage, cut and mutated queries, pointer loops, answers; then TCP garbage."""
    rng = random.Random(seed)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sent = 0
    for i in range(count):
        kind = i % 6
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 700))
        elif kind == 1:
            data = _valid_query(rng)[: rng.randrange(0, 40)]
        elif kind == 2:
            mutated = bytearray(_valid_query(rng))
            for _ in range(rng.randrange(1, 6)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = bytes(mutated)
        elif kind == 3:  # a question whose name points at itself
            data = struct.pack("!6H", rng.getrandbits(16), 0x0100, 1, 0, 0, 0) + b"\xc0\x0c"
            data += b"\x00\x01\x00\x01"
        elif kind == 4:  # counts that promise far more than is there
            data = struct.pack("!6H", rng.getrandbits(16), 0, 1, 0xFFFF, 0xFFFF, 0xFFFF)
            data += _valid_query(rng)[12:]
        else:  # valid queries with trailing junk
            data = _valid_query(rng) + rng.randbytes(rng.randrange(1, 30))
        for _ in range(50):
            try:
                sock.sendto(data, (target, 53))
                break
            except BlockingIOError:
                time.sleep(0.001)
        sent += 1
        if i % 200 == 0:
            time.sleep(0.01)  # let the server drain its buffer now and then
    connections = 0
    for _ in range(40):
        with socket.create_connection((target, 53), timeout=5) as tcp:
            choice = rng.randrange(3)
            if choice == 0:
                tcp.sendall(rng.randbytes(rng.randrange(1, 300)))
            elif choice == 1:  # a length prefix promising more than comes
                tcp.sendall(b"\x01\x00" + rng.randbytes(20))
            else:
                payload = rng.randbytes(rng.randrange(0, 100))
                tcp.sendall(len(payload).to_bytes(2, "big") + payload)
            connections += 1
    print(sent, connections)


def flood(target: str, count: int) -> None:
    """`count` forwarded queries at once; prints sent, SERVFAIL answers, unanswered."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    ids = set()
    for i in range(count):
        request = DNSRecord.question(f"q{i}.example.test")
        request.header.id = i
        ids.add(i)
        sock.sendto(bytes(request.pack()), (target, 53))
    servfail = 0
    sock.settimeout(1.0)
    deadline = time.monotonic() + 10.0
    while ids and time.monotonic() < deadline:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        reply_id = int.from_bytes(data[:2], "big")
        if reply_id in ids:
            ids.discard(reply_id)
            servfail += (data[3] & 0x0F) == 2
    print(count, servfail, len(ids))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fuzz_cmd = commands.add_parser("fuzz")
    fuzz_cmd.add_argument("--target", required=True)
    fuzz_cmd.add_argument("--count", type=int, default=4000)
    fuzz_cmd.add_argument("--seed", type=int, default=1)
    flood_cmd = commands.add_parser("flood")
    flood_cmd.add_argument("--target", required=True)
    flood_cmd.add_argument("--count", type=int, default=300)
    args: Any = parser.parse_args(argv)
    if args.command == "fuzz":
        fuzz(args.target, args.count, args.seed)
    else:
        flood(args.target, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
