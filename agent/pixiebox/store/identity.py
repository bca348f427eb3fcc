"""Stable identities for machines that keep nothing: their SSH host key and k3s node password.

A node that boots from RAM every morning would otherwise make a new SSH host key each time
(every `ssh` then warns that the host key changed) and a new k3s node password, which the k3s
server refuses for a node name it already knows (it keeps each node's password as a secret and
asks for the same one when the name registers again), so the node could not come back as itself.
So the appliance, the one machine with a disk, makes both once per MAC and hands the same ones
back on every boot, through the machine's metadata (see metadata.py).

On disk, under [state] dir/identity/<mac>/ (directory 0700, files 0600):

- `ssh_host_ed25519_key`      the host key, OpenSSH private-key format (what sshd reads);
- `ssh_host_ed25519_key.pub`  its public line (derived from the private key when missing);
- `k3s-node-password`         the node's k3s password (the OSIE writes it to
                              /etc/rancher/node/password, where the k3s agent looks for it).

And one for the whole lab, [state] dir/k3s-agent-token (0600): the token every node's k3s agent
joins with; the appliance's k3s server reads the same file (`--agent-token-file`).

Each file is written whole to a temporary name, fsynced and then linked into place, so that a
power cut leaves either no file or a complete one, and two writers cannot both win: the second
one reads what the first wrote. The modes hold whatever the umask (store.private); the agent
sets loosened ones back when it starts (`tighten_existing`).
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pixiebox.config.values import unicast_mac
from pixiebox.store.private import (
    DIR_MODE,
    FILE_MODE,
    create_file_once,
    private_dir,
    tighten,
)

log = logging.getLogger("pixiebox.store.identity")

#: Where identities live under [state] dir (the agent's store; the demo reads host keys there).
IDENTITY_DIR = "identity"
HOST_KEY_FILE = "ssh_host_ed25519_key"
HOST_PUBLIC_FILE = "ssh_host_ed25519_key.pub"
NODE_PASSWORD_FILE = "k3s-node-password"
AGENT_TOKEN_FILE = "k3s-agent-token"

#: What a stored node password may look like: k3s compares it as an opaque string; this shape
#: keeps it one plain word in a file or a YAML line. Made as 32 hex digits.
NODE_PASSWORD = re.compile(r"[A-Za-z0-9._-]{16,256}")
#: The lab's k3s agent token: k3s takes any string without "::" (which separates the CA hash
#: and the credentials of a full token); made as 64 hex digits.
AGENT_TOKEN = re.compile(r"[A-Za-z0-9._-]{16,256}")


class IdentityError(Exception):
    """A stored identity cannot be used; the message names the file and what to do."""


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """What one machine needs to come back as itself."""

    mac: str
    ssh_host_key: str  # OpenSSH private key ("-----BEGIN OPENSSH PRIVATE KEY-----...")
    ssh_host_public: str  # "ssh-ed25519 AAAA..."
    node_password: str  # 32 hex digits, /etc/rancher/node/password on the node

    def __repr__(self) -> str:
        # Never put the secrets into a log line or a traceback by accident.
        return f"NodeIdentity(mac={self.mac!r}, ssh_host_public={self.ssh_host_public!r})"


def new_node_password() -> str:
    """A fresh k3s node password (128 random bits in hex, as k3s makes its own)."""
    return secrets.token_hex(16)


def new_agent_token() -> str:
    """A fresh lab-wide k3s agent token (256 random bits in hex)."""
    return secrets.token_hex(32)


def new_host_key() -> str:
    """A fresh ed25519 host key in OpenSSH private-key format, as sshd reads it."""
    key = Ed25519PrivateKey.generate()
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return data.decode("ascii")


def public_line(private_key: str, where: Path | None = None) -> str:
    """The `ssh-ed25519 AAAA...` line of an OpenSSH ed25519 private key."""
    try:
        key = serialization.load_ssh_private_key(private_key.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise IdentityError(
            f"{where or 'the host key'} is not an unencrypted OpenSSH private key ({exc}); "
            "move it away and a new host key is made on the next request"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(
            f"{where or 'the host key'} is not an ed25519 key; move it away and a new host key "
            "is made on the next request"
        )
    data = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return data.decode("ascii")


def _secret(
    path: Path, make: Callable[[], str], pattern: re.Pattern[str], what: str, remedy: str
) -> tuple[str, bool]:
    """The secret in `path`, made by `make` if the file does not exist yet (whoever creates it
    first wins, see `create_file_once`); (secret, True when this call made it). A file that does
    not hold one is an error that says how to recover, never silently replaced: nodes and the
    k3s server already trust what is in it."""
    text = _read(path)
    made = False
    if text is None:
        made = create_file_once(path, make())
        text = _read(path)
        assert text is not None
    secret = text.strip()
    if not pattern.fullmatch(secret):
        raise IdentityError(
            f"{path} does not hold {what} (16 to 256 letters, digits, '.', '_' or '-'); fix it, "
            f"or {remedy}"
        )
    return secret, made


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read {path}: {exc}") from None


class IdentityStore:
    """Per-MAC SSH host keys and k3s node passwords under `root` (normally [state] dir/identity),
    and the lab's k3s agent token in `agent_token_file` (default: beside `root`).

    `for_machine` creates a machine's identity on first use and returns the same one ever
    after, also across agent restarts; `agent_token` likewise. Safe to call from several
    threads."""

    def __init__(self, root: Path, agent_token_file: Path | None = None) -> None:
        self.root = Path(root)
        self.agent_token_file = (
            Path(agent_token_file) if agent_token_file else self.root.parent / AGENT_TOKEN_FILE
        )
        self._lock = threading.Lock()
        self._cache: dict[str, NodeIdentity] = {}
        self._agent_token: str | None = None

    def agent_token(self) -> str:
        """The lab's k3s agent token, made on first use (0600). The appliance's k3s server reads
        the same file with `--agent-token-file`, so whichever starts first makes it and the
        other reads it (files are created whole and never replaced, see `create_file_once`)."""
        with self._lock:
            if self._agent_token is None:
                path = self.agent_token_file
                private_dir(path.parent, tighten_existing=False)  # [state] dir: StateStore's
                token, made = _secret(
                    path, new_agent_token, AGENT_TOKEN, "a k3s agent token",
                    "delete it and restart both the agent and the k3s server so that a new one "
                    "is made and every node rejoins with it",
                )  # fmt: skip
                if made:
                    log.info("made the lab's k3s agent token in %s", path)
                tighten(path, FILE_MODE)
                self._agent_token = token
            return self._agent_token

    def directory(self, mac: str) -> Path:
        """Where `mac`'s identity lives (the MAC is normalised: it is part of a path)."""
        return self.root / unicast_mac(mac)

    def for_machine(self, mac: str) -> NodeIdentity:
        """`mac`'s identity, made now if it has none. Raises ValueError for a string that is
        not a machine's MAC (malformed, multicast, broadcast or zero: no identity is ever made
        for an address that stands for many machines or none), IdentityError when a stored
        file is unusable."""
        mac = unicast_mac(mac)
        with self._lock:
            found = self._cache.get(mac)
            if found is None:
                found = self._cache[mac] = self._load_or_create(mac)
            return found

    def tighten_existing(self) -> None:
        """Set every stored identity file back to 0600 and its directories to 0700, the agent
        token file too (the agent calls this at start: a copy or a restore from backup loosens
        modes; `for_machine` does it again for each machine it loads). Makes nothing; a file it
        cannot change is logged, not fatal: the lab keeps booting."""
        with self._lock:
            for path, mode in self._stored():
                try:
                    tighten(path, mode)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.warning("cannot set %s to mode %o: %s", path, mode, exc.strerror)

    def _stored(self) -> Iterator[tuple[Path, int]]:
        yield self.agent_token_file, FILE_MODE
        if not self.root.is_dir():
            return
        yield self.root, DIR_MODE
        for directory in self.root.iterdir():
            if directory.is_symlink() or not directory.is_dir():
                continue
            yield directory, DIR_MODE
            for path in directory.iterdir():
                if path.is_file() and not path.is_symlink():
                    yield path, FILE_MODE

    def _load_or_create(self, mac: str) -> NodeIdentity:
        private_dir(self.root)
        directory = private_dir(self.root / mac)
        made: list[str] = []

        key_path = directory / HOST_KEY_FILE
        private = _read(key_path)
        if private is None:
            if create_file_once(key_path, new_host_key()):
                made.append("an SSH host key")
            private = _read(key_path)
            assert private is not None
        public = public_line(private, key_path)

        public_path = directory / HOST_PUBLIC_FILE
        stored_public = _read(public_path)
        if stored_public is None:
            create_file_once(public_path, public + "\n")
        elif stored_public.split()[:2] != public.split()[:2]:
            raise IdentityError(
                f"{public_path} does not belong to the private key {key_path}; delete the .pub "
                "file and it is written again from the private key"
            )

        password_path = directory / NODE_PASSWORD_FILE
        password, made_password = _secret(
            password_path, lambda: new_node_password() + "\n", NODE_PASSWORD,
            "a k3s node password",
            "delete it and a new one is made on the next request (then delete the node's "
            "<name>.node-password.k3s secret in kube-system, or the k3s server refuses the node "
            "under its old name)",
        )  # fmt: skip
        if made_password:
            made.append("a k3s node password")

        for path in (key_path, public_path, password_path):
            tighten(path, FILE_MODE)
        if made:
            log.info("made %s for %s in %s", " and ".join(made), mac, directory)
        return NodeIdentity(mac, private, public, password)
