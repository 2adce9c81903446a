"""The planner's topology rules against an in-memory view: pool priorities.

A node selected by pools of several priorities is served by the highest
that can give it an address; each rule is one small cluster and one plan.
"""

from __future__ import annotations

import dataclasses

import pytest

from topoipam.daemon.core.errors import InvalidInput, PoolExhausted
from topoipam.daemon.core.holdings import parked_holder
from topoipam.daemon.core.model import IPPool

from .test_planner import RACK0, add, addresses, block, full, net, plan, planner, view

ZONE = IPPool("zone", net("10.9.0.0/24"), 26, 'zone == "a"')
RACK0_FIRST = dataclasses.replace(RACK0, priority=10)
LABELS = {"rack": "0", "zone": "a"}


def tiers(**config: object) -> object:
    return view("n0", RACK0_FIRST, ZONE, labels=LABELS, **config)


def rack_spent(owner: str = "n0") -> list[object]:
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
