"""Plumbing shared by the protocol servers: the lab interface's addresses and neighbours,
and which files a client's name may reach under a served directory (`paths`, for TFTP and
boot HTTP alike), the UDP sockets and batched datagram listener of DHCP, DNS and syslog
(`udp`), and what an outsider can make the servers hold, bounded (`limits`: connections per
source and in total, the open-file limit, accept(2) out of descriptors, log lines per kind).

Imports nothing of pixiebox.
"""
