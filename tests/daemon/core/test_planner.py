"""The planner against an in-memory view: the whole policy, no etcd, in milliseconds.

Each test builds a small cluster as plain values (:class:`InMemoryView`),
plans one call and looks at the transaction it would commit: which block,
which address, which guards.
"""

from __future__ import annotations

import ipaddress

import pytest

from topoipam.daemon.core.allocator import Reservations, TxnPlan
from topoipam.daemon.core.calls import (
    AllocateCall,
    AllocationRequest,
    Defer,
    ReleaseCall,
    ReleaseIdentityCall,
)
from topoipam.daemon.core.claims import WHOLE_POOL_RECHECK_SECONDS
from topoipam.daemon.core.errors import (
    AddressUnavailable,
    IdentityInUse,
    NodeAlive,
    NoPoolForNode,
    PoolExhausted,
)
from topoipam.daemon.core.holdings import (
    Attachment,
    Block,
    Handle,
    HandleAddress,
    Identity,
    parked_holder,
)
from topoipam.daemon.core.model import IPAMConfig, IPPool, IPReservation
from topoipam.daemon.core.planner import Planner
from topoipam.daemon.core.view import InMemoryView, NeedRead, ReadingView
from topoipam.daemon.core.writes import (
    DaemonAbsent,
    DeleteHandle,
    PutBlock,
    PutHandle,
    PutIdentity,
    Versioned,
)

net = ipaddress.ip_network
ip = ipaddress.ip_address
NOW = 1_000_000.0
RACK0 = IPPool("rack0", net("10.0.0.0/24"), 26, 'rack == "0"')
RACK1 = IPPool("rack1", net("10.1.0.0/24"), 26, 'rack == "1"')
V6 = IPPool("v6", net("fd00::/120"), 122, 'rack == "0"')


def view(node: str = "n0", *pools: IPPool, labels: dict[str, str] | None = None,
         **config: object) -> InMemoryView:
    return InMemoryView(node, IPAMConfig(**config),  # type: ignore[arg-type]
                        pools or (RACK0,), labels if labels is not None else {"rack": "0"})


def planner(node: str = "n0") -> Planner:
    return Planner(node, lambda: NOW)


def add(pod: str, **options: object) -> AllocateCall:
    return AllocateCall(AllocationRequest(Attachment("net", pod, "eth0"),
                                          **options))  # type: ignore[arg-type]


def plan(cluster: InMemoryView, call: AllocateCall | ReleaseCall | ReleaseIdentityCall,
         node: str = "n0") -> TxnPlan:
    txn = TxnPlan(cluster.pools)
    assert planner(node).plan(cluster, call, txn) is False
    return txn


def block(cidr: str, node: str | None, **held: str) -> Block:
    """A block of ``node`` whose ordinals (``o5="handle"``) are held."""
    value = Block.empty(net(cidr), node)
    for ordinal, holder in held.items():
        value.allocations[int(ordinal[1:])] = holder
        value.unallocated.remove(int(ordinal[1:]))
    return value


def full(cidr: str, node: str | None) -> Block:
    value = Block.empty(net(cidr), node)
    value.allocations = dict.fromkeys(value.unallocated, "net/other/eth0")
    value.unallocated = []
    return value


def addresses(call: AllocateCall) -> list[str]:
    return [str(a.ip) for a in call.addresses]


# ---------------------------------------------------------------------- ADD
def test_own_block_first_free_address_guarded_by_its_revision() -> None:
    cluster = view().add(block("10.0.0.0/26", "n0", o1="net/a/eth0"), revision=7)
    call = add("b")
    txn = plan(cluster, call)
    assert addresses(call) == ["10.0.0.2"] and call.addresses[0].pool == "rack0"
    assert txn.blocks[net("10.0.0.0/26")][1] == 7  # the write compares the revision read
    assert isinstance(txn.handles["net/b/eth0"], PutHandle)
    assert not txn.affinities  # nothing claimed


