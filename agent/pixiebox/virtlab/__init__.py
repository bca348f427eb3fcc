"""The virtual lab: network namespaces, a home router (dnsmasq), QEMU machines (BIOS and UEFI),
a Wake-on-LAN responder, and the demo (`pixiebox demo`) that shows each machine's boot stages
live from the agent's event stream, with its dashboard forwarded to the host's loopback
(`forward`). The VM tests use the same machinery, so the demo is what the tests prove; the
browser tests and the dashboard benchmark drive Debian's Chromium inside a namespace (`chromium`).

May import config, events, client (the event follower) and power (the qemu driver's options);
never the agent's servers: the demo runs the agent as a process, as a user would.
"""
