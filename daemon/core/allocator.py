"""Pure allocation decisions: which pools, which block, which ordinal, what to write.

No I/O and no asyncio: every function takes plain values and returns new
values (blocks are copied before they change), so the async engine in
:mod:`topoipam.daemon.engine` can plan a transaction, lose a compare-and-swap
race and simply plan again from fresher values.
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import netaddr

from .errors import AddressUnavailable, NoPoolForNode, UnknownPool
from .holdings import Block, TopologyRange
from .model import (
    IPAddress,
    IPNetwork,
    IPPool,
    IPReservation,
    parse_network,
)
from .writes import (
    DeleteAffinity,
    DeleteBlock,
    DeleteFreeMark,
    DeleteRoomMark,
    DeleteTopologyRange,
    NoBlocksIn,
    PutAffinity,
    PutBlock,
    PutFreeMark,
    PutRoomMark,
    RangeHeld,
    Versioned,
    Write,
)


class Reservations:
    """Addresses that are never handed out, from every IPReservation."""

    def __init__(self, reservations: Iterable[IPReservation] = ()) -> None:
        self._set = netaddr.IPSet(str(c) for r in reservations for c in r.cidrs)
        self._empty = not self._set

    @property
    def ip_set(self) -> netaddr.IPSet:
        return self._set

    def __contains__(self, address: IPAddress) -> bool:
        if self._empty:
            return False
        return netaddr.IPAddress(int(address), address.version) in self._set

    def __bool__(self) -> bool:
        return not self._empty


NO_RESERVATIONS = Reservations()


def usable_capacity(pool: IPPool, reservations: Reservations) -> int:
    """How many addresses of ``pool`` can ever be allocated: all of them, less the
    unusable ones and those IPReservations keep (each counted once)."""
    excluded = netaddr.IPSet(str(a) for a in pool.unusable())
    if reservations:
        excluded |= reservations.ip_set & netaddr.IPSet([str(pool.cidr)])
    return pool.cidr.num_addresses - int(excluded.size)


def _matches_request(pool: IPPool, wanted: str) -> bool:
    if pool.name == wanted:
        return True
    return "/" in wanted and str(pool.cidr) == wanted


def pools_for_node(
    pools: Iterable[IPPool],
    node: str,
    labels: Mapping[str, str],
    family: int,
    requested: Sequence[str] = (),
) -> list[IPPool]:
    """The pools an allocation on ``node`` may use, in the order they are tried.

    Requested pools (names or CIDRs) must exist, be enabled and be of the
    family; they are used in the order given, whatever their selector and
    assignment mode. Otherwise: every enabled Automatic pool whose selector
    matches the labels, highest ``priority`` first, then in name order
    (:func:`priority_tiers` splits them by priority).
    """
    pools = sorted(pools, key=lambda p: p.name)
    if requested:
        chosen = []
        for wanted in requested:
            match = next((p for p in pools if _matches_request(p, wanted)), None)
            if match is None:
                if "/" in wanted:
                    parse_network(wanted, f"requested pool {wanted}")
                raise UnknownPool(wanted)
            if match.family != family:
                raise UnknownPool(wanted, f"is an IPv{match.family} pool, not IPv{family}")
            if match.disabled:
                raise UnknownPool(match.name, "is disabled")
            chosen.append(match)
        return chosen
    chosen = sorted(
        (p for p in pools
         if p.family == family and not p.disabled and p.automatic and p.selects(labels)),
        key=lambda p: -p.priority)  # stable: name order within a priority
    if not chosen:
        raise NoPoolForNode(node, labels, family,
                            [p.name for p in pools if p.family == family and p.automatic],
                            [p.name for p in pools if p.family == family and not p.automatic])
    return chosen


def priority_tiers(pools: Sequence[IPPool]) -> list[list[IPPool]]:
    """``pools`` (as :func:`pools_for_node` orders them) cut where the priority changes:
    a lower tier serves a node only when no pool of a higher one can."""
    tiers: list[list[IPPool]] = []
    for pool in pools:
        if tiers and tiers[-1][0].priority == pool.priority:
            tiers[-1].append(pool)
        else:
            tiers.append([pool])
    return tiers


def explain_pool(pool: IPPool, labels: Mapping[str, str]) -> tuple[bool, str]:
    """Whether ``pool`` is used for automatic allocation on a node with ``labels``, and why."""
    if pool.disabled:
        return False, "pool is disabled"
    if not pool.automatic:
        return False, "assignmentMode is Manual (used only when named in the CNI config)"
    if pool.selects(labels):
        return True, f"selector {pool.node_selector} matches"
    return False, f"selector {pool.node_selector} does not match: {pool.selector.explain(labels)}"


def pool_of(pools: Iterable[IPPool], address: IPAddress) -> IPPool | None:
    for pool in pools:
        if address.version == pool.family and address in pool.cidr:
            return pool
    return None


def pool_of_block(pools: Iterable[IPPool], cidr: IPNetwork) -> IPPool | None:
    for pool in pools:
        if cidr.version == pool.family and cidr.subnet_of(pool.cidr):  # type: ignore[arg-type]
            return pool
    return None


def at_block_cap(max_blocks_per_host: int, blocks: Iterable[Block], family: int) -> bool:
    """Whether a node that owns ``blocks`` may claim no more blocks of ``family``.

    ``maxBlocksPerHost`` (0: no cap) counts each IP version on its own, as Calico
    does: a node at its IPv4 cap still claims the IPv6 block a dual-stack pod needs.
    """
    if not max_blocks_per_host:
        return False
    return sum(1 for block in blocks if block.family == family) >= max_blocks_per_host


@dataclass(frozen=True)
class AssignContext:
    """What, besides the block itself, decides whether an ordinal may be handed out."""

    pool: IPPool
    reservations: Reservations = NO_RESERVATIONS
    now: float = 0.0
    cooldown: float = 0.0
    #: Addresses (as integers) the request itself names as gateways.
    excluded: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        # Integers of the pool's unusable addresses (network, broadcast, gateway):
        # the hot path compares ints, not address objects.
        unusable = self.pool.unusable_ints
        object.__setattr__(self, "_unusable",
                           unusable | self.excluded if self.excluded else unusable)

    def available(self, block: Block, ordinal: int) -> bool:
        if block.first + ordinal in self._unusable:  # type: ignore[attr-defined]
            return False
        if self.reservations and block.address(ordinal) in self.reservations:
            return False
        if self.cooldown:
            released = block.released_at.get(ordinal)
            if released is not None and released + self.cooldown > self.now:
                return False
        return True


def first_available(block: Block, ctx: AssignContext) -> int | None:
    """The first ordinal on the free list that may be handed out now, or None."""
    for ordinal in block.unallocated:
        if ctx.available(block, ordinal):
            return ordinal
    return None


def free_count(block: Block, ctx: AssignContext) -> int:
    return sum(1 for ordinal in block.unallocated if ctx.available(block, ordinal))


def assign_next(block: Block, handle_id: str, ctx: AssignContext) -> tuple[Block, IPAddress] | None:
    """A copy of ``block`` with its next available address given to ``handle_id``."""
    ordinal = first_available(block, ctx)
    if ordinal is None:
        return None
    return _assign(block, ordinal, handle_id), block.address(ordinal)


def assign_address(
    block: Block, address: IPAddress, handle_id: str, ctx: AssignContext
) -> Block:
    """A copy of ``block`` with ``address`` given to ``handle_id``.

    Raises AddressUnavailable if the address is held, reserved, unusable or cooling down.
    """
    ordinal = block.ordinal(address)
    holder = block.allocations.get(ordinal)
    if holder is not None:
        raise AddressUnavailable(f"address {address} is already allocated (to {holder})")
    if address in ctx.reservations:
        raise AddressUnavailable(f"address {address} is reserved by an IPReservation")
    if address == ctx.pool.gateway:
        raise AddressUnavailable(f"address {address} is the gateway of pool {ctx.pool.name}")
    if int(address) in ctx.excluded:
        raise AddressUnavailable(f"address {address} is a gateway of the network's config")
    if not ctx.pool.usable(address):
        raise AddressUnavailable(
            f"address {address} is the network or broadcast address of pool {ctx.pool.name}"
        )
    if not ctx.available(block, ordinal):
        raise AddressUnavailable(
            f"address {address} was released recently and is cooling down "
            f"(ipCooldownSeconds={int(ctx.cooldown)})"
        )
    return _assign(block, ordinal, handle_id)


def _assign(block: Block, ordinal: int, handle_id: str) -> Block:
    new = block.copy()
    new.unallocated.remove(ordinal)
    # The last release time stays while the ordinal is held: the cooldown reads it
    # only for free ordinals, and a node re-checking its record after a restart
    # tells "released, then given to another" (a release time after its record)
    # from "lost by etcd, then given to another" (none) by it.
    new.allocations[ordinal] = handle_id
    return new


def release_addresses(
    block: Block, addresses: Iterable[IPAddress], handle_id: str | None, now: float
) -> tuple[Block, list[IPAddress]]:
    """A copy of ``block`` with ``addresses`` freed, and the addresses actually freed.

    Only addresses held by ``handle_id`` are freed (any holder when None), so
    a stale release never frees an address that was handed out again since.
    Freed ordinals go to the back of the free list (delayed reuse).

    A contested address (a conflict after a restore) is never freed: its
    release hands it to the attachment the conflict names, in the same
    write, so nothing can take it in between; and a release by that
    attachment itself ends the conflict, leaving the address with its holder.
    """
    new = block.copy()
    freed = []
    for address in addresses:
        ordinal = block.ordinal(address)
        holder = new.allocations.get(ordinal)
        contested = new.contested.get(ordinal)
        if contested is not None and handle_id is not None and contested[0] == handle_id:
            del new.contested[ordinal]  # the recorded side let go: the holder keeps it
            new.released_at[ordinal] = now  # what tells its node's record it was released
            continue
        if holder is None or (handle_id is not None and holder != handle_id):
            continue
        new.released_at[ordinal] = now
        freed.append(address)
        if contested is not None:
            new.allocations[ordinal] = contested[0]
            del new.contested[ordinal]
            continue
        del new.allocations[ordinal]
        new.unallocated.append(ordinal)
    return new, freed


def hand_over(block: Block, address: IPAddress, holder: str, new_holder: str) -> Block | None:
    """A copy of ``block`` with ``address`` moved from ``holder`` to ``new_holder``, or
    None if ``holder`` does not hold it (a sticky address parked or taken back)."""
    ordinal = block.ordinal(address)
    if block.allocations.get(ordinal) != holder:
        return None
    new = block.copy()
    new.allocations[ordinal] = new_holder
    return new


#: Block CIDRs per claim window: what one claim reads in the common case.
CLAIM_WINDOW_BLOCKS = 16


def node_offset(node: str, count: int) -> int:
    """A stable, node-specific index in ``range(count)`` (the same on every host)."""
    return zlib.crc32(node.encode()) % count if count > 1 else 0


def window_prefix(pool: IPPool) -> int:
    """The prefix length of the pool's claim windows (up to 16 blocks each)."""
    return max(pool.cidr.prefixlen, pool.block_size - (CLAIM_WINDOW_BLOCKS.bit_length() - 1))


