"""Machines with an IPMI BMC (IPMI 2.0 over LAN, RMCP+), through pyghmi.

Before powering on, the driver sets the boot device to the network for the next boot only
(Set System Boot Options, boot flags valid for one boot), like Redfish's override Once.

pyghmi is synchronous and keeps its own session machinery; each call runs in a worker thread
and is bounded, and its "timeout" exceptions are turned into a sentence naming the BMC.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pyghmi.exceptions
from pyghmi.ipmi import command

from pixiebox.config.power_options import IpmiOptions
from pixiebox.power.base import BaseDriver, PowerState, PowerTarget, read_secret

T = TypeVar("T")

log = logging.getLogger("pixiebox.power.ipmi")


class IpmiDriver(BaseDriver):
    name = "ipmi"
    graceful = False

    def __init__(self, target: PowerTarget, options: IpmiOptions) -> None:
        super().__init__(target)
        self.options = options
        self.where = f"IPMI BMC at {options.host}:{options.port}"
        self._command: command.Command | None = None
        self._lock = threading.Lock()

    def _session(self) -> command.Command:
        options = self.options
        password = read_secret(options.password, options.password_file, self.where)
        return command.Command(
            bmc=options.host,
            userid=options.user,
            password=password or "",
            port=options.port,
        )

    async def _call(self, what: str, function: Callable[[command.Command], T]) -> T:
        def work() -> T:
            # One pyghmi session per driver, kept: pyghmi caches sessions per BMC and user and
            # keeps them alive itself, and a second Command on a cached session that had an
            # error hangs. A failed call drops it, so the next one logs in afresh.
            with self._lock:
                if self._command is None:
                    self._command = self._session()
                try:
                    return function(self._command)
                except Exception:
                    self._command = None
                    raise

        try:
            return await asyncio.wait_for(asyncio.to_thread(work), self.options.timeout)
        except TimeoutError:
            raise self.error(
                f"unreachable {self.where}: no answer within {self.options.timeout:g} s ({what})"
            ) from None
        except pyghmi.exceptions.PyghmiException as exc:
            raise self.error(f"{self.where}: {what} failed: {_reason(exc)}") from None
        except OSError as exc:
            raise self.error(f"unreachable {self.where}: {exc.strerror or exc}") from None

    def _boot_from_network_once(self, session: command.Command) -> None:
        """Next boot from the network; a BMC without boot options still gets powered on (the
        machine's own boot order may well start with the network)."""
        if not self.options.pxe_once:
            return
        try:
            session.set_bootdev("network", persist=False)
        except pyghmi.exceptions.IpmiException as exc:
            log.warning(
                "%s: %s did not take a one-time network boot (%s); powering on with the "
                "machine's own boot order",
                self.target.name,
                self.where,
                exc,
            )

    async def on(self) -> None:
        def work(session: command.Command) -> None:
            self._boot_from_network_once(session)
            session.set_power("on")

        await self._call("power on", work)

    async def off(self) -> None:
        await self._call("power off", lambda session: session.set_power("off"))

    async def cycle(self) -> None:
        def work(session: command.Command) -> None:
            self._boot_from_network_once(session)
            # "boot": a reset when on, a power-on when off (pyghmi's own mapping).
            session.set_power("boot")

        await self._call("power cycle", work)

    async def status(self) -> PowerState:
        answer: Any = await self._call("power status", lambda session: session.get_power())
        state = answer.get("powerstate") if isinstance(answer, dict) else None
        if state in ("on", "off"):
            return PowerState(state)
        return PowerState.UNKNOWN

    async def boot_device(self) -> dict[str, Any]:
        """The BMC's next-boot device as pyghmi reads it ({"bootdev": "network", ...})."""
        answer: Any = await self._call("boot device", lambda session: session.get_bootdev())
        return dict(answer) if isinstance(answer, dict) else {}


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if "timeout" in text.lower():
        return "no answer (timeout): is it on the network, and is IPMI over LAN enabled?"
    if "password" in text.lower() or "unauthorized" in text.lower():
        return f"{text}; check user and password for this machine in lab.toml"
    return text
