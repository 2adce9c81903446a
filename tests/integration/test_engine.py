"""The allocation engine against a real etcd: concurrency, errors, dual stack."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import subprocess
import sys
from pathlib import Path

import pytest

from topoipam.daemon.admin import retire_node
from topoipam.daemon.core.errors import (
    AddressUnavailable,
    InvalidInput,
    NoPoolForNode,
    PoolExhausted,
    UnknownPool,
)
from topoipam.daemon.core.holdings import Attachment
from topoipam.daemon.core.model import (
    IPAMConfig,
    IPPool,
    IPReservation,
    Node,
)
from topoipam.daemon.core.writes import PutObject
from topoipam.daemon.engine import AllocationEngine, AllocationRequest
from topoipam.daemon.store import EtcdStore

CTL = str(Path(sys.executable).parent / "topoipamctl")


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def request(container: str, **kwargs: object) -> AllocationRequest:
    return AllocationRequest(Attachment("net", container, "eth0"), **kwargs)  # type: ignore[arg-type]


async def snapshot(store: EtcdStore) -> list[tuple[bytes, bytes]]:
    kvs, _ = await store.prefix_raw(store.keys.prefix.encode() + b"/")
    return [(kv.key, kv.value) for kv in kvs]


async def audit(store: EtcdStore) -> int:
    """Every address held once, every handle matches its blocks; returns addresses in use."""
    blocks = {b.value.cidr: b.value for b in await store.list_blocks()}
    handles = {h.value.id: h.value for h in await store.list_handles()}
    held: dict[object, str] = {}
    for block in blocks.values():
        for ordinal, handle_id in block.allocations.items():
            address = block.address(ordinal)
            assert address not in held, f"{address} held twice"
            held[address] = handle_id
            assert handle_id in handles, f"{address} held by missing handle {handle_id}"
            assert any(a.ip == address for a in handles[handle_id].addresses)
    for handle in handles.values():
        for entry in handle.addresses:
            assert held.get(entry.ip) == handle.id, f"handle {handle.id} lists {entry.ip}"
    affinities = await store.list_affinities()
    for node, cidr in affinities:
        assert blocks[cidr].affinity == node
    return len(held)


def ctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CTL, *args], env=env, capture_output=True, text=True, timeout=60)


async def seed(store: EtcdStore, *objects: object) -> None:
    result = await store.commit([PutObject(o) for o in objects])  # type: ignore[arg-type]
    assert result.succeeded


@pytest.mark.asyncio
@pytest.mark.parametrize("strict", [False, True], ids=["borrowing", "strict-affinity"])
async def test_concurrent_allocators_never_double_allocate(
    store: EtcdStore, ctl_env: dict[str, str], strict: bool
) -> None:
    # Small pools so that blocks run out and borrowing (or refusal) really happens.
    nodes = [f"node-{i}" for i in range(4)]
    await seed(
        store,
        IPPool("rack-0", net("10.0.0.0/28"), 30, 'rack == "0"'),
        IPPool("rack-1", net("10.0.1.0/28"), 30, 'rack == "1"'),
        IPAMConfig(strict_affinity=strict, max_blocks_per_host=3),
        *(Node(n, {"rack": str(i % 2)}) for i, n in enumerate(nodes)),
    )
    engines = [AllocationEngine(store, n) for n in nodes]
    rng = random.Random(7)
    done = {"allocated": 0, "released": 0, "refused": 0, "borrowed": 0}

    async def worker(w: int) -> None:
        engine = engines[w % len(engines)]
        mine: list[str] = []
        for i in range(170):
            if mine and rng.random() < 0.5:
                handle = mine.pop(rng.randrange(len(mine)))
                await engine.release(handle)
                done["released"] += 1
                continue
            container = f"w{w}-c{i}"
            try:
                allocation = await engine.allocate(request(container))
            except PoolExhausted:
                done["refused"] += 1
                continue
            mine.append(allocation.handle_id)
            done["allocated"] += 1
            # A block holding this address cannot change holder while the address is
            # in it, so reading the node's affinities now tells whether it was borrowed.
            own = {block for _, block in await store.list_affinities(engine.node)}
            done["borrowed"] += sum(a.block not in own for a in allocation.addresses)

    await asyncio.gather(*(worker(w) for w in range(8)))
    assert done["allocated"] >= 500
    in_use = await audit(store)
    affinities = set(await store.list_affinities())
    assert in_use == done["allocated"] - done["released"]
    borrowed = [h for h in await store.list_handles()
                for a in h.value.addresses if (h.value.node, a.block) not in affinities]
    if strict:
        assert not borrowed and not done["borrowed"]
    else:
        # Whether a borrowed address is still held at the end is up to the scheduler;
        # that some allocation borrowed is not.
        assert done["borrowed"], "the pools are small enough that some node must borrow"
    check = await asyncio.to_thread(ctl, ctl_env, "ipam", "check")
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.asyncio
async def test_borrowing_and_strict_affinity(store: EtcdStore) -> None:
    await seed(store, IPPool("tiny", net("10.1.0.0/28"), 28), IPAMConfig(max_blocks_per_host=1),
               Node("a"), Node("b"))
    a, b = AllocationEngine(store, "a"), AllocationEngine(store, "b")
    first = await a.allocate(request("a1"))
    # b can claim nothing (the only block is a's): it borrows from a's block.
    borrowed = await b.allocate(request("b1"))
    assert borrowed.addresses[0].block == first.addresses[0].block
    handle = await store.get_handle("net/b1/eth0")
    assert handle is not None and handle.value.node == "b"
    await seed(store, IPAMConfig(strict_affinity=True, max_blocks_per_host=1))
    before = await snapshot(store)
    with pytest.raises(PoolExhausted, match="strictAffinity"):
        await b.allocate(request("b2"))
    assert await snapshot(store) == before
    await audit(store)


@pytest.mark.asyncio
async def test_max_blocks_per_host_counts_each_ip_family(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    # Like Calico, the cap is per IP version: a node at its IPv4 cap still claims an
    # IPv6 block, and one family's warm reserve never uses the other family's room.
    await seed(store, IPPool("v4", net("10.5.0.0/24"), 29), IPPool("v6", net("fd00:5::/112"), 125),
               IPAMConfig(strict_affinity=True, max_blocks_per_host=1), Node("a"), Node("w"))
    engine = AllocationEngine(store, "a")
    await engine.allocate(request("four"))
    explained = (await asyncio.to_thread(ctl, ctl_env, "explain", "node", "a")).stdout
    assert "reached maxBlocksPerHost=1 for IPv4" in explained, explained
    assert "2. claim a new block in: v6" in explained, explained
    dual = await engine.allocate(request("dual", ipv4=True, ipv6=True))
    assert sorted(a.ip.version for a in dual.addresses) == [4, 6]
    with pytest.raises(PoolExhausted, match="maxBlocksPerHost=1"):
        for i in range(8):  # one /29 block: at most 6 addresses, then the IPv4 cap
            await engine.allocate(request(f"fill{i}"))
    assert sorted(c.version for _, c in await store.list_affinities("a")) == [4, 6]
    # The reserve wants more than one block holds: one block of each family, no more.
    await seed(store, IPAMConfig(strict_affinity=True, max_blocks_per_host=1, warm_addresses=20))
    assert await AllocationEngine(store, "w").top_up_reserve() == 2
    assert sorted(c.version for _, c in await store.list_affinities("w")) == [4, 6]
    await audit(store)


@pytest.mark.asyncio
async def test_errors_are_distinct_and_write_nothing(store: EtcdStore) -> None:
    await seed(store, IPPool("rack-0", net("192.168.0.0/24"), 26, 'rack == "0"'),
               IPPool("full", net("10.2.0.0/30"), 30, "all()", assignment_mode="Manual"),
               Node("n0", {"rack": "0"}), Node("n9", {"rack": "9"}))
    # fill the Manual pool: /30 has 1 usable address (network, gateway, broadcast never are)
    engine = AllocationEngine(store, "n0")
    for c in ("f1",):
        await engine.allocate(request(c, ipv4_pools=("full",)))
    before = await snapshot(store)
    cases: list[tuple[AllocationEngine, AllocationRequest, type[Exception], str]] = [
        (AllocationEngine(store, "n9"), request("x"), NoPoolForNode, "node n9"),
        (engine, request("x", ipv4_pools=("full",)), PoolExhausted, "pools full"),
        (engine, request("x", ipv4_pools=("missing",)), UnknownPool, "missing does not exist"),
        (engine, request("x", addresses=(ipaddress.ip_address("192.168.0.0"),)),
         AddressUnavailable, "network or broadcast"),
        (engine, request("x", addresses=(ipaddress.ip_address("172.16.0.1"),)),
         AddressUnavailable, "not in any enabled pool"),
        (engine, request("x", ipv4=True, ipv6=True), NoPoolForNode, "IPv6"),
    ]
    for ipam, req, error, fragment in cases:
        with pytest.raises(error, match=fragment):
            await ipam.allocate(req)
        assert await snapshot(store) == before, f"{error.__name__} wrote to etcd"
    with pytest.raises(InvalidInput, match="container ID"):
        request("bad/id")


@pytest.mark.asyncio
async def test_ipv6_and_dual_stack(store: EtcdStore) -> None:
    await seed(store, IPPool("v4", net("10.3.0.0/24"), 26), IPPool("v6", net("fd00:3::/112"), 122),
               Node("n"))
    engine = AllocationEngine(store, "n")
    v6 = await engine.allocate(request("six", ipv4=False, ipv6=True))
    assert v6.addresses[0].ip.version == 6 and v6.addresses[0].ip in net("fd00:3::/112")
    dual = await engine.allocate(request("dual", ipv4=True, ipv6=True))
    assert sorted(a.ip.version for a in dual.addresses) == [4, 6]
    again = await engine.allocate(request("dual", ipv4=True, ipv6=True))
    assert again.addresses == dual.addresses or {a.ip for a in again.addresses} == {
        a.ip for a in dual.addresses}
    specific = await engine.allocate(
        request("pick", ipv6=True, addresses=(ipaddress.ip_address("fd00:3::99"),)))
    assert {str(a.ip) for a in specific.addresses} >= {"fd00:3::99"}
    assert sorted(map(str, await engine.release("net/dual/eth0"))) == sorted(
        str(a.ip) for a in dual.addresses)
    assert await engine.release("net/dual/eth0") == []
    # A family failure keeps nothing: v6 requested from a disabled pool.
    await seed(store, IPPool("v6", net("fd00:3::/112"), 122, disabled=True))
    before = await snapshot(store)
    with pytest.raises(UnknownPool, match="disabled"):
        await engine.allocate(request("half", ipv4=True, ipv6=True, ipv6_pools=("v6",)))
    assert await snapshot(store) == before
    await audit(store)


@pytest.mark.asyncio
async def test_reservations_and_unwanted_blocks(store: EtcdStore) -> None:
    await seed(store, IPPool("p", net("10.4.0.0/24"), 26, 'rack == "0"'),
               IPReservation("gw", (net("10.4.0.1/32"), net("10.4.0.2/31"))),
               Node("n", {"rack": "0"}))
    engine = AllocationEngine(store, "n")
    got = await engine.allocate(request("c"))
    assert str(got.addresses[0].ip) == "10.4.0.4"
    # Relabel: the pool no longer selects n; the address stays, the block goes when empty.
    await seed(store, Node("n", {"rack": "1"}))
    assert await engine.release_unwanted_blocks() == []
    await engine.release("net/c/eth0")
    assert await store.list_blocks() == []
    assert await store.list_affinities("n") == []


@pytest.mark.asyncio
async def test_a_cancelled_caller_does_not_poison_its_batch(store: EtcdStore) -> None:
    await seed(store, IPPool("p", net("10.5.0.0/24"), 26), Node("n"))
    engine = AllocationEngine(store, "n")
    real_commit = store.commit

    async def slow_commit(writes: list[object]) -> object:  # etcd under load
        await asyncio.sleep(0.2)
        return await real_commit(writes)  # type: ignore[arg-type]

    store.commit = slow_commit  # type: ignore[assignment,method-assign]
    first = asyncio.create_task(engine.allocate(request("a")))
    await asyncio.sleep(0.01)
    batch = {c: asyncio.create_task(engine.allocate(request(c))) for c in "bcd"}
    await asyncio.sleep(0.3)  # "a" is done; the batch [b, c, d] is being committed
    batch["c"].cancel()  # c's caller gives up (deadline, client gone)
    await first
    for name in "bd":
        allocation = await batch[name]
        assert allocation.addresses, name
    with pytest.raises(asyncio.CancelledError):
        await batch["c"]
    store.commit = real_commit  # type: ignore[method-assign]
    await audit(store)


@pytest.mark.asyncio
async def test_many_transactions_in_one_batch_are_not_lost_races(store: EtcdStore) -> None:
    """A batch larger than etcd's transaction limit takes several commits, not retries."""
    await seed(store, IPPool("p", net("10.6.0.0/16"), 26), Node("n"))
    engine = AllocationEngine(store, "n", max_attempts=2)
    results = await asyncio.gather(*(engine.allocate(request(f"m{i}")) for i in range(600)))
    assert len({r.addresses[0].ip for r in results}) == 600
    await audit(store)


