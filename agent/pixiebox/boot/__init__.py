"""Renders a boot decision into what firmware reads after DHCP: iPXE scripts and U-Boot's
pxelinux.cfg files (the same words over TFTP and HTTP).

Imports `pixiebox.config` and `pixiebox.core`; never a server.
"""
