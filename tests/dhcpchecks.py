"""What the DHCP codec's property tests (test_dhcp_codec.py, test_fuzz_dhcp.py) require of every
packet decode() returns: each accessor gives a value or DecodeError (a handler catches nothing
else, so any other exception is a datagram that kills the exchange), and a packet that encodes
decodes to itself (nothing lost or invented on the way out)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from pixiebox.dhcp.codec import DecodeError, EncodeError, Packet, decode, encode

#: Every accessor the DHCP handlers call on a request.
HANDLER_ACCESSORS = (
    "mac",
    "message_type",
    "broadcast",
    "requested_ip",
    "server_id",
    "client_arches",
    "vendor_class",
    "user_classes",
    "client_uuid",
    "parameter_request_list",
    "max_message_size",
    "hostname",
)


def read_accessors(packet: Packet, names: Iterable[str]) -> None:
    """Read each accessor in `names`: a value or DecodeError, never another exception."""
    for name in names:
        with contextlib.suppress(DecodeError):
            getattr(packet, name)


def check_round_trip(packet: Packet) -> None:
    """`packet` encodes to what decodes to it again, or cannot be encoded (EncodeError only)."""
    try:
        wire = encode(packet)
    except EncodeError:
        return
    assert decode(wire) == packet