@pytest.mark.asyncio
async def test_pool_at_the_top_of_the_address_space(store: EtcdStore) -> None:
    await seed(store, IPPool("top", net("255.255.255.0/24"), 26), Node("n1"), Node("n2"))
    for node in ("n1", "n2"):
        allocation = await AllocationEngine(store, node).allocate(request(node))
        assert allocation.addresses[0].ip in net("255.255.255.0/24")
    assert len(await store.block_cidrs(net("255.255.255.0/24"))) == 2


@pytest.mark.asyncio
async def test_claim_is_fast_when_reservations_cover_most_of_a_big_pool(
    store: EtcdStore
) -> None:
    await seed(store, IPPool("big", net("10.128.0.0/9"), 26),
               IPReservation("low", (net("10.128.0.0/10"),)), Node("n"))
    started = asyncio.get_running_loop().time()
    allocation = await AllocationEngine(store, "n").allocate(request("x"))
    assert allocation.addresses[0].ip in net("10.192.0.0/10")
    # Not a benchmark: a walk over 65,536 candidate blocks would take minutes.
    assert asyncio.get_running_loop().time() - started < 5


@pytest.mark.asyncio
async def test_empty_unaffined_blocks_are_dropped_on_release(store: EtcdStore) -> None:
    await seed(store, IPPool("p", net("10.7.0.0/28"), 29), IPAMConfig(max_blocks_per_host=1),
               Node("gone"), Node("stay"))
    await AllocationEngine(store, "gone").allocate(request("g"))
    stay = AllocationEngine(store, "stay")
    held = [await stay.allocate(request(f"s{i}")) for i in range(8)]  # 7 own + 1 borrowed
    gone_block = (await store.list_affinities("gone"))[0][1]
    assert any(a.block == gone_block for h in held for a in h.addresses)
    await retire_node(store, "gone", force=True)
    for i in range(8):
        await stay.release(f"net/s{i}/eth0")
    assert await store.get_block(gone_block) is None



