"""The daemon's watch-synced copy of what its node needs from etcd.

One writer task lists config, pools, reservations, this node and this node's
affine blocks at one revision, then watches those keys from the next
revision. After a compaction or a broken watch it marks itself out of sync
and relists. While out of sync, :meth:`state` raises NotReady so the daemon
answers "try again" instead of acting on stale data.

The cache is only a copy: every write the engine makes is guarded by
mod_revision compares in etcd, so a stale block costs one failed transaction
(whose reply refreshes the block through :meth:`observe`), never a double
allocation. Other nodes' blocks are not read or watched here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .core.allocator import Reservations
from .core.errors import DatastoreUnavailable, InvalidInput, NotReady
from .core.holdings import Block
from .core.keys import prefix_range_end
from .core.model import (
    IPAMConfig,
    IPNetwork,
    IPPool,
    IPReservation,
)
from .core.view import ClusterState, ReadingView
from .core.writes import Versioned
from .store import (
    EtcdStore,
    WatchCompacted,
    WatchStream,
    WatchTokenExpired,
)

log = logging.getLogger(__name__)

RELIST_BACKOFF = (0.05, 0.1, 0.2, 0.4, 0.5)


class NodeCache:
    """Config, pools, reservations, this node's labels and affine blocks, kept current."""

    def __init__(
        self,
        store: EtcdStore,
        node: str,
        on_change: Callable[[], None] | None = None,
        on_sync_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.store = store
        self.node = node
        self.keys = store.keys
        self._on_change = on_change or (lambda: None)
        self._on_sync_change = on_sync_change or (lambda _: None)
        self.in_sync = asyncio.Event()
        self.last_error: str = ""
        self.revision = 0
        self.config = IPAMConfig()
        self.pools: dict[str, IPPool] = {}
        self.reservations: dict[str, IPReservation] = {}
        self.labels: dict[str, str] = {}
        self.blocks: dict[IPNetwork, Versioned[Block]] = {}
        self._state: ClusterState | None = None
        self._task: asyncio.Task[None] | None = None
        self.relists = 0
        self._refusals = 0  # watch refusals for auth in a row (see _run)
        self._last_refusal = 0.0
        # Affinities seen in a watch batch whose block is not cached yet.
        self._affinity_pending: set[IPNetwork] = set()
        self._stream: WatchStream | None = None
        self._block_watches: dict[IPNetwork, int] = {}
        self._watched_keys: dict[bytes, IPNetwork] = {}
        # Block events newer than the cached block, not decoded yet: (value, mod_revision).
        self._undecoded: dict[IPNetwork, tuple[bytes, int]] = {}
        self._next_watch_id = 1

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"topoipam-cache-{self.node}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def wait_in_sync(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.in_sync.wait(), timeout)

    def _set_sync(self, value: bool, error: str = "") -> None:
        self.last_error = error
        if value == self.in_sync.is_set():
            return
        if value:
            self.in_sync.set()
        else:
            self.in_sync.clear()
        log.info("cache %s", "in sync" if value else f"out of sync: {error}")
        self._on_sync_change(value)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._list()
                failures = 0
                await self._watch()
            except WatchCompacted as exc:
                log.warning("watch compacted (%s); relisting", exc)
                self._set_sync(False, str(exc))
            except WatchTokenExpired as exc:
                # etcd is there and answering: relist and reopen the stream with a fresh
                # token, and keep serving meanwhile (writes are guarded in etcd anyway).
                # Repeated refusals are a real permission problem: go out of sync.
                now = asyncio.get_running_loop().time()
                self._refusals = self._refusals + 1 if now - self._last_refusal < 2.0 else 1
                self._last_refusal = now
                if self._refusals > 3:
                    self._set_sync(False, str(exc))
                    await asyncio.sleep(RELIST_BACKOFF[-1])
                log.info("reopening the watch: %s", exc)
            except DatastoreUnavailable as exc:
                self._set_sync(False, str(exc))
                await asyncio.sleep(RELIST_BACKOFF[min(failures, len(RELIST_BACKOFF) - 1)])
                failures += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the one writer die silently
                log.exception("cache watcher failed; relisting")
                self._set_sync(False, f"internal error: {exc}")
                await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ list
    async def _list(self) -> None:
        """Read everything at one revision, then replace the cached copy at once."""
        revision = await self.store.ping()
        reads = await asyncio.gather(
            self.store.get_raw(self.keys.config(), revision),
            self.store.prefix_raw(self.keys.pools(), revision=revision),
            self.store.prefix_raw(self.keys.reservations(), revision=revision),
            self.store.get_raw(self.keys.node(self.node), revision),
            self.store.prefix_raw(self.keys.affinities(self.node), keys_only=True,
                                  revision=revision),
        )
        config_raw, (pool_kvs, _), (reservation_kvs, _), node_raw, (affinity_kvs, _) = reads
        affine = []
        for kv in affinity_kvs:
            try:
                affine.append(self.keys.affinity_of(kv.key)[1])
            except (InvalidInput, ValueError):
                log.warning("skipping malformed affinity key %r", kv.key)
        block_reads = await asyncio.gather(
            *(self.store.get_raw(self.keys.block(cidr), revision) for cidr in affine)
        )
        self.config = self._decode_config(config_raw[0] if config_raw else None)
        self.pools = {}
        for kv in pool_kvs:
            self._apply_pool(kv.key, kv.value)
        self.reservations = {}
        for kv in reservation_kvs:
            self._apply_reservation(kv.key, kv.value)
        self.labels = self._decode_labels(node_raw[0] if node_raw else None)
        self.blocks = {}
        self._undecoded = {}
        for cidr, raw in zip(affine, block_reads, strict=True):
            if raw is not None:
                self._apply_block(self.keys.block(cidr), raw[0], raw[1])
        self.revision = revision
        self.relists += 1
        self._changed()

    # ------------------------------------------------------------------ watch
    def _static_ranges(self) -> list[tuple[bytes, bytes]]:
        ranges = [(key, key + b"\0") for key in (self.keys.config(), self.keys.node(self.node))]
        for prefix in (self.keys.pools(), self.keys.reservations(),
                       self.keys.affinities(self.node)):
            ranges.append((prefix, prefix_range_end(prefix)))
        return ranges

    async def _watch(self) -> None:
        """Watch everything from the list's revision; block watchers come and go.

        The watchers of config, node, pools, reservations and affinities live
        as long as the stream; each affine block has a watcher of its own,
        added when the block joins the cache and cancelled when it leaves, so
        no watcher is ever restarted and no event is lost.
        """
        stream = self.store.open_watch()
        self._stream = stream
        self._block_watches = {}
        self._watched_keys = {}
        waiting = set()
        for number, (start, end) in enumerate(self._static_ranges(), start=1):
            stream.add(number, start, end, self.revision + 1)
            waiting.add(number)
        self._next_watch_id = len(waiting) + 1
        for cidr in list(self.blocks):
            waiting.add(self._watch_block(cidr, self.revision + 1))
        try:
            async for watch_id, events in stream:
                if not events:
                    waiting.discard(watch_id)
                    if not waiting:
                        self._set_sync(True)
                    continue
                topology = False
                for event in events:
                    topology = self._apply_event(event) or topology
                missing = sorted(self._affinity_pending, key=str)
                self._affinity_pending.clear()
                for cidr in missing:
                    raw = await self.store.get_raw(self.keys.block(cidr))
                    if raw is not None:
                        self._apply_block(self.keys.block(cidr), raw[0], raw[1])
                if topology:
                    self._changed()
        finally:
            self._stream = None

    def _watch_block(self, cidr: IPNetwork, start_revision: int) -> int:
        assert self._stream is not None
        watch_id = self._next_watch_id
        self._next_watch_id += 1
        self._block_watches[cidr] = watch_id
        key = self.keys.block(cidr)
        self._watched_keys[key] = cidr
        self._stream.add(watch_id, key, key + b"\0", start_revision)
        return watch_id

    def _forget_block(self, cidr: IPNetwork) -> None:
        self.blocks.pop(cidr, None)
        self._undecoded.pop(cidr, None)
        self._watched_keys.pop(self.keys.block(cidr), None)
        watch_id = self._block_watches.pop(cidr, None)
        if watch_id is not None and self._stream is not None:
            self._stream.cancel(watch_id)

    def _apply_event(self, event: Any) -> bool:
        """Apply one watch event; True if it changed config, pools, labels or reservations."""
        key: bytes = event.kv.key
        deleted = event.type == 1  # etcd mvccpb.Event.DELETE
        cidr = self._watched_keys.get(key)
        if cidr is not None:  # one of our blocks: the hot path, so no key parsing
            if deleted:
                self._forget_block(cidr)
                return False
            cached = self.blocks.get(cidr)
            # Most block events are the echo of our own writes, which the cache
            # already has: keep the bytes and decode only if still needed later.
            if cached is None or cached.mod_revision < event.kv.mod_revision:
                self._undecoded[cidr] = (event.kv.value, int(event.kv.mod_revision))
            return False
        kind, rest = self.keys.kind_of(key)
        if key == self.keys.config():
            self.config = self._decode_config(None if deleted else event.kv.value)
        elif key == self.keys.node(self.node):
            self.labels = self._decode_labels(None if deleted else event.kv.value)
        elif kind == "pools":
            if deleted:
                self.pools.pop(self.keys.name_of(key), None)
            else:
                self._apply_pool(key, event.kv.value)
        elif kind == "reservations":
            if deleted:
                self.reservations.pop(self.keys.name_of(key), None)
            else:
                self._apply_reservation(key, event.kv.value)
        elif kind == "affinities":
            try:
                _, cidr = self.keys.affinity_of(key)
            except (InvalidInput, ValueError):
                return False
            if deleted:
                self._forget_block(cidr)
            elif cidr not in self.blocks:
                self._affinity_pending.add(cidr)
            return False
        else:
            return False
        return True

    # ------------------------------------------------------------------ decoding
    def _decode_config(self, raw: bytes | None) -> IPAMConfig:
        if raw is None:
            return IPAMConfig()
        try:
            return self.store.decode_config(raw)
        except InvalidInput as exc:
            log.warning("ignoring corrupt ipamconfig (using defaults): %s", exc)
            return IPAMConfig()

    def _decode_labels(self, raw: bytes | None) -> dict[str, str]:
        if raw is None:
            return {}
        try:
            return dict(self.store.decode_node(self.keys.node(self.node), raw).labels)
        except InvalidInput as exc:
            log.warning("ignoring corrupt node %s (no labels): %s", self.node, exc)
            return {}

    def _apply_pool(self, key: bytes, raw: bytes) -> None:
        _apply_named(self.pools, "pool", self.keys.name_of(key), lambda: self.store.decode_pool(
            key, raw))

    def _apply_reservation(self, key: bytes, raw: bytes) -> None:
        _apply_named(self.reservations, "ipreservation", self.keys.name_of(key),
                     lambda: self.store.decode_reservation(key, raw))

    def _apply_block(self, key: bytes, raw: bytes, revision: int) -> None:
        try:
            block = self.store.decode_block(key, raw)
        except InvalidInput as exc:
            log.warning("skipping corrupt block %s: %s", key.decode(errors="replace"), exc)
            return
        self.observe(block.cidr, Versioned(block, revision))

    def _changed(self) -> None:
        self._state = None
        self._on_change()

    # ------------------------------------------------------------------ StateSource
    async def state(self) -> ClusterState:
        if not self.in_sync.is_set():
            raise NotReady(
                f"topoipamd on node {self.node} is not in sync with etcd"
                + (f" ({self.last_error})" if self.last_error else "") + "; try again"
            )
        return self.snapshot()

    def snapshot(self) -> ClusterState:
        """The cached state as it is now, in sync or not (for status and metrics)."""
        if self._state is None:
            self._state = ClusterState(
                config=self.config,
                pools=tuple(sorted(self.pools.values(), key=lambda p: p.name)),
                labels=dict(self.labels),
                reservations=Reservations(self.reservations.values()),
            )
        return self._state

    def _decode_pending(self) -> None:
        while self._undecoded:
            cidr, (raw, revision) = self._undecoded.popitem()
            self._apply_block(self.keys.block(cidr), raw, revision)

    def current_blocks(self) -> list[Versioned[Block]]:
        """This node's blocks as they are now (for status and metrics too)."""
        self._decode_pending()
        return [b for b in self.blocks.values() if b.value.affinity == self.node]

    def owns_block(self, cidr: IPNetwork) -> bool:
        """Whether ``cidr`` is one of this node's blocks, as far as the cache knows now."""
        return cidr in self.blocks or cidr in self._undecoded

    async def affine_blocks(self) -> list[Versioned[Block]]:
        return self.current_blocks()

    async def block(self, cidr: IPNetwork) -> Versioned[Block] | None:
        cached = self.cached_block(cidr)
        if cached is not None:
            return cached
        return await self.store.get_block(cidr)

    def cached_block(self, cidr: IPNetwork) -> Versioned[Block] | None:
        self._decode_pending()
        return self.blocks.get(cidr)

    def view(self, state: ClusterState) -> ReadingView:
        """The planner's view: ``state``, this node's blocks and any block cached."""
        return ReadingView(state, self.current_blocks, self.cached_block)

    def observe(self, cidr: IPNetwork, block: Versioned[Block] | None,
                seen_at: int = 0) -> None:
        """Take a fresher value of a block, from a watch event or a transaction reply.

        ``None`` means the block was absent at revision ``seen_at`` (0: now);
        a cached block written after that revision is kept.
        """
        current = self.blocks.get(cidr)
        if block is None or block.value.affinity != self.node:
            newer = block.mod_revision if block is not None else seen_at
            if current is not None and (not newer or newer >= current.mod_revision):
                self._forget_block(cidr)
            return
        if current is None:
            self.blocks[cidr] = block
            if self._stream is not None:
                self._watch_block(cidr, block.mod_revision + 1)
        elif block.mod_revision >= current.mod_revision:
            self.blocks[cidr] = block
        pending = self._undecoded.get(cidr)
        if pending is not None and pending[1] <= block.mod_revision:
            del self._undecoded[cidr]


def _apply_named(table: dict[str, Any], what: str, name: str, decoded: Callable[[], Any]) -> None:
    """Put a watched object's new value in ``table``; a corrupt one is logged and dropped."""
    try:
        table[name] = decoded()
    except InvalidInput as exc:
        log.warning("skipping corrupt %s %s: %s", what, name, exc)
        table.pop(name, None)
