"""The core: who a machine is, what it should boot, and what happened to it.

The one boot decision every protocol asks (`inventory`), the firmware table (`firmware`), the
addresses machines are told (`urls`), each machine's lifecycle and event log (`lifecycle`).
Imports only `pixiebox.config` (the schema) and `pixiebox.store`; never a protocol package.
"""
