"""The write gate: what a daemon's commits must pass, in one object given to the store.

:class:`WriteGate` holds the node's fence (:class:`CommitFence`), the pause
state (:class:`WritePause`, with a human reason for errors and Status), the
watch on etcd's history (:class:`EtcdHistory`) and the commit hook (the
node's record of allocations). The daemon builds it and passes it to
:class:`~topoipam.daemon.store.EtcdStore` at construction; the CLI's store
gets an open gate (no fence, no history, no hook), so its commits are never
refused for a node.

A daemon's store is *fenced*: every transaction it commits also compares
that ``daemons/<node>`` is still on the daemon's own lease, so a daemon that
lost its node identity (another took over, its lease lapsed while it was
frozen or cut off) cannot write for the node, whatever it believes. The
history watch sees a revision below one already seen, or another cluster ID:
etcd went back (restored from a snapshot), and the daemon pauses its writes
until it has re-asserted what it handed out. The keeper of the fence is
:mod:`topoipam.daemon.fence`.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import EtcdWentBack, NodeFenced, NotReady
from ..core.writes import Write


@dataclass
class CommitFence:
    """The node identity a daemon's commits are fenced with (see the module docstring).

    ``lease`` is the etcd lease ``daemons/<node>`` must be on for a commit to
    apply; 0 while the daemon holds no fence. ``valid_until`` (monotonic
    clock) is when the lease may have expired by our own reckoning, counted
    from when the last successful keep-alive was *sent*: past it the daemon
    refuses locally too, before etcd could let another daemon take over.
    """

    node: str
    key: bytes
    lease: int = 0
    valid_until: float = 0.0
    #: Why we do not hold the fence, for errors and Status ("" while held).
    reason: str = "it has not acquired its node identity yet"
    #: Called when the fence is found gone (the daemon stops serving).
    on_lost: Callable[[], None] = lambda: None
    #: Set when the fence is found gone: wakes the keeper, which claims it again.
    lost_signal: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def held(self) -> bool:
        return bool(self.lease) and time.monotonic() < self.valid_until

    def lost(self, reason: str) -> None:
        self.lease = 0
        self.reason = reason
        self.lost_signal.set()
        self.on_lost()


@dataclass
class EtcdHistory:
    """The newest etcd revision and the cluster ID this daemon has seen.

    etcd revisions only grow in one cluster, and a linearizable read or a
    transaction sent after we saw revision R answers with a revision >= R.
    Anything else means etcd lost history (restored from a snapshot) or is
    another cluster; ``on_went_back`` is told why, once per occurrence.
    """

    revision: int = 0
    cluster_id: int = 0
    on_went_back: Callable[[str], None] = lambda reason: None

    def observe(self, floor: int, header: Any) -> None:
        revision, cluster = int(header.revision), int(header.cluster_id)
        reason = ""
        if self.cluster_id and cluster and cluster != self.cluster_id:
            reason = (f"etcd cluster ID changed from {self.cluster_id:x} to {cluster:x} "
                      "(restored from a snapshot, or another cluster)")
        elif revision and revision < floor:
            reason = (f"etcd revision went back to {revision} from {floor} "
                      "(restored from a snapshot?)")
        if cluster:
            self.cluster_id = cluster
        if reason:
            self.revision = revision
            self.on_went_back(reason)
            raise EtcdWentBack(reason)
        if revision > self.revision:
            self.revision = revision

    def forget(self) -> None:
        """Start over (another datastore): nothing seen yet, so nothing can go back."""
        self.revision = self.cluster_id = 0


class WritePause(enum.Enum):
    """Whether ordinary writes wait; while they do, only a re-assertion's commits pass."""

    #: Writes pass (if the fence is held).
    NONE = "none"
    #: The daemon checks its record of allocations against etcd (start-up, after a relist).
    CHECKING_RECORD = "checking record"
    #: etcd went back: the daemon re-asserts its record before writing anything else.
    REASSERTING = "reasserting"


_PAUSE_REASONS = {
    WritePause.CHECKING_RECORD: "it is checking its record of allocations against etcd",
    WritePause.REASSERTING: "etcd went back; it is re-asserting its record of allocations",
}


@dataclass
class WriteGate:
    """The fence, pause state, history watch and commit hook of a store's commits.

    Every field is optional: the default gate (the CLI's) admits every
    commit and watches nothing. ``pause_reason`` says why writes wait, in the
    words errors and Status show ("" while they pass).
    """

    fence: CommitFence | None = None
    history: EtcdHistory | None = None
    #: Called with the writes and revision of every successful commit (the local record).
    on_committed: Callable[[Sequence[Write], int], None] | None = None
    pause: WritePause = WritePause.NONE
    pause_reason: str = ""

    def __post_init__(self) -> None:
        if self.pause is not WritePause.NONE and not self.pause_reason:
            self.pause_reason = _PAUSE_REASONS[self.pause]

    @property
    def paused(self) -> bool:
        return self.pause is not WritePause.NONE

    def pause_writes(self, pause: WritePause, reason: str = "") -> None:
        """Hold ordinary writes for ``pause``; ``reason`` (default: the state's) is shown."""
        if pause is WritePause.NONE:
            raise ValueError("pause_writes needs a reason to pause; use resume_writes")
        self.pause, self.pause_reason = pause, reason or _PAUSE_REASONS[pause]

    def resume_writes(self) -> None:
        self.pause, self.pause_reason = WritePause.NONE, ""

    def admit(self, reassert: bool) -> CommitFence | None:
        """The fence a fenced commit must compare (None: not fenced), or why it may not be
        sent: NodeFenced without the fence, NotReady while paused (unless ``reassert``)."""
        fence = self.fence
        if fence is None:
            return None
        if not fence.held():
            raise NodeFenced(fence.node, fence.reason or "its etcd lease lapsed")
        if self.paused and not reassert:
            raise NotReady(self.pause_reason)
        return fence

    def refused(self, fence: CommitFence, held: Sequence[Any]) -> None:
        """After a failed fenced commit: ``held`` is what etcd holds at the fence key.
        Raises NodeFenced (and tells the fence it is lost) when it is no longer ours."""
        if not held or int(held[0].lease) != fence.lease:
            fence.lost(_holder_of(held[0].value) if held else "its node fence vanished "
                       "from etcd (lease expired or deleted)")
            raise NodeFenced(fence.node, fence.reason)

    def committed(self, writes: Sequence[Write], revision: int) -> None:
        if self.on_committed is not None:
            self.on_committed(writes, revision)


def _holder_of(raw: bytes) -> str:
    """Who a fence key's value names, for the one line an operator reads."""
    try:
        info = json.loads(raw)
    except ValueError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    return (f"it is held by topoipamd pid {info.get('pid', '?')} on host "
            f"{info.get('host', '?')} (instance {info.get('instance', '?')})")
