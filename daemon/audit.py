"""Audits of the cluster's IPAM state, read at one etcd revision: pure reports, no writes.

What ``topoipamctl ipam check`` and ``ipam show`` report, usable from the
library: :func:`load_snapshot` reads every pool, node, reservation, block,
affinity, handle, identity and conflict at one revision (so the reports agree
with each other), and the functions below turn a :class:`Snapshot` into lines.
Problems (:func:`find_inconsistencies`) are states that can hand an address out
twice or lose one; warnings (:func:`find_warnings`) are deliberate or harmless
states an operator should know about. The ``explain`` and ``check`` reports on
the same snapshot are in :mod:`topoipam.daemon.reports`. The CLI only prints them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .core import allocator, model
from .core.conflicts import ConflictRecord, Standing, standing
from .core.errors import InvalidInput
from .core.holdings import (
    Block,
    Handle,
    Identity,
    TopologyRange,
    parked_holder,
    parked_identity,
)
from .core.model import (
    IPAddress,
    IPNetwork,
    IPPool,
)
from .core.writes import Versioned
from .range_audit import RangeFinding, range_findings
from .resolve import unrecorded
from .store import EtcdStore, decode, decode_each


def show(value: object) -> str:
    return "-" if value is None else str(value)


def address_order(address: IPAddress) -> tuple[int, int]:
    return address.version, int(address)


def network_order(cidr: IPNetwork) -> tuple[int, int, int]:
    return cidr.version, int(cidr.network_address), cidr.prefixlen


def owning_pool(pools: Iterable[IPPool], cidr: IPNetwork) -> IPPool | None:
    """The pool a block belongs to: inside its CIDR and of its block size."""
    pool = allocator.pool_of_block(pools, cidr)
    return pool if pool is not None and pool.block_size == cidr.prefixlen else None


@dataclass(frozen=True)
class AllocationRow:
    """One allocated address: the block's view joined with its handle (None if missing)."""

    ip: IPAddress
    block: Block
    handle_id: str
    handle: Handle | None
    pool: IPPool | None
    #: The sticky identity the address belongs to (live or parked), if any.
    identity: Identity | None = None

    @property
    def node(self) -> str | None:
        """The node of the attachment that uses it (None when parked: nobody does)."""
        return self.handle.node if self.handle is not None else None

    @property
    def parked(self) -> bool:
        return parked_identity(self.handle_id) is not None

    def attribute(self, name: str) -> str | None:
        return self.handle.attributes.get(name) if self.handle is not None else None

    @property
    def pod(self) -> str:
        namespace, pod = self.attribute("namespace"), self.attribute("pod")
        if pod is None:
            return "-"
        return f"{namespace}/{pod}" if namespace else pod

    def to_json(self) -> dict[str, str | None]:
        return {
            "ip": str(self.ip),
            "node": self.node,
            "pool": self.pool.name if self.pool is not None else None,
            "block": str(self.block.cidr),
            "handle": self.handle_id,
            "namespace": self.attribute("namespace"),
            "pod": self.attribute("pod"),
            "container_id": self.attribute("container_id"),
            "ifname": self.attribute("ifname"),
            **({} if self.identity is None else {
                "identity": self.identity.id,
                "state": "parked" if self.parked else "live",
                "last_node": self.identity.node,
                "parked_until": (_timestamp(self.identity.parked_until)
                                 if self.parked and self.identity.parked_until else None),
            }),
        }

    @property
    def sticky_state(self) -> str:
        """"-", "live", "parked until <UTC time>", or, once the hold is over but the
        address not yet freed, who frees it (for tables)."""
        if self.identity is None:
            return "-"
        if not self.parked:
            return "live"
        until = self.identity.parked_until or 0.0
        if until > time.time():
            return f"parked until {_timestamp(until)}"
        # Only the daemon of the block's node expires holds (EngineAllocation.expire_parked,
        # within a second while it runs): still here, that daemon is down or out of sync.
        who = (f"node {self.block.affinity}'s daemon frees it when running"
               if self.block.affinity is not None else
               f"freed by its next ADD or `topoipamctl ipam release --identity "
               f"{self.identity.id}`")
        return f"parked, hold over since {_timestamp(until)} ({who})"


def _timestamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


