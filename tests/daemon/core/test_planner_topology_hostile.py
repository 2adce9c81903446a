"""The planner's topology rules under hostile plans: one label value per range, always.

Each rule is one small in-memory cluster and one plan: a reclaim, a specific
address or a sticky return must never put a block of one value in a range
another value holds, nor leave a block in a range nobody holds.
"""

from __future__ import annotations

import dataclasses

import pytest

from topoipam.daemon.core.allocator import TxnPlan
from topoipam.daemon.core.calls import Defer, ReleaseCall
from topoipam.daemon.core.errors import AddressUnavailable, PoolExhausted
from topoipam.daemon.core.holdings import Handle, HandleAddress, TopologyRange
from topoipam.daemon.core.model import IPAMConfig, IPPool
from topoipam.daemon.core.view import InMemoryView
from topoipam.daemon.core.writes import (
    DeleteTopologyRange,
    NoBlocksIn,
    PutTopologyRange,
    RangeHeld,
    Versioned,
)

from .test_planner import add, block, full, ip, net, plan, planner
from .test_planner_topology import SHARED

RACK_OF = {"m0": "0", "m1": "1", "n0": "1"}


def racks(held: dict[str, str], **config: object) -> InMemoryView:
    """n0 (rack 1) beside ``held`` ranges (``"10.5.0.0/26": "0"``), listed while they have
    room; every node's labels known."""
    cluster = InMemoryView("n0", IPAMConfig(**config), (SHARED,),  # type: ignore[arg-type]
                           {"rack": "1"})
    cluster.nodes.update({node: {"rack": rack} for node, rack in RACK_OF.items()})
    for span, value in held.items():
        cluster.ranges[net(span)] = Versioned(TopologyRange(net(span), "shared", value), 3)
    return cluster


def rack_of_range(cluster: InMemoryView, txn: TxnPlan, cidr: object) -> str | None:
    """The value holding the range of block ``cidr`` once ``txn`` is committed."""
    span = SHARED.topology_range(cidr)  # type: ignore[arg-type]
    planned = txn.ranges.get(span)
    if isinstance(planned, PutTopologyRange):
        return planned.range.value
    if isinstance(planned, DeleteTopologyRange):
        return None
    held = cluster.ranges.get(span)
    return None if held is None else held.value.value


# ---------------------------------------------------------------------- reclaiming
def test_a_reclaim_never_takes_a_block_in_a_range_of_another_value() -> None:
    # Every range is rack 0's, every block an empty block of m0 (rack 0's warm reserve).
    cluster = racks({f"10.5.0.{64 * r}/26": "0" for r in range(4)}, strict_affinity=True,
                    ip_cooldown_seconds=0)
    cluster.add(*(block(f"10.5.0.{16 * b}/28", "m0") for b in range(16))).indexed()
    cluster.unlisted.update(cluster.ranges)  # full: every block claimed
    call = add("a")
    try:
        txn = plan(cluster, call)
    except PoolExhausted as exc:
        assert "no empty block to reclaim" in exc.message
        return
    taken = call.addresses[0].block
    assert rack_of_range(cluster, txn, taken) == "1", (
        f"rack 1's n0 reclaimed {taken} in a range rack 0 holds")


def test_a_reclaim_takes_a_block_of_its_own_value_whose_range_is_full() -> None:
    # Rack 1's range is full (unlisted), one of its blocks is m1's empty warm reserve;
    # rack 0's ranges hold empty blocks too, listed before it in the free-block index.
    held = {"10.5.0.0/26": "0", "10.5.0.64/26": "0", "10.5.0.128/26": "0",
            "10.5.0.192/26": "1"}
    cluster = racks(held, strict_affinity=True, ip_cooldown_seconds=0)
    cluster.add(*(block(f"10.5.0.{16 * b}/28", "m0") for b in range(12)))
    cluster.add(*(full(f"10.5.0.{16 * b}/28", "m1") for b in range(12, 15)))
    cluster.add(block("10.5.0.240/28", "m1")).indexed()
    cluster.unlisted.update(cluster.ranges)
    call = add("a")
    txn = plan(cluster, call)
    assert call.addresses[0].block == net("10.5.0.240/28")
    assert rack_of_range(cluster, txn, call.addresses[0].block) == "1"


