"""Sticky identities in the allocation engine against a real etcd: the rules that
decide whether an address follows its owner, and what one transaction writes."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable

import pytest

from tests.integration.test_engine import ctl
from topoipam.daemon.audit import find_inconsistencies, load_snapshot
from topoipam.daemon.core.errors import IdentityInUse, InvalidInput
from topoipam.daemon.core.holdings import (
    Attachment,
    parked_holder,
)
from topoipam.daemon.core.model import (
    IPAddress,
    IPAMConfig,
    IPPool,
    Node,
)
from topoipam.daemon.core.writes import DaemonAbsent, DeleteAffinity, PutBlock, PutObject
from topoipam.daemon.engine import AllocationEngine, AllocationRequest
from topoipam.daemon.store import EtcdStore

IDENTITY = "net/default/web-0/eth0"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def sticky(container: str, identity: str = IDENTITY, **kwargs: object) -> AllocationRequest:
    return AllocationRequest(Attachment("net", container, "eth0"),  # type: ignore[arg-type]
                             identity=identity, **kwargs)


async def seed(store: EtcdStore, config: IPAMConfig) -> None:
    objects = [
        config,
        IPPool("rack-0", ipaddress.ip_network("10.9.0.0/24"), 26, 'rack == "0"'),
        IPPool("rack-1", ipaddress.ip_network("10.9.1.0/24"), 26, 'rack == "1"'),
        Node("n0", {"rack": "0"}), Node("n1", {"rack": "0"}), Node("n2", {"rack": "1"}),
    ]
    assert (await store.commit([PutObject(o) for o in objects])).succeeded


async def live_on_n0(store: EtcdStore, config: IPAMConfig,
                     clock: Callable[[], float] = time.time
                     ) -> tuple[AllocationEngine, AllocationEngine, IPAddress]:
    """Seeded with ``config``: the engines of nodes n0 and n1 (on ``clock``), and the
    address of n0's sticky pod c1, live."""
    await seed(store, config)
    n0, n1 = (AllocationEngine(store, n, clock=clock) for n in ("n0", "n1"))
    first = (await n0.allocate(sticky("c1"))).addresses[0].ip
    return n0, n1, first


async def consistent(store: EtcdStore) -> None:
    assert find_inconsistencies(await load_snapshot(store)) == []


async def audited(store: EtcdStore, ctl_env: dict[str, str]) -> None:
    """Consistent, and ``topoipamctl ipam check`` and the allocation list say so too."""
    await consistent(store)
    for args in (("ipam", "check"), ("get", "allocations", "-o", "wide")):
        done = await asyncio.to_thread(ctl, ctl_env, *args)
        assert done.returncode == 0 and not done.stderr, done.stdout + done.stderr


@pytest.mark.asyncio
async def test_strict_affinity_keeps_the_address_only_on_the_blocks_own_node(
        store: EtcdStore) -> None:
    n0, n1, first = await live_on_n0(store, IPAMConfig(strict_affinity=True), Clock())
    await n0.release("net/c1/eth0")
    # n1 may not borrow: a new address from its own block, the parked one freed.
    moved = (await n1.allocate(sticky("c2"))).addresses[0].ip
    assert moved != first
    block = await store.block_containing(first)
    assert block is not None and block.value.ordinal(first) in block.value.unallocated
    await consistent(store)


async def parked_on_n0(store: EtcdStore) -> tuple[AllocationEngine, Clock, IPAddress]:
    """Node n0 (with a clock the test moves) whose sticky pod c1 was deleted: held 30 s."""
    clock = Clock()
    n0, _, first = await live_on_n0(store, IPAMConfig(sticky_hold_seconds=30), clock)
    await n0.release("net/c1/eth0")
    return n0, clock, first


@pytest.mark.asyncio
async def test_an_add_after_the_hold_frees_the_parked_address_itself(store: EtcdStore) -> None:
    n0, clock, first = await parked_on_n0(store)
    block = await store.block_containing(first)
    assert block is not None
    assert block.value.allocations[block.value.ordinal(first)] == parked_holder(IDENTITY)
    clock.now += 31
    second = (await n0.allocate(sticky("c2"))).addresses[0].ip
    assert second != first  # freed at the back of the free list, not handed back
    block = await store.block_containing(first)
    assert block is not None and block.value.unallocated[-1] == block.value.ordinal(first)
    await consistent(store)


@pytest.mark.asyncio
async def test_a_hold_that_is_over_but_not_yet_freed_says_who_frees_it(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    _, clock, first = await parked_on_n0(store)  # held until the test clock's 1970: over now
    done = await asyncio.to_thread(ctl, ctl_env, "get", "allocations")
    row = next(line for line in done.stdout.splitlines() if line.startswith(f"{first} "))
    over = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.now + 30))
    assert row.endswith(f"parked, hold over since {over} (node n0's daemon frees it when "
                        "running)"), row
    # A block no node owns: only the identity's next ADD or an operator frees it.
    block = await store.block_containing(first)
    assert block is not None
    orphan = block.value.copy()
    orphan.affinity = None
    assert (await store.commit([PutBlock(orphan, block.mod_revision),
                                DeleteAffinity("n0", orphan.cidr)])).succeeded
    done = await asyncio.to_thread(ctl, ctl_env, "get", "allocations")
    row = next(line for line in done.stdout.splitlines() if line.startswith(f"{first} "))
    assert row.endswith(f"parked, hold over since {over} (freed by its next ADD or "
                        f"`topoipamctl ipam release --identity {IDENTITY}`)"), row


