"""Transactions: plain write values turned into one guarded etcd transaction.

The allocator decides what must change together (:mod:`topoipam.daemon.core.writes`);
:meth:`EtcdCommits.commit` turns it into one etcd transaction whose compares
guard every value that was read, plus the write gate's fence
(:mod:`topoipam.daemon.store.gate`). When a compare fails, the same round trip
returns the current values of the guarded keys, so the caller re-plans
without another read. :meth:`EtcdCommits.commit_with_retry` re-reads and
retries through the one retry policy (:mod:`topoipam.daemon.store.retry`).
The datastore's identity, which every client writes (or reads) before its
first commit, lives here too.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aetcd import rpc

from ..core import writes as ops
from ..core.errors import DatastoreUnavailable, InvalidInput
from ..core.keys import prefix_range_end
from ..core.model import IPPool, IPReservation, Node, Resource, encode
from ..core.writes import CommitResult, Versioned, Write
from .reads import EtcdReads, decode
from .retry import LOST_RACE, LostRace, retry_cas

log = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class DatastoreIdentity:
    """The datastore identity as read: ``id`` ("" when there is none, or it is unreadable:
    ``problem`` says why), whether the prefix holds no object at all, etcd's cluster ID,
    and the key's mod_revision (0: absent), which guards replacing it."""

    id: str
    empty: bool
    cluster_id: int
    revision: int
    problem: str = ""



