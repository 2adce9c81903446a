"""Headroom per topology domain: what the nodes of each value of a label can still get.

:func:`capacity_report` counts, per value of a node label (a rack, a zone) and
per IP family, the addresses of the pools that serve that value's nodes: as
``ipam show`` counts a pool (its capacity less its network, broadcast,
gateway and reserved addresses; in use: the addresses its blocks hold), summed
over the enabled Automatic pools that select at least one of its nodes. Free
is capacity less the addresses in use that capacity counts: an address
reserved (or made the gateway) after it was allocated is in use, but its
release gives it back to the reservation, not to the free ones. A
pool shared by several values counts in each: it is what each could still
get. The pods that can still start in a domain are its free addresses (the
smaller family's, when its nodes get both).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .audit import Snapshot
from .core import allocator
from .core.errors import NoPoolForNode
from .core.model import IPPool

FAMILIES = (4, 6)


@dataclass
class FamilyCapacity:
    capacity: int = 0
    in_use: int = 0
    #: Of ``in_use``, the addresses ``capacity`` does not count (reserved, unusable).
    uncounted: int = 0

    @property
    def free(self) -> int:
        return max(0, self.capacity - (self.in_use - self.uncounted))

    def to_json(self) -> dict[str, int]:
        return {"capacity": self.capacity, "in_use": self.in_use, "free": self.free}


@dataclass
class CapacityDomain:
    value: str | None  # None: nodes without the label
    nodes: list[str] = field(default_factory=list)
    pools: dict[int, list[str]] = field(default_factory=dict)
    families: dict[int, FamilyCapacity] = field(default_factory=dict)

    @property
    def pods(self) -> int:
        """Pods that can still start: each needs one address of every family it gets."""
        served = [self.families[f].free for f in FAMILIES if self.pools.get(f)]
        return min(served) if served else 0

    @property
    def exhausted(self) -> bool:
        return bool(self.nodes) and self.pods == 0

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"value": self.value, "nodes": self.nodes}
        for family in FAMILIES:
            data[f"ipv{family}"] = {**self.families[family].to_json(),
                                    "pools": self.pools.get(family, [])}
        data["pods"] = self.pods
        return data


def capacity_report(snap: Snapshot, label: str) -> list[CapacityDomain]:
    """Every value of ``label`` among the registered nodes, in value order (no label last)."""
    reservations = allocator.Reservations(snap.reservations)
    used: Counter[str] = Counter()
    uncounted: Counter[str] = Counter()
    for cidr, block in snap.blocks.items():
        pool = allocator.pool_of_block(snap.pools, cidr)
        if pool is not None:
            used[pool.name] += block.in_use
            if reservations or any(block.first <= a <= block.last for a in pool.unusable_ints):
                uncounted[pool.name] += sum(
                    1 for ordinal in block.allocations
                    if not pool.usable(address := block.address(ordinal))
                    or address in reservations)
    domains: dict[str | None, CapacityDomain] = {}
    serving: dict[str | None, dict[int, dict[str, IPPool]]] = {}
    for node in sorted(snap.nodes.values(), key=lambda n: n.name):
        value = node.labels.get(label)
        domain = domains.setdefault(value, CapacityDomain(value))
        domain.nodes.append(node.name)
        for family in FAMILIES:
            try:
                pools = allocator.pools_for_node(snap.pools, node.name, node.labels, family)
            except NoPoolForNode:
                continue
            serving.setdefault(value, {}).setdefault(family, {}).update(
                (p.name, p) for p in pools)
    for value, domain in domains.items():
        for family in FAMILIES:
            chosen = serving.get(value, {}).get(family, {})
            domain.pools[family] = sorted(chosen)
            domain.families[family] = FamilyCapacity(
                sum(allocator.usable_capacity(p, reservations) for p in chosen.values()),
                sum(used[name] for name in chosen), sum(uncounted[name] for name in chosen))
    return sorted(domains.values(), key=lambda d: (d.value is None, d.value or ""))
