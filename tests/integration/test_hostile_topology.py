"""Priorities, empty-block reclaim and topology ranges, driven as a hostile operator would.

Real etcd, real engines, the real CLI. Whatever happens (nodes retired or
relabelled, pools deleted and made again, racks claiming while ranges go back,
broken ranges repaired), a topology range holds blocks of one label value, no
address is handed out twice, and a range with no block left goes back to the
pool, where another value can take it. The daemons' side is in
``test_hostile_daemons.py``, bad input in ``test_hostile_input.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json

import pytest

from tests.daemons import ctl as ctl_input
from tests.integration.test_engine import audit, ctl, net, request, seed
from tests.integration.test_topology import allocate_at_once
from topoipam.daemon.admin import retire_node
from topoipam.daemon.core.errors import PoolExhausted
from topoipam.daemon.core.holdings import Block, TopologyRange
from topoipam.daemon.core.model import IPAMConfig, IPPool, Node
from topoipam.daemon.core.writes import PutAffinity, PutBlock, PutFreeMark, PutTopologyRange
from topoipam.daemon.engine import AllocationEngine
from topoipam.daemon.store import EtcdStore

ONE_RANGE = IPPool("shared", net("10.80.0.0/26"), 28, topology_key="rack",
                   topology_block_size=26)


async def allocate(store: EtcdStore, node: str, *pods: str) -> list[str]:
    """``pods`` allocated on ``node`` by an engine of its own; their addresses."""
    engine = AllocationEngine(store, node)
    try:
        return [str((await engine.allocate(request(pod))).addresses[0].ip) for pod in pods]
    finally:
        await engine.close()


async def release(store: EtcdStore, node: str, *pods: str) -> None:
    engine = AllocationEngine(store, node)
    try:
        for pod in pods:
            await engine.release(f"net/{pod}/eth0")
    finally:
        await engine.close()


async def rack0_range_emptied(store: EtcdStore) -> None:
    """Pool ONE_RANGE, n0 (rack 0) and n1 (rack 1): n0 takes the range with a pod that
    leaves; its block stays, empty (its warm reserve), and holds the range."""
    await seed(store, ONE_RANGE, IPAMConfig(strict_affinity=True),
               Node("n0", {"rack": "0"}), Node("n1", {"rack": "1"}))
    await allocate(store, "n0", "a")
    await release(store, "n0", "a")


async def one_value_per_range(store: EtcdStore, pool: IPPool) -> dict[object, str | None]:
    """Every block of ``pool`` lies in a range held by its node's value, and every held
    range of it has a block; the ranges and their values."""
    nodes = {n.value.name: n.value.labels for n in await store.list_nodes()}
    held = {r.value.cidr: r.value for r in await store.list_ranges()
            if r.value.cidr.version == pool.family
            and r.value.cidr.subnet_of(pool.cidr)}  # type: ignore[arg-type]
    used: set[object] = set()
    for versioned in await store.list_blocks(pool.cidr):
        block = versioned.value
        span = pool.topology_range(block.cidr)
        assert span in held, f"block {block.cidr} lies in range {span}, which nobody holds"
        assert held[span].pool == pool.name, (span, held[span])
        if block.affinity is not None:
            value = nodes.get(block.affinity, {}).get(pool.topology_key)
            assert held[span].value == value, (
                f"block {block.cidr} of {block.affinity} ({pool.topology_key}={value}) lies in "
                f"range {span} of {pool.topology_key}={held[span].value}")
        used.add(span)
    assert set(held) <= used, f"ranges held with no block: {set(held) - used}"
    return {span: r.value for span, r in held.items()}


def clean_check(env: dict[str, str]) -> None:
    done = ctl(env, "ipam", "check")
    assert done.returncode == 0 and "warning" not in done.stdout.lower(), done.stdout


# ---------------------------------------------------------------------- ranges given back
@pytest.mark.asyncio
async def test_a_retired_nodes_range_goes_back_to_the_pool(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    await rack0_range_emptied(store)
    await retire_node(store, "n0")
    assert await store.list_ranges() == [], "the range outlived its last block"
    [address] = await allocate(store, "n1", "b")  # rack 1 takes the range
    assert ipaddress.ip_address(address) in ONE_RANGE.cidr
    assert await one_value_per_range(store, ONE_RANGE) == {ONE_RANGE.cidr: "1"}
    await asyncio.to_thread(clean_check, ctl_env)


@pytest.mark.asyncio
async def test_a_pool_deleted_and_made_again_over_the_same_cidr_has_its_ranges_free(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    await rack0_range_emptied(store)
    done = await asyncio.to_thread(ctl, ctl_env, "delete", "ippool", "shared")
    assert done.returncode == 0, done.stderr
    assert await store.list_ranges() == [], "the deleted pool's range is still held"
    manifest = ("apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: again}\n"
                "spec: {cidr: 10.80.0.0/26, blockSize: 28, topologyKey: rack, "
                "topologyBlockSize: 26}\n")
    done = await asyncio.to_thread(ctl_input, ctl_env, "apply", "-f", "-", input=manifest)
    assert done.returncode == 0, done.stderr
    await allocate(store, "n1", "b")
    again = IPPool("again", ONE_RANGE.cidr, 28, topology_key="rack", topology_block_size=26)
    assert await one_value_per_range(store, again) == {ONE_RANGE.cidr: "1"}
    await asyncio.to_thread(clean_check, ctl_env)


# ---------------------------------------------------------------------- many claimers
@pytest.mark.asyncio
async def test_racks_claiming_and_giving_back_at_once_never_share_a_range(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    """Three racks and unlabelled nodes claim at once from one pool, while rack 2 is cut off
    the pool (its blocks dropped as its pods leave, their ranges given back) and the others
    take what it gives back."""
    pool = IPPool("shared", net("10.81.0.0/24"), 28, topology_key="rack",
                  topology_block_size=26)
    labels = {f"n{i}": ({"rack": str(i % 3)} if i < 9 else {}) for i in range(12)}
    await seed(store, pool, IPAMConfig(strict_affinity=True, ip_cooldown_seconds=0),
               *(Node(name, value) for name, value in labels.items()))
    engines = {name: AllocationEngine(store, name) for name in labels}
    try:
        await asyncio.gather(*(engine.allocate(request(f"{name}-{pod}"))
                               for pod in range(10) for name, engine in engines.items()))
        cut = dataclasses.replace(pool, node_selector='rack != "2"')
        await seed(store, cut)
        rack2 = [name for name, value in labels.items() if value.get("rack") == "2"]
        others = [name for name in labels if name not in rack2]

        async def leave(name: str) -> None:
            for pod in range(10):
                await engines[name].release(f"net/{name}-{pod}/eth0")

        async def arrive(name: str) -> None:
            for pod in range(10, 16):
                try:
                    await engines[name].allocate(request(f"{name}-{pod}"))
                except PoolExhausted:
                    pass  # the pool may be spent for a while: never wrong, only full

        await asyncio.gather(*(leave(name) for name in rack2), *(arrive(n) for n in others))
        for name in rack2:
            await engines[name].release_unwanted_blocks()
    finally:
        for engine in engines.values():
            await engine.close()
    held = await one_value_per_range(store, cut)
    assert "2" not in held.values(), held
    assert await audit(store) > 0
    await asyncio.to_thread(clean_check, ctl_env)


# ---------------------------------------------------------------------- relabelled nodes
@pytest.mark.asyncio
async def test_a_relabelled_node_keeps_its_pods_but_moves_to_its_new_values_ranges(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    pool = IPPool("shared", net("10.84.0.0/24"), 28, topology_key="rack",
                  topology_block_size=26)
    await seed(store, pool, IPAMConfig(strict_affinity=True, ip_cooldown_seconds=0),
               Node("n0", {"rack": "0"}))
    before = await allocate(store, "n0", *(f"a{i}" for i in range(20)))  # two blocks
    old = {pool.topology_range(ipaddress.ip_network(f"{a}/28", strict=False)) for a in before}
    assert len(old) == 1
    await seed(store, Node("n0", {"rack": "1"}))
    after = await allocate(store, "n0", *(f"b{i}" for i in range(5)))
    moved = {pool.topology_range(ipaddress.ip_network(f"{a}/28", strict=False)) for a in after}
    assert not moved & old, f"new pods of rack 1's n0 in rack 0's range {old}: {after}"
    held = {r.value.cidr: r.value.value for r in await store.list_ranges()}
    assert all(held[span] == "1" for span in moved), held

    # check routes names the kept blocks: they break rack 1's aggregation.
    done = await asyncio.to_thread(ctl, ctl_env, "check", "routes", "--by", "rack", "-o", "json")
    assert done.returncode == 1, done.stdout
    report = json.loads(done.stdout)
    [domain] = report["domains"]
    kept = [ipaddress.ip_network(e["prefix"]) for e in domain["exceptions"]
            if e["kind"] == "block"]
    [span] = old
    assert kept and all(span.supernet_of(k) for k in kept), report  # type: ignore[arg-type]
    done = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert done.returncode == 0 and f"topology range {span} of pool shared (rack=0) holds " \
        f"block {kept[0]} of node n0, which has rack=1 (relabelled" in done.stdout, done.stdout

    # Once their pods are gone the kept blocks go, and rack 0's range with them.
    await release(store, "n0", *(f"a{i}" for i in range(20)))
    assert await one_value_per_range(store, pool) == {span: "1" for span in moved}
    await asyncio.to_thread(clean_check, ctl_env)


# ---------------------------------------------------------------------- reclaim
@pytest.mark.asyncio
@pytest.mark.parametrize("what", ["an address cooling down", "a parked sticky address"])
async def test_a_block_holding_a_cooling_or_parked_address_is_never_reclaimed(
        store: EtcdStore, what: str) -> None:
    cooling = what == "an address cooling down"
    pool = IPPool("one", net("10.86.0.0/28"), 28, topology_key="rack")
    await seed(store, pool, Node("a", {"rack": "0"}), Node("b", {"rack": "0"}),
               IPAMConfig(strict_affinity=True, ip_cooldown_seconds=600 if cooling else 0,
                          sticky_hold_seconds=0 if cooling else 600))
    owner = AllocationEngine(store, "a")
    try:
        identity = "" if cooling else "net/default/web-0/eth0"
        taken = await owner.allocate(request("x", identity=identity))
        await owner.release("net/x/eth0")
    finally:
        await owner.close()
    with pytest.raises(PoolExhausted, match="no empty block to reclaim"):
        await allocate(store, "b", "y")
    [block] = [b.value for b in await store.list_blocks()]
    assert block.affinity == "a"
    if not cooling:  # the identity's next ADD gets its address back
        owner = AllocationEngine(store, "a")
        try:
            back = await owner.allocate(request("z", identity=identity))
        finally:
            await owner.close()
        assert back.addresses[0].ip == taken.addresses[0].ip


# ---------------------------------------------------------------------- explain node
def steps(env: dict[str, str], node: str) -> list[str]:
    done = ctl(env, "explain", "node", node)
    assert done.returncode == 0, done.stderr
    return [line.strip() for line in done.stdout.splitlines()]


@pytest.mark.asyncio
async def test_explain_node_says_where_the_nodes_value_can_claim_and_reclaim(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    await seed(store, ONE_RANGE, IPAMConfig(strict_affinity=True, ip_cooldown_seconds=0),
               *(Node(f"n{i}", {"rack": rack}) for i, rack in enumerate("010")))
    await allocate(store, "n0", "a")  # rack 0 holds the pool's only range, with room
    rack1 = await asyncio.to_thread(steps, ctl_env, "n1")
    assert "2. no new blocks: no unclaimed block left in: shared (for rack=1)" in rack1, rack1
    rack0 = await asyncio.to_thread(steps, ctl_env, "n2")
    assert "2. claim a new block in: shared" in rack0, rack0
    await allocate(store, "n2", *(f"b{i}" for i in range(47)))  # the range is full
    await release(store, "n0", "a")  # n0's block is empty: rack 0's n2 may reclaim it
    rack0 = await asyncio.to_thread(steps, ctl_env, "n2")
    assert ("2. no new blocks: no unclaimed block left in: shared (for rack=0); reclaim an "
            "empty block of another node in: shared (1 now)") in rack0, rack0
    rack1 = await asyncio.to_thread(steps, ctl_env, "n1")
    assert "2. no new blocks: no unclaimed block left in: shared (for rack=1)" in rack1, rack1


# ---------------------------------------------------------------------- ipam check
@pytest.mark.asyncio
async def test_ipam_check_warns_of_broken_ranges_and_repair_index_fixes_them(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    pool = IPPool("shared", net("10.89.0.0/24"), 28, topology_key="rack",
                  topology_block_size=26)
    await seed(store, pool, Node("n0", {"rack": "0"}))
    await allocate(store, "n0", "a")  # rack 0 takes a range
    [claimed] = [r for r in await store.list_ranges()]
    leaked, unheld, gone = [s for s in pool.cidr.subnets(new_prefix=26)
                            if s != claimed.value.cidr]
    lost = Block.empty(next(unheld.subnets(new_prefix=28)), "n0")  # as restores left them
    assert (await store.commit([
        PutTopologyRange(TopologyRange(leaked, "shared", "1"), 0),
        PutBlock(lost, 0), PutAffinity("n0", lost.cidr), PutFreeMark(lost.cidr, "n0"),
        PutTopologyRange(TopologyRange(gone, "gone", "0"), 0),
        PutTopologyRange(claimed.value, claimed.mod_revision, listed=False),  # room, unlisted
    ])).succeeded
    done = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert done.returncode == 0, done.stdout
    warned = [line for line in done.stdout.splitlines() if "topology range" in line]
    assert any(f"{leaked} of pool shared is held by rack=1 but has no block" in line
               for line in warned), warned
    assert any(f"{unheld} of pool shared holds block(s) {lost.cidr} (n0) but nobody holds "
               "it" in line for line in warned), warned
    assert any(f"{gone} is held for pool gone" in line for line in warned), warned
    assert any(f"{claimed.value.cidr} of pool shared (rack=0) has an unclaimed block but is "
               "not listed" in line for line in warned), warned
    assert len(warned) == 4, warned
    fixed = await asyncio.to_thread(ctl, ctl_env, "ipam", "repair-index")
    assert fixed.returncode == 0, fixed.stderr
    await asyncio.to_thread(clean_check, ctl_env)
    assert await one_value_per_range(store, pool) == {claimed.value.cidr: "0", unheld: "0"}
    listed = await store.value_ranges("shared", "0")
    assert {r.value.cidr for r in listed} == {claimed.value.cidr, unheld}


@pytest.mark.asyncio
@pytest.mark.parametrize("round_", range(3))
async def test_a_range_given_back_while_nodes_of_its_value_claim_in_it(
        store: EtcdStore, ctl_env: dict[str, str], round_: int) -> None:
    """Six nodes hold the only blocks of their rack's one range and leave (the pool stops
    selecting them: their blocks go as their pods do, the last one gives the range back)
    while six others of the rack claim in it: whichever commits first, no block is ever
    left in a range nobody holds, and no range is held with no block."""
    pool = IPPool("shared", net("10.94.0.0/24"), 28, '!has(leaving)', topology_key="rack",
                  topology_block_size=24)
    leavers, joiners = [f"l{i}" for i in range(6)], [f"j{i}" for i in range(6)]
    await seed(store, pool, IPAMConfig(strict_affinity=True, ip_cooldown_seconds=0),
               *(Node(name, {"rack": "0"}) for name in leavers + joiners))
    for name in leavers:
        await allocate(store, name, f"{name}-pod")
    await seed(store, *(Node(name, {"rack": "0", "leaving": "yes"}) for name in leavers))
    engines = {name: AllocationEngine(store, name) for name in leavers + joiners}
    try:
        await asyncio.gather(
            *(engines[name].release(f"net/{name}-pod/eth0") for name in leavers),
            *(engines[name].allocate(request(f"{name}-pod")) for name in joiners))
    finally:
        for engine in engines.values():
            await engine.close()
    assert await one_value_per_range(store, pool) == {pool.cidr: "0"}
    blocks = await store.list_blocks()
    assert {b.value.affinity for b in blocks} == set(joiners)
    assert await audit(store) == len(joiners)
    await asyncio.to_thread(clean_check, ctl_env)


@pytest.mark.asyncio
async def test_many_nodes_of_one_value_claiming_at_once_do_not_lose_their_races(
        store: EtcdStore) -> None:
    """64 nodes of one rack (more than a call's 32 lost races) claim their first block at
    once: claims inside the value's range compare its holder and never write it, so they do
    not race each other there."""
    pool = IPPool("shared", net("10.91.0.0/20"), 28, topology_key="rack",
                  topology_block_size=22)
    nodes = [f"n{i}" for i in range(64)]
    await seed(store, pool, IPAMConfig(strict_affinity=True),
               *(Node(name, {"rack": "0"}) for name in nodes))
    await allocate_at_once(store, nodes, 20)
    assert await audit(store) == 64 * 20
    assert set((await one_value_per_range(store, pool)).values()) == {"0"}


