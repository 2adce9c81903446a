"""Contested addresses and conflict standings: the pure rules, as tables and properties."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topoipam.daemon.core import allocator
from topoipam.daemon.core.conflicts import KEEP_DATASTORE, ConflictRecord, standing
from topoipam.daemon.core.holdings import (
    Block,
    Handle,
    HandleAddress,
)
from topoipam.daemon.core.model import IPPool

CIDR = ipaddress.ip_network("10.1.0.0/28")
X = ipaddress.ip_address("10.1.0.3")
POOL = IPPool("p", ipaddress.ip_network("10.1.0.0/24"), 28, "all()")
RECORDED = Handle("net/p1/eth0", "m1", (HandleAddress(X, CIDR),), {"pod": "p1"})
HOLDER = Handle("net/p2/eth0", "m2", (HandleAddress(X, CIDR),), {"pod": "p2"})


def contested_block() -> Block:
    block = Block.empty(CIDR, "m1")
    block.unallocated.remove(3)
    block.allocations[3] = HOLDER.id
    block.contested[3] = (RECORDED.id, "m1")
    return block


def test_contested_survives_its_encoding_and_is_absent_otherwise() -> None:
    block = contested_block()
    assert Block.from_dict(block.to_dict()) == block
    assert "contested" not in Block.empty(CIDR, "m1").to_dict()


def test_release_by_the_holder_hands_the_address_to_the_recorded_attachment() -> None:
    after, freed = allocator.release_addresses(contested_block(), [X], HOLDER.id, 5.0)
    assert freed == [X]
    assert after.allocations[3] == RECORDED.id and 3 not in after.unallocated
    assert not after.contested and after.released_at[3] == 5.0


def test_release_of_any_holder_hands_it_over_too() -> None:
    after, _ = allocator.release_addresses(contested_block(), [X], None, 5.0)
    assert after.allocations[3] == RECORDED.id and not after.contested


def test_release_by_the_recorded_attachment_leaves_it_with_the_holder() -> None:
    after, freed = allocator.release_addresses(contested_block(), [X], RECORDED.id, 5.0)
    assert freed == []
    assert after.allocations[3] == HOLDER.id and not after.contested


@settings(max_examples=200)
@given(st.lists(st.sampled_from([HOLDER.id, RECORDED.id, None, "net/other/eth0"]),
                max_size=4))
def test_a_contested_address_is_never_free_nor_lost(releasers: list[str | None]) -> None:
    """Whatever releases come, in whatever order: the address goes free only once both
    attachments let go; until then exactly one of them holds it."""
    block, let_go = contested_block(), set()
    for releaser in releasers:
        holder = block.allocations.get(3)
        block, _ = allocator.release_addresses(block, [X], releaser, 1.0)
        if releaser is None or releaser == holder or (
                releaser == RECORDED.id and RECORDED.id not in let_go):
            let_go.add(holder if releaser is None else releaser)
        assert (3 in block.unallocated) == (3 not in block.allocations)
        if block.allocations.get(3) is None:
            assert {HOLDER.id, RECORDED.id} <= let_go


def record(**kw: object) -> ConflictRecord:
    return ConflictRecord("m1", X, RECORDED, HOLDER.id, 1.0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("block", "recorded", "holder", "pools", "in_record", "holds", "says"),
    [
        (contested_block(), RECORDED, HOLDER, [POOL], True, True, "two pods"),
        (contested_block(), None, HOLDER, [POOL], False, False, "no longer records"),
        (allocator.release_addresses(contested_block(), [X], HOLDER.id, 1.0)[0], RECORDED,
         None, [POOL], True, False, "holds it in etcd"),
        (allocator.release_addresses(contested_block(), [X], RECORDED.id, 1.0)[0], None,
         HOLDER, [POOL], True, False, "was released"),
        (None, RECORDED, None, [], True, True, "no pool contains it"),
        (None, RECORDED, None, [POOL], True, True, "free in etcd"),
        (Block.empty(CIDR, "m1"), RECORDED, None, [POOL], True, True, "free in etcd"),
        (None, None, None, [], True, False, "was released"),
        (contested_block(), None, HOLDER, [POOL], True, False, "was released"),
    ],
)
def test_standing(block: Block | None, recorded: Handle | None, holder: Handle | None,
                  pools: list[IPPool], in_record: bool, holds: bool, says: str) -> None:
    state = standing(record(), block, recorded, holder, pools, in_record)
    assert state.holds == holds and says in state.what, state
    if holds:
        assert "topoipamctl" in state.fix and "etcdctl" not in state.line()


def test_a_resolved_record_no_longer_holds() -> None:
    assert not standing(record(resolved=KEEP_DATASTORE), contested_block(), RECORDED, HOLDER,
                        [POOL]).holds


def test_record_round_trip_and_legacy_values() -> None:
    original = record()
    assert ConflictRecord.from_value("m1", str(X), original.to_value()) == original
    legacy = b'{"address": "10.1.0.3", "handle": "net/p1/eth0", "holder": "h", "node": "m1"}'
    decoded = ConflictRecord.from_value("m1", "10.1.0.3", legacy)
    assert decoded.handle.id == "net/p1/eth0" and decoded.handle.addresses == ()
