"""The planner: a node's whole allocation policy, as a function of a view of the cluster.

Given a read-only :class:`~.view.View` and a call, :meth:`Planner.plan`
plans the call into a :class:`~.allocator.TxnPlan` (the guarded writes of one
etcd transaction) and records on the call what it will answer. It never
waits and never writes: where the view lacks something it raises
:class:`~.view.NeedRead`, and its caller reads that and plans again. So the
daemon (:mod:`topoipam.daemon.engine`), the CLI and any "what would happen
if" ask the same policy:

1. a sticky ADD takes its identity's addresses back (:mod:`.sticky`);
2. a specific address is assigned where its pool's block is, or would be;
3. otherwise, for each priority tier of the pools that select the node
   (highest first; a lower tier only when a higher one cannot serve): the
   first free address of this node's own blocks, pool order then address
   order (blocks a relabelled node kept in another value's topology range
   aside); else a new block is claimed (room index, :mod:`.claims`; with a
   topologyKey, in the node's value's ranges, :mod:`.topology`); else an
   empty block of another node is reclaimed (with a topologyKey, only in the
   value's ranges); else, unless strictAffinity, an address is borrowed from
   another node's block (free-block index).

A DEL frees the handle's addresses (or parks them for a sticky identity)
and drops blocks it leaves empty that nobody wants. The algorithms, in prose:
docs/design.md#allocation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from . import allocator
from .allocator import TxnPlan
from .calls import (
    AllocateCall,
    AllocatedAddress,
    AllocationRequest,
    AnyCall,
    Defer,
    ReleaseCall,
    ReleaseIdentityCall,
)
from .errors import AddressUnavailable, PoolExhausted, TopoipamError
from .holdings import Attachment, Block, Handle, HandleAddress, Identity
from .model import IPAddress, IPNetwork, IPPool
from .sticky import StickyPlanner
from .view import View
from .writes import DeleteHandle, PutHandle, PutIdentity, Versioned


class Planner(StickyPlanner):
    """The allocation policy of node ``node``. Pure: no I/O, no waiting; its memory
    (:class:`~.claims.PlannerMemory`) holds only hints."""

    def plan(self, view: View, call: AnyCall, txn: TxnPlan) -> bool:
        """Plan ``call`` into ``txn``; True if it was answered without a write.

        Raises the call's TopoipamError (nothing of it is planned: the caller
        restores ``txn``), Defer (it touches what ``txn`` already changes:
        plan it in the next transaction) or NeedRead.
        """
        call.start()
        if isinstance(call, AllocateCall):
            return self.plan_allocation(view, call, txn)
        if isinstance(call, ReleaseIdentityCall):
            return self.plan_identity_release(view, call, txn)
        return self.plan_release(view, call, txn)

    # ------------------------------------------------------------------ ADD
    def plan_allocation(self, view: View, call: AllocateCall, txn: TxnPlan) -> bool:
        state = view.state()
        request = call.request
        handle_id = request.attachment.handle_id
        if handle_id in txn.handles:
            raise Defer()
        kept: set[int] = set()
        identity: Versioned[Identity] | None = None
        if request.identity:  # the only extra read, and only for sticky networks
            if request.identity in txn.identities:
                raise Defer()
            identity = view.identity(request.identity)
            if identity is not None:
                taken = self.take_back(view, call, identity, txn)
                if taken is None:
                    return True  # a repeated ADD, answered with what it holds
                kept = taken
        for family in request.families():
            if family in kept:
                continue
            specific = request.specific(family)
            if specific is not None:
                self.plan_specific(view, call, family, specific, txn)
            else:
                requested = request.requested_pools(family)
                self.plan_tiers(view, self.pools_for(state, family, requested), family, call,
                                txn, bool(requested))
        handle = Handle(
            id=handle_id,
            node=self.node,
            addresses=tuple(HandleAddress(a.ip, a.block, a.pool, a.subnet, a.gateway)
                            for a in call.addresses),
            attributes={
                **{k: v for k, v in request.attributes.items() if k != "identity"},
                "network": request.attachment.network,
                "container_id": request.attachment.container_id,
                "ifname": request.attachment.ifname,
                **({"identity": request.identity} if request.identity else {}),
            },
        )
        txn.handles[handle_id] = PutHandle(handle, 0)
        if request.identity:
            txn.identities[request.identity] = PutIdentity(
                Identity(request.identity, handle.addresses, "live", handle_id, self.node),
                identity.mod_revision if identity is not None else 0)
        return False

    def plan_specific(self, view: View, call: AllocateCall, family: int, address: IPAddress,
                      txn: TxnPlan) -> None:
        state = view.state()
        request = call.request
        handle_id = request.attachment.handle_id
        requested = request.requested_pools(family)
        candidates = (
            allocator.pools_for_node(state.pools, self.node, state.labels, family, requested)
            if requested else [p for p in state.pools if not p.disabled]
        )
        pool = allocator.pool_of(candidates, address)
        if pool is None:
            raise AddressUnavailable(f"address {address} is not in any enabled pool"
                                     + (f" of {', '.join(requested)}" if requested else ""))
        ctx = self.context(state, pool, request)
        cidr = next((c for c in txn.blocks if address in c), None)
        if cidr is not None:
            planned, revision = txn.blocks[cidr]
            if planned is None:
                raise Defer()
            txn.put_block(allocator.assign_address(planned, address, handle_id, ctx), revision,
                          planned)
        else:
            # The block may have another size than the pool's (left over from a deleted pool).
            current = view.block(pool.block_of(address))
            if current is None:
                current = view.block_containing(address)
            if current is not None:
                cidr = current.value.cidr
                txn.put_block(allocator.assign_address(current.value, address, handle_id, ctx),
                              current.mod_revision, current.value)
            else:
                cidr = pool.block_of(address)
                if view.block_cidrs(cidr):
                    raise AddressUnavailable(
                        f"address {address}: its block {cidr} would overlap a smaller block "
                        "left over from another pool")
                # In its value's range, or one it takes: never in another value's.
                self.place_block(view, pool, cidr, txn, address)
                block = allocator.assign_address(Block.empty(cidr, self.node), address,
                                                 handle_id, ctx)
                txn.put_block(block, 0, None)
                txn.affinities[(self.node, cidr)] = True
        call.addresses.append(AllocatedAddress.of(address, cidr, pool))

    def _own_blocks(self, view: View, txn: TxnPlan) -> list[tuple[Block, int]]:
        """This node's blocks as ``txn`` has them so far, with the revisions guarding them."""
        if txn.affine_read is None:  # one read per batch (a cache hit in the daemon)
            txn.affine_read = view.affine_blocks()
        if not txn.blocks:  # the common case: nothing planned yet in this transaction
            return [(v.value, v.mod_revision) for v in txn.affine_read]
        affine = []
        for versioned in txn.affine_read:
            block = txn.current(versioned)
            if block is not None:
                guard = txn.blocks.get(block.cidr, (None, versioned.mod_revision))[1]
                affine.append((block, guard))
        known = {block.cidr for block, _ in affine}
        return affine + [(b, 0) for b in txn.claimed(self.node) if b.cidr not in known]

    def plan_tiers(self, view: View, pools: Sequence[IPPool], family: int, call: AllocateCall,
                   txn: TxnPlan, named: bool = False) -> None:
        """The next free address of ``family``: from the highest-priority pools that can
        give one (:meth:`plan_next` each tier in turn); ``named`` pools are one tier."""
        tiers = [list(pools)] if named else allocator.priority_tiers(pools)
        failures: list[tuple[list[IPPool], PoolExhausted]] = []
        for tier in tiers:
            try:
                self.plan_next(view, tier, family, call, txn)
            except PoolExhausted as exc:
                failures.append((tier, exc))
                continue
            if failures:
                call.fallbacks.append((tiers[0][0].name, call.addresses[-1].pool))
            return
        if len(failures) == 1:
            raise failures[0][1]
        state = view.state()
        raise PoolExhausted(
            self.node, state.labels, family, [p.name for p in pools],
            "; ".join(f"priority {tier[0].priority} ({', '.join(p.name for p in tier)}): "
                      f"{exc.reason}" for tier, exc in failures))

    def plan_next(self, view: View, pools: Sequence[IPPool], family: int, call: AllocateCall,
                  txn: TxnPlan) -> None:
        """The next free address of ``family`` from ``pools``: own blocks, claim, borrow."""
        state = view.state()
        handle_id = call.request.attachment.handle_id
        affine = self._own_blocks(view, txn)
        # 1. this node's own blocks with free addresses, pool order then address order
        with_space = [entry for entry in affine
                      if entry[0].unallocated and entry[0].family == family]
        for pool in pools:
            ctx = self.context(state, pool, call.request)
            first, last = pool.bounds
            for block, revision in sorted(
                (entry for entry in with_space
                 if first <= entry[0].first and entry[0].last <= last),
                key=lambda entry: entry[0].first,
            ):
                if pool.topology_key and self.in_foreign_range(view, block, txn):
                    continue  # kept across a relabel: no new address there
                assigned = allocator.assign_next(block, handle_id, ctx)
                if assigned is not None:
                    new, address = assigned
                    txn.put_block(new, revision, block)
                    call.addresses.append(AllocatedAddress.of(address, new.cidr, pool))
                    return
        # 2. claim a new block for this node
        config = state.config
        reason = ""
        if not config.auto_allocate_blocks:
            reason = "autoAllocateBlocks is off"
        elif allocator.at_block_cap(config.max_blocks_per_host, (b for b, _ in affine), family):
            reason = (f"node has reached maxBlocksPerHost={config.max_blocks_per_host} "
                      f"for IPv{family}")
        else:
            for pool in pools:
                cidr = self.unclaimed_block(view, pool, txn)
                if cidr is None:
                    continue
                assigned = allocator.assign_next(
                    Block.empty(cidr, self.node), handle_id,
                    self.context(state, pool, call.request))
                if assigned is None:
                    continue
                new, address = assigned
                txn.put_block(new, 0, None)
                txn.affinities[(self.node, cidr)] = True
                call.addresses.append(AllocatedAddress.of(address, cidr, pool))
                return
            # 2b. reclaim an empty block another node holds
            for pool in pools:
                found = self.reclaimable_block(view, pool, txn)
                if found is None:
                    continue
                empty = found.value
                taken = Block(empty.cidr, self.node, {}, list(empty.unallocated),
                              dict(empty.released_at))
                assigned = allocator.assign_next(taken, handle_id,
                                                 self.context(state, pool, call.request))
                if assigned is None:
                    continue
                new, address = assigned
                txn.reclaim_block(new, found.mod_revision, empty)
                call.addresses.append(AllocatedAddress.of(address, new.cidr, pool))
                return
            reason = "no unclaimed block left and no empty block to reclaim"
        # 3. borrow from another node's block
        if config.strict_affinity:
            raise PoolExhausted(
                self.node, state.labels, family, [p.name for p in pools],
                f"{reason}, and strictAffinity forbids borrowing from other nodes' blocks",
            )
        for pool in pools:
            ctx = self.context(state, pool, call.request)
            for versioned in self.borrow_candidates(view, pool, txn):
                lender = txn.current(versioned)
                if lender is None or lender.affinity == self.node:
                    continue
                assigned = allocator.assign_next(lender, handle_id, ctx)
                if assigned is not None:
                    new, address = assigned
                    txn.put_block(new, versioned.mod_revision, lender)
                    call.addresses.append(AllocatedAddress.of(address, new.cidr, pool))
                    return
        raise PoolExhausted(self.node, state.labels, family, [p.name for p in pools],
                            f"{reason}; no free address to borrow")

    # ------------------------------------------------------------------ DEL
    def plan_release(self, view: View, call: ReleaseCall, txn: TxnPlan) -> bool:
        handle_id = call.handle_id
        if handle_id in txn.handles:
            raise Defer()
        handle = self.memory.handles.get(handle_id) or view.handle(handle_id)
        if handle is None and call.legacy is not None:
            handle = self.legacy_handle(view, call.legacy)
            if handle is not None:
                call.handle_id = handle_id = handle.value.id
                call.legacy = None
        if handle is None:
            return call.answer([])
        txn.handles[handle_id] = DeleteHandle(handle_id, handle.mod_revision)
        identity_id = handle.value.attributes.get("identity")
        if identity_id and self.plan_parking(view, identity_id, handle, txn):
            return False
        by_block: dict[IPNetwork, list[IPAddress]] = {}
        for entry in handle.value.addresses:
            by_block.setdefault(entry.block, []).append(entry.ip)
        for cidr, addresses in by_block.items():
            block, revision = self.planned_block(view, cidr, txn)
            if block is None:
                continue  # the block is gone: nothing left to free there
            new, freed = allocator.release_addresses(block, addresses, handle_id, self.clock())
            call.freed += freed
            self.put_or_drop(view, txn, new, revision, block)
        return False

    @staticmethod
    def legacy_handle(view: View, attachment: Attachment) -> Versioned[Handle] | None:
        """The attachment's handle under its pre-0.2 dotted id, if one was written for it."""
        handle = view.handle(attachment.legacy_handle_id)
        if handle is not None and handle.value.belongs_to(attachment):
            return handle
        return None

    # ------------------------------------------------------------------ questions
    def readiness(self, view: View, families: Sequence[int],
                  requested: Mapping[int, Sequence[str]]) -> str:
        """Why an ADD asking for ``families`` (from ``requested`` pools) cannot succeed now.

        "" when it can. The plan an ADD makes (own blocks, then a claim, then
        borrowing), committed nowhere; with no family given, every family
        that has a pool is checked.
        """
        state = view.state()
        if not families:
            families = sorted({p.family for p in state.pools})
            if not families:
                return "no IP pool exists"
        probe = AllocateCall(AllocationRequest(Attachment("status", "readiness-probe", "eth0")))
        for family in families:
            try:
                named = tuple(requested.get(family, ()))
                self.plan_tiers(view, self.pools_for(state, family, named), family, probe,
                                TxnPlan(state.pools), bool(named))
            except TopoipamError as exc:
                return exc.message
        return ""

    def reserve_claim(self, view: View, spent: set[int], txn: TxnPlan) -> bool:
        """Plan one claim of the warm reserve into ``txn``: False when no IP family is
        short of ``warmAddresses`` free addresses, or none may claim. A family whose
        pools have no block left to claim goes to ``spent`` (its requests will borrow)."""
        state = view.state()
        config = state.config
        if not config.warm_addresses or not config.auto_allocate_blocks:
            return False
        affine = [v.value for v in view.affine_blocks()]
        cidr = None
        while cidr is None:
            short = self.short_family(state, affine, config.warm_addresses, spent)
            if short is None:
                return False
            family, pools = short
            for pool in pools:
                cidr = self.unclaimed_block(view, pool, txn)
                if cidr is not None:
                    break
            else:
                spent.add(family)
        txn.put_block(Block.empty(cidr, self.node), 0, None)
        txn.affinities[(self.node, cidr)] = True
        return True
