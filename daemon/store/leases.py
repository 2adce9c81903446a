"""Leases: the node's fence key, lease keep-alives, and the record of a node's absence.

:meth:`EtcdLeases.claim_node` puts ``daemons/<node>`` on the daemon's own
lease (the fence the write gate compares, :mod:`topoipam.daemon.store.gate`;
kept by :mod:`topoipam.daemon.fence`); :meth:`EtcdLeases.daemon_absence`
tells for how long a node has had no live daemon, by etcd's clock (a lease of
its own), which decides when a sticky identity may be taken over.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import grpc.aio
from aetcd import rpc

from ..core.errors import DatastoreUnavailable, EtcdOutOfSpace, InvalidInput
from ..core.model import encode
from ..core.view import DaemonAbsence
from .reads import decode
from .retry import LOST_RACE, LostRace, retry_cas
from .transport import EtcdTransport

# The lease of a node's absence record: its age is the lease's (see daemon_absence).
# A month: a node gone longer is noted afresh (a later takeover, never an earlier one).
ABSENCE_LEASE_SECONDS = 30 * 24 * 3600


class EtcdLeases(EtcdTransport):
    """etcd leases and the keys on them: a node's fence, a node's absence."""

    async def _lease_call(self, method: str, request: Any, what: str) -> Any:
        """One unary call of etcd's Lease service, connecting first if need be. A failure is
        DatastoreUnavailable naming ``what`` (EtcdOutOfSpace under the NOSPACE alarm)."""
        if self._channel is None:
            await self.connect()
        try:
            return await getattr(rpc.LeaseStub(self._channel), method)(
                request, timeout=self.options.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            self.on_error()
            details = exc.details() or ""
            if "space exceeded" in details:
                raise EtcdOutOfSpace(details) from exc
            raise DatastoreUnavailable(f"etcd {what} failed: {details}") from exc

    async def grant_lease(self, ttl: int) -> int:
        """A fresh etcd lease of ``ttl`` seconds; returns its id."""
        grant = await self._lease_call("LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl),
                                       "lease grant")
        return int(grant.ID)

    async def claim_node(self, node: str, info: dict[str, Any], lease: int
                         ) -> tuple[bool, dict[str, Any], int]:
        """Put ``daemons/<node>`` (the node's fence) on ``lease``, if nobody else holds it.

        It is ours to take when it is absent (created with create_revision 0),
        already on ``lease``, or names our own ``instance`` on our own host
        (a previous incarnation of this daemon, killed before its lease
        expired: taking it over is what lets a restart serve at once). Each
        case is one guarded transaction, so two daemons racing for a free
        node cannot both win. Returns (claimed, the holder's record, the
        lease the key was on before; 0 if it was absent).
        """
        key = self.keys.daemon(node)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=encode(info), lease=lease))
        # The node is alive again: its absence record goes with the same transaction.
        forget = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
            key=self.keys.daemon_absence(node), prev_kv=True))

        async def round_() -> tuple[bool, dict[str, Any], int] | LostRace:
            response = await self._call("Txn", rpc.TxnRequest(
                compare=[rpc.Compare(key=key, result=rpc.Compare.EQUAL,
                                     target=rpc.Compare.CREATE, create_revision=0)],
                success=[put, forget],
                failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))]))
            if response.succeeded:
                await self._revoke_absence_lease(response)
                return True, info, 0
            kvs = response.responses[0].response_range.kvs
            if not kvs:
                return LOST_RACE  # it expired meanwhile: try the create again
            kv = kvs[0]
            try:
                holder = decode(kv.value, f"daemon record of {node}")
            except InvalidInput:
                holder = {}
            ours = int(kv.lease) == lease or (
                holder.get("instance") == info.get("instance")
                and holder.get("host") == info.get("host"))
            if not ours:
                return False, holder, int(kv.lease)
            response = await self._call("Txn", rpc.TxnRequest(
                compare=[rpc.Compare(key=key, result=rpc.Compare.EQUAL,
                                     target=rpc.Compare.MOD, mod_revision=kv.mod_revision)],
                success=[put, forget]))
            if response.succeeded:
                await self._revoke_absence_lease(response)
                return True, holder, int(kv.lease)
            return LOST_RACE

        return await retry_cas(round_, f"the fence of node {node}")

    async def keep_lease_alive(self, lease: int) -> bool:
        """Refresh ``lease`` once; False if etcd no longer knows it (expired)."""
        if self._channel is None:
            await self.connect()
        try:
            call = rpc.LeaseStub(self._channel).LeaseKeepAlive(
                timeout=self.options.timeout, metadata=self._metadata)
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
            response = await call.read()
            await call.done_writing()
            call.cancel()
        except grpc.aio.AioRpcError as exc:
            self.on_error()
            raise DatastoreUnavailable(f"etcd lease keep-alive failed: {exc.details()}") from exc
        return response is not grpc.aio.EOF and int(response.TTL) > 0

    async def revoke_lease(self, lease: int) -> None:
        """Revoke ``lease`` and the keys on it (none before the first connection)."""
        if self._channel is None:
            return
        await self._lease_call("LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease), "lease revoke")

    async def _revoke_absence_lease(self, response: Any) -> None:
        """Revoke the lease of the absence record a fence claim deleted (else it would
        linger, empty, for ABSENCE_LEASE_SECONDS)."""
        for kv in response.responses[1].response_delete_range.prev_kvs:
            if kv.lease:
                try:
                    await self.revoke_lease(int(kv.lease))
                except DatastoreUnavailable:
                    pass  # it expires by itself

    async def forget_absence(self, node: str) -> None:
        """Delete ``node``'s absence record and its lease (the node is retired)."""
        response = await self._call("Txn", rpc.TxnRequest(success=[
            rpc.RequestOp(request_range=rpc.RangeRequest(key=self.keys.daemon_absence(node))),
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                key=self.keys.daemon_absence(node), prev_kv=True))]))
        await self._revoke_absence_lease(response)

    async def daemon_absence(self, node: str, note: bool = True) -> DaemonAbsence | None:
        """None while ``node`` has a live daemon (``daemons/<node>`` exists); else for
        how long its absence has been known.

        etcd does not keep the time the fence key vanished (its lease expired), so
        the first reader that finds it absent notes it (``note``): ``absent/<node>``
        on an etcd lease of its own, created only while the fence key is still
        absent, and deleted by :meth:`claim_node` in the transaction that brings a
        daemon back. Its age is the lease's granted TTL less what remains of it, as
        etcd counts it: no host's clock is read, so clock skew between hosts does
        not matter, and the record survives any daemon's restart. An etcd leader
        change renews leases, which only makes the record younger (a takeover
        later, never earlier). Age is in whole seconds, rounded down.
        """
        fence, record = self.keys.daemon(node), self.keys.daemon_absence(node)
        absent = rpc.Compare(key=fence, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE,
                             create_revision=0)

        async def round_() -> DaemonAbsence | None | LostRace:
            response = await self._call("Txn", rpc.TxnRequest(
                compare=[absent], success=[rpc.RequestOp(request_range=rpc.RangeRequest(
                    key=record))]))
            if not response.succeeded:
                return None
            kvs = response.responses[0].response_range.kvs
            if kvs:
                age = await self._lease_age(int(kvs[0].lease))
                if age is not None:
                    return DaemonAbsence(node, age, int(kvs[0].mod_revision))
                return LOST_RACE  # its lease ran out just now: the key goes too
            if not note:
                return DaemonAbsence(node, None, 0)
            lease = await self.grant_lease(ABSENCE_LEASE_SECONDS)
            response = await self._call("Txn", rpc.TxnRequest(
                compare=[absent, rpc.Compare(key=record, result=rpc.Compare.EQUAL,
                                             target=rpc.Compare.CREATE, create_revision=0)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(
                    key=record, value=encode({"noted": time.time()}), lease=lease))]))
            if not response.succeeded:  # noted by another meanwhile, or the daemon is back
                await self.revoke_lease(lease)
            return LOST_RACE  # read what is noted now (ours or another's)

        return await retry_cas(round_, f"the absence record of node {node}")

    async def _lease_age(self, lease: int) -> float | None:
        """Seconds since ``lease`` was granted (or last renewed), or None once it expired."""
        alive = await self._lease_call("LeaseTimeToLive", rpc.LeaseTimeToLiveRequest(ID=lease),
                                       "lease lookup")
        if int(alive.TTL) < 0:
            return None
        # etcd reports the remaining TTL rounded down to a whole second: take one more
        # off, so the age is never more than it really is.
        return float(max(0, int(alive.grantedTTL) - int(alive.TTL) - 1))

    async def get_daemon(self, node: str) -> dict[str, Any] | None:
        """What the running daemon of ``node`` announced, or None if none is alive."""
        raw = await self.get_raw(self.keys.daemon(node))
        if raw is None:
            return None
        try:
            return decode(raw[0], f"daemon record of {node}")
        except InvalidInput:
            return {}
