"""The allocation engine: plans with the pure allocator, commits with one CAS transaction.

``AllocationEngine`` serves one node. It reads cluster state through a ``StateSource``
(the daemon's watch-synced cache, or :class:`EtcdSource` that reads etcd on
every call, for the CLI and library use) and writes only through
:meth:`EtcdStore.commit`: block, affinity and handle change together in one
etcd transaction, or not at all. A lost race re-plans from the values that
the failed transaction returned, a bounded number of times, then raises the
retriable :class:`Conflict`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from .core import allocator
from .core.allocator import AssignContext, Reservations, TxnPlan
from .core.errors import (
    AddressUnavailable,
    Conflict,
    IdentityInUse,
    InvalidInput,
    NodeAlive,
    NodeInUse,
    PoolExhausted,
    TopoipamError,
)
from .core.holdings import (
    Attachment,
    Block,
    Handle,
    HandleAddress,
    Identity,
    check_identity,
    handle_prefix,
    parked_holder,
    parked_identity,
)
from .core.model import (
    IPAddress,
    IPAMConfig,
    IPNetwork,
    IPPool,
)
from .core.writes import (
    CommitResult,
    DaemonAbsent,
    DeleteAffinity,
    DeleteBlock,
    DeleteHandle,
    DeleteIdentity,
    DeleteObject,
    PutBlock,
    PutHandle,
    PutIdentity,
    Versioned,
    Write,
)
from .store import CAS_ATTEMPTS, LOST_RACE, DaemonAbsence, EtcdStore, LostRace, backoff, retry_cas

log = logging.getLogger(__name__)

# The group commit's lost races count against the one attempt limit of every CAS loop.
MAX_ATTEMPTS = CAS_ATTEMPTS


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

    def observe(self, cidr: IPNetwork, block: Versioned[Block] | None,
                seen_at: int = 0) -> None: ...


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


@dataclass(frozen=True)
class AllocationRequest:
    attachment: Attachment
    ipv4: bool = True
    ipv6: bool = False
    ipv4_pools: tuple[str, ...] = ()
    ipv6_pools: tuple[str, ...] = ()
    addresses: tuple[IPAddress, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    #: The network config's gateways: never handed out to this request.
    gateways: tuple[IPAddress, ...] = ()
    #: The sticky identity the addresses belong to ("": not sticky).
    identity: str = ""

    def __post_init__(self) -> None:
        if self.identity:
            check_identity(self.identity)
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
    """An address as ADD reports it: its pool, the pool's subnet and gateway."""

    ip: IPAddress
    block: IPNetwork
    pool: str = ""
    subnet: IPNetwork | None = None  # None: the pool is unknown (deleted before 0.2)
    gateway: IPAddress | None = None

    @classmethod
    def of(cls, ip: IPAddress, block: IPNetwork, pool: IPPool | None) -> AllocatedAddress:
        if pool is None:
            return cls(ip, block)
        return cls(ip, block, pool.name, pool.cidr, pool.gateway)


@dataclass(frozen=True)
class Allocation:
    handle_id: str
    addresses: tuple[AllocatedAddress, ...]


@dataclass
class _AllocateOp:
    """One allocation waiting for its batch's transaction, and what was planned for it."""

    future: asyncio.Future[Any]
    request: AllocationRequest
    addresses: list[AllocatedAddress] = field(default_factory=list)
    # The sticky identity this ADD takes over from a node without a live daemon.
    took_over: tuple[str, DaemonAbsence] | None = None


@dataclass
class _ReleaseOp:
    """One release waiting for its batch's transaction, and what it freed."""

    future: asyncio.Future[Any]
    handle_id: str
    # For a release by attachment: where to look when no handle has the current id.
    legacy: Attachment | None = None
    freed: list[IPAddress] = field(default_factory=list)


@dataclass
class _ReleaseIdentityOp:
    """Free a parked sticky identity's addresses and forget it (``only_expired``: if its
    hold is over), in one transaction with its blocks; or (``park``) park a live one."""

    future: asyncio.Future[Any]
    identity_id: str
    only_expired: bool
    freed: list[IPAddress] = field(default_factory=list)
    park: bool = False
    force: bool = False  # park although its node's daemon is alive


_Op = _AllocateOp | _ReleaseOp | _ReleaseIdentityOp


class _Defer(Exception):
    """The call touches what another call of the same batch changes: plan it in the next."""


# How often, and how long each time, the committer waits for more calls while they
# keep arriving: at most 8 ms added to a storm's calls, which halves its p99.
LINGER_TURNS = 8
LINGER_SECONDS = 0.001
# Below this many free addresses in its own blocks (per IP family), the engine
# finds the block its next claim will take, off the pod's path; the hint is
# used once, and only while it is this fresh.
CLAIM_HINT_BELOW = 8
CLAIM_HINT_SECONDS = 10.0

# Free-block index entries a borrow reads at a time.
BORROW_WINDOW = 8
# Room index entries a claim reads at a time.
ROOM_READ = 4
# A pool read whole and found without an unclaimed block (or, for borrowing,
# without a free address) is not searched again for this long, and a claim's
# pool is then read whole again only if its survey counts changed: a full pool
# looks to its room index like one written before the index, and each claim
# would read all of it. Room made meanwhile still shows: a deleted block puts
# its window's room entry, a block with an address to lend its free-block
# entry, in the transaction that makes the room.
WHOLE_POOL_RECHECK_SECONDS = 30.0

# etcd refuses transactions with more than 128 operations in a branch (--max-txn-ops).
MAX_TXN_OPS = 120


@dataclass(frozen=True)
class _ClaimHint:
    """The block a pool's next claim takes, and the room index changes that claim makes."""

    cidr: IPNetwork
    room_marks: dict[IPNetwork, bool]
    found_at: float

    def fits(self, pool: IPPool, now: float) -> bool:
        """Fresh, and one of ``pool``'s blocks (the pool may have changed since)."""
        first, last = pool.bounds
        return (now - self.found_at <= CLAIM_HINT_SECONDS
                and self.cidr.version == pool.cidr.version
                and self.cidr.prefixlen == pool.block_size
                and first <= int(self.cidr.network_address)
                and int(self.cidr.broadcast_address) <= last)


