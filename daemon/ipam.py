"""The allocation engine: plans with the pure allocator, commits with one CAS transaction.

``Ipam`` serves one node. It reads cluster state through a ``StateSource``
(the daemon's watch-synced cache, or :class:`EtcdSource` that reads etcd on
every call, for the CLI and library use) and writes only through
:meth:`EtcdStore.commit`: block, affinity and handle change together in one
etcd transaction, or not at all. A lost race re-plans from the values that
the failed transaction returned, a bounded number of times, then raises the
retriable :class:`Conflict`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from . import allocator
from .allocator import AssignContext, Reservations
from .errors import AddressUnavailable, Conflict, InvalidInput, NoPoolForNode, PoolExhausted
from .model import (
    Attachment,
    Block,
    Handle,
    HandleAddress,
    IPAddress,
    IPAMConfig,
    IPNetwork,
    IPPool,
)
from .store import (
    CommitResult,
    DeleteAffinity,
    DeleteBlock,
    DeleteHandle,
    EtcdStore,
    PutAffinity,
    PutBlock,
    PutHandle,
    Versioned,
    Write,
)

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 32


@dataclass(frozen=True)
class ClusterState:
    """What an allocation decision depends on, apart from blocks."""

    config: IPAMConfig
    pools: tuple[IPPool, ...]
    labels: Mapping[str, str]
    reservations: Reservations


class StateSource(Protocol):
    """Where the engine reads from. Values may be stale; commits are guarded anyway."""

    async def state(self) -> ClusterState: ...

    async def affine_blocks(self) -> list[Versioned[Block]]: ...

    async def block(self, cidr: IPNetwork) -> Versioned[Block] | None: ...

    def observe(self, cidr: IPNetwork, block: Versioned[Block] | None) -> None: ...


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

    def observe(self, cidr: IPNetwork, block: Versioned[Block] | None) -> None:
        pass


@dataclass(frozen=True)
class AllocationRequest:
    attachment: Attachment
    ipv4: bool = True
    ipv6: bool = False
    ipv4_pools: tuple[str, ...] = ()
    ipv6_pools: tuple[str, ...] = ()
    addresses: tuple[IPAddress, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        families = [a.version for a in self.addresses]
        if len(set(families)) != len(families):
            raise InvalidInput("at most one specific address per IP family may be requested")
        if not (self.ipv4 or self.ipv6 or self.addresses):
            raise InvalidInput("nothing to allocate: both assign_ipv4 and assign_ipv6 are off")

    def families(self) -> list[int]:
        wanted = {a.version for a in self.addresses}
        if self.ipv4:
            wanted.add(4)
        if self.ipv6:
            wanted.add(6)
        return sorted(wanted)

    def requested_pools(self, family: int) -> tuple[str, ...]:
        return self.ipv4_pools if family == 4 else self.ipv6_pools

    def specific(self, family: int) -> IPAddress | None:
        return next((a for a in self.addresses if a.version == family), None)


@dataclass(frozen=True)
class AllocatedAddress:
    ip: IPAddress
    block: IPNetwork
    pool: IPPool | None


@dataclass(frozen=True)
class Allocation:
    handle_id: str
    addresses: tuple[AllocatedAddress, ...]


@dataclass
class _Plan:
    writes: list[Write] = field(default_factory=list)
    blocks: dict[IPNetwork, Block] = field(default_factory=dict)
    addresses: list[AllocatedAddress] = field(default_factory=list)


class Ipam:
    """Allocation and release for one node. Safe to call from many tasks at once."""

    def __init__(
        self,
        store: EtcdStore,
        node: str,
        source: StateSource | None = None,
        clock: Callable[[], float] = time.time,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.store = store
        self.node = node
        self.source: StateSource = source or EtcdSource(store, node)
        self.clock = clock
        self.max_attempts = max_attempts
        self.on_conflict: Callable[[], None] = lambda: None
        # One claim at a time per node, so concurrent calls do not each claim a block.
        self._claim_lock = asyncio.Lock()

    # ------------------------------------------------------------------ allocate
    async def allocate(self, request: AllocationRequest) -> Allocation:
        """Give the attachment one address per requested family, or raise.

        Idempotent: an attachment that already holds addresses gets them back.
        All families are committed in one transaction together with the
        handle, so a failure of one family keeps nothing. Raises
        NoPoolForNode, PoolExhausted, UnknownPool, AddressUnavailable (final)
        or Conflict / DatastoreUnavailable (retriable).
        """
        handle_id = request.attachment.handle_id
        for attempt in range(self.max_attempts):
            state = await self.source.state()
            try:
                plan = await self._plan(state, request, handle_id)
            except (NoPoolForNode, PoolExhausted, AddressUnavailable):
                existing = await self.store.get_handle(handle_id)
                if existing is not None:
                    return self._allocation_of(existing.value, state)
                raise
            handle = Handle(
                id=handle_id,
                node=self.node,
                addresses=tuple(HandleAddress(a.ip, a.block) for a in plan.addresses),
                attributes={
                    **request.attributes,
                    "network": request.attachment.network,
                    "container_id": request.attachment.container_id,
                    "ifname": request.attachment.ifname,
                },
            )
            result = await self.store.commit([*plan.writes, PutHandle(handle, 0)])
            if result.succeeded:
                self._observe_success(plan.writes, result.revision)
                return Allocation(handle_id, tuple(plan.addresses))
            existing_handle = result.handles.get(handle_id)
            if existing_handle is not None:
                return self._allocation_of(existing_handle.value, state)
            self._observe_failure(result)
            self.on_conflict()
            await _backoff(attempt)
        raise Conflict(
            f"allocation for {handle_id} on node {self.node} lost {self.max_attempts} "
            "concurrent update races; try again"
        )

    async def _plan(
        self, state: ClusterState, request: AllocationRequest, handle_id: str
    ) -> _Plan:
        plan = _Plan()
        for family in request.families():
            specific = request.specific(family)
            if specific is not None:
                await self._plan_specific(state, request, family, specific, handle_id, plan)
            else:
                pools = allocator.pools_for_node(
                    state.pools, self.node, state.labels, family, request.requested_pools(family)
                )
                await self._plan_next(state, pools, family, handle_id, plan)
        return plan

    def _context(self, state: ClusterState, pool: IPPool) -> AssignContext:
        return AssignContext(
            pool=pool,
            reservations=state.reservations,
            now=self.clock(),
            cooldown=float(state.config.ip_cooldown_seconds),
        )

    async def _plan_specific(
        self, state: ClusterState, request: AllocationRequest, family: int,
        address: IPAddress, handle_id: str, plan: _Plan,
    ) -> None:
        requested = request.requested_pools(family)
        candidates = (
            allocator.pools_for_node(state.pools, self.node, state.labels, family, requested)
            if requested else [p for p in state.pools if not p.disabled]
        )
        pool = allocator.pool_of(candidates, address)
        if pool is None:
            raise AddressUnavailable(f"address {address} is not in any enabled pool"
                                     + (f" of {', '.join(requested)}" if requested else ""))
        cidr = pool.block_of(address)
        current = await self.source.block(cidr)
        ctx = self._context(state, pool)
        if current is None:
            block = allocator.assign_address(Block.empty(cidr, self.node), address, handle_id, ctx)
            plan.writes += [PutBlock(block, 0), PutAffinity(self.node, cidr)]
        else:
            block = allocator.assign_address(current.value, address, handle_id, ctx)
            plan.writes.append(PutBlock(block, current.mod_revision))
        plan.addresses.append(AllocatedAddress(address, cidr, pool))

    async def _plan_next(
        self, state: ClusterState, pools: Sequence[IPPool], family: int, handle_id: str,
        plan: _Plan,
    ) -> None:
        affine = await self.source.affine_blocks()
        # 1. this node's own blocks, pool order then address order
        for pool in pools:
            ctx = self._context(state, pool)
            for current in sorted(
                (b for b in affine if b.value.family == family
                 and b.value.cidr.subnet_of(pool.cidr)),  # type: ignore[arg-type]
                key=lambda b: int(b.value.cidr.network_address),
            ):
                assigned = allocator.assign_next(current.value, handle_id, ctx)
                if assigned is not None:
                    block, address = assigned
                    plan.writes.append(PutBlock(block, current.mod_revision))
                    plan.addresses.append(AllocatedAddress(address, block.cidr, pool))
                    return
        # 2. claim a new block for this node
        config = state.config
        reason = ""
        if not config.auto_allocate_blocks:
            reason = "autoAllocateBlocks is off"
        elif config.max_blocks_per_host and len(affine) >= config.max_blocks_per_host:
            reason = f"node has reached maxBlocksPerHost={config.max_blocks_per_host}"
        else:
            for pool in pools:
                existing = await self.store.block_cidrs(pool.cidr)
                cidr = allocator.first_unclaimed_block(pool, existing, state.reservations)
                if cidr is None:
                    continue
                assigned = allocator.assign_next(
                    Block.empty(cidr, self.node), handle_id, self._context(state, pool)
                )
                if assigned is None:
                    continue
                block, address = assigned
                plan.writes += [PutBlock(block, 0), PutAffinity(self.node, cidr)]
                plan.addresses.append(AllocatedAddress(address, cidr, pool))
                return
            reason = "no unclaimed block left"
        # 3. borrow from another node's block
        if config.strict_affinity:
            raise PoolExhausted(
                self.node, state.labels, family, [p.name for p in pools],
                f"{reason}, and strictAffinity forbids borrowing from other nodes' blocks",
            )
        for pool in pools:
            ctx = self._context(state, pool)
            for current in await self.store.list_blocks(pool.cidr):
                if current.value.affinity == self.node:
                    continue
                assigned = allocator.assign_next(current.value, handle_id, ctx)
                if assigned is not None:
                    block, address = assigned
                    plan.writes.append(PutBlock(block, current.mod_revision))
                    plan.addresses.append(AllocatedAddress(address, block.cidr, pool))
                    return
        raise PoolExhausted(self.node, state.labels, family, [p.name for p in pools],
                            f"{reason}; no free address to borrow")

    def _allocation_of(self, handle: Handle, state: ClusterState) -> Allocation:
        return Allocation(
            handle.id,
            tuple(
                AllocatedAddress(a.ip, a.block, allocator.pool_of(state.pools, a.ip))
                for a in handle.addresses
            ),
        )

    def _observe_success(self, writes: Iterable[Write], revision: int) -> None:
        for write in writes:
            if isinstance(write, PutBlock):
                self.source.observe(write.block.cidr, Versioned(write.block, revision))
            elif isinstance(write, DeleteBlock):
                self.source.observe(write.cidr, None)

    def _observe_failure(self, result: CommitResult) -> None:
        for cidr, block in result.blocks.items():
            self.source.observe(cidr, block)

    # ------------------------------------------------------------------ read
    async def get(self, attachment: Attachment) -> Allocation | None:
        handle = await self.store.get_handle(attachment.handle_id)
        if handle is None:
            return None
        return self._allocation_of(handle.value, await self.source.state())

    # ------------------------------------------------------------------ release
    async def release(self, handle_id: str) -> list[IPAddress]:
        """Free every address of the handle and delete it, in one transaction.

        Releasing an unknown handle returns [] (CNI DEL must be idempotent).
        Affine blocks that become empty while their pool no longer selects
        this node are released in the same transaction.
        """
        for attempt in range(self.max_attempts):
            handle = await self.store.get_handle(handle_id)
            if handle is None:
                return []
            state = await self.source.state()
            writes: list[Write] = [DeleteHandle(handle_id, handle.mod_revision)]
            freed_all: list[IPAddress] = []
            by_block: dict[IPNetwork, list[IPAddress]] = {}
            for entry in handle.value.addresses:
                by_block.setdefault(entry.block, []).append(entry.ip)
            for cidr, addresses in by_block.items():
                current = await self.source.block(cidr)
                if current is None:
                    continue
                block, freed = allocator.release_addresses(
                    current.value, addresses, handle_id, self.clock()
                )
                freed_all += freed
                writes += self._block_after_release(state, current, block)
            result = await self.store.commit(writes)
            if result.succeeded:
                self._observe_success(writes, result.revision)
                return freed_all
            self._observe_failure(result)
            self.on_conflict()
            await _backoff(attempt)
        raise Conflict(f"release of {handle_id} lost {self.max_attempts} update races; try again")

    def _block_after_release(
        self, state: ClusterState, current: Versioned[Block], block: Block
    ) -> list[Write]:
        """Write the block back, or drop it if it is empty and no longer wanted by its node."""
        if block.is_empty() and block.affinity is not None:
            owner_labels = state.labels if block.affinity == self.node else None
            pool = allocator.pool_of_block(state.pools, block.cidr)
            unwanted = pool is None or (
                owner_labels is not None
                and not (not pool.disabled and pool.automatic and pool.selects(owner_labels))
            )
            if unwanted:
                return [DeleteBlock(block.cidr, current.mod_revision),
                        DeleteAffinity(block.affinity, block.cidr)]
        return [PutBlock(block, current.mod_revision)]

    async def release_address(self, address: IPAddress) -> str | None:
        """Free one address wherever it is held; returns the handle that held it, if any.

        The handle loses that address (and is deleted when it has none left)
        in the same transaction as the block.
        """
        for attempt in range(self.max_attempts):
            current = await self._find_block(address)
            if current is None:
                return None
            ordinal = current.value.ordinal(address)
            holder = current.value.allocations.get(ordinal)
            if holder is None:
                return None
            block, _ = allocator.release_addresses(current.value, [address], None, self.clock())
            writes: list[Write] = [PutBlock(block, current.mod_revision)]
            handle = await self.store.get_handle(holder)
            if handle is not None:
                rest = tuple(a for a in handle.value.addresses if a.ip != address)
                if rest:
                    writes.append(PutHandle(
                        Handle(holder, handle.value.node, rest, handle.value.attributes),
                        handle.mod_revision))
                else:
                    writes.append(DeleteHandle(holder, handle.mod_revision))
            result = await self.store.commit(writes)
            if result.succeeded:
                self._observe_success(writes, result.revision)
                return holder
            self._observe_failure(result)
            self.on_conflict()
            await _backoff(attempt)
        raise Conflict(f"release of {address} lost {self.max_attempts} update races; try again")

    async def _find_block(self, address: IPAddress) -> Versioned[Block] | None:
        state = await self.source.state()
        pool = allocator.pool_of(state.pools, address)
        if pool is not None:
            found = await self.source.block(pool.block_of(address))
            if found is not None:
                return found
        # The pool may be gone or have had another block size: look at every size.
        for length in range(address.max_prefixlen, -1, -1):
            cidr = ipaddress.ip_network(f"{address}/{length}", strict=False)
            found = await self.store.get_block(cidr)
            if found is not None:
                return found
            if address.max_prefixlen - length > 16:
                break
        return None

    async def garbage_collect(self, network: str, keep: set[str]) -> list[str]:
        """Release this node's handles of ``network`` whose ids are not in ``keep``."""
        released = []
        for handle in await self.store.list_handles():
            value = handle.value
            if value.node != self.node or value.attributes.get("network", "") != network:
                continue
            if value.id in keep:
                continue
            await self.release(value.id)
            released.append(value.id)
        return released

    async def release_unwanted_blocks(self) -> list[IPNetwork]:
        """Drop this node's empty affine blocks whose pool no longer selects it."""
        dropped = []
        state = await self.source.state()
        for current in await self.source.affine_blocks():
            if not current.value.is_empty():
                continue
            writes = self._block_after_release(state, current, current.value)
            if not isinstance(writes[0], DeleteBlock):
                continue
            result = await self.store.commit(writes)
            if result.succeeded:
                self._observe_success(writes, result.revision)
                dropped.append(current.value.cidr)
            else:
                self._observe_failure(result)
        return dropped


async def _backoff(attempt: int) -> None:
    if attempt >= 1:
        await asyncio.sleep(random.uniform(0, min(0.002 * attempt, 0.05)))
