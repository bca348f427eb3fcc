"""The inventory: one answer to "who is this MAC and what should it boot?"."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from pixiebox.config import LabConfig
from pixiebox.core import inventory as inventory_module
from pixiebox.core.decision import Silence
from pixiebox.core.evidence import EvidenceBook, Source
from pixiebox.core.firmware import arch_info
from pixiebox.core.inventory import Inventory
from pixiebox.core.lifecycle import Lifecycle, MachineState
from pixiebox.events import Kind
from pixiebox.store.state import StateStore

C1 = "02:00:00:00:00:01"
STRANGER = "02:00:00:00:00:99"


def inventory(tmp_path: Path, **boot: object) -> tuple[Inventory, StateStore]:
    config = LabConfig.model_validate({
        "boot": boot, "machines": [{"name": "c1", "mac": C1, "ip": "10.0.0.31"}],
    })  # fmt: skip
    store = StateStore(tmp_path)
    return Inventory(config, store), store


def test_a_script_fetch_keeps_the_firmware_dhcp_recorded(tmp_path: Path) -> None:
    lab, store = inventory(tmp_path)
    uefi = arch_info(7)
    assert uefi is not None
    assert lab.seen(STRANGER, uefi)  # DHCP saw option 93 = 7: the first time
    assert not lab.seen(STRANGER, None)  # the iPXE script fetch cannot tell
    (seen,) = store.seen_machines()
    assert (seen.mac, seen.arch, seen.firmware) == (STRANGER, "x86_64", "UEFI")
    assert seen.last_seen >= seen.first_seen


def test_enrolled_machine_boots_its_image_and_unknown_follows_policy(tmp_path: Path) -> None:
    lab, _ = inventory(tmp_path, unknown="ignore")
    known = lab.decide(C1, None)
    assert (known.silent, known.image_name, known.who) == (None, "osie", f"c1 ({C1})")
    stranger = lab.decide(STRANGER, None)
    assert (stranger.silent, stranger.known) == (Silence.UNKNOWN_IGNORED, False)


def test_addresses_name_the_machine(tmp_path: Path) -> None:
    lab, _ = inventory(tmp_path)
    assert lab.describe_address(IPv4Address("10.0.0.31")) == f"c1 ({C1}, 10.0.0.31)"
    lab.learn(STRANGER, IPv4Address("10.0.0.77"), Source.DHCP_REQUEST)
    assert (
        lab.describe_address(IPv4Address("10.0.0.77")) == f"unknown machine {STRANGER} (10.0.0.77)"
    )
    assert lab.describe_address(IPv4Address("10.0.0.78")) == "10.0.0.78"


def test_a_discovered_machine_is_named_by_its_vendor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lab, _ = inventory(tmp_path)
    bios = arch_info(0)
    with caplog.at_level(logging.INFO, logger="pixiebox"):
        lab.seen("00:04:4b:aa:aa:aa", bios)  # the user's Jetson board
    assert "unknown machine 00:04:4b:aa:aa:aa (x86_64 BIOS, NVIDIA) asked to boot" in caplog.text


def test_a_silent_machine_is_shown_off_and_its_boot_time_is_measured(tmp_path: Path) -> None:
    clock = [1000.0]
    store = StateStore(tmp_path)
    life = Lifecycle(store, clock=lambda: clock[0])
    life.record(C1, Kind.DHCP_OFFER, "asked to boot")
    clock[0] += 25
    up = life.record(C1, Kind.OS_UP, "the OS is up", fields={"ip": "10.0.0.5"})
    assert list(life.boot_durations) == [25.0]
    assert up.fields == {"ip": "10.0.0.5", "boot_seconds": 25.0}  # the same fact, on the event
    assert life.events(C1)[-1].fields == up.fields  # and as stored
    clock[0] += 60
    assert life.mark_silent(off_after=120) == []  # not silent long enough
    clock[0] += 120
    assert life.mark_silent(off_after=120) == [C1]
    record = store.machine_record(C1)
    assert record is not None and record.state == MachineState.OFF
    off = life.events(C1)[-1]
    assert off.kind == Kind.MACHINE_OFF
    assert (off.get("cause"), off.get("silent_for"), off.get("was")) == ("silence", 180, "up")
    assert life.mark_silent(off_after=120) == []  # already off: said once


def test_the_neighbour_table_is_read_once_per_address_in_a_few_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script fetch records neighbour evidence for its source address; a client fetching again
    and again (or one off the segment, with no entry) must not cost a table read each time."""
    table = {"10.0.0.50": STRANGER}
    reads: list[str] = []

    def neighbour_mac(ip: str, device: str | None = None) -> str | None:
        reads.append(ip)
        return table.get(ip)

    monkeypatch.setattr(inventory_module, "neighbour_mac", neighbour_mac)
    inv, _ = inventory(tmp_path)
    clock = [1000.0]
    inv.evidence = EvidenceBook(clock=lambda: clock[0])
    here, away = IPv4Address("10.0.0.50"), IPv4Address("10.9.9.9")
    for _ in range(3):
        assert inv.learn_neighbour(here) == STRANGER
        assert inv.learn_neighbour(away) is None
    assert reads == ["10.0.0.50", "10.9.9.9"]
    evidence = inv.evidence_at(here)
    assert evidence is not None and evidence.source is Source.NEIGHBOUR
    # Past NEIGHBOUR_FRESH the table is read again, and a new entry is seen.
    clock[0] += inventory_module.NEIGHBOUR_FRESH + 1
    table["10.9.9.9"] = C1
    assert inv.learn_neighbour(away) == C1
    assert inv.learn_neighbour(here) == STRANGER
    assert reads == ["10.0.0.50", "10.9.9.9", "10.9.9.9", "10.0.0.50"]