def window_of(pools: Iterable[IPPool], cidr: IPNetwork) -> IPNetwork | None:
    """The claim window a block CIDR lies in, or None if no pool owns it."""
    pool = pool_of_block(pools, cidr)
    if pool is None or pool.block_size != cidr.prefixlen:
        return None
    return cidr.supernet(new_prefix=window_prefix(pool))


def claim_windows(pool: IPPool, node: str) -> Iterator[IPNetwork]:
    """The pool's claim windows (aligned runs of up to 16 block CIDRs) in the order
    ``node`` tries them: from a node-specific start, wrapping round the pool.

    Nodes start in different windows, so a claim reads a window's keys instead
    of every block key of the pool, and concurrent claims rarely race.
    """
    prefix = window_prefix(pool)
    count = 1 << (prefix - pool.cidr.prefixlen)
    size = 1 << (pool.cidr.max_prefixlen - prefix)
    base = int(pool.cidr.network_address)
    start = node_offset(node, count)
    for step in range(count):
        yield ipaddress.ip_network(
            (base + ((start + step) % count) * size, prefix))


#: Groups of claim windows whose blocks one survey transaction counts.
CLAIM_SURVEY_GROUPS = 64


def claim_groups(pool: IPPool, node: str) -> list[IPNetwork]:
    """At most 64 aligned parts of the pool, in the order ``node`` tries them (its own
    window's part first): what one survey transaction counts the blocks of."""
    window = next(claim_windows(pool, node))
    prefix = min(window.prefixlen,
                 pool.cidr.prefixlen + (CLAIM_SURVEY_GROUPS.bit_length() - 1))
    count = 1 << (prefix - pool.cidr.prefixlen)
    size = 1 << (pool.cidr.max_prefixlen - prefix)
    base = int(pool.cidr.network_address)
    start = (int(window.network_address) - base) // size
    return [ipaddress.ip_network((base + ((start + step) % count) * size, prefix))
            for step in range(count)]


