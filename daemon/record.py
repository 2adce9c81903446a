"""The node-local record of this node's live allocations, and their re-assertion.

etcd is the source of truth, except when it goes back in time: restored
from a snapshot taken before the last N allocations, it no longer knows
addresses that N running pods still use, and would hand them out again. The
daemon therefore keeps, in ``--state-dir``, the handles it committed for its
node and the newest etcd revision and cluster ID it saw
(:class:`AllocationRecord`). When etcd's history moves backwards
(:class:`topoipam.daemon.store.EtcdHistory`), it stops writing, puts back
every recorded handle etcd lost (:func:`reassert_allocations`) and reports
each address that meanwhile went to another handle as a conflict
(``conflicts/<node>/<ip>``, shown by ``topoipamctl ipam check``) instead of
handing it out twice; then it serves again.

Off the pod's critical path: a commit only appends a line to an in-memory
list (:meth:`AllocationRecord.note`); a background task writes and
fdatasyncs the lines in a worker thread a few milliseconds later. A daemon
killed inside that window loses the newest entries of its record (etcd
still has them, so only a restore *and* that crash together lose them).

The file is a journal of JSON lines (``put``, ``del``, ``rev``), rewritten
compactly (write, fsync, rename) when it grows past a few times its live
content. Handles the operator released behind the daemon's back (``ipam
release``) stay in the record until the daemon next starts, when recorded
handles missing from a non-restored etcd are dropped. The operator's view:
docs/operations.md#backups-and-restores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from topoipam.proto import cjson

from .core import allocator
from .core.conflicts import KEEP_DATASTORE, ConflictRecord
from .core.errors import AddressUnavailable, InvalidInput
from .core.holdings import (
    Block,
    Handle,
)
from .core.model import (
    IPAddress,
    IPNetwork,
    IPPool,
    encode,
)
from .core.writes import (
    DeleteConflict,
    DeleteHandle,
    PutAffinity,
    PutBlock,
    PutConflict,
    PutHandle,
    Write,
)
from .planning import range_writes
from .resolve import read_conflicts, read_view
from .store import EtcdStore

log = logging.getLogger(__name__)

FLUSH_DELAY = 0.005
REV_INTERVAL = 1.0


class AllocationRecord:
    """This node's handles as last committed by this daemon, plus etcd's newest revision.

    Single-threaded use from the event loop; the file writes happen in a
    worker thread, one batch at a time.
    """

    def __init__(self, path: str, node: str) -> None:
        self.path = path
        self.node = node
        self.handles: dict[str, Handle] = {}
        #: When each handle was committed (wall clock), to tell a release from a loss.
        self.since: dict[str, float] = {}
        self.revision = 0
        self.cluster_id = 0
        #: The datastore identity this record belongs to ("": not known yet, or a
        #: record written before identities); it is put back into that one only.
        self.datastore = ""
        self._pending: list[bytes] = []
        self._lines = 0
        self._written_revision = 0
        self._wakeup = asyncio.Event()
        #: Held while a batch is written in a worker thread (and while the file is set aside).
        self._writing = asyncio.Lock()
        self._fd: int | None = None
        self.flushes = 0
        #: Where the newest (revision, cluster ID) seen comes from (the store's history).
        self.current: Callable[[], tuple[int, int]] | None = None

    # ------------------------------------------------------------------ load
    def load(self) -> None:
        """Replay the journal (a torn last line is ignored)."""
        try:
            with open(self.path, "rb") as source:
                lines = source.read().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
                if "put" in entry:
                    handle = Handle.from_dict(entry["id"], entry["put"])
                    self.handles[handle.id] = handle
                    self.since[handle.id] = float(entry.get("at", 0.0))
                elif "del" in entry:
                    self.handles.pop(entry["del"], None)
                    self.since.pop(entry["del"], None)
                elif "rev" in entry:
                    self.revision = int(entry["rev"])
                    self.cluster_id = int(entry.get("cluster", 0))
                elif "datastore" in entry:
                    self.datastore = str(entry["datastore"])
            except (ValueError, KeyError, TypeError, InvalidInput):
                log.warning("skipping an unreadable line of %s", self.path)
        self._lines = len(lines)
        self._written_revision = self.revision

    # ------------------------------------------------------------------ record
    def note(self, writes: Sequence[Write], revision: int) -> None:
        """Record what a successful commit changed for this node: cheap, no I/O."""
        now = time.time()
        for write in writes:
            if isinstance(write, PutHandle) and write.handle.node == self.node:
                self.handles[write.handle.id] = write.handle
                self.since[write.handle.id] = now
                # The value the commit sent to etcd, not encoded a second time.
                self._pending.append(b'{"id":%b,"at":%b,"put":%b}' % (
                    cjson.dumps(write.handle.id).encode(), repr(now).encode(), write.handle.value))
            elif isinstance(write, DeleteHandle) and write.handle_id in self.handles:
                del self.handles[write.handle_id]
                self.since.pop(write.handle_id, None)
                self._pending.append(encode({"del": write.handle_id}))
        if self._pending:
            self._wakeup.set()

    def adopt(self, datastore: str) -> None:
        """Say which datastore this record belongs to (written with the next flush)."""
        self.datastore = datastore
        self._pending.append(encode({"datastore": datastore}))
        self._wakeup.set()

    async def set_aside(self, datastore: str) -> str:
        """Keep the record's file aside (renamed, not deleted) and start an empty record
        that belongs to ``datastore``. Returns the file's new name ("" if there was none).
        Waits for a write in progress (the worker thread holds the file meanwhile)."""
        async with self._writing:
            return self._set_aside(datastore)

    def _set_aside(self, datastore: str) -> str:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        aside = ""
        if os.path.exists(self.path):
            aside = f"{self.path}.{self.datastore or 'unknown'}.{int(time.time())}.aside"
            os.replace(self.path, aside)
        self.handles.clear()
        self.since.clear()
        self.revision = self.cluster_id = self._written_revision = self._lines = 0
        self._pending = []
        self.adopt(datastore)
        return aside

    def forget(self, handle_id: str) -> None:
        self.since.pop(handle_id, None)
        if self.handles.pop(handle_id, None) is not None:
            self._pending.append(encode({"del": handle_id}))
            self._wakeup.set()

    # ------------------------------------------------------------------ writing
    async def run(self) -> None:
        """Write pending entries soon after they are noted, and the revision every second."""
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), REV_INTERVAL)
                await asyncio.sleep(FLUSH_DELAY)  # gather what a burst commits meanwhile
            except TimeoutError:
                pass
            self._wakeup.clear()
            await self.flush()

    async def flush(self) -> None:
        if self.current is not None:
            self.revision, self.cluster_id = self.current()
        if self.revision != self._written_revision:
            self._pending.append(encode({"rev": self.revision, "cluster": self.cluster_id}))
            self._written_revision = self.revision
        if not self._pending:
            return
        async with self._writing:
            lines, self._pending = self._pending, []
            if self._lines + len(lines) > 4 * len(self.handles) + 1000:
                snapshot = self._snapshot_lines()
                await asyncio.to_thread(self._rewrite, snapshot)
                self._lines = len(snapshot)
            else:
                await asyncio.to_thread(self._append, lines)
                self._lines += len(lines)
            self.flushes += 1

    def flush_sync(self) -> None:
        """The last flush, at close."""
        if self.current is not None:
            self.revision, self.cluster_id = self.current()
        if self.revision != self._written_revision:
            self._pending.append(encode({"rev": self.revision, "cluster": self.cluster_id}))
            self._written_revision = self.revision
        if self._pending:
            lines, self._pending = self._pending, []
            self._append(lines)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _snapshot_lines(self) -> list[bytes]:
        return [*([encode({"datastore": self.datastore})] if self.datastore else []),
                *(encode({"id": h.id, "at": self.since.get(h.id, 0.0), "put": h.to_dict()})
                  for h in self.handles.values()),
                encode({"rev": self.revision, "cluster": self.cluster_id})]

    def _append(self, lines: list[bytes]) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        os.write(self._fd, b"".join(line + b"\n" for line in lines))
        os.fdatasync(self._fd)

    def _rewrite(self, lines: list[bytes]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as target:
            target.write(b"".join(line + b"\n" for line in lines))
            target.flush()
            os.fsync(target.fileno())
        os.replace(tmp, self.path)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class Reassertion:
    """What a re-assertion did: handles put back, already present, dropped; conflicts."""

    restored: list[str] = field(default_factory=list)
    present: int = 0
    dropped: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    #: Recorded conflicts of this node that still hold after the check.
    open_conflicts: int = 0


async def reassert_allocations(store: EtcdStore, record: AllocationRecord,
                               went_back: bool, settle: bool = True) -> Reassertion:
    """Make etcd hold every recorded handle again, or report why it cannot.

    A recorded handle missing from etcd was either released behind the
    daemon's back (``topoipamctl ipam release``, ``delete node --force``: its
    block then shows the address released *after* the handle was recorded, or
    its conflict ended) and is dropped from the record, or lost by etcd (its
    block is missing, or shows no such release): then it is put back with its
    addresses, blocks and affinities in one guarded transaction per handle (a
    block etcd lost is created again, affine to this node, as the pool that
    contains the address carves it now). With ``went_back`` (etcd's revision
    or cluster ID moved backwards) every missing handle counts as lost.

    An address another handle holds meanwhile is never handed out twice: the
    handle is put back all the same, the address is marked contested in its
    block (whichever pod is deleted first, the other keeps it) and a conflict
    is recorded in the same transaction; so is an address no pool contains
    (the handle lists it; it is placed once a pool contains it again: a handle
    present with a recorded conflict is completed the same way). A handle the
    operator resolved for etcd's side (``ipam resolve-conflict --keep
    datastore``) is forgotten. With ``settle``, recorded conflicts of this node
    that ended are deleted. Commits use ``reassert=True``: they pass while
    ordinary writes are paused, but are fenced like every other write.
    """
    outcome = Reassertion()
    recorded = await read_conflicts(store, record.node)
    for conflict in recorded.values():
        if conflict.resolved == KEEP_DATASTORE and conflict.handle.id in record.handles:
            record.forget(conflict.handle.id)
            outcome.dropped.append(conflict.handle.id)
    for handle in list(record.handles.values()):
        conflicts = [c for c in recorded.values() if c.handle.id == handle.id]
        current = await store.get_handle(handle.id)
        if current is not None:
            outcome.present += 1
            if conflicts:  # an address of it may have a place now
                await _reassert_one(store, record.node, current.value, conflicts,
                                    current.mod_revision)
            continue
        if not went_back:
            if conflicts:
                views = [await read_view(store, c) for c in conflicts]
                released = not any(v.standing.holds for v in views)
            else:
                released = await _moved_on(store, handle) or await _released_since(
                    store, handle, record.since.get(handle.id, 0))
            if released:
                record.forget(handle.id)
                outcome.dropped.append(handle.id)
                continue
        found = await _reassert_one(store, record.node, handle, conflicts, 0)
        if found is None:
            outcome.restored.append(handle.id)
        else:
            outcome.conflicts += found
    if settle:
        outcome.open_conflicts = await settle_conflicts(store, record)
    return outcome


async def _moved_on(store: EtcdStore, handle: Handle) -> bool:
    """Whether ``handle``'s sticky identity was parked from it or taken over since: its
    record says so, whatever the clocks of the hosts that did it."""
    identity_id = handle.attributes.get("identity")
    if not identity_id:
        return False
    identity = await store.get_identity(identity_id)
    return identity is not None and (identity.value.parked
                                     or identity.value.handle != handle.id)


async def _released_since(store: EtcdStore, handle: Handle, since: float) -> bool:
    """Whether some address of ``handle`` was released after ``since`` (by whoever)."""
    for entry in handle.addresses:
        block = await store.block_containing(entry.ip)
        if block is None:
            continue
        if block.value.released_at.get(block.value.ordinal(entry.ip), 0.0) >= since:
            return True
    return False


async def _reassert_one(store: EtcdStore, node: str, handle: Handle,
                        recorded: Sequence[ConflictRecord], revision: int) -> list[str] | None:
    """Make the blocks give ``handle`` its addresses; None when all went back clean, else
    the conflicts it met. ``revision`` 0: the handle is missing and is put back; else it is
    present at that revision and only its blocks change (nothing is written if none does).
    A conflict already ``recorded`` is neither written nor logged again."""
    known = {c.address for c in recorded}

    def report(address: IPAddress, holder: str, now: float) -> list[Write]:
        return [] if address in known else [_conflict_write(node, address, handle, holder, now)]

    async def attempt() -> tuple[Sequence[Write], list[str] | None]:
        current = await store.get_handle(handle.id)
        if (current is not None) != bool(revision) or (
                current is not None and current.mod_revision != revision):
            return [], None  # put back, or changed, meanwhile: the next check sees it
        writes: list[Write] = []
        found: list[str] = []
        entries = []
        blocks: dict[IPNetwork, tuple[Block, int, Block | None]] = {}
        pools: list[IPPool] | None = None
        made: list[tuple[IPPool, IPNetwork]] = []  # blocks etcd lost, made again
        now = time.time()
        for entry in handle.addresses:
            existing = await store.block_containing(entry.ip)
            if existing is not None:
                cidr = existing.value.cidr
                blocks.setdefault(cidr, (existing.value, existing.mod_revision, existing.value))
            else:
                pools = pools if pools is not None else [
                    p.value for p in await store.list_pools()]
                pool = allocator.pool_of(pools, entry.ip)
                if pool is None:  # listed, placed nowhere, until a pool contains it again
                    writes += report(entry.ip, "", now)
                    found.append(f"{entry.ip} of {handle.id} is in no pool any more")
                    entries.append(entry)
                    continue
                cidr = pool.block_of(entry.ip)
                if cidr not in blocks:
                    blocks[cidr] = (Block.empty(cidr, node), 0, None)
                    writes.append(PutAffinity(node, cidr))
                    made.append((pool, cidr))
            entries.append(dataclasses.replace(entry, block=cidr))
            block, guard, before = blocks[cidr]
            try:
                blocks[cidr] = (allocator.reassert_address(block, entry.ip, handle.id), guard,
                                before)
            except AddressUnavailable as exc:
                holder = exc.message
                ordinal = block.ordinal(entry.ip)
                marked = block.contested.get(ordinal)
                if marked is not None and marked[0] != handle.id:
                    # Contested for a third attachment already: listed and reported only.
                    writes += report(entry.ip, holder, now)
                    found.append(f"{entry.ip} of {handle.id} is held by {holder} and "
                                 f"contested by {marked[0]} (node {marked[1]})")
                    continue
                if marked is None:
                    contest = block.copy()
                    contest.contested[ordinal] = (handle.id, node)
                    blocks[cidr] = (contest, guard, before)
                    writes.append(_conflict_write(node, entry.ip, handle, holder, now))
                    found.append(f"{entry.ip} of {handle.id} is held by {holder} since etcd "
                                 "went back")
        changed = [(b, g, before) for b, g, before in blocks.values() if b is not before]
        put = dataclasses.replace(handle, addresses=tuple(entries))
        if revision and not changed and put == handle:
            return [], found or None
        if changed and pools is None:
            pools = [p.value for p in await store.list_pools()]
        for b, g, before in changed:  # the free-block index entry changes with its block
            writes += [PutBlock(b, g), *allocator.free_mark_writes(
                b.cidr, before is not None and allocator.has_free(before, pools or []), b,
                pools or [])]
        writes += await range_writes(store, node, made)  # their topology ranges with them
        writes.append(PutHandle(put, revision))
        return writes, found or None

    async def attempt_noting_writes(
    ) -> tuple[Sequence[Write], tuple[Sequence[Write], list[str] | None]]:
        writes, found = await attempt()
        return writes, (writes, found)  # what was written decides what is logged

    # Re-assertion commits pass while ordinary writes are paused (``reassert``).
    writes, found = await store.commit_with_retry(
        attempt_noting_writes, f"the allocation {handle.id} being re-asserted", reassert=True)
    if found and any(isinstance(w, PutConflict) for w in writes):
        log.error("conflict after etcd went back, on node %s: %s; recorded for "
                  "`topoipamctl ipam conflicts`", node, "; ".join(found))
    return found


def _conflict_write(node: str, address: IPAddress, handle: Handle, holder: str,
                    now: float) -> PutConflict:
    return ConflictRecord(node, address, handle, holder, now).as_write()


async def settle_conflicts(store: EtcdStore, record: AllocationRecord) -> int:
    """Delete this node's recorded conflicts that ended; the number that still hold."""
    still = 0
    for conflict in (await read_conflicts(store, record.node)).values():
        if conflict.resolved == KEEP_DATASTORE and conflict.handle.id in record.handles:
            still += 1  # forgotten at the next re-assertion, then deleted
            continue
        state = (await read_view(store, conflict, conflict.handle.id in record.handles)).standing
        if state.holds:
            still += 1
            continue
        await store.commit([DeleteConflict(conflict.node, conflict.address)], reassert=True)
        log.info("conflict over: %s", state.what)
    return still
