"""The audit's reports over in-memory snapshots: properties, no etcd."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from topoipam.daemon.audit import Snapshot, find_inconsistencies, find_warnings
from topoipam.daemon.core import allocator
from topoipam.daemon.core.holdings import (
    IDENTITY_LIVE,
    IDENTITY_PARKED,
    Block,
    Handle,
    HandleAddress,
    Identity,
    parked_holder,
)
from topoipam.daemon.core.model import IPPool

V4 = IPPool("v4", ipaddress.ip_network("10.0.0.0/24"), 26)
V6 = IPPool("v6", ipaddress.ip_network("fd00:10::/120"), 122)

#: One sticky identity: which families it holds (IPv4, IPv6 or both) and whether it is parked.
identity_shapes = st.tuples(st.sampled_from([(4,), (6,), (4, 6), (6, 4)]), st.booleans())


def sticky_snapshot(shapes: list[tuple[tuple[int, ...], bool]]) -> Snapshot:
    """A consistent snapshot of sticky identities, live and parked, one address per family."""
    blocks = {p.family: Block.empty(next(p.cidr.subnets(new_prefix=p.block_size)), "n0")
              for p in (V4, V6)}
    snap = Snapshot(1, [V4, V6], {}, [], {b.cidr: b for b in blocks.values()}, [], {})
    snap.affinities.extend(("n0", b.cidr) for b in blocks.values())
    snap.free.update((b.cidr, "n0") for b in blocks.values())  # each has addresses to give
    snap.rooms.update(w for p in (V4, V6) for w in p.cidr.subnets(
        new_prefix=allocator.window_prefix(p)))  # and each pool unclaimed blocks
    for i, (families, parked) in enumerate(shapes):
        identity_id = f"net/default/web-{i}/eth0"
        handle_id = f"net/c{i}/eth0"
        holder = parked_holder(identity_id) if parked else handle_id
        addresses = []
        for family in families:
            block = blocks[family]
            ordinal = block.unallocated.pop(2)  # past the network address and the gateway
            block.allocations[ordinal] = holder
            addresses.append(HandleAddress(block.address(ordinal), block.cidr))
        snap.identities[identity_id] = Identity(
            identity_id, tuple(addresses), IDENTITY_PARKED if parked else IDENTITY_LIVE,
            handle_id, "n0", 2_000_000_000.0 if parked else None)
        if not parked:
            snap.handles[handle_id] = Handle(handle_id, "n0", tuple(addresses),
                                             {"identity": identity_id})
    return snap


@settings(max_examples=60, deadline=None)
@given(st.lists(identity_shapes, min_size=1, max_size=6))
def test_sticky_identities_of_either_family_or_both_audit_clean(
        shapes: list[tuple[tuple[int, ...], bool]]) -> None:
    snap = sticky_snapshot(shapes)
    assert find_inconsistencies(snap) == []
    assert find_warnings(snap) == []
    rows = snap.allocations()
    assert len(rows) == sum(len(families) for families, _ in shapes)
    assert all(r.identity is not None and r.sticky_state != "-" for r in rows)


@settings(max_examples=60, deadline=None)
@given(st.lists(identity_shapes, min_size=1, max_size=6), st.data())
def test_a_live_identity_and_its_handle_that_disagree_are_one_line_not_a_traceback(
        shapes: list[tuple[tuple[int, ...], bool]], data: st.DataObject) -> None:
    snap = sticky_snapshot(shapes)
    identity = data.draw(st.sampled_from(sorted(snap.identities.values(), key=lambda i: i.id)))
    # The identity forgets one of its addresses: the audit names it, whatever the families.
    snap.identities[identity.id] = Identity(
        identity.id, identity.addresses[1:], identity.state, identity.handle, identity.node,
        identity.parked_until)
    problems = find_inconsistencies(snap)
    assert problems and all(identity.id in p for p in problems), problems