@dataclass
class Snapshot:
    """Everything the reports need, read at one etcd revision (so they agree with each other)."""

    revision: int
    pools: list[IPPool]
    nodes: dict[str, model.Node]
    reservations: list[model.IPReservation]
    blocks: dict[IPNetwork, Block]
    affinities: list[tuple[str, IPNetwork]]
    handles: dict[str, Handle]
    corrupt: list[str] = field(default_factory=list)
    #: The free-block index: block -> the affinity its entry names.
    free: dict[IPNetwork, str | None] = field(default_factory=dict)
    #: The room index: claim windows listed as having an unclaimed block.
    rooms: set[IPNetwork] = field(default_factory=set)
    #: Sticky identities, live and parked.
    identities: dict[str, Identity] = field(default_factory=dict)
    #: Conflicts daemons recorded re-asserting after etcd went back.
    conflicts: list[ConflictRecord] = field(default_factory=list)
    #: Topology ranges: range -> its holder, at the holder key's revision.
    ranges: dict[IPNetwork, Versioned[TopologyRange]] = field(default_factory=dict)
    #: Value listings (a value's ranges that may have room), as their values name them.
    listed: set[TopologyRange] = field(default_factory=set)

    def in_conflict(self) -> set[tuple[str, IPAddress]]:
        """(handle, address) pairs a recorded conflict or a contested mark covers: what the
        handle lists there is reported once, as the conflict."""
        return {(c.handle.id, c.address) for c in self.conflicts} | {
            (handle, address) for address, (handle, _) in self.contested().items()}

    def contested(self) -> dict[IPAddress, tuple[str, str]]:
        """Addresses marked contested in their blocks: address -> (recorded handle, node)."""
        return {block.address(ordinal): marker for block in self.blocks.values()
                for ordinal, marker in block.contested.items()}

    def allocations(self) -> list[AllocationRow]:
        rows = []
        for block in self.blocks.values():
            pool = allocator.pool_of_block(self.pools, block.cidr)
            for ordinal, handle_id in block.allocations.items():
                handle = self.handles.get(handle_id)
                identity_id = parked_identity(handle_id) or (
                    handle.attributes.get("identity") if handle is not None else None)
                rows.append(AllocationRow(block.address(ordinal), block, handle_id, handle,
                                          pool, self.identities.get(identity_id or "")))
        return sorted(rows, key=lambda r: address_order(r.ip))


async def load_snapshot(store: EtcdStore) -> Snapshot:
    keys = store.keys
    pool_kvs, revision = await store.prefix_raw(keys.pools())
    ((node_kvs, _), (reservation_kvs, _), (block_kvs, _), (affinity_kvs, _), (handle_kvs, _),
     (free_kvs, _), (room_kvs, _), (identity_kvs, _), (conflict_kvs, _), (range_kvs, _),
     (listing_kvs, _)) = await asyncio.gather(
        store.prefix_raw(keys.nodes(), revision=revision),
        store.prefix_raw(keys.reservations(), revision=revision),
        store.prefix_raw(keys.blocks(), revision=revision),
        store.prefix_raw(keys.affinities(), keys_only=True, revision=revision),
        store.prefix_raw(keys.handles(), revision=revision),
        store.prefix_raw(keys.free_blocks(), revision=revision),
        store.prefix_raw(keys.rooms(), keys_only=True, revision=revision),
        store.prefix_raw(keys.identities(), revision=revision),
        store.prefix_raw(keys.conflicts(), revision=revision),
        store.prefix_raw(keys.topology_ranges(), revision=revision),
        store.prefix_raw(keys.value_listings(), revision=revision),
    )
    snap = Snapshot(revision, [], {}, [], {}, [], {})
    for kv in conflict_kvs:
        try:
            node, address = keys.conflict_of(kv.key)
            snap.conflicts.append(ConflictRecord.from_value(node, address, kv.value))
        except InvalidInput as exc:
            snap.corrupt.append(f"corrupt value at {kv.key.decode(errors='replace')}: {exc} "
                                f"(fix: topoipamctl ipam resolve-conflict NODE IP, as the key "
                                "names them)")
    identity = await store.read_datastore_identity()
    if identity.problem:
        snap.corrupt.append(f"{identity.problem} (the next topoipamd to start replaces it)")

    def decoded(kvs: Iterable[Any], decoder: Callable[[bytes, bytes], Any]) -> Iterator[Any]:
        """The values that decode; the others are reported by ``ipam check``."""
        return (v.value for v in decode_each(kvs, decoder, snap.corrupt.append))

    snap.pools.extend(sorted(decoded(pool_kvs, store.decode_pool), key=lambda p: p.name))
    snap.nodes.update((n.name, n) for n in decoded(node_kvs, store.decode_node))
    snap.reservations.extend(decoded(reservation_kvs, store.decode_reservation))
    snap.blocks.update((b.cidr, b) for b in decoded(block_kvs, store.decode_block))
    snap.affinities.extend(decoded(affinity_kvs, lambda key, _: keys.affinity_of(key)))
    snap.handles.update((h.id, h) for h in decoded(handle_kvs, store.decode_handle))
    snap.identities.update((i.id, i) for i in decoded(identity_kvs, store.decode_identity))
    snap.rooms.update(decoded(room_kvs, lambda key, _: keys.block_cidr(key, "room")))
    snap.free.update(decoded(free_kvs, lambda key, raw: (
        keys.block_cidr(key, "free"), decode(raw, "free-block entry").get("node"))))
    for held in decode_each(range_kvs, lambda _, raw: TopologyRange.from_dict(
            decode(raw, "topology range")), snap.corrupt.append):
        snap.ranges[held.value.cidr] = held
    snap.listed.update(decoded(listing_kvs, lambda _, raw: TopologyRange.from_dict(
        decode(raw, "topology range listing"))))
    return snap