def borrow_start(pool: IPPool, node: str) -> IPNetwork:
    """The block CIDR where ``node`` starts reading the pool's free-block index."""
    count = 1 << (pool.block_size - pool.cidr.prefixlen)
    size = 1 << (pool.cidr.max_prefixlen - pool.block_size)
    return ipaddress.ip_network((int(pool.cidr.network_address)
                                 + node_offset(node, count) * size, pool.block_size))


def first_unclaimed_block(
    pool: IPPool, existing: set[IPNetwork], reservations: Reservations = NO_RESERVATIONS,
    within: IPNetwork | None = None,
) -> IPNetwork | None:
    """The first block CIDR of ``pool`` (inside ``within``, default all of it) that no
    existing block overlaps.

    Existing blocks may have another size (left over from a deleted pool
    with another block size): a candidate that overlaps one is taken, or two
    blocks would hand out the same addresses. A block whose every address is
    reserved or unusable is skipped: claiming it would give the node nothing.
    The claimed slots are sorted once and walked for the first gap (the
    pool's size or fullness costs one sort, never a pass per block), and
    reservations are subtracted as one address set, so a pool that is mostly
    reserved or claimed costs no more than a sort of its blocks.
    """
    area = within or pool.cidr
    first, last = int(area.network_address), int(area.broadcast_address)
    size = 1 << (pool.cidr.max_prefixlen - pool.block_size)
    # Per existing block, the first and last slot start it covers (in the area).
    taken: list[tuple[int, int]] = []
    claimed: list[IPNetwork] = []
    for block in existing:
        if block.version != pool.family:
            continue
        if block.prefixlen >= pool.block_size:
            block = block.supernet(new_prefix=pool.block_size)  # the slot it sits in
        low, high = int(block.network_address), int(block.broadcast_address) - size + 1
        if high >= first and low <= last:
            taken.append((max(low, first), min(high, last)))
            claimed.append(block)
    if not reservations:  # the common case: the first free slot with a usable address
        for slot in _free_slots(first, last, size, sorted(taken)):
            cidr = ipaddress.ip_network((slot, pool.block_size))
            if cidr.num_addresses > 2 or any(pool.usable(cidr.network_address + i)
                                             for i in range(cidr.num_addresses)):
                return cidr
        return None
    free = netaddr.IPSet([str(area)]) - netaddr.IPSet(str(block) for block in claimed)
    free = free - reservations.ip_set
    for address in pool.unusable():
        free.remove(str(address))
    for free_range in free.iter_cidrs():  # in address order; the first one will do
        first_free = (ipaddress.IPv4Address if pool.family == 4 else ipaddress.IPv6Address)(
            int(free_range.first))
        return pool.block_of(first_free)
    return None


