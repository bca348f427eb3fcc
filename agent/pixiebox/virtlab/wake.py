"""Wake-on-LAN for the virtual lab: the VMs' "NICs" wake their machine on a magic packet.

A real NIC with Wake-on-LAN armed scans every frame it receives for the sync stream (6 bytes
of 0xff) followed by its own MAC 16 times, wherever it sits in the frame: a UDP datagram to
port 9 or 7, any other port, or a raw EtherType 0x0842 frame. QEMU's NICs do not, so this
responder does it for them: a packet socket on the lab bridge (in the switch namespace, where
the VMs' tap devices are) sees every frame of the segment, and a magic packet for a VM's MAC
powers that VM on through its QMP socket with the qemu power driver. A packet socket and not a
UDP socket, because the bridge has no IP address: a subnet-directed broadcast (the wol driver's
default) is not delivered to a local UDP socket there.

Run it inside the switch namespace:

    python -m pixiebox.virtlab.wake --interface br0 --vm 52:54:00:12:34:56=/tmp/lab/c1.qmp

`--map FILE` names a JSON object {mac: qmp socket path} read again on every magic packet, for a
lab whose VMs come and go.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pixiebox.config import normalize_mac
from pixiebox.config.power_options import QemuOptions
from pixiebox.power.base import PowerError, PowerTarget
from pixiebox.power.qemu import QemuDriver

log = logging.getLogger("pixiebox.virtlab.wake")

ETH_P_ALL = 0x0003
SYNC = b"\xff" * 6
#: Printed once the packet socket is listening (tests and the demo wait for it).
READY = "wake-on-lan responder listening"


def magic_macs(frame: bytes) -> set[str]:
    """The MACs that `frame` carries a magic packet for (usually none, at most a few)."""
    found: set[str] = set()
    start = frame.find(SYNC)
    while start != -1:
        body = frame[start + 6 : start + 6 + 96]
        # A run of more than six 0xff (a broadcast destination MAC just before the payload)
        # shifts the sync stream: the MAC repeats must follow the *last* six.
        if len(body) == 96:
            mac = body[:6]
            if mac != b"\xff" * 6 and body == mac * 16:
                found.add(":".join(f"{byte:02x}" for byte in mac))
        start = frame.find(SYNC, start + 1)
    return found


class WakeResponder:
    """Powers on the VM of each magic packet seen on `interface`."""

    def __init__(
        self,
        interface: str,
        machines: Mapping[str, Path] | None = None,
        map_file: Path | None = None,
    ) -> None:
        self.interface = interface
        self.machines = {normalize_mac(mac): Path(path) for mac, path in (machines or {}).items()}
        self.map_file = map_file
        self.woken: list[str] = []  # MACs powered on, in order (for tests)
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _current_machines(self) -> dict[str, Path]:
        machines = dict(self.machines)
        if self.map_file is not None:
            try:
                data = json.loads(self.map_file.read_text(encoding="utf-8"))
                machines.update({normalize_mac(k): Path(v) for k, v in data.items()})
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("cannot read the VM map %s: %s", self.map_file, exc)
        return machines

    async def wake(self, mac: str) -> None:
        """Power on the VM with `mac` (nothing when it is not ours or is already running)."""
        qmp = self._current_machines().get(mac)
        if qmp is None:
            log.info("magic packet for %s, which is not a VM of this lab; ignored", mac)
            return
        target = PowerTarget(
            name=mac, mac=mac, ip=None, interface=self.interface, broadcast=None,
            state_dir=qmp.parent, ssh_host_public=None,
        )  # fmt: skip
        driver = QemuDriver(target, QemuOptions(qmp=qmp))
        # The wol driver sends several copies: one wake-up each, in turn.
        async with self._locks.setdefault(mac, asyncio.Lock()):
            try:
                state = await driver.status()
                if state.value == "on":
                    log.info("magic packet for %s: already on", mac)
                    return
                await driver.on()
            except PowerError as exc:
                log.error("magic packet for %s, but it could not be powered on: %s", mac, exc)
                return
        self.woken.append(mac)
        log.info("magic packet for %s: powered the VM on (QMP %s)", mac, qmp)

    def _on_frame(self, sock: socket.socket) -> None:
        while True:
            try:
                frame = sock.recv(65535)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("reading %s: %s", self.interface, exc)
                return
            for mac in magic_macs(frame):
                task = asyncio.get_running_loop().create_task(self.wake(mac))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def run(self, stop: asyncio.Event) -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.bind((self.interface, 0))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            loop.add_reader(sock.fileno(), self._on_frame, sock)
            print(f"{READY} on {self.interface}", flush=True)
            try:
                await stop.wait()
            finally:
                loop.remove_reader(sock.fileno())
                for task in list(self._tasks):
                    task.cancel()
        finally:
            sock.close()


def _vm_argument(text: str) -> tuple[str, Path]:
    mac, sep, path = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: write MAC=QMP_SOCKET_PATH")
    try:
        return normalize_mac(mac), Path(path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def _serve(responder: WakeResponder) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await responder.run(stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pixiebox.virtlab.wake",
        description="Power on the virtual lab's VMs when a Wake-on-LAN magic packet is seen.",
    )
    parser.add_argument("--interface", default="br0", help="the lab bridge (default br0)")
    parser.add_argument(
        "--vm", action="append", type=_vm_argument, default=[], metavar="MAC=QMP",
        help="a VM's MAC and its QMP socket (repeatable)",
    )  # fmt: skip
    parser.add_argument("--map", type=Path, help="JSON {mac: qmp socket}, read on each packet")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    responder = WakeResponder(args.interface, dict(args.vm), args.map)
    try:
        asyncio.run(_serve(responder))
    except OSError as exc:
        print(f"wake: cannot listen on {args.interface}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
