"""DHCP for PXE: a packet codec, the boot-file policy, and one handler per mode.

`codec` (RFC 2131/2132 packets and options), `policy` (what a boot client is, which file or
script URL it gets, the boot options and the events' fields), `server` (the sockets, batches,
and the `Handler` protocol every mode implements), `triage` (under overload the lab's machines
first, strangers newest first, the rest shed), `proxy`, `reservation`, `full` (one handler
per `[network] dhcp_mode`), `leases` (the address book of reservation and full mode), `guard`
(another DHCP server on the segment stops the agent from starting in those modes).

Handlers ask the boot decision (core.inventory.BootBackend) and only render it. May import
config, core, events, net, store.
"""
