"""Machines with a Redfish BMC (iDRAC, iLO, XClarity, OpenBMC), through sushy.

Before powering a machine on, the driver asks the BMC to boot it from the network once
(`Boot.BootSourceOverrideTarget = Pxe`, `BootSourceOverrideEnabled = Once`), so that a server
whose boot order starts at its disk still comes up in the OSIE, and boots normally again later.

sushy is synchronous (requests): each call runs in a worker thread and is bounded; sushy's own
retries of 5xx answers are cut down so that a dead BMC is reported in seconds, not minutes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import sushy
import sushy.exceptions

from pixiebox.config.power_options import NETWORK_TIMEOUT, RedfishOptions
from pixiebox.power.base import BaseDriver, PowerState, PowerTarget, read_secret

T = TypeVar("T")


class RedfishDriver(BaseDriver):
    name = "redfish"
    graceful = False

    def __init__(self, target: PowerTarget, options: RedfishOptions) -> None:
        super().__init__(target)
        self.options = options
        self.where = f"Redfish BMC at {urlsplit(options.url).netloc}"

    # -- sushy, in a thread --------------------------------------------------------------

    def _system(self) -> Any:
        options = self.options
        password = read_secret(options.password, options.password_file, self.where)
        connection = sushy.Sushy(
            options.url.rstrip("/") + "/redfish/v1/",
            username=options.username,
            password=password,
            verify=options.verify_tls,
            connect_timeout=min(options.timeout, NETWORK_TIMEOUT),
            read_timeout=options.timeout,
            server_side_retries=1,
            server_side_retries_delay=1,
        )
        wanted = options.system
        if wanted is None:
            members = sorted(connection.get_system_collection().members_identities)
            if len(members) != 1:
                raise self.error(
                    f"{self.where} has {len(members)} systems ({', '.join(members) or 'none'}); "
                    "name one with the system key"
                )
            path = members[0]
        elif wanted.startswith("/"):
            path = wanted
        else:
            path = f"{connection.get_system_collection().path.rstrip('/')}/{wanted}"
        return connection.get_system(path)

    async def _call(self, what: str, function: Callable[[Any], T]) -> T:
        def work() -> T:
            return function(self._system())

        try:
            return await asyncio.wait_for(asyncio.to_thread(work), self.options.timeout * 2 + 5)
        except TimeoutError:
            raise self.error(f"{self.where} did not answer ({what})") from None
        except sushy.exceptions.AccessError:
            raise self.error(
                f"{self.where} refused the credentials ({what}); check username and password"
            ) from None
        except sushy.exceptions.ResourceNotFoundError as exc:
            raise self.error(f"{self.where}: {what}: not found ({exc.message})") from None
        except sushy.exceptions.ConnectionError as exc:
            cause = str(exc.message).split("Error:")[-1].strip()[:200]
            raise self.error(f"unreachable {self.where}: {cause}") from None
        except sushy.exceptions.SushyError as exc:
            raise self.error(f"{self.where} refused {what}: {exc}") from None

    # -- actions -----------------------------------------------------------------------

    def _boot_from_network_once(self, system: Any) -> None:
        if self.options.pxe_once:
            system.set_system_boot_options(
                target=sushy.BootSource.PXE, enabled=sushy.BootSourceOverrideEnabled.ONCE
            )

    async def on(self) -> None:
        def work(system: Any) -> None:
            self._boot_from_network_once(system)
            if system.power_state != sushy.PowerState.ON:
                system.reset_system(sushy.ResetType.ON)

        await self._call("power on", work)

    async def off(self) -> None:
        def work(system: Any) -> None:
            if system.power_state != sushy.PowerState.OFF:
                system.reset_system(sushy.ResetType.FORCE_OFF)

        await self._call("power off", work)

    async def cycle(self) -> None:
        def work(system: Any) -> None:
            self._boot_from_network_once(system)
            if system.power_state == sushy.PowerState.OFF:
                system.reset_system(sushy.ResetType.ON)
            else:
                system.reset_system(sushy.ResetType.FORCE_RESTART)

        await self._call("power cycle", work)

    async def status(self) -> PowerState:
        state = await self._call("power status", lambda system: system.power_state)
        if state == sushy.PowerState.ON:
            return PowerState.ON
        if state == sushy.PowerState.OFF:
            return PowerState.OFF
        return PowerState.UNKNOWN  # powering on or off: not yet either

    async def boot_override(self) -> tuple[str | None, str | None]:
        """(BootSourceOverrideTarget, BootSourceOverrideEnabled) as the BMC reports them."""

        def work(system: Any) -> tuple[str | None, str | None]:
            boot = system.boot
            target = boot.target.value if boot.target is not None else None
            enabled = boot.enabled.value if boot.enabled is not None else None
            return target, enabled

        return await self._call("boot options", work)