def test_claim_from_the_room_index_when_own_blocks_are_full() -> None:
    cluster = view().add(full("10.0.0.0/26", "n0")).indexed()
    call = add("b")
    txn = plan(cluster, call)
    claimed = call.addresses[0].block
    assert claimed != net("10.0.0.0/26") and claimed.prefixlen == 26
    assert txn.blocks[claimed][1] == 0  # guarded: the block key must not exist
    assert txn.affinities == {("n0", claimed): True}


def test_borrow_from_another_nodes_block_when_nothing_is_left_to_claim() -> None:
    blocks = [full(f"10.0.0.{64 * i}/26", f"m{i}") for i in range(4)]
    blocks[2] = block("10.0.0.128/26", "m2", o0="x")
    cluster = view(max_blocks_per_host=0).add(*blocks, revision=3).indexed()
    call = add("b")
    txn = plan(cluster, call)
    assert addresses(call) == ["10.0.0.129"]
    assert txn.blocks[net("10.0.0.128/26")][1] == 3 and not txn.affinities


def test_strict_affinity_refuses_to_borrow() -> None:
    blocks = [full(f"10.0.0.{64 * i}/26", "m") for i in range(3)]
    # m's last block has room but is not empty (an empty one would be reclaimed).
    lender = block("10.0.0.192/26", "m", o1="x")
    cluster = view(strict_affinity=True).add(*blocks, lender).indexed()
    with pytest.raises(PoolExhausted, match="strictAffinity forbids borrowing"):
        plan(cluster, add("b"))


def test_exhausted_pools_name_the_node_family_and_pools() -> None:
    cluster = view().add(*(full(f"10.0.0.{64 * i}/26", "m") for i in range(4))).indexed()
    with pytest.raises(PoolExhausted, match=r"n0.*rack0"):
        plan(cluster, add("b"))


def test_no_pool_selects_the_node() -> None:
    with pytest.raises(NoPoolForNode):
        plan(view(labels={"rack": "9"}), add("b"))


def test_pools_follow_the_nodes_labels() -> None:
    cluster = view("n1", RACK0, RACK1, labels={"rack": "1"}).indexed()
    call = add("b")
    plan(cluster, call, "n1")
    assert call.addresses[0].pool == "rack1" and ip("10.1.0.0") < call.addresses[0].ip


def test_reservations_and_gateways_are_never_handed_out() -> None:
    cluster = view().add(block("10.0.0.0/26", "n0"))
    cluster.reservations = Reservations([IPReservation("r", (net("10.0.0.2/31"),))])
    call = add("b", gateways=(ip("10.0.0.4"),))
    plan(cluster, call)
    # .0 is the network, .1 the pool's gateway, .2-.3 reserved, .4 this network's gateway
    assert addresses(call) == ["10.0.0.5"]


def test_dual_stack_plans_both_families_in_one_transaction() -> None:
    cluster = view("n0", RACK0, V6).indexed()
    call = add("b", ipv6=True)
    txn = plan(cluster, call)
    assert [a.ip.version for a in call.addresses] == [4, 6]
    assert len(txn.affinities) == 2
    handle = txn.handles["net/b/eth0"]
    assert isinstance(handle, PutHandle) and len(handle.handle.addresses) == 2


def test_a_specific_address_in_a_block_of_another_node() -> None:
    cluster = view().add(block("10.0.0.64/26", "m1"), revision=4)
    call = add("b", addresses=(ip("10.0.0.70"),))
    txn = plan(cluster, call)
    assert addresses(call) == ["10.0.0.70"] and txn.blocks[net("10.0.0.64/26")][1] == 4
    with pytest.raises(AddressUnavailable, match="not in any enabled pool"):
        plan(cluster, add("c", addresses=(ip("192.168.0.1"),)))


