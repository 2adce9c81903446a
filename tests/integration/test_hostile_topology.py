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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tests.conftest import EtcdServer, temporary_etcd
from tests.daemons import DaemonProcess
from tests.daemons import ctl as ctl_input
from tests.etcd_cluster import etcdctl
from tests.integration.test_engine import audit, ctl, net, request, seed
from tests.integration.test_faults import allocate as faults_allocate
from tests.integration.test_faults import attachment
from tests.integration.test_reliability import handles, new_daemon, restore, wait_for
from topoipam.daemon.admin import retire_node
from topoipam.daemon.core.errors import PoolExhausted
from topoipam.daemon.core.holdings import Block, Handle, TopologyRange
from topoipam.daemon.core.model import IPAMConfig, IPPool, Node
from topoipam.daemon.core.writes import PutAffinity, PutBlock, PutFreeMark, PutTopologyRange
from topoipam.daemon.engine import AllocationEngine
from topoipam.daemon.store import EtcdOptions, EtcdStore
from topoipam.proto import ipam_pb2


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
    done = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert done.returncode == 0 and f"topology range {span} of pool shared (rack=0) holds " \
        f"block {kept[0]} of node n0, which has rack=1 (relabelled" in done.stdout, done.stdout

    # Once their pods are gone the kept blocks go, and rack 0's range with them.
    await release(store, "n0", *(f"a{i}" for i in range(20)))
    assert await one_value_per_range(store, pool) == {span: "1" for span in moved}
    await asyncio.to_thread(clean_check, ctl_env)


# ---------------------------------------------------------------------- reclaim races
def grpc_add(daemon: DaemonProcess, pod: str) -> str | None:
    """One ADD through the daemon's socket: its address, or None if the pool is spent."""
    try:
        return faults_allocate(daemon, pod, timeout=20)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        return None


def grpc_del(daemon: DaemonProcess, pod: str) -> None:
    with daemon.stub() as stub:
        stub.Release(ipam_pb2.ReleaseRequest(attachment=attachment(pod)), timeout=20)


def blocks_and_handles(endpoint: str, prefix: str
                       ) -> tuple[dict[object, str | None], dict[str, Handle], int]:
    async def read() -> tuple[dict[object, str | None], dict[str, Handle], int]:
        async with EtcdStore(EtcdOptions(endpoints=(endpoint,)), prefix) as store:
            blocks = {b.value.cidr: b.value.affinity for b in await store.list_blocks()}
            found = {h.value.id: h.value for h in await store.list_handles()}
            return blocks, found, await audit(store)
    return asyncio.run(read())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_reclaim_racing_the_owners_own_pods_never_gives_an_address_twice(
        etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]) -> None:
    """Node a's warm reserve holds every block; its pods come and go, leaving blocks empty
    for a moment, while node b, under strictAffinity, can only reclaim them. Whoever wins a
    block, a's pods never land in a block a lost, b's only in blocks b took."""
    manifest = ("apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: small}\n"
                "spec: {cidr: 10.85.0.0/26, blockSize: 28, topologyKey: rack, "
                "topologyBlockSize: 26}\n")
    assert ctl_input(ctl_env, "apply", "-f", "-", input=manifest).returncode == 0
    assert ctl(ctl_env, "ipam", "configure", "--strictaffinity", "true", "--warm-addresses",
               "60", "--ip-cooldown-seconds", "0").returncode == 0
    for node in ("a", "b"):
        assert ctl(ctl_env, "label", "nodes", node, "rack=0", "--create").returncode == 0
    a = new_daemon(tmp_path, "a", "a", etcd.endpoint, prefix).start()
    b = new_daemon(tmp_path, "b", "b", etcd.endpoint, prefix)
    try:
        wait_for(lambda: len(blocks_and_handles(etcd.endpoint, prefix)[0]) == 4, 20,
                 "a's warm reserve did not claim the pool")
        b.start()

        def churn_a(worker: int) -> None:
            for i in range(25):
                pod = f"a{worker}-{i}"
                if grpc_add(a, pod) is not None and i % 2:
                    grpc_del(a, pod)

        def fill_b() -> list[str | None]:
            return [grpc_add(b, f"b-{i}") for i in range(12)]

        with ThreadPoolExecutor(5) as pool:
            churns = [pool.submit(churn_a, w) for w in range(4)]
            got_b = pool.submit(fill_b).result()
            for churn in churns:
                churn.result()
        assert any(got_b), "b never reclaimed a block"
        blocks, found, _ = blocks_and_handles(etcd.endpoint, prefix)
        for handle in found.values():
            for entry in handle.addresses:
                assert blocks[entry.block] == handle.node, (
                    f"{entry.ip} of {handle.id} (node {handle.node}) is in block "
                    f"{entry.block} of {blocks[entry.block]}")
        check = ctl(ctl_env, "ipam", "check")
        assert check.returncode == 0 and "warning" not in check.stdout, check.stdout
    finally:
        b.stop()
        a.stop()


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


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_daemons_of_three_racks_and_unlabelled_nodes_claiming_at_once(
        etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]) -> None:
    """Eight daemons (three racks, two nodes without the label) take 30 pods each at once
    from one topology pool: one value per range, every address once, ipam check clean."""
    manifest = ("apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: shared}\n"
                "spec: {cidr: 10.97.0.0/22, blockSize: 28, topologyKey: rack, "
                "topologyBlockSize: 26}\n")
    assert ctl_input(ctl_env, "apply", "-f", "-", input=manifest).returncode == 0
    assert ctl(ctl_env, "ipam", "configure", "--strictaffinity", "true").returncode == 0
    pool = IPPool("shared", net("10.97.0.0/22"), 28, topology_key="rack",
                  topology_block_size=26)
    racks = {f"n{i}": (["--labels", f"rack={i % 3}"] if i < 6 else []) for i in range(8)}
    daemons = [DaemonProcess(node, str(tmp_path / f"{node}.sock"), etcd.endpoint, prefix,
                             str(tmp_path / f"{node}.log"), labels)
               for node, labels in racks.items()]
    try:
        for daemon in daemons:
            daemon.start(wait=False)
        for daemon in daemons:
            daemon.wait_serving(30)
        with ThreadPoolExecutor(16) as workers:
            got = list(workers.map(lambda job: grpc_add(*job),
                                   [(d, f"{d.node}-{i}") for i in range(30) for d in daemons]))
        assert all(got), "the pool has room for every pod"
        assert len(set(got)) == len(got)
        [held] = pool_ranges(etcd.endpoint, prefix, pool)
        assert set(held.values()) == {"0", "1", "2", None}
        check = ctl(ctl_env, "ipam", "check")
        assert check.returncode == 0 and "warning" not in check.stdout, check.stdout
    finally:
        for daemon in daemons:
            daemon.stop()


