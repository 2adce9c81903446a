"""Operator writes: the manifest write planner, label and config changes, node
retirement, index repairs (release by address is :mod:`.release`). What
``topoipamctl`` does, usable from the library.

Every change is one compare-and-swap etcd transaction built from the domain
writes of :mod:`topoipam.daemon.store`: read, validate everything, then commit
with the read revisions as guards. A guard that fails means someone else
changed the same object in between; the write is then re-read and
re-validated (bounded: the one retry policy, :mod:`topoipam.daemon.store.retry`),
so it never overwrites a change it did not see and never writes half of a
manifest. Nothing here prints: lines for the operator come back in :class:`Plan` (or as values).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .audit import (
    Snapshot,
    free_index_drift,
    load_snapshot,
    network_order,
    outside_pools,
    owning_pool,
    reserves,
    room_index_gaps,
    show,
    stray_rooms,
    topology_findings,
)
from .core import allocator
from .core.allocator import has_free
from .core.calls import ReleaseCall
from .core.errors import AlreadyExists, InvalidInput, NodeInUse, NotFound, PoolInUse
from .core.holdings import (
    Block,
)
from .core.model import (
    IPNetwork,
    IPPool,
    IPReservation,
    Node,
    Resource,
    check_kubernetes_label,
    check_pool_name,
    check_pool_overlaps,
    reserved_range_problem,
    resource_id,
)
from .core.planner import Planner
from .core.writes import (
    DeleteAffinity,
    DeleteBlock,
    DeleteConflict,
    DeleteFreeMark,
    DeleteObject,
    DeleteRoomMark,
    DeleteRoomMarksIn,
    DeleteTopologyRangesOf,
    PoolsUnchangedSince,
    PoolUnchanged,
    PutBlock,
    PutFreeMark,
    PutObject,
    PutRoomMark,
    Versioned,
    Write,
)
from .planning import commit_call, drop_writes
from .store import EtcdStore

log = logging.getLogger(__name__)



# etcd's default --max-txn-ops; a bigger manifest cannot be applied atomically.
MAX_TXN_OPS = 128


# Empty blocks of deleted pools are dropped in transactions of this many blocks
# (two ops each: block and affinity).
BLOCK_DROP_BATCH = 50


STORE_KIND = {"IPPool": "pool", "Node": "node", "IPReservation": "reservation"}


def key_of(store: EtcdStore, kind: str, name: str) -> bytes:
    keys = store.keys
    if kind == "IPPool":
        return keys.pool(name)
    if kind == "Node":
        return keys.node(name)
    if kind == "IPReservation":
        return keys.reservation(name)
    return keys.config()


async def read_current(store: EtcdStore, kind: str, name: str) -> tuple[Resource | None, int]:
    """The stored object and its mod_revision; (None, 0) if absent, (None, rev) if corrupt.

    A corrupt stored value is reported as existing-but-unreadable so that
    `apply` can overwrite it and `create` refuses, instead of crashing.
    """
    key = key_of(store, kind, name)
    raw = await store.get_raw(key)
    if raw is None:
        return None, 0
    value, revision = raw
    try:
        decoded: Resource
        if kind == "IPPool":
            decoded = store.decode_pool(key, value)
        elif kind == "Node":
            decoded = store.decode_node(key, value)
        elif kind == "IPReservation":
            decoded = store.decode_reservation(key, value)
        else:
            decoded = store.decode_config(value)
    except InvalidInput as exc:
        log.warning("%s %s: stored value is corrupt (%s)", kind.lower(), name, exc)
        return None, revision
    return decoded, revision


async def allocated_in(store: EtcdStore, cidr: IPNetwork) -> int:
    return sum(b.value.in_use for b in await store.list_blocks(cidr))


@dataclass(frozen=True)
class Target:
    """What a write is about; ``obj`` is None when deleting by name."""

    kind: str
    name: str
    obj: Resource | None
    where: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind.lower()} {self.name}"

    @property
    def context(self) -> str:
        return f"{self.where}: " if self.where else ""


@dataclass
class Plan:
    writes: list[Write] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    deletes_pool: bool = False
    new_pools: list[IPPool] = field(default_factory=list)


async def plan_writes(
    store: EtcdStore, targets: Sequence[Target], action: str, force: bool
) -> Plan:
    """Validate every target against etcd as it is now and plan one guarded transaction.

    Raises before anything is written: duplicates in the file, create of an
    existing object, delete of a missing one or of a pool in use, pool
    overlaps (with stored pools and within the file), changed CIDRs.
    """
    seen: dict[tuple[str, str], str] = {}
    for target in targets:
        first = seen.setdefault((target.kind, target.name), target.where)
        if first != target.where:
            raise InvalidInput(f"{target.context}{target.label} appears twice (also in {first})")
        if action == "delete" and target.kind not in ("IPPool", "IPReservation"):
            raise InvalidInput(
                f"{target.context}deleting {target.kind} objects is not supported "
                "(IPAMConfig: use `topoipamctl ipam configure`; Node: not yet)"
            )
    currents = await asyncio.gather(*(read_current(store, t.kind, t.name) for t in targets))
    stored, pools_revision = await store.pools_at_revision()
    stored_pools = [p.value for p in stored]
    file_pools = [t.obj for t in targets if isinstance(t.obj, IPPool)]
    block_cidrs: dict[int, list[IPNetwork]] = {}
    snapshot: Snapshot | None = None
    plan = Plan()
    for target, (current, revision) in zip(targets, currents, strict=True):
        if action == "delete":
            await plan_delete(store, target, current, revision, force, plan)
            continue
        assert target.obj is not None
        if action == "create" and revision != 0:
            raise AlreadyExists(f"{target.context}{target.label} already exists")
        if isinstance(target.obj, IPPool):
            pool = target.obj
            problem = reserved_range_problem(pool.cidr)
            if problem is not None:
                raise InvalidInput(f"{target.context}ippool {pool.name}: {problem}")
            if revision == 0:
                try:
                    check_pool_name(pool.name)
                except InvalidInput as exc:
                    raise InvalidInput(f"{target.context}{exc}") from exc
            # Against the stored pools this file does not replace, and against the
            # earlier pools of the file: an overlap is reported at the later document.
            # Checked before the leftover blocks, so that the blocks of a live pool
            # are blamed on that pool, not on "a deleted pool".
            others = [p for p in stored_pools if p.name not in {f.name for f in file_pools}]
            earlier = file_pools[:file_pools.index(pool)]
            try:
                check_pool_overlaps(pool, [*others, *earlier])
            except InvalidInput as exc:
                raise InvalidInput(f"{target.context}{exc}") from exc
            if pool.topology_key and pool.topology_prefix == pool.cidr.prefixlen:
                plan.warnings.append(
                    f"{target.context}ippool {pool.name}: topologyKey {pool.topology_key} with "
                    f"ranges of /{pool.topology_prefix} leaves the pool one range: only one "
                    f"value of {pool.topology_key} can claim blocks in it (set a longer "
                    f"topologyBlockSize, up to {pool.block_size})")
            if isinstance(current, IPPool):
                check_immutable(target, current, pool,
                                bool(await store.block_cidrs(current.cidr)))
            else:
                family = pool.family
                if family not in block_cidrs:
                    block_cidrs[family] = sorted(await store.block_cidrs(family), key=network_order)
                check_leftover_blocks(target, pool, block_cidrs[family])
        if isinstance(target.obj, IPReservation) and current != target.obj:
            if snapshot is None:
                snapshot = await load_snapshot(store)
            pools_after = [*(p for p in stored_pools if p.name not in {f.name for f in file_pools}),
                           *file_pools]
            plan.warnings.extend(reservation_warnings(target.obj, snapshot, pools_after))
        if current == target.obj:
            plan.lines.append(f"{resource_id(target.obj)} unchanged")
            continue
        plan.writes.append(PutObject(target.obj, revision))
        outcome = "configured" if revision else "created"
        plan.lines.append(f"{resource_id(target.obj)} {outcome}")
        if isinstance(target.obj, IPPool) and not isinstance(current, IPPool):
            plan.new_pools.append(target.obj)
    if any(isinstance(w, PutObject) and isinstance(w.obj, IPPool) for w in plan.writes):
        # The overlap checks above hold only if no pool appears meanwhile.
        plan.writes.append(PoolsUnchangedSince(pools_revision))
    if len(plan.writes) > MAX_TXN_OPS:
        raise InvalidInput(
            f"{len(plan.writes)} changes do not fit in one etcd transaction (at most "
            f"{MAX_TXN_OPS}); split the manifest"
        )
    return plan


def reservation_warnings(
    reservation: IPReservation, snap: Snapshot, pools: Sequence[IPPool]
) -> list[str]:
    """What an operator must know when writing ``reservation``: allocations it cannot take
    back, and CIDRs that reserve nothing because no pool contains them."""
    what = f"ipreservation {reservation.name}"
    lines = [
        f"{what}: {row.ip} is allocated to {row.pod if row.handle else 'a leaked handle'} "
        f"(handle {row.handle_id}, node {show(row.node)}); the reservation keeps it only once "
        "it is released"
        for row in snap.allocations() if reserves(reservation, row.ip)
    ]
    lines += [f"{what}: {cidr} is outside every pool (it reserves nothing)"
              for cidr in outside_pools(reservation, pools)]
    return lines


async def plan_delete(
    store: EtcdStore, target: Target, current: Resource | None, revision: int, force: bool,
    plan: Plan,
) -> None:
    if revision == 0:
        raise NotFound(f"{target.context}{target.label} does not exist")
    if isinstance(current, IPPool):
        in_use = await allocated_in(store, current.cidr)
        if in_use and not force:
            raise PoolInUse(target.name, in_use)
        if in_use:
            plan.warnings.append(
                f"ippool {target.name}: {in_use} allocated address(es) stay allocated in the "
                "pool's blocks until released (see `topoipamctl check placement`)"
            )
    plan.deletes_pool = plan.deletes_pool or target.kind == "IPPool"
    plan.writes.append(DeleteObject(STORE_KIND[target.kind], target.name, revision))
    if isinstance(current, IPPool):
        # Its room entries go with it (a forced delete's leftover blocks are never claimed
        # into); a pool created over the range later writes its own.
        plan.writes.append(DeleteRoomMarksIn(current.cidr))
        # So do its topology ranges: its empty blocks are dropped next, with no pool left
        # to give their ranges back to, and a pool made over the CIDR later starts free.
        plan.writes.append(DeleteTopologyRangesOf(current.name, current.cidr))
    plan.lines.append(f"{target.kind.lower()}/{target.name} deleted")


def check_immutable(target: Target, current: IPPool, pool: IPPool, has_blocks: bool) -> None:
    # Existing blocks are cut at the old CIDR and block size, and placed in the old
    # topology ranges; changing either would orphan them or let two blocks overlap.
    what = f"{target.context}ippool {pool.name}"
    if (current.cidr, current.block_size) != (pool.cidr, pool.block_size):
        raise InvalidInput(
            f"{what}: cidr and blockSize cannot change ({current.cidr} /{current.block_size} "
            f"-> {pool.cidr} /{pool.block_size}); create a new pool instead")
    if has_blocks and ((current.topology_key, current.topology_prefix)
                       != (pool.topology_key, pool.topology_prefix)):
        raise InvalidInput(
            f"{what}: topologyKey and topologyBlockSize cannot change while the pool has "
            f"blocks ({current.topology_key or '-'} /{current.topology_prefix} -> "
            f"{pool.topology_key or '-'} /{pool.topology_prefix}); create a new pool instead")


def check_leftover_blocks(target: Target, pool: IPPool, cidrs: Iterable[IPNetwork]) -> None:
    """Refuse a new pool over blocks of another size (left by a deleted pool).

    The allocator only recognises blocks of its pool's size; a differently cut
    block in the range would let the same address be handed out twice.
    Blocks of the right size are simply adopted by the new pool.
    """
    for cidr in cidrs:
        if not cidr.overlaps(pool.cidr):
            continue
        if owning_pool([pool], cidr) is pool:
            continue
        raise InvalidInput(
            f"{target.context}ippool {pool.name}: block {cidr} of a deleted pool overlaps "
            f"{pool.cidr} but is not a /{pool.block_size} block of it; release its "
            "addresses first (`topoipamctl ipam show --show-blocks`)"
        )


async def write_targets(
    store: EtcdStore, targets: Sequence[Target], action: str, force: bool = False
) -> Plan:
    """Validate and commit ``targets`` in one transaction, re-validating after lost races."""

    async def attempt() -> tuple[list[Write], Plan]:
        plan = await plan_writes(store, targets, action, force)
        return plan.writes, plan

    plan = await store.commit_with_retry(attempt, "the objects")
    for pool in plan.new_pools:
        written = await store.get_pool(pool.name)
        if written is not None:  # not deleted meanwhile (the guard covers what follows)
            await write_room_marks(store, pool, guard=written.mod_revision)
    if plan.writes and plan.deletes_pool:
        dropped = await drop_stray_empty_blocks(store)
        if dropped:
            plan.lines.append(f"dropped {dropped} empty block(s) of deleted pools")
    return plan


async def drop_stray_empty_blocks(store: EtcdStore) -> int:
    """Delete empty blocks (and their affinities) that no pool owns any more.

    Each delete is guarded by the block's revision, so a block that a daemon
    with a stale view allocates from in the meantime is kept. Blocks with
    allocations are never touched.
    """
    pools = [p.value for p in await store.list_pools()]
    stray = [
        b for b in await store.list_blocks()
        if b.value.is_empty() and owning_pool(pools, b.value.cidr) is None
    ]
    dropped = 0
    for start in range(0, len(stray), BLOCK_DROP_BATCH):
        batch = stray[start:start + BLOCK_DROP_BATCH]
        result = await store.commit([w for b in batch for w in block_drop_writes(b)])
        if result.succeeded:
            dropped += len(batch)
            continue
        for block in batch:  # one of them changed: keep that one, drop the others
            if (await store.commit(block_drop_writes(block))).succeeded:
                dropped += 1
    return dropped


def block_drop_writes(current: Versioned[Block]) -> list[Write]:
    block = current.value
    writes: list[Write] = [DeleteBlock(block.cidr, current.mod_revision),
                           DeleteFreeMark(block.cidr)]
    if block.affinity is not None:
        writes.append(DeleteAffinity(block.affinity, block.cidr))
    return writes


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def parse_label_changes(items: Sequence[str]) -> dict[str, str | None]:
    """``k=v`` sets, ``k-`` removes (kubectl syntax); None means remove."""
    changes: dict[str, str | None] = {}
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            change: str | None = value
        elif item.endswith("-") and len(item) > 1:
            key, change = item[:-1], None
        else:
            raise InvalidInput(f"invalid label change {item!r}: use KEY=VALUE or KEY-")
        if key in changes:
            raise InvalidInput(f"label {key} is given more than once")
        changes[key] = change
    return changes



async def retire_node(store: EtcdStore, node: str, force: bool = False) -> tuple[int, int, int]:
    """Remove ``node``: its handles (only with ``force``), blocks, affinities, record.

    Refuses with NodeInUse while the node holds addresses, unless ``force``,
    which releases them (planned for that node, as its daemon would). Empty
    blocks are deleted; a block that still holds addresses other nodes
    borrowed loses its affinity but keeps them. Each step is its own guarded
    transaction, so an interrupted removal can simply be run again. Returns
    (handles released, blocks deleted, blocks kept unaffined).
    """
    handles = [h.value.id for h in await store.list_handles() if h.value.node == node]
    if handles and not force:
        raise NodeInUse(node, len(handles))
    planner = Planner(node)  # released as that node's daemon would release them
    for handle_id in handles:
        await commit_call(store, planner, ReleaseCall(handle_id))
    deleted = kept = 0
    pools = [p.value for p in await store.list_pools()]
    for _, cidr in await store.list_affinities(node):

        async def attempt(cidr: IPNetwork = cidr) -> tuple[list[Write], str]:
            current = await store.get_block(cidr)
            writes: list[Write] = [DeleteAffinity(node, cidr)]
            if current is None or current.value.affinity != node:
                return writes, "affinity"
            if current.value.is_empty():  # its range goes back if it held no other block
                return await drop_writes(store, planner, current), "deleted"
            orphan = current.value.copy()
            orphan.affinity = None
            marks: list[Write] = [PutFreeMark(cidr, None)] if has_free(orphan, pools) else []
            return [*writes, PutBlock(orphan, current.mod_revision), *marks], "kept"

        outcome = await store.commit_with_retry(attempt, f"block {cidr} of node {node}")
        deleted += outcome == "deleted"
        kept += outcome == "kept"
    # The node's conflict records go with it: its handles are released (their contested
    # addresses stay with the other pods), and no daemon of it will check them again.
    conflicts, _ = await store.prefix_raw(store.keys.conflicts(node), keys_only=True)
    if conflicts:
        await store.commit([DeleteConflict(node, ipaddress.ip_address(
            store.keys.conflict_of(kv.key)[1])) for kv in conflicts])
    await store.forget_absence(node)
    record = await store.get_node(node)
    if record is not None:
        await store.commit([DeleteObject("node", node, record.mod_revision)])
    return len(handles), deleted, kept


async def label_writes(store: EtcdStore, name: str, changes: dict[str, str | None],
                       overwrite: bool = False, create: bool = False
                       ) -> tuple[list[Write], tuple[bool, list[str]]]:
    """The guarded write that sets (value) or removes (None) labels of node ``name``.

    Refuses to change an existing value without ``overwrite``, and to touch a
    node that does not exist without ``create`` (a typo would otherwise create
    a node no daemon serves; daemons register their own node). Also returns
    whether anything changes and the labels asked to be removed that were absent.
    """
    for key, value in changes.items():
        check_kubernetes_label(key, "" if value is None else value, f"node {name}")
    current, revision = await read_current(store, "Node", name)
    if revision == 0 and not create:
        raise NotFound(f"node {name} does not exist; use --create to create it")
    labels = dict(current.labels) if isinstance(current, Node) else {}
    before = dict(labels)
    missing = []
    for key, value in changes.items():
        if value is None:
            if labels.pop(key, None) is None:
                missing.append(key)
        elif key in labels and labels[key] != value and not overwrite:
            raise InvalidInput(f"node {name} already has label {key}={labels[key]}; "
                               f"use --overwrite to change it to {value}")
        else:
            labels[key] = value
    # With create, a node that does not exist yet is created, unless nothing is set.
    if labels == before:
        return [], (False, missing)
    return [PutObject(Node(name, labels), revision)], (True, missing)


async def label_node(store: EtcdStore, name: str, changes: dict[str, str | None],
                     overwrite: bool = False, create: bool = False) -> tuple[bool, list[str]]:
    """Commit :func:`label_writes`, re-read and re-checked after a lost race."""
    return await store.commit_with_retry(
        lambda: label_writes(store, name, changes, overwrite, create), f"node {name}")


async def configure(store: EtcdStore, changes: dict[str, Any]) -> bool:
    """Change IPAMConfig fields (by attribute name); whether anything changed."""

    async def attempt() -> tuple[list[Write], bool]:
        current = await store.get_config()
        config = dataclasses.replace(current.value, **changes)
        if config == current.value and current.mod_revision:
            return [], False
        return [PutObject(config, current.mod_revision)], True

    return await store.commit_with_retry(attempt, "ipamconfig")


async def write_room_marks(store: EtcdStore, pool: IPPool,
                           only: Iterable[IPNetwork] | None = None, guard: int = 0) -> int:
    """Mark the claim windows of a new pool (or just ``only``) as having room.

    Hints, written after the pool itself: a window a leftover block fills is
    unmarked by the first claimer that finds it full. With ``guard`` (the
    pool's mod_revision), each batch is written only while the pool is still
    as written then, so a delete that commits meanwhile leaves no entry of it
    behind; the rest are not written. Pools of more than 65,536 windows get
    none: their claims survey instead. Returns the entries written.
    """
    windows: list[IPNetwork]
    if only is not None:
        windows = list(only)
    elif allocator.window_prefix(pool) - pool.cidr.prefixlen <= 16:
        windows = list(pool.cidr.subnets(new_prefix=allocator.window_prefix(pool)))
    else:
        windows = []
    written = 0
    for start in range(0, len(windows), MAX_TXN_OPS - 8):
        batch: list[Write] = [PutRoomMark(w) for w in windows[start:start + MAX_TXN_OPS - 8]]
        if guard:
            batch.append(PoolUnchanged(pool.name, guard))
        if not (await store.commit(batch)).succeeded:
            break  # the pool changed or went: its entries are another writer's now
        written += len(batch) - (1 if guard else 0)
    return written


async def repair_free_index(store: EtcdStore) -> int:
    """Make the free-block and room indexes agree with the blocks and pools (room
    entries of no pool go), and the topology ranges with their blocks (see
    :mod:`.range_audit`); returns entries fixed.

    Entries are hints (a borrower's own compare on the block guards what it
    writes), so each fix is written unguarded: a block that changes meanwhile
    writes its own entry in its own transaction.
    """
    snap = await load_snapshot(store)
    writes: list[Write] = [
        PutFreeMark(cidr, block.affinity)
        if block is not None and allocator.has_free(block, snap.pools) else DeleteFreeMark(cidr)
        for cidr, block in free_index_drift(snap)]
    writes += [DeleteRoomMark(window) for window in stray_rooms(snap)]
    for start in range(0, len(writes), BLOCK_DROP_BATCH):
        await store.commit(writes[start:start + BLOCK_DROP_BATCH])
    fixed = len(writes)
    for pool, missing in room_index_gaps(snap, await store.room_windows_all()):
        fixed += await write_room_marks(store, pool, missing)
    # Topology ranges are no hints: each fix is guarded by the holder read, so a claim
    # or a give-back racing it wins and the fix is left for the next check to judge.
    for finding in topology_findings(snap):
        if finding.repair:
            fixed += (await store.commit(finding.repair)).succeeded
    return fixed
