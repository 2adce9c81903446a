"""The operator's side of conflicts after a restore: list them, resolve one.

``topoipamctl ipam conflicts`` lists the recorded conflicts that still hold
(:func:`list_conflicts`); ``ipam resolve-conflict NODE IP --keep
record|datastore`` settles one in a single guarded transaction
(:func:`resolve_conflict`): the recorded attachment keeps the address
(``record``) or the pod etcd gave it to does (``datastore``). A conflict that
has ended needs no side: its record is removed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

from .core import allocator
from .core.conflicts import KEEP_DATASTORE, ConflictRecord, Standing, standing
from .core.errors import AddressUnavailable, InvalidInput
from .core.holdings import (
    Block,
    Handle,
    HandleAddress,
    parked_identity,
)
from .core.model import IPAddress
from .core.writes import (
    DeleteConflict,
    DeleteHandle,
    PutAffinity,
    PutBlock,
    PutHandle,
    Versioned,
    Write,
)
from .planning import range_writes
from .store import EtcdStore

log = logging.getLogger(__name__)

KEEP_RECORD = "record"
KEEP_SIDES = (KEEP_RECORD, KEEP_DATASTORE)


@dataclasses.dataclass(frozen=True)
class ConflictView:
    """A recorded conflict, as read now: the values a resolution guards, and its standing."""

    conflict: ConflictRecord
    block: Versioned[Block] | None
    recorded: Versioned[Handle] | None
    holder: str | None
    holder_handle: Versioned[Handle] | None
    standing: Standing


async def read_conflicts(store: EtcdStore, node: str | None = None
                         ) -> dict[tuple[str, IPAddress], ConflictRecord]:
    """The conflicts recorded (of ``node``, or of every node), by (node, address)."""
    kvs, _ = await store.prefix_raw(store.keys.conflicts(node))
    found = {}
    for kv in kvs:
        try:
            conflict = ConflictRecord.from_value(*store.keys.conflict_of(kv.key), kv.value)
        except InvalidInput as exc:
            log.warning("skipping conflict record %s: %s", kv.key.decode(errors="replace"), exc)
            continue
        found[(conflict.node, conflict.address)] = conflict
    return found


async def read_view(store: EtcdStore, conflict: ConflictRecord, in_record: bool = True
                    ) -> ConflictView:
    """``conflict`` with fresh reads of its block and handles, and whether it holds
    (``in_record``: whether its node's record still has the attachment, if known)."""
    block = await store.block_containing(conflict.address)
    recorded = await store.get_handle(conflict.handle.id)
    holder = block.value.allocations.get(block.value.ordinal(conflict.address)) \
        if block is not None else None
    holder_handle = await store.get_handle(holder) if holder else None
    pools = [p.value for p in await store.list_pools()]
    state = standing(conflict, block.value if block is not None else None,
                     recorded.value if recorded is not None else None,
                     holder_handle.value if holder_handle is not None else None, pools,
                     in_record)
    return ConflictView(conflict, block, recorded, holder, holder_handle, state)


def unrecorded(block: Block, handle: Handle | None, recorded: set[tuple[str, IPAddress]]
               ) -> list[ConflictRecord]:
    """The contested addresses of ``block`` whose conflict record is gone (deleted by hand),
    as records, so that they can be listed and resolved like the others."""
    found = []
    for ordinal, (handle_id, node) in block.contested.items():
        address = block.address(ordinal)
        if (node, address) not in recorded:
            found.append(ConflictRecord(
                node, address, handle if handle is not None and handle.id == handle_id
                else Handle(handle_id, node, (HandleAddress(address, block.cidr),), {}),
                block.allocations.get(ordinal, ""), 0.0))
    return found


async def list_conflicts(store: EtcdStore) -> list[ConflictView]:
    """The recorded conflicts that still hold (and contested addresses whose record is
    gone), by node and address."""
    conflicts = list((await read_conflicts(store)).values())
    recorded = {(c.node, c.address) for c in conflicts}
    for block in await store.list_blocks():
        for conflict in unrecorded(block.value, None, recorded):
            handle = await store.get_handle(conflict.handle.id)
            conflicts.append(dataclasses.replace(conflict, handle=handle.value)
                             if handle is not None else conflict)
    views = [await read_view(store, c) for c in conflicts]
    return sorted((v for v in views if v.standing.holds),
                  key=lambda v: (v.conflict.node, v.conflict.address.version,
                                 int(v.conflict.address)))


async def resolve_conflict(store: EtcdStore, node: str, address: IPAddress,
                           keep: str | None) -> str:
    """Settle the conflict node ``node`` recorded for ``address``; what was done, one line.

    Refuses (InvalidInput) an unknown node, an address without a recorded
    conflict, and a conflict that still holds without ``keep``. Every write
    is guarded by the revisions read, so a pod deleted meanwhile makes it
    re-read and re-decide.
    """
    if keep is not None and keep not in KEEP_SIDES:
        raise InvalidInput(f"--keep {keep!r}: say record or datastore")

    async def attempt() -> tuple[Sequence[Write], str]:
        conflict = await _read_one(store, node, address)
        if conflict is None:
            return [DeleteConflict(node, address)], \
                f"removed the unreadable conflict record of {address} on node {node}"
        if conflict.resolved:
            return [], (f"already resolved for etcd's side: node {node}'s daemon forgets "
                        f"{conflict.handle.id} at its next check")
        view = await read_view(store, conflict)
        if not view.standing.holds:
            return [DeleteConflict(node, address)], f"conflict over ({view.standing.what}): " \
                "its record removed"
        if keep is None:
            raise InvalidInput(f"the conflict holds: {view.standing.what}; say which side "
                               f"keeps {address}: --keep record or --keep datastore")
        if keep == KEEP_RECORD:
            return await _keep_record(store, view), \
                f"{address} stays with {conflict.handle.id} (node {node}'s record)"
        return _keep_datastore(view), \
            f"{address} stays with {view.holder or 'etcd (free)'}; node {node} forgets it " \
            f"for {conflict.handle.id}"

    return await store.commit_with_retry(attempt, f"the conflict of {address} on node {node}")


async def _read_one(store: EtcdStore, node: str, address: IPAddress
                    ) -> ConflictRecord | None:
    """The conflict ``node`` recorded for ``address`` (or a contested address whose record
    is gone); None for a record that cannot be read. Raises InvalidInput naming what is
    missing: an unknown node, no conflict there."""
    raw = await store.get_raw(store.keys.conflict(node, address))
    if raw is not None:
        try:
            return ConflictRecord.from_value(node, str(address), raw[0])
        except InvalidInput:
            return None
    block = await store.block_containing(address)
    if block is not None:
        handle_id = block.value.contested.get(block.value.ordinal(address), ("", ""))[0]
        handle = await store.get_handle(handle_id) if handle_id else None
        found = unrecorded(block.value, handle.value if handle is not None else None, set())
        for conflict in found:
            if conflict.node == node and conflict.address == address:
                return conflict
    if await store.get_node(node) is None and not (
            await store.prefix_raw(store.keys.conflicts(node), keys_only=True))[0]:
        raise InvalidInput(f"unknown node {node!r}")
    raise InvalidInput(f"node {node} recorded no conflict for {address} "
                       "(see `topoipamctl ipam conflicts`)")


async def _keep_record(store: EtcdStore, view: ConflictView) -> list[Write]:
    """The recorded attachment takes the address; the pod etcd gave it to loses it."""
    conflict, address, now = view.conflict, view.conflict.address, time.time()
    identity = parked_identity(view.holder or "")
    if identity is not None:
        raise InvalidInput(f"{address} is parked for sticky identity {identity}: free it "
                           f"first (topoipamctl ipam release --identity {identity})")
    writes: list[Write] = []
    pools = [p.value for p in await store.list_pools()]
    if view.block is None:
        pool = allocator.pool_of(pools, address)
        if pool is None:
            raise InvalidInput(f"no pool contains {address}: create one that does first")
        block, revision = Block.empty(pool.block_of(address), conflict.node), 0
        writes.append(PutAffinity(conflict.node, block.cidr))
        writes += await range_writes(store, conflict.node, [(pool, block.cidr)])
    else:
        block, revision = view.block.value, view.block.mod_revision
    taken = block.copy()
    ordinal = taken.ordinal(address)
    taken.contested.pop(ordinal, None)
    if ordinal in taken.unallocated:
        taken.unallocated.remove(ordinal)
    taken.allocations[ordinal] = conflict.handle.id
    taken.released_at[ordinal] = now  # what tells the loser's node it was released
    writes += [PutBlock(taken, revision), DeleteConflict(conflict.node, address),
               *allocator.free_mark_writes(taken.cidr, view.block is not None
                                           and allocator.has_free(block, pools), taken, pools)]
    if view.holder_handle is not None:
        writes.append(_without(view.holder_handle, address))
    if view.recorded is None:
        # Only the node's record had it: its other addresses go back too, where free. A
        # record from before records named their attachment's addresses names only this.
        if not conflict.handle.addresses:
            conflict = dataclasses.replace(conflict, handle=dataclasses.replace(
                conflict.handle, addresses=(HandleAddress(address, taken.cidr),)))
        blocks = {taken.cidr: (taken, revision)}
        for entry in conflict.handle.addresses:
            if entry.ip == address:
                continue
            current = await store.block_containing(entry.ip)
            if current is None:
                raise InvalidInput(f"{entry.ip} of {conflict.handle.id} is in no block: "
                                   f"resolve its conflict first")
            base = blocks.get(current.value.cidr, (current.value, current.mod_revision))
            try:
                blocks[current.value.cidr] = (
                    allocator.reassert_address(base[0], entry.ip, conflict.handle.id), base[1])
            except AddressUnavailable as exc:
                raise InvalidInput(f"{entry.ip} of {conflict.handle.id} is held by "
                                   f"{exc.message} too: resolve that conflict first") from exc
        writes = [w for w in writes if not isinstance(w, PutBlock)]
        writes += [PutBlock(b, r) for b, r in blocks.values()]
        writes.append(PutHandle(conflict.handle, 0))
    return writes


def _keep_datastore(view: ConflictView) -> list[Write]:
    """The pod etcd gave the address to keeps it; the recorded attachment loses it."""
    conflict, address = view.conflict, view.conflict.address
    # The record stays, resolved, until the node's daemon has forgotten the attachment
    # (it deletes it then): where no block can say "released", only the record can.
    writes: list[Write] = [dataclasses.replace(conflict, resolved=KEEP_DATASTORE).as_write()]
    if view.recorded is None:
        return writes
    writes.append(_without(view.recorded, address))
    if view.block is not None:
        block = view.block.value.copy()
        ordinal = block.ordinal(address)
        block.contested.pop(ordinal, None)
        block.released_at[ordinal] = time.time()  # the node's record drops the handle by it
        writes.append(PutBlock(block, view.block.mod_revision))
    return writes


def _without(handle: Versioned[Handle], address: IPAddress) -> Write:
    """The handle without ``address`` (deleted with its last address), guarded."""
    rest = tuple(a for a in handle.value.addresses if a.ip != address)
    if rest:
        return PutHandle(dataclasses.replace(handle.value, addresses=rest), handle.mod_revision)
    return DeleteHandle(handle.value.id, handle.mod_revision)
