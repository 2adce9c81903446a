"""Rack-aligned blocks in one shared pool, with real etcd and real engines.

Nine nodes in three racks claim interleaved from one /24 of /28 blocks: with
``topologyKey: rack`` and ``topologyBlockSize: 26`` each rack's blocks stay
inside one /26 (``check routes --by rack``: at most two prefixes a rack);
without it they interleave. Concurrent claims from many nodes never share a
range across racks, and a changed topologyKey on a pool with blocks is refused.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from tests.daemons import ctl as ctl_input
from tests.integration.test_engine import audit, ctl, net, request, seed
from topoipam.daemon.core.model import IPAMConfig, IPPool, Node
from topoipam.daemon.engine import AllocationEngine
from topoipam.daemon.store import EtcdStore

RACKS = ("0", "1", "2")


def routes(ctl_env: dict[str, str]) -> dict[str, dict[str, object]]:
    done = ctl(ctl_env, "check", "routes", "--by", "rack", "-o", "json")
    return {d["value"]: d for d in json.loads(done.stdout)["domains"]}


async def fill_interleaved(store: EtcdStore, pool: IPPool) -> None:
    """Nine nodes (rack = node % 3), each claiming one /28 in turn, twice round."""
    await seed(store, pool, IPAMConfig(strict_affinity=True),
               *(Node(f"n{i}", {"rack": RACKS[i % 3]}) for i in range(9)))
    engines = [AllocationEngine(store, f"n{i}") for i in range(9)]
    try:
        for round_ in range(2):  # the second round claims a second block (13 usable each)
            for engine in engines:
                for pod in range(13 if round_ == 0 else 1):
                    await engine.allocate(request(f"{engine.node}-{round_}-{pod}"))
    finally:
        for engine in engines:
            await engine.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("topology", [True, False], ids=["topologyKey", "without"])
async def test_nine_nodes_in_three_racks_on_one_pool(
        store: EtcdStore, ctl_env: dict[str, str], topology: bool) -> None:
    extra = {"topology_key": "rack", "topology_block_size": 26} if topology else {}
    await fill_interleaved(store, IPPool("shared", net("10.40.0.0/24"), 28, **extra))
    domains = await asyncio.to_thread(routes, ctl_env)
    assert sorted(domains) == list(RACKS)
    blocks = {rack: [net(c) for c in d["aggregate"]] for rack, d in domains.items()}
    if topology:
        for rack, prefixes in blocks.items():
            assert domains[rack]["prefixes"] <= 2, domains[rack]
            assert len({p.supernet(new_prefix=26) for p in prefixes}) == 1, (rack, prefixes)
        explained = (await asyncio.to_thread(ctl, ctl_env, "explain", "node", "n0")).stdout
        span = blocks["0"][0].supernet(new_prefix=26)
        assert (f"topology: pool shared keeps the blocks of rack=0 in its /26 ranges: {span}"
                in explained), explained
    else:  # the measure before topologyKey: every rack scattered over the pool
        assert sum(d["prefixes"] for d in domains.values()) >= 6, domains
    assert await audit(store) == 9 * 14
    check = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert check.returncode == 0, check.stdout


async def allocate_at_once(store: EtcdStore, nodes: list[str], pods: int) -> None:
    """``pods`` pods on each of ``nodes``, all at once, by an engine per node."""
    engines = [AllocationEngine(store, name) for name in nodes]
    try:
        await asyncio.gather(*(engine.allocate(request(f"{engine.node}-{pod}"))
                               for pod in range(pods) for engine in engines))
    finally:
        for engine in engines:
            await engine.close()


@pytest.mark.asyncio
async def test_concurrent_claims_of_many_racks_never_share_a_range(store: EtcdStore) -> None:
    pool = IPPool("shared", net("10.41.0.0/22"), 28, topology_key="rack", topology_block_size=26)
    await seed(store, pool, IPAMConfig(strict_affinity=True),
               *(Node(f"n{i}", {"rack": str(i % 6)}) for i in range(18)))
    await allocate_at_once(store, [f"n{i}" for i in range(18)], 16)
    racks = {f"n{i}": str(i % 6) for i in range(18)}
    by_range: dict[object, set[str]] = {}
    for block in await store.list_blocks():
        span = block.value.cidr.supernet(new_prefix=26)
        assert block.value.affinity is not None
        by_range.setdefault(span, set()).add(racks[block.value.affinity])
    assert all(len(values) == 1 for values in by_range.values()), by_range
    held = {r.value.cidr: r.value.value for r in await store.list_ranges()}
    assert {span: values.pop() for span, values in by_range.items()} == held
    assert await audit(store) == 18 * 16


@pytest.mark.asyncio
async def test_a_changed_topology_on_a_pool_with_blocks_is_refused(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    def apply(spec: str) -> subprocess.CompletedProcess[str]:
        manifest = ("apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: shared}\n"
                    f"spec: {{cidr: 10.42.0.0/24, blockSize: 28{spec}}}\n")
        return ctl_input(ctl_env, "apply", "-f", "-", input=manifest)

    assert (await asyncio.to_thread(apply, ", topologyKey: zone")).returncode == 0
    assert (await asyncio.to_thread(apply, ", topologyKey: rack")).returncode == 0  # no blocks
    engine = AllocationEngine(store, "n0")
    try:
        await engine.allocate(request("a"))
    finally:
        await engine.close()
    for spec in (", topologyKey: zone", ", topologyKey: rack, topologyBlockSize: 25", ""):
        done = await asyncio.to_thread(apply, spec)
        assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "topologyKey and topologyBlockSize cannot change" in done.stderr, done.stderr
    [pool] = [p.value for p in await store.list_pools()]
    assert (pool.topology_key, pool.topology_prefix) == ("rack", 24)  # nothing written