@pytest.mark.asyncio
async def test_scoped_addresses_are_refused(store: EtcdStore) -> None:
    from topoipam.daemon.metrics import Metrics
    from topoipam.daemon.service import IpamService, JsonRequest, StatusProvider
    from topoipam.proto import ipam_pb2

    async def no_error() -> str:
        return ""

    service = IpamService(AllocationEngine(store, "n"), StatusProvider(lambda: True, no_error,
                                                           lambda: None, list), Metrics())
    request = JsonRequest(ipam_pb2.AllocateRequest.DESCRIPTOR, {
        "attachment": {"network": "n", "container_id": "c", "ifname": "eth0"},
        "assign_ipv6": True, "ips": ["fd00::5%eth0"]})
    with pytest.raises(InvalidInput, match="zone"):
        await service.allocate(request)


@pytest.mark.asyncio
async def test_pools_unchanged_guard_refuses_a_commit_after_a_pool_appeared(
    store: EtcdStore
) -> None:
    from topoipam.daemon.core.writes import PoolsUnchangedSince

    _, revision = await store.pools_at_revision()
    ours = IPPool("mine", net("10.8.0.0/24"), 26)
    # Someone else creates an overlapping pool after our overlap check read the pools.
    await seed(store, IPPool("theirs", net("10.8.0.0/16"), 26))
    result = await store.commit([PutObject(ours, 0), PoolsUnchangedSince(revision)])
    assert not result.succeeded
    assert await store.get_pool("mine") is None
    _, revision = await store.pools_at_revision()
    assert (await store.commit([PutObject(IPPool("other", net("10.9.0.0/24"), 26), 0),
                                PoolsUnchangedSince(revision)])).succeeded
