"""Foresight: what the next ADD on a node would get, planned by the daemon's own planner.

:func:`predict` runs the pure planner (:mod:`topoipam.daemon.core.planner`)
over a fresh view of etcd for one node and one request, exactly as that
node's daemon plans an ADD, and commits nothing: the prediction names the
pool, its priority tier, the block, the address and the path (the node's own
block, a claim, a reclaim, a borrow, or a sticky identity's parked address).
If nothing changes in between, the node's next ADD with that request gets the
same address: the planner is the same function of the same state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .core import allocator
from .core.allocator import TxnPlan
from .core.calls import AllocateCall, AllocatedAddress, Allocation, AllocationRequest
from .core.errors import TopoipamError
from .core.planner import Planner
from .planning import EtcdSource, plan_reading
from .store import EtcdStore

#: How each address would be found, as :func:`predict` names it.
OWN_BLOCK, CLAIM, RECLAIM, BORROW, STICKY, HELD = (
    "own block", "claim", "reclaim", "borrow", "sticky", "held")


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


async def predict(store: EtcdStore, node: str, request: AllocationRequest) -> Prediction:
    """What ``node``'s next ADD of ``request`` would get, and why; nothing is written."""
    source = EtcdSource(store, node)
    planner = Planner(node)
    state = await source.state()
    view = source.view(state)
    txn = TxnPlan(state.pools)
    call = AllocateCall(request)
    prediction = Prediction(node, request)
    try:
        answered = await plan_reading(store, source, view, planner,
                                      lambda: planner.plan(view, call, txn), txn)
    except TopoipamError as exc:
        prediction.refused = exc.message
        return prediction
    if answered:  # the attachment holds its addresses already: a repeated ADD
        result: Allocation = call.result
        prediction.addresses = [PredictedAddress(a, HELD, why="the attachment holds it "
                                                 "already (a repeated ADD answers it)")
                                for a in result.addresses]
        return prediction
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
    return prediction


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