class AllocationEngine:
    """Allocation and release for one node. Safe to call from many tasks at once.

    Group commit: calls that arrive while a transaction is in flight are
    planned together and committed in the next single
    transaction, bounded by etcd's operation limit. Each call still succeeds
    or fails on its own: a call that cannot be planned fails alone, and the
    batch's transaction is all-or-nothing, so nothing is acknowledged that
    etcd has not committed.
    """

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
        #: Called with the handle id after every successful release (the node's record).
        self.on_released: Callable[[str], None] = lambda handle_id: None
        #: Called with "request" or "background" and the number of blocks claimed.
        self.on_claim: Callable[[str, int], None] = lambda path, count: None
        #: Called after a transaction that allocated addresses committed.
        self.on_allocated: Callable[[], None] = lambda: None
        #: Called when an ADD took a sticky identity over from a node without a daemon.
        self.on_takeover: Callable[[], None] = lambda: None
        # Handles this engine wrote, so a release needs no read first. Only a
        # hint: a stale entry fails its compare and is refreshed.
        self._handles: dict[str, Versioned[Handle]] = {}
        self._queue: list[_Op] = []
        self._committer: asyncio.Task[None] | None = None
        self._inline = False  # a caller is committing its own lone call right now
        # Pool choices per (family, requested pools) for one ClusterState object.
        self._pool_choice: tuple[object, dict[tuple[int, tuple[str, ...]],
                                              list[IPPool] | TopoipamError]] = (None, {})
        # Parked identities seen in this node's blocks -> the end of their hold as
        # last read: expiry reads an identity again only once its hold may be over.
        self._parked_until: dict[str, float] = {}
        # pool name -> the block its next claim takes, found off the pod's path when
        # this node's own blocks ran low (see _prefetch_claim). Used once.
        self._claim_hints: dict[str, _ClaimHint] = {}
        self._prefetch: asyncio.Task[None] | None = None
        # ("claim" | "borrow", pool name) -> the pool as it was read whole and found
        # with nothing to give, and when: see WHOLE_POOL_RECHECK_SECONDS.
        self._found_full: dict[tuple[str, str], tuple[IPPool, float]] = {}
        # pool name -> the pool, its survey's counts and the reservations when it was
        # last read whole and found full: the same again needs no whole read.
        self._full_survey: dict[str, tuple[IPPool, list[int], object]] = {}
        # Claims that took a hint or committed: a prefetch that overlaps one keeps nothing.
        self._claims_seen = 0
        self._closed = False

    # ------------------------------------------------------------------ public calls
    async def allocate(self, request: AllocationRequest) -> Allocation:
        """Give the attachment one address per requested family, or raise.

        Idempotent: an attachment that already holds addresses gets them back.
        All families are committed in one transaction together with the
        handle, so a failure of one family keeps nothing. Raises
        NoPoolForNode, PoolExhausted, UnknownPool, AddressUnavailable (final)
        or Conflict / DatastoreUnavailable / NotReady (retriable).
        """
        result: Allocation = await self._submit(_AllocateOp(self._future(), request))
        return result

    async def release(self, handle_id: str, attachment: Attachment | None = None
                      ) -> list[IPAddress]:
        """Free every address of the handle and delete it, in one transaction.

        Releasing an unknown handle returns [] (CNI DEL must be idempotent).
        With ``attachment``, a handle written under its legacy dotted id (before
        0.2) is released too, if its recorded attributes name that attachment.
        Affine blocks that become empty while their pool no longer selects
        this node are released in the same transaction.
        """
        result: list[IPAddress] = await self._submit(
            _ReleaseOp(self._future(), handle_id, attachment))
        self.on_released(handle_id)
        return result

    async def release_attachment(self, attachment: Attachment) -> list[IPAddress]:
        return await self.release(attachment.handle_id, attachment)

    async def release_identity(self, identity_id: str, only_expired: bool = False
                               ) -> list[IPAddress]:
        """Free the addresses parked for a sticky identity and delete it, in one transaction.

        Returns the addresses freed ([] for an unknown identity, or with
        ``only_expired`` one whose hold is not over). Refuses (IdentityInUse)
        while the identity is live: its attachment's DEL parks it first.
        """
        result: list[IPAddress] = await self._submit(
            _ReleaseIdentityOp(self._future(), check_identity(identity_id), only_expired))
        return result

    async def park_identity(self, identity_id: str, force: bool = False) -> list[IPAddress]:
        """Park a live sticky identity now, as its attachment's DEL would (the operator's
        ``topoipamctl ipam release --identity ID --park`` for a pod on a lost node).

        One transaction: the attachment's handle is deleted and its addresses are
        parked for ``stickyHoldSeconds``, for the identity's next ADD on any node.
        Refused (NodeAlive) while the identity's node has a live daemon, unless
        ``force``; the transaction compares that it still has none. Returns the
        addresses parked ([] for an unknown identity or one parked already).
        """
        result: list[IPAddress] = await self._submit(_ReleaseIdentityOp(
            self._future(), check_identity(identity_id), False, park=True, force=force))
        return result

    async def expire_parked(self) -> list[str]:
        """Free the sticky holds in this node's own blocks whose time is over.

        Reads nothing from etcd unless a block of this node holds a parked
        address whose hold may be over; each expiry is its own guarded
        transaction (an ADD that takes the identity back meanwhile wins).
        Parked addresses in blocks of no node are expired by the identity's
        next ADD, or by ``topoipamctl ipam release --identity``.
        """
        now = self.clock()
        parked: set[str] = set()
        for versioned in await self.source.affine_blocks():
            for holder in versioned.value.allocations.values():
                identity_id = parked_identity(holder)
                if identity_id is not None:
                    parked.add(identity_id)
        self._parked_until = {i: t for i, t in self._parked_until.items() if i in parked}
        expired = []
        for identity_id in sorted(parked):
            if self._parked_until.get(identity_id, 0.0) > now:
                continue
            if await self.release_identity(identity_id, only_expired=True):
                expired.append(identity_id)
            else:
                current = await self.store.get_identity(identity_id)
                if current is not None and current.value.parked:
                    self._parked_until[identity_id] = current.value.parked_until or 0.0
        return expired

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, op: _Op) -> Any:
        self._queue.append(op)
        if self._inline or (self._committer is not None and not self._committer.done()):
            return await op.future  # the running batch's owner picks it up next
        if len(self._queue) > 1:
            self._committer = asyncio.create_task(self._commit_loop())
            return await op.future
        # Nobody else is waiting: commit in the caller's own task (no hand-off);
        # calls arriving meanwhile queue up and get a committer task afterwards.
        self._inline = True
        self._queue.clear()
        try:
            await self._run_batch([op])
        finally:
            self._inline = False
            if self._queue:
                self._committer = asyncio.create_task(self._commit_loop())
        return op.future.result()

    async def _commit_loop(self) -> None:
        """The one task that drains the queue, a batch per transaction."""
        while self._queue:
            # While calls keep arriving (a storm), give the transports a moment to
            # hand them over: grpc's poller thread needs wall time, not just loop
            # turns, and one bigger transaction beats several small ones. A lone
            # call (the common, sequential case) never waits here.
            for _ in range(LINGER_TURNS):
                waiting = len(self._queue)
                if waiting < 2 or waiting >= MAX_TXN_OPS // 2:
                    break
                await asyncio.sleep(LINGER_SECONDS)
                if len(self._queue) == waiting:
                    break
            batch, self._queue = self._queue, []
            try:
                await self._run_batch(batch)
            except BaseException as exc:  # never strand a waiting caller
                _fail(batch, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

    async def close(self) -> None:
        self._closed = True
        for task in (self._prefetch, self._committer):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

    # ------------------------------------------------------------------ batches
    async def _run_batch(self, batch: list[_Op]) -> None:
        """Plan and commit ``batch`` in as few transactions as etcd's limit allows.

        Only lost races count against ``max_attempts``: transactions that
        succeed, or calls deferred to the next one, do not. A caller that
        gave up (cancelled) meanwhile is skipped; its planned change may still
        commit, exactly as if it had been cancelled after the commit.
        """
        pending = batch
        conflicts = 0
        while True:
            pending = [op for op in pending if not op.future.done()]
            if not pending:
                return
            try:
                state = await self.source.state()
            except TopoipamError as exc:
                _fail(pending, exc)
                return
            txn = TxnPlan(state.pools)
            planned: list[_Op] = []
            deferred: list[_Op] = []
            for op in pending:
                if txn.size() >= MAX_TXN_OPS:
                    deferred.append(op)
                    continue
                saved = txn.snapshot()
                try:
                    done = await self._plan_op(state, op, txn)
                except _Defer:
                    txn.restore(saved)
                    deferred.append(op)
                    continue
                except TopoipamError as exc:
                    txn.restore(saved)
                    await self._fail_or_return_existing(op, exc, state)
                    continue
                if done:
                    continue
                if txn.size() > MAX_TXN_OPS and planned:
                    txn.restore(saved)
                    deferred.append(op)
                    continue
                planned.append(op)
            if not planned:
                if len(deferred) == len(pending):  # no progress possible: never spin
                    _fail(deferred, Conflict(f"node {self.node}: calls could not be planned"))
                    return
                pending = deferred
                continue
            writes = txn.writes()
            try:
                result = await self.store.commit(writes)
            except TopoipamError as exc:
                _fail(planned, exc)
                pending = deferred
                continue
            if result.succeeded:
                self._observe_success(writes, result.revision)
                for op in planned:
                    self._resolve(op, result.revision, txn)
                claims = sum(1 for _, revision in txn.blocks.values() if revision == 0)
                if claims:
                    self._claims_seen += 1  # whatever a prefetch in flight found may be gone
                    self.on_claim("request", claims)
                if any(isinstance(op, _AllocateOp) for op in planned):
                    self.on_allocated()
                    # Only a transaction that left one of its blocks nearly full can
                    # have made the node short (the prefetch then counts them all, less
                    # what is reserved or cooling down: hence the margin here).
                    if any(block is not None and len(block.unallocated) < 2 * CLAIM_HINT_BELOW
                           for block, _ in txn.blocks.values()):
                        self._prefetch_claim_soon()
                pending = deferred
                continue
            self._observe_failure(result)
            self.on_conflict()
            retry = []
            for op in planned:
                if isinstance(op, _AllocateOp):
                    handle_id = op.request.attachment.handle_id
                    existing = result.handles.get(handle_id)
                    if existing is not None:  # an earlier ADD of this attachment won
                        self._handles[handle_id] = existing
                        self._settle_existing(op, existing.value, state)
                        continue
                elif isinstance(op, _ReleaseOp) and op.handle_id in result.handles:
                    current = result.handles[op.handle_id]
                    if current is None:
                        self._handles.pop(op.handle_id, None)
                    else:
                        self._handles[op.handle_id] = current
                retry.append(op)
            pending = retry + deferred
            conflicts += 1
            if conflicts >= self.max_attempts:
                _fail(pending, Conflict(
                    f"node {self.node}: {len(pending)} call(s) lost {self.max_attempts} "
                    "concurrent update races; try again"))
                return
            await backoff(conflicts)

    def _resolve(self, op: _Op, revision: int, txn: TxnPlan) -> None:
        if isinstance(op, _AllocateOp):
            handle_id = op.request.attachment.handle_id
            write = txn.handles[handle_id]
            assert isinstance(write, PutHandle)
            self._handles[handle_id] = Versioned(write.handle, revision)
            if op.took_over is not None:
                node, absence = op.took_over
                log.warning("sticky identity %s: attachment %s took it over from node %s, "
                            "which has had no live topoipamd for %.0f s", op.request.identity,
                            handle_id, node, absence.seconds or 0.0)
                self.on_takeover()
            _settle(op, result=Allocation(handle_id, tuple(op.addresses)))
        elif isinstance(op, _ReleaseOp):
            self._handles.pop(op.handle_id, None)
            _settle(op, result=op.freed)
        else:
            _settle(op, result=op.freed)

    def _settle_existing(self, op: _AllocateOp, handle: Handle, state: ClusterState) -> None:
        try:
            _settle(op, result=self._existing_allocation(op.request, handle, state))
        except TopoipamError as exc:
            _settle(op, error=exc)

    async def _fail_or_return_existing(self, op: _Op, exc: TopoipamError,
                                       state: ClusterState) -> None:
        """A repeated ADD whose pools are now full, disabled or gone still gets what it holds."""
        if isinstance(op, _AllocateOp) and not exc.retriable:
            existing = await self.store.get_handle(op.request.attachment.handle_id)
            if existing is not None:
                self._settle_existing(op, existing.value, state)
                return
        _settle(op, error=exc)

    async def _plan_op(self, state: ClusterState, op: _Op, txn: TxnPlan) -> bool:
        """Plan one call into ``txn``; True if it finished without needing a write."""
        if isinstance(op, _AllocateOp):
            op.addresses, op.took_over = [], None
            return await self._plan_allocation(state, op, txn)
        op.freed = []
        if isinstance(op, _ReleaseIdentityOp):
            return await self._plan_identity_release(state, op, txn)
        return await self._plan_release(state, op, txn)

    async def _plan_allocation(self, state: ClusterState, op: _AllocateOp, txn: TxnPlan) -> bool:
        request = op.request
        handle_id = request.attachment.handle_id
        if handle_id in txn.handles:
            raise _Defer()
        kept: set[int] = set()
        identity: Versioned[Identity] | None = None
        if request.identity:  # the only extra read, and only for sticky networks
            if request.identity in txn.identities:
                raise _Defer()
            identity = await self.store.get_identity(request.identity)
            if identity is not None:
                taken = await self._take_back(state, op, identity, txn)
                if taken is None:
                    return True  # a repeated ADD, answered with what it holds
                kept = taken
        for family in request.families():
            if family in kept:
                continue
            specific = request.specific(family)
            if specific is not None:
                await self._plan_specific(state, request, family, specific, handle_id, op, txn)
            else:
                pools = self._pools_for(state, family, request.requested_pools(family))
                await self._plan_next(state, pools, family, handle_id, op, txn)
        handle = Handle(
            id=handle_id,
            node=self.node,
            addresses=tuple(HandleAddress(a.ip, a.block, a.pool, a.subnet, a.gateway)
                            for a in op.addresses),
            attributes={
                **{k: v for k, v in request.attributes.items() if k != "identity"},
                "network": request.attachment.network,
                "container_id": request.attachment.container_id,
                "ifname": request.attachment.ifname,
                **({"identity": request.identity} if request.identity else {}),
            },
        )
        txn.handles[handle_id] = PutHandle(handle, 0)
        if request.identity:
            txn.identities[request.identity] = PutIdentity(
                Identity(request.identity, handle.addresses, "live", handle_id, self.node),
                identity.mod_revision if identity is not None else 0)
        return False

    async def _take_back(self, state: ClusterState, op: _AllocateOp,
                         read: Versioned[Identity], txn: TxnPlan) -> set[int] | None:
        """Plan a sticky ADD's return of the addresses its identity holds.

        Per family the request wants, the identity's address is handed to the
        new handle if its hold is not over, one of the pools that would serve
        this node contains it, and the rules allow it here (reservations,
        gateways; strictAffinity when the block is another node's). Every other
        address of the identity is freed in the same transaction. Returns the
        families kept, or None when the ADD repeats the live attachment's own
        (answered from its handle). Raises IdentityInUse when another attachment
        holds the identity live (nothing is planned), unless it is taken over
        (:meth:`_take_over`).
        """
        request = op.request
        handle_id = request.attachment.handle_id
        identity = read.value
        holder = parked_holder(identity.id)
        if not identity.parked:
            current = await self.store.get_handle(identity.handle)
            if identity.handle == handle_id and current is not None:
                self._settle_existing(op, current.value, state)
                return None
            if current is not None:
                identity = await self._take_over(state, op, read, current, txn)
            else:
                holder = identity.handle  # its handle was removed by hand: take over its blocks
        now = self.clock()
        wanted = request.families()
        kept: set[int] = set()
        for entry in identity.addresses:
            family = entry.ip.version
            cidr = entry.block
            block, revision = await self._planned_block(cidr, txn)
            if block is None:
                continue  # the block is gone, and the address with it
            pool = None
            if (family in wanted and family not in kept and not identity.expired(now)
                    and request.specific(family) in (None, entry.ip)):
                pool = allocator.pool_of(
                    self._pools_for(state, family, request.requested_pools(family)), entry.ip)
            if pool is not None and self._may_keep(state, pool, block, entry.ip, request):
                handed = allocator.hand_over(block, entry.ip, holder, handle_id)
                if handed is not None:
                    txn.put_block(handed, revision, block)
                    op.addresses.append(AllocatedAddress.of(entry.ip, cidr, pool))
                    kept.add(family)
                    continue
            new, _ = allocator.release_addresses(block, [entry.ip], holder, now)
            if self._unwanted(state, new):
                txn.delete_block(new, revision, block)
            else:
                txn.put_block(new, revision, block)
        return kept

    async def _take_over(self, state: ClusterState, op: _AllocateOp, read: Versioned[Identity],
                         current: Versioned[Handle], txn: TxnPlan) -> Identity:
        """A sticky ADD of an identity another attachment holds live: refused
        (IdentityInUse, saying how long that node has had no daemon, if so), unless
        that node has had no live daemon for ``stickyTakeoverSeconds``. Then the
        identity is parked as the lost attachment's DEL would have done it, in
        this transaction, which compares that the node still has no daemon
        (and the same absence record); the caller hands it on like any parked
        identity. Returns the parked identity.
        """
        identity = read.value
        takeover = state.config.sticky_takeover_seconds
        absence = None  # this node's own daemon is alive: it is the one asking
        if identity.node != self.node:
            absence = await self.store.daemon_absence(identity.node)
        gone = absence.seconds if absence is not None else None
        if gone is None or not takeover or gone < takeover:
            raise IdentityInUse(identity.id, identity.handle, identity.node,
                                op.request.attachment.handle_id, self.node,
                                holder_alive=absence is None, gone_seconds=gone,
                                takeover_seconds=takeover)
        assert absence is not None
        op.took_over = (identity.node, absence)
        return await self._park_live(state, read, current, txn,
                                     DaemonAbsent(identity.node, absence.noted_revision))

    async def _park_live(self, state: ClusterState, read: Versioned[Identity],
                         handle: Versioned[Handle], txn: TxnPlan, guard: DaemonAbsent | None
                         ) -> Identity:
        """Plan what the DEL of a live identity's attachment does (:meth:`_plan_parking`)
        for a node that cannot send it: delete the handle, park its addresses (for
        ``stickyHoldSeconds``, at least a second), guarded by ``guard``."""
        if handle.value.id in txn.handles:
            raise _Defer()
        if handle.mod_revision:  # 0: a stand-in for a handle removed by hand
            txn.handles[handle.value.id] = DeleteHandle(handle.value.id, handle.mod_revision)
        if guard is not None:
            txn.guards[f"daemon-absent/{guard.node}"] = guard
        await self._plan_parking(state, read.value.id, handle, txn, read=read,
                                 hold=state.config.sticky_hold_seconds or 1)
        write = txn.identities[read.value.id]
        assert isinstance(write, PutIdentity)
        # Stamped as released: when the lost node's daemon comes back, its record
        # check then drops the handle instead of re-asserting it against the new owner.
        now = self.clock()
        for entry in write.identity.addresses:
            block, revision = txn.blocks[entry.block]
            if block is not None:
                stamped = block.copy()
                stamped.released_at[block.ordinal(entry.ip)] = now
                txn.put_block(stamped, revision, block)
        return write.identity

    def _may_keep(self, state: ClusterState, pool: IPPool, block: Block, address: IPAddress,
                  request: AllocationRequest) -> bool:
        """Whether the rules let this node's ADD keep ``address`` of ``block``."""
        if block.affinity != self.node and state.config.strict_affinity:
            return False
        if not pool.usable(address) or address in state.reservations:
            return False
        return address not in request.gateways

    def _pools_for(self, state: ClusterState, family: int,
                   requested: tuple[str, ...]) -> list[IPPool]:
        """pools_for_node, remembered for as long as the state object lives."""
        key = (family, requested)
        if self._pool_choice[0] is not state:
            self._pool_choice = (state, {})
        choices = self._pool_choice[1]
        if key not in choices:
            try:
                choices[key] = allocator.pools_for_node(
                    state.pools, self.node, state.labels, family, requested)
            except TopoipamError as exc:
                choices[key] = exc
        choice = choices[key]
        if isinstance(choice, TopoipamError):
            raise choice.with_traceback(None)  # reused: keep its traceback from growing
        return choice

    def _context(self, state: ClusterState, pool: IPPool,
                 request: AllocationRequest | None = None) -> AssignContext:
        return AssignContext(
            pool=pool,
            reservations=state.reservations,
            now=self.clock(),
            cooldown=float(state.config.ip_cooldown_seconds),
            excluded=(frozenset(map(int, request.gateways)) if request and request.gateways
                      else frozenset()),
        )

    async def _plan_specific(
        self, state: ClusterState, request: AllocationRequest, family: int,
        address: IPAddress, handle_id: str, op: _AllocateOp, txn: TxnPlan,
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
        ctx = self._context(state, pool, op.request)
        cidr = next((c for c in txn.blocks if address in c), None)
        if cidr is not None:
            planned, revision = txn.blocks[cidr]
            if planned is None:
                raise _Defer()
            txn.put_block(allocator.assign_address(planned, address, handle_id, ctx), revision,
                          planned)
        else:
            # The block may have another size than the pool's (left over from a deleted pool).
            current = await self.source.block(pool.block_of(address))
            if current is None:
                current = await self.store.block_containing(address)
            if current is not None:
                cidr = current.value.cidr
                txn.put_block(allocator.assign_address(current.value, address, handle_id, ctx),
                              current.mod_revision, current.value)
            else:
                cidr = pool.block_of(address)
                if await self.store.block_cidrs(cidr):
                    raise AddressUnavailable(
                        f"address {address}: its block {cidr} would overlap a smaller block "
                        "left over from another pool")
                block = allocator.assign_address(Block.empty(cidr, self.node), address,
                                                 handle_id, ctx)
                txn.put_block(block, 0, None)
                txn.affinities[(self.node, cidr)] = True
        op.addresses.append(AllocatedAddress.of(address, cidr, pool))

    async def _plan_next(
        self, state: ClusterState, pools: Sequence[IPPool], family: int, handle_id: str,
        op: _AllocateOp, txn: TxnPlan,
    ) -> None:
        # This node's blocks as the transaction has them so far, with their read revisions.
        if txn.affine_read is None:  # one read per batch (a cache hit in the daemon)
            txn.affine_read = await self.source.affine_blocks()
        if not txn.blocks:  # the common case: nothing planned yet in this transaction
            affine = [(v.value, v.mod_revision) for v in txn.affine_read]
        else:
            affine = []
            for versioned in txn.affine_read:
                block = txn.current(versioned)
                if block is not None:
                    guard = txn.blocks.get(block.cidr, (None, versioned.mod_revision))[1]
                    affine.append((block, guard))
            known = {block.cidr for block, _ in affine}
            affine += [(b, 0) for b in txn.claimed(self.node) if b.cidr not in known]
        # 1. this node's own blocks with free addresses, pool order then address order
        with_space = [entry for entry in affine
                      if entry[0].unallocated and entry[0].family == family]
        for pool in pools:
            ctx = self._context(state, pool, op.request)
            first, last = pool.bounds
            for block, revision in sorted(
                (entry for entry in with_space
                 if first <= entry[0].first and entry[0].last <= last),
                key=lambda entry: entry[0].first,
            ):
                assigned = allocator.assign_next(block, handle_id, ctx)
                if assigned is not None:
                    new, address = assigned
                    txn.put_block(new, revision, block)
                    op.addresses.append(AllocatedAddress.of(address, new.cidr, pool))
                    return
        # 2. claim a new block for this node
        config = state.config
        reason = ""
        if not config.auto_allocate_blocks:
            reason = "autoAllocateBlocks is off"
        elif allocator.at_block_cap(config.max_blocks_per_host, (b for b, _ in affine), family):
            reason = (f"node has reached maxBlocksPerHost={config.max_blocks_per_host} "
                      f"for IPv{family}")
        else:
            for pool in pools:
                cidr = await self._unclaimed_block(state, pool, txn)
                if cidr is None:
                    continue
                assigned = allocator.assign_next(
                    Block.empty(cidr, self.node), handle_id,
                    self._context(state, pool, op.request))
                if assigned is None:
                    continue
                new, address = assigned
                txn.put_block(new, 0, None)
                txn.affinities[(self.node, cidr)] = True
                op.addresses.append(AllocatedAddress.of(address, cidr, pool))
                return
            reason = "no unclaimed block left"
        # 3. borrow from another node's block
        if config.strict_affinity:
            raise PoolExhausted(
                self.node, state.labels, family, [p.name for p in pools],
                f"{reason}, and strictAffinity forbids borrowing from other nodes' blocks",
            )
        for pool in pools:
            ctx = self._context(state, pool, op.request)
            async with aclosing(self._borrow_candidates(pool)) as candidates:
                async for versioned in candidates:
                    block = txn.current(versioned)
                    if block is None or block.affinity == self.node:
                        continue
                    assigned = allocator.assign_next(block, handle_id, ctx)
                    if assigned is not None:
                        new, address = assigned
                        txn.put_block(new, versioned.mod_revision, block)
                        op.addresses.append(AllocatedAddress.of(address, new.cidr, pool))
                        return
        raise PoolExhausted(self.node, state.labels, family, [p.name for p in pools],
                            f"{reason}; no free address to borrow")

    async def _unclaimed_block(self, state: ClusterState, pool: IPPool, txn: TxnPlan
                               ) -> IPNetwork | None:
        """A block CIDR of ``pool`` nobody has claimed: the one found in advance
        (:meth:`_prefetch_claim`) if it is fresh, else :meth:`_find_unclaimed_block`.

        A hint is only a head start: the claim is guarded by the block key's
        ``create_revision == 0`` as always, so a block another node claimed
        meanwhile makes the transaction lose its compare and re-plan (without
        the hint, which is used once).
        """
        hint = self._claim_hints.pop(pool.name, None)
        if hint is not None:
            self._claims_seen += 1
        if hint is not None and hint.fits(pool, self.clock()) and hint.cidr not in txn.blocks \
                and not any(v.value.cidr == hint.cidr for v in txn.affine_read or ()):
            for window, mark in hint.room_marks.items():
                txn.room_marks.setdefault(window, mark)
            return hint.cidr
        return await self._find_unclaimed_block(state, pool, txn)

    def _prefetch_claim_soon(self) -> None:
        if self._closed:
            return  # nothing new in the background once the engine is closing
        if self._prefetch is None or self._prefetch.done():
            self._prefetch = asyncio.get_running_loop().create_task(self._prefetch_claim())

    async def _prefetch_claim(self) -> None:
        """When this node's own blocks are nearly full, find the block the next claim
        takes, so that the claim on a pod's path costs its transaction alone.

        Reads only (the room index and one window's keys): nothing is claimed,
        so it is safe where pools are too small for a warm reserve.
        """
        seen = self._claims_seen
        try:
            state = await self.source.state()
            config = state.config
            affine = await self.source.affine_blocks()
            if self._claims_seen != seen:
                return  # a claim took a hint meanwhile: these reads may predate it
            if not config.auto_allocate_blocks:
                return
            short = self._short_family(state, [v.value for v in affine], CLAIM_HINT_BELOW)
            if short is None:
                return
            for pool in short[1]:
                hint = self._claim_hints.get(pool.name)
                if hint is not None and hint.fits(pool, self.clock()):
                    return
                txn = TxnPlan(state.pools)
                cidr = await self._find_unclaimed_block(state, pool, txn)
                if self._claims_seen != seen:
                    return  # the block found may be the one that claim takes
                if cidr is not None:
                    # Only the entry of the claim's own window (deleted if the claim
                    # fills it): entries found wrong on the way are left for a reader
                    # that acts on them at once.
                    marks = {window: mark for window, mark in txn.room_marks.items()
                             if window.version == cidr.version
                             and window.supernet_of(cidr)}  # type: ignore[arg-type]
                    self._claim_hints[pool.name] = _ClaimHint(cidr, marks, self.clock())
                    return
        except TopoipamError as exc:  # the request path will read for itself
            log.debug("claim prefetch skipped: %s", exc)
        except Exception:  # a head start only: never let it go unreported, never fail calls
            log.exception("claim prefetch failed")

    async def _find_unclaimed_block(self, state: ClusterState, pool: IPPool, txn: TxnPlan
                                    ) -> IPNetwork | None:
        """A block CIDR of ``pool`` nobody has claimed, found without reading the pool.

        The room index lists the claim windows (up to 16 blocks each) that may
        have an unclaimed block; a claimer reads a few entries from its
        node-specific window on (:func:`allocator.claim_windows`), then the
        block keys of one window: a few keys and at most 16, whatever the size
        of the pool or how full it is. A claim that fills a window deletes its
        entry in the same transaction, and an entry found wrong (a window
        filled by a racing claim) is deleted by whoever finds it. Pools without
        entries (written before the index) are searched by a survey instead:
        see :meth:`_surveyed_block`. The claim itself is guarded by
        ``create_revision == 0`` of the block key, so a racing claim of the
        same CIDR loses its compare and re-plans.
        """
        own = next(allocator.claim_windows(pool, self.node))
        rooms = txn.rooms.get(pool.name)
        if rooms is None:
            # One round trip: the room entries from this node's window on, and that
            # window's blocks if it has room (where the claim lands in the common case).
            rooms, in_own = await self.store.claim_reads(pool.cidr, own, ROOM_READ)
            if in_own is not None:
                txn.existing.setdefault(own, in_own)
            if len(rooms) < ROOM_READ:  # wrap round to the pool's first windows
                rooms += [w for w in await self.store.room_windows(pool.cidr, None, ROOM_READ)
                          if w not in rooms]
            txn.rooms[pool.name] = rooms
        for window in rooms:
            if txn.room_marks.get(window) is False:
                continue
            known = await self._known_blocks(window, txn)
            cidr = allocator.first_unclaimed_block(pool, known, state.reservations, window)
            if cidr is None:
                txn.room_marks[window] = False  # the entry was wrong: drop it
                continue
            if allocator.first_unclaimed_block(pool, known | {cidr}, state.reservations,
                                               window) is None:
                txn.room_marks[window] = False  # this claim fills the window
            return cidr
        return await self._surveyed_block(state, pool, own, txn)

    async def _known_blocks(self, within: IPNetwork, txn: TxnPlan) -> set[IPNetwork]:
        """The block CIDRs inside ``within``: read once per transaction, plus its plans."""
        known = txn.existing.get(within)
        if known is None:
            known = txn.existing[within] = await self.store.block_cidrs(within)
        known.update(txn.blocks)
        return known

    async def _surveyed_block(self, state: ClusterState, pool: IPPool, own: IPNetwork,
                              txn: TxnPlan) -> IPNetwork | None:
        """The search without a room index: one round trip reads this node's window and
        counts the block keys of at most 64 parts of the pool; a full window sends the
        search to the first part with room. Only a pool whose counts all look full (it
        is full, or holds blocks of another size) is read whole, and not again while
        its counts and the reservations stay as they were when that found nothing
        (room made since then shows in the room index: see WHOLE_POOL_RECHECK_SECONDS)."""
        if self._seen_full("claim", pool):
            return None
        survey = txn.surveys.get(pool.name)
        if survey is None:
            groups = allocator.claim_groups(pool, self.node)
            in_window, counts = await self.store.survey_blocks(own, groups)
            txn.existing.setdefault(own, in_window)
            survey = txn.surveys[pool.name] = list(zip(groups, counts, strict=True))
        candidates = [own, *(group for group, count in survey
                             if count < 1 << (pool.block_size - group.prefixlen))]
        unchanged = (pool, [count for _, count in survey], state.reservations.ip_set)
        if self._full_survey.get(pool.name) != unchanged:
            candidates.append(pool.cidr)
        for within in candidates:
            known = await self._known_blocks(within, txn)
            cidr = allocator.first_unclaimed_block(pool, known, state.reservations, within)
            if cidr is not None:
                return cidr
        self._full_survey[pool.name] = unchanged
        self._found_full[("claim", pool.name)] = (pool, self.clock())
        return None

    def _seen_full(self, search: str, pool: IPPool) -> bool:
        """Whether ``pool`` (as it is now) was read whole for ``search`` lately and
        found with nothing to give: then the index alone is trusted for a while."""
        seen = self._found_full.get((search, pool.name))
        if seen is None:
            return False
        if seen[0] != pool or not 0 <= self.clock() - seen[1] < WHOLE_POOL_RECHECK_SECONDS:
            del self._found_full[(search, pool.name)]
            return False
        return True

    async def _borrow_candidates(self, pool: IPPool) -> AsyncGenerator[Versioned[Block], None]:
        """Other nodes' blocks of ``pool`` that may have an address to give, best first.

        First the free-block index, read from a node-specific point a few
        entries at a time (so a borrow reads a few keys and a block or two,
        whatever the size of the pool); then, should none of those give one
        (an index entry is only a hint, and blocks written before the index
        have none), every block of the pool, unless that found nothing lately.
        """
        tried: set[IPNetwork] = set()
        start = allocator.borrow_start(pool, self.node)
        for begin in (start, None):
            for cidr, owner in await self.store.free_blocks(pool.cidr, begin, BORROW_WINDOW):
                if owner == self.node or cidr in tried:
                    continue
                tried.add(cidr)
                current = await self.source.block(cidr)
                if current is not None:
                    yield current
        if self._seen_full("borrow", pool):
            return
        for versioned in await self.store.list_blocks(pool.cidr):
            if versioned.value.cidr not in tried:
                yield versioned
        # Reached only if the caller took nothing from the whole pool.
        self._found_full[("borrow", pool.name)] = (pool, self.clock())

    async def _plan_release(self, state: ClusterState, op: _ReleaseOp, txn: TxnPlan) -> bool:
        handle_id = op.handle_id
        if handle_id in txn.handles:
            raise _Defer()
        handle = self._handles.get(handle_id) or await self.store.get_handle(handle_id)
        if handle is None and op.legacy is not None:
            handle = await self._legacy_handle(op.legacy)
            if handle is not None:
                op.handle_id = handle_id = handle.value.id
                op.legacy = None
        if handle is None:
            _settle(op, result=[])
            return True
        txn.handles[handle_id] = DeleteHandle(handle_id, handle.mod_revision)
        identity_id = handle.value.attributes.get("identity")
        if identity_id and await self._plan_parking(state, identity_id, handle, txn):
            return False
        by_block: dict[IPNetwork, list[IPAddress]] = {}
        for entry in handle.value.addresses:
            by_block.setdefault(entry.block, []).append(entry.ip)
        for cidr, addresses in by_block.items():
            block, revision = await self._planned_block(cidr, txn)
            if block is None:
                continue  # the block is gone: nothing left to free there
            new, freed = allocator.release_addresses(block, addresses, handle_id, self.clock())
            op.freed += freed
            if self._unwanted(state, new):
                txn.delete_block(new, revision, block)
            else:
                txn.put_block(new, revision, block)
        return False

    async def _plan_parking(self, state: ClusterState, identity_id: str,
                            handle: Versioned[Handle], txn: TxnPlan,
                            read: Versioned[Identity] | None = None, hold: int | None = None
                            ) -> bool:
        """Plan a sticky DEL: its blocks give the addresses to the parked identity until
        ``stickyHoldSeconds`` (or ``hold``) from now. False when the handle is not its
        identity's live attachment (then it is released like any other), or with no
        hold at all (its identity is deleted and the addresses are freed as usual).
        ``read``: the identity, read already."""
        if identity_id in txn.identities:
            raise _Defer()
        identity = read or await self.store.get_identity(identity_id)
        if identity is None or identity.value.parked or identity.value.handle != handle.value.id:
            return False
        hold = state.config.sticky_hold_seconds if hold is None else hold
        if not hold:
            txn.identities[identity_id] = DeleteIdentity(identity_id, identity.mod_revision)
            return False
        holder = parked_holder(identity_id)
        parked = []
        for entry in handle.value.addresses:
            block, revision = await self._planned_block(entry.block, txn)
            if block is None:
                continue
            handed = allocator.hand_over(block, entry.ip, handle.value.id, holder)
            if handed is not None:
                txn.put_block(handed, revision, block)
                parked.append(entry)
        txn.identities[identity_id] = PutIdentity(
            Identity(identity_id, tuple(parked), "parked", handle.value.id, handle.value.node,
                     self.clock() + hold),
            identity.mod_revision)
        return True

    async def _plan_identity_release(self, state: ClusterState, op: _ReleaseIdentityOp,
                                     txn: TxnPlan) -> bool:
        if op.identity_id in txn.identities:
            raise _Defer()
        identity = await self.store.get_identity(op.identity_id)
        if identity is None or (op.only_expired and not identity.value.expired(self.clock())):
            _settle(op, result=[])
            return True
        value = identity.value
        if not value.parked:
            if op.only_expired:
                _settle(op, result=[])
                return True
            if not op.park:
                raise IdentityInUse(value.id, value.handle, value.node)
            return await self._plan_park_now(state, op, identity, txn)
        if op.park:  # parked already: nothing to do
            _settle(op, result=[])
            return True
        holder = parked_holder(value.id)
        for entry in value.addresses:
            block, revision = await self._planned_block(entry.block, txn)
            if block is None:
                continue
            new, freed = allocator.release_addresses(block, [entry.ip], holder, self.clock())
            if not freed:
                continue
            op.freed += freed
            if self._unwanted(state, new):
                txn.delete_block(new, revision, block)
            else:
                txn.put_block(new, revision, block)
        txn.identities[value.id] = DeleteIdentity(value.id, identity.mod_revision)
        return False

    async def _plan_park_now(self, state: ClusterState, op: _ReleaseIdentityOp,
                             read: Versioned[Identity], txn: TxnPlan) -> bool:
        """``ipam release --identity ID --park``: park a live identity whose node is lost."""
        value = read.value
        absence = await self.store.daemon_absence(value.node)
        if absence is None and not op.force:
            raise NodeAlive(value.node, f"sticky identity {value.id} is live under attachment "
                            f"{value.handle}: delete that pod (its DEL parks it), or add "
                            "--force if that node is lost all the same")
        handle = await self.store.get_handle(value.handle) or Versioned(
            Handle(value.handle, value.node, value.addresses), 0)
        parked = await self._park_live(state, read, handle, txn, None if absence is None
                                       else DaemonAbsent(value.node, absence.noted_revision))
        op.freed = [entry.ip for entry in parked.addresses]
        return False

    async def _planned_block(self, cidr: IPNetwork, txn: TxnPlan
                             ) -> tuple[Block | None, int]:
        """A block as this transaction has it so far, else as read: (value or None if
        absent, the revision that guards its write)."""
        planned = txn.blocks.get(cidr)
        if planned is not None:
            return planned
        current = await self.source.block(cidr)
        return (current.value, current.mod_revision) if current is not None else (None, 0)

    def _unwanted(self, state: ClusterState, block: Block) -> bool:
        """An empty block of nobody, or of this node whose pool no longer selects it."""
        if not block.is_empty():
            return False
        if block.affinity is None:  # left behind by a removed node once borrowers are gone
            return True
        if block.affinity != self.node:
            return False
        pool = allocator.pool_of_block(state.pools, block.cidr)
        return pool is None or pool.disabled or not pool.automatic or not pool.selects(
            state.labels)

    def _allocation_of(self, handle: Handle, state: ClusterState) -> Allocation:
        """What the handle holds, reported as its first ADD reported it."""
        return Allocation(
            handle.id,
            tuple(
                AllocatedAddress(a.ip, a.block, a.pool, a.subnet, a.gateway)
                if a.subnet is not None
                else AllocatedAddress.of(a.ip, a.block, allocator.pool_of(state.pools, a.ip))
                for a in handle.addresses
            ),
        )

    def _existing_allocation(self, request: AllocationRequest, handle: Handle,
                             state: ClusterState) -> Allocation:
        """A repeated ADD's answer: what the attachment holds, if the request fits it.

        Raises AddressUnavailable when the repeated ADD asks for a specific
        address the attachment does not hold: answering with the old one would
        be a silent success for something that did not happen.
        """
        held = {a.ip for a in handle.addresses}
        wrong = [a for a in request.addresses if a not in held]
        if wrong:
            raise AddressUnavailable(
                f"attachment {handle.id} already holds {', '.join(sorted(map(str, held)))}; "
                f"it cannot be given {', '.join(map(str, wrong))} as well (DEL it first)")
        return self._allocation_of(handle, state)

    def _observe_success(self, writes: Iterable[Write], revision: int) -> None:
        for write in writes:
            if isinstance(write, PutBlock):
                self.source.observe(write.block.cidr, Versioned(write.block, revision))
            elif isinstance(write, DeleteBlock):
                self.source.observe(write.cidr, None)

    def _observe_failure(self, result: CommitResult) -> None:
        for cidr, block in result.blocks.items():
            self.source.observe(cidr, block, seen_at=result.revision)

    # ------------------------------------------------------------------ read
    async def readiness(self, families: Sequence[int],
                        requested: Mapping[int, Sequence[str]]) -> str:
        """Why an ADD asking for ``families`` (from ``requested`` pools) cannot succeed now.

        "" when it can. A dry run of the same plan an ADD makes (own blocks,
        then a claim, then borrowing), committed nowhere; with no family given,
        every family that has a pool is checked. Only as current as the state
        it reads: a racing ADD may still take the last address.
        """
        state = await self.source.state()
        if not families:
            families = sorted({p.family for p in state.pools})
            if not families:
                return "no IP pool exists"
        probe = AllocationRequest(Attachment("status", "readiness-probe", "eth0"))
        for family in families:
            op = _AllocateOp(self._future(), probe)
            try:
                pools = self._pools_for(state, family, tuple(requested.get(family, ())))
                await self._plan_next(state, pools, family, probe.attachment.handle_id, op,
                                      TxnPlan(state.pools))
            except TopoipamError as exc:
                return exc.message
            finally:
                op.future.cancel()
        return ""

    async def get(self, attachment: Attachment) -> Allocation | None:
        handle = (await self.store.get_handle(attachment.handle_id)
                  or await self._legacy_handle(attachment))
        if handle is None:
            return None
        return self._allocation_of(handle.value, await self.source.state())

    async def _legacy_handle(self, attachment: Attachment) -> Versioned[Handle] | None:
        """The attachment's handle under its pre-0.2 dotted id, if one was written for it."""
        handle = await self.store.get_handle(attachment.legacy_handle_id)
        if handle is not None and handle.value.belongs_to(attachment):
            return handle
        return None

    async def garbage_collect(self, network: str, keep: set[str]) -> list[str]:
        """Release this node's handles of ``network`` whose ids are not in ``keep``.

        ``keep`` holds current handle ids; a legacy (dotted) handle is kept when
        the attachment its attributes name is kept.
        """
        released = []
        # Handle ids start with the network name, so this reads only that network's
        # handles (and, for legacy ids, those of networks whose names extend it).
        current, legacy = await asyncio.gather(
            self.store.list_handles(handle_prefix(network)),
            self.store.list_handles(f"{network}."))
        for handle in [*current, *legacy]:
            value = handle.value
            if value.node != self.node or value.attributes.get("network", "") != network:
                continue
            if value.id in keep or _attachment_id(value) in keep:
                continue
            await self.release(value.id)
            released.append(value.id)
        return released

    async def retire_node(self, force: bool = False) -> tuple[int, int, int]:
        """Remove this node: its handles (only with ``force``), blocks, affinities, record.

        Refuses with NodeInUse while the node holds addresses, unless ``force``,
        which releases them. Empty blocks are deleted; a block that still
        holds addresses other nodes borrowed loses its affinity but keeps them.
        Each step is its own guarded transaction, so an interrupted removal
        can simply be run again. Returns (handles released, blocks deleted,
        blocks kept unaffined).
        """
        handles = [h.value.id for h in await self.store.list_handles()
                   if h.value.node == self.node]
        if handles and not force:
            raise NodeInUse(self.node, len(handles))
        for handle_id in handles:
            await self.release(handle_id)
        deleted = kept = 0
        for _, cidr in await self.store.list_affinities(self.node):
            deleted_one, kept_one = await retry_cas(
                functools.partial(self._give_up_block, cidr),
                f"block {cidr}, while node {self.node} was removed,")
            deleted += deleted_one
            kept += kept_one
        node = await self.store.get_node(self.node)
        if node is not None:
            await self.store.commit([DeleteObject("node", self.node, node.mod_revision)])
        return len(handles), deleted, kept

    async def _give_up_block(self, cidr: IPNetwork) -> tuple[int, int] | LostRace:
        """One round of giving up ``cidr`` (retire_node): (deleted, kept unaffined)."""
        current = await self.store.get_block(cidr)
        writes: list[Write] = [DeleteAffinity(self.node, cidr)]
        if current is not None and current.value.affinity == self.node:
            if current.value.is_empty():
                writes.append(DeleteBlock(cidr, current.mod_revision))
            else:
                orphan = current.value.copy()
                orphan.affinity = None
                writes.append(PutBlock(orphan, current.mod_revision))
        if not (await self.store.commit(writes)).succeeded:
            return LOST_RACE
        if any(isinstance(w, DeleteBlock) for w in writes):
            return 1, 0
        return (0, 1) if len(writes) > 1 else (0, 0)

    async def top_up_reserve(self) -> int:
        """Claim blocks, off every pod's path, until this node's own blocks hold
        ``warmAddresses`` free addresses for each IP family its pools serve.

        Free means what an allocation could take now: addresses cooling down
        or reserved are not counted. Never beyond ``maxBlocksPerHost`` (per
        family: a family at its cap leaves the other's reserve alone), never
        with ``autoAllocateBlocks`` off; the caller runs it only in sync. Each
        claim is its own guarded transaction (block + affinity, the block key
        must not exist), like a claim on the request path. Returns the blocks
        claimed.
        """
        claimed = 0
        spent: set[int] = set()  # families whose pools have no block left to claim
        while True:
            try:
                outcome = await retry_cas(lambda: self._claim_reserve_block(spent),
                                          f"the warm reserve of node {self.node}")
            except Conflict:
                return claimed  # the next upkeep tries again
            if not outcome:
                return claimed
            self.on_claim("background", 1)
            claimed += 1

    async def _claim_reserve_block(self, spent: set[int]) -> bool | LostRace:
        """One round of top_up_reserve: claim one block (True), or nothing to do (False).
        A family whose pools have no block left to claim goes to ``spent`` (its requests
        will borrow) and the next short family is tried."""
        state = await self.source.state()
        config = state.config
        if not config.warm_addresses or not config.auto_allocate_blocks:
            return False
        affine = await self.source.affine_blocks()
        txn = TxnPlan(state.pools)
        cidr = None
        while cidr is None:
            short = self._short_family(state, [v.value for v in affine],
                                       config.warm_addresses, spent)
            if short is None:
                return False
            family, pools = short
            for pool in pools:
                cidr = await self._unclaimed_block(state, pool, txn)
                if cidr is not None:
                    break
            else:
                spent.add(family)
        txn.put_block(Block.empty(cidr, self.node), 0, None)
        txn.affinities[(self.node, cidr)] = True
        writes = txn.writes()
        result = await self.store.commit(writes)
        if result.succeeded:
            self._observe_success(writes, result.revision)
            return True
        self._observe_failure(result)
        self.on_conflict()
        return LOST_RACE

    def _short_family(self, state: ClusterState, affine: Sequence[Block], wanted: int,
                      skip: set[int] | frozenset[int] = frozenset()
                      ) -> tuple[int, list[IPPool]] | None:
        """The first IP family (not in ``skip``) whose free addresses are below ``wanted``
        and that may still claim a block (below ``maxBlocksPerHost``), with its pools."""
        for family in sorted({p.family for p in state.pools} - set(skip)):
            if allocator.at_block_cap(state.config.max_blocks_per_host, affine, family):
                continue
            try:
                pools = self._pools_for(state, family, ())
            except TopoipamError:
                continue
            free = 0
            for pool in pools:
                ctx = self._context(state, pool)
                first, last = pool.bounds
                free += sum(allocator.free_count(block, ctx) for block in affine
                            if first <= block.first and block.last <= last)
            if free < wanted:
                return family, pools
        return None

    async def reconcile_free_index(self) -> int:
        """Make the free-block index entries of this node's own blocks agree with them.

        Blocks written before the index existed have no entry; a daemon fixes
        its own at start. Entries are hints, so the fixes go unguarded.
        Returns the entries fixed.
        """
        state = await self.source.state()
        blocks = [v.value for v in await self.source.affine_blocks()]
        listed = await self.store.free_marked([block.cidr for block in blocks])
        writes: list[Write] = []
        for block in blocks:
            writes += allocator.free_mark_writes(block.cidr, block.cidr in listed, block,
                                                 state.pools)
        if writes:
            await self.store.commit(writes)
        return len(writes)

    async def release_unwanted_blocks(self) -> list[IPNetwork]:
        """Drop this node's empty affine blocks whose pool no longer selects it."""
        dropped = []
        state = await self.source.state()
        for current in await self.source.affine_blocks():
            if not self._unwanted(state, current.value):
                continue
            txn = TxnPlan(state.pools)
            txn.delete_block(current.value, current.mod_revision, current.value)
            writes = txn.writes()
            result = await self.store.commit(writes)
            if result.succeeded:
                self._observe_success(writes, result.revision)
                dropped.append(current.value.cidr)
            else:
                self._observe_failure(result)
        return dropped


def _attachment_id(handle: Handle) -> str | None:
    """The current id of the attachment a (possibly legacy) handle's attributes name."""
    try:
        return Attachment(handle.attributes.get("network", ""),
                          handle.attributes.get("container_id", ""),
                          handle.attributes.get("ifname", "")).handle_id
    except InvalidInput:
        return None


def _settle(op: _Op, result: Any = None, error: BaseException | None = None) -> None:
    """Answer a waiting caller, unless it stopped waiting (cancelled, timed out)."""
    if op.future.done():
        return
    if error is not None:
        op.future.set_exception(error)
    else:
        op.future.set_result(result)


def _fail(ops: Iterable[_Op], exc: BaseException) -> None:
    for op in ops:
        _settle(op, error=exc)
