"""Plumbing shared by the protocol servers: the lab interface's addresses and neighbours,
and which files a client's name may reach under a served directory (`paths`, for TFTP and
boot HTTP alike), and the UDP sockets and batched datagram listener of DHCP, DNS and syslog
(`udp`).

Imports nothing of pixiebox.
"""
