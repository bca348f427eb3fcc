"""Issue 13 item 7: the TFTP parsers an outsider reaches, fuzzed (hypothesis).

A datagram on port 69 goes through `packets.parse_request`, whose ValueError the engine counts
as malformed (engine.py catches exactly that), then `negotiate` on the client's options and
`oack_packet` on what was accepted; a datagram on a transfer's port goes through
`parse_reply`, which answers None for anything that is neither an ACK nor an ERROR. Requests
are built as tftp-hpa, iPXE and EDK2 send them (options in any case, values in and out of
range), then cut and flipped; plus plain bytes.
"""

from __future__ import annotations

import os
import struct

from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st
from pixiebox.tftp import packets
from pixiebox.tftp.packets import (
    ACK,
    ERROR,
    MAX_BLKSIZE,
    MAX_WINDOWSIZE,
    MIN_BLKSIZE,
    OACK,
    RRQ,
    WRQ,
    negotiate,
    oack_packet,
    parse_reply,
    parse_request,
    printable,
)

#: What a request carries past its file name and mode: option names as clients spell them.
OPTION_NAMES = ["blksize", "tsize", "timeout", "windowsize", "BLKSIZE", "TSize", "multicast"]
_numbers = st.one_of(
    st.integers(-3, 70000).map(str),
    st.sampled_from(["0", "8", "255", "256", "65464", "65535", " 1468 ", "1_0", "+4", "0x10"]),
    st.sampled_from(["9" * 5000, "", "nan", "\ufffd", "\uff11\uff12"]),  # long, Unicode
)
_names = st.one_of(
    st.sampled_from(["undionly.kpxe", "ipxe/ipxe.efi", "pxelinux.cfg/01-02-00-00-00-00-01"]),
    st.sampled_from(["../../etc/passwd", "/etc/shadow", "a//b", "\\boot\\x", ""]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"")),
)
_modes = st.sampled_from([b"octet", b"OCTET", b"netascii", b"mail", b"", b"binary", b"\xff"])


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(datagram, whether it is a well-formed RRQ/WRQ as built)."""
    name = draw(_names)
    raw_name = name if isinstance(name, bytes) else name.encode()
    pairs = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(OPTION_NAMES), st.text("abcxyz", max_size=5)),
                _numbers,
            ),
            max_size=6,
        )
    )
    opcode = draw(st.sampled_from([RRQ, RRQ, RRQ, WRQ]))
    fields = [raw_name, draw(_modes)]
    for key, value in pairs:
        fields += [key.encode("utf-8"), value.encode("utf-8")]
    data = bytearray(struct.pack("!H", opcode) + b"".join(f + b"\0" for f in fields))
    action = draw(st.sampled_from(["keep", "keep", "flip", "cut", "unpaired", "opcode"]))
    if action == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif action == "cut":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif action == "unpaired":
        data += b"blksize\0"  # an option without its value: ignored
    elif action == "opcode":
        data[0:2] = struct.pack("!H", draw(st.integers(0, 0xFFFF)))
    return bytes(data), action in ("keep", "unpaired")


def parse_oack(data: bytes) -> dict[str, str]:
    """An OACK as a client reads it: opcode 6, then NUL-terminated name/value pairs."""
    assert data[:2] == struct.pack("!H", OACK)
    fields = data[2:].split(b"\0")
    assert fields.pop() == b"" and len(fields) % 2 == 0
    pairs = zip(fields[::2], fields[1::2], strict=True)
    return {key.decode("ascii"): value.decode("ascii") for key, value in pairs}


def check_negotiation(
    options: dict[str, str], size: int, mtu: int | None, max_timeout: float = 255
) -> None:
    accepted, timeout = negotiate(options, size, mtu, max_timeout=max_timeout)
    assert set(accepted) <= {"blksize", "tsize", "timeout", "windowsize"}
    if "blksize" in accepted:
        blksize = int(accepted["blksize"])
        assert MIN_BLKSIZE <= blksize <= MAX_BLKSIZE
        assert mtu is None or blksize <= max(MIN_BLKSIZE, mtu - 32)  # never IP-fragmented
    if "windowsize" in accepted:
        assert 1 <= int(accepted["windowsize"]) <= MAX_WINDOWSIZE
    if "tsize" in accepted:
        assert accepted["tsize"] == str(size)
    if timeout is not None:  # [tftp] max_client_timeout caps what a client may ask for
        assert 1 <= timeout <= min(255, max_timeout) and "timeout" in accepted
    # Only what the client asked for is acknowledged (RFC 2347), and the OACK says it exactly.
    assert set(accepted) <= set(options)
    if accepted:
        assert parse_oack(oack_packet(accepted)) == accepted


@fuzz(700)
@given(st.one_of(requests(), st.binary(max_size=300).map(lambda b: (b, False))))
def test_any_datagram_on_port_69_is_a_request_or_malformed(built: tuple[bytes, bool]) -> None:
    data, well_formed = built
    try:
        opcode, name, mode, options = parse_request(data)
    except ValueError:
        assert not well_formed, data
        return
    assert opcode in (RRQ, WRQ)
    assert mode == mode.lower() and all(key == key.lower() for key in options)
    # The name maps back onto the bytes that were sent (os.fsdecode), and prints on one line.
    raw_name = data[2:].split(b"\0", 1)[0]
    assert os.fsencode(name) == raw_name
    shown = printable(name)
    assert shown.isprintable()
    check_negotiation(options, len(data) * 1000, None)
    check_negotiation(options, 0, 1500, max_timeout=5)
    check_negotiation(options, 2**40, 576, max_timeout=0.5)


def test_every_truncation_of_an_rrq_with_options() -> None:
    options = b"blksize\x001468\x00tsize\x000\x00timeout\x005\x00windowsize\x004\x00"
    rrq = struct.pack("!H", RRQ) + b"ipxe/snp.efi\x00octet\x00" + options
    assert parse_request(rrq)[3] == {
        "blksize": "1468",
        "tsize": "0",
        "timeout": "5",
        "windowsize": "4",
    }
    for cut in range(len(rrq)):
        try:
            _, _, _, got = parse_request(rrq[:cut])
        except ValueError:
            continue
        check_negotiation(got, 1 << 20, 1500, max_timeout=5)


@st.composite
def replies(draw: st.DrawFn) -> bytes:
    """What a client sends on a transfer's port: ACKs and ERRORs, some spoiled."""
    opcode = draw(st.sampled_from([ACK, ERROR, ACK, ERROR, 0, 1, 3, 6, 0x0104, 0xFFFF]))
    number = draw(st.integers(0, 0xFFFF))
    tail = draw(
        st.one_of(
            st.just(b""),
            st.sampled_from([b"\0", b"File not found\0", b"no NUL", b"a\0b\0", b"\x1b[2J\0"]),
            st.binary(max_size=64),
        )
    )
    data = struct.pack("!HH", opcode, number) + tail
    return data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


@fuzz(500)
@given(st.one_of(replies(), st.binary(max_size=100)))
def test_any_datagram_on_a_transfer_port_is_an_ack_an_error_or_ignored(data: bytes) -> None:
    reply = parse_reply(data)
    if reply is None:
        assert len(data) < 4 or data[:2] not in (b"\0\x04", b"\0\x05")
        return
    opcode, number, text = reply
    assert (opcode, number) == struct.unpack("!HH", data[:4])
    if opcode == ACK:
        assert text == ""
    else:
        assert opcode == ERROR and (text == "" or text.isprintable())
        assert "\n" not in text and "\x1b" not in text  # one log line, no terminal escapes


def test_error_packets_parse_back_to_their_fixed_words() -> None:
    for code, words in packets.CLIENT_TEXT.items():
        assert parse_reply(packets.error_packet(code)) == (ERROR, code, words)
