"""The daemon object: start, serve, drain, close. Signals live in main.py.

Start-up order (docs/design.md#the-daemons-life): connect to etcd, register the node if absent,
list and watch, take the node's fence (:mod:`topoipam.daemon.fence`),
check the node-local record of allocations against etcd
(:mod:`topoipam.daemon.record`), and only then report ready (health
SERVING, systemd READY=1). The sockets are bound early so clients get a
clear "not ready" (UNAVAILABLE) rather than "connection refused" meanwhile.
Serving stops (NOT_SERVING, writes refused) while the fence is not held and
while etcd went back in time and the record is being re-asserted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from topoipam.proto import ipam_pb2, ipam_pb2_grpc
from topoipam.proto.cniwire import cni_socket_path

from .cache import NodeCache
from .cni_socket import CniSocketServer
from .config import DaemonConfig, parse_host_port
from .core import allocator
from .core.errors import AuthenticationFailed, DatastoreUnavailable, InvalidInput, TopoipamError
from .core.keys import KeySchema
from .core.model import Node
from .core.writes import PutObject
from .engine import AllocationEngine
from .fence import NodeFenceKeeper, state_file
from .metrics import Metrics
from .record import AllocationRecord, reassert_allocations
from .service import IpamService, StatusProvider
from .store import CommitFence, EtcdHistory, EtcdStore, WriteGate, WritePause

log = logging.getLogger(__name__)

SERVICE_NAME = ipam_pb2.DESCRIPTOR.services_by_name["Ipam"].full_name
# gRPC socket limits against a hostile or broken local client: requests are a
# few hundred bytes, so 1 MiB is generous. Streams per connection are bounded,
# high enough for a storm of 256 calls on one channel (a lower limit makes gRPC
# refuse the streams a client opens before it has seen our SETTINGS).
GRPC_MAX_MESSAGE = 1024 * 1024
GRPC_MAX_STREAMS = 256
# Calls in progress across the gRPC socket (an open call costs ~20 KB): beyond it,
# RESOURCE_EXHAUSTED. The plugin's path, the CNI socket, has its own limits.
GRPC_MAX_CALLS = 1024
# How often the daemon looks for sticky holds that are over in its own blocks.
HOLD_EXPIRY_SECONDS = 1.0
#: Hold-expiry ticks between re-checks of this node's recorded conflicts while any holds.
CONFLICT_RECHECK_TICKS = 5


def prepare_socket_dir(path: str) -> None:
    """Create the socket's directory 0750, and refuse one that anyone may write to.

    A world-writable directory would let any local user replace the socket
    and impersonate the daemon to the CNI plugin.
    """
    directory = Path(path).parent
    if not directory.exists():
        directory.mkdir(mode=0o750, parents=True)
        os.chmod(directory, 0o750)
    mode = directory.stat().st_mode
    if mode & stat.S_IWOTH:
        raise InvalidInput(
            f"socket directory {directory} is world-writable (mode {stat.S_IMODE(mode):o}); "
            "refusing to serve there"
        )


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


class Daemon:
    """One node's topoipamd. ``async with Daemon(config):`` or start()/close()."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.record = AllocationRecord(
            state_file(config.state_dir, config.node, config.prefix, "allocations"),
            config.node)
        if config.record_allocations:
            self.record.load()
        history = EtcdHistory(self.record.revision, self.record.cluster_id,
                              on_went_back=self._etcd_went_back)
        self.record.current = lambda: (history.revision, history.cluster_id)
        self.fence = CommitFence(config.node, KeySchema(config.prefix).daemon(config.node),
                                 on_lost=self._refresh_health)
        # Every commit of this daemon passes the gate: fenced, paused until the record
        # is checked, watched for etcd going back, noted in the record.
        self.gate = WriteGate(
            self.fence, history,
            on_committed=self.record.note if config.record_allocations else None,
            pause=WritePause.CHECKING_RECORD)
        self.store = EtcdStore(config.etcd_options(), config.prefix, gate=self.gate,
                               on_error=self.metrics.etcd_errors.inc)
        self.cache = NodeCache(self.store, config.node, on_change=self._on_cache_change,
                               on_sync_change=self._on_sync_change)
        self.ipam = AllocationEngine(self.store, config.node, source=self.cache)
        self.ipam.on_conflict = self.metrics.etcd_conflicts.inc
        self.ipam.on_claim = lambda path, count: self.metrics.claims.labels(path).inc(count)
        self.ipam.on_allocated = self._on_allocated
        self.ipam.on_takeover = self.metrics.sticky_takeovers.inc
        self.keeper = NodeFenceKeeper(self.store, self.fence, config.state_dir, config.prefix,
                                      config.node_lease_seconds, on_change=self._refresh_health)
        self._went_back = False
        self._was_serving = False
        self._reassert_task: asyncio.Task[None] | None = None
        self._record_task: asyncio.Task[None] | None = None
        self.reassertions = 0
        #: This node's recorded conflicts that still held at the last check.
        self.open_conflicts = 0
        self.ipam.on_released = self._on_released
        self.service = IpamService(
            self.ipam,
            StatusProvider(self.cache.in_sync.is_set, self._etcd_check, self._cache_state,
                           self._pool_usage, owns_block=self.cache.owns_block,
                           not_serving=self._not_serving),
            self.metrics,
            request_timeout=config.request_timeout,
        )
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._cni_server: CniSocketServer | None = None
        self._metrics_server: Any = None
        self._closed = asyncio.Event()
        self._closing = False
        self._register_task: asyncio.Task[None] | None = None
        self._cleanup_task: asyncio.Task[None] | None = None
        self._cleanup_wanted = False
        self._index_reconciled = False
        self._liveness_task: asyncio.Task[None] | None = None
        self._hold_task: asyncio.Task[None] | None = None
        self._ready_once = False
        self.metrics.add_pool_collector(self._pool_usage)
        self.metrics.add_topology_collector(config.node, self._cache_state)
        self.metrics.relists.set_function(lambda: self.cache.relists)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        prepare_socket_dir(self.config.socket)
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
            ("grpc.max_send_message_length", 16 * GRPC_MAX_MESSAGE),
            ("grpc.max_concurrent_streams", GRPC_MAX_STREAMS),
            # A connection that never completes its HTTP/2 handshake is dropped.
            ("grpc.server_handshake_timeout_ms", 10_000),
        ], maximum_concurrent_rpcs=GRPC_MAX_CALLS)
        ipam_pb2_grpc.add_IpamServicer_to_server(self.service, server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        if os.path.exists(self.config.socket):
            os.unlink(self.config.socket)
        server.add_insecure_port(f"unix:{self.config.socket}")
        if self.config.tcp_address:
            server.add_insecure_port(self.config.tcp_address)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        os.chmod(self.config.socket, 0o660)
        self._server = server
        self._cni_server = CniSocketServer(cni_socket_path(self.config.socket),
                                           self.service.dispatch)
        await self._cni_server.start()
        if self.config.metrics_address != "off":
            host, port = parse_host_port(self.config.metrics_address, "metrics-address")
            self._metrics_server = start_http_server(port, host, registry=self.metrics.registry)
        self._register_task = asyncio.create_task(self._register_then_sync())
        # Listening is not serving: that waits for the node fence and the cache (logged then).
        log.info("topoipamd for node %s listening on %s (CNI socket %s)", self.config.node,
                 self.config.socket, cni_socket_path(self.config.socket))

    async def _register_then_sync(self) -> None:
        """Register the node (retrying while etcd is down), then start the cache."""
        delay = 0.05
        while True:
            try:
                await self._check_datastore()
                await self.register_node()
                break
            except AuthenticationFailed as exc:
                # Not transient: back off far, so a wrong password does not hammer etcd.
                log.error("%s; retrying in %.0fs", exc, max(delay, 5.0))
                await asyncio.sleep(max(delay, 5.0))
                delay = min(max(delay, 5.0) * 2, 60.0)
            except DatastoreUnavailable as exc:
                log.warning("cannot register node %s yet: %s", self.config.node, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self.cache.start()
        self._liveness_task = asyncio.create_task(self.keeper.run())
        if self.config.record_allocations:
            self._record_task = asyncio.create_task(self.record.run())
        self._start_reassertion()
        self._hold_task = asyncio.create_task(self._expire_holds())

    async def _expire_holds(self) -> None:
        """Free sticky holds that are over in this node's own blocks, every second.

        The scan is of the cached blocks (no etcd read while nothing parked is
        due); the daemon that owns a block expires its holds, each in its own
        guarded transaction, so a racing ADD of the identity wins or re-plans.
        """
        ticks = 0
        while True:
            await asyncio.sleep(HOLD_EXPIRY_SECONDS)
            if not self.cache.in_sync.is_set():
                continue
            ticks += 1
            if self.open_conflicts and ticks % CONFLICT_RECHECK_TICKS == 0:
                self._start_reassertion()  # a holder released behind a watch we lack
            try:
                expired = await self.ipam.expire_parked()
            except TopoipamError as exc:
                log.debug("sticky hold expiry deferred: %s", exc)
                continue
            if expired:
                log.info("sticky holds over, addresses freed: %s", ", ".join(expired))

    # ------------------------------------------------------------------ datastore identity
    async def _check_datastore(self) -> bool:
        """Make sure the record belongs to the datastore we talk to; True if it did not.

        A record is put back only into its own datastore (a restore keeps the
        identity). Against another one (a new etcd, another prefix, a prefix
        wiped by hand: an empty prefix is a new datastore) the daemon keeps the
        record aside and starts clean: nothing of it is written there. A
        datastore from before identities (objects, no identity) is given the
        record's identity when it is the record's etcd cluster (the same
        cluster ID: an upgrade, or a restore of an older snapshot), else a new
        one; an unreadable identity is replaced the same way. A record from
        before identities adopts the datastore it finds only in its own etcd
        cluster, and never an empty prefix.
        """
        if not self.config.record_allocations:
            return False
        record, store = self.record, self.store
        found = await store.read_datastore_identity()
        how = ""
        same_cluster = record.cluster_id in (0, found.cluster_id)
        if found.id:
            identity = found.id
            store.datastore_id = identity
        else:
            ours = bool(record.datastore) and not found.empty and same_cluster
            how = "new" if found.empty else "adopted"
            identity = await store.write_datastore_identity(
                record.datastore if ours else uuid.uuid4().hex, found.revision)
            if found.problem:
                log.warning("%s: replaced by datastore identity %s", found.problem, identity)
        if record.datastore == identity or not record.datastore and (
                not record.handles or (how != "new" and same_cluster)):
            if not record.datastore:
                record.adopt(identity)  # a record from before identities, or a first start
            return False
        count, previous = len(record.handles), record.datastore or "unknown (an older record)"
        aside = await record.set_aside(identity)
        if self.gate.history is not None:
            self.gate.history.forget()
        log.warning(
            "node %s: etcd %s at prefix %s is datastore %s%s, but this node's record of %d "
            "allocation(s) belongs to datastore %s: starting clean, nothing of that record is "
            "written here (kept aside as %s)", self.config.node,
            ",".join(self.config.etcd_endpoints), self.config.prefix, identity,
            " (the prefix was empty: a new datastore, or one wiped by hand)" if how == "new"
            else "", count, previous, aside or "-")
        return True

    # ------------------------------------------------------------------ etcd went back
    def _etcd_went_back(self, reason: str) -> None:
        """etcd lost history: stop writing until the record is re-asserted."""
        self._went_back = True
        self.gate.pause_writes(
            WritePause.REASSERTING, f"{reason}; it is re-asserting the "
            f"{len(self.record.handles)} allocation(s) of node {self.config.node} before "
            "serving again")
        log.warning("%s: not serving until the %d allocation(s) of this node's record are "
                    "re-asserted", reason, len(self.record.handles))
        self._refresh_health()
        self._start_reassertion()

    def _start_reassertion(self) -> None:
        if self._reassert_task is None or self._reassert_task.done():
            self._reassert_task = asyncio.get_running_loop().create_task(self._reassert())

    async def _reassert(self) -> None:
        """Check (and after a restore, re-assert) the record, then let writes through."""
        while True:
            while not self.fence.held():
                await asyncio.sleep(0.05)
            went_back, self._went_back = self._went_back, False
            try:
                if went_back and await self._check_datastore():
                    went_back = False  # another datastore: nothing of the record goes there
                outcome = await reassert_allocations(
                    self.store, self.record, went_back, settle=self.config.record_allocations)
            except TopoipamError as exc:
                self._went_back = self._went_back or went_back
                log.info("record of node %s not checked yet: %s", self.config.node, exc)
                await asyncio.sleep(0.2)
                continue
            if self._went_back:  # it went back again meanwhile: once more
                continue
            break
        if went_back or outcome.restored or outcome.conflicts:
            self.reassertions += 1
            log.warning("re-asserted the record of node %s (etcd %s): %d allocation(s) put "
                        "back, %d still present, %d conflict(s)%s", self.config.node,
                        "went back" if went_back else "had lost allocations",
                        len(outcome.restored), outcome.present, len(outcome.conflicts),
                        "".join(f"; {line}" for line in outcome.conflicts))
        elif outcome.dropped:
            log.info("dropped %d allocation(s) from the record that etcd no longer holds "
                     "(released elsewhere)", len(outcome.dropped))
        self.open_conflicts = outcome.open_conflicts
        self.gate.resume_writes()
        self._refresh_health()

    def _serving(self) -> bool:
        return self.cache.in_sync.is_set() and self.fence.held() and not self.gate.paused

    def _refresh_health(self) -> None:
        if self._closing:
            return
        serving = self._serving()
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        asyncio.get_running_loop().create_task(self._set_health(status))
        if serving and not self._was_serving:
            log.info("topoipamd serving node %s", self.config.node)
            self._on_cache_change()  # writes deferred while we did not serve: run them now
        self._was_serving = serving

    async def _not_serving(self) -> str:
        if not self.fence.held():
            return (f"topoipamd does not serve node {self.config.node}: "
                    f"{self.fence.reason or 'its etcd lease lapsed'}")
        if self.gate.paused:
            return f"topoipamd does not write yet: {self.gate.pause_reason}"
        try:
            alarms = await asyncio.wait_for(self.store.alarms(), 2.0)
        except (DatastoreUnavailable, TimeoutError):
            return ""
        if alarms:
            return (f"etcd raised alarm {', '.join(alarms)}: it refuses every write until "
                    "the operator compacts, defragments and disarms it "
                    "(etcdctl alarm disarm)")
        return ""

    async def register_node(self) -> None:
        """Create this node's record with the configured labels, only if it is absent."""
        existing = await self.store.get_node(self.config.node)
        if existing is not None:
            return
        result = await self.store.commit(
            [PutObject(Node(self.config.node, self.config.labels), expect_revision=0)],
            fenced=False)
        if result.succeeded:
            log.info("registered node %s with labels %s", self.config.node,
                     dict(self.config.labels))

    async def wait_ready(self, timeout: float | None = None) -> None:
        await self.cache.wait_in_sync(timeout)

    def _on_sync_change(self, in_sync: bool) -> None:
        self.metrics.cache_in_sync.set(1 if in_sync else 0)
        if self._closing:
            return
        if in_sync and not self.gate.paused:
            # After a relist (etcd was away), check the record before writing again:
            # a restore that others' writes hid from the revision check shows there.
            self.gate.pause_writes(WritePause.CHECKING_RECORD)
            self._start_reassertion()
        self._refresh_health()
        if in_sync:
            self._on_cache_change()  # rules may have changed while we were not watching
        if in_sync and not self._ready_once:
            self._ready_once = True
            sd_notify("READY=1\nSTATUS=in sync with etcd")
        elif not in_sync:
            sd_notify(f"STATUS=out of sync with etcd: {self.cache.last_error}")

    async def _set_health(self, status: Any) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    def _on_cache_change(self) -> None:
        # Pools or labels may have stopped selecting some of our empty blocks,
        # or changed what the warm reserve needs.
        self._cleanup_wanted = True
        if self.open_conflicts and not self.gate.paused:
            # A pool may contain a recorded address again, a holder may have gone.
            self._start_reassertion()
        if self._cleanup_task is None or self._cleanup_task.done():
            self._cleanup_task = asyncio.get_running_loop().create_task(self._maintain())

    def _on_released(self, handle_id: str) -> None:
        """A DEL of an attachment etcd did not know: if the record has it (put back
        nowhere, e.g. its pool was gone), the pod is gone: forget it, end its conflict."""
        if handle_id in self.record.handles:
            self.record.forget(handle_id)
            log.info("released %s, which only this node's record knew", handle_id)
            self._start_reassertion()

    def _on_allocated(self) -> None:
        # The reserve shrank: top it up, off the pod's path.
        if self.cache.snapshot().config.warm_addresses:
            self._on_cache_change()

    async def _maintain(self) -> None:
        """Block upkeep off the pod's path; again if the rules changed meanwhile.

        Fixes this node's free-block index entries once, drops unwanted empty
        blocks, and claims blocks for the warm reserve. Runs only in sync
        (out of sync the rules may be stale); the return to sync after a
        restart or relist schedules it again. Empty blocks of pools that still
        select this node are never dropped (but those a relabel left in another
        value's topology range), so a pod churning at a block boundary never
        makes the reserve claim and release a block in turn.
        """
        while self._cleanup_wanted and self.cache.in_sync.is_set():
            self._cleanup_wanted = False
            await asyncio.sleep(0)  # let the cache finish applying the batch
            try:
                if not self._index_reconciled:
                    fixed = await self.ipam.reconcile_free_index()
                    self._index_reconciled = True
                    if fixed:
                        log.info("free-block index: %d entr%s of node %s fixed", fixed,
                                 "y" if fixed == 1 else "ies", self.config.node)
                dropped = await self.ipam.release_unwanted_blocks()
                claimed = await self.ipam.top_up_reserve()
            except TopoipamError as exc:
                log.debug("block upkeep deferred: %s", exc)
                self._cleanup_wanted = True
                return
            if dropped:
                log.info("released empty blocks %s no longer uses (pool no longer selects "
                         "it, or another value's topology range): %s",
                         self.config.node, ", ".join(map(str, dropped)))
            if claimed:
                log.info("claimed %d block(s) for the warm reserve of %s", claimed,
                         self.config.node)

    def _cache_state(self) -> Any:
        return self.cache.snapshot() if self.cache.in_sync.is_set() else None

    async def _etcd_check(self) -> str:
        try:
            await asyncio.wait_for(self.store.ping(), 2.0)
            return ""
        except (DatastoreUnavailable, TimeoutError) as exc:
            # The cause alone: Status and the plugin prefix it with "etcd unreachable: ".
            return str(exc).removeprefix("etcd unreachable: ") or "no answer within 2s"

    def _pool_usage(self) -> list[tuple[str, int, int, int]]:
        rows: dict[str, list[int]] = {}
        state = self.cache.snapshot()
        pools = state.pools
        now = time.time()
        for versioned in self.cache.current_blocks():
            block = versioned.value
            pool = allocator.pool_of_block(pools, block.cidr)
            name = pool.name if pool else "(deleted)"
            row = rows.setdefault(name, [0, 0, 0])
            row[0] += 1
            row[1] += block.in_use
            if pool is not None:
                ctx = allocator.AssignContext(pool, state.reservations, now,
                                              float(state.config.ip_cooldown_seconds))
                row[2] += allocator.free_count(block, ctx)
        return [(name, *values) for name, values in sorted(rows.items())]  # type: ignore[misc]

    async def close(self) -> None:
        """Stop taking calls, let in-flight ones finish (bounded), then close everything."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        await self.health.enter_graceful_shutdown()
        sd_notify("STOPPING=1")
        if self._cni_server is not None:
            self._cni_server.close()
        if self._server is not None:
            await self._server.stop(self.config.drain_seconds)
        if self._cni_server is not None:
            await self._cni_server.wait_closed()
        for task in (self._register_task, self._cleanup_task, self._liveness_task,
                     self._reassert_task, self._record_task, self._hold_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        try:  # the fence goes with the lease, at once: another daemon may take over
            await asyncio.wait_for(self.keeper.release(), 2.0)
        except (DatastoreUnavailable, TimeoutError) as exc:
            log.warning("node lease not revoked (it expires in %ss): %s",
                        self.config.node_lease_seconds, exc)
        if self.config.record_allocations:
            self.record.flush_sync()
        self.keeper.close()
        await self.ipam.close()
        await self.cache.close()
        await self.store.close()
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            server.server_close()
            thread.join(5)
        for path in (self.config.socket,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
