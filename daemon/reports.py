"""The operator's reports on a snapshot: explain, placement and the route report.

What ``topoipamctl explain node``, ``explain identity``, ``check placement``
and ``check routes`` print, as functions of one
:class:`topoipam.daemon.audit.Snapshot` (read at one etcd revision). Pure:
no reads of their own; the CLI only prints what they return.
"""

from __future__ import annotations

import bisect
import ipaddress
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import netaddr

from .audit import AllocationRow, Snapshot, network_order, owning_pool, reserved_by, show
from .core import allocator, model
from .core.holdings import Identity
from .core.model import (
    IPNetwork,
    IPPool,
)


def allocation_steps(node: str, order: Sequence[IPPool], snap: Snapshot, config: model.IPAMConfig
                     ) -> list[str]:
    """The allocator's three steps for ``node``, as they stand now."""
    reservations = allocator.Reservations(snap.reservations)
    now, cooldown = time.time(), float(config.ip_cooldown_seconds)
    known = snap.nodes.get(node)
    labels = known.labels if known is not None else {}
    own = []
    affine = [b for b in snap.blocks.values() if b.affinity == node]
    for pool in order:  # pool order, then address order, like the allocator
        ctx = allocator.AssignContext(pool, reservations, now, cooldown)
        for block in sorted((b for b in affine if owning_pool([pool], b.cidr) is pool),
                            key=lambda b: network_order(b.cidr)):
            free = allocator.free_count(block, ctx)
            if free and range_holder_elsewhere(snap, pool, block.cidr, labels) is None:
                own.append(f"{block.cidr} (pool {pool.name}, {free} free)")
    names = ", ".join(p.name for p in order)
    steps = [f"1. {node}'s blocks with free addresses: {', '.join(own) or 'none'}"]
    if not config.auto_allocate_blocks:
        steps.append("2. no new blocks: autoAllocateBlocks is off")
    elif order and allocator.at_block_cap(config.max_blocks_per_host, affine, order[0].family):
        steps.append(f"2. no new blocks: node has reached maxBlocksPerHost="
                     f"{config.max_blocks_per_host} for IPv{order[0].family}")
    else:
        steps.append(claim_step(node, labels, order, snap, reservations, now, cooldown))
    steps.append("3. no borrowing: strictAffinity is on" if config.strict_affinity
                 else f"3. borrow a free address from other nodes' blocks in: {names}")
    return steps


def range_holder_elsewhere(snap: Snapshot, pool: IPPool, cidr: IPNetwork,
                           labels: Mapping[str, str]) -> str | None:
    """Who holds the topology range of block ``cidr`` when it is not the value of a node
    with ``labels`` (a block kept across a relabel: no new address there), else None."""
    if not pool.topology_key or cidr.prefixlen < pool.topology_prefix:
        return None
    holder = snap.ranges.get(pool.topology_range(cidr))
    if holder is None or (holder.value.pool, holder.value.value) == (
            pool.name, labels.get(pool.topology_key)):
        return None
    return f"{pool.topology_key}={show(holder.value.value)}"


def claim_step(node: str, labels: Mapping[str, str], order: Sequence[IPPool], snap: Snapshot,
               reservations: allocator.Reservations, now: float, cooldown: float) -> str:
    """Step 2 of :func:`allocation_steps`: the pools with an unclaimed block this node may
    claim (the claims' own test, :func:`allocator.first_unclaimed_block`; with a
    ``topologyKey``, in its value's ranges or a free one), those with none left, and the
    empty blocks it would reclaim when no pool has one."""
    full = [p for p in order if not can_claim(p, labels, snap, reservations)]
    room = [p.name for p in order if p not in full]
    left = ", ".join(p.name + (f" (for {p.topology_key}={show(labels.get(p.topology_key))})"
                               if p.topology_key else "") for p in full)
    if room:
        return (f"2. claim a new block in: {', '.join(room)}"
                + (f" (no unclaimed block left in: {left})" if full else ""))
    reclaim = {p.name: len(reclaimable(node, labels, p, snap, now, cooldown)) for p in order}
    found = ", ".join(f"{name} ({count} now)" for name, count in reclaim.items() if count)
    return (f"2. no new blocks: no unclaimed block left in: {left}"
            + (f"; reclaim an empty block of another node in: {found}" if found else ""))


