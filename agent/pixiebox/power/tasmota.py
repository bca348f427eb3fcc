"""Tasmota plugs: commands over HTTP, `GET /cm?cmnd=Power%20On` (tasmota.github.io/docs/Commands).

With a web password set, Tasmota takes the credentials as `user` and `password` query
parameters (not HTTP auth). The answer is JSON: `{"POWER": "ON"}`, or `{"POWER2": "OFF"}` for
the second relay of a multi-relay device. `Status 8` reports the energy sensor of plugs that
have one: `{"StatusSNS": {"ENERGY": {"Power": 4.2, ...}}}`.
"""

from __future__ import annotations

from urllib.parse import quote

from pixiebox.config.power_options import TasmotaOptions
from pixiebox.power.base import PowerState, PowerTarget, read_secret
from pixiebox.power.plugs import HttpDriverBase, cycle_by_off_on


class TasmotaDriver(HttpDriverBase):
    name = "tasmota"
    graceful = False

    def __init__(self, target: PowerTarget, options: TasmotaOptions) -> None:
        super().__init__(target, options.timeout)
        self.options = options
        self.where = f"Tasmota plug at {options.host}"

    def _command_url(self, command: str) -> str:
        query = ""
        password = read_secret(self.options.password, self.options.password_file, f"{self.where}")
        if password is not None:
            query = f"user={quote(self.options.user, safe='')}&password={quote(password, safe='')}&"
        return f"http://{self.options.host}/cm?{query}cmnd={quote(command, safe='')}"

    @property
    def _power(self) -> str:
        return f"Power{self.options.relay}" if self.options.relay else "Power"

    async def command(self, command: str) -> object:
        response = await self.request("GET", self._command_url(command), where=self.where)
        return self.json_of(response, self.where)

    def _state_of(self, answer: object) -> PowerState:
        if isinstance(answer, dict):
            keys = [self._power.upper(), "POWER"] if self.options.relay else ["POWER", "POWER1"]
            for key in keys:
                value = answer.get(key)
                if isinstance(value, str) and value.upper() in ("ON", "OFF"):
                    return PowerState(value.lower())
        raise self.error(f"{self.where} answered {answer!r}, which holds no POWER state")

    async def _set(self, state: str) -> None:
        answer = await self.command(f"{self._power} {state}")
        seen = self._state_of(answer)
        if seen.value != state.lower():
            raise self.error(f"{self.where} was told {state} but reports {seen.value}")

    async def on(self) -> None:
        await self._set("On")

    async def off(self) -> None:
        await self._set("Off")

    async def cycle(self) -> None:
        await cycle_by_off_on(self, self.options.cycle_wait)

    async def status(self) -> PowerState:
        return self._state_of(await self.command(self._power))

    async def power_watts(self) -> float | None:
        """The plug's power reading, or None for a plug without an energy sensor."""
        answer = await self.command("Status 8")
        if isinstance(answer, dict):
            sensors = answer.get("StatusSNS")
            energy = sensors.get("ENERGY") if isinstance(sensors, dict) else None
            power = energy.get("Power") if isinstance(energy, dict) else None
            if isinstance(power, list) and power:  # one reading per relay
                index = (self.options.relay or 1) - 1
                power = power[index] if index < len(power) else None
            if isinstance(power, int | float) and not isinstance(power, bool):
                return float(power)
        return None
