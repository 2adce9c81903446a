"""The planner's ground floor: its memory, its shared rules, and where room is found.

:class:`PlannerBase` holds what a node's planner remembers between calls
(the handles it wrote, claim hints, pools found full lately) and the rules
every plan shares (which pools, the assignment context, which blocks are
unwanted, a repeated ADD's answer). Its search finds a block to claim
through the room index, or a block to borrow from through the free-block
index, reading a few index entries and keys whatever the size of the pool.
The sticky plans (:mod:`.sticky`) and the allocation plans (:mod:`.planner`)
build on it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from . import allocator, topology
from .allocator import AssignContext, TxnPlan
from .calls import AllocatedAddress, Allocation, AllocationRequest
from .errors import AddressUnavailable, TopoipamError
from .holdings import Block, Handle
from .model import IPAddress, IPNetwork, IPPool
from .view import ClusterState, View
from .writes import Versioned

# Below this many free addresses in its own blocks (per IP family), the engine
# finds the block its next claim will take, off the pod's path; the hint is
# used once, and only while it is this fresh.
CLAIM_HINT_BELOW = 8
CLAIM_HINT_SECONDS = 10.0

# Free-block index entries a borrow reads at a time.
BORROW_WINDOW = 8
# Room index entries a claim reads at a time.
ROOM_READ = 4
#: Free-block index entries a reclaim reads from each starting point.
RECLAIM_READ = 16
#: Blocks whose topology range holder a planner remembers before it starts afresh.
RANGE_MEMORY = 4096
# A pool read whole and found without an unclaimed block (or, for borrowing,
# without a free address) is not searched again for this long, and a claim's
# pool is then read whole again only if its survey counts changed: a full pool
# looks to its room index like one written before the index, and each claim
# would read all of it. Room made meanwhile still shows: a deleted block puts
# its window's room entry, a block with an address to lend its free-block
# entry, in the transaction that makes the room.
WHOLE_POOL_RECHECK_SECONDS = 30.0


@dataclass(frozen=True)
class ClaimHint:
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


MemorySnapshot = tuple[dict[str, ClaimHint], dict[tuple[str, str], tuple[IPPool, float]],
                       dict[str, tuple[IPPool, list[int], object]], int]


@dataclass
class PlannerMemory:
    """What a node's planner carries from one call to the next. Only hints: a stale one
    costs a lost compare or a read, never a wrong write."""

    # Handles this node wrote, so a release needs no read first; a stale entry
    # fails its compare and is refreshed.
    handles: dict[str, Versioned[Handle]] = field(default_factory=dict)
    # pool name -> the block its next claim takes, found off the pod's path when
    # this node's own blocks ran low. Used once.
    claim_hints: dict[str, ClaimHint] = field(default_factory=dict)
    # ("claim" | "borrow", pool name) -> the pool as it was read whole and found
    # with nothing to give, and when: see WHOLE_POOL_RECHECK_SECONDS.
    found_full: dict[tuple[str, str], tuple[IPPool, float]] = field(default_factory=dict)
    # pool name -> the pool, its survey's counts and the reservations when it was
    # last read whole and found full: the same again needs no whole read.
    full_survey: dict[str, tuple[IPPool, list[int], object]] = field(default_factory=dict)
    # Claims that took a hint or committed: a prefetch that overlaps one keeps nothing.
    claims_seen: int = 0
    # This node's block -> (pool, value) of its topology range's holder as read (None:
    # nobody holds it): a holder cannot change while a block is in its range.
    range_of: dict[IPNetwork, tuple[str, str | None] | None] = field(default_factory=dict)

    def snapshot(self) -> MemorySnapshot:
        return (dict(self.claim_hints), dict(self.found_full), dict(self.full_survey),
                self.claims_seen)

    def restore(self, saved: MemorySnapshot) -> None:
        """Back to ``saved``, for a plan abandoned to read what its view lacked."""
        hints, found_full, full_survey, self.claims_seen = saved
        for table, before in ((self.claim_hints, hints), (self.found_full, found_full),
                              (self.full_survey, full_survey)):
            table.clear()
            table.update(before)  # type: ignore[arg-type]


class PlannerBase:
    """One node's planner: pure, but with a memory; see :class:`.planner.Planner`."""

    def __init__(self, node: str, clock: Callable[[], float] = time.time,
                 memory: PlannerMemory | None = None) -> None:
        self.node = node
        self.clock = clock
        self.memory = memory or PlannerMemory()
        # Pool choices per (family, requested pools) for one ClusterState object.
        self._pool_choice: tuple[object, dict[tuple[int, tuple[str, ...]],
                                              list[IPPool] | TopoipamError]] = (None, {})

    # ------------------------------------------------------------------ shared rules
    def pools_for(self, state: ClusterState, family: int,
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

    def context(self, state: ClusterState, pool: IPPool,
                request: AllocationRequest | None = None) -> AssignContext:
        return AssignContext(
            pool=pool,
            reservations=state.reservations,
            now=self.clock(),
            cooldown=float(state.config.ip_cooldown_seconds),
            excluded=(frozenset(map(int, request.gateways)) if request and request.gateways
                      else frozenset()),
        )

    @staticmethod
    def planned_block(view: View, cidr: IPNetwork, txn: TxnPlan) -> tuple[Block | None, int]:
        """A block as this transaction has it so far, else as read: (value or None if
        absent, the revision that guards its write)."""
        planned = txn.blocks.get(cidr)
        if planned is not None:
            return planned
        current = view.block(cidr)
        return (current.value, current.mod_revision) if current is not None else (None, 0)

    def unwanted(self, state: ClusterState, block: Block) -> bool:
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

    def in_foreign_range(self, view: View, block: Block, txn: TxnPlan) -> bool:
        """Whether this node's ``block`` lies in a topology range another label value
        holds: a block kept across a relabel of this node. It gives out no new address
        and is dropped once empty (:meth:`droppable`), so the node moves to its new
        value's ranges and the old range can go back to its pool.

        The holder is read once per block and remembered: it cannot change while the
        block is in its range. A hint all the same: a wrong one only keeps a block in
        use, or drops an empty one, a little early or late.
        """
        pool = allocator.pool_of_block(view.state().pools, block.cidr)
        if pool is None or not pool.topology_key:
            return False
        memory = self.memory.range_of
        held = memory.get(block.cidr, ())
        if held == ():
            if block.cidr in txn.blocks and txn.blocks[block.cidr][1] == 0:
                return False  # claimed in this transaction: in its value's range
            holder = view.range_holder(pool.topology_range(block.cidr)) \
                if block.cidr.prefixlen >= pool.topology_prefix else None
            if len(memory) > RANGE_MEMORY:
                memory.clear()
            held = memory[block.cidr] = (None if holder is None
                                         else (holder.value.pool, holder.value.value))
        return held is not None and held != (pool.name, topology.value_of(
            pool, view.state().labels))

    def droppable(self, view: View, block: Block, txn: TxnPlan) -> bool:
        """:meth:`unwanted`, or an empty block of this node in another value's range."""
        return self.unwanted(view.state(), block) or (
            block.is_empty() and block.affinity == self.node
            and self.in_foreign_range(view, block, txn))

    def put_or_drop(self, view: View, txn: TxnPlan, new: Block, revision: int,
                    before: Block) -> None:
        """Plan ``new`` (a block addresses were freed from), deleting it if it is unwanted."""
        if self.droppable(view, new, txn):
            self.drop_block(view, txn, new, revision, before)
        else:
            txn.put_block(new, revision, before)

    def drop_block(self, view: View, txn: TxnPlan, block: Block, revision: int,
                   before: Block) -> None:
        """Plan ``block`` deleted; its topology range goes back to the pool if it held
        no other block."""
        txn.delete_block(block, revision, before)
        pool = allocator.pool_of_block(view.state().pools, block.cidr)
        if pool is not None and pool.topology_key:
            topology.give_back(view, pool, block.cidr, txn, self._known_blocks)

    def place_block(self, view: View, pool: IPPool, cidr: IPNetwork, txn: TxnPlan,
                    address: IPAddress, strict: bool = True) -> None:
        """Plan the topology range of new block ``cidr`` of this node (made for ``address``
        where no claim chose it): see :func:`.topology.place`. Nothing for other pools."""
        if pool.topology_key:
            topology.place(view, pool, topology.value_of(pool, view.state().labels), cidr, txn,
                           self._known_blocks, address, strict)

    @staticmethod
    def allocation_of(handle: Handle, state: ClusterState) -> Allocation:
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

    def existing_allocation(self, request: AllocationRequest, handle: Handle,
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
        return self.allocation_of(handle, state)

    # ------------------------------------------------------------------ claims
    def unclaimed_block(self, view: View, pool: IPPool, txn: TxnPlan) -> IPNetwork | None:
        """A block CIDR of ``pool`` nobody has claimed: the one found in advance (a
        claim hint) if it is fresh, else :meth:`find_unclaimed_block`.

        A hint is only a head start: the claim is guarded by the block key's
        ``create_revision == 0`` as always, so a block another node claimed
        meanwhile makes the transaction lose its compare and re-plan (without
        the hint, which is used once).
        """
        if pool.topology_key:  # inside its label value's ranges (no hints: see upkeep)
            value = topology.value_of(pool, view.state().labels)
            cidr = topology.topology_block(view, pool, value, txn, self._known_blocks, self.node)
            if cidr is not None:  # its range is its value's: no read when it gives out more
                self.memory.range_of[cidr] = (pool.name, value)
            return cidr
        memory = self.memory
        hint = memory.claim_hints.pop(pool.name, None)
        if hint is not None:
            memory.claims_seen += 1
        if hint is not None and hint.fits(pool, self.clock()) and hint.cidr not in txn.blocks \
                and not any(v.value.cidr == hint.cidr for v in txn.affine_read or ()):
            for window, mark in hint.room_marks.items():
                txn.room_marks.setdefault(window, mark)
            return hint.cidr
        return self.find_unclaimed_block(view, pool, txn)

    def find_unclaimed_block(self, view: View, pool: IPPool, txn: TxnPlan) -> IPNetwork | None:
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
        state = view.state()
        own = next(allocator.claim_windows(pool, self.node))
        rooms = txn.rooms.get(pool.name)
        if rooms is None:
            # One round trip: the room entries from this node's window on, and that
            # window's blocks if it has room (where the claim lands in the common case).
            read, in_own = view.claim_reads(pool.cidr, own, ROOM_READ)
            rooms = list(read)
            if in_own is not None:
                txn.existing.setdefault(own, set(in_own))
            if len(rooms) < ROOM_READ:  # wrap round to the pool's first windows
                rooms += [w for w in view.room_windows(pool.cidr, None, ROOM_READ)
                          if w not in rooms]
            txn.rooms[pool.name] = rooms
        for window in rooms:
            if txn.room_marks.get(window) is False:
                continue
            known = self._known_blocks(view, window, txn)
            cidr = allocator.first_unclaimed_block(pool, known, state.reservations, window)
            if cidr is None:
                txn.room_marks[window] = False  # the entry was wrong: drop it
                continue
            if allocator.first_unclaimed_block(pool, known | {cidr}, state.reservations,
                                               window) is None:
                txn.room_marks[window] = False  # this claim fills the window
            return cidr
        return self._surveyed_block(view, state, pool, own, txn)

    @staticmethod
    def _known_blocks(view: View, within: IPNetwork, txn: TxnPlan) -> set[IPNetwork]:
        """The block CIDRs inside ``within``: read once per transaction, plus its plans."""
        known = txn.existing.get(within)
        if known is None:
            known = txn.existing[within] = set(view.block_cidrs(within))
        known.update(txn.blocks)
        return known

    def _surveyed_block(self, view: View, state: ClusterState, pool: IPPool, own: IPNetwork,
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
            groups = tuple(allocator.claim_groups(pool, self.node))
            in_window, counts = view.survey_blocks(own, groups)
            txn.existing.setdefault(own, set(in_window))
            survey = txn.surveys[pool.name] = list(zip(groups, counts, strict=True))
        candidates = [own, *(group for group, count in survey
                             if count < 1 << (pool.block_size - group.prefixlen))]
        unchanged = (pool, [count for _, count in survey], state.reservations.ip_set)
        if self.memory.full_survey.get(pool.name) != unchanged:
            candidates.append(pool.cidr)
        for within in candidates:
            known = self._known_blocks(view, within, txn)
            cidr = allocator.first_unclaimed_block(pool, known, state.reservations, within)
            if cidr is not None:
                return cidr
        self.memory.full_survey[pool.name] = unchanged
        self.memory.found_full[("claim", pool.name)] = (pool, self.clock())
        return None

    def _seen_full(self, search: str, pool: IPPool) -> bool:
        """Whether ``pool`` (as it is now) was read whole for ``search`` lately and
        found with nothing to give: then the index alone is trusted for a while."""
        seen = self.memory.found_full.get((search, pool.name))
        if seen is None:
            return False
        if seen[0] != pool or not 0 <= self.clock() - seen[1] < WHOLE_POOL_RECHECK_SECONDS:
            del self.memory.found_full[(search, pool.name)]
            return False
        return True

    # ------------------------------------------------------------------ reclaiming
    def reclaimable_block(self, view: View, pool: IPPool, txn: TxnPlan
                          ) -> Versioned[Block] | None:
        """An empty block of ``pool`` affine to another node, to take over when the pool
        has no unclaimed block left; None if the free-block index lists none.

        Empty means no allocation (a parked sticky address is one), no address
        cooling down and no contested address. Read from the free-block index
        like a borrow (:data:`RECLAIM_READ` entries from this node's point, then
        from the pool's start; with a ``topologyKey``, from each range of its
        value it knows first): blocks of deleted nodes, of no node and of nodes
        the pool no longer selects first, then the rest (other nodes' warm
        reserve) in index order. With a ``topologyKey``, only blocks in ranges
        this node's value holds (whatever their room): a block taken from
        another value's range would put two values in one range. The
        take-over is guarded by the block's revision, so a block its owner
        allocated from (or dropped) meanwhile loses the race; the range keeps
        its holder, which cannot change while the block exists.
        """
        state = view.state()
        now, cooldown = self.clock(), float(state.config.ip_cooldown_seconds)
        found: list[tuple[int, Versioned[Block]]] = []
        tried: set[IPNetwork] = set()
        value = topology.value_of(pool, state.labels) if pool.topology_key else None
        starts: list[tuple[IPNetwork, IPNetwork | None]] = [
            (pool.cidr, allocator.borrow_start(pool, self.node)), (pool.cidr, None)]
        if pool.topology_key:  # its value's ranges first: the only ones it may take from
            starts = [(span, None) for span in self.value_spans(view, pool, txn)] + starts
        for within, begin in starts:
            for cidr, owner in view.free_blocks(within, begin, RECLAIM_READ):
                if owner == self.node or cidr in tried or cidr in txn.blocks:
                    continue
                tried.add(cidr)
                current = view.block(cidr)
                if current is None or not _reclaimable(current.value, self.node, now, cooldown):
                    continue
                if pool.topology_key and not topology.held_by_value(view, pool, value, cidr,
                                                                    txn):
                    continue
                holder = current.value.affinity
                labels = view.node_labels(holder) if holder is not None else None
                found.append((0 if labels is None or not pool.selects(labels) else 1, current))
                if found[-1][0] == 0:
                    return current
        return min(found, key=lambda entry: entry[0])[1] if found else None

    @staticmethod
    def value_spans(view: View, pool: IPPool, txn: TxnPlan | None) -> list[IPNetwork]:
        """The ranges of ``pool`` known to be this node's value's without a search: those
        it lists (with room) and those its own blocks lie in (full ones are unlisted)."""
        listed = [held.value.cidr for held in view.value_ranges(
            pool.name, topology.value_of(pool, view.state().labels))]
        return list(dict.fromkeys([*listed, *topology.own_ranges(view, pool, txn)]))

    # ------------------------------------------------------------------ borrowing
    def more_value_spans(self, view: View, pool: IPPool, known: list[IPNetwork]
                         ) -> Iterator[IPNetwork]:
        """Other ranges of ``pool`` this node's value holds (full ones that hold none of
        this node's blocks), asked only when ``known`` gave nothing: the first few held
        ranges from the value's origin on (where its ranges grow from), wrapping to the
        pool's start; one small read (two when it wraps), whatever the size of the pool."""
        value = topology.value_of(pool, view.state().labels)
        held = view.holders_from(pool.cidr, topology.value_origin(pool, value), BORROW_WINDOW)
        if len(held) < BORROW_WINDOW:
            held += view.holders_from(pool.cidr, None, BORROW_WINDOW - len(held))
        seen = set(known)
        for holder in held:
            if holder.value == value and holder.cidr not in seen:
                seen.add(holder.cidr)
                yield holder.cidr

    def borrow_candidates(self, view: View, pool: IPPool, txn: TxnPlan | None = None
                          ) -> Iterator[Versioned[Block]]:
        """Other nodes' blocks of ``pool`` that may have an address to give, best first.

        First the free-block index, read from a node-specific point a few
        entries at a time (so a borrow reads a few keys and a block or two,
        whatever the size of the pool); then, should none of those give one
        (an index entry is only a hint, and blocks written before the index
        have none), every block of the pool, unless that found nothing lately.
        """
        tried: set[IPNetwork] = set()
        start = allocator.borrow_start(pool, self.node)
        # With a topologyKey, the free blocks of this node's value's ranges come first.
        known = self.value_spans(view, pool, txn) if pool.topology_key else []
        spans = itertools.chain(
            known, self.more_value_spans(view, pool, known) if pool.topology_key else ())
        for within, begin in itertools.chain(((span, None) for span in spans),
                                             ((pool.cidr, start), (pool.cidr, None))):
            for cidr, owner in view.free_blocks(within, begin, BORROW_WINDOW):
                if owner == self.node or cidr in tried:
                    continue
                tried.add(cidr)
                current = view.block(cidr)
                if current is not None:
                    yield current
        if self._seen_full("borrow", pool):
            return
        for versioned in view.pool_blocks(pool.cidr):
            if versioned.value.cidr not in tried:
                yield versioned
        # Reached only if the caller took nothing from the whole pool.
        self.memory.found_full[("borrow", pool.name)] = (pool, self.clock())

    def short_family(self, state: ClusterState, affine: Sequence[Block], wanted: int,
                     skip: set[int] | frozenset[int] = frozenset()
                     ) -> tuple[int, list[IPPool]] | None:
        """The first IP family (not in ``skip``) whose free addresses are below ``wanted``
        and that may still claim a block (below ``maxBlocksPerHost``), with its pools."""
        for family in sorted({p.family for p in state.pools} - set(skip)):
            if allocator.at_block_cap(state.config.max_blocks_per_host, affine, family):
                continue
            try:
                pools = self.pools_for(state, family, ())
            except TopoipamError:
                continue
            free = 0
            for pool in pools:
                ctx = self.context(state, pool)
                first, last = pool.bounds
                free += sum(allocator.free_count(block, ctx) for block in affine
                            if first <= block.first and block.last <= last)
            if free < wanted:
                return family, pools
        return None


def _reclaimable(block: Block, node: str, now: float, cooldown: float) -> bool:
    """Whether ``node`` may take ``block`` over: another node's (or nobody's), empty,
    nothing contested and no address still cooling down."""
    return (block.affinity != node and block.is_empty() and not block.contested
            and all(now - released >= cooldown for released in block.released_at.values()))