def can_claim(pool: IPPool, labels: Mapping[str, str], snap: Snapshot,
              reservations: allocator.Reservations) -> bool:
    """Whether a node with ``labels`` finds an unclaimed block of ``pool`` to claim."""
    blocks = {c for c in snap.blocks if c.version == pool.family and c.overlaps(pool.cidr)}
    if not pool.topology_key:
        return allocator.first_unclaimed_block(pool, blocks, reservations) is not None
    value = labels.get(pool.topology_key)
    held = {cidr: r.value for cidr, r in snap.ranges.items()
            if cidr.version == pool.family and cidr.subnet_of(pool.cidr)}  # type: ignore[arg-type]
    if any(holder.pool == pool.name and holder.value == value
           and allocator.first_unclaimed_block(pool, blocks, reservations, cidr) is not None
           for cidr, holder in held.items()):
        return True
    ranges = 1 << (pool.topology_prefix - pool.cidr.prefixlen)
    if ranges > RANGES_LISTED:  # too many to look at one by one: a free range has room
        return len(held) < ranges
    return any(span not in held and allocator.first_unclaimed_block(
        pool, blocks, reservations, span) is not None
        for span in pool.cidr.subnets(new_prefix=pool.topology_prefix))


#: Ranges of a pool ``explain node`` looks at one by one for a free one with room.
RANGES_LISTED = 4096


def reclaimable(node: str, labels: Mapping[str, str], pool: IPPool, snap: Snapshot, now: float,
                cooldown: float) -> list[IPNetwork]:
    """The empty blocks of ``pool`` another node holds that ``node`` may reclaim (with a
    ``topologyKey``, only in ranges of its own value), as the planner judges them."""
    found = []
    for cidr, block in snap.blocks.items():
        if (block.affinity == node or owning_pool([pool], cidr) is not pool
                or not block.is_empty() or block.contested
                or any(now - at < cooldown for at in block.released_at.values())):
            continue
        if pool.topology_key:
            holder = snap.ranges.get(pool.topology_range(cidr))
            if holder is None or (holder.value.pool, holder.value.value) != (
                    pool.name, labels.get(pool.topology_key)):
                continue
        found.append(cidr)
    return found


def placement_problem(row: AllocationRow, snap: Snapshot) -> str | None:
    """Why ``row`` would not be allocated where it is today, or None if it would."""
    pool = row.pool
    if pool is None:
        return "its pool was deleted"
    if pool.disabled:
        return f"pool {pool.name} is disabled"
    if not pool.automatic:
        return None  # Manual pools are used when named, whatever the node's labels
    reserved = reserved_by(snap, row.ip)
    if reserved:
        return f"the address is reserved by ipreservation {', '.join(reserved)}"
    node = snap.nodes.get(row.node or "")
    labels = node.labels if node is not None else {}
    if pool.selects(labels):
        return None
    _, reason = allocator.explain_pool(pool, labels)
    return reason if node is not None else f"node is not registered; {reason}"



# ---------------------------------------------------------------------------- routes


#: The node label ``check routes`` groups nodes by when none is named (the seed's racks).
DEFAULT_ROUTE_LABEL = "rack"


@dataclass(frozen=True)
class RouteException:
    """A prefix the fabric must carry besides a domain's aggregate: it breaks aggregation.

    ``kind`` is ``block`` (a node's block whose pool no longer selects that
    node, or whose pool is gone, or that lies in a topology range of another
    value of the route label: a relabelled node's) or ``address`` (a /32 or /128 held by a node
    whose domain's prefixes do not contain it: borrowed from another domain's
    block, or left in a block no node owns).
    """

    prefix: IPNetwork
    kind: str
    node: str
    pool: str | None
    reason: str

    def to_json(self) -> dict[str, str | None]:
        return {"prefix": str(self.prefix), "kind": self.kind, "node": self.node,
                "pool": self.pool, "reason": self.reason}


@dataclass
class RouteDomain:
    """The nodes that share one value of the route label, and what the fabric routes to them."""

    value: str | None  # None: nodes without the label
    nodes: list[str] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    aggregate: list[IPNetwork] = field(default_factory=list)
    exceptions: list[RouteException] = field(default_factory=list)

    @property
    def prefixes(self) -> list[IPNetwork]:
        return [*self.aggregate, *(e.prefix for e in self.exceptions)]

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "nodes": self.nodes, "pools": self.pools,
                "aggregate": [str(c) for c in self.aggregate],
                "exceptions": [e.to_json() for e in self.exceptions],
                "prefixes": len(self.prefixes)}


