"""The core: who a machine is, what it should boot, and what happened to it.

The one boot decision every protocol asks (`decision`, side-effect free), how the agent knows
who is at an address (`evidence`), the lab as the protocols see it (`inventory`: the decision
under the current lab.toml, machines seen, address evidence), the firmware table (`firmware`),
the addresses machines are told (`urls`), each machine's lifecycle and event log (`lifecycle`).
Imports only `pixiebox.config` (the schema), `pixiebox.store` and `pixiebox.net` (the kernel's
neighbour table, the path confinement rule); never a protocol package.
"""
