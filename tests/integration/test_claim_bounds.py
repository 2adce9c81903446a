"""What an Allocate reads from etcd when a claim cannot use the room index.

A datastore left by an upgrade or a mistake — a node's blocks outside every
pool that selects it, a full pool with no room-index entries — must cost a
pod start a bounded number of keys, not the pool's (the cluster's) size.
Real etcd, a real engine; the count is what etcd sent back, not a timing.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from tests.integration.test_engine import audit, net, request, seed
from topoipam.daemon.core.errors import PoolExhausted
from topoipam.daemon.core.holdings import Block
from topoipam.daemon.core.model import (
    IPAMConfig,
    IPPool,
    Node,
)
from topoipam.daemon.core.writes import PutAffinity, PutBlock, PutFreeMark, Write
from topoipam.daemon.engine import AllocationEngine
from topoipam.daemon.store import EtcdStore


class EtcdReads:
    """Counts what etcd sends the store: keys returned, and bytes of every response."""

    def __init__(self, store: EtcdStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys = 0
        self.bytes = 0
        original = store._call

        async def counted(method: str, request: Any, timeout: float | None = None) -> Any:
            response = await original(method, request, timeout)
            self.bytes += response.ByteSize()
            if method == "Range":
                self.keys += len(response.kvs)
            elif method == "Txn":
                self.keys += sum(len(op.response_range.kvs) for op in response.responses)
            return response

        monkeypatch.setattr(store, "_call", counted)


async def commit_all(store: EtcdStore, writes: list[Write]) -> None:
    for start in range(0, len(writes), 120):
        assert (await store.commit(writes[start:start + 120])).succeeded


@pytest.mark.asyncio
@pytest.mark.parametrize("warm", [0, 64], ids=["no-reserve", "warm-reserve"])
async def test_a_node_whose_blocks_lie_outside_its_full_unindexed_pool_reads_a_bounded_amount(
        store: EtcdStore, monkeypatch: pytest.MonkeyPatch, warm: int) -> None:
    # 1,024 /28 blocks, every one claimed by another node and with addresses to lend
    # (its free-block index entry says so), and no room-index entry: the pool is
    # full, which its index cannot tell from a pool written before the index.
    pool = IPPool("rack-0", net("10.98.0.0/18"), 28, 'rack == "0"')
    await seed(store, pool, Node("n", {"rack": "0"}), IPAMConfig(warm_addresses=warm))
    writes: list[Write] = []
    for i, cidr in enumerate(pool.cidr.subnets(new_prefix=28)):
        owner = f"other-{i % 32}"
        writes += [PutBlock(Block.empty(cidr, owner), 0), PutAffinity(owner, cidr),
                   PutFreeMark(cidr, owner)]
    # The node's own block lies outside every pool that selects it (its pool was
    # deleted and recreated elsewhere, or the node relabelled).
    outside = ipaddress.ip_network("10.200.0.0/28")
    writes += [PutBlock(Block.empty(outside, "n"), 0), PutAffinity("n", outside)]
    await commit_all(store, writes)

    now = [1000.0]
    engine = AllocationEngine(store, "n", clock=lambda: now[0])
    reads = EtcdReads(store, monkeypatch)
    per_call: list[tuple[int, int]] = []
    for i in range(8):
        now[0] += 20  # past the recheck time every other call: the survey's counts tell
        keys, sent = reads.keys, reads.bytes
        allocation = await engine.allocate(request(f"n-{i}"))
        await engine.top_up_reserve()  # what the daemon runs after a change, off the path
        if engine._prefetch is not None:
            await engine._prefetch  # the claim look-ahead a nearly full block starts
        per_call.append((reads.keys - keys, reads.bytes - sent))
        [address] = allocation.addresses
        assert address.pool == "rack-0" and address.block != outside  # borrowed
    # The pool is read whole once (it may be full, or hold blocks of another size):
    # every other Allocate reads a few keys, whatever the pool's size, also after the
    # recheck time (the survey counts what it read whole: nothing changed).
    assert sum(1 for keys, _ in per_call if keys > 64) <= 1, per_call
    assert sorted(sent for _, sent in per_call)[-2] < 16_000, per_call
    monkeypatch.undo()

    # Room made meanwhile is claimed at once: a node no pool selects drops its empty
    # blocks, and each deletion puts its window's room entry in the same transaction.
    other = AllocationEngine(store, "other-0")
    assert await other.release_unwanted_blocks()
    [address] = (await engine.allocate(request("n-after"))).addresses
    block = await store.get_block(address.block)
    assert block is not None and block.value.affinity == "n"  # claimed, not borrowed
    await other.close()
    await engine.close()
    await audit(store)


@pytest.mark.asyncio
async def test_pod_starts_on_a_full_pool_fail_reading_a_bounded_amount(
        store: EtcdStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every address of every block handed out: no free-block entries, no room entries.
    pool = IPPool("full", net("10.99.0.0/20"), 28, 'rack == "0"')
    await seed(store, pool, Node("n", {"rack": "0"}), IPAMConfig())
    writes: list[Write] = []
    for i, cidr in enumerate(pool.cidr.subnets(new_prefix=28)):
        owner = f"other-{i % 32}"
        block = Block(cidr, owner, {o: f"net/c{i}-{o}/eth0" for o in range(16)}, [])
        writes += [PutBlock(block, 0), PutAffinity(owner, cidr)]
    await commit_all(store, writes)
    engine = AllocationEngine(store, "n")
    reads = EtcdReads(store, monkeypatch)
    per_call: list[tuple[int, int]] = []
    for i in range(6):
        keys, sent = reads.keys, reads.bytes
        with pytest.raises(PoolExhausted):
            await engine.allocate(request(f"n-{i}"))
        per_call.append((reads.keys - keys, reads.bytes - sent))
    # The first refusal reads the pool whole (an index entry may be missing); the
    # next ones, within the recheck time, a few keys: a retrying runtime costs little.
    assert all(keys <= 64 and sent < 16_000 for keys, sent in per_call[1:]), per_call
    await engine.close()