class EtcdCommits(EtcdReads):
    """Guarded transactions of topoipam objects, and the datastore identity."""

    # ------------------------------------------------------------------ datastore identity
    async def read_datastore_identity(self) -> DatastoreIdentity:
        """This datastore's identity as stored (an etcd cluster and a prefix), no write.

        Read without the history watch: it is what tells a restore of this
        datastore (same identity) from another datastore.
        """
        key = self.keys.datastore()
        found = await self._call("Range", rpc.RangeRequest(key=key), observe=False)
        cluster = int(found.header.cluster_id)
        if found.kvs:
            kv = found.kvs[0]
            try:
                identity = decode(kv.value, "datastore identity").get("id")
                if isinstance(identity, str) and identity:
                    return DatastoreIdentity(identity, False, cluster, kv.mod_revision)
                problem = "no id"
            except InvalidInput as exc:
                problem = str(exc)
            return DatastoreIdentity("", False, cluster, kv.mod_revision,
                                     f"unreadable datastore identity at {key.decode()}: "
                                     f"{problem}")
        prefix = self.keys.prefix.encode() + b"/"
        objects = await self._call("Range", rpc.RangeRequest(
            key=prefix, range_end=prefix_range_end(prefix), keys_only=True, limit=1),
            observe=False)
        return DatastoreIdentity("", not objects.kvs, cluster, 0)

    async def write_datastore_identity(self, candidate: str, expect_revision: int) -> str:
        """Write ``candidate`` where the identity key is still at ``expect_revision`` (0:
        absent); the identity stored afterwards (another writer's, if it won the race)."""
        key = self.keys.datastore()
        target = (rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE,
                              create_revision=0) if not expect_revision else
                  rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                              mod_revision=expect_revision))
        response = await self._call("Txn", rpc.TxnRequest(
            compare=[target],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(
                key=key, value=encode({"id": candidate, "created": time.time()})))]),
            observe=False)
        if response.succeeded:
            self.datastore_id = candidate
            return candidate
        stored = await self.read_datastore_identity()
        if not stored.id:
            raise DatastoreUnavailable(f"the datastore identity at {key.decode()} changed "
                                       "concurrently; will retry")
        self.datastore_id = stored.id
        return stored.id

    async def ensure_datastore_identity(self) -> None:
        """A client's first write: an empty prefix gets an identity first. A prefix with
        objects but no readable identity (written before identities, or hand-edited) is left
        for a daemon, which can tell its own datastore by its node's record."""
        found = await self.read_datastore_identity()
        if found.id:
            self.datastore_id = found.id
        elif found.empty:
            await self.write_datastore_identity(uuid.uuid4().hex, 0)
        else:
            self.datastore_id = ""

    @staticmethod
    def _expected_revision(write: Write) -> int | None:
        """The mod_revision that guards ``write`` (0: its key must not exist yet), or None
        where nothing is compared."""
        match write:
            case (ops.PutBlock() | ops.DeleteBlock() | ops.PutHandle() | ops.DeleteHandle()
                  | ops.PutIdentity() | ops.DeleteIdentity() | ops.PutObject()
                  | ops.DeleteObject() | ops.PutTopologyRange() | ops.DeleteTopologyRange()):
                return write.expect_revision
        return None

    def _gaps(self, write: ops.NoBlocksIn) -> list[tuple[bytes, bytes]]:
        """The block key ranges inside ``write.cidr`` between the dropped blocks' keys."""
        low, end = self.keys.blocks_in(write.cidr)
        gaps = []
        for key in sorted(self.keys.block(cidr) for cidr in write.dropped):
            if low < key:
                gaps.append((low, key))
            low = key + b"\0"
        if low < end:
            gaps.append((low, end))
        return gaps

    def _object_key(self, obj: Resource) -> bytes:
        if isinstance(obj, IPPool):
            return self.keys.pool(obj.name)
        if isinstance(obj, Node):
            return self.keys.node(obj.name)
        if isinstance(obj, IPReservation):
            return self.keys.reservation(obj.name)
        return self.keys.config()

    def _named_key(self, kind: str, name: str) -> bytes:
        return {"pool": self.keys.pool, "node": self.keys.node,
                "reservation": self.keys.reservation}[kind](name)

    def _request_ops(self, write: Write) -> list[Any]:
        """The operations of one write: one, but two for a topology range (its holder key,
        guarded, and its value's listing, present only while the range has room)."""
        match write:
            case ops.PutTopologyRange(range=held, listed=listed):
                listing = self.keys.value_range(held.pool, held.value, held.cidr)
                return [self._request_op(write), rpc.RequestOp(request_put=rpc.PutRequest(
                    key=listing, value=encode(held.to_dict()))) if listed else
                    rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=listing))]
            case ops.DeleteTopologyRange(range=held):
                listing = self.keys.value_range(held.pool, held.value, held.cidr)
                return [self._request_op(write),
                        rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=listing))]
            case ops.DeleteTopologyRangesOf(pool=pool, cidr=cidr):
                start, end = self.keys.topology_ranges_in(cidr)
                listings = self.keys.pool_value_ranges(pool)
                return [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                            key=start, range_end=end)),
                        rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                            key=listings, range_end=prefix_range_end(listings)))]
        return [self._request_op(write)]

    def _key_value(self, write: Write) -> tuple[bytes, bytes | None]:
        """The key ``write`` changes and the value it puts there (None: it deletes the key)."""
        match write:
            case ops.PutBlock(block=block):
                return self.keys.block(block.cidr), encode(block.to_dict())
            case ops.DeleteBlock(cidr=cidr):
                return self.keys.block(cidr), None
            case ops.PutAffinity(node=node, cidr=cidr):
                return self.keys.affinity(node, cidr), b"{}"
            case ops.DeleteAffinity(node=node, cidr=cidr):
                return self.keys.affinity(node, cidr), None
            case ops.PutFreeMark(cidr=cidr, node=node):
                return self.keys.free_block(cidr), encode({"node": node})
            case ops.DeleteFreeMark(cidr=cidr):
                return self.keys.free_block(cidr), None
            case ops.PutRoomMark(window=window):
                return self.keys.room(window), b"{}"
            case ops.DeleteRoomMark(window=window):
                return self.keys.room(window), None
            case ops.PutHandle(handle=handle):
                return self.keys.handle(handle.id), handle.value
            case ops.DeleteHandle(handle_id=handle_id):
                return self.keys.handle(handle_id), None
            case ops.PutIdentity(identity=identity):
                return self.keys.identity(identity.id), encode(identity.to_dict())
            case ops.DeleteIdentity(identity_id=identity_id):
                return self.keys.identity(identity_id), None
            case ops.PutConflict(node=node, address=address, value=value):
                return self.keys.conflict(node, address), value
            case ops.DeleteConflict(node=node, address=address):
                return self.keys.conflict(node, address), None
            case ops.PutObject(obj=obj):
                return self._object_key(obj), encode(obj.to_dict())
            case ops.DeleteObject(kind=kind, name=name):
                return self._named_key(kind, name), None
            case ops.PutTopologyRange(range=held):
                return self.keys.topology_range(held.cidr), encode(held.to_dict())
            case ops.DeleteTopologyRange(range=held):
                return self.keys.topology_range(held.cidr), None
        raise TypeError(f"unknown write {write!r}")

    def _request_op(self, write: Write) -> Any:
        """The put or delete that carries out ``write``."""
        if isinstance(write, ops.DeleteRoomMarksIn):  # a range: every entry inside the cidr
            start, end = self.keys.room_in(write.cidr)
            return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                key=start, range_end=end))
        key, value = self._key_value(write)
        if value is None:
            return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))
        return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))

    async def commit_with_retry(
        self, attempt: Callable[[], Awaitable[tuple[Sequence[Write], R]]], what: str, *,
        reassert: bool = False,
    ) -> R:
        """Read, decide and commit until the commit's guards hold.

        ``attempt`` reads what it needs, validates, and returns the guarded
        writes with the value to return once they are committed (no writes:
        nothing to do, return at once). A lost race runs it again from fresh
        reads (:func:`~topoipam.daemon.store.retry.retry_cas`); when it keeps
        losing, :class:`Conflict` (retriable) names ``what``. ``reassert`` is
        passed to :meth:`commit` (the node's record re-asserted while paused).
        """
        async def round_() -> R | LostRace:
            writes, value = await attempt()
            if not writes or (await self.commit(writes, reassert=reassert)).succeeded:
                return value
            return LOST_RACE

        return await retry_cas(round_, what)

    async def commit(self, writes: Iterable[Write], *, reassert: bool = False,
                     fenced: bool = True) -> CommitResult:
        """Apply ``writes`` atomically if every guarded key is still at its expected revision.

        Each guarded key is compared on ``mod_revision`` (0 means "must not
        exist"). On a failed compare nothing is written and the result
        carries the current values of the guarded blocks and handles.
        Raises DatastoreUnavailable if etcd cannot be reached; in that case
        the transaction may or may not have been applied, which callers
        resolve by re-reading (an allocation is acknowledged only on success).

        A fenced store (the daemon's) refuses with :class:`NodeFenced` before
        sending when it does not hold its fence, and compares the fence key's
        lease in the same transaction: if the fence is gone, nothing is
        written and NodeFenced is raised. While writes are paused for a
        re-assertion, only commits with ``reassert`` pass. ``fenced=False``
        is for the node's registration, which any daemon may do (create-only).
        """
        writes = list(writes)
        if self.datastore_id is None:  # the first write of this client: identity first
            await self.ensure_datastore_identity()
        compares = []
        guarded: list[bytes] = []
        fence = self.gate.admit(reassert) if fenced else None
        if fence is not None:
            compares.append(rpc.Compare(key=fence.key, result=rpc.Compare.EQUAL,
                                        target=rpc.Compare.LEASE, lease=fence.lease))
        for write in writes:
            if isinstance(write, ops.PoolsUnchangedSince):
                prefix = self.keys.pools()
                compares.append(rpc.Compare(
                    key=prefix, range_end=prefix_range_end(prefix), result=rpc.Compare.LESS,
                    target=rpc.Compare.MOD, mod_revision=write.revision + 1))
                continue
            if isinstance(write, ops.PoolUnchanged):
                compares.append(rpc.Compare(
                    key=self.keys.pool(write.name), result=rpc.Compare.EQUAL,
                    target=rpc.Compare.MOD, mod_revision=write.revision))
                continue
            if isinstance(write, ops.RangeHeld):
                compares.append(rpc.Compare(
                    key=self.keys.topology_range(write.cidr), result=rpc.Compare.EQUAL,
                    target=rpc.Compare.MOD, mod_revision=write.expect_revision))
                continue
            if isinstance(write, ops.NoBlocksIn):
                compares += [rpc.Compare(key=low, range_end=high, result=rpc.Compare.EQUAL,
                                         target=rpc.Compare.CREATE, create_revision=0)
                             for low, high in self._gaps(write)]
                continue
            if isinstance(write, ops.DaemonAbsent):
                compares.append(rpc.Compare(
                    key=self.keys.daemon(write.node), result=rpc.Compare.EQUAL,
                    target=rpc.Compare.CREATE, create_revision=0))
                if write.noted_revision:
                    compares.append(rpc.Compare(
                        key=self.keys.daemon_absence(write.node), result=rpc.Compare.EQUAL,
                        target=rpc.Compare.MOD, mod_revision=write.noted_revision))
                continue
            revision = self._expected_revision(write)
            if revision is None:
                continue
            key = self._key_value(write)[0]
            if key in guarded:
                continue
            guarded.append(key)
            compares.append(rpc.Compare(
                key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=revision))
        request = rpc.TxnRequest(
            compare=compares,
            success=[op for w in writes
                     if not isinstance(w, ops.PoolsUnchangedSince | ops.PoolUnchanged
                                       | ops.DaemonAbsent | ops.RangeHeld | ops.NoBlocksIn)
                     for op in self._request_ops(w)],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k))
                     for k in (*guarded, *([fence.key] if fence is not None else []))],
        )
        response = await self._call("Txn", request)
        revision = int(response.header.revision)
        if response.succeeded:
            self.gate.committed(writes, revision)
            return CommitResult(True, revision)
        responses = list(response.responses)
        if fence is not None:
            self.gate.refused(fence, responses.pop().response_range.kvs)
        result = CommitResult(False, revision)
        for key, op in zip(guarded, responses, strict=True):
            kvs = op.response_range.kvs
            kind, _ = self.keys.kind_of(key)
            try:
                if kind == "blocks":
                    cidr = self.keys.block_cidr(key)
                    result.blocks[cidr] = (
                        Versioned(self.decode_block(key, kvs[0].value), kvs[0].mod_revision)
                        if kvs else None
                    )
                elif kind == "handles":
                    handle_id = self.keys.name_of(key)
                    result.handles[handle_id] = (
                        Versioned(self.decode_handle(key, kvs[0].value), kvs[0].mod_revision)
                        if kvs else None
                    )
            except InvalidInput as exc:
                log.warning("corrupt value at %s: %s", key.decode(errors="replace"), exc)
        return result
