"""Foresight: what the next ADD on a node would get, planned by the daemon's own planner.

:func:`predict` runs the pure planner (:mod:`topoipam.daemon.core.planner`)
over a fresh view of etcd for one node and one request, exactly as that
node's daemon plans an ADD, and writes nothing (not even the note of a
daemon's absence that a real ADD may write: that would start a sticky
takeover's clock). The prediction names the pool, its priority tier, the
block, the address and the path (the node's own block, a claim, a reclaim, a
borrow, or a sticky identity's parked address). If nothing changes in
between, the node's next ADD with that request gets the same address: the
planner is the same function of the same state.

What can still part the two is said with the prediction, as facts for the
caller to show: time alone (an address's cooldown or a sticky hold ending:
:attr:`Prediction.until` is the planner asked again at that moment), the
node's daemon having found its next claim ahead from an older view of the
pool (:attr:`Prediction.looked_ahead`), the attachments the pod holds
already and its sticky identities on other networks (the request names one
network and a new container), and a node without a daemon.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .core import allocator
from .core.allocator import TxnPlan
from .core.calls import AllocateCall, AllocatedAddress, Allocation, AllocationRequest
from .core.claims import CLAIM_HINT_SECONDS
from .core.errors import TopoipamError
from .core.holdings import Block, Handle, Identity
from .core.planner import Planner
from .core.view import ClusterState, Read, ReadingView
from .core.writes import Versioned
from .planning import EtcdSource, StateSource, plan_reading, read
from .store import EtcdStore

#: How each address would be found, as :func:`predict` names it.
OWN_BLOCK, CLAIM, RECLAIM, BORROW, STICKY, HELD = (
    "own block", "claim", "reclaim", "borrow", "sticky", "held")

#: How many moments (a cooldown's end, a sticky hold's end) are tried for a change.
MOMENTS = 4

#: The network of a request whose network the caller does not know: the pod's
#: attachments on every network are its own.
UNNAMED_NETWORK = "explain"

#: The daemon's claim look-ahead is used only this fresh (see core.claims).
LOOK_AHEAD_SECONDS = CLAIM_HINT_SECONDS


@dataclass
class PredictedAddress:
    address: AllocatedAddress
    path: str  # one of OWN_BLOCK, CLAIM, RECLAIM, BORROW, STICKY, HELD
    #: The priority tier that serves it (1: the top one) and how many the node has.
    tier: int = 1
    tiers: int = 1
    why: str = ""


@dataclass
class Prediction:
    node: str
    request: AllocationRequest
    addresses: list[PredictedAddress] = field(default_factory=list)
    #: Why nothing can be given (the ADD's own error), "" when it can.
    refused: str = ""
    #: Time alone changes the answer: (when, what happens then, the answer from then on).
    until: tuple[float, str, Prediction] | None = None
    #: Pools a claim is predicted in whose next claim the node's daemon may have found
    #: ahead, from a view up to LOOK_AHEAD_SECONDS old (it claims that block first).
    looked_ahead: list[str] = field(default_factory=list)
    #: Whether a topoipamd serves the node now, and whether the node is registered.
    daemon_alive: bool = True
    registered: bool = True
    #: The pod's attachments that hold addresses already (any node; the request's
    #: network only, when it names one).
    held: list[Handle] = field(default_factory=list)
    #: The pod's sticky identities (its interface) that the request does not use.
    other_identities: list[Identity] = field(default_factory=list)

    def same_answer(self, other: Prediction) -> bool:
        return (self.refused == other.refused and [a.address.ip for a in self.addresses]
                == [a.address.ip for a in other.addresses])


async def _read_only(store: EtcdStore, source: StateSource, what: Read) -> Any:
    """:func:`read`, without the one read that writes: a daemon's absence is looked up,
    never noted (noting it starts the takeover clock of the identities it holds)."""
    if what[0] == "daemon_absence":
        return await store.daemon_absence(what[1], note=False)
    return await read(store, source, what)


async def predict(store: EtcdStore, node: str, request: AllocationRequest) -> Prediction:
    """What ``node``'s next ADD of ``request`` would get, why, and what could make it
    differ; nothing is written."""
    now = time.time()
    prediction, view, state = await _plan(store, node, request, now)
    await _look_later(store, prediction, view, state, now)
    daemon, registered, handles, identities = (
        await store.get_daemon(node), await store.get_node(node), await store.list_handles(),
        await store.list_identities())
    prediction.daemon_alive, prediction.registered = daemon is not None, registered is not None
    pools = {p.name: p for p in state.pools}
    if prediction.daemon_alive:
        prediction.looked_ahead = sorted({
            a.address.pool for a in prediction.addresses if a.path == CLAIM
            and a.address.pool in pools and not pools[a.address.pool].topology_key})
    namespace, pod = request.attributes.get("namespace"), request.attributes.get("pod")
    network = request.attachment.network
    prediction.held = [h.value for h in handles
                       if h.value.attributes.get("namespace") == namespace
                       and h.value.attributes.get("pod") == pod
                       and network in (UNNAMED_NETWORK, h.value.attributes.get("network"))]
    prediction.other_identities = [
        i.value for i in identities
        if i.value.id.split("/")[1:] == [namespace, pod, request.attachment.ifname]
        and i.value.id != request.identity]
    return prediction


async def _plan(store: EtcdStore, node: str, request: AllocationRequest, now: float
                ) -> tuple[Prediction, ReadingView, ClusterState]:
    """The planner's answer at time ``now``, from a fresh view of etcd."""
    source = EtcdSource(store, node)
    planner = Planner(node, lambda: now)
    state = await source.state()
    view = source.view(state)
    txn = TxnPlan(state.pools)
    call = AllocateCall(request)
    prediction = Prediction(node, request)
    try:
        answered = await plan_reading(store, source, view, planner,
                                      lambda: planner.plan(view, call, txn), txn,
                                      reader=_read_only)
    except TopoipamError as exc:
        prediction.refused = exc.message
        return prediction, view, state
    if answered:  # the attachment holds its addresses already: a repeated ADD
        result: Allocation = call.result
        prediction.addresses = [PredictedAddress(a, HELD, why="the attachment holds it "
                                                 "already (a repeated ADD answers it)")
                                for a in result.addresses]
        return prediction, view, state
    fallen = dict(call.fallbacks)
    held = view.reads.get(("identity", request.identity)) if request.identity else None
    kept = {a.ip for a in held.value.addresses} if held is not None else set()
    for address in call.addresses:
        family = address.ip.version
        named = request.requested_pools(family)
        try:
            pools = allocator.pools_for_node(state.pools, node, state.labels, family, named)
        except TopoipamError:
            pools = []
        tiers = [pools] if named else allocator.priority_tiers(pools)
        tier = next((i for i, t in enumerate(tiers, 1) if any(p.name == address.pool for p in t)),
                    1)
        prediction.addresses.append(PredictedAddress(
            address, STICKY if address.ip in kept else _path(node, address, txn), tier,
            len(tiers),
            f"the tier above ({', '.join(p.name for p in tiers[0])}) could not serve"
            if tier > 1 and fallen else ""))
    return prediction, view, state