def test_a_reply_waits_for_the_one_commit_of_its_loop_turn(tmp_path: Path) -> None:
    """StateStore.committed: what a reply acknowledges (a boot token) is committed before it
    leaves, and the requests of one loop turn share one COMMIT."""
    store = StateStore(tmp_path / "state")
    reader = sqlite3.connect(store.path)

    def stored() -> int:
        return int(reader.execute("SELECT count(*) FROM boot_tokens").fetchone()[0])

    async def main() -> list[int]:
        seen: list[int] = []

        async def reply(mac: str) -> None:
            store.save_boot_token(mac, "digest", 1.0)
            seen.append(stored())  # not yet: the turn's transaction is open
            await store.committed()
            seen.append(stored())

        await asyncio.gather(reply(C1), reply(STRANGER))
        return seen

    try:
        assert asyncio.run(main()) == [0, 0, 2, 2]
    finally:
        reader.close()
        store.close()


def test_an_address_outside_the_lab_subnet_is_never_learned(tmp_path: Path) -> None:
    """A DHCP REQUEST may name any address; one outside the lab segment is no lab machine's."""
    config = LabConfig(network={"subnet": "10.0.0.0/24"})
    store = StateStore(tmp_path / "state")
    try:
        inv = Inventory(config, store)
        inv.learn(C1, IPv4Address("10.9.9.9"), Source.DHCP_REQUEST)
        assert inv.evidence.of(C1) is None
        inv.learn(C1, IPv4Address("10.0.0.9"), Source.DHCP_REQUEST)
        evidence = inv.evidence.of(C1)
        assert evidence is not None and evidence.ip == IPv4Address("10.0.0.9")
    finally:
        store.close()


def test_every_event_log_stays_within_its_bound_whatever_the_interleaving(
    tmp_path: Path,
) -> None:
    """Issue 13: sources recording in turn (three machines and the lab's own log, MAC "") each
    keep at most EVENTS_PER_MACHINE events, their newest, also across a restart of the store."""
    from pixiebox.store.state import EVENTS_PER_MACHINE, TRIM_EVERY

    macs = ["02:00:00:00:13:01", "02:00:00:00:13:02", "02:00:00:00:13:03", ""]
    added: dict[str, list[int]] = {mac: [] for mac in macs}
    store = StateStore(tmp_path)

    def counts() -> dict[str, int]:
        rows = store._db.execute("SELECT mac, count(*) FROM events GROUP BY mac")
        return {str(mac): int(n) for mac, n in rows}

    try:
        store._db.execute("BEGIN")  # one transaction: 20,000 commits would take seconds
        for round_ in range(5000):
            for mac in macs:
                added[mac].append(store.add_event(mac, "test", "m", float(round_)).id)
            if round_ % 97 == 0:
                assert max(counts().values()) <= EVENTS_PER_MACHINE, round_
        store._db.execute("COMMIT")
        for mac in macs:
            kept = [e.id for e in store.events(mac, limit=10 * EVENTS_PER_MACHINE)]
            assert EVENTS_PER_MACHINE - TRIM_EVERY <= len(kept) <= EVENTS_PER_MACHINE, mac
            assert kept == added[mac][-len(kept) :], mac  # the newest, none missing
        store.close()
        # A restart forgets how many each MAC added since its last trim: still bounded.
        store = StateStore(tmp_path)
        for round_ in range(TRIM_EVERY * 3 // 2):
            store.add_event(macs[0], "test", "m", float(round_))
            assert counts()[macs[0]] <= EVENTS_PER_MACHINE, round_
    finally:
        store.close()