# ---------------------------------------------------------------------- all three at once
ALL_THREE = """\
apiVersion: topoipam/v1
kind: IPPool
metadata: {name: rack0-v4}
spec: {cidr: 10.87.0.0/28, blockSize: 28, nodeSelector: rack == "0", priority: 10}
---
apiVersion: topoipam/v1
kind: IPPool
metadata: {name: shared-v4}
spec: {cidr: 10.88.0.0/24, blockSize: 28, topologyKey: rack, topologyBlockSize: 26}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: shared-v6}
spec: {cidr: "fd00:88::/120", blockSize: 124, topologyKey: rack, topologyBlockSize: 122,
       natOutgoing: true}
---
apiVersion: topoipam/v1
kind: IPAMConfig
metadata: {name: default}
spec: {strictAffinity: true, ipCooldownSeconds: 0}
"""


def dual_add(daemon: DaemonProcess, pod: str) -> list[str]:
    with daemon.stub() as stub:
        reply = stub.Allocate(ipam_pb2.AllocateRequest(
            attachment=attachment(pod), assign_ipv4=True, assign_ipv6=True), timeout=20)
    return [str(a.ip) for a in reply.addresses]


def pool_ranges(endpoint: str, prefix: str, *pools: IPPool) -> list[dict[object, str | None]]:
    async def read() -> list[dict[object, str | None]]:
        async with EtcdStore(EtcdOptions(endpoints=(endpoint,)), prefix) as store:
            return [await one_value_per_range(store, pool) for pool in pools]
    return asyncio.run(read())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_priorities_reclaim_and_dual_stack_ranges_with_daemons_restarted(
        etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]) -> None:
    """Two racks, dual stack: rack 0's pods take its priority pool first, then the shared
    pool's rack 0 ranges; rack 1's take their own ranges of both shared pools; a restarted
    daemon goes on where it was; explain names tiers and ranges; ipam check is clean."""
    done = ctl_input(ctl_env, "apply", "-f", "-", input=ALL_THREE)
    assert done.returncode == 0, done.stderr
    v4 = IPPool("shared-v4", net("10.88.0.0/24"), 28, topology_key="rack",
                topology_block_size=26)
    v6 = IPPool("shared-v6", net("fd00:88::/120"), 124, topology_key="rack",
                topology_block_size=122)
    daemons = {node: DaemonProcess(node, str(tmp_path / f"{node}.sock"), etcd.endpoint, prefix,
                                   str(tmp_path / f"{node}.log"), ["--labels", f"rack={rack}"])
               for node, rack in (("n0", "0"), ("n1", "1"))}
    try:
        for daemon in daemons.values():
            daemon.start()
        n0 = [dual_add(daemons["n0"], f"n0-{i}") for i in range(20)]
        n1 = [dual_add(daemons["n1"], f"n1-{i}") for i in range(10)]
        assert all(len(pair) == 2 for pair in n0 + n1)
        rack_pool = [pair[0].startswith("10.87.") for pair in n0]
        assert rack_pool == [True] * 13 + [False] * 7, n0  # priority 10 first, then shared
        daemons["n0"].stop()
        daemons["n0"].start()
        n0 += [dual_add(daemons["n0"], f"n0-again-{i}") for i in range(5)]
        addresses = [a for pair in n0 + n1 for a in pair]
        assert len(set(addresses)) == len(addresses)
        held_v4, held_v6 = pool_ranges(etcd.endpoint, prefix, v4, v6)
        assert sorted(held_v4.values()) == ["0", "1"] and sorted(held_v6.values()) == ["0", "1"]

        explained = ctl(ctl_env, "explain", "node", "n0")
        assert explained.returncode == 0, explained.stderr
        lines = explained.stdout.splitlines()
        assert "IPv4 allocation order, 2 priority tiers (a lower tier serves only when every "\
               "higher one cannot):" in lines, lines
        [span4] = [s for s, v in held_v4.items() if v == "0"]
        [span6] = [s for s, v in held_v6.items() if v == "0"]
        assert (f"topology: pool shared-v4 keeps the blocks of rack=0 in its /26 ranges: "
                f"{span4}") in lines, lines
        assert (f"topology: pool shared-v6 keeps the blocks of rack=0 in its /122 ranges: "
                f"{span6}") in lines, lines
        routes = ctl(ctl_env, "check", "routes", "--by", "rack")
        assert routes.returncode == 0, routes.stdout
        check = ctl(ctl_env, "ipam", "check")
        assert check.returncode == 0 and "warning" not in check.stdout, check.stdout
    finally:
        for daemon in daemons.values():
            daemon.stop()


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
    engines = [AllocationEngine(store, name) for name in nodes]
    try:
        await asyncio.gather(*(engine.allocate(request(f"{engine.node}-{pod}"))
                               for pod in range(20) for engine in engines))
    finally:
        for engine in engines:
            await engine.close()
    assert await audit(store) == 64 * 20
    assert set((await one_value_per_range(store, pool)).values()) == {"0"}


