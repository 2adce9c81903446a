"""The allocation engine: one node's policy (the planner) run against etcd.

:class:`AllocationEngine` serves one node. It plans every call with the
pure planner (:mod:`topoipam.daemon.core.planner`) over a view of the
cluster: the daemon's watch-synced cache, or :class:`EtcdSource`, which reads
etcd on every call (tests, and library use). Whatever the view lacks is
read before the call is planned again (:mod:`.planning`). It writes only
through :meth:`EtcdStore.commit`: block, affinity and handle change together
in one etcd transaction, or not at all. Its jobs, one module each:

* :mod:`.committer` -- the queue, the group commit, the conflict loop;
* :mod:`.planning` -- the planner's caller: views, the reads they lack;
* :mod:`.upkeep` -- warm reserve, claim look-ahead, index repair, sticky
  expiry, unwanted blocks, stale handles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .core.calls import AllocatedAddress, Allocation, AllocationRequest
from .core.claims import ClaimHint
from .core.holdings import Attachment
from .core.view import ClusterState
from .planning import EtcdSource, StateSource
from .upkeep import Upkeep

# The names tests and older callers import from here.
_ClaimHint = ClaimHint
__all__ = ["AllocatedAddress", "Allocation", "AllocationEngine", "AllocationRequest",
           "ClusterState", "EtcdSource", "StateSource"]


class AllocationEngine(Upkeep):
    """Allocation and release for one node. Safe to call from many tasks at once.

    Group commit: calls that arrive while a transaction is in flight are
    planned together and committed in the next single transaction, bounded
    by etcd's operation limit. Each call still succeeds or fails on its own:
    a call that cannot be planned fails alone, and the batch's transaction is
    all-or-nothing, so nothing is acknowledged that etcd has not committed.
    """

    async def readiness(self, families: Sequence[int],
                        requested: Mapping[int, Sequence[str]]) -> str:
        """Why an ADD asking for ``families`` (from ``requested`` pools) cannot succeed now.

        "" when it can: the planner's dry run of an ADD, committed nowhere.
        Only as current as the state it reads: a racing ADD may still take the
        last address.
        """
        state = await self.source.state()
        view = self.source.view(state)
        result: str = await self._plan(
            view, lambda: self.planner.readiness(view, families, requested))
        return result

    async def get(self, attachment: Attachment) -> Allocation | None:
        handle = await self.store.get_handle(attachment.handle_id)
        if handle is None:
            legacy = await self.store.get_handle(attachment.legacy_handle_id)
            handle = legacy if legacy is not None and legacy.value.belongs_to(attachment) else None
        if handle is None:
            return None
        return self.planner.allocation_of(handle.value, await self.source.state())