# ---------------------------------------------------------------------- specific addresses
def test_a_specific_address_in_a_range_of_another_value_is_refused() -> None:
    cluster = racks({"10.5.0.0/26": "0"}).add(block("10.5.0.0/28", "m0", o1="x")).indexed()
    with pytest.raises(AddressUnavailable, match="10.5.0.0/26.*rack=0"):
        plan(cluster, add("a", addresses=(ip("10.5.0.20"),)))


def test_a_specific_address_in_a_free_range_takes_the_range_for_the_value() -> None:
    cluster = racks({}).indexed()
    call = add("a", addresses=(ip("10.5.0.100"),))
    txn = plan(cluster, call)
    span = net("10.5.0.64/26")
    assert txn.blocks[net("10.5.0.96/28")][1] == 0
    assert txn.ranges[span] == PutTopologyRange(TopologyRange(span, "shared", "1"), 0)


def test_a_specific_address_in_a_range_of_its_value_is_guarded_by_the_holder() -> None:
    cluster = racks({"10.5.0.64/26": "1"}).add(block("10.5.0.64/28", "m1", o1="x")).indexed()
    call = add("a", addresses=(ip("10.5.0.100"),))
    txn = plan(cluster, call)
    assert txn.range_guards == {net("10.5.0.64/26"): 3} and not txn.ranges


# ---------------------------------------------------------------------- guards
def test_claims_of_one_value_compare_the_holder_and_only_the_last_one_writes_it() -> None:
    held = racks({"10.5.0.64/26": "1"})
    held.add(block("10.5.0.64/28", "m1", o1="x"), block("10.5.0.80/28", "m1", o1="x"))
    cluster = held.indexed()
    span = net("10.5.0.64/26")
    call = add("a")
    txn = plan(cluster, call)
    assert call.addresses[0].block == net("10.5.0.96/28")
    assert txn.range_guards == {span: 3} and not txn.ranges  # the range keeps room
    cluster.add(block("10.5.0.96/28", "m1", o1="y")).indexed()
    call = add("b")
    txn = plan(cluster, call)  # this claim fills the range: it unlists it
    assert call.addresses[0].block == net("10.5.0.112/28")
    assert txn.ranges == {span: PutTopologyRange(TopologyRange(span, "shared", "1"), 3,
                                                 listed=False)}
    assert [w for w in txn.writes() if isinstance(w, RangeHeld)] == []


def test_a_range_given_back_is_guarded_by_no_other_block_in_it() -> None:
    cluster = racks({"10.5.0.64/26": "1"}).add(block("10.5.0.80/28", "n0", o1="net/a/eth0"))
    cluster.handles["net/a/eth0"] = Versioned(Handle(
        "net/a/eth0", "n0", (HandleAddress(ip("10.5.0.81"), net("10.5.0.80/28"), "shared"),)), 4)
    cluster.pools = (dataclasses.replace(SHARED, disabled=True),)  # the empty block goes
    txn = plan(cluster.indexed(), ReleaseCall("net/a/eth0"))
    span = net("10.5.0.64/26")
    assert txn.ranges == {span: DeleteTopologyRange(TopologyRange(span, "shared", "1"), 3)}
    assert NoBlocksIn(span, (net("10.5.0.80/28"),)) in txn.writes()


def test_a_specific_address_in_a_range_given_back_in_the_same_batch_waits() -> None:
    cluster = racks({"10.5.0.64/26": "1"}).indexed()
    txn = TxnPlan(cluster.pools)
    span = net("10.5.0.64/26")
    txn.ranges[span] = DeleteTopologyRange(TopologyRange(span, "shared", "1"), 3)
    with pytest.raises(Defer):
        planner().plan(cluster, add("a", addresses=(ip("10.5.0.100"),)), txn)


# ---------------------------------------------------------------------- aggregation
def test_a_value_whose_ranges_are_full_takes_a_free_range_next_to_them() -> None:
    # Value r1 starts at the pool's second range, r4 at its third: once r1's range is full
    # (unlisted) and r4 holds the next one, r1's next range is the free one below its own,
    # with which it merges, not the last one.
    from .test_planner_topology import claim, shared

    cluster = shared()
    first = [claim(cluster, f"a{i}", "r1", revision=10 + i) for i in range(4)]
    assert {SHARED.topology_range(b) for b in first} == {net("10.5.0.64/26")}
    other = claim(cluster, "b0", "r4", revision=20)
    assert SHARED.topology_range(other) == net("10.5.0.128/26")
    fifth = claim(cluster, "a0", "r1", revision=21)
    assert SHARED.topology_range(fifth) == net("10.5.0.0/26"), fifth