def _free_slots(first: int, last: int, size: int, taken: Sequence[tuple[int, int]]
                ) -> Iterator[int]:
    """The slot starts from ``first`` to ``last`` (step ``size``) outside the sorted
    ``taken`` runs (first and last slot start of each)."""
    slot = first
    for low, high in taken:
        while slot < low:
            yield slot
            slot += size
        slot = max(slot, high + size)
    while slot <= last:
        yield slot
        slot += size


#: What :meth:`TxnPlan.snapshot` keeps: the planned writes, not what was read.
TxnSnapshot = tuple[dict[IPNetwork, tuple[Block | None, int]], dict[tuple[str, IPNetwork], bool],
                    dict[str, Write], dict[str, Write], dict[str, Write], frozenset[IPNetwork],
                    dict[IPNetwork, Write], dict[IPNetwork, int]]


class TxnPlan:
    """What one transaction must compare and write: planned block values and their guards.

    The engine plans every call of a batch into one TxnPlan; :meth:`writes`
    gives the guarded writes of the single etcd transaction that commits them.

    Blocks are never modified in place (the allocator returns copies), so a
    snapshot is a shallow copy of the dicts: an operation that fails while
    planning is rolled back without touching the others of its batch.
    """

    def __init__(self, pools: Sequence[IPPool] = ()) -> None:
        self.pools = pools  # to tell which free ordinals a block can really give
        # cidr -> (planned block or None for deleted, mod_revision it was read at; 0 = new)
        self.blocks: dict[IPNetwork, tuple[Block | None, int]] = {}
        # cidr -> whether the block had an address to give when first read (its
        # free-block index entry then), so writes() updates the index on a flip only.
        self.free_before: dict[IPNetwork, bool] = {}
        self.affinities: dict[tuple[str, IPNetwork], bool] = {}  # True put, False delete
        self.handles: dict[str, Write] = {}
        # Sticky identities this transaction writes (PutIdentity / DeleteIdentity).
        self.identities: dict[str, Write] = {}
        # Guards that write nothing (DaemonAbsent of a node whose identity is taken over).
        self.guards: dict[str, Write] = {}
        # Block CIDRs that exist in etcd, per claim window or group, read once per
        # transaction; and per pool, the survey's block count of each group.
        self.existing: dict[IPNetwork, set[IPNetwork]] = {}
        self.surveys: dict[str, list[tuple[IPNetwork, int]]] = {}
        # Per pool, the claim windows the room index lists (read once per transaction),
        # and the room index entries this transaction puts (True) or deletes (False).
        self.rooms: dict[str, list[IPNetwork]] = {}
        self.room_marks: dict[IPNetwork, bool] = {}
        self.affine_read: list[Versioned[Block]] | None = None
        # Blocks this transaction takes over from another node (reclaimed while empty).
        self.reclaimed: set[IPNetwork] = set()
        # Topology ranges taken, touched or given back (PutTopologyRange, DeleteTopologyRange),
        # and those only claimed in, by the holder revision each claim compares (RangeHeld).
        self.ranges: dict[IPNetwork, Write] = {}
        self.range_guards: dict[IPNetwork, int] = {}
        # Per (pool, label value), the ranges that value holds (read once per transaction).
        self.value_ranges: dict[tuple[str, str | None], list[Versioned[TopologyRange]]] = {}

    def snapshot(self) -> TxnSnapshot:
        return (dict(self.blocks), dict(self.affinities), dict(self.handles),
                dict(self.identities), dict(self.guards), frozenset(self.reclaimed),
                dict(self.ranges), dict(self.range_guards))

    def restore(self, saved: TxnSnapshot) -> None:
        blocks, affinities, handles, identities, guards, reclaimed, ranges, range_guards = saved
        self.blocks, self.affinities = dict(blocks), dict(affinities)
        self.handles, self.identities, self.guards = dict(handles), dict(identities), dict(guards)
        self.reclaimed, self.ranges = set(reclaimed), dict(ranges)
        self.range_guards = dict(range_guards)

    def current(self, versioned: Versioned[Block]) -> Block | None:
        """The planned value of a block read at ``versioned``, if this transaction touched it."""
        planned = self.blocks.get(versioned.value.cidr)
        return versioned.value if planned is None else planned[0]

    def put_block(self, block: Block, read_revision: int, before: Block | None) -> None:
        """Plan ``block``'s new value; ``before`` is the value read (None for a new block)."""
        guard = self.blocks.get(block.cidr, (None, read_revision))[1]
        self.blocks[block.cidr] = (block, guard)
        self._first_touch(block.cidr, before)

    def delete_block(self, block: Block, read_revision: int, before: Block | None) -> None:
        guard = self.blocks.get(block.cidr, (None, read_revision))[1]
        self.blocks[block.cidr] = (None, guard)
        self._first_touch(block.cidr, before)
        window = window_of(self.pools, block.cidr)
        if window is not None:  # its slot can be claimed again
            self.room_marks[window] = True
        if block.affinity is not None:
            self.affinities[(block.affinity, block.cidr)] = False

    def reclaim_block(self, block: Block, read_revision: int, before: Block) -> None:
        """Plan ``block`` (``before``, an empty block of another node, now this one's):
        guarded by the revision read, the old affinity deleted, the new one put, and its
        free-block index entry rewritten to name the new owner."""
        self.put_block(block, read_revision, before)
        if before.affinity is not None:
            self.affinities[(before.affinity, block.cidr)] = False
        if block.affinity is not None:
            self.affinities[(block.affinity, block.cidr)] = True
        self.reclaimed.add(block.cidr)

    def claimed(self, node: str) -> list[Block]:
        return [b for b, rev in self.blocks.values() if rev == 0 and b is not None
                and b.affinity == node]

    def _first_touch(self, cidr: IPNetwork, before: Block | None) -> None:
        if cidr not in self.free_before:
            self.free_before[cidr] = before is not None and has_free(before, self.pools)

    def writes(self) -> list[Write]:
        writes: list[Write] = []
        for cidr, (block, revision) in self.blocks.items():
            if block is not None:
                writes.append(PutBlock(block, revision))
            elif revision:
                writes.append(DeleteBlock(cidr, revision))
            marks = free_mark_writes(cidr, self.free_before.get(cidr, False), block, self.pools)
            if not marks and cidr in self.reclaimed and block is not None \
                    and has_free(block, self.pools):
                marks = [PutFreeMark(cidr, block.affinity)]  # the entry names the new owner
            writes += marks
        for (node, cidr), put in self.affinities.items():
            writes.append(PutAffinity(node, cidr) if put else DeleteAffinity(node, cidr))
        writes += [PutRoomMark(w) if put else DeleteRoomMark(w)
                   for w, put in self.room_marks.items()]
        writes += self.ranges.values()
        writes += [RangeHeld(span, revision) for span, revision in self.range_guards.items()
                   if span not in self.ranges]
        writes += [NoBlocksIn(span, self.dropped_in(span)) for span, write in self.ranges.items()
                   if isinstance(write, DeleteTopologyRange)]
        writes += self.handles.values()
        writes += self.identities.values()
        writes += self.guards.values()
        return writes

    def dropped_in(self, span: IPNetwork) -> tuple[IPNetwork, ...]:
        """The blocks inside ``span`` this transaction deletes."""
        return tuple(cidr for cidr, (block, _) in self.blocks.items()
                     if block is None and cidr.version == span.version
                     and span.supernet_of(cidr))  # type: ignore[arg-type]

    def size(self) -> int:
        # A block counts twice: its free-index entry may change with it; a range is two
        # keys (and a give-back's compares); a claim in a held range compares its holder.
        return (2 * len(self.blocks) + 3 * len(self.ranges) + len(self.affinities)
                + len(self.handles) + len(self.identities) + len(self.room_marks)
                + 2 * len(self.guards) + len(self.range_guards))


