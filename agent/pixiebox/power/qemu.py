"""QEMU machines of the virtual lab, powered through their QMP socket (qemu.qmp, QEMU's own
client library).

QEMU has no "power cut" that keeps the process, so the power states are QEMU's run states:
a VM started with `-no-shutdown` stays in `shutdown` when its guest powers off, and `stop`
freezes it (`paused`). Both count as off. `on` resets the machine before `cont`, so it boots
from its firmware again (PXE) like a real machine after a power cut, instead of resuming the
frozen guest. A graceful off through the guest's ACPI is the ssh driver's job.

A VM started with `-no-reboot` turns `system_reset` into a shutdown (QEMU's reboot action):
start power-controlled VMs without it (pixiebox.virtlab.vm does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from qemu.qmp import QMPClient, QMPError

from pixiebox.config.power_options import QemuOptions
from pixiebox.power.base import BaseDriver, PowerState, PowerTarget, describe

#: QEMU run states (qapi RunState) that mean the machine is not running a guest.
OFF_STATES = frozenset({"shutdown", "paused", "prelaunch", "suspended"})
#: Run states from which `cont` needs a reset first (QEMU refuses it otherwise).
NEEDS_RESET = frozenset({"shutdown", "paused", "internal-error", "guest-panicked", "io-error"})

# qemu.qmp logs every failed connection at ERROR level with a traceback; our PowerError says it.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QemuDriver(BaseDriver):
    name = "qemu"
    graceful = False

    def __init__(self, target: PowerTarget, options: QemuOptions) -> None:
        super().__init__(target)
        self.options = options

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[QMPClient]:
        """A QMP session with the VM, closed afterwards (QEMU serves one client at a time)."""
        path = self.options.qmp
        timeout = self.options.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        directory: int | None = None
        try:
            sock.setblocking(False)
            address = str(path)
            if len(os.fsencode(address)) > 100:
                # sun_path holds 108 bytes; reach a deeper socket through its directory's fd.
                directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
                address = f"/proc/self/fd/{directory}/{path.name}"
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            reason = "no answer" if isinstance(exc, TimeoutError) else describe(exc)
            raise self.error(
                f"cannot reach the VM's QMP socket {path}: {reason} (is the VM running, "
                "started with -qmp unix:PATH,server=on,wait=off?)"
            ) from None
        finally:
            if directory is not None:
                os.close(directory)
        client = QMPClient(self.target.name)
        try:
            await asyncio.wait_for(client.connect(sock), timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            sock.close()
            raise self.error(f"no QMP greeting on {path}: {describe(exc)}") from None
        try:
            yield client
        finally:
            with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                await asyncio.wait_for(client.disconnect(), timeout)

    async def _execute(
        self, client: QMPClient, command: str, arguments: dict[str, Any] | None = None
    ) -> Any:
        try:
            return await asyncio.wait_for(client.execute(command, arguments), self.options.timeout)
        except TimeoutError:
            raise self.error(
                f"QEMU did not answer {command} within {self.options.timeout:g} s"
            ) from None
        except (QMPError, OSError, EOFError) as exc:
            raise self.error(f"QEMU refused {command}: {describe(exc)}") from None

    async def run_state(self, client: QMPClient) -> str:
        answer = await self._execute(client, "query-status")
        if not isinstance(answer, dict) or not isinstance(answer.get("status"), str):
            raise self.error(f"query-status answered {answer!r}")
        return str(answer["status"])

    async def _wait_state(self, client: QMPClient, leave: frozenset[str]) -> str:
        """The run state once it is none of `leave` (a reset is carried out by QEMU's main loop
        after the command has returned)."""
        state = await self.run_state(client)
        for _ in range(100):
            if state not in leave:
                return state
            await asyncio.sleep(0.05)
            state = await self.run_state(client)
        raise self.error(f"QEMU stayed {state!r} after a reset")

    async def _start(self, client: QMPClient) -> None:
        state = await self.run_state(client)
        if state == "running":
            return
        if state == "suspended":
            await self._execute(client, "system_wakeup")
            return
        if state in NEEDS_RESET:
            await self._execute(client, "system_reset")
            state = await self._wait_state(client, frozenset({"shutdown"}))
        if state != "running":
            await self._execute(client, "cont")

    async def on(self) -> None:
        async with self.session() as client:
            await self._start(client)

    async def off(self) -> None:
        async with self.session() as client:
            if await self.run_state(client) == "running":
                await self._execute(client, "stop")

    async def cycle(self) -> None:
        async with self.session() as client:
            await self._execute(client, "system_reset")
            await self._start(client)

    async def status(self) -> PowerState:
        async with self.session() as client:
            state = await self.run_state(client)
        if state == "running":
            return PowerState.ON
        if state in OFF_STATES:
            return PowerState.OFF
        return PowerState.UNKNOWN
