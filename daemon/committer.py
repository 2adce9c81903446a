"""The committer: calls queued, planned together, committed in one transaction each batch.

:class:`Committer` is the bottom of a node's :class:`~.engine.AllocationEngine`.
Calls that arrive while a transaction is in flight wait in a queue; one task
plans them together (through :func:`~.planning.plan_reading`, so the planner
gets whatever its view lacks) and commits them in the next single etcd
transaction, bounded by etcd's operation limit. Each call still succeeds or
fails on its own: a call that cannot be planned fails alone, and the batch's
transaction is all-or-nothing, so nothing is acknowledged that etcd has not
committed. A lost race re-plans the batch from the values the failed
transaction returned, counted against the one attempt limit of every CAS
loop (:data:`~.store.CAS_ATTEMPTS`), then raises the retriable Conflict.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .core.allocator import TxnPlan, TxnSnapshot
from .core.calls import (
    AllocateCall,
    Allocation,
    AllocationRequest,
    AnyCall,
    Defer,
    ReleaseCall,
    ReleaseIdentityCall,
)
from .core.claims import CLAIM_HINT_BELOW
from .core.errors import Conflict, TopoipamError
from .core.holdings import Attachment, Handle, check_identity
from .core.model import IPAddress
from .core.planner import Planner
from .core.view import ClusterState, ReadingView
from .core.writes import CommitResult, DeleteBlock, PutBlock, PutHandle, Versioned, Write
from .planning import EtcdSource, StateSource, plan_reading
from .store import CAS_ATTEMPTS, EtcdStore, backoff

log = logging.getLogger(__name__)

# The group commit's lost races count against the one attempt limit of every CAS loop.
MAX_ATTEMPTS = CAS_ATTEMPTS

# How often, and how long each time, the committer waits for more calls while they
# keep arriving: at most 8 ms added to a storm's calls, which halves its p99.
LINGER_TURNS = 8
LINGER_SECONDS = 0.001

# etcd refuses transactions with more than 128 operations in a branch (--max-txn-ops).
MAX_TXN_OPS = 120


@dataclass
class _Pending:
    """One call waiting for its batch's transaction."""

    future: asyncio.Future[Any]
    call: AnyCall