def has_free(block: Block, pools: Iterable[IPPool]) -> bool:
    """Whether ``block`` has an address its pool may give out (reservations and cooldown
    aside): what its free-block index entry says. A block no pool owns gives nothing."""
    if len(block.unallocated) > 3:  # a pool keeps at most three addresses unusable
        return True
    if not block.unallocated:
        return False
    pool = pool_of_block(pools, block.cidr)
    return pool is not None and any(pool.usable(block.address(o)) for o in block.unallocated)


def free_mark_writes(cidr: IPNetwork, had_free: bool, after: Block | None,
                     pools: Iterable[IPPool]) -> list[Write]:
    """The free-block index writes that go with a write of block ``cidr`` (``after``
    None: deleted): none unless it flips between having an address to give and not.

    Written in the same transaction as the block, so the index is as current
    as the blocks; still only a hint for borrowers (their own compare on the
    block guards what they write).
    """
    has = after is not None and has_free(after, pools)
    if has == had_free:
        return []
    if after is not None and has:
        return [PutFreeMark(cidr, after.affinity)]
    return [DeleteFreeMark(cidr)]


def reassert_address(block: Block, address: IPAddress, handle_id: str) -> Block:
    """A copy of ``block`` in which ``address`` is ``handle_id``'s again, whatever its state.

    For re-asserting what a node knows it handed out after etcd lost it (a
    restore): cooldown, reservations and gateways do not apply, since the
    pod already uses the address. Raises AddressUnavailable, naming the
    holder, if another handle holds it meanwhile: that is a conflict for the
    operator, never something to resolve by handing the address out twice.
    """
    ordinal = block.ordinal(address)
    holder = block.allocations.get(ordinal)
    if holder == handle_id:
        return block
    if holder is not None:
        raise AddressUnavailable(holder)
    new = block.copy()
    if ordinal in new.unallocated:
        new.unallocated.remove(ordinal)
    new.released_at.pop(ordinal, None)
    new.allocations[ordinal] = handle_id
    return new
