"""Upkeep: what a node's engine does off every pod's path.

The warm reserve (blocks claimed ahead of need), the claim look-ahead (the
block the next claim takes, found while the node's blocks run low), the
free-block index of its own blocks repaired, sticky holds expired, unwanted
blocks dropped and stale handles collected. Each is
planned by the same planner as a request and committed as its own guarded
transaction.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from .committer import Committer
from .core import allocator
from .core.allocator import TxnPlan
from .core.claims import CLAIM_HINT_BELOW, ClaimHint
from .core.errors import Conflict, InvalidInput, TopoipamError
from .core.holdings import Attachment, Handle, handle_prefix, parked_identity
from .core.model import IPNetwork
from .core.writes import Write
from .store import LOST_RACE, LostRace, retry_cas

log = logging.getLogger(__name__)


class Upkeep(Committer):
    """The engine's background work; see the module."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Parked identities seen in this node's blocks -> the end of their hold as
        # last read: expiry reads an identity again only once its hold may be over.
        self._parked_until: dict[str, float] = {}
        self._prefetch: asyncio.Task[None] | None = None

    @property
    def _claim_hints(self) -> dict[str, ClaimHint]:
        return self.planner.memory.claim_hints

    async def close(self) -> None:
        self._closed = True
        await self._cancel_and_wait(self._prefetch)
        await self._close_committer()

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

    # ------------------------------------------------------------------ claims ahead
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
        memory = self.planner.memory
        seen = memory.claims_seen
        try:
            state = await self.source.state()
            config = state.config
            affine = await self.source.affine_blocks()
            if memory.claims_seen != seen:
                return  # a claim took a hint meanwhile: these reads may predate it
            if not config.auto_allocate_blocks:
                return
            short = self.planner.short_family(state, [v.value for v in affine],
                                              CLAIM_HINT_BELOW)
            if short is None:
                return
            view = self.source.view(state)
            for pool in short[1]:
                if pool.topology_key:  # its claims look in its value's ranges: no hint
                    return
                hint = memory.claim_hints.get(pool.name)
                if hint is not None and hint.fits(pool, self.clock()):
                    return
                txn = TxnPlan(state.pools)
                cidr = await self._plan(view, functools.partial(
                    self.planner.find_unclaimed_block, view, pool, txn))
                if memory.claims_seen != seen:
                    return  # the block found may be the one that claim takes
                if cidr is not None:
                    # Only the entry of the claim's own window (deleted if the claim
                    # fills it): entries found wrong on the way are left for a reader
                    # that acts on them at once.
                    marks = {window: mark for window, mark in txn.room_marks.items()
                             if window.version == cidr.version
                             and window.supernet_of(cidr)}
                    memory.claim_hints[pool.name] = ClaimHint(cidr, marks, self.clock())
                    return
        except TopoipamError as exc:  # the request path will read for itself
            log.debug("claim prefetch skipped: %s", exc)
        except Exception:  # a head start only: never let it go unreported, never fail calls
            log.exception("claim prefetch failed")

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
        """One round of top_up_reserve: claim one block (True), or nothing to do (False)."""
        state = await self.source.state()
        view = self.source.view(state)
        txn = TxnPlan(state.pools)
        if not await self._plan(view, functools.partial(
                self.planner.reserve_claim, view, spent, txn)):
            return False
        return True if await self._commit_plan(txn) else LOST_RACE

    # ------------------------------------------------------------------ repairs
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
        """Drop this node's empty affine blocks whose pool no longer selects it, or that
        lie in a topology range of another label value (kept across a relabel)."""
        dropped = []
        state = await self.source.state()
        for current in await self.source.affine_blocks():
            if not current.value.is_empty():
                continue
            txn = TxnPlan(state.pools)
            view = self.source.view(state)
            if not await self._plan(view, functools.partial(
                    self.planner.droppable, view, current.value, txn)):
                continue
            await self._plan(view, functools.partial(
                self.planner.drop_block, view, txn, current.value, current.mod_revision,
                current.value), txn)
            if await self._commit_plan(txn, count_conflict=False):
                dropped.append(current.value.cidr)
        return dropped

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


def _attachment_id(handle: Handle) -> str | None:
    """The current id of the attachment a (possibly legacy) handle's attributes name."""
    try:
        return Attachment(handle.attributes.get("network", ""),
                          handle.attributes.get("container_id", ""),
                          handle.attributes.get("ifname", "")).handle_id
    except InvalidInput:
        return None
