"""Graceful off and reboot through the node's own OS: `poweroff` / `reboot` over SSH (asyncssh).

The appliance logs in as root with its own key, `[state] dir/power/id_ed25519`, made on first
use; every node lets that key in because the metadata lists it beside the user's keys (see
metadata.py). The node's host key is not learned on first contact but known in advance: it is
the stable host key the appliance itself hands the node (identity.py), so a mismatch means
another machine answers at that address, and nothing is run there.

A node that powers off drops the connection before `poweroff` can report its exit status; that
is success. Whether it really went down is for the controller to see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import asyncssh

from pixiebox.config.power_options import SshOptions
from pixiebox.power.base import BaseDriver, PowerAction, PowerTarget, describe
from pixiebox.store.private import FILE_MODE, create_file_once, private_dir, tighten

log = logging.getLogger("pixiebox.power.ssh")

KEY_DIR = "power"
KEY_FILE = "id_ed25519"
KEY_COMMENT = "pixiebox-power"

#: How long `poweroff`/`reboot` may take to answer before the drop counts as it having run.
COMMAND_TIMEOUT = 20.0


def power_key_path(state_dir: Path) -> Path:
    return Path(state_dir) / KEY_DIR / KEY_FILE


def power_key(state_dir: Path) -> asyncssh.SSHKey:
    """The appliance's power SSH key (ed25519, file 0600 in a 0700 directory), made once."""
    path = power_key_path(state_dir)
    private_dir(path.parent)
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment=KEY_COMMENT)
        if create_file_once(path, key.export_private_key().decode("ascii")):
            log.info("made the appliance's power SSH key %s", path)
    try:
        tighten(path, FILE_MODE)  # it logs in as root on every node: for no one else's eyes
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise OSError(
            f"cannot read the power SSH key {path}: {describe(exc)}; move it away and a new "
            "one is made (the nodes learn it on their next boot)"
        ) from None


def power_public_key(state_dir: Path) -> str:
    """The public line of the appliance's power key, for the nodes' authorized keys."""
    key = power_key(state_dir)
    return key.export_public_key("openssh").decode("ascii").strip()


class SshDriver(BaseDriver):
    name = "ssh"
    actions = frozenset({PowerAction.OFF, PowerAction.CYCLE})
    graceful = True

    def __init__(self, target: PowerTarget, options: SshOptions) -> None:
        super().__init__(target)
        self.options = options

    @property
    def host(self) -> str:
        if self.options.host:
            return self.options.host
        if self.target.ip is None:
            raise self.error(
                "the machine has no ip in lab.toml to log in to; add ip, or host to its ssh power"
            )
        return str(self.target.ip)

    def _known_host_key(self) -> asyncssh.SSHKey:
        text = self.options.host_key or self.target.ssh_host_public
        if not text:
            raise self.error(
                "no known SSH host key for this machine yet (it gets one with its first "
                "metadata); refusing to log in to an unverified host"
            )
        try:
            return asyncssh.import_public_key(text)
        except asyncssh.KeyImportError as exc:
            raise self.error(f"its known SSH host key cannot be read: {exc}") from None

    async def _connect(self) -> asyncssh.SSHClientConnection:
        host, port = self.host, self.options.port
        where = f"{self.options.user}@{host}:{port}"
        try:
            key = await asyncio.to_thread(power_key, self.target.state_dir)
        except OSError as exc:
            raise self.error(str(exc)) from None
        try:
            return await asyncio.wait_for(
                asyncssh.connect(
                    host,
                    port,
                    username=self.options.user,
                    client_keys=[key],
                    known_hosts=([self._known_host_key()], [], []),
                    agent_path=None,
                    config=[],
                    preferred_auth="publickey",
                    connect_timeout=self.options.timeout,
                    login_timeout=self.options.timeout,
                ),
                self.options.timeout + 1,
            )
        except asyncssh.HostKeyNotVerifiable:
            raise self.error(
                f"the SSH host key at {host} is not {self.target.name}'s (another machine at "
                "that address, or a node not booted by this appliance); nothing was run"
            ) from None
        except asyncssh.PermissionDenied:
            raise self.error(
                f"{where} refused the appliance's power key; the node lets it in from its "
                f"metadata (its authorized keys), or add the key from {self.key_hint()}"
            ) from None
        except TimeoutError:
            raise self.error(
                f"cannot reach {where}: no answer within {self.options.timeout:g} s"
            ) from None
        except (OSError, asyncssh.Error) as exc:
            raise self.error(f"cannot reach {where}: {describe(exc)}") from None

    def key_hint(self) -> str:
        return str(power_key_path(self.target.state_dir)) + ".pub"

    async def _run(self, command: str) -> None:
        connection = await self._connect()
        try:
            result = await asyncio.wait_for(connection.run(command, check=False), COMMAND_TIMEOUT)
        except (asyncssh.ConnectionLost, asyncssh.DisconnectError, OSError, EOFError):
            log.info("%s: the connection dropped during %r, as it does", self.target.name, command)
            return
        except TimeoutError:
            log.info("%s: %r sent; no exit status within %g s", self.target.name, command,
                     COMMAND_TIMEOUT)  # fmt: skip
            return
        finally:
            connection.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.wait_closed(), 5)
        if result.exit_status not in (0, None):  # None: killed by the shutdown itself
            output = str(result.stderr or result.stdout or "").strip()[-300:]
            raise self.error(
                f"{command!r} on {self.host} failed (exit {result.exit_status}): {output}"
            )

    async def off(self) -> None:
        await self._run(self.options.off_command)

    async def cycle(self) -> None:
        await self._run(self.options.cycle_command)