@dataclass
class RouteReport:
    label: str
    domains: list[RouteDomain]
    warnings: list[str]

    @property
    def breaking(self) -> list[RouteException]:
        return [e for d in self.domains for e in d.exceptions]

    @property
    def prefix_count(self) -> int:
        return sum(len(d.prefixes) for d in self.domains)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "domains": [d.to_json() for d in self.domains],
                "prefixes": self.prefix_count, "breaking": len(self.breaking),
                "warnings": self.warnings}


def _merged(cidrs: Iterable[IPNetwork]) -> list[IPNetwork]:
    """The fewest prefixes that cover exactly ``cidrs`` (adjacent blocks merge)."""
    merged = netaddr.cidr_merge([str(c) for c in cidrs])
    return sorted((ipaddress.ip_network(str(c)) for c in merged), key=network_order)


def block_outside_range(pool: IPPool | None, cidr: IPNetwork, label: str, value: str | None,
                        snap: Snapshot) -> str | None:
    """Why a block of a node whose ``label`` is ``value`` does not aggregate with that
    value's ranges, or None: in a pool keyed on ``label``, its topology range is another
    value's (the node was relabelled and kept the block)."""
    if pool is None or pool.topology_key != label or cidr.prefixlen < pool.topology_prefix:
        return None
    span = pool.topology_range(cidr)
    holder = snap.ranges.get(span)
    if holder is None or (holder.value.pool, holder.value.value) == (pool.name, value):
        return None
    return (f"it lies in topology range {span} of {label}={show(holder.value.value)}"
            + (f" (pool {holder.value.pool})" if holder.value.pool != pool.name else "")
            + f", and its node has {label}={show(value)}: relabelled, it keeps the block "
            "until its last address is released")


def block_outside_pools(pool: IPPool | None, node: model.Node | None) -> str | None:
    """Why a node's block does not belong with that node's pools now, or None if it does.

    Only a pool's selector places it: a Manual pool serves whoever names it,
    and a disabled pool's blocks still sit where they were claimed.
    """
    if pool is None:
        return "its pool was deleted"
    if not pool.automatic or node is None or pool.selects(node.labels):
        return None
    return (f"pool {pool.name} does not select node {node.name} "
            f"({pool.selector.explain(node.labels)})")


def route_report(snap: Snapshot, label: str = DEFAULT_ROUTE_LABEL) -> RouteReport:
    """Per value of the node label ``label``: the prefixes a fabric must route to its nodes.

    Each domain's aggregate is the merge of the blocks its nodes own whose
    pool selects them. What else must be routed breaks aggregation: a block
    whose pool no longer selects its node (relabelled, or pool deleted), or that
    lies in a topology range of another value (its node relabelled), is
    routed on its own to that node's domain, and an allocated address whose
    holder's domain carries no prefix containing it (borrowed from a block of
    another domain, or in a block no node owns) needs a /32 or /128 there.
    Addresses without a handle are left to ``ipam check``.
    """
    warnings: list[str] = []
    domain_of: dict[str, str | None] = {}
    domains: dict[str | None, RouteDomain] = {}

    def domain(node: str) -> RouteDomain:
        if node not in domain_of:
            known = snap.nodes.get(node)
            if known is None:
                warnings.append(f"node {node} owns blocks or holds addresses but is not "
                                f"registered: it is routed as a node without label {label}")
            domain_of[node] = known.labels.get(label) if known is not None else None
        value = domain_of[node]
        if value not in domains:
            domains[value] = RouteDomain(value)
        if node not in domains[value].nodes:
            domains[value].nodes.append(node)
        return domains[value]

    for node in snap.nodes:
        domain(node)
    aggregated: dict[str | None, list[IPNetwork]] = {}
    pools_in: dict[str | None, set[str]] = {}
    for cidr in sorted(snap.blocks, key=network_order):
        block = snap.blocks[cidr]
        if block.affinity is None:
            continue
        pool = allocator.pool_of_block(snap.pools, cidr)
        home = domain(block.affinity)
        if pool is not None:
            pools_in.setdefault(home.value, set()).add(pool.name)
        reason = block_outside_pools(pool, snap.nodes.get(block.affinity))
        if reason is not None:
            reason = f"block of node {block.affinity} outside its node's pools: {reason}"
        elif (elsewhere := block_outside_range(pool, cidr, label, home.value, snap)):
            reason = f"block of node {block.affinity} outside its value's ranges: {elsewhere}"
        if reason is None:
            aggregated.setdefault(home.value, []).append(cidr)
        else:
            home.exceptions.append(RouteException(
                cidr, "block", block.affinity, pool.name if pool else None, reason))
    for value, cidrs in aggregated.items():
        domains[value].aggregate = _merged(cidrs)
    covers: dict[str | None, _Cover] = {}
    for row in snap.allocations():
        if row.node is None:
            continue
        holder = domain(row.node)
        cover = covers.get(holder.value)
        if cover is None:
            cover = covers[holder.value] = _Cover(holder.prefixes)
        if row.ip in cover:
            continue
        cover.add(row.ip)
        host = ipaddress.ip_network(row.ip)
        where = (f"block {row.block.cidr} of node {row.block.affinity}"
                 f" ({label}={show(domain_of.get(row.block.affinity))})"
                 if row.block.affinity is not None else f"block {row.block.cidr}, which no "
                 "node owns")
        holder.exceptions.append(RouteException(
            host, "address", row.node, row.pool.name if row.pool else None,
            f"address of node {row.node} in {where}"))
    for value, names in pools_in.items():
        domains[value].pools = sorted(names)
    for entry in domains.values():
        entry.nodes.sort()
        entry.exceptions.sort(key=lambda e: network_order(e.prefix))
    unlabelled = domains.get(None)
    if unlabelled is not None and unlabelled.nodes:
        warnings.append(f"{len(unlabelled.nodes)} node(s) have no label {label}: "
                        f"{', '.join(unlabelled.nodes)}")
    ordered = sorted(domains.values(), key=lambda d: (d.value is None, d.value or ""))
    return RouteReport(label, ordered, warnings)


