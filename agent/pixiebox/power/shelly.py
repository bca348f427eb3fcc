"""Shelly plugs and relays, by their documented local HTTP APIs.

Gen1 (shelly-api-docs.shelly.cloud/gen1): `GET /relay/<channel>?turn=on|off` and
`GET /relay/<channel>` answer `{"ison": true, ...}`; `/meter/<channel>` has `"power"` (watts)
on devices that measure. HTTP basic auth when a login is set.

Gen2 and later (…/gen2, RPC over HTTP GET): `/rpc/Switch.Set?id=<channel>&on=true|false`
answers `{"was_on": false}`; `/rpc/Switch.GetStatus?id=<channel>` answers `{"id": 0,
"output": true, "apower": 8.9, ...}`. Authentication is HTTP digest with the fixed user "admin".
"""

from __future__ import annotations

from typing import Any

import httpx

from pixiebox.config.power_options import ShellyOptions
from pixiebox.power.base import PowerError, PowerState, PowerTarget, read_secret
from pixiebox.power.plugs import HttpDriverBase, cycle_by_off_on


class ShellyDriver(HttpDriverBase):
    name = "shelly"
    graceful = False

    def __init__(self, target: PowerTarget, options: ShellyOptions) -> None:
        super().__init__(target, options.timeout)
        self.options = options
        self.where = f"Shelly Gen{options.generation} plug at {options.host}"
        self.base = f"http://{options.host}"

    def _auth(self) -> httpx.Auth | None:
        password = read_secret(self.options.password, self.options.password_file, self.where)
        if password is None:
            return None
        if self.options.generation == 1:
            return httpx.BasicAuth(self.options.user, password)
        return httpx.DigestAuth("admin", password)

    async def _get(self, path: str) -> Any:
        response = await self.request("GET", self.base + path, where=self.where, auth=self._auth())
        return self.json_of(response, self.where)

    def _field(self, answer: Any, key: str) -> Any:
        if not isinstance(answer, dict) or key not in answer:
            raise self.error(f"{self.where} answered {answer!r}, without {key!r}")
        return answer[key]

    async def _set(self, on: bool) -> None:
        channel = self.options.channel
        if self.options.generation == 1:
            answer = await self._get(f"/relay/{channel}?turn={'on' if on else 'off'}")
            if self._field(answer, "ison") is not on:
                raise self.error(
                    f"{self.where} was told to turn {'on' if on else 'off'} but reports "
                    f"ison={answer.get('ison')!r}"
                )
        else:
            answer = await self._get(f"/rpc/Switch.Set?id={channel}&on={'true' if on else 'false'}")
            self._field(answer, "was_on")

    async def on(self) -> None:
        await self._set(True)

    async def off(self) -> None:
        await self._set(False)

    async def cycle(self) -> None:
        await cycle_by_off_on(self, self.options.cycle_wait)

    async def status(self) -> PowerState:
        channel = self.options.channel
        if self.options.generation == 1:
            value = self._field(await self._get(f"/relay/{channel}"), "ison")
        else:
            value = self._field(await self._get(f"/rpc/Switch.GetStatus?id={channel}"), "output")
        if not isinstance(value, bool):
            raise self.error(f"{self.where} reports a relay state of {value!r}")
        return PowerState.ON if value else PowerState.OFF

    async def power_watts(self) -> float | None:
        """The relay's power reading (None on devices that do not measure)."""
        channel = self.options.channel
        if self.options.generation == 1:
            try:
                answer = await self._get(f"/meter/{channel}")
            except PowerError:  # a Shelly 1 has no /meter: 404
                return None
            value = answer.get("power") if isinstance(answer, dict) else None
        else:
            answer = await self._get(f"/rpc/Switch.GetStatus?id={channel}")
            value = answer.get("apower") if isinstance(answer, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return None
