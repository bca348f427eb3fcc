"""What the smart-plug drivers share: one bounded HTTP exchange with a plug, and its errors.

Smart plugs are how people power BMC-less NUCs: the NUC's BIOS is set to "power on after AC
loss", so cutting and restoring the plug's relay is a power button. The drivers speak each
vendor's documented local HTTP API (no cloud), through httpx.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from pixiebox.power.base import BaseDriver, PowerTarget, describe


class HttpDriverBase(BaseDriver):
    """One request per call, with a bounded timeout and errors that name the plug."""

    def __init__(self, target: PowerTarget, timeout: float, verify_tls: bool = True) -> None:
        super().__init__(target)
        self.timeout = timeout
        self.verify_tls = verify_tls

    async def request(
        self,
        method: str,
        url: str,
        *,
        where: str,
        auth: httpx.Auth | None = None,
        content: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """The plug's answer to `method url`; PowerError unless it is a 2xx.

        `where` names the peer in errors ("plug at 10.0.0.5"); credentials in the URL's query
        (Tasmota puts them there) never appear in an error."""
        try:
            async with httpx.AsyncClient(
                timeout=self.timeout, verify=self.verify_tls, follow_redirects=False
            ) as client:
                response = await asyncio.wait_for(
                    client.request(method, url, auth=auth, content=content, headers=headers),
                    self.timeout + 1,
                )
        except (httpx.TimeoutException, TimeoutError):
            raise self.error(f"unreachable {where}: no answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise self.error(f"unreachable {where}: {describe(_root_cause(exc))}") from None
        if response.status_code in (401, 403):
            raise self.error(
                f"{where} refused the credentials (HTTP {response.status_code}); "
                "check user and password for this machine in lab.toml"
            )
        if not 200 <= response.status_code < 300:
            raise self.error(
                f"{where} answered HTTP {response.status_code} to {method} "
                f"{_without_query(url)}: {response.text.strip()[:200]}"
            )
        return response

    def json_of(self, response: httpx.Response, where: str) -> Any:
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self.error(
                f"{where} did not answer JSON: {response.text.strip()[:200]!r}"
            ) from None


def _root_cause(exc: BaseException) -> BaseException:
    """The OS error under httpx's wrappers ("connection refused", not "All connection
    attempts failed"), else the exception itself."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and (seen.errno or seen.strerror):
            return seen
        nested = getattr(seen, "exceptions", None)  # anyio's exception groups
        if nested:
            seen = nested[0]
            continue
        seen = seen.__cause__ or seen.__context__
    return exc


def _without_query(url: str) -> str:
    return url.split("?", 1)[0]


async def cycle_by_off_on(driver: BaseDriver, wait: float) -> None:
    """Power cycle as a person does it at the plug: off, wait, on."""
    await driver.off()
    await asyncio.sleep(wait)
    await driver.on()
