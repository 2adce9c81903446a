"""Audits of topology ranges: what ``ipam check`` warns about them, and the repairs.

A range of a pool with a ``topologyKey`` is held (``ranges/…``) by one value of
that label while a block of the pool lies in it, and listed under that value
(``topology/…``) while it has an unclaimed block. :func:`range_findings` reports
every range or block that breaks this, one line each, with the guarded write
``topoipamctl ipam repair-index`` makes for it where one is safe. They are
warnings, never problems: the blocks alone decide who holds an address, so none
of them can hand one out twice; they cost aggregation (a value's blocks spread
over ranges of other values) or room (a range no value can claim in).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .core import allocator
from .core.holdings import Block, TopologyRange
from .core.model import IPNetwork, IPPool, Node
from .core.writes import (
    DeleteTopologyRange,
    NoBlocksIn,
    PutTopologyRange,
    Versioned,
    Write,
)


@dataclass(frozen=True)
class RangeFinding:
    """One warning line, and the guarded writes of the one transaction that fixes it
    (none: for the operator to judge)."""

    line: str
    repair: tuple[Write, ...] = ()


def _order(cidr: IPNetwork) -> tuple[int, int]:
    return cidr.version, int(cidr.network_address)


def _who(pool: IPPool, value: str | None) -> str:
    return (f"{pool.topology_key}={value}" if value is not None
            else f"nodes without {pool.topology_key}")


def _range_pool(pools: Iterable[IPPool], cidr: IPNetwork) -> IPPool | None:
    """The topology pool whose range ``cidr`` is (None: no pool cuts it)."""
    for pool in pools:
        if (pool.topology_key and pool.family == cidr.version
                and pool.topology_prefix == cidr.prefixlen
                and cidr.subnet_of(pool.cidr)):  # type: ignore[arg-type]
            return pool
    return None


def _give_back(holder: TopologyRange, revision: int) -> tuple[Write, ...]:
    """A range with no block back to its pool, unless a claim made one in it meanwhile."""
    return DeleteTopologyRange(holder, revision), NoBlocksIn(holder.cidr)


def range_findings(pools: Iterable[IPPool], nodes: Mapping[str, Node],
                   blocks: Mapping[IPNetwork, Block],
                   ranges: Mapping[IPNetwork, Versioned[TopologyRange]],
                   listed: set[TopologyRange],
                   reservations: allocator.Reservations) -> list[RangeFinding]:
    """Ranges held with no block, for no pool or unlisted with room; blocks in a range
    nobody holds, or held by another value than their node's (relabelled)."""
    pools = list(pools)
    found: list[RangeFinding] = []
    in_range: dict[IPNetwork, list[Block]] = {}
    for cidr, block in blocks.items():
        pool = allocator.pool_of_block(pools, cidr)
        if pool is not None and pool.topology_key and cidr.prefixlen >= pool.topology_prefix:
            in_range.setdefault(pool.topology_range(cidr), []).append(block)

    def value_of(pool: IPPool, node: str | None) -> tuple[bool, str | None]:
        known = nodes.get(node or "")
        return known is not None, (known.labels.get(pool.topology_key) if known else None)

    for span in sorted(ranges, key=_order):
        held = ranges[span]
        holder = held.value
        pool = _range_pool(pools, span)
        here = in_range.get(span, []) if pool is not None else [
            b for cidr, b in blocks.items() if cidr.version == span.version and cidr.overlaps(span)]
        if pool is None or pool.name != holder.pool:
            why = ("no pool cuts it into ranges" if pool is None
                   else f"it is a range of pool {pool.name}")
            found.append(RangeFinding(
                f"topology range {span} is held for pool {holder.pool}, but {why}: nobody "
                "claims in it" + ("" if here else " (fix: topoipamctl ipam repair-index)"),
                () if here else _give_back(holder, held.mod_revision)))
            continue
        who = _who(pool, holder.value)
        if not here:
            found.append(RangeFinding(
                f"topology range {span} of pool {pool.name} is held by {who} but has no "
                "block: no other value can take it (fix: topoipamctl ipam repair-index)",
                _give_back(holder, held.mod_revision)))
            continue
        for block in sorted(here, key=lambda b: _order(b.cidr)):
            registered, value = value_of(pool, block.affinity)
            if block.affinity is not None and registered and value != holder.value:
                found.append(RangeFinding(
                    f"topology range {span} of pool {pool.name} ({who}) holds block "
                    f"{block.cidr} of node {block.affinity}, which has "
                    f"{pool.topology_key}={value if value is not None else '-'} (relabelled, "
                    "or its block put back after a restore: the node gives out no new address "
                    "there and drops the block once empty)"))
        room = allocator.first_unclaimed_block(
            pool, {b.cidr for b in here}, reservations, span) is not None
        if room and holder not in listed:
            found.append(RangeFinding(
                f"topology range {span} of pool {pool.name} ({who}) has an unclaimed block but "
                f"is not listed: claims of {who} miss it (fix: topoipamctl ipam repair-index)",
                (PutTopologyRange(holder, held.mod_revision, listed=True),)))
    for span in sorted(set(in_range) - set(ranges), key=_order):
        here = in_range[span]
        pool = allocator.pool_of_block(pools, here[0].cidr)
        assert pool is not None
        values = {value_of(pool, b.affinity) for b in here if b.affinity is not None}
        repair: tuple[Write, ...] = ()
        fix = ""
        if len(values) == 1 and next(iter(values))[0]:
            value = next(iter(values))[1]
            room = allocator.first_unclaimed_block(
                pool, {b.cidr for b in here}, reservations, span) is not None
            repair = (PutTopologyRange(TopologyRange(span, pool.name, value), 0, listed=room),)
            fix = f" (fix: topoipamctl ipam repair-index gives it to {_who(pool, value)})"
        shown = ", ".join(f"{b.cidr} ({b.affinity or 'no node'})"
                          for b in sorted(here, key=lambda b: _order(b.cidr)))
        found.append(RangeFinding(
            f"topology range {span} of pool {pool.name} holds block(s) {shown} but nobody "
            f"holds it: another value may take it and claim beside them{fix}", repair))
    return found