def test_max_blocks_per_host_stops_claims_and_borrows_instead() -> None:
    cluster = view(max_blocks_per_host=1).add(full("10.0.0.0/26", "n0"),
                                              block("10.0.0.64/26", "m1")).indexed()
    call = add("b")
    txn = plan(cluster, call)
    assert call.addresses[0].block == net("10.0.0.64/26") and not txn.affinities


def test_a_stale_room_entry_is_dropped_and_the_search_goes_on() -> None:
    cluster = view().indexed()  # while the pool was empty: its window has room
    (stale,) = cluster.rooms
    cluster.add(*(full(f"10.0.0.{64 * i}/26", "m") for i in range(3)),
                block("10.0.0.192/26", "m1"))
    call = add("b")
    txn = plan(cluster, call)
    assert txn.room_marks[stale] is False  # the wrong entry is deleted on the way
    assert call.addresses[0].block == net("10.0.0.192/26")  # then borrowed


def test_a_stale_view_plans_against_the_revision_it_read() -> None:
    old = view().add(block("10.0.0.0/26", "n0"), revision=5)
    call = add("b")
    txn = plan(old, call)
    put = next(w for w in txn.writes() if isinstance(w, PutBlock))
    assert put.expect_revision == 5  # etcd holds a newer block: this compare fails, re-plan


# ---------------------------------------------------------------------- DEL
def test_release_frees_the_addresses_and_drops_an_unwanted_block() -> None:
    cluster = view(labels={"rack": "9"}).add(block("10.0.0.0/26", "n0", o5="net/b/eth0"))
    cluster.handles["net/b/eth0"] = Versioned(
        Handle("net/b/eth0", "n0", (HandleAddress(ip("10.0.0.5"), net("10.0.0.0/26")),)), 2)
    call = ReleaseCall("net/b/eth0")
    txn = plan(cluster, call)
    assert call.freed == [ip("10.0.0.5")]
    assert txn.handles["net/b/eth0"] == DeleteHandle("net/b/eth0", 2)
    assert txn.blocks[net("10.0.0.0/26")][0] is None  # its pool no longer selects n0
    assert txn.affinities == {("n0", net("10.0.0.0/26")): False}


def test_release_of_an_unknown_handle_is_answered_without_a_write() -> None:
    call = ReleaseCall("net/nobody/eth0")
    assert planner().plan(view(), call, TxnPlan()) is True and call.result == []


def test_a_second_call_on_the_same_handle_waits_for_the_next_transaction() -> None:
    cluster = view().add(block("10.0.0.0/26", "n0"))
    txn = plan(cluster, add("b"))
    with pytest.raises(Defer):
        planner().plan(cluster, ReleaseCall("net/b/eth0"), txn)


# ---------------------------------------------------------------------- sticky
def sticky_cluster(state: str, node: str = "m1", until: float = NOW + 60) -> InMemoryView:
    address = HandleAddress(ip("10.0.0.70"), net("10.0.0.64/26"))
    holder = parked_holder("pod-a") if state == "parked" else "net/old/eth0"
    cluster = view().add(block("10.0.0.64/26", node, o6=holder), revision=3)
    cluster.identities["pod-a"] = Versioned(Identity(
        "pod-a", (address,), state, "net/old/eth0", node,
        until if state == "parked" else None), 9)
    if state == "live":
        cluster.handles["net/old/eth0"] = Versioned(
            Handle("net/old/eth0", node, (address,), {"identity": "pod-a"}), 8)
    return cluster


def test_sticky_take_back_hands_the_parked_address_to_the_new_handle() -> None:
    call = add("new", identity="pod-a")
    txn = plan(sticky_cluster("parked"), call)
    assert addresses(call) == ["10.0.0.70"]
    lent = txn.blocks[net("10.0.0.64/26")][0]
    assert lent is not None and lent.allocations[6] == "net/new/eth0"
    identity = txn.identities["pod-a"]
    assert isinstance(identity, PutIdentity) and identity.identity.state == "live"
    assert identity.expect_revision == 9


