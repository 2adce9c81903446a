"""The sticky plans: an identity's addresses parked, taken back, taken over, released.

A sticky attachment's DEL parks its addresses for its identity
(``stickyHoldSeconds``); the identity's next ADD, on any node, takes them
back; an ADD whose identity is held live by a node without a daemon for
``stickyTakeoverSeconds`` takes it over; the operator parks one by hand
(``ipam release --identity ID --park``) or frees a parked one. Each is one
transaction with the blocks it touches.
"""

from __future__ import annotations

from . import allocator
from .allocator import TxnPlan
from .calls import AllocateCall, AllocatedAddress, AllocationRequest, Defer, ReleaseIdentityCall
from .claims import PlannerBase
from .errors import IdentityInUse, NodeAlive
from .holdings import Block, Handle, Identity, parked_holder
from .model import IPAddress, IPPool
from .view import ClusterState, View
from .writes import DaemonAbsent, DeleteHandle, DeleteIdentity, PutIdentity, Versioned


class StickyPlanner(PlannerBase):
    """Sticky identities' plans, for the node this planner serves."""

    def take_back(self, view: View, call: AllocateCall, read: Versioned[Identity],
                  txn: TxnPlan) -> set[int] | None:
        """Plan a sticky ADD's return of the addresses its identity holds.

        Per family the request wants, the identity's address is handed to the
        new handle if its hold is not over, one of the pools that would serve
        this node contains it, and the rules allow it here (reservations,
        gateways; strictAffinity when the block is another node's). Every other
        address of the identity is freed in the same transaction. Returns the
        families kept, or None when the ADD repeats the live attachment's own
        (answered from its handle). Raises IdentityInUse when another attachment
        holds the identity live (nothing is planned), unless it is taken over
        (:meth:`_take_over`).
        """
        state = view.state()
        request = call.request
        handle_id = request.attachment.handle_id
        identity = read.value
        holder = parked_holder(identity.id)
        if not identity.parked:
            current = view.handle(identity.handle)
            if identity.handle == handle_id and current is not None:
                call.answer(self.existing_allocation(request, current.value, state))
                return None
            if current is not None:
                identity = self._take_over(view, call, read, current, txn)
            else:
                holder = identity.handle  # its handle was removed by hand: take over its blocks
        now = self.clock()
        wanted = request.families()
        kept: set[int] = set()
        for entry in identity.addresses:
            family = entry.ip.version
            cidr = entry.block
            block, revision = self.planned_block(view, cidr, txn)
            if block is None:
                continue  # the block is gone, and the address with it
            pool = None
            if (family in wanted and family not in kept and not identity.expired(now)
                    and request.specific(family) in (None, entry.ip)):
                pool = allocator.pool_of(
                    self.pools_for(state, family, request.requested_pools(family)), entry.ip)
            if pool is not None and self._may_keep(state, pool, block, entry.ip, request):
                handed = allocator.hand_over(block, entry.ip, holder, handle_id)
                if handed is not None:
                    txn.put_block(handed, revision, block)
                    call.addresses.append(AllocatedAddress.of(entry.ip, cidr, pool))
                    kept.add(family)
                    continue
            new, _ = allocator.release_addresses(block, [entry.ip], holder, now)
            self.put_or_drop(view, txn, new, revision, block)
        return kept

    def _take_over(self, view: View, call: AllocateCall, read: Versioned[Identity],
                   current: Versioned[Handle], txn: TxnPlan) -> Identity:
        """A sticky ADD of an identity another attachment holds live: refused
        (IdentityInUse, saying how long that node has had no daemon, if so), unless
        that node has had no live daemon for ``stickyTakeoverSeconds``. Then the
        identity is parked as the lost attachment's DEL would have done it, in
        this transaction, which compares that the node still has no daemon
        (and the same absence record); the caller hands it on like any parked
        identity. Returns the parked identity.
        """
        identity = read.value
        takeover = view.state().config.sticky_takeover_seconds
        absence = None  # this node's own daemon is alive: it is the one asking
        if identity.node != self.node:
            absence = view.daemon_absence(identity.node)
        gone = absence.seconds if absence is not None else None
        if gone is None or not takeover or gone < takeover:
            raise IdentityInUse(identity.id, identity.handle, identity.node,
                                call.request.attachment.handle_id, self.node,
                                holder_alive=absence is None, gone_seconds=gone,
                                takeover_seconds=takeover)
        assert absence is not None
        call.took_over = (identity.node, absence)
        return self._park_live(view, read, current, txn,
                               DaemonAbsent(identity.node, absence.noted_revision))

    def _park_live(self, view: View, read: Versioned[Identity], handle: Versioned[Handle],
                   txn: TxnPlan, guard: DaemonAbsent | None) -> Identity:
        """Plan what the DEL of a live identity's attachment does (:meth:`plan_parking`)
        for a node that cannot send it: delete the handle, park its addresses (for
        ``stickyHoldSeconds``, at least a second), guarded by ``guard``."""
        if handle.value.id in txn.handles:
            raise Defer()
        if handle.mod_revision:  # 0: a stand-in for a handle removed by hand
            txn.handles[handle.value.id] = DeleteHandle(handle.value.id, handle.mod_revision)
        if guard is not None:
            txn.guards[f"daemon-absent/{guard.node}"] = guard
        self.plan_parking(view, read.value.id, handle, txn, read=read,
                          hold=view.state().config.sticky_hold_seconds or 1)
        write = txn.identities[read.value.id]
        assert isinstance(write, PutIdentity)
        # Stamped as released: when the lost node's daemon comes back, its record
        # check then drops the handle instead of re-asserting it against the new owner.
        now = self.clock()
        for entry in write.identity.addresses:
            block, revision = txn.blocks[entry.block]
            if block is not None:
                stamped = block.copy()
                stamped.released_at[block.ordinal(entry.ip)] = now
                txn.put_block(stamped, revision, block)
        return write.identity

    def _may_keep(self, state: ClusterState, pool: IPPool, block: Block, address: IPAddress,
                  request: AllocationRequest) -> bool:
        """Whether the rules let this node's ADD keep ``address`` of ``block``."""
        if block.affinity != self.node and state.config.strict_affinity:
            return False
        if not pool.usable(address) or address in state.reservations:
            return False
        return address not in request.gateways

    def plan_parking(self, view: View, identity_id: str, handle: Versioned[Handle],
                     txn: TxnPlan, read: Versioned[Identity] | None = None,
                     hold: int | None = None) -> bool:
        """Plan a sticky DEL: its blocks give the addresses to the parked identity until
        ``stickyHoldSeconds`` (or ``hold``) from now. False when the handle is not its
        identity's live attachment (then it is released like any other), or with no
        hold at all (its identity is deleted and the addresses are freed as usual).
        ``read``: the identity, read already."""
        if identity_id in txn.identities:
            raise Defer()
        identity = read or view.identity(identity_id)
        if identity is None or identity.value.parked or identity.value.handle != handle.value.id:
            return False
        hold = view.state().config.sticky_hold_seconds if hold is None else hold
        if not hold:
            txn.identities[identity_id] = DeleteIdentity(identity_id, identity.mod_revision)
            return False
        holder = parked_holder(identity_id)
        parked = []
        for entry in handle.value.addresses:
            block, revision = self.planned_block(view, entry.block, txn)
            if block is None:
                continue
            handed = allocator.hand_over(block, entry.ip, handle.value.id, holder)
            if handed is not None:
                txn.put_block(handed, revision, block)
                parked.append(entry)
        txn.identities[identity_id] = PutIdentity(
            Identity(identity_id, tuple(parked), "parked", handle.value.id, handle.value.node,
                     self.clock() + hold),
            identity.mod_revision)
        return True

    def plan_identity_release(self, view: View, call: ReleaseIdentityCall,
                              txn: TxnPlan) -> bool:
        """Free a parked identity (or, with ``park``, park a live one): see the call."""
        if call.identity_id in txn.identities:
            raise Defer()
        identity = view.identity(call.identity_id)
        if identity is None or (call.only_expired and not identity.value.expired(self.clock())):
            return call.answer([])
        value = identity.value
        if not value.parked:
            if call.only_expired:
                return call.answer([])
            if not call.park:
                raise IdentityInUse(value.id, value.handle, value.node)
            return self._plan_park_now(view, call, identity, txn)
        if call.park:  # parked already: nothing to do
            return call.answer([])
        holder = parked_holder(value.id)
        for entry in value.addresses:
            block, revision = self.planned_block(view, entry.block, txn)
            if block is None:
                continue
            new, freed = allocator.release_addresses(block, [entry.ip], holder, self.clock())
            if not freed:
                continue
            call.freed += freed
            self.put_or_drop(view, txn, new, revision, block)
        txn.identities[value.id] = DeleteIdentity(value.id, identity.mod_revision)
        return False

    def _plan_park_now(self, view: View, call: ReleaseIdentityCall, read: Versioned[Identity],
                       txn: TxnPlan) -> bool:
        """``ipam release --identity ID --park``: park a live identity whose node is lost."""
        value = read.value
        absence = view.daemon_absence(value.node)
        if absence is None and not call.force:
            raise NodeAlive(value.node, f"sticky identity {value.id} is live under attachment "
                            f"{value.handle}: delete that pod (its DEL parks it), or add "
                            "--force if that node is lost all the same")
        handle = view.handle(value.handle) or Versioned(
            Handle(value.handle, value.node, value.addresses), 0)
        parked = self._park_live(view, read, handle, txn, None if absence is None
                                 else DaemonAbsent(value.node, absence.noted_revision))
        call.freed = [entry.ip for entry in parked.addresses]
        return False