# ---------------------------------------------------------------------- bad input
BAD_SPECS = [
    ("priority: high", "priority must be an integer from -1000 to 1000, not the text 'high'"),
    ("priority: 1.5", "priority 1.5 must be an integer from -1000 to 1000"),
    ("priority: true", "priority True must be an integer from -1000 to 1000"),
    ("priority: -1001", "priority -1001 must be an integer from -1000 to 1000"),
    ("priority: [1]", "priority [1] must be an integer from -1000 to 1000"),
    ("topologyKey: 'bad key!'", "topologyKey: invalid label key 'bad key!'"),
    ("topologyKey: a/b/c", "topologyKey: invalid label key 'a/b/c'"),
    ("topologyKey: 5", "topologyKey must be a node label key, not 5"),
    ("topologyKey: rack, topologyBlockSize: 23",
     "topologyBlockSize 23 must be a prefix length from 24 (the pool's) to 28 (its blockSize)"),
    ("topologyKey: rack, topologyBlockSize: 29",
     "topologyBlockSize 29 must be a prefix length from 24 (the pool's) to 28 (its blockSize)"),
    ("topologyKey: rack, topologyBlockSize: 26.0", "topologyBlockSize 26.0 must be a prefix"),
    ("topologyKey: rack, topologyBlockSize: '26'",
     "topologyBlockSize must be a prefix length (a number), not the text '26'"),
    ("topologyBlockSize: 26", "topologyBlockSize needs a topologyKey"),
]


def pools_listed(env: dict[str, str]) -> list[object]:
    done = ctl(env, "get", "ippool", "-o", "json")
    assert done.returncode == 0, done.stderr
    items: list[object] = json.loads(done.stdout)["items"]
    return items


CALICO = "projectcalico.org/v3"  # Calico manifests carry the same fields, checked alike


