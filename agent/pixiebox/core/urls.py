"""The appliance's boot URLs, built in one place so that what DHCP hands out and what the HTTP
server answers can never drift apart."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from urllib.parse import quote


@dataclass(frozen=True, slots=True)
class BootUrls:
    server_ip: IPv4Address
    port: int = 80

    @property
    def base(self) -> str:
        # No port for 80: some UEFI HTTP boot clients mishandle an explicit ":80".
        port = "" if self.port == 80 else f":{self.port}"
        return f"http://{self.server_ip}{port}"

    def script(self, mac: str) -> str:
        """The per-machine iPXE script (what an iPXE client is told to chain)."""
        return f"{self.base}/boot/{mac}.ipxe"

    def asset(self, path: str) -> str:
        """A file under [boot] assets (kernels, initrds)."""
        return f"{self.base}/assets/{quote(path.lstrip('/'))}"

    def ipxe_binary(self, name: str) -> str:
        """An iPXE build over HTTP, for UEFI HTTP boot clients."""
        return f"{self.base}/ipxe/{quote(name)}"

    def ssh_keys(self) -> str:
        return f"{self.base}/ssh.keys"
