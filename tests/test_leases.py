"""The address book: who may hold which address, across restarts."""

from __future__ import annotations

import sqlite3
import time
from ipaddress import IPv4Address
from pathlib import Path

from pixiebox.config import IPRange, MachineSection
from pixiebox.dhcp.leases import DECLINE_LIMIT, DECLINE_QUARANTINE, AddressBook, decline_limit
from pixiebox.store.state import StateStore

POOL = IPRange.model_validate("10.0.0.10-10.0.0.12")
A, B, C, D = (f"02:00:00:00:00:0{n}" for n in range(1, 5))


def book(tmp_path: Path, pool: IPRange | None = POOL) -> AddressBook:
    return AddressBook(StateStore(tmp_path), pool)


def test_concurrent_discovers_get_distinct_offers(tmp_path: Path) -> None:
    addresses = book(tmp_path)
    offers = [addresses.offer(mac, None, None) for mac in (A, B, C)]
    assert len(set(offers)) == 3
    assert addresses.offer(D, None, None) is None  # three addresses, all held for offers


def test_bound_lease_survives_restart_and_is_never_given_to_another_mac(tmp_path: Path) -> None:
    first = book(tmp_path)
    ip = first.offer(A, None, None)
    assert ip is not None
    first.bind(A, ip, 3600)
    restarted = book(tmp_path)
    assert restarted.offer(A, None, None) == ip
    assert not restarted.may_hold(B, None, ip)
    others = {restarted.offer(mac, None, ip) for mac in (B, C)}
    assert ip not in others


def test_expired_leases_are_reused_oldest_first(tmp_path: Path) -> None:
    addresses = book(tmp_path)
    for mac in (A, B, C):
        ip = addresses.offer(mac, None, None)
        assert ip is not None
        addresses.bind(mac, ip, 3600)
    assert addresses.offer(D, None, None) is None
    lease_b = addresses.lease_of(B)
    assert lease_b is not None
    addresses.bind(B, lease_b.ip, 0)  # B's lease runs out
    time.sleep(0.01)
    assert addresses.offer(D, None, None) == lease_b.ip


def test_reservation_wins_and_is_outside_the_pool(tmp_path: Path) -> None:
    addresses = book(tmp_path, pool=None)
    machine = MachineSection(name="c1", mac=A, ip=IPv4Address("10.0.0.31"))
    assert addresses.offer(A, machine, IPv4Address("10.0.0.99")) == IPv4Address("10.0.0.31")
    assert addresses.may_hold(A, machine, IPv4Address("10.0.0.31"))
    assert not addresses.may_hold(A, machine, IPv4Address("10.0.0.32"))
    assert addresses.offer(B, None, None) is None  # reservation mode: no pool


def test_declined_address_is_quarantined(tmp_path: Path) -> None:
    addresses = book(tmp_path)
    ip = addresses.offer(A, None, None)
    assert ip is not None
    addresses.bind(A, ip, 3600)  # RFC 2131 4.3.3: a DECLINE follows the ACK
    assert addresses.decline(A, ip)
    assert ip not in {addresses.offer(mac, None, ip) for mac in (A, B)}


def test_release_frees_the_address_for_its_owner_first(tmp_path: Path) -> None:
    addresses = book(tmp_path)
    ip = addresses.offer(A, None, None)
    assert ip is not None
    addresses.bind(A, ip, 3600)
    assert not addresses.release(B, ip)  # only the holder may release
    assert addresses.release(A, ip)
    assert addresses.may_hold(B, None, ip)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def bound(addresses: AddressBook, mac: str, client_id: str = "") -> IPv4Address:
    ip = addresses.offer(mac, None, None)
    assert ip is not None
    addresses.bind(mac, ip, 3600, client_id)
    return ip


def test_decline_and_release_are_honoured_only_from_the_holder(tmp_path: Path) -> None:
    addresses = book(tmp_path)
    ip = bound(addresses, A, client_id="01020000000001")
    # Another chaddr, or the holder's chaddr with another (or no) client identifier: refused.
    for mac, cid in ((B, ""), (B, "01020000000001"), (A, "ff00"), (A, "")):
        assert not addresses.decline(mac, ip, cid)
        assert not addresses.release(mac, ip, cid)
    assert "leased to 02:00:00:00:00:01" in addresses.not_holder(B, ip, "")
    assert "client identifier" in addresses.not_holder(A, ip, "ff00")
    # The holder keeps its lease, on disk too, and its renewal is granted.
    restarted = book(tmp_path)
    lease = restarted.lease_at(ip)
    assert lease is not None
    assert (lease.mac, lease.state, lease.client_id) == (A, "bound", "01020000000001")
    assert restarted.may_hold(A, None, ip)
    assert not restarted.may_hold(B, None, ip)
    # The holder's own DECLINE counts.
    assert restarted.decline(A, ip, "01020000000001")
    assert ip in restarted.quarantined()
    assert restarted.lease_of(A) is None