async def _look_later(store: EtcdStore, prediction: Prediction, view: ReadingView,
                      state: ClusterState, now: float) -> None:
    """Ask the planner again at the moments time alone may change its answer (the end of
    an address's cooldown in a block it read, of the request's sticky hold); the first
    that changes it is :attr:`Prediction.until`."""
    moments = sorted(set(_moments(view, state, now)))[:MOMENTS]
    for when, why in moments:
        later, _, _ = await _plan(store, prediction.node, prediction.request, when + 0.001)
        if not later.same_answer(prediction):
            prediction.until = (when, why, later)
            return


def _moments(view: ReadingView, state: ClusterState, now: float) -> Iterator[tuple[float, str]]:
    cooldown = state.config.ip_cooldown_seconds
    for value in view.reads.values():
        if cooldown:
            for block in _blocks(value):
                for ordinal in block.unallocated:
                    released = block.released_at.get(ordinal)
                    if released is not None and now < released + cooldown:
                        yield released + cooldown, f"{block.address(ordinal)}'s cooldown ends"
        if isinstance(value, Versioned) and isinstance(value.value, Identity):
            identity = value.value
            if identity.parked and now < (identity.parked_until or 0.0):
                yield identity.parked_until or 0.0, f"the sticky hold of {identity.id} ends"


def _blocks(value: object) -> Iterator[Block]:
    """The blocks in one read's answer (a block, or a list of them)."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, Versioned) and isinstance(item.value, Block):
            yield item.value


def _path(node: str, address: AllocatedAddress, txn: TxnPlan) -> str:
    planned = txn.blocks.get(address.block)
    if planned is None:
        return OWN_BLOCK
    block, revision = planned
    if revision == 0:
        return CLAIM
    if address.block in txn.reclaimed:
        return RECLAIM
    if block is not None and block.affinity != node:
        return BORROW
    return OWN_BLOCK
