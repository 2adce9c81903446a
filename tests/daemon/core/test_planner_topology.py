"""The planner's topology rules against an in-memory view: pool priorities.

A node selected by pools of several priorities is served by the highest
that can give it an address; each rule is one small cluster and one plan.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from topoipam.daemon.core.allocator import TxnPlan
from topoipam.daemon.core.calls import ReleaseCall
from topoipam.daemon.core.errors import InvalidInput, PoolExhausted
from topoipam.daemon.core.holdings import Block, Handle, HandleAddress, TopologyRange, parked_holder
from topoipam.daemon.core.model import IPNetwork, IPPool
from topoipam.daemon.core.view import InMemoryView
from topoipam.daemon.core.writes import (
    DeleteBlock,
    DeleteTopologyRange,
    PutBlock,
    PutTopologyRange,
    RangeHeld,
    Versioned,
)

from .test_planner import RACK0, add, addresses, block, full, net, plan, planner, view

ZONE = IPPool("zone", net("10.9.0.0/24"), 26, 'zone == "a"')
RACK0_FIRST = dataclasses.replace(RACK0, priority=10)
LABELS = {"rack": "0", "zone": "a"}


def tiers(**config: object) -> InMemoryView:
    return view("n0", RACK0_FIRST, ZONE, labels=LABELS, **config)


def rack_spent(owner: str = "n0") -> list[Block]:
    return [full(f"10.0.0.{64 * i}/26", owner) for i in range(4)]


def test_the_higher_priority_pool_serves_first_whatever_the_names() -> None:
    cluster = tiers().indexed()  # "zone" sorts after "rack0"; swap the priorities to be sure
    call = add("a")
    plan(cluster, call)
    assert call.addresses[0].pool == "rack0" and call.fallbacks == []
    swapped = view("n0", RACK0, dataclasses.replace(ZONE, priority=5), labels=LABELS).indexed()
    call = add("b")
    plan(swapped, call)
    assert call.addresses[0].pool == "zone"


def test_a_lower_priority_serves_when_the_higher_cannot_under_strict_affinity() -> None:
    cluster = tiers(strict_affinity=True).add(*rack_spent()).indexed()
    call = add("a")
    txn = plan(cluster, call)
    assert call.addresses[0].pool == "zone"
    assert call.fallbacks == [("rack0", "zone")]
    assert txn.affinities == {("n0", call.addresses[0].block): True}  # a zone block claimed


def test_the_higher_priority_borrows_before_a_lower_one_serves() -> None:
    spent = rack_spent("m")
    spent[1] = block("10.0.0.64/26", "m", o1="x")
    cluster = tiers().add(*spent).indexed()
    call = add("a")
    plan(cluster, call)
    assert call.addresses[0].pool == "rack0" and call.fallbacks == []
    assert addresses(call) == ["10.0.0.64"]


def test_the_higher_tier_serves_again_once_it_has_room() -> None:
    spent = rack_spent()
    spent[3] = block("10.0.0.192/26", "n0", o1="x")  # a pod left rack0
    cluster = tiers(strict_affinity=True).add(*spent).add(
        block("10.9.0.0/26", "n0", o1="y")).indexed()
    call = add("a")
    plan(cluster, call)
    assert addresses(call) == ["10.0.0.192"] and call.fallbacks == []


def test_every_tier_spent_names_each_tier_and_why() -> None:
    zone_spent = [full(f"10.9.0.{64 * i}/26", "m") for i in range(4)]
    cluster = tiers(strict_affinity=True).add(*rack_spent(), *zone_spent).indexed()
    with pytest.raises(PoolExhausted) as caught:
        plan(cluster, add("a"))
    message = caught.value.message
    assert "priority 10 (rack0): " in message and "priority 0 (zone): " in message
    assert message.count("strictAffinity forbids borrowing") == 2


def test_named_pools_ignore_priorities() -> None:
    cluster = tiers(strict_affinity=True).add(*rack_spent()).indexed()
    with pytest.raises(PoolExhausted):
        plan(cluster, add("a", ipv4_pools=("rack0",)))


def test_equal_priorities_are_one_tier_in_name_order() -> None:
    same = view("n0", RACK0, ZONE, labels=LABELS, strict_affinity=True).add(
        *rack_spent()).indexed()
    call = add("a")
    plan(same, call)
    assert call.addresses[0].pool == "zone" and call.fallbacks == []  # no tier fell back


def test_readiness_is_ready_when_any_tier_can_serve() -> None:
    assert planner().readiness(tiers(strict_affinity=True).add(*rack_spent()).indexed(),
                               [4], {}) == ""


@pytest.mark.parametrize("priority, bound", [
    ("10", "not the text '10'"), (True, "True must be an integer"), (1.5, "1.5 must be"),
    (1001, "from -1000 to 1000"),
])
def test_a_bad_priority_names_the_field_and_the_bound(priority: object, bound: str) -> None:
    with pytest.raises(InvalidInput, match="priority") as caught:
        IPPool.from_dict("p", {"cidr": "10.0.0.0/24", "priority": priority})
    assert bound in caught.value.message


# ---------------------------------------------------------------------- reclaiming empty blocks
def test_under_strict_affinity_an_empty_block_of_another_node_is_reclaimed() -> None:
    others = [block(f"10.0.0.{64 * i}/26", "m") for i in range(4)]  # all empty, all m's
    cluster = view(strict_affinity=True, ip_cooldown_seconds=0).add(
        *others, revision=4).indexed()
    cluster.nodes["m"] = {"rack": "0"}  # m lives, and rack0 selects it: its warm reserve
    call = add("a")
    txn = plan(cluster, call)
    cidr = call.addresses[0].block
    taken, guard = txn.blocks[cidr]
    assert taken is not None and taken.affinity == "n0" and guard == 4  # guarded by revision
    assert txn.affinities == {("m", cidr): False, ("n0", cidr): True}
    assert txn.reclaimed == {cidr}
    marks = [w for w in txn.writes() if type(w).__name__ == "PutFreeMark"]
    assert [(m.cidr, m.node) for m in marks] == [(cidr, "n0")]  # the index names n0 now


def test_blocks_of_deleted_or_unselected_nodes_are_reclaimed_first() -> None:
    cluster = view(strict_affinity=True, ip_cooldown_seconds=0).add(
        block("10.0.0.0/26", "live"), block("10.0.0.64/26", "moved"),
        block("10.0.0.128/26", "gone"), block("10.0.0.192/26", "live")).indexed()
    cluster.nodes.update({"live": {"rack": "0"}, "moved": {"rack": "7"}})
    picked = set()
    for _ in range(2):
        call = add("a")
        plan(cluster, call)
        picked.add(call.addresses[0].block)
        del cluster.free[call.addresses[0].block]  # as if taken: the next plan looks on
    assert picked == {net("10.0.0.64/26"), net("10.0.0.128/26")}


@pytest.mark.parametrize("what", ["an allocation", "a parked sticky address",
                                  "an address cooling down", "a contested address"])
def test_a_block_that_is_not_empty_is_never_reclaimed(what: str) -> None:
    other = block("10.0.0.192/26", "m")
    if what == "an allocation":
        other = block("10.0.0.192/26", "m", o5="net/x/eth0")
    elif what == "a parked sticky address":
        other = block("10.0.0.192/26", "m", o5=parked_holder("id"))
    elif what == "an address cooling down":
        other.released_at[5] = 1_000_000.0 - 10  # NOW - 10 s, cooldown 60 s
    else:
        other.contested[5] = ("net/y/eth0", "m2")
    spent = [full(f"10.0.0.{64 * i}/26", "m") for i in range(3)]
    cluster = view(strict_affinity=True, ip_cooldown_seconds=60).add(*spent, other).indexed()
    with pytest.raises(PoolExhausted, match="no empty block to reclaim"):
        plan(cluster, add("a"))


# ---------------------------------------------------------------------- topology ranges
SHARED = IPPool("shared", net("10.5.0.0/24"), 28, "all()", topology_key="rack",
                topology_block_size=26)


def commit(cluster: InMemoryView, txn: TxnPlan, revision: int) -> None:
    """Apply ``txn`` to the in-memory cluster as etcd would, at ``revision``."""
    for write in txn.writes():
        if isinstance(write, PutBlock):
            cluster.blocks[write.block.cidr] = Versioned(write.block, revision)
        elif isinstance(write, DeleteBlock):
            del cluster.blocks[write.cidr]
        elif isinstance(write, PutTopologyRange):
            cluster.ranges[write.range.cidr] = Versioned(write.range, revision)
            (cluster.unlisted.discard if write.listed else cluster.unlisted.add)(write.range.cidr)
        elif isinstance(write, DeleteTopologyRange):
            del cluster.ranges[write.range.cidr]
            cluster.unlisted.discard(write.range.cidr)
    cluster.indexed()


def claim(cluster: InMemoryView, node: str, rack: str | None, revision: int) -> IPNetwork:
    """One pod on ``node`` (label rack=``rack``) that needs a new block; its block."""
    cluster.node = node
    cluster.labels = {} if rack is None else {"rack": rack}
    for cidr, held in list(cluster.blocks.items()):  # this node's blocks are full
        if held.value.affinity == node:
            cluster.blocks[cidr] = Versioned(full(str(cidr), node), held.mod_revision)
    call = add(f"pod-{revision}")
    txn = TxnPlan(cluster.pools)
    assert planner(node).plan(cluster, call, txn) is False
    commit(cluster, txn, revision)
    return call.addresses[0].block


def shared(**config: object) -> InMemoryView:
    return view("n0", SHARED, labels={"rack": "0"}, **config)


def test_a_values_first_claim_takes_a_range_with_the_block() -> None:
    cluster = shared()
    call = add("a")
    txn = plan(cluster, call)
    block_cidr = call.addresses[0].block
    [(span, write)] = txn.ranges.items()
    assert isinstance(write, PutTopologyRange) and write.expect_revision == 0
    assert write.range == TopologyRange(span, "shared", "0") and span.prefixlen == 26
    assert span.supernet_of(block_cidr)


def test_later_claims_stay_in_the_values_range_and_guard_it() -> None:
    cluster = shared()
    first = claim(cluster, "n0", "0", revision=5)
    span = SHARED.topology_range(first)
    second = claim(cluster, "n1", "0", revision=6)
    assert span.supernet_of(second) and second != first
    cluster.node, cluster.labels = "n2", {"rack": "0"}
    call = add("c")
    txn = plan(cluster, call, "n2")
    # A claim that leaves room compares the holder as the first claim wrote it, and
    # writes nothing of the range: claims of one value never race each other on it.
    assert span not in txn.ranges and txn.range_guards == {span: 5}
    assert RangeHeld(span, 5) in txn.writes()


def test_a_full_range_is_followed_by_the_adjacent_one() -> None:
    cluster = shared()
    blocks = [claim(cluster, f"n{i}", "0", revision=10 + i) for i in range(5)]
    spans = {SHARED.topology_range(b) for b in blocks}
    assert len(spans) == 2  # four /28 blocks fill a /26
    low, high = sorted(spans)
    assert int(high.network_address) - int(low.network_address) == 64  # adjacent: they merge
    assert list(ipaddress.collapse_addresses(spans))[0].prefixlen == 25


def test_racks_interleaved_on_one_pool_stay_apart() -> None:
    # 9 nodes in 3 racks claiming in turn (the measure): each rack inside one /26.
    cluster = shared()
    owned: dict[str, list[IPNetwork]] = {"0": [], "1": [], "2": []}
    revision = 1
    for node in range(9):
        rack = str(node % 3)
        owned[rack].append(claim(cluster, f"n{node}", rack, revision))
        revision += 1
    for rack, blocks in owned.items():
        prefixes = list(ipaddress.collapse_addresses(blocks))  # type: ignore[arg-type]
        assert len(prefixes) <= 2, (rack, prefixes)
        assert len({SHARED.topology_range(b) for b in blocks}) == 1, (rack, blocks)


def test_nodes_without_the_label_form_their_own_value() -> None:
    cluster = shared()
    labelled = claim(cluster, "n0", "0", revision=1)
    unlabelled = claim(cluster, "n1", None, revision=2)
    assert SHARED.topology_range(labelled) != SHARED.topology_range(unlabelled)
    assert cluster.ranges[SHARED.topology_range(unlabelled)].value.value is None


def test_a_range_whose_last_block_is_dropped_goes_back_to_the_pool() -> None:
    cluster = shared()
    cidr = claim(cluster, "n0", "0", revision=3)
    span = SHARED.topology_range(cidr)
    one = block(str(cidr), "n0", o1="net/a/eth0")
    cluster.add(one, revision=4)
    cluster.handles["net/a/eth0"] = Versioned(
        Handle("net/a/eth0", "n0", (HandleAddress(one.address(1), cidr, "shared"),), {}), 4)
    cluster.pools = (dataclasses.replace(SHARED, disabled=True),)  # the empty block is dropped
    txn = TxnPlan(cluster.pools)
    assert planner("n0").plan(cluster, ReleaseCall("net/a/eth0"), txn) is False
    assert txn.blocks[cidr][0] is None
    assert txn.ranges[span] == DeleteTopologyRange(TopologyRange(span, "shared", "0"), 3)


def test_a_claim_that_fills_its_range_unlists_it() -> None:
    cluster = shared()
    blocks = [claim(cluster, f"n{i}", "0", revision=10 + i) for i in range(4)]
    span = SHARED.topology_range(blocks[0])
    assert {SHARED.topology_range(b) for b in blocks} == {span}
    assert span in cluster.unlisted and cluster.value_ranges("shared", "0") == []
    fifth = claim(cluster, "n9", "0", revision=20)  # found from the value's point: adjacent
    assert abs(int(SHARED.topology_range(fifth).network_address)
               - int(span.network_address)) == 64


def test_borrowing_prefers_blocks_of_the_same_value() -> None:
    cluster = view("n0", SHARED, labels={"rack": "0"}, max_blocks_per_host=0)
    for i, (node, rack) in enumerate([("m1", "1"), ("m0", "0")]):
        span = net(f"10.5.0.{64 * i}/26")
        cluster.ranges[span] = Versioned(TopologyRange(span, "shared", rack), 1)
        cluster.add(block(f"10.5.0.{64 * i}/28", node, o1="x"))
    cluster.indexed()
    call = add("a")
    plan(cluster, call)
    assert net("10.5.0.64/26").supernet_of(call.addresses[0].block)  # rack 0's, not rack 1's


@pytest.mark.parametrize("spec, message", [
    ({"topologyKey": "bad key!"}, "topologyKey: invalid label key"),
    ({"topologyKey": "rack", "topologyBlockSize": 23}, "from 24 (the pool's) to 28"),
    ({"topologyKey": "rack", "topologyBlockSize": 29}, "from 24 (the pool's) to 28"),
    ({"topologyKey": "rack", "topologyBlockSize": "26"}, "not the text '26'"),
    ({"topologyBlockSize": 26}, "topologyBlockSize needs a topologyKey"),
])
def test_bad_topology_fields_name_the_field_and_the_bound(spec: dict[str, object],
                                                          message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        IPPool.from_dict("p", {"cidr": "10.0.0.0/24", "blockSize": 28, **spec})
    assert message in caught.value.message


def test_in_a_topology_pool_only_empty_blocks_of_the_values_ranges_are_reclaimed() -> None:
    cluster = shared(strict_affinity=True, ip_cooldown_seconds=0)
    for i, rack in enumerate("0123"):
        span = net(f"10.5.0.{64 * i}/26")
        cluster.ranges[span] = Versioned(TopologyRange(span, "shared", rack), 1)
        cluster.unlisted.add(span)  # every range full: nothing left to claim
        for k in range(4):
            owner = f"r{rack}-{k}"
            cluster.nodes[owner] = {"rack": rack}
            cluster.add(full(f"10.5.0.{64 * i + 16 * k}/28", owner))
    cluster.add(block("10.5.0.64/28", "r1-0"))  # empty, but rack 1's
    cluster.indexed()
    with pytest.raises(PoolExhausted, match="no empty block to reclaim"):
        plan(cluster, add("a"))
    cluster.add(block("10.5.0.16/28", "r0-1"))  # empty, and in rack 0's range
    cluster.indexed()
    call = add("b")
    txn = plan(cluster, call)
    assert call.addresses[0].block == net("10.5.0.16/28")
    assert txn.reclaimed == {net("10.5.0.16/28")}
