"""Wake-on-LAN: the magic packet, the only way to switch on a NUC that has no BMC and no plug.

The packet (AMD's "Magic Packet" white paper) is 6 bytes of 0xff followed by the target MAC
16 times, optionally followed by a 6-byte SecureOn password that some NICs require. It is a UDP
datagram to port 9 (discard; 7 also seen) sent as a broadcast on the lab's segment: a sleeping
NIC answers no ARP, so a unicast to its IP would never leave the appliance. `address` directs it
elsewhere instead, e.g. the subnet-directed broadcast of a routed lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from ipaddress import IPv4Address

from pixiebox.config.power_options import WolOptions
from pixiebox.config.values import normalize_mac
from pixiebox.power.base import BaseDriver, PowerAction, PowerTarget, describe

#: Copies sent per `on`: UDP has no acknowledgement, and a switch port that just came up may
#: drop the first frame; every NIC treats extra copies as one wake-up.
COPIES = 3


def magic_packet(mac: str, password: str | None = None) -> bytes:
    """6 bytes 0xff, the MAC 16 times, then the SecureOn password's 6 bytes if given."""
    payload = b"\xff" * 6 + bytes.fromhex(normalize_mac(mac).replace(":", "")) * 16
    if password:
        payload += bytes.fromhex(normalize_mac(password).replace(":", ""))
    return payload


class WolDriver(BaseDriver):
    name = "wol"
    actions = frozenset({PowerAction.ON})
    graceful = False

    def __init__(self, target: PowerTarget, options: WolOptions) -> None:
        super().__init__(target)
        self.options = options

    @property
    def destination(self) -> tuple[str, int]:
        address = self.options.address or self.target.broadcast or IPv4Address("255.255.255.255")
        return str(address), self.options.port

    async def on(self) -> None:
        payload = magic_packet(self.target.mac, self.options.password)
        interface = self.options.interface or self.target.interface
        destination = self.destination
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if interface:
                # Out of the lab interface even when the default route points elsewhere (the
                # limited broadcast 255.255.255.255 would otherwise follow it).
                try:
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode() + b"\0"
                    )
                except OSError as exc:
                    if exc.errno == errno.ENODEV:
                        raise self.error(
                            f"no network interface {interface!r} here to send the magic packet "
                            "on; fix [network] interface (or the wol interface key)"
                        ) from None
                    if exc.errno != errno.EPERM:
                        raise
                    # Without CAP_NET_RAW: the routing table picks the interface, which is
                    # right for the subnet's own broadcast address.
            loop = asyncio.get_running_loop()
            for _ in range(COPIES):
                await self.bounded(
                    loop.sock_sendto(sock, payload, destination), "sending the magic packet", 5.0
                )
        except OSError as exc:
            raise self.error(
                f"cannot send the magic packet to {destination[0]}:{destination[1]} on "
                f"{interface}: {describe(exc)}"
            ) from None
        finally:
            with contextlib.suppress(OSError):
                sock.close()