@pytest.mark.parametrize("api, spec, message", [
    *(("topoipam/v1", spec, message) for spec, message in BAD_SPECS),
    *((CALICO, spec, message) for spec, message in BAD_SPECS[::4]),
], ids=[*(s for s, _ in BAD_SPECS), *(f"calico-{s}" for s, _ in BAD_SPECS[::4])])
def test_a_bad_field_is_one_line_naming_it_and_its_bound_and_nothing_is_written(
        ctl_env: dict[str, str], api: str, spec: str, message: str) -> None:
    manifest = (f"apiVersion: {api}\nkind: IPPool\nmetadata: {{name: p}}\n"
                f"spec: {{cidr: 10.92.0.0/24, blockSize: 28, {spec}}}\n")
    done = ctl_input(ctl_env, "apply", "-f", "-", input=manifest)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert pools_listed(ctl_env) == []


@pytest.mark.parametrize("flags, message", [
    (["--priority", "x"], "argument --priority: must be an integer from -1000 to 1000, not 'x'"),
    (["--priority", "1.5"], "argument --priority: must be an integer from -1000 to 1000"),
    (["--priority", "2000"], "argument --priority: must be an integer from -1000 to 1000"),
    (["--topology-key", "bad key!"], "topologyKey: invalid label key 'bad key!'"),
    (["--topology-key", "rack", "--topology-block-size", "29"],
     "topologyBlockSize 29 must be a prefix length from 24 (the pool's) to 28 (its blockSize)"),
    (["--topology-key", "rack", "--topology-block-size", "x"],
     "argument --topology-block-size: must be a prefix length"),
    (["--topology-block-size", "26"], "topologyBlockSize needs a topologyKey"),
])
def test_create_ippool_flags_are_checked_like_the_manifest_fields(
        ctl_env: dict[str, str], flags: list[str], message: str) -> None:
    done = ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.92.0.0/24", "--block-size", "28",
               *flags)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr.strip().splitlines()[-1], done.stderr
    assert pools_listed(ctl_env) == []


def test_create_ippool_with_topology_flags_and_a_null_priority(ctl_env: dict[str, str]) -> None:
    done = ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.92.0.0/24", "--block-size", "28",
               "--topology-key", "rack", "--topology-block-size", "26", "--priority", "-5")
    assert done.returncode == 0, done.stderr
    [pool] = pools_listed(ctl_env)
    assert pool["spec"]["topologyKey"] == "rack"  # type: ignore[index]
    assert pool["spec"]["topologyBlockSize"] == 26  # type: ignore[index]
    assert pool["spec"]["priority"] == -5  # type: ignore[index]
    manifest = ("apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: q}\n"
                "spec: {cidr: 10.93.0.0/24, priority: null}\n")
    done = ctl_input(ctl_env, "apply", "-f", "-", input=manifest)
    assert done.returncode == 0, done.stderr  # null: the default, as for the other fields


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_relabelled_daemon_moves_its_warm_reserve_to_its_new_values_range(
        etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]) -> None:
    manifest = ("apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: shared}\n"
                "spec: {cidr: 10.95.0.0/24, blockSize: 28, topologyKey: rack, "
                "topologyBlockSize: 26}\n")
    assert ctl_input(ctl_env, "apply", "-f", "-", input=manifest).returncode == 0
    assert ctl(ctl_env, "ipam", "configure", "--warm-addresses", "20").returncode == 0
    pool = IPPool("shared", net("10.95.0.0/24"), 28, topology_key="rack",
                  topology_block_size=26)
    daemon = DaemonProcess("n0", str(tmp_path / "n0.sock"), etcd.endpoint, prefix,
                           str(tmp_path / "n0.log"), ["--labels", "rack=0"]).start()
    try:
        wait_for(lambda: set(pool_ranges(etcd.endpoint, prefix, pool)[0].values()) == {"0"},
                 20, "no warm reserve for rack 0")
        assert ctl(ctl_env, "label", "nodes", "n0", "rack=1", "--overwrite").returncode == 0
        wait_for(lambda: set(pool_ranges(etcd.endpoint, prefix, pool)[0].values()) == {"1"},
                 20, "the reserve stayed in rack 0's range")
        address = ipaddress.ip_address(faults_allocate(daemon, "pod"))
        [span] = pool_ranges(etcd.endpoint, prefix, pool)[0]
        assert address in span  # type: ignore[operator]
        check = ctl(ctl_env, "ipam", "check")
        assert check.returncode == 0 and "warning" not in check.stdout, check.stdout
    finally:
        daemon.stop()


def test_a_pool_of_one_range_is_created_with_a_warning(ctl_env: dict[str, str]) -> None:
    done = ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.96.0.0/24", "--block-size", "28",
               "--topology-key", "rack")  # ranges of /24 by default: the whole pool
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == (
        "warning: ippool p: topologyKey rack with ranges of /24 leaves the pool one range: "
        "only one value of rack can claim blocks in it (set a longer topologyBlockSize, up "
        "to 28)"), done.stderr
