"""The address book: who may hold which address, across restarts."""

from __future__ import annotations

import time
from ipaddress import IPv4Address
from pathlib import Path

from pixiebox.config import IPRange, MachineSection
from pixiebox.dhcp.leases import AddressBook
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
    addresses.decline(A, ip)
    assert ip not in {addresses.offer(mac, None, ip) for mac in (A, B)}


def test_release_frees_the_address_for_its_owner_first(tmp_path: Path) -> None:
    addresses = book(tmp_path)
    ip = addresses.offer(A, None, None)
    assert ip is not None
    addresses.bind(A, ip, 3600)
    assert not addresses.release(B, ip)  # only the holder may release
    assert addresses.release(A, ip)
    assert addresses.may_hold(B, None, ip)
