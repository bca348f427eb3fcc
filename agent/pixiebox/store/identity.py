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
one reads what the first wrote.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pixiebox.config import normalize_mac

log = logging.getLogger("pixiebox.store.identity")

HOST_KEY_FILE = "ssh_host_ed25519_key"
HOST_PUBLIC_FILE = "ssh_host_ed25519_key.pub"
NODE_PASSWORD_FILE = "k3s-node-password"
AGENT_TOKEN_FILE = "k3s-agent-token"

DIR_MODE = 0o700
FILE_MODE = 0o600

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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_mode(path: Path, mode: int) -> None:
    """Tighten permissions that someone loosened (a copy, a restore from backup)."""
    current = stat.S_IMODE(path.stat().st_mode)
    if current != mode:
        os.chmod(path, mode)
        log.warning("%s had mode %o; set it back to %o", path, current, mode)


def create_file_once(path: Path, text: str) -> bool:
    """Write `text` to `path` unless it exists: whole or not at all, mode 0600.

    True when this call created the file, False when another writer got there first (then
    theirs stands: an identity handed out once must never change)."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, FILE_MODE)  # O_CREAT's mode is filtered by the umask
        try:
            os.link(temp, path)  # unlike rename, never replaces an existing file
        except FileExistsError:
            return False
        except OSError:
            # A file system without hard links: rename, which the store's lock serialises
            # within this agent (and only one agent owns a state directory).
            if path.exists():
                return False
            os.replace(temp, path)
        _fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


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
                path.parent.mkdir(parents=True, exist_ok=True)
                token, made = _secret(
                    path, new_agent_token, AGENT_TOKEN, "a k3s agent token",
                    "delete it and restart both the agent and the k3s server so that a new one "
                    "is made and every node rejoins with it",
                )  # fmt: skip
                if made:
                    log.info("made the lab's k3s agent token in %s", path)
                _ensure_mode(path, FILE_MODE)
                self._agent_token = token
            return self._agent_token

    def directory(self, mac: str) -> Path:
        """Where `mac`'s identity lives (the MAC is normalised: it is part of a path)."""
        return self.root / normalize_mac(mac)

    def for_machine(self, mac: str) -> NodeIdentity:
        """`mac`'s identity, made now if it has none. Raises ValueError for a string that is
        not a MAC address, IdentityError when a stored file is unusable."""
        mac = normalize_mac(mac)
        with self._lock:
            found = self._cache.get(mac)
            if found is None:
                found = self._cache[mac] = self._load_or_create(mac)
            return found

    def _make_dir(self, path: Path) -> None:
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass
        else:
            _fsync_dir(path.parent)
        _ensure_mode(path, DIR_MODE)

    def _load_or_create(self, mac: str) -> NodeIdentity:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self._make_dir(self.root)
        directory = self.root / mac
        self._make_dir(directory)
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
            _ensure_mode(path, FILE_MODE)
        if made:
            log.info("made %s for %s in %s", " and ".join(made), mac, directory)
        return NodeIdentity(mac, private, public, password)