def test_sticky_hold_over_frees_the_address_and_takes_a_new_one() -> None:
    call = add("new", identity="pod-a")
    txn = plan(sticky_cluster("parked", until=NOW - 1).indexed(), call)
    assert addresses(call) != ["10.0.0.70"]
    assert 6 in (txn.blocks[net("10.0.0.64/26")][0] or Block.empty(net("10.0.0.64/26"),
                                                                      None)).unallocated


def test_sticky_identity_live_elsewhere_is_refused_then_taken_over() -> None:
    cluster = sticky_cluster("live")
    with pytest.raises(IdentityInUse, match="m1"):
        plan(cluster, add("new", identity="pod-a"))
    cluster.absent["m1"] = 301.0  # stickyTakeoverSeconds is 300 by default
    call = add("new", identity="pod-a")
    txn = plan(cluster, call)
    assert addresses(call) == ["10.0.0.70"] and call.took_over is not None
    assert txn.guards["daemon-absent/m1"] == DaemonAbsent("m1", 1)
    assert txn.handles["net/old/eth0"] == DeleteHandle("net/old/eth0", 8)


def test_sticky_del_parks_the_address_for_the_hold() -> None:
    cluster = sticky_cluster("live", node="n0")
    txn = plan(cluster, ReleaseCall("net/old/eth0"))
    parked = txn.identities["pod-a"]
    assert isinstance(parked, PutIdentity) and parked.identity.parked
    assert parked.identity.parked_until == NOW + 600
    lent = txn.blocks[net("10.0.0.64/26")][0]
    assert lent is not None and lent.allocations[6] == parked_holder("pod-a")


def test_park_by_hand_needs_the_node_lost_or_force() -> None:
    cluster = sticky_cluster("live")
    with pytest.raises(NodeAlive):
        plan(cluster, ReleaseIdentityCall("pod-a", park=True))
    call = ReleaseIdentityCall("pod-a", park=True, force=True)
    plan(cluster, call)
    assert call.freed == [ip("10.0.0.70")]


# ---------------------------------------------------------------------- views
def test_a_reading_view_asks_for_what_it_lacks_and_plans_again_once_given() -> None:
    cluster = sticky_cluster("parked")
    reading = ReadingView(cluster.state(), cached_block=cluster.block)
    call = add("new", identity="pod-a")
    asked = []
    while True:
        txn = TxnPlan(cluster.pools)
        try:
            planner().plan(reading, call, txn)
            break
        except NeedRead as need:
            asked.append(need.read)
            kind, *args = need.read
            reading.reads[need.read] = getattr(cluster, kind)(*args)
    assert asked == [("identity", "pod-a")]  # the parked block was the base's
    assert addresses(call) == ["10.0.0.70"]


def test_readiness_is_the_plan_of_an_add_committed_nowhere() -> None:
    cluster = view().add(*(full(f"10.0.0.{64 * i}/26", "m") for i in range(4))).indexed()
    assert "no free address to borrow" in planner().readiness(cluster, [4], {})
    assert planner().readiness(view().indexed(), [], {}) == ""
    assert planner().readiness(view(labels={}), [4], {}) != ""


def test_a_pool_read_whole_and_found_full_is_not_read_whole_again_for_a_while() -> None:
    cluster = view().add(*(full(f"10.0.0.{64 * i}/26", "m") for i in range(4)))
    clock = [NOW]
    search = Planner("n0", lambda: clock[0])
    for _ in range(2):
        with pytest.raises(PoolExhausted):
            search.plan(cluster, add("b"), TxnPlan(cluster.pools))
    assert ("borrow", "rack0") in search.memory.found_full
    clock[0] += WHOLE_POOL_RECHECK_SECONDS + 1
    assert not search._seen_full("borrow", RACK0)