def test_borrowing_prefers_its_values_blocks_when_its_ranges_are_full() -> None:
    # Rack 0's range is full (unlisted, as every range is once its blocks are all claimed);
    # n0 may claim no more (maxBlocksPerHost): it borrows from rack 0's m0, not rack 1's m1,
    # though m1's block comes first in the free-block index.
    cluster = InMemoryView("n0", IPAMConfig(max_blocks_per_host=1), (SHARED,), {"rack": "0"})
    cluster.nodes.update({"m0": {"rack": "0"}, "m1": {"rack": "1"}})
    for span, rack in (("10.5.0.0/26", "1"), ("10.5.0.64/26", "0")):
        cluster.ranges[net(span)] = Versioned(TopologyRange(net(span), "shared", rack), 3)
    cluster.add(block("10.5.0.0/28", "m1", o1="x"), full("10.5.0.16/28", "m1"),
                full("10.5.0.32/28", "m1"), full("10.5.0.48/28", "m1"),
                full("10.5.0.64/28", "n0"), block("10.5.0.80/28", "m0", o1="y"),
                full("10.5.0.96/28", "m0"), full("10.5.0.112/28", "m0")).indexed()
    cluster.unlisted.update(cluster.ranges)
    call = add("a")
    plan(cluster, call)
    assert net("10.5.0.64/26").supernet_of(call.addresses[0].block), call.addresses


def test_a_node_with_no_block_in_its_values_full_range_borrows_there() -> None:
    # Rack 0's only range is full (unlisted) and n0 has no block in it, so neither the
    # listing nor n0's own blocks point to it: the holders of the pool's ranges do.
    cluster = InMemoryView("n0", IPAMConfig(max_blocks_per_host=2), (SHARED,), {"rack": "0"})
    cluster.nodes.update({"m0": {"rack": "0"}, "m1": {"rack": "1"}})
    for span, rack in (("10.5.0.0/26", "1"), ("10.5.0.64/26", "0"), ("10.5.0.128/26", "1"),
                       ("10.5.0.192/26", "1")):  # no free range left to take
        cluster.ranges[net(span)] = Versioned(TopologyRange(net(span), "shared", rack), 3)
    cluster.add(block("10.5.0.0/28", "m1", o1="x"), full("10.5.0.16/28", "m1"),
                full("10.5.0.32/28", "m1"), full("10.5.0.48/28", "m1"),
                block("10.5.0.64/28", "m0", o1="y"), full("10.5.0.80/28", "m0"),
                full("10.5.0.96/28", "m0"), full("10.5.0.112/28", "m0")).indexed()
    cluster.unlisted.update(net(s) for s in ("10.5.0.0/26", "10.5.0.64/26"))
    call = add("a")
    plan(cluster, call)
    assert call.addresses[0].block == net("10.5.0.64/28"), call.addresses


def test_a_reclaim_looks_in_its_values_ranges_first_however_big_the_pool() -> None:
    # 15 ranges of rack 1 full of m1's empty blocks, and rack 0's ninth range: three
    # full blocks of n0 and one empty block of m0, the only block n0 may reclaim, far
    # from where n0 reads the free-block index (its 58th block) and from its start.
    pool = IPPool("big", net("10.6.0.0/22"), 28, topology_key="rack", topology_block_size=26)
    cluster = InMemoryView("n0", IPAMConfig(strict_affinity=True, ip_cooldown_seconds=0),
                           (pool,), {"rack": "0"})
    cluster.nodes.update({"m0": {"rack": "0"}, "m1": {"rack": "1"}})
    spans = list(pool.cidr.subnets(new_prefix=26))
    for i, span in enumerate(spans):
        cluster.ranges[span] = Versioned(TopologyRange(span, "big", "0" if i == 8 else "1"), 3)
        for j, cidr in enumerate(span.subnets(new_prefix=28)):
            cluster.add(block(str(cidr), "m1") if i != 8 else
                        full(str(cidr), "n0") if j < 3 else block(str(cidr), "m0"))
    cluster.indexed()
    cluster.unlisted.update(cluster.ranges)
    call = add("a")
    plan(cluster, call)
    assert call.addresses[0].block == net("10.6.2.48/28")