def reserves(reservation: model.IPReservation, address: IPAddress) -> bool:
    return any(address.version == c.version and address in c for c in reservation.cidrs)


def outside_pools(reservation: model.IPReservation, pools: Iterable[IPPool]) -> list[IPNetwork]:
    pools = list(pools)
    return [c for c in reservation.cidrs
            if not any(p.family == c.version and p.cidr.overlaps(c)
                       for p in pools)]


def reserved_by(snap: Snapshot, address: IPAddress) -> list[str]:
    return sorted(r.name for r in snap.reservations if reserves(r, address))


def describe_address(snap: Snapshot, address: IPAddress) -> str:
    for block in snap.blocks.values():
        if address.version != block.family or address not in block.cidr:
            continue
        holder = block.allocations.get(block.ordinal(address))
        if holder is None:
            continue
        pool = allocator.pool_of_block(snap.pools, block.cidr)
        where = f"block {block.cidr} of {f'pool {pool.name}' if pool else 'no pool'}"
        handle = snap.handles.get(holder)
        if handle is None:
            return (f"{address} is allocated to handle {holder} in {where}, but that handle "
                    f"does not exist (leaked; free it with `topoipamctl ipam release --ip "
                    f"{address}`)")
        row = AllocationRow(address, block, holder, handle, pool)
        reserved = reserved_by(snap, address)
        also = (f"; it is also reserved by ipreservation {', '.join(reserved)}"
                if reserved else "")
        contested = block.contested.get(block.ordinal(address))
        if contested is not None:
            also += (f"; contested: node {contested[1]}'s record says {contested[0]} uses it "
                     "too since a restore (see `topoipamctl ipam conflicts`)")
        return (f"{address} is allocated to handle {holder} on node {handle.node} "
                f"(pod {row.pod}) in {where}{also}")
    pool = allocator.pool_of(snap.pools, address)
    if pool is None:
        return f"{address} is not in any pool"
    if address == pool.gateway:
        return f"{address} is the gateway of pool {pool.name} (never handed out)"
    if not pool.usable(address):
        return f"{address} is the network or broadcast address of pool {pool.name} (never used)"
    reserved = reserved_by(snap, address)
    if reserved:
        return f"{address} is reserved by ipreservation {', '.join(reserved)} (pool {pool.name})"
    cidr = pool.block_of(address)
    claimed = snap.blocks.get(cidr)
    where = (f"block {cidr}, affinity {show(claimed.affinity)}" if claimed is not None
             else f"block {cidr} not claimed yet")
    return f"{address} is free (pool {pool.name}, {where})"


def find_inconsistencies(snap: Snapshot) -> list[str]:
    """Every disagreement between blocks, handles, affinities and pools, one line each.

    These are problems: state that can hand an address out twice or lose it.
    """
    return [
        *snap.corrupt,
        *handle_problems(snap),
        *block_problems(snap),
        *affinity_problems(snap),
        *pool_problems(snap),
        *double_allocations(snap),
        *gateway_problems(snap),
        *identity_problems(snap),
        *conflict_problems(snap),
    ]


