"""Priorities, empty-block reclaim and topology ranges, driven as a hostile operator would.

Real etcd, real engines and daemons, the real CLI. Whatever happens (nodes
retired or relabelled, pools deleted and made again, daemons racing for the
same block, restores), a topology range holds blocks of one label value, no
address is handed out twice, and a range with no block left goes back to the
pool, where another value can take it.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from tests.daemons import ctl as ctl_input
from tests.integration.test_engine import ctl, net, request, seed
from topoipam.daemon.admin import retire_node
from topoipam.daemon.core.model import IPAMConfig, IPPool, Node
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


async def one_value_per_range(store: EtcdStore, pool: IPPool) -> dict[object, str | None]:
    """Every block of ``pool`` lies in a range held by its node's value, and every held
    range of it has a block; the ranges and their values."""
    nodes = {n.value.name: n.value.labels for n in await store.list_nodes()}
    held = {r.value.cidr: r.value for r in await store.list_ranges()
            if r.value.cidr.subnet_of(pool.cidr)}  # type: ignore[arg-type]
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
    await seed(store, ONE_RANGE, IPAMConfig(strict_affinity=True),
               Node("n0", {"rack": "0"}), Node("n1", {"rack": "1"}))
    await allocate(store, "n0", "a")
    await release(store, "n0", "a")  # n0's block stays, empty (its warm reserve)
    await retire_node(store, "n0")
    assert await store.list_ranges() == [], "the range outlived its last block"
    [address] = await allocate(store, "n1", "b")  # rack 1 takes the range
    assert ipaddress.ip_address(address) in ONE_RANGE.cidr
    assert await one_value_per_range(store, ONE_RANGE) == {ONE_RANGE.cidr: "1"}
    await asyncio.to_thread(clean_check, ctl_env)


@pytest.mark.asyncio
async def test_a_pool_deleted_and_made_again_over_the_same_cidr_has_its_ranges_free(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    await seed(store, ONE_RANGE, IPAMConfig(strict_affinity=True),
               Node("n0", {"rack": "0"}), Node("n1", {"rack": "1"}))
    await allocate(store, "n0", "a")
    await release(store, "n0", "a")
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
