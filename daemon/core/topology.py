"""Topology ranges: the blocks of one label value kept together inside a shared pool.

A pool with a ``topologyKey`` (a node label, say ``rack``) is cut into
aligned ranges of ``/topologyBlockSize``. Each range is held by at most one
value of that label (:class:`~.holdings.TopologyRange`); the nodes with that
value claim their blocks only inside the ranges it holds, so a rack's blocks
aggregate into a few prefixes. A value's first claim takes a free range in
the same transaction as the block: one next to a range it holds when one is
free (so they merge), else the first free one from a point of its own (so
values spread without racing each other). A claim inside a held range
compares the holder's revision and writes nothing of the range (so the claims
of one value never race each other on it), unless it fills the range, which
it then unlists, guarded by that revision. A range whose last block is
dropped goes back to the pool guarded by the holder's revision and by "no
other block in the range" (a range compare on the block keys): a claim into
it that commits first makes the give-back re-plan, and a give-back that
commits first makes the claim's holder compare fail.

Every function here plans into a :class:`~.allocator.TxnPlan` from a
:class:`~.view.View`; none reads or writes anything itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Mapping, Sequence

from . import allocator
from .allocator import TxnPlan
from .calls import Defer
from .errors import AddressUnavailable
from .holdings import TopologyRange
from .model import IPAddress, IPNetwork, IPPool
from .view import View
from .writes import DeleteTopologyRange, PutTopologyRange, Versioned

#: Holder keys a search for a free range reads at a time, and how many such pages at most.
RANGE_READ = 16
RANGE_PAGES = 64

KnownBlocks = Callable[[View, IPNetwork, TxnPlan], set[IPNetwork]]


def value_of(pool: IPPool, labels: Mapping[str, str]) -> str | None:
    """The node's value of the pool's topology label (None: it has no such label)."""
    return labels.get(pool.topology_key)


def held_by(view: View, pool: IPPool, value: str | None, txn: TxnPlan
            ) -> list[Versioned[TopologyRange]]:
    """The ranges ``value`` holds in ``pool``, as this transaction has them so far."""
    key = (pool.name, value)
    held = txn.value_ranges.get(key)
    if held is None:
        held = txn.value_ranges[key] = list(view.value_ranges(pool.name, value))
    return [h for h in held if not isinstance(txn.ranges.get(h.value.cidr), DeleteTopologyRange)]


def topology_block(view: View, pool: IPPool, value: str | None, txn: TxnPlan,
                   known_blocks: KnownBlocks, node: str = "") -> IPNetwork | None:
    """An unclaimed block of ``pool`` for node ``node``, whose label value is ``value``.

    In the ranges the value lists first (address order; in each, from a point of the
    node's own, so that the nodes of one value claiming at once rarely race for one
    block); else in a free range, taken for the value in ``txn``. None when neither
    has an unclaimed block. A claim that fills its range takes it off the value's
    list; a listed range found full is taken off with it.
    """
    reservations = view.state().reservations
    held = held_by(view, pool, value, txn)
    for holding in held:
        span = holding.value.cidr
        known = known_blocks(view, span, txn)
        cidr = first_unclaimed_from(pool, known, reservations, span, node)
        if cidr is None:  # listed, but full: unlist it in the same transaction
            txn.ranges.setdefault(span, PutTopologyRange(holding.value, holding.mod_revision,
                                                         listed=False))
            continue
        _claim_in(view, pool, span, cidr, holding.value, holding.mod_revision, txn, known_blocks)
        return cidr
    for span in free_ranges(view, pool, value, held, txn, own_ranges(view, pool, txn)):
        cidr = allocator.first_unclaimed_block(pool, known_blocks(view, span, txn), reservations,
                                               span)
        if cidr is not None:
            taken = TopologyRange(span, pool.name, value)
            txn.value_ranges[(pool.name, value)].append(Versioned(taken, 0))
            _claim_in(view, pool, span, cidr, taken, 0, txn, known_blocks)  # 0: nobody holds it
            return cidr
    return None


def first_unclaimed_from(pool: IPPool, known: set[IPNetwork],
                         reservations: allocator.Reservations, span: IPNetwork,
                         node: str) -> IPNetwork | None:
    """:func:`allocator.first_unclaimed_block` of ``span``, searched from a block of
    ``node``'s own (a hash of its name) to the end of the span, then from its start."""
    count = 1 << (pool.block_size - span.prefixlen) if pool.block_size > span.prefixlen else 1
    offset = allocator.node_offset(node, count) if node else 0
    if not offset:
        return allocator.first_unclaimed_block(pool, known, reservations, span)
    network = type(span.network_address)
    start = int(span.network_address) + offset * (1 << (span.max_prefixlen - pool.block_size))
    for low, high in ((start, int(span.broadcast_address)),
                      (int(span.network_address), start - 1)):
        for part in ipaddress.summarize_address_range(network(low), network(high)):
            cidr = allocator.first_unclaimed_block(pool, known, reservations, part)
            if cidr is not None:
                return cidr
    return None