def identity_problems(snap: Snapshot) -> Iterator[str]:
    """Sticky identities whose handle and blocks do not agree with them.

    Live: its handle exists, names it, and lists exactly its addresses (the
    blocks giving them to the handle is what :func:`handle_problems` checks).
    Parked: no handle uses it, and each block gives its addresses to it.
    """
    for identity in sorted(snap.identities.values(), key=lambda i: i.id):
        who = f"sticky identity {identity.id}"
        fix = f"(fix: topoipamctl ipam release --identity {identity.id})"
        listed = sorted((a.ip for a in identity.addresses), key=address_order)
        if not identity.parked:
            handle = snap.handles.get(identity.handle)
            if handle is None:
                yield f"mismatch: {who} is live under handle {identity.handle}, which is gone"
            elif handle.attributes.get("identity") != identity.id:
                yield (f"mismatch: {who} is live under handle {identity.handle}, which "
                       f"belongs to {show(handle.attributes.get('identity'))}")
            elif sorted((a.ip for a in handle.addresses), key=address_order) != listed:
                yield (f"mismatch: {who} lists {', '.join(map(str, listed))}, its handle "
                       f"{identity.handle} {', '.join(str(a.ip) for a in handle.addresses)}")
            continue
        holder = parked_holder(identity.id)
        for entry in identity.addresses:
            block = snap.blocks.get(entry.block)
            if block is None or entry.ip not in block.cidr:
                yield f"mismatch: {who} parks {entry.ip} in block {entry.block}, which is gone"
                continue
            current = block.allocations.get(block.ordinal(entry.ip))
            if current != holder:
                state = "has it free" if current is None else f"gives it to {current}"
                yield f"mismatch: {who} parks {entry.ip}, but block {block.cidr} {state} {fix}"


def conflict_standings(snap: Snapshot) -> list[tuple[ConflictRecord, Standing]]:
    """Every recorded conflict with what it is now, and a contested address no record
    names (its record deleted by hand) as one that holds."""
    found = []
    for conflict in sorted(snap.conflicts, key=lambda c: (c.node, address_order(c.address))):
        block = next((b for b in snap.blocks.values() if conflict.address.version == b.family
                      and conflict.address in b.cidr), None)
        holder = block.allocations.get(block.ordinal(conflict.address)) if block else None
        found.append((conflict, standing(conflict, block, snap.handles.get(conflict.handle.id),
                                         snap.handles.get(holder or ""), snap.pools)))
    recorded = {(c.node, c.address) for c in snap.conflicts}
    for block in sorted(snap.blocks.values(), key=lambda b: network_order(b.cidr)):
        for conflict in unrecorded(block, None, recorded):
            handle = snap.handles.get(conflict.handle.id)
            holder = block.allocations.get(block.ordinal(conflict.address))
            found.append((conflict, standing(conflict, block, handle,
                                             snap.handles.get(holder or ""), snap.pools)))
    return found


def conflict_problems(snap: Snapshot) -> Iterator[str]:
    """Addresses a node's record holds that etcd gave another, or no pool contains: a
    daemon re-asserting its record after etcd went back (a restore) found them, and did
    not hand them out twice. Only conflicts that still hold."""
    for _, state in conflict_standings(snap):
        if state.holds:
            yield state.line()


def gateway_problems(snap: Snapshot) -> Iterator[str]:
    """Allocations that hold their pool's gateway (made before pools had gateways)."""
    for row in snap.allocations():
        if row.pool is not None and row.ip == row.pool.gateway:
            yield (f"gateway allocated: {row.ip} is the gateway of pool {row.pool.name} but "
                   f"is held by handle {row.handle_id} (pod {row.pod}); recreate that pod, "
                   "or give the pool another gateway")


def free_index_drift(snap: Snapshot) -> list[tuple[IPNetwork, Block | None]]:
    """Blocks whose free-block index entry disagrees with the block (block None: an
    entry for a block that does not exist)."""
    drift: list[tuple[IPNetwork, Block | None]] = []
    for cidr in sorted(set(snap.blocks) | set(snap.free), key=network_order):
        block = snap.blocks.get(cidr)
        wanted = block is not None and allocator.has_free(block, snap.pools)
        if wanted != (cidr in snap.free):
            drift.append((cidr, block))
    return drift


def stray_rooms(snap: Snapshot) -> list[IPNetwork]:
    """Room index entries inside no pool (left by a pool deletion before deletions took
    them along, or put back by a daemon with a stale view of the pools)."""
    return sorted((w for w in snap.rooms if not any(
        p.family == w.version and w.subnet_of(p.cidr) for p in snap.pools)),  # type: ignore[arg-type]
        key=network_order)


