"""Priorities, empty-block reclaim and topology ranges, driven as a hostile operator would.

Real etcd, real engines and daemons, the real CLI. Whatever happens (nodes
retired or relabelled, pools deleted and made again, daemons racing for the
same block, restores), a topology range holds blocks of one label value, no
address is handed out twice, and a range with no block left goes back to the
pool, where another value can take it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EtcdServer, temporary_etcd
from tests.daemons import ctl as ctl_input
from tests.etcd_cluster import etcdctl
from tests.integration.test_engine import audit, ctl, net, request, seed
from tests.integration.test_faults import allocate as faults_allocate
from tests.integration.test_reliability import handles, new_daemon, restore, wait_for
from topoipam.daemon.admin import retire_node
from topoipam.daemon.core.errors import PoolExhausted
from topoipam.daemon.core.model import IPAMConfig, IPPool, Node
from topoipam.daemon.engine import AllocationEngine
from topoipam.daemon.store import EtcdOptions, EtcdStore


@pytest.fixture
def private_etcd() -> Iterator[EtcdServer]:
    with temporary_etcd("hostile-") as server:
        yield server


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


# ---------------------------------------------------------------------- restores
RESTORE_POOL = IPPool("shared", net("10.83.0.0/24"), 28, topology_key="rack",
                      topology_block_size=26)


def ranges_after(endpoint: str, prefix: str, *allocations: tuple[str, str]
                 ) -> dict[object, str | None]:
    """Allocate (node, pod) pairs with engines of their own, then one_value_per_range."""
    async def run() -> dict[object, str | None]:
        async with EtcdStore(EtcdOptions(endpoints=(endpoint,)), prefix) as store:
            for node, pod in allocations:
                await allocate(store, node, pod)
            return await one_value_per_range(store, RESTORE_POOL)
    return asyncio.run(run())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_block_reasserted_after_a_restore_keeps_its_range(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """etcd restored to before a rack 0 node's first claim: the daemon puts the block back
    from its record, and its range with it, so a rack 1 node cannot take that range."""
    env = {**os.environ, "TOPOIPAM_ETCD_ENDPOINTS": private_etcd.endpoint,
           "TOPOIPAM_PREFIX": prefix}
    manifest = ("apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: shared}\n"
                "spec: {cidr: 10.83.0.0/24, blockSize: 28, topologyKey: rack, "
                "topologyBlockSize: 26}\n")
    assert ctl_input(env, "apply", "-f", "-", input=manifest).returncode == 0
    assert ctl(env, "ipam", "configure", "--warm-addresses", "0").returncode == 0
    for node, rack in (("node-r", "0"), ("node-s", "1")):
        assert ctl(env, "label", "nodes", node, f"rack={rack}", "--create").returncode == 0
    daemon = new_daemon(tmp_path, "r", "node-r", private_etcd.endpoint, prefix).start()
    try:
        snapshot = str(tmp_path / "backup.db")
        etcdctl(private_etcd.endpoint, "snapshot", "save", snapshot)
        lost = [faults_allocate(daemon, f"lost-{i}") for i in range(3)]
        time.sleep(0.1)  # the record is written off the critical path
        restore(private_etcd, snapshot)
        wait_for(lambda: "re-asserted the record" in daemon.log(), 20, "no re-assertion")
        assert set(lost) <= {str(a.ip) for h in handles(private_etcd.endpoint, prefix).values()
                             for a in h.addresses}
        held = ranges_after(private_etcd.endpoint, prefix,
                            *(("node-s", f"s-{i}") for i in range(20)))
        span = RESTORE_POOL.topology_range(ipaddress.ip_network(f"{lost[0]}/28", strict=False))
        assert held.get(span) == "0" and sorted(held.values()) == ["0", "1"], held
        check = ctl(env, "ipam", "check")
        assert check.returncode == 0 and "warning" not in check.stdout, check.stdout
    finally:
        daemon.stop()


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

    # Once their pods are gone the kept blocks go, and rack 0's range with them.
    await release(store, "n0", *(f"a{i}" for i in range(20)))
    assert await one_value_per_range(store, pool) == {span: "1" for span in moved}
    await asyncio.to_thread(clean_check, ctl_env)
