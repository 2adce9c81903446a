"""Topology ranges, reclaim and priorities with real daemons, as a hostile operator drives them.

Real etcd (a private one where it is restored), real ``topoipamd`` processes on
real sockets, the real CLI: daemons of several racks claiming at once, a
reclaim racing the owner's own pods, a restore, a relabel, dual stack and a
restart. Every address once, one label value per range, ``ipam check`` clean.
"""

from __future__ import annotations

import asyncio
import ipaddress
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
from tests.integration.test_engine import audit, ctl, net
from tests.integration.test_faults import allocate as faults_allocate
from tests.integration.test_faults import attachment
from tests.integration.test_hostile_topology import (
    allocate,
    one_value_per_range,
)
from tests.integration.test_reliability import handles, new_daemon, restore, wait_for
from topoipam.daemon.core.holdings import Handle
from topoipam.daemon.core.model import IPPool
from topoipam.daemon.store import EtcdOptions, EtcdStore
from topoipam.proto import ipam_pb2


@pytest.fixture
def private_etcd() -> Iterator[EtcdServer]:
    with temporary_etcd("hostile-") as server:
        yield server




# ---------------------------------------------------------------------- restores
RESTORE_POOL = IPPool("shared", net("10.83.0.0/24"), 28, topology_key="rack",
                      topology_block_size=26)


def apply_shared(env: dict[str, str], cidr: str) -> IPPool:
    """Apply pool "shared" (``cidr``, /28 blocks in /26 ranges by rack) with topoipamctl."""
    manifest = ("apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: shared}\n"
                f"spec: {{cidr: {cidr}, blockSize: 28, topologyKey: rack, "
                "topologyBlockSize: 26}\n")
    assert ctl_input(env, "apply", "-f", "-", input=manifest).returncode == 0
    return IPPool("shared", net(cidr), 28, topology_key="rack", topology_block_size=26)


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
    apply_shared(env, "10.83.0.0/24")
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


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_daemons_of_three_racks_and_unlabelled_nodes_claiming_at_once(
        etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]) -> None:
    """Eight daemons (three racks, two nodes without the label) take 30 pods each at once
    from one topology pool: one value per range, every address once, ipam check clean."""
    pool = apply_shared(ctl_env, "10.97.0.0/22")
    assert ctl(ctl_env, "ipam", "configure", "--strictaffinity", "true").returncode == 0
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


# ---------------------------------------------------------------------- relabelled daemons
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_relabelled_daemon_moves_its_warm_reserve_to_its_new_values_range(
        etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]) -> None:
    pool = apply_shared(ctl_env, "10.95.0.0/24")
    assert ctl(ctl_env, "ipam", "configure", "--warm-addresses", "20").returncode == 0
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