def _claim_in(view: View, pool: IPPool, span: IPNetwork, cidr: IPNetwork,
              holding: TopologyRange, revision: int, txn: TxnPlan,
              known_blocks: KnownBlocks) -> None:
    """Plan the range's write for a claim of block ``cidr`` in it (guarded by ``revision``,
    the holder's as read) and keep the room index true."""
    reservations = view.state().reservations
    known = known_blocks(view, span, txn) | {cidr}
    room_left = allocator.first_unclaimed_block(pool, known, reservations, span) is not None
    planned = txn.ranges.get(span)
    if isinstance(planned, PutTopologyRange):  # taken, or filled, in this transaction already
        txn.ranges[span] = PutTopologyRange(holding, planned.expect_revision, listed=room_left)
    elif revision and room_left:  # held, and still with room: compare its holder, no write
        txn.range_guards.setdefault(span, revision)
    else:  # taken now (nobody held it), or filled: its keys are written
        txn.ranges[span] = PutTopologyRange(holding, revision, listed=room_left)
    window = allocator.window_of([pool], cidr)
    if window is not None:  # a claim that fills its claim window drops its room entry
        in_window = known_blocks(view, window, txn) | {cidr}
        if allocator.first_unclaimed_block(pool, in_window, reservations, window) is None:
            txn.room_marks[window] = False


def own_ranges(view: View, pool: IPPool, txn: TxnPlan | None = None) -> list[IPNetwork]:
    """The ranges of ``pool`` this node's blocks lie in: its value's full ranges (unlisted,
    so :func:`held_by` does not see them), which a new range should lie next to and
    which a borrow looks in first."""
    own = txn.affine_read if txn is not None and txn.affine_read is not None \
        else view.affine_blocks()
    first, last = pool.bounds
    spans = [pool.topology_range(v.value.cidr) for v in own
             if v.value.cidr.version == pool.family and v.value.first >= first
             and v.value.last <= last and v.value.cidr.prefixlen >= pool.topology_prefix]
    return sorted(set(spans), key=lambda span: int(span.network_address))


def value_origin(pool: IPPool, value: str | None) -> IPNetwork:
    """The range a value's search for a free range starts from: the same on every host,
    spread over the pool by a hash of the pool and the value (its ranges grow from there)."""
    size = pool.topology_prefix
    step = 1 << (pool.cidr.max_prefixlen - size)
    count = pool.cidr.num_addresses // step
    start = int(pool.cidr.network_address) + allocator.node_offset(f"{pool.name}/{value}",
                                                                   count) * step
    return type(pool.cidr)((start, size))


def free_ranges(view: View, pool: IPPool, value: str | None,
                held: list[Versioned[TopologyRange]], txn: TxnPlan,
                near: Sequence[IPNetwork] = ()) -> Iterator[IPNetwork]:
    """Ranges of ``pool`` nobody holds: next to ``held`` (the value's ranges with room)
    or ``near`` (those of the node's own blocks) first, so that they merge, then from
    the value's own point on (wrapping round once), a page of holder keys at a time."""
    size = pool.topology_prefix
    step = 1 << (pool.cidr.max_prefixlen - size)
    first, last = pool.bounds
    taken = {h.value.cidr for h in held} | set(txn.ranges)

    network = type(pool.cidr)

    def span_at(start: int) -> IPNetwork:
        return network((start, size))

    for anchor in [*(h.value.cidr for h in held), *near]:
        for start in (int(anchor.network_address) + step,
                      int(anchor.network_address) - step):
            if first <= start <= last:
                span = span_at(start)
                if span not in taken and not view.held_ranges(span, None, 1):
                    taken.add(span)
                    yield span
    origin = int(value_origin(pool, value).network_address)
    pages = 0
    for begin, end in ((origin, last), (first, origin - 1)):
        cursor = begin
        while cursor <= end and pages < RANGE_PAGES:
            page = view.held_ranges(pool.cidr, span_at(cursor), RANGE_READ)
            pages += 1
            listed = {int(c.network_address) for c in page}
            # Past the page's last key nothing is known yet: the next page says.
            upto = min(end, int(page[-1].network_address) if len(page) == RANGE_READ else end)
            while cursor <= upto:
                if cursor not in listed and span_at(cursor) not in taken:
                    span = span_at(cursor)
                    taken.add(span)
                    yield span
                cursor += step


