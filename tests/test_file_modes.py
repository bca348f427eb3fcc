"""Every file the agent writes that holds state or secrets is 0600, every directory it makes for
them 0700, whatever the umask it runs with (issue 12): the state database and SQLite's -wal and
-shm beside it, the identity store, the k3s agent token, the API token, the power SSH key. A
file someone loosened (a copy, a restore from backup) is set back when the agent starts.

In process with umask 000 for each writer, then the real agent (`pixiebox serve`) started with
umask 000 in a network namespace, enrolling a machine through its API.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import netlab
import pytest
from agentproc import READY, RunningAgent, lab_toml
from pixiebox.http.api import ensure_token
from pixiebox.power.ssh import power_key_path, power_public_key
from pixiebox.store.identity import (
    AGENT_TOKEN_FILE,
    HOST_KEY_FILE,
    NODE_PASSWORD_FILE,
    IdentityStore,
)
from pixiebox.store.private import private_dir, private_file, replace_file
from pixiebox.store.state import StateStore

SUBNET = "10.86.0.0/24"
AGENT_IP = "10.86.0.2"
MAC = "02:00:00:00:86:01"
ENROLLED = "02:00:00:00:86:09"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def loose_modes(*roots: Path) -> dict[str, str]:
    """Every file (not 0600) and directory (not 0700) under and including `roots`."""
    found: dict[str, str] = {}
    for root in roots:
        paths = [root, *root.rglob("*")] if root.is_dir() else [root]
        for path in paths:
            wanted = 0o700 if path.is_dir() else 0o600
            if mode_of(path) != wanted:
                found[str(path)] = oct(mode_of(path))
    return found


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# --- each writer, in process ------------------------------------------------------------------


def test_every_writer_makes_private_files_under_umask_000(tmp_path: Path, umask_000: None) -> None:
    state = tmp_path / "var" / "state"  # "var" is missing too: made 0700 as well
    store = StateStore(state)
    store.record_seen(MAC, "x86_64", "BIOS")
    identities = IdentityStore(state / "identity")
    identities.for_machine(MAC)
    identities.agent_token()
    power_public_key(state)
    token = tmp_path / "etc" / "pixiebox" / "api-token"
    ensure_token(token)
    try:
        # WAL mode: the -wal and -shm files exist while the database is open.
        for suffix in ("", "-wal", "-shm"):
            assert (state / f"pixiebox.db{suffix}").exists(), suffix
        assert (state / AGENT_TOKEN_FILE).exists()
        assert power_key_path(state).exists()
        assert loose_modes(tmp_path / "var", tmp_path / "etc") == {}
    finally:
        store.close()


def test_loosened_files_are_set_back(tmp_path: Path) -> None:
    state = tmp_path / "state"
    StateStore(state).close()
    identities = IdentityStore(state / "identity")
    identities.for_machine(MAC)
    identities.agent_token()
    power_public_key(state)
    token = tmp_path / "api-token"
    ensure_token(token)
    for path in [state, *state.rglob("*"), token]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert len(loose_modes(state, token)) > 8
    StateStore(state).close()
    IdentityStore(state / "identity").tighten_existing()
    power_public_key(state)
    ensure_token(token)
    assert loose_modes(state, token) == {}


def test_a_shared_parent_is_left_as_it_is(tmp_path: Path, umask_000: None) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    ensure_token(shared / "api-token")
    private_dir(shared / "state" / "deeper")
    assert mode_of(shared) == 0o755
    assert loose_modes(shared / "state", shared / "api-token") == {}


def test_private_file_and_replace_file(tmp_path: Path, umask_000: None) -> None:
    path = tmp_path / "f"
    assert private_file(path) is True
    assert mode_of(path) == 0o600 and path.read_bytes() == b""
    path.write_text("kept")
    path.chmod(0o666)
    assert private_file(path) is False
    assert (mode_of(path), path.read_text()) == (0o600, "kept")
    replace_file(path, "new\n")
    assert (mode_of(path), path.read_text()) == (0o600, "new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no temp file left


# --- the real agent, umask 000 ----------------------------------------------------------------


def start_with_umask_000(host: netlab.Host, config: Path) -> RunningAgent:
    """agentproc's agent, started through `sh -c 'umask 000; exec ...'`."""
    agent = RunningAgent(host, config)
    agent.log = host.log_path("agent")
    argv = ["sh", "-c", 'umask 000; exec "$@"', "sh", sys.executable, "-m", "pixiebox.cli",
            "serve", "--config", str(config), "--log-level", "debug"]  # fmt: skip
    agent.proc = host.popen(argv, agent.log)
    agent.wait_log(READY, 20)
    return agent


def test_the_agent_under_umask_000_writes_only_private_files(
    netlab_require: object, segment: netlab.Segment, workdir: Path
) -> None:
    netlab_require("curl")  # type: ignore[operator]
    state = workdir / "state"
    token = workdir / "secrets" / "api-token"
    text = lab_toml(mode="proxy", subnet=SUBNET, assets=workdir / "assets", state=state,
                    machines=[("c1", MAC, None)])  # fmt: skip
    text = text.replace(
        "[http]",
        f'[api]\nlisten = "0.0.0.0:8080"\ntoken_file = "{token}"\n'
        f'[kubernetes]\nserver = "https://{AGENT_IP}:6443"\n[http]',
    )
    config = workdir / "lab.toml"
    config.write_text(text)
    host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
    agent = start_with_umask_000(host, config)
    url = f"http://127.0.0.1:8080/api/v1/machines/{ENROLLED}/enroll"
    enroll = host.run(["curl", "-sS", "-X", "POST", "-H",
                       f"Authorization: Bearer {token.read_text().strip()}",
                       "-w", "\n%{http_code}", "-d", '{"name": "c9"}', url]).stdout  # fmt: skip
    assert enroll.endswith("\n201"), enroll
    for name in ("pixiebox.db", "pixiebox.db-wal", "pixiebox.db-shm", AGENT_TOKEN_FILE):
        assert (state / name).exists(), name
    assert loose_modes(state, token.parent) == {}
    assert agent.stop() == 0
    # Loosened meanwhile (an archive unpacked, a backup restored), with an identity stored:
    # set back at the next start, before anything is served.
    IdentityStore(state / "identity").for_machine(MAC)
    for path in [state, *state.rglob("*"), token]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert mode_of(state / "pixiebox.db") == 0o644
    assert mode_of(state / "identity" / MAC / HOST_KEY_FILE) == 0o644
    agent = start_with_umask_000(host, config)
    assert loose_modes(state, token) == {}
    assert mode_of(state / "identity" / MAC / NODE_PASSWORD_FILE) == 0o600
    said = agent.text()
    assert f"{state / 'pixiebox.db'} had mode 644; set it to 600" in said
    machines = json.loads(host.run(["curl", "-sS", "http://127.0.0.1:8080/api/v1/machines"]).stdout)
    assert {m["mac"] for m in machines} >= {MAC, ENROLLED}
    # The database is still the same one (nothing was made afresh).
    with sqlite3.connect(state / "pixiebox.db") as db:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] >= 1
    assert agent.stop() == 0
