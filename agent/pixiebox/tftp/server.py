"""TftpServer: the TFTP engine serving boot files (tftp.files), as the agent starts it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pixiebox.net.paths import Place
from pixiebox.tftp.engine import TFTP_PORT, TftpEngine
from pixiebox.tftp.files import BootFiles, Generate, places_for
from pixiebox.tftp.limits import TftpLimits
from pixiebox.tftp.outcome import TftpEvent


class TftpServer(TftpEngine):
    """Serves `root` (and `fallback_dirs`) read-only over TFTP until `close()`.

    `fallback_dirs`: places searched in order when a file is not under `root`, as
    net.paths.Place or (prefix, directory) pairs; a request "ipxe/undionly.kpxe" or
    "undionly.kpxe" finds directory/undionly.kpxe for ("ipxe/", directory). A pair's directory
    outside `root` is a package directory (tftp.files.places_for). `generate(path, client_ip)`
    may return the content of a file that is on no disk (U-Boot's pxelinux.cfg/01-<mac>), or
    None. `limits`: [tftp] in lab.toml (tftp.limits). Everything runs on the event loop that
    ran `start()`: `on_event` is called there, once per request outcome, and `close()` (or
    `aclose()`) must be called there too; the outcomes of the transfers it ends are handed to
    `on_event` before it returns."""

    def __init__(
        self,
        root: Path,
        *,
        listen_ip: str = "0.0.0.0",
        port: int = TFTP_PORT,
        interface: str | None = None,
        fallback_dirs: Sequence[tuple[str, Path] | Place] = (),
        on_event: Callable[[TftpEvent], None] | None = None,
        generate: Generate | None = None,
        describe: Callable[[str], str] = str,
        limits: TftpLimits | None = None,
    ) -> None:
        self.root = Path(root)
        self.files = BootFiles(places_for(self.root, fallback_dirs), generate)
        super().__init__(
            self.files,
            listen_ip=listen_ip,
            port=port,
            interface=interface,
            on_event=on_event,
            describe=describe,
            limits=limits,
        )

    async def start(self) -> None:
        """Bind the socket and start serving; returns once requests are being received."""
        if not self._closed and self._loop is None and not self.root.is_dir():
            raise FileNotFoundError(f"TFTP root {self.root} is not a directory")
        await super().start()
