"""A change's effect before it is made: the cluster as it is, and as it would be.

:func:`foresee` takes the writes a change would commit (pools, nodes, the
IPAM configuration, reservations: what ``apply``, ``create``, ``delete``,
``patch`` and ``label nodes`` plan, validated exactly as when they write)
and reports, from one snapshot of etcd and the same rules the daemons and
the audits use: per node and family, its pools before and after (nodes left
without a pool first); the allocations that would fall outside their node's
pools; the prefixes that would break aggregation by a label; and each
domain's capacity before and after. It writes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .audit import Snapshot, load_snapshot
from .capacity import FAMILIES, CapacityDomain, capacity_report
from .core import allocator
from .core.errors import NoPoolForNode
from .core.model import IPAMConfig, IPPool, IPReservation, Node
from .core.writes import DeleteObject, PutObject, Write
from .reports import placement_problem, route_report
from .store import EtcdStore

#: How many allocations that would fall outside are listed (all are counted).
LISTED = 10


@dataclass
class NodeChange:
    node: str
    family: int
    before: list[str]
    after: list[str]

    @property
    def loses_every_pool(self) -> bool:
        return bool(self.before) and not self.after

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "family": f"ipv{self.family}", "before": self.before,
                "after": self.after}


@dataclass
class Impact:
    label: str
    nodes: list[NodeChange] = field(default_factory=list)
    outside: list[tuple[str, str, str, str]] = field(default_factory=list)  # ip, node, pod, why
    breaking: list[str] = field(default_factory=list)
    capacity: list[tuple[CapacityDomain | None, CapacityDomain | None]] = field(
        default_factory=list)

    @property
    def harmful(self) -> bool:
        """A node would lose its pool, or an allocation fall outside its node's pools."""
        return any(c.loses_every_pool for c in self.nodes) or bool(self.outside)

    def to_json(self) -> dict[str, Any]:
        def domain(d: CapacityDomain | None) -> dict[str, Any] | None:
            return None if d is None else {f"ipv{f}": d.families[f].to_json() for f in FAMILIES}

        return {
            "nodes_left_without_pool": sorted({c.node for c in self.nodes
                                               if c.loses_every_pool}),
            "nodes": [c.to_json() for c in self.nodes],
            "outside": {"count": len(self.outside), "first": [
                {"ip": ip, "node": node, "pod": pod, "reason": why}
                for ip, node, pod, why in self.outside[:LISTED]]},
            "label": self.label,
            "breaking": self.breaking,
            "capacity": [{"value": (before or after).value,  # type: ignore[union-attr]
                          "before": domain(before), "after": domain(after)}
                         for before, after in self.capacity],
        }


def changed(snap: Snapshot, writes: Sequence[Write]) -> Snapshot:
    """``snap`` as it would be once ``writes`` commit (pools, nodes, reservations)."""
    pools = {p.name: p for p in snap.pools}
    nodes = dict(snap.nodes)
    reservations = {r.name: r for r in snap.reservations}
    for write in writes:
        if isinstance(write, PutObject):
            obj = write.obj
            if isinstance(obj, IPPool):
                pools[obj.name] = obj
            elif isinstance(obj, Node):
                nodes[obj.name] = obj
            elif isinstance(obj, IPReservation):
                reservations[obj.name] = obj
            else:
                assert isinstance(obj, IPAMConfig)  # nothing here depends on it
        elif isinstance(write, DeleteObject):
            if write.kind == "pool":
                pools.pop(write.name, None)
            elif write.kind == "node":
                nodes.pop(write.name, None)
            else:
                reservations.pop(write.name, None)
    return dataclasses.replace(snap, pools=sorted(pools.values(), key=lambda p: p.name),
                               nodes=nodes, reservations=list(reservations.values()))


def _pools(snap: Snapshot, node: Node, family: int) -> list[str]:
    try:
        return [p.name for p in allocator.pools_for_node(snap.pools, node.name, node.labels,
                                                         family)]
    except NoPoolForNode:
        return []


async def foresee(store: EtcdStore, writes: Sequence[Write], label: str) -> Impact:
    """The effect of committing ``writes``, from one snapshot; nothing is written."""
    before = await load_snapshot(store)
    after = changed(before, writes)
    impact = Impact(label)
    families = sorted({p.family for p in (*before.pools, *after.pools)} or {4})
    for name in sorted(set(before.nodes) | set(after.nodes)):
        for family in families:
            was = _pools(before, before.nodes[name], family) if name in before.nodes else []
            will = _pools(after, after.nodes[name], family) if name in after.nodes else []
            if was != will:
                impact.nodes.append(NodeChange(name, family, was, will))
    impact.nodes.sort(key=lambda c: (not c.loses_every_pool, c.node, c.family))
    fine_before = {row.ip for row in before.allocations() if row.handle is not None
                   and placement_problem(row, before) is None}
    for row in after.allocations():
        if row.handle is None or row.ip not in fine_before:
            continue
        why = placement_problem(row, after)
        if why is not None:
            impact.outside.append((str(row.ip), row.node or "-", row.pod, why))
    broken_before = {str(e.prefix) for e in route_report(before, label).breaking}
    impact.breaking = [f"{e.prefix} (node {e.node}): {e.reason}"
                       for e in route_report(after, label).breaking
                       if str(e.prefix) not in broken_before]
    was_capacity = {d.value: d for d in capacity_report(before, label)}
    will_capacity = {d.value: d for d in capacity_report(after, label)}
    for value in sorted(set(was_capacity) | set(will_capacity),
                        key=lambda v: (v is None, v or "")):
        impact.capacity.append((was_capacity.get(value), will_capacity.get(value)))
    return impact
