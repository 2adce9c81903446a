"""Watches: one etcd watch stream carrying watchers that come and go (the cache's feed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from aetcd import rpc

from ..core.errors import DatastoreUnavailable, TopoipamError
from .transport import EtcdTransport


class WatchStream:
    """One etcd watch stream carrying watchers that come and go.

    Each watcher has its own id (chosen by us) and start revision, and gets
    the events of its key range in revision order. Adding or cancelling one
    never restarts the others, so no event of a running watcher is lost or
    replayed. Iterating yields ``(watch_id, events)``; ``events`` is empty
    for the "created" confirmation. Raises :class:`WatchCompacted` when a
    start revision was compacted and DatastoreUnavailable when the stream
    breaks: the caller then relists.
    """

    def __init__(self, store: EtcdTransport) -> None:
        self._store = store
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled: set[int] = set()
        self._closed = False

    def add(self, watch_id: int, start: bytes, end: bytes, start_revision: int) -> None:
        self._requests.put_nowait(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=start, range_end=end, start_revision=start_revision, watch_id=watch_id,
            progress_notify=True)))

    def cancel(self, watch_id: int) -> None:
        self._cancelled.add(watch_id)
        self._requests.put_nowait(rpc.WatchRequest(
            cancel_request=rpc.WatchCancelRequest(watch_id=watch_id)))

    async def _request_stream(self) -> AsyncIterator[Any]:
        while True:
            item = await self._requests.get()
            if item is None:
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[tuple[int, list[Any]]]:
        store = self._store
        if store._channel is None:
            await store.connect()
        call = store._watch.Watch(self._request_stream(), metadata=store._metadata)
        try:
            async for response in call:
                watch_id = int(response.watch_id)
                if response.compact_revision:
                    raise WatchCompacted(int(response.compact_revision))
                if response.canceled:
                    if watch_id in self._cancelled:
                        self._cancelled.discard(watch_id)
                        continue
                    reason = response.cancel_reason or "no reason"
                    if "permission denied" in reason or "auth" in reason:
                        # The stream carries the token it was opened with; etcd refuses
                        # new watchers once that token expired.
                        raise WatchTokenExpired(f"etcd refused a watch: {reason}")
                    raise DatastoreUnavailable(f"etcd cancelled a watch: {reason}")
                if response.created:
                    yield watch_id, []
                elif response.events:
                    yield watch_id, list(response.events)
        except grpc.aio.AioRpcError as exc:
            raise DatastoreUnavailable(f"etcd watch broke: {exc.details()}") from exc
        finally:
            self._requests.put_nowait(None)
            call.cancel()
        raise DatastoreUnavailable("etcd closed the watch stream")


class WatchTokenExpired(DatastoreUnavailable):
    """A watch stream's auth token expired: reopen it with the current token."""


class WatchCompacted(TopoipamError):
    """A watch's start revision was compacted away: the cache must relist."""

    retriable = True

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch start revision was compacted (now at {compact_revision})")
        self.compact_revision = compact_revision