def give_back(view: View, pool: IPPool, cidr: IPNetwork, txn: TxnPlan,
              known_blocks: KnownBlocks) -> None:
    """Plan the range of block ``cidr`` (dropped in ``txn``) back to the pool if no
    other block is left in it, else listed again (it has room now); guarded by the
    holder's revision either way, and a give-back by "no other block in it" too
    (:class:`~.writes.NoBlocksIn`, which :meth:`TxnPlan.writes` adds)."""
    if cidr.prefixlen < pool.topology_prefix:  # a leftover block bigger than a range
        return
    span = pool.topology_range(cidr)
    if span in txn.ranges:  # claimed in, taken or given back in this transaction already
        return
    holder = view.range_holder(span)
    if holder is None or holder.value.pool != pool.name:
        return
    for other in known_blocks(view, span, txn):
        if other.version != span.version or not span.supernet_of(other):  # type: ignore[arg-type]
            continue
        planned = txn.blocks.get(other)
        if planned is None or planned[0] is not None:  # a block is left in the range
            txn.ranges[span] = PutTopologyRange(holder.value, holder.mod_revision, listed=True)
            return
    txn.ranges[span] = DeleteTopologyRange(holder.value, holder.mod_revision)


def holder_of(view: View, pool: IPPool, cidr: IPNetwork, txn: TxnPlan
              ) -> Versioned[TopologyRange] | None:
    """Who holds the range of block ``cidr`` once ``txn`` commits (None: nobody, or the
    block does not fit in one range). Raises Defer when ``txn`` gives that range back:
    what holds it then is for the next transaction to see."""
    if cidr.prefixlen < pool.topology_prefix:  # a leftover block bigger than a range
        return None
    span = pool.topology_range(cidr)
    planned = txn.ranges.get(span)
    if isinstance(planned, DeleteTopologyRange):
        raise Defer()
    if isinstance(planned, PutTopologyRange):
        return Versioned(planned.range, planned.expect_revision)
    return view.range_holder(span)


def held_by_value(view: View, pool: IPPool, value: str | None, cidr: IPNetwork,
                  txn: TxnPlan) -> bool:
    """Whether block ``cidr`` lies in a range of ``pool`` that ``value`` holds (a block a
    node of that value may take over: it keeps the range one value's)."""
    try:
        holder = holder_of(view, pool, cidr, txn)
    except Defer:
        return False
    return holder is not None and holder.value.pool == pool.name and holder.value.value == value


def place(view: View, pool: IPPool, value: str | None, cidr: IPNetwork, txn: TxnPlan,
          known_blocks: KnownBlocks, address: IPAddress, strict: bool = True) -> None:
    """Plan new block ``cidr`` (where a specific ``address`` puts it) into its range for a
    node whose label value is ``value``: a range nobody holds is taken for the value, a
    range the value holds is touched (guarded by its holder's revision, as any claim in
    it). Raises AddressUnavailable when another value holds the range: a block of this
    node there would put two values in one range. Not ``strict`` (a block put back for
    an address a pod uses already), such a range is left as it is."""
    if cidr.prefixlen < pool.topology_prefix:  # a leftover block bigger than a range
        return
    span = pool.topology_range(cidr)
    holder = holder_of(view, pool, cidr, txn)
    if holder is None:
        taken = TopologyRange(span, pool.name, value)
        listed = txn.value_ranges.get((pool.name, value))
        if listed is not None:
            listed.append(Versioned(taken, 0))
        _claim_in(view, pool, span, cidr, taken, 0, txn, known_blocks)
        return
    if holder.value.pool != pool.name or holder.value.value != value:
        if not strict:
            return
        who = (f"{pool.topology_key}={holder.value.value}" if holder.value.value is not None
               else f"nodes without {pool.topology_key}")
        if holder.value.pool != pool.name:
            who = f"pool {holder.value.pool}"
        mine = (f"{pool.topology_key}={value}" if value is not None
                else f"no {pool.topology_key} label")
        raise AddressUnavailable(
            f"address {address}: its block {cidr} would lie in topology range {span} of pool "
            f"{pool.name}, which {who} holds; this node ({mine}) claims blocks only in its "
            "own value's ranges")
    _claim_in(view, pool, span, cidr, holder.value, holder.mod_revision, txn, known_blocks)