def room_index_gaps(snap: Snapshot, listed: set[IPNetwork]
                    ) -> list[tuple[IPPool, list[IPNetwork]]]:
    """Per pool, the claim windows that have an unclaimed block but no room index
    entry (claims there fall back to a survey). Pools too big to index are left out."""
    reservations = allocator.Reservations(snap.reservations)
    gaps = []
    for pool in snap.pools:
        prefix = allocator.window_prefix(pool)
        if prefix - pool.cidr.prefixlen > 16:
            continue
        by_window: dict[IPNetwork, set[IPNetwork]] = {}
        for cidr in snap.blocks:
            if cidr.version == pool.family and cidr.subnet_of(pool.cidr):  # type: ignore[arg-type]
                by_window.setdefault(cidr.supernet(new_prefix=prefix)
                                     if cidr.prefixlen >= prefix else cidr, set()).add(cidr)
        missing = [w for w in pool.cidr.subnets(new_prefix=prefix) if w not in listed
                   and allocator.first_unclaimed_block(pool, by_window.get(w, set()),
                                                       reservations, w) is not None]
        if missing:
            gaps.append((pool, missing))
    return gaps


def topology_findings(snap: Snapshot) -> list[RangeFinding]:
    """The topology ranges' warnings and repairs (:func:`.range_audit.range_findings`)."""
    return range_findings(snap.pools, snap.nodes, snap.blocks, snap.ranges, snap.listed,
                          allocator.Reservations(snap.reservations))


def find_warnings(snap: Snapshot) -> list[str]:
    """Deliberate or harmless states an operator should know about, one line each.

    Blocks left by a forced pool deletion (until their last address is
    released), reserved addresses that are still allocated, reservations
    outside every pool, index entries out of date, topology ranges that
    break one value per range.
    """
    lines = []
    for cidr in sorted(snap.blocks, key=network_order):
        if allocator.pool_of_block(snap.pools, cidr) is None:
            lines.append(f"block {cidr} is not inside any pool (block of a deleted pool; "
                         f"{snap.blocks[cidr].in_use} address(es) in use)")
    for row in snap.allocations():
        for name in reserved_by(snap, row.ip):
            lines.append(f"reserved address {row.ip} (ipreservation {name}) is allocated to "
                         f"handle {row.handle_id} (node {show(row.node)})")
    for reservation in sorted(snap.reservations, key=lambda r: r.name):
        lines += [f"ipreservation {reservation.name}: {cidr} is outside every pool"
                  for cidr in outside_pools(reservation, snap.pools)]
    for cidr, block in free_index_drift(snap):
        state = ("does not exist" if block is None else "has an address to give"
                 if cidr not in snap.free else "has nothing to give")
        lines.append(f"free-block index out of date: block {cidr} {state} (borrowing still "
                     "works, by reading more; fix: topoipamctl ipam repair-index)")
    for pool, missing in room_index_gaps(snap, snap.rooms):
        lines.append(f"room index out of date: pool {pool.name} has {len(missing)} claim "
                     "window(s) with room but no entry (claims there survey the pool "
                     "instead; fix: topoipamctl ipam repair-index)")
    lines += [finding.line for finding in topology_findings(snap)]
    stray = stray_rooms(snap)
    if stray:
        shown = ", ".join(map(str, stray[:3])) + (", …" if len(stray) > 3 else "")
        lines.append(f"room index out of date: {len(stray)} entr"
                     f"{'y lies' if len(stray) == 1 else 'ies lie'} in no pool ({shown}; "
                     "claims never read them; fix: topoipamctl ipam repair-index)")
    return lines


def handle_problems(snap: Snapshot) -> Iterator[str]:
    """Handles whose addresses their blocks do not give them (orphans and mismatches)."""
    in_conflict = snap.in_conflict()
    for handle in sorted(snap.handles.values(), key=lambda h: h.id):
        who = f"handle {handle.id} (node {handle.node})"
        if not handle.addresses:
            yield f"orphaned handle: {who} holds no address"
        for entry in handle.addresses:
            if (handle.id, entry.ip) in in_conflict:
                continue  # a conflict after a restore: conflict_problems reports it
            block = snap.blocks.get(entry.block)
            if block is None:
                yield (f"orphaned handle: {who} lists {entry.ip} in block {entry.block}, "
                       "which does not exist")
            elif entry.ip.version != block.family or entry.ip not in block.cidr:
                yield (f"mismatch: {who} lists {entry.ip} in block {entry.block}, which does "
                       "not contain it")
            elif (holder := block.allocations.get(block.ordinal(entry.ip))) != handle.id:
                state = "has it free" if holder is None else f"gives it to handle {holder}"
                yield (f"mismatch: {who} lists {entry.ip}, but block {block.cidr} {state} "
                       f"(fix: topoipamctl ipam release --ip {entry.ip})")


