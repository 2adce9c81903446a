"""Node identity fencing: at most one live topoipamd writes for a node name.

The fence is the key ``daemons/<node>`` on the serving daemon's own etcd
lease (:meth:`EtcdStore.claim_node`). Every transaction the daemon commits
compares that the key is still on that lease (the :class:`CommitFence` of the
store's write gate, :mod:`topoipam.daemon.store.gate`), so:

* a second daemon started with the same ``--node`` (a replaced host, a
  copy-pasted config) finds the key held, logs one line naming the node and
  the live holder, does not serve, and tries again every ``retry`` seconds;
  it takes over once the holder stops (clean stop: at once; killed or cut
  off: when its lease expires, within ``ttl``);
* a daemon restarted on the same host after ``kill -9`` recognises its
  previous incarnation: the key names the instance id kept in its
  ``--state-dir`` (and its host), so it moves the key onto its new lease and
  serves at once instead of waiting ``ttl`` for its own old lease;
* a daemon whose lease lapsed (frozen past the TTL, partitioned from etcd)
  stops committing by its own clock before etcd could expire the lease
  (``valid_until`` is counted from when the last successful keep-alive was
  sent), and etcd refuses its transactions anyway once the key has moved.

Two daemons can share an instance id only by sharing a state directory; an
exclusive ``flock`` on ``<state-dir>/<node>-<prefix hash>.lock`` (released by the kernel
when a process dies, however it dies) rules that out. Copying a state
directory to another host does not carry the identity: the host name must
match too. What it promises and what it does not:
docs/design.md#a-daemon-killed-frozen-or-started-twice-the-node-fence.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import IO

from .core.errors import DatastoreUnavailable, TopoipamError
from .store import CommitFence, EtcdStore

log = logging.getLogger(__name__)


def state_file(state_dir: str, node: str, prefix: str, suffix: str) -> str:
    """``<state-dir>/<node>-<hash of prefix>.<suffix>``: one set of files per node and prefix."""
    digest = uuid.uuid5(uuid.NAMESPACE_URL, prefix).hex[:8]
    return os.path.join(state_dir, f"{node}-{digest}.{suffix}")


class NodeFenceKeeper:
    """Acquires and keeps this daemon's node fence; tells the daemon when it changes.

    One task (:meth:`run`) owns ``fence`` (the one the store's write gate
    compares): it claims the key, keeps the lease alive every ``ttl / 3``
    seconds, and claims again when the lease is lost (a commit that finds it
    gone sets the fence's ``lost_signal``, which wakes the keeper at once).
    ``on_change`` is called whenever holding starts or stops.
    """

    def __init__(self, store: EtcdStore, fence: CommitFence, state_dir: str, prefix: str,
                 ttl: int, on_change: Callable[[], None], retry: float = 1.0) -> None:
        self.store = store
        self.node = fence.node
        self.ttl = ttl
        self.retry = retry
        self.on_change = on_change
        self.fence = fence
        self._wakeup = fence.lost_signal
        os.makedirs(state_dir, mode=0o750, exist_ok=True)
        self._lock_path = state_file(state_dir, self.node, prefix, "lock")
        self._identity_path = state_file(state_dir, self.node, prefix, "identity")
        self._lock: IO[bytes] | None = None
        self.instance = ""
        self._refused_by = ""
        self._lease = 0  # the lease we granted (the fence may not be on it yet)
        self.takeovers = 0  # previous incarnations of ours taken over

    # ------------------------------------------------------------------ local identity
    def _lock_state_dir(self) -> bool:
        handle = open(self._lock_path, "ab")  # noqa: SIM115 (held for the daemon's life)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._lock = handle
        return True

    def _load_instance(self) -> str:
        try:
            with open(self._identity_path) as source:
                value = json.load(source).get("instance", "")
            if isinstance(value, str) and value:
                return value
        except (OSError, ValueError, AttributeError):
            pass
        instance = uuid.uuid4().hex
        tmp = self._identity_path + ".tmp"
        with open(tmp, "w") as target:
            json.dump({"instance": instance}, target)
            target.flush()
            os.fsync(target.fileno())
        os.replace(tmp, self._identity_path)
        return instance

    # ------------------------------------------------------------------ the keeper
    async def run(self) -> None:
        """Hold the fence for as long as the daemon runs (cancel to stop)."""
        while not self._lock_state_dir():
            self._refuse(f"another topoipamd on this host holds {self._lock_path}")
            await asyncio.sleep(self.retry)
        self.instance = self._load_instance()
        info = {"host": socket.gethostname(), "pid": os.getpid(), "instance": self.instance,
                "started": time.time()}
        while True:
            try:
                if not self.fence.lease:
                    await self._claim(info)
                else:
                    await self._keep_alive()
            except TopoipamError as exc:
                log.debug("node fence of %s: %s", self.node, exc)
            if self.fence.lease:
                delay = self.ttl / 3
                # Keep-alives failing: try more often as the lease runs out.
                if time.monotonic() + delay > self.fence.valid_until:
                    delay = min(delay, self.retry / 2)
            else:
                delay = self.retry
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), delay)
            except TimeoutError:
                pass

    async def _claim(self, info: dict[str, object]) -> None:
        if not self._lease:
            self._lease = await self.store.grant_lease(self.ttl)
        sent = time.monotonic()
        try:
            claimed, holder, previous = await self.store.claim_node(self.node, info, self._lease)
        except DatastoreUnavailable as exc:
            if "lease not found" in str(exc):  # it expired while we were refused
                self._lease = 0
            raise
        if not claimed:
            self._refuse(
                f"node {self.node} is served by a live topoipamd (pid {holder.get('pid', '?')} "
                f"on host {holder.get('host', '?')}, instance {holder.get('instance', '?')})")
            return
        self.fence.lease = self._lease
        self.fence.valid_until = sent + self.ttl - self._margin()
        self.fence.reason = ""
        if previous and previous != self._lease:
            self.takeovers += 1
            log.info("node %s: took over the fence of this daemon's previous incarnation "
                     "(pid %s)", self.node, holder.get("pid", "?"))
            try:  # its lease would expire by itself; revoke it now
                await self.store.revoke_lease(previous)
            except DatastoreUnavailable:
                pass
        if self._refused_by:
            log.warning("node %s: the other daemon is gone; now serving the node", self.node)
        self._refused_by = ""
        log.info("node %s: holding the node fence (etcd lease %x, TTL %ss)", self.node,
                 self._lease, self.ttl)
        self.on_change()

    async def _keep_alive(self) -> None:
        sent = time.monotonic()
        try:
            alive = await self.store.keep_lease_alive(self.fence.lease)
        except DatastoreUnavailable:
            if not self.fence.held():
                self.on_change()
            raise
        if alive:
            self.fence.valid_until = sent + self.ttl - self._margin()
            return
        log.warning("node %s: etcd lease %x expired (the daemon was frozen or cut off "
                    "longer than %ss); claiming the node again", self.node, self.fence.lease,
                    self.ttl)
        self._lease = 0
        self.fence.lost("its etcd lease expired")

    def _margin(self) -> float:
        return min(1.0, self.ttl / 4)

    def _refuse(self, reason: str) -> None:
        """Not serving: one line per holder, not one per retry."""
        self.fence.reason = reason
        if reason != self._refused_by:
            self._refused_by = reason
            log.error("%s; this daemon does not serve node %s and retries every %gs",
                      reason, self.node, self.retry)
            self.on_change()

    async def release(self) -> None:
        """Give the node up at once (clean stop): revoke the lease, which deletes the key."""
        lease, self._lease = self._lease, 0
        self.fence.lease = 0
        if lease:
            await self.store.revoke_lease(lease)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