class _Cover:
    """Whether an address is inside any of some prefixes, or one of the addresses added:
    a bisection over the prefixes' spans (first address, and the farthest last address
    of the spans up to it), so a domain with many prefixes costs one lookup per address."""

    def __init__(self, prefixes: Iterable[IPNetwork]) -> None:
        spans = sorted((p.version, int(p.network_address), int(p.broadcast_address))
                       for p in prefixes)
        self._starts = [(version, first) for version, first, _ in spans]
        self._reach: list[int] = []
        for i, (version, _, last) in enumerate(spans):
            before = self._reach[-1] if i and spans[i - 1][0] == version else -1
            self._reach.append(max(last, before))
        self._added: set[model.IPAddress] = set()

    def add(self, address: model.IPAddress) -> None:
        self._added.add(address)

    def __contains__(self, address: model.IPAddress) -> bool:
        if address in self._added:
            return True
        point = (address.version, int(address))
        at = bisect.bisect_right(self._starts, point) - 1
        return at >= 0 and self._starts[at][0] == point[0] and self._reach[at] >= point[1]


def identity_destinations(snap: Snapshot, config: model.IPAMConfig, identity: Identity
                          ) -> list[tuple[str, str]]:
    """The nodes a sticky identity can move to and keep every address, each with why.

    A node qualifies when, for each address, one of the Automatic pools that
    select it contains the address and, with strictAffinity, the block is its
    own (without, it borrows). Pools named in a CNI config (``ipv4_pools``)
    are not known here: a network that names pools keeps the address on every
    node if a named pool contains it.
    """
    found = []
    for node in sorted(snap.nodes.values(), key=lambda n: n.name):
        reasons = []
        for entry in identity.addresses:
            pool = next((p for p in snap.pools if p.automatic and not p.disabled
                         and p.selects(node.labels) and entry.ip.version == p.family
                         and entry.ip in p.cidr), None)
            block = snap.blocks.get(entry.block)
            if pool is None or block is None:
                break
            if block.affinity != node.name and config.strict_affinity:
                break
            reasons.append(f"{entry.ip} in pool {pool.name}"
                           + ("" if block.affinity == node.name else " (borrowed)"))
        else:
            if reasons:
                found.append((node.name, ", ".join(reasons)))
    return found


def borrowed_by(snap: Snapshot, node: str) -> list[AllocationRow]:
    """Addresses ``node`` holds in blocks it does not own (borrowed, or in ownerless blocks)."""
    return [r for r in snap.allocations() if r.node == node and r.block.affinity != node]