def block_problems(snap: Snapshot) -> Iterator[str]:
    """Allocated addresses whose handle is gone or does not list them (leaks)."""
    for cidr in sorted(snap.blocks, key=network_order):
        block = snap.blocks[cidr]
        for ordinal, holder in sorted(block.allocations.items()):
            address = block.address(ordinal)
            identity_id = parked_identity(holder)
            if identity_id is not None:
                identity = snap.identities.get(identity_id)
                if identity is None:
                    reason = f"it is parked for sticky identity {identity_id}, which is gone"
                elif not identity.parked:
                    reason = (f"it is parked for sticky identity {identity_id}, which is "
                              f"live under handle {identity.handle}")
                elif not any(a.ip == address for a in identity.addresses):
                    reason = f"it is parked for sticky identity {identity_id}, which lacks it"
                else:
                    continue
                yield f"leaked address: {address} in block {cidr}: {reason}"
                continue
            handle = snap.handles.get(holder)
            if handle is None:
                reason = f"handle {holder} does not exist"
            elif not any(a.ip == address and a.block == cidr for a in handle.addresses):
                reason = f"handle {holder} (node {handle.node}) does not list it"
            else:
                continue
            yield (f"leaked address: {address} in block {cidr}: {reason} "
                   f"(free it: topoipamctl ipam release --ip {address})")


def affinity_problems(snap: Snapshot) -> Iterator[str]:
    """Affinity keys and block owners that do not point at each other."""
    affinity_keys = set(snap.affinities)
    for node, cidr in sorted(snap.affinities, key=lambda a: (a[0], network_order(a[1]))):
        block = snap.blocks.get(cidr)
        if block is None:
            yield (f"affinity mismatch: node {node} has an affinity for block {cidr}, which "
                   "does not exist")
        elif block.affinity != node:
            yield (f"affinity mismatch: node {node} has an affinity for block {cidr}, but the "
                   f"block belongs to {show(block.affinity)}")
    for cidr in sorted(snap.blocks, key=network_order):
        owner = snap.blocks[cidr].affinity
        if owner is not None and (owner, cidr) not in affinity_keys:
            yield (f"affinity mismatch: block {cidr} belongs to node {owner}, which has no "
                   "affinity for it")


def pool_problems(snap: Snapshot) -> Iterator[str]:
    """Blocks cut to another size than their pool's (blocks of no pool are warnings)."""
    for cidr in sorted(snap.blocks, key=network_order):
        pool = allocator.pool_of_block(snap.pools, cidr)
        if pool is not None and pool.block_size != cidr.prefixlen:
            yield (f"block size mismatch: block {cidr} lies in pool {pool.name}, whose blocks "
                   f"are /{pool.block_size}")


def double_allocations(snap: Snapshot) -> Iterator[str]:
    """Addresses allocated in two (overlapping) blocks, or listed by two handles."""
    in_blocks: dict[IPAddress, list[str]] = {}
    for cidr in sorted(snap.blocks, key=network_order):
        for ordinal, holder in sorted(snap.blocks[cidr].allocations.items()):
            in_blocks.setdefault(snap.blocks[cidr].address(ordinal), []).append(
                f"block {cidr} (handle {holder})")
    in_handles: dict[IPAddress, list[str]] = {}
    in_conflict = snap.in_conflict()
    for handle in snap.handles.values():
        for entry in handle.addresses:
            if (handle.id, entry.ip) in in_conflict:
                continue  # a conflict after a restore: conflict_problems reports it
            in_handles.setdefault(entry.ip, []).append(handle.id)
    for address in sorted(in_blocks, key=address_order):
        if len(in_blocks[address]) > 1:
            yield (f"double allocation: {address} is allocated in "
                   f"{' and '.join(in_blocks[address])}")
    for address in sorted(in_handles, key=address_order):
        if len(in_handles[address]) > 1:
            yield (f"double allocation: {address} is listed by handles "
                   f"{', '.join(sorted(in_handles[address]))}")
