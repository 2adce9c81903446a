"""Block claims by window, borrowing through the free-block index, the warm reserve.

Real etcd and real engines (and, for the warm reserve, a real daemon): many
nodes racing for the last free blocks of a pool never claim one twice, every
address stays accounted for, and ``topoipamctl ipam check`` finds the index
in step with the blocks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import EtcdServer
from tests.daemons import TOPOIPAMCTL, DaemonProcess, cni
from tests.integration.test_engine import audit, net, request, seed
from topoipam.client.rpc import scrape
from topoipam.daemon.core import allocator
from topoipam.daemon.core.errors import PoolExhausted
from topoipam.daemon.core.model import IPAMConfig, IPPool, Node
from topoipam.daemon.core.writes import DeleteFreeMark, PutRoomMark
from topoipam.daemon.engine import AllocationEngine, _ClaimHint
from topoipam.daemon.local_etcd import free_port
from topoipam.daemon.store import EtcdStore


def ctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOPOIPAMCTL, *args], env=env, capture_output=True, text=True,
                          timeout=60)


def index_warnings(check: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in check.stdout.splitlines() if "free-block index" in line]


@settings(deadline=None)  # a /8 of /20 blocks (4096 of them) is slow on a loaded machine
@given(st.integers(8, 24), st.integers(0, 6), st.text(min_size=1, max_size=12))
def test_claim_windows_cover_the_pool_once_from_a_node_specific_start(
        prefixlen: int, extra: int, node: str) -> None:
    pool = IPPool("p", ipaddress.ip_network(f"10.0.0.0/{prefixlen}"),
                  min(32, max(20, prefixlen + extra)))
    windows = list(allocator.claim_windows(pool, node))
    blocks = [b for w in windows for b in w.subnets(new_prefix=pool.block_size)]
    assert sorted(blocks) == list(pool.block_cidrs())
    assert all(w.num_addresses <= allocator.CLAIM_WINDOW_BLOCKS * 2 ** (32 - pool.block_size)
               for w in windows)
    assert windows == list(allocator.claim_windows(pool, node))  # stable across hosts
    assert allocator.borrow_start(pool, node) in set(pool.block_cidrs())


@pytest.mark.asyncio
async def test_sixteen_nodes_claiming_the_last_blocks_at_once(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    # 32 blocks of 16; other nodes hold 26 of them: 6 free blocks for 16 racing nodes.
    await seed(store, IPPool("race", net("10.90.0.0/23"), 28), IPAMConfig(),
               *(Node(f"n{i}") for i in range(16)), Node("old"))
    old = AllocationEngine(store, "old")
    for i in range(26 * 13 + 1):  # fill 26 blocks (13 usable each in the first)
        await old.allocate(request(f"old{i}"))
    engines = [AllocationEngine(store, f"n{i}") for i in range(16)]
    results: dict[str, int] = {"ok": 0, "exhausted": 0}

    async def node_burst(engine: AllocationEngine, n: int) -> None:
        for i in range(12):
            try:
                await engine.allocate(request(f"n{n}-{i}"))
                results["ok"] += 1
            except PoolExhausted:
                results["exhausted"] += 1

    await asyncio.gather(*(node_burst(e, n) for n, e in enumerate(engines)))
    blocks = {b.value.cidr: b.value for b in await store.list_blocks()}
    assert len(blocks) == 32, "every block claimed exactly once, none twice"
    owners = [b.affinity for b in blocks.values()]
    assert owners.count("old") <= 27 and len(set(owners)) >= 6
    in_use = await audit(store)  # every address held once, by a handle that lists it
    assert in_use == 26 * 13 + 1 + results["ok"]
    # The pool has 32 * 16 - network - gateway - broadcast = 509 addresses: all given out
    # now (by claims and then by borrowing), so some calls had to be refused.
    assert in_use == 509 and results["exhausted"] == 16 * 12 - results["ok"]
    check = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert index_warnings(check) == [], check.stdout
    print(f"claims race: {results}, {in_use} addresses held, {len(blocks)} blocks")


@pytest.mark.asyncio
async def test_borrowing_reads_the_index_and_repair_fixes_it(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    await seed(store, IPPool("tiny", net("10.91.0.0/26"), 28), IPAMConfig(max_blocks_per_host=1),
               Node("a"), Node("b"), Node("c"), Node("d"), Node("e"))
    owners = [AllocationEngine(store, n) for n in "abcd"]
    for owner in owners:
        await owner.allocate(request(f"{owner.node}-first"))
    # The four blocks have free addresses: their index entries say so.
    listed = await store.free_blocks(net("10.91.0.0/26"))
    assert sorted(node for _, node in listed) == ["a", "b", "c", "d"]
    borrower = AllocationEngine(store, "e")
    borrowed = await borrower.allocate(request("e1"))
    assert borrowed.addresses[0].block in {cidr for cidr, _ in listed}
    # Drop an entry: ipam check warns, borrowing still works, repair-index fixes it.
    await store.commit([DeleteFreeMark(listed[0][0])])
    check = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert check.returncode == 0 and len(index_warnings(check)) == 1, check.stdout
    await borrower.allocate(request("e2"))
    repaired = await asyncio.to_thread(ctl, ctl_env, "ipam", "repair-index")
    assert repaired.stdout == "free-block index: 1 entry fixed\n", repaired.stdout
    check = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert index_warnings(check) == [], check.stdout
    # A full block leaves the index in the same transaction that fills it.
    for i in range(60):
        try:
            await borrower.allocate(request(f"fill{i}"))
        except PoolExhausted:
            break
    assert await store.free_blocks(net("10.91.0.0/26")) == []
    check = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert check.returncode == 0 and index_warnings(check) == [], check.stdout


def test_warm_reserve_claims_off_the_request_path(
        etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]) -> None:
    assert ctl(ctl_env, "create", "ippool", "warm", "--cidr", "10.92.0.0/24", "--block-size",
               "28").returncode == 0
    assert ctl(ctl_env, "ipam", "configure", "--warm-addresses", "30",
               "--max-blocks-per-host", "5").returncode == 0
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o750)
    port = free_port()
    daemon = DaemonProcess("warm-node", str(run_dir / "topoipamd.sock"), etcd.endpoint, prefix,
                           str(tmp_path / "daemon.log"),
                           ["--metrics-address", f"127.0.0.1:{port}"]).start()
    config = {"cniVersion": "1.0.0", "name": "warm",
              "ipam": {"type": "topoipam", "socket": daemon.socket}}
    try:
        # Before any pod: 30 free addresses = 2 blocks (14 usable in the first, which
        # holds the pool's network address and gateway, and 16).
        deadline = time.monotonic() + 5
        while len(affinities(ctl_env)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert len(affinities(ctl_env)) == 2, daemon.log()
        for i in range(40):
            code, result, err = cni("ADD", config, container=f"w{i}")
            assert code == 0, (result, err)
        deadline = time.monotonic() + 5
        while len(affinities(ctl_env)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = scrape(f"http://127.0.0.1:{port}/metrics")
        assert metrics.get('topoipam_block_claims_total{path="request"}', 0.0) == 0.0, metrics
        assert metrics['topoipam_block_claims_total{path="background"}'] == 5.0
        # Never beyond maxBlocksPerHost, however short the reserve is.
        assert len(affinities(ctl_env)) == 5
        check = ctl(ctl_env, "ipam", "check")
        assert check.returncode == 0 and index_warnings(check) == [], check.stdout
    finally:
        daemon.stop()


def affinities(ctl_env: dict[str, str]) -> list[str]:
    done = ctl(ctl_env, "get", "nodes", "-o", "wide")
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    blocks = [int(row[-1]) for row in rows if row and row[0] == "warm-node"]
    return ["block"] * (blocks[0] if blocks else 0)


def test_warm_reserve_output_is_json_clean(ctl_env: dict[str, str]) -> None:
    assert ctl(ctl_env, "ipam", "configure", "--warm-addresses", "110").returncode == 0
    shown = json.loads(ctl(ctl_env, "get", "ipamconfig", "-o", "json").stdout)
    assert [item["spec"]["warmAddresses"] for item in shown["items"]] == [110]


@pytest.mark.asyncio
async def test_the_room_index_follows_claims_and_repair_fills_it(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    # /24 with /30 blocks: 64 blocks in 4 claim windows of 16.
    assert ctl(ctl_env, "create", "ippool", "rooms", "--cidr", "10.93.0.0/24", "--block-size",
               "30").returncode == 0
    windows = await store.room_windows(net("10.93.0.0/24"))
    assert windows == list(net("10.93.0.0/24").subnets(new_prefix=26))
    await seed(store, IPAMConfig(), Node("r0"))
    engine = AllocationEngine(store, "r0")
    for i in range(16 * 4 - 1):  # 4 usable per block but the first (network, gateway): 16 blocks
        await engine.allocate(request(f"r{i}"))
    # The claim that filled the node's first window removed its entry, in its transaction.
    assert len(await store.room_windows(net("10.93.0.0/24"))) == 3
    check = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert check.returncode == 0 and "room index" not in check.stdout, check.stdout
    # A pool written without the index (as before it existed): reported, then repaired.
    await seed(store, IPPool("old", net("10.94.0.0/24"), 28))
    check = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert "room index out of date: pool old has 1 claim window(s)" in check.stdout, check.stdout
    await asyncio.to_thread(ctl, ctl_env, "ipam", "repair-index")
    check = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert "room index" not in check.stdout, check.stdout


async def rooms_and_pools(store: EtcdStore, revision: int = 0) -> tuple[int, int]:
    """How many room index entries and pools etcd holds (at ``revision``, or now)."""
    rooms, _ = await store.prefix_raw(store.keys.rooms(), keys_only=True, revision=revision)
    pools, _ = await store.prefix_raw(store.keys.pools(), keys_only=True, revision=revision)
    return len(rooms), len(pools)


@pytest.mark.asyncio
@pytest.mark.parametrize("in_use", [False, True], ids=["empty", "forced"])
async def test_deleting_a_pool_deletes_its_room_entries_in_the_same_transaction(
        store: EtcdStore, ctl_env: dict[str, str], in_use: bool) -> None:
    # /20 with /30 blocks: 1024 blocks in 64 claim windows, one room entry each.
    assert ctl(ctl_env, "create", "ippool", "big", "--cidr", "10.97.0.0/20", "--block-size",
               "30").returncode == 0
    assert await rooms_and_pools(store) == (64, 1)
    if in_use:  # a forced delete leaves the pool's allocated blocks, not its room entries
        await seed(store, IPAMConfig(), Node("p0"))
        await AllocationEngine(store, "p0").allocate(request("p0-first"))
    before = await rooms_and_pools(store)
    deleted = ctl(ctl_env, "delete", "ippool", "big", *(["--force"] if in_use else []))
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    _, now = await store.prefix_raw(store.keys.pools())
    assert await rooms_and_pools(store) == (0, 0)
    # One transaction: the revision before the last one still has the pool and every entry.
    assert await rooms_and_pools(store, now - 1) == before
    check = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert check.returncode == 0 and "room index" not in check.stdout, check.stdout


@pytest.mark.asyncio
async def test_room_entries_of_no_pool_are_drift_and_repair_removes_them(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    # Entries a pool deletion left behind before it deleted them (or a daemon with a
    # stale view of the pools put back): claims never read them, but they are drift.
    assert ctl(ctl_env, "create", "ippool", "kept", "--cidr", "10.98.0.0/24", "--block-size",
               "30").returncode == 0
    stray = [net("10.99.0.0/26"), net("fd00:99::/124")]
    await store.commit([PutRoomMark(w) for w in stray])
    check = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert ("room index out of date: 2 entries lie in no pool (10.99.0.0/26, fd00:99::/124;"
            in check.stdout), check.stdout
    repaired = await asyncio.to_thread(ctl, ctl_env, "ipam", "repair-index")
    assert repaired.stdout == "free-block index: 2 entries fixed\n", repaired.stdout
    assert await rooms_and_pools(store) == (4, 1)  # the pool's own 4 windows are kept
    check = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert "room index" not in check.stdout, check.stdout


@pytest.mark.asyncio
async def test_claim_reads_a_window_s_block_keys_only_if_the_index_lists_it(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    # /24 with /30 blocks: 4 claim windows of 16 blocks; the node's own window first.
    assert ctl(ctl_env, "create", "ippool", "reads", "--cidr", "10.95.0.0/24", "--block-size",
               "30").returncode == 0
    await seed(store, IPAMConfig(), Node("w0"))
    pool = IPPool("reads", net("10.95.0.0/24"), 30)
    own = next(allocator.claim_windows(pool, "w0"))
    engine = AllocationEngine(store, "w0")
    await engine.allocate(request("w0-first"))
    rooms, in_own = await store.claim_reads(pool.cidr, own, 4)
    assert own in rooms and in_own is not None and len(in_own) == 1
    for i in range(16 * 4):  # fill the node's window: its entry goes
        await engine.allocate(request(f"w0-{i}"))
    rooms, in_own = await store.claim_reads(pool.cidr, own, 4)
    # A full window's 16 keys are not read with the entries (issue 13's bytes per claim).
    assert own not in rooms and in_own is None
    assert rooms and all(window != own for window in rooms)


@pytest.mark.asyncio
async def test_a_claim_prepared_off_the_pods_path_costs_its_transaction_alone(
        store: EtcdStore, ctl_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # /24 pool of /28 blocks (13 usable each but the first, which holds the gateway).
    assert ctl(ctl_env, "create", "ippool", "hints", "--cidr", "10.96.0.0/24", "--block-size",
               "28").returncode == 0
    await seed(store, IPAMConfig(), Node("h0"), Node("h1"))
    engine = AllocationEngine(store, "h0")
    first = await engine.allocate(request("h0-0"))
    block = first.addresses[0].block
    i = 1
    while "hints" not in engine._claim_hints:  # below 8 free: the engine looks ahead
        assert i < 13, "no claim was prepared while the block filled"
        await engine.allocate(request(f"h0-{i}"))
        i += 1
        assert engine._prefetch is not None
        await engine._prefetch
    assert i >= 13 - 8  # not before the block ran low
    hint = engine._claim_hints["hints"]
    assert hint.cidr != block and hint.cidr.prefixlen == 28
    calls: list[str] = []
    original = store._call
    rooms = store.keys.rooms()

    async def counted(method: str, request: Any, timeout: float | None = None) -> object:
        reads_rooms = method == "Range" and request.key.startswith(rooms)
        calls.append("room read" if reads_rooms else method)
        return await original(method, request, timeout)

    monkeypatch.setattr(store, "_call", counted)
    while True:
        calls.clear()
        allocation = await engine.allocate(request(f"h0-{i}"))
        i += 1
        if allocation.addresses[0].block != block:
            break
    # The claim read nothing on the pod's path: no room index, one transaction (the
    # commit; without the hint a claim's reads are a transaction of their own). The
    # Range calls are this engine's state, read from etcd: it has no cache.
    assert allocation.addresses[0].block == hint.cidr
    assert calls.count("Txn") == 1 and "room read" not in calls, calls
    assert "hints" not in engine._claim_hints  # used once
    monkeypatch.undo()

    # A hint another node's claim made stale costs a lost compare, never a duplicate.
    other = AllocationEngine(store, "h1")
    theirs = (await other.allocate(request("h1-0"))).addresses[0].block
    engine._claim_hints["hints"] = _ClaimHint(theirs, {}, engine.clock())
    mine = {block, hint.cidr}
    for j in range(30):  # past the end of its second block: a claim, with the stale hint
        allocation = await engine.allocate(request(f"h0-late-{j}"))
        mine.add(allocation.addresses[0].block)
    assert len(mine) == 3 and theirs not in mine
    assert "hints" not in engine._claim_hints or engine._claim_hints["hints"].cidr != theirs
    await audit(store)
    await engine.close()
    await other.close()