class Committer:
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
        self.planner = Planner(node, lambda: self.clock())
        self.on_conflict: Callable[[], None] = lambda: None
        #: Called with the handle id after every successful release (the node's record).
        self.on_released: Callable[[str], None] = lambda handle_id: None
        #: Called with "request" or "background" and the number of blocks claimed.
        self.on_claim: Callable[[str, int], None] = lambda path, count: None
        #: Called after a transaction that allocated addresses committed.
        self.on_allocated: Callable[[], None] = lambda: None
        #: Called when an ADD took a sticky identity over from a node without a daemon.
        self.on_takeover: Callable[[], None] = lambda: None
        self._queue: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None
        self._inline = False  # a caller is committing its own lone call right now
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
        result: Allocation = await self._submit(AllocateCall(request))
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
        result: list[IPAddress] = await self._submit(ReleaseCall(handle_id, attachment))
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
            ReleaseIdentityCall(check_identity(identity_id), only_expired))
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
        result: list[IPAddress] = await self._submit(ReleaseIdentityCall(
            check_identity(identity_id), park=True, force=force))
        return result

    # ------------------------------------------------------------------ the queue
    async def _submit(self, call: AnyCall) -> Any:
        pending = _Pending(asyncio.get_running_loop().create_future(), call)
        self._queue.append(pending)
        if self._inline or (self._committer is not None and not self._committer.done()):
            return await pending.future  # the running batch's owner picks it up next
        if len(self._queue) > 1:
            self._committer = asyncio.create_task(self._commit_loop())
            return await pending.future
        # Nobody else is waiting: commit in the caller's own task (no hand-off);
        # calls arriving meanwhile queue up and get a committer task afterwards.
        self._inline = True
        self._queue.clear()
        try:
            await self._run_batch([pending])
        finally:
            self._inline = False
            if self._queue:
                self._committer = asyncio.create_task(self._commit_loop())
        return pending.future.result()

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

    async def _close_committer(self) -> None:
        self._closed = True
        await self._cancel_and_wait(self._committer)

    @staticmethod
    async def _cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
        """Cancel a background task that is still running and wait until it has ended."""
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    # ------------------------------------------------------------------ batches
    async def _plan(self, view: ReadingView, plan: Callable[[], Any],
                    txn: TxnPlan | None = None, saved: TxnSnapshot | None = None) -> Any:
        """``plan()`` with whatever ``view`` lacks read first (see plan_reading)."""
        return await plan_reading(self.store, self.source, view, self.planner, plan, txn,
                                  saved)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        """Plan and commit ``batch`` in as few transactions as etcd's limit allows.

        Only lost races count against ``max_attempts``: transactions that
        succeed, or calls deferred to the next one, do not. A caller that
        gave up (cancelled) meanwhile is skipped; its planned change may still
        commit, exactly as if it had been cancelled after the commit.
        """
        pending = batch
        conflicts = 0
        while True:
            pending = [p for p in pending if not p.future.done()]
            if not pending:
                return
            try:
                state = await self.source.state()
            except TopoipamError as exc:
                _fail(pending, exc)
                return
            view = self.source.view(state)
            txn = TxnPlan(state.pools)
            planned: list[_Pending] = []
            deferred: list[_Pending] = []
            for op in pending:
                if txn.size() >= MAX_TXN_OPS:
                    deferred.append(op)
                    continue
                saved = txn.snapshot()
                try:
                    done = await self._plan(view, _planning(self.planner, view, op.call, txn),
                                            txn, saved)
                except Defer:
                    txn.restore(saved)
                    deferred.append(op)
                    continue
                except TopoipamError as exc:
                    txn.restore(saved)
                    await self._fail_or_return_existing(op, exc, state)
                    continue
                if done:
                    _settle(op, result=op.call.result)
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
                self._committed(planned, txn, writes, result.revision)
                pending = deferred
                continue
            self._observe_failure(result)
            self.on_conflict()
            pending = self._after_lost_race(planned, result, state) + deferred
            conflicts += 1
            if conflicts >= self.max_attempts:
                _fail(pending, Conflict(
                    f"node {self.node}: {len(pending)} call(s) lost {self.max_attempts} "
                    "concurrent update races; try again"))
                return
            await backoff(conflicts)

    def _committed(self, planned: list[_Pending], txn: TxnPlan, writes: list[Write],
                   revision: int) -> None:
        """Answer the calls of a transaction that committed at ``revision``."""
        self._observe_success(writes, revision)
        for op in planned:
            self._resolve(op, revision, txn)
        claims = sum(1 for _, rev in txn.blocks.values() if rev == 0)
        if claims:
            self.planner.memory.claims_seen += 1  # what a prefetch in flight found may be gone
            self.on_claim("request", claims)
        if txn.reclaimed:
            self.on_claim("reclaim", len(txn.reclaimed))
        if any(isinstance(op.call, AllocateCall) for op in planned):
            self.on_allocated()
            # Only a transaction that left one of its blocks nearly full can have made
            # the node short (the prefetch then counts them all, less what is reserved
            # or cooling down: hence the margin here).
            if any(block is not None and len(block.unallocated) < 2 * CLAIM_HINT_BELOW
                   for block, _ in txn.blocks.values()):
                self._prefetch_claim_soon()

    def _prefetch_claim_soon(self) -> None:
        """Find the block the next claim takes, off the pod's path (see upkeep)."""

    def _after_lost_race(self, planned: list[_Pending], result: CommitResult,
                         state: ClusterState) -> list[_Pending]:
        """The calls of a lost transaction to plan again; an ADD whose attachment an
        earlier ADD already served is answered with what that one got."""
        handles = self.planner.memory.handles
        retry = []
        for op in planned:
            call = op.call
            if isinstance(call, AllocateCall):
                handle_id = call.request.attachment.handle_id
                existing = result.handles.get(handle_id)
                if existing is not None:  # an earlier ADD of this attachment won
                    handles[handle_id] = existing
                    self._settle_existing(op, call, existing.value, state)
                    continue
            elif isinstance(call, ReleaseCall) and call.handle_id in result.handles:
                current = result.handles[call.handle_id]
                if current is None:
                    handles.pop(call.handle_id, None)
                else:
                    handles[call.handle_id] = current
            retry.append(op)
        return retry

    def _resolve(self, op: _Pending, revision: int, txn: TxnPlan) -> None:
        call = op.call
        if isinstance(call, AllocateCall):
            handle_id = call.request.attachment.handle_id
            write = txn.handles[handle_id]
            assert isinstance(write, PutHandle)
            self.planner.memory.handles[handle_id] = Versioned(write.handle, revision)
            if call.took_over is not None:
                node, absence = call.took_over
                log.warning("sticky identity %s: attachment %s took it over from node %s, "
                            "which has had no live topoipamd for %.0f s", call.request.identity,
                            handle_id, node, absence.seconds or 0.0)
                self.on_takeover()
            _settle(op, result=Allocation(handle_id, tuple(call.addresses),
                                           tuple(call.fallbacks)))
        else:
            if isinstance(call, ReleaseCall):
                self.planner.memory.handles.pop(call.handle_id, None)
            _settle(op, result=call.freed)

    def _settle_existing(self, op: _Pending, call: AllocateCall, handle: Handle,
                         state: ClusterState) -> None:
        try:
            _settle(op, result=self.planner.existing_allocation(call.request, handle, state))
        except TopoipamError as exc:
            _settle(op, error=exc)

    async def _fail_or_return_existing(self, op: _Pending, exc: TopoipamError,
                                       state: ClusterState) -> None:
        """A repeated ADD whose pools are now full, disabled or gone still gets what it holds."""
        call = op.call
        if isinstance(call, AllocateCall) and not exc.retriable:
            existing = await self.store.get_handle(call.request.attachment.handle_id)
            if existing is not None:
                self._settle_existing(op, call, existing.value, state)
                return
        _settle(op, error=exc)

    def _observe_success(self, writes: Iterable[Write], revision: int) -> None:
        for write in writes:
            if isinstance(write, PutBlock):
                self.source.observe(write.block.cidr, Versioned(write.block, revision))
            elif isinstance(write, DeleteBlock):
                self.source.observe(write.cidr, None)

    def _observe_failure(self, result: CommitResult) -> None:
        for cidr, block in result.blocks.items():
            self.source.observe(cidr, block, seen_at=result.revision)

    async def _commit_plan(self, txn: TxnPlan, count_conflict: bool = True) -> bool:
        """Commit one transaction planned off the request path; True if it committed."""
        writes = txn.writes()
        result = await self.store.commit(writes)
        if result.succeeded:
            self._observe_success(writes, result.revision)
            return True
        self._observe_failure(result)
        if count_conflict:
            self.on_conflict()
        return False


def _planning(planner: Planner, view: ReadingView, call: AnyCall,
              txn: TxnPlan) -> Callable[[], bool]:
    return lambda: planner.plan(view, call, txn)


def _settle(op: _Pending, result: Any = None, error: BaseException | None = None) -> None:
    """Answer a waiting caller, unless it stopped waiting (cancelled, timed out)."""
    if op.future.done():
        return
    if error is not None:
        op.future.set_exception(error)
    else:
        op.future.set_result(result)


def _fail(ops: Iterable[_Pending], exc: BaseException) -> None:
    for op in ops:
        _settle(op, error=exc)
