"""DHCP for PXE: a packet codec, the boot-file policy, and one handler per mode."""