def test_a_lease_without_client_identifier_is_held_by_its_chaddr(tmp_path: Path) -> None:
    addresses = book(tmp_path)
    ip = bound(addresses, A)
    assert not addresses.release(B, ip)
    assert addresses.release(A, ip, "01020000000001")  # RFC 2131 4.2: chaddr names it then


def test_declines_of_addresses_nobody_holds_are_not_stored(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    addresses = AddressBook(store, POOL)
    offered = addresses.offer(A, None, None)
    assert offered is not None
    for ip in (offered, IPv4Address("10.0.0.11"), IPv4Address("192.0.2.7")):
        assert not addresses.decline(A, ip)
    assert list(store.leases()) == []
    assert addresses.quarantined() == {}


def test_an_expired_lease_cannot_be_declined(tmp_path: Path) -> None:
    clock = Clock()
    addresses = AddressBook(StateStore(tmp_path), POOL, clock=clock)
    ip = bound(addresses, A)
    clock.now += 3601
    assert not addresses.decline(A, ip)
    assert "not leased to anyone" in addresses.not_holder(A, ip, "")


def test_a_quarantine_ends_and_the_address_is_free_again(tmp_path: Path) -> None:
    clock = Clock()
    store = StateStore(tmp_path)
    addresses = AddressBook(store, POOL, quarantine=120, clock=clock)
    ip = bound(addresses, A)
    assert addresses.decline(A, ip)
    assert ip in addresses.held()
    assert not addresses.may_hold(B, None, ip)
    clock.now += 119
    assert not addresses.may_hold(B, None, ip)
    clock.now += 2
    assert ip not in addresses.held()
    assert addresses.quarantined() == {}
    assert addresses.may_hold(B, None, ip)
    assert addresses.offer(B, None, ip) == ip
    # After a restart the ended quarantine is gone from the database as well.
    AddressBook(store, POOL, quarantine=120, clock=clock)
    assert [lease for lease in store.leases() if lease.state == "declined"] == []


def test_the_default_quarantine_is_ten_minutes(tmp_path: Path) -> None:
    clock = Clock()
    addresses = AddressBook(StateStore(tmp_path), POOL, clock=clock)
    ip = bound(addresses, A)
    assert addresses.decline(A, ip)
    assert addresses.quarantined() == {ip: clock.now + DECLINE_QUARANTINE}
    assert DECLINE_QUARANTINE == 600


def test_the_number_of_quarantined_addresses_is_bounded_oldest_freed_first(
    tmp_path: Path,
) -> None:
    pool = IPRange.model_validate("10.0.0.10-10.0.0.17")  # 8 addresses: at most 2 quarantined
    clock = Clock()
    store = StateStore(tmp_path)
    addresses = AddressBook(store, pool, clock=clock)
    assert addresses.limit == 2
    macs = [f"02:00:00:00:01:0{n}" for n in range(5)]
    declined = []
    for mac in macs:
        ip = bound(addresses, mac)
        assert addresses.decline(mac, ip)
        declined.append(ip)
        clock.now += 1
        assert len(addresses.quarantined()) <= 2
    assert list(addresses.quarantined()) == declined[-2:]
    on_disk = [lease.ip for lease in store.leases() if lease.state == "declined"]
    assert sorted(on_disk) == sorted(declined[-2:])
    # The freed ones are offered again, after the never-used ones.
    assert addresses.may_hold(B, None, declined[0])
    # A restart with a smaller bound keeps the newest only.
    smaller = AddressBook(store, pool, limit=1, clock=clock)
    assert list(smaller.quarantined()) == declined[-1:]
    assert [lease.ip for lease in store.leases() if lease.state == "declined"] == declined[-1:]


def test_decline_limit_is_a_quarter_of_the_pool_up_to_64() -> None:
    assert decline_limit(None) == DECLINE_LIMIT == 64
    assert decline_limit(IPRange.model_validate("10.0.0.100-10.0.0.110")) == 2
    assert decline_limit(IPRange.model_validate("10.0.0.1-10.0.0.3")) == 1
    assert decline_limit(IPRange.model_validate("10.0.0.1-10.0.3.254")) == 64


def test_a_database_from_before_client_identifiers_is_migrated_in_place(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "pixiebox.db")
    db.executescript(
        "CREATE TABLE leases (ip TEXT PRIMARY KEY, mac TEXT NOT NULL, expires REAL NOT NULL, "
        "state TEXT NOT NULL);"
    )
    db.execute("INSERT INTO leases VALUES ('10.0.0.10', ?, ?, 'bound')", (A, time.time() + 600))
    db.commit()
    db.close()
    store = StateStore(tmp_path)
    assert [lease.client_id for lease in store.leases()] == [""]
    addresses = AddressBook(store, POOL)
    ip = IPv4Address("10.0.0.10")
    assert not addresses.release(B, ip)
    assert addresses.may_hold(A, None, ip)
    addresses.bind(A, ip, 600, "01aa")
    assert [lease.client_id for lease in StateStore(tmp_path).leases()] == ["01aa"]