@pytest.mark.asyncio
async def test_expiry_frees_only_holds_that_are_over(store: EtcdStore) -> None:
    n0, clock, _ = await parked_on_n0(store)
    assert await n0.expire_parked() == []
    clock.now += 31
    assert await n0.expire_parked() == [IDENTITY]
    assert await store.get_identity(IDENTITY) is None
    assert await n0.expire_parked() == []
    await consistent(store)


@pytest.mark.asyncio
async def test_no_hold_frees_at_del_and_a_live_identity_is_never_taken(
        store: EtcdStore) -> None:
    n0, n1, first = await live_on_n0(store, IPAMConfig(sticky_hold_seconds=0))
    before = await load_snapshot(store)
    with pytest.raises(IdentityInUse, match="net/c1/eth0.*net/c2/eth0"):
        await n1.allocate(sticky("c2"))
    after = await load_snapshot(store)
    assert (after.blocks, after.handles, after.identities) == (
        before.blocks, before.handles, before.identities)  # nothing changed
    assert await n0.release("net/c1/eth0") == [first]
    assert await store.get_identity(IDENTITY) is None
    await consistent(store)


@pytest.mark.asyncio
async def test_a_live_identity_is_taken_over_once_its_node_has_no_daemon_long_enough(
        store: EtcdStore) -> None:
    # No daemon serves n0 here (no daemons/n0 fence key): its absence is noted by the
    # first refused ADD, and timed by etcd from then on.
    n0, n1, first = await live_on_n0(store, IPAMConfig(sticky_takeover_seconds=0))
    with pytest.raises(IdentityInUse, match="stickyTakeoverSeconds is 0 .*"
                       f"topoipamctl ipam release --identity {IDENTITY} --park"):
        await n1.allocate(sticky("c2"))
    await store.commit([PutObject(IPAMConfig(sticky_takeover_seconds=2))])
    with pytest.raises(IdentityInUse, match=r"no live topoipamd for \d s; another node's ADD "
                       r"takes it over at stickyTakeoverSeconds=2 \(in \d s\)"):
        await n1.allocate(sticky("c2"))
    await asyncio.sleep(3.1)  # ages are whole seconds, rounded down
    taken = await n1.allocate(sticky("c2"))
    assert [a.ip for a in taken.addresses] == [first]
    assert await store.get_handle("net/c1/eth0") is None
    identity = await store.get_identity(IDENTITY)
    assert identity is not None and (identity.value.state, identity.value.node) == ("live", "n1")
    await consistent(store)
    # A daemon that serves a node again forgets its absence, in the same transaction.
    assert await store.get_raw(store.keys.daemon_absence("n0")) is not None
    lease = await store.grant_lease(10)
    for node in ("n0", "n1"):
        assert (await store.claim_node(node, {"instance": node}, lease))[0]
    assert await store.daemon_absence("n0") is None
    assert await store.get_raw(store.keys.daemon_absence("n0")) is None
    with pytest.raises(IdentityInUse, match="delete the other pod first .node n1's topoipamd "
                       "is alive.$"):
        await n0.allocate(sticky("c3"))
    await store.revoke_lease(lease)


@pytest.mark.asyncio
async def test_a_takeover_is_guarded_by_the_absence_it_read(store: EtcdStore) -> None:
    absence = await store.daemon_absence("n0")
    assert absence is not None and absence.seconds == 0 and absence.noted_revision
    assert (await store.commit([DaemonAbsent("n0", absence.noted_revision)])).succeeded
    lease = await store.grant_lease(10)
    assert (await store.claim_node("n0", {"instance": "x"}, lease))[0]
    # The node's daemon is back: a takeover planned before must not commit.
    assert not (await store.commit([DaemonAbsent("n0", absence.noted_revision)])).succeeded
    assert not (await store.commit([DaemonAbsent("n0")])).succeeded
    await store.revoke_lease(lease)
    renewed = await store.daemon_absence("n0")  # noted afresh, at a new revision
    assert renewed is not None and renewed.noted_revision != absence.noted_revision
    assert not (await store.commit([DaemonAbsent("n0", absence.noted_revision)])).succeeded


@pytest.mark.asyncio
async def test_dual_stack_identity_keeps_each_family_it_still_asks_for(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    await seed(store, IPAMConfig())
    v6 = IPPool("v6", ipaddress.ip_network("fd00:9::/120"), 122)
    assert (await store.commit([PutObject(v6)])).succeeded
    n0 = AllocationEngine(store, "n0")
    both = await n0.allocate(sticky("c1", ipv6=True))
    await audited(store, ctl_env)  # live with an address of each family
    await n0.release("net/c1/eth0")
    await audited(store, ctl_env)  # parked with both
    again = await n0.allocate(sticky("c2", ipv6=False))
    assert [a.ip for a in again.addresses] == [both.addresses[0].ip]
    v6_address = both.addresses[1].ip
    block = await store.block_containing(v6_address)
    assert block is not None and block.value.ordinal(v6_address) not in block.value.allocations
    await consistent(store)


def test_identities_must_be_clean_key_segments() -> None:
    with pytest.raises(InvalidInput, match="invalid sticky identity"):
        sticky("c1", identity="net//web-0")
    with pytest.raises(InvalidInput, match="invalid sticky identity"):
        sticky("c1", identity="has space")
