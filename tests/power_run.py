"""Run one power driver action, for tests that need the driver inside a network namespace.

    python power_run.py ACTION SPEC_JSON TARGET_JSON

SPEC_JSON is one `power = {...}` entry of lab.toml, TARGET_JSON the PowerTarget's fields.
Prints one JSON line: {"ok": true, "state": "on"|"off"|"unknown"|null} or
{"ok": false, "error": "<the PowerError's sentence>"}; exits 0 either way (a traceback means
a bug, exit 1).
"""

from __future__ import annotations

import asyncio
import json
import sys
from ipaddress import IPv4Address
from pathlib import Path

from pixiebox.config import PowerSection
from pixiebox.power import PowerError, PowerTarget, make_driver


async def run(
    action: str, spec: dict[str, object], fields: dict[str, str | None]
) -> dict[str, object]:
    target = PowerTarget(
        name=str(fields["name"]),
        mac=str(fields["mac"]),
        ip=IPv4Address(fields["ip"]) if fields.get("ip") else None,
        interface=str(fields.get("interface") or "eth0"),
        broadcast=IPv4Address(fields["broadcast"]) if fields.get("broadcast") else None,
        state_dir=Path(str(fields["state_dir"])),
        ssh_host_public=fields.get("ssh_host_public"),
    )
    try:
        driver = make_driver(PowerSection.model_validate(spec), target)
        if action == "status":
            return {"ok": True, "state": (await driver.status()).value}
        await getattr(driver, action)()
        return {"ok": True, "state": None}
    except PowerError as exc:
        return {"ok": False, "error": str(exc)}


def main() -> int:
    action, spec, target = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    print(json.dumps(asyncio.run(run(action, spec, target))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
