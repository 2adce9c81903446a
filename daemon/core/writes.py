"""What one etcd transaction compares and writes, as plain values (no I/O).

Each write names the object and the revision that guards it; the store
turns them into keys, compares and puts (:meth:`EtcdStore.commit`). Kept
apart from the store so that the pure allocator can plan a transaction
(:class:`topoipam.daemon.core.allocator.TxnPlan`) without importing etcd.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .holdings import (
    Block,
    Handle,
    Identity,
    TopologyRange,
)
from .model import IPAddress, IPNetwork, Resource

T = TypeVar("T")


@dataclass(frozen=True)
class Versioned(Generic[T]):
    """A value as read from etcd, with the mod_revision that guards a later write."""

    value: T
    mod_revision: int


# Domain-level writes. Each names what it guards; the store makes the keys.
@dataclass(frozen=True)
class PutBlock:
    block: Block
    expect_revision: int  # 0: the block must not exist yet


@dataclass(frozen=True)
class DeleteBlock:
    cidr: IPNetwork
    expect_revision: int


@dataclass(frozen=True)
class PutAffinity:
    node: str
    cidr: IPNetwork


@dataclass(frozen=True)
class DeleteAffinity:
    node: str
    cidr: IPNetwork


@dataclass(frozen=True)
class PutFreeMark:
    """The free-block index entry of a block that has an address to give (a hint for
    borrowers: the block's own compare still guards what they write)."""

    cidr: IPNetwork
    node: str | None  # the block's affinity, so borrowers skip their own blocks unread


@dataclass(frozen=True)
class DeleteFreeMark:
    cidr: IPNetwork


@dataclass(frozen=True)
class PutRoomMark:
    """The room index entry of a claim window that may have an unclaimed block."""

    window: IPNetwork


@dataclass(frozen=True)
class DeleteRoomMark:
    window: IPNetwork


@dataclass(frozen=True)
class DeleteRoomMarksIn:
    """Every room index entry inside ``cidr``: a deleted pool's, in one range delete
    (a big pool has more entries than a transaction has operations)."""

    cidr: IPNetwork


@dataclass(frozen=True)
class PutTopologyRange:
    """A topology range taken (expect_revision 0: nobody holds it) or touched by a claim
    inside it (its holder key at expect_revision), so a concurrent release loses.
    ``listed``: whether its value's index lists it (only while it has an unclaimed block)."""

    range: TopologyRange
    expect_revision: int
    listed: bool = True


@dataclass(frozen=True)
class DeleteTopologyRange:
    """A topology range with no block left, back to its pool."""

    range: TopologyRange
    expect_revision: int


@dataclass(frozen=True)
class RangeHeld:
    """A compare, no write: topology range ``cidr``'s holder is still at ``expect_revision``.

    What a claim inside a range its value holds guards with, and all it writes
    of the range: claims of one value never race each other on the holder key
    (only the claim that fills the range rewrites it, to unlist it), while a
    give-back (which deletes the holder) makes a racing claim re-plan."""

    cidr: IPNetwork
    expect_revision: int


@dataclass(frozen=True)
class NoBlocksIn:
    """A compare, no write: no block key lies inside ``cidr`` but ``dropped`` (deleted in
    the same transaction). What a range given back is guarded by: a claim that made a
    block in it since its blocks were read (touching no holder) makes the give-back lose."""

    cidr: IPNetwork
    dropped: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class DeleteTopologyRangesOf:
    """Every topology range of a deleted pool: the holders inside ``cidr`` and the pool's
    value listings, in two range deletes (a value's blocks leave with the pool)."""

    pool: str
    cidr: IPNetwork


@dataclass(frozen=True)
class PutHandle:
    handle: Handle
    expect_revision: int  # 0: the handle must not exist yet


@dataclass(frozen=True)
class DeleteHandle:
    handle_id: str
    expect_revision: int


@dataclass(frozen=True)
class PutIdentity:
    identity: Identity
    expect_revision: int  # 0: the identity must not exist yet


@dataclass(frozen=True)
class DeleteIdentity:
    identity_id: str
    expect_revision: int


@dataclass(frozen=True)
class PutConflict:
    """A node's report of an address in conflict after a restore (``value``: its JSON)."""

    node: str
    address: IPAddress
    value: bytes


@dataclass(frozen=True)
class DeleteConflict:
    node: str
    address: IPAddress


@dataclass(frozen=True)
class PutObject:
    """A pool, node, config or reservation; expect_revision None = unconditional."""

    obj: Resource
    expect_revision: int | None = None


@dataclass(frozen=True)
class DeleteObject:
    kind: str  # "pool" | "node" | "reservation"
    name: str
    expect_revision: int | None = None


@dataclass(frozen=True)
class PoolsUnchangedSince:
    """A guard, not a write: no pool was created or changed after ``revision``.

    Checks that were made against the pools read at that revision (overlaps)
    still hold when the transaction commits.
    """

    revision: int


@dataclass(frozen=True)
class PoolUnchanged:
    """A guard, not a write: pool ``name`` still exists as written at ``revision``
    (what a new pool's room index entries are written under)."""

    name: str
    revision: int


@dataclass(frozen=True)
class DaemonAbsent:
    """A guard, not a write: ``node`` has no live daemon (its fence key is absent), and
    its absence record is still the one read at ``noted_revision`` (0: not compared).

    What lets another node take over a sticky identity that node holds live.
    """

    node: str
    noted_revision: int = 0


Write = (
    PutBlock | DeleteBlock | PutAffinity | DeleteAffinity | PutFreeMark | DeleteFreeMark
    | PutRoomMark | DeleteRoomMark | DeleteRoomMarksIn | PutHandle | DeleteHandle | PutIdentity
    | DeleteIdentity | PutConflict | DeleteConflict | PutObject | PutTopologyRange
    | DeleteTopologyRange | DeleteTopologyRangesOf | RangeHeld | NoBlocksIn
    | DeleteObject | PoolsUnchangedSince | PoolUnchanged | DaemonAbsent
)


@dataclass
class CommitResult:
    """Outcome of one transaction.

    On success ``revision`` is the new mod_revision of everything written.
    On failure ``blocks`` and ``handles`` hold the current value of every
    guarded block and handle (None where absent), read in the same round trip.
    """

    succeeded: bool
    revision: int
    blocks: dict[IPNetwork, Versioned[Block] | None] = field(default_factory=dict)
    handles: dict[str, Versioned[Handle] | None] = field(default_factory=dict)
