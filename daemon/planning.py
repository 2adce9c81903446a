"""The planner's caller: a view of etcd (or of the daemon's cache) and the reads it lacks.

The planner (:mod:`topoipam.daemon.core.planner`) decides from a view and
raises NeedRead for what the view lacks. :func:`plan_reading` is the one
loop that answers that: it reads what was asked (through a
:class:`StateSource` and the etcd adapter), adds it to the view, restores the
transaction and the planner's memory as they were, and plans the call again.
The daemon's engine plans every batch through it; :func:`commit_call` plans
and commits one call on its own (the CLI, and library use), with the one CAS
retry policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

from .core.allocator import Reservations, TxnPlan, TxnSnapshot
from .core.calls import ReleaseCall, ReleaseIdentityCall
from .core.holdings import Block, check_identity
from .core.model import IPAddress, IPNetwork, IPPool
from .core.planner import Planner
from .core.view import ClusterState, NeedRead, Read, ReadingView
from .core.writes import Versioned, Write
from .store import LOST_RACE, EtcdStore, LostRace, retry_cas

T = TypeVar("T")


class StateSource(Protocol):
    """Where the engine reads from. Values may be stale; commits are guarded anyway."""

    async def state(self) -> ClusterState: ...

    async def affine_blocks(self) -> list[Versioned[Block]]: ...

    async def block(self, cidr: IPNetwork) -> Versioned[Block] | None: ...

    def observe(self, cidr: IPNetwork, block: Versioned[Block] | None,
                seen_at: int = 0) -> None: ...

    def view(self, state: ClusterState) -> ReadingView:
        """A view of ``state`` and of what this source holds without a read."""
        ...


class EtcdSource:
    """Reads everything from etcd on every call: always fresh, never cached."""

    def __init__(self, store: EtcdStore, node: str) -> None:
        self.store = store
        self.node = node

    async def state(self) -> ClusterState:
        config, pools, node, reservations = await asyncio.gather(
            self.store.get_config(),
            self.store.list_pools(),
            self.store.get_node(self.node),
            self.store.list_reservations(),
        )
        return ClusterState(
            config=config.value,
            pools=tuple(p.value for p in pools),
            labels=node.value.labels if node else {},
            reservations=Reservations(r.value for r in reservations),
        )

    async def affine_blocks(self) -> list[Versioned[Block]]:
        cidrs = [cidr for _, cidr in await self.store.list_affinities(self.node)]
        blocks = await asyncio.gather(*(self.store.get_block(c) for c in cidrs))
        return [b for b in blocks if b is not None and b.value.affinity == self.node]

    async def block(self, cidr: IPNetwork) -> Versioned[Block] | None:
        return await self.store.get_block(cidr)

    def observe(self, cidr: IPNetwork, block: Versioned[Block] | None,
                seen_at: int = 0) -> None:
        pass

    def view(self, state: ClusterState) -> ReadingView:
        return ReadingView(state)


# What each kind of read is, on the etcd adapter (the rest go to the source).
_STORE_READS = {
    "block_containing": "block_containing",
    "block_cidrs": "block_cidrs",
    "pool_blocks": "list_blocks",
    "claim_reads": "claim_reads",
    "room_windows": "room_windows",
    "survey_blocks": "survey_blocks",
    "free_blocks": "free_blocks",
    "handle": "get_handle",
    "identity": "get_identity",
    "daemon_absence": "daemon_absence",
    "value_ranges": "value_ranges",
    "held_ranges": "held_ranges",
    "holders_from": "holders_from",
    "range_holder": "range_holder",
    "range_holders": "range_holders",
}


async def read(store: EtcdStore, source: StateSource, what: Read) -> Any:
    """Read ``what`` (a view's :data:`Read`) from etcd, or the source's cache."""
    kind, *args = what
    if kind == "block":
        return await source.block(*args)
    if kind == "affine_blocks":
        return await source.affine_blocks()
    if kind == "node_labels":
        node = await store.get_node(*args)
        return None if node is None else dict(node.value.labels)
    if kind == "survey_blocks":
        window, groups = args
        return await store.survey_blocks(window, list(groups))
    return await getattr(store, _STORE_READS[kind])(*args)


#: How a NeedRead is answered: :func:`read`, or a stand-in that reads the same thing.
Reader: TypeAlias = Callable[[EtcdStore, StateSource, Read], Awaitable[Any]]


async def plan_reading(store: EtcdStore, source: StateSource, view: ReadingView,
                       planner: Planner, plan: Callable[[], T], txn: TxnPlan | None = None,
                       saved: TxnSnapshot | None = None, reader: Reader = read) -> T:
    """``plan()``, after reading whatever ``view`` lacks for it.

    Each NeedRead is read once into ``view`` (by ``reader``); ``txn`` (what
    other calls of the batch planned) and the planner's memory are put back as
    they were before ``plan`` ran (``saved``, if the caller took that snapshot
    already), and it runs again. The reads are those a plan that waited for
    each would have made, in the same order.
    """
    if txn is not None and saved is None:
        saved = txn.snapshot()
    while True:
        memory = planner.memory.snapshot()
        try:
            return plan()
        except NeedRead as need:
            if txn is not None and saved is not None:
                txn.restore(saved)
            planner.memory.restore(memory)
            view.reads[need.read] = await reader(store, source, need.read)


async def commit_call(store: EtcdStore, planner: Planner, call: ReleaseCall | ReleaseIdentityCall,
                      source: StateSource | None = None) -> list[IPAddress]:
    """Plan a release alone and commit it; re-planned from fresh reads on a lost race.

    Returns the addresses it freed (or parked). Raises the call's
    TopoipamError, or Conflict once the races are lost
    :data:`~topoipam.daemon.store.CAS_ATTEMPTS` times.
    """
    source = source or EtcdSource(store, planner.node)

    async def attempt() -> list[IPAddress] | LostRace:
        state = await source.state()
        txn = TxnPlan(state.pools)
        view = source.view(state)
        if await plan_reading(store, source, view, planner,
                              lambda: planner.plan(view, call, txn), txn):
            return list(call.result)
        if not (await store.commit(txn.writes())).succeeded:
            return LOST_RACE
        return call.freed

    return await retry_cas(attempt, f"the release on node {planner.node}")


async def drop_writes(store: EtcdStore, planner: Planner, current: Versioned[Block],
                      source: StateSource | None = None) -> list[Write]:
    """The writes that drop ``current`` (an empty block) as its node's daemon would: the
    block guarded by its revision, its index entries and affinity, and its topology
    range given back when no other block is left in it (guarded by the range's holder,
    so a claim racing into the range makes one of the two re-plan). Nothing is written."""
    source = source or EtcdSource(store, planner.node)
    state = await source.state()
    txn = TxnPlan(state.pools)
    view = source.view(state)
    await plan_reading(store, source, view, planner, lambda: planner.drop_block(
        view, txn, current.value, current.mod_revision, current.value), txn)
    return txn.writes()


async def range_writes(store: EtcdStore, node: str,
                       placed: Sequence[tuple[IPPool, IPNetwork]]) -> list[Write]:
    """The topology range writes that go with blocks of ``node`` made again where etcd lost
    them (a restore): each one's range is taken for the node's label value if nobody holds
    it, touched (guarded by its holder) if that value holds it, and left as it is if
    another value does (the pod uses the address already: ``check routes`` shows it).
    Nothing is written; blocks of pools without a ``topologyKey`` need nothing."""
    placed = [(pool, cidr) for pool, cidr in placed if pool.topology_key]
    if not placed:
        return []
    planner = Planner(node)
    source = EtcdSource(store, node)
    state = await source.state()
    txn = TxnPlan(state.pools)
    view = source.view(state)

    def plan() -> None:
        for pool, cidr in placed:
            planner.place_block(view, pool, cidr, txn, cidr.network_address, strict=False)

    await plan_reading(store, source, view, planner, plan, txn)
    return txn.writes()


async def release_identity(store: EtcdStore, identity_id: str, park: bool = False,
                           force: bool = False) -> list[IPAddress]:
    """Free a parked sticky identity's addresses now, or (``park``) park a live one whose
    node is lost (refused while its node's daemon is alive, unless ``force``): one
    guarded transaction either way. Returns the addresses freed or parked."""
    call = ReleaseIdentityCall(check_identity(identity_id), park=park, force=force)
    return await commit_call(store, Planner("topoipamctl"), call)
