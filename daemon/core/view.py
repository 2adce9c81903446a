"""What the planner sees of the cluster: a read-only view, and two that ship with it.

The planner (:mod:`.planner`) decides from a :class:`View` alone and never
waits for anything. A view answers what it holds and raises :class:`NeedRead`
for what it lacks; whoever plans reads that, adds it to the view and plans
the call again. So one policy serves every caller:

* :class:`InMemoryView` holds a whole (small) cluster as plain values and
  answers everything itself: the planner's unit tests, and any "what would
  happen if" asked of a cluster built in memory.
* :class:`ReadingView` answers from a base (the daemon's watch-synced cache,
  or nothing) plus the reads made for it so far, keyed by :data:`Read`; the
  daemon's caller (:mod:`topoipam.daemon.planning`) fills it in.

Index queries answer as the etcd adapter's do (:mod:`topoipam.daemon.store.reads`):
key order is the key schema's, a room entry is a claim window that may have
an unclaimed block, a free-block entry a block that may have an address to
lend. Both indexes are hints, and a view may be stale: every write the
planner makes is guarded by the revision it read, so a stale plan loses its
compare and is planned again from fresher values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .allocator import Reservations, claim_windows, first_unclaimed_block, has_free
from .holdings import Block, Handle, Identity, TopologyRange
from .keys import KeySchema
from .model import IPAddress, IPAMConfig, IPNetwork, IPPool
from .writes import Versioned


@dataclass(frozen=True)
class ClusterState:
    """What an allocation decision depends on, apart from blocks."""

    config: IPAMConfig
    pools: tuple[IPPool, ...]
    labels: Mapping[str, str]
    reservations: Reservations


@dataclass(frozen=True)
class DaemonAbsence:
    """A node without a live daemon: for how long that has been known (``seconds``,
    None if nobody noted it yet) and the revision of its record (0: none)."""

    node: str
    seconds: float | None
    noted_revision: int


#: One read a view may lack: its kind, then its arguments (hashable, so a
#: view keeps what was read under it). The kinds are the methods of
#: :class:`View` below that take arguments.
Read = tuple[Any, ...]


class NeedRead(Exception):
    """The view lacks ``read``: read it, hand it to the view, and plan again."""

    def __init__(self, read: Read) -> None:
        super().__init__(f"the view lacks {read[0]}{read[1:]}")
        self.read = read


class View(Protocol):
    """The cluster as the planner may see it. Each method answers, or raises NeedRead."""

    def state(self) -> ClusterState: ...

    def affine_blocks(self) -> list[Versioned[Block]]:
        """The planning node's own blocks."""
        ...

    def block(self, cidr: IPNetwork) -> Versioned[Block] | None: ...

    def block_containing(self, address: IPAddress) -> Versioned[Block] | None:
        """The block that holds ``address``, whatever its size."""
        ...

    def block_cidrs(self, within: IPNetwork) -> set[IPNetwork]: ...

    def pool_blocks(self, within: IPNetwork) -> list[Versioned[Block]]:
        """Every block inside ``within`` (a pool read whole)."""
        ...

    def claim_reads(self, pool_cidr: IPNetwork, own: IPNetwork, limit: int
                    ) -> tuple[list[IPNetwork], set[IPNetwork] | None]:
        """Up to ``limit`` room entries of the pool from window ``own`` on, and the block
        CIDRs inside ``own`` if the index lists it (None if not)."""
        ...

    def room_windows(self, within: IPNetwork, start: IPNetwork | None, limit: int
                     ) -> list[IPNetwork]: ...

    def survey_blocks(self, window: IPNetwork, groups: tuple[IPNetwork, ...]
                      ) -> tuple[set[IPNetwork], list[int]]:
        """The block CIDRs inside ``window`` and the number of blocks in each group."""
        ...

    def free_blocks(self, within: IPNetwork, start: IPNetwork | None, limit: int
                    ) -> list[tuple[IPNetwork, str | None]]:
        """Free-block index entries inside ``within`` from ``start`` on: (block, affinity)."""
        ...

    def handle(self, handle_id: str) -> Versioned[Handle] | None: ...

    def identity(self, identity_id: str) -> Versioned[Identity] | None: ...

    def node_labels(self, node: str) -> Mapping[str, str] | None:
        """Another node's labels; None if that node is not registered (deleted)."""
        ...

    def value_ranges(self, pool: str, value: str | None) -> list[Versioned[TopologyRange]]:
        """The topology ranges of ``pool`` that label value ``value`` holds and lists (they
        may have an unclaimed block), in address order."""
        ...

    def range_holder(self, cidr: IPNetwork) -> Versioned[TopologyRange] | None:
        """Who holds topology range ``cidr`` (None: nobody)."""
        ...

    def range_holders(self, spans: tuple[IPNetwork, ...]) -> dict[IPNetwork, TopologyRange]:
        """Who holds each of ``spans`` (the held ones only): one read for many."""
        ...

    def held_ranges(self, within: IPNetwork, start: IPNetwork | None, limit: int
                    ) -> list[IPNetwork]:
        """Topology ranges inside ``within`` held by any value, from ``start`` on, at most
        ``limit`` (key order is address order)."""
        ...

    def holders_from(self, within: IPNetwork, start: IPNetwork | None, limit: int
                     ) -> list[TopologyRange]:
        """Like :meth:`held_ranges`, with who holds each: one read of at most ``limit``."""
        ...

    def daemon_absence(self, node: str) -> DaemonAbsence | None:
        """How long ``node`` has had no live daemon (None: it has one)."""
        ...


class ReadingView:
    """A view of a base (cached state and blocks) plus what was read for it.

    ``state`` is the base's; ``affine`` gives the node's own blocks if the
    base holds them (called once, when first needed; None: ask a read);
    ``cached_block`` answers a block the base holds (None: ask a read).
    Everything else is a :data:`Read` answered from :attr:`reads`, or
    :class:`NeedRead`.
    """

    def __init__(self, state: ClusterState,
                 affine: Callable[[], list[Versioned[Block]]] | None = None,
                 cached_block: Callable[[IPNetwork], Versioned[Block] | None] | None = None,
                 ) -> None:
        self._state = state
        self._affine = affine
        self._cached_block = cached_block
        self.reads: dict[Read, Any] = {}

    def answer(self, read: Read) -> Any:
        try:
            return self.reads[read]
        except KeyError:
            raise NeedRead(read) from None

    def state(self) -> ClusterState:
        return self._state

    def affine_blocks(self) -> list[Versioned[Block]]:
        if self._affine is None:
            return self.answer(("affine_blocks",))  # type: ignore[no-any-return]
        affine = self._affine()
        self._affine = lambda: affine
        return affine

    def block(self, cidr: IPNetwork) -> Versioned[Block] | None:
        cached = self._cached_block(cidr) if self._cached_block is not None else None
        return cached if cached is not None else self.answer(("block", cidr))

    def block_containing(self, address: IPAddress) -> Versioned[Block] | None:
        return self.answer(("block_containing", address))  # type: ignore[no-any-return]

    def block_cidrs(self, within: IPNetwork) -> set[IPNetwork]:
        return self.answer(("block_cidrs", within))  # type: ignore[no-any-return]

    def pool_blocks(self, within: IPNetwork) -> list[Versioned[Block]]:
        return self.answer(("pool_blocks", within))  # type: ignore[no-any-return]

    def claim_reads(self, pool_cidr: IPNetwork, own: IPNetwork, limit: int
                    ) -> tuple[list[IPNetwork], set[IPNetwork] | None]:
        return self.answer(("claim_reads", pool_cidr, own, limit))  # type: ignore[no-any-return]

    def room_windows(self, within: IPNetwork, start: IPNetwork | None, limit: int
                     ) -> list[IPNetwork]:
        return self.answer(("room_windows", within, start, limit))  # type: ignore[no-any-return]

    def survey_blocks(self, window: IPNetwork, groups: tuple[IPNetwork, ...]
                      ) -> tuple[set[IPNetwork], list[int]]:
        return self.answer(("survey_blocks", window, groups))  # type: ignore[no-any-return]

    def free_blocks(self, within: IPNetwork, start: IPNetwork | None, limit: int
                    ) -> list[tuple[IPNetwork, str | None]]:
        return self.answer(("free_blocks", within, start, limit))  # type: ignore[no-any-return]

    def handle(self, handle_id: str) -> Versioned[Handle] | None:
        return self.answer(("handle", handle_id))  # type: ignore[no-any-return]

    def identity(self, identity_id: str) -> Versioned[Identity] | None:
        return self.answer(("identity", identity_id))  # type: ignore[no-any-return]

    def node_labels(self, node: str) -> Mapping[str, str] | None:
        return self.answer(("node_labels", node))  # type: ignore[no-any-return]

    def value_ranges(self, pool: str, value: str | None) -> list[Versioned[TopologyRange]]:
        return self.answer(("value_ranges", pool, value))  # type: ignore[no-any-return]

    def range_holder(self, cidr: IPNetwork) -> Versioned[TopologyRange] | None:
        return self.answer(("range_holder", cidr))  # type: ignore[no-any-return]

    def range_holders(self, spans: tuple[IPNetwork, ...]) -> dict[IPNetwork, TopologyRange]:
        return self.answer(("range_holders", spans))  # type: ignore[no-any-return]

    def held_ranges(self, within: IPNetwork, start: IPNetwork | None, limit: int
                    ) -> list[IPNetwork]:
        return self.answer(("held_ranges", within, start, limit))  # type: ignore[no-any-return]

    def holders_from(self, within: IPNetwork, start: IPNetwork | None, limit: int
                     ) -> list[TopologyRange]:
        return self.answer(("holders_from", within, start, limit))  # type: ignore[no-any-return]

    def daemon_absence(self, node: str) -> DaemonAbsence | None:
        return self.answer(("daemon_absence", node))  # type: ignore[no-any-return]


@dataclass
class InMemoryView:
    """A whole cluster as plain values, for one node (``node``): it never lacks anything.

    Revisions are whatever the values carry. The room and free-block indexes
    are exactly :attr:`rooms` and :attr:`free`; :meth:`indexed` fills them
    from the blocks as writers keep them (tests set them stale on purpose).
    ``absent`` maps a node without a live daemon to how long it has had none;
    ``nodes`` holds the other registered nodes' labels.
    """

    node: str
    config: IPAMConfig = field(default_factory=IPAMConfig)
    pools: Sequence[IPPool] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    reservations: Reservations = field(default_factory=Reservations)
    blocks: dict[IPNetwork, Versioned[Block]] = field(default_factory=dict)
    handles: dict[str, Versioned[Handle]] = field(default_factory=dict)
    identities: dict[str, Versioned[Identity]] = field(default_factory=dict)
    rooms: set[IPNetwork] = field(default_factory=set)
    free: dict[IPNetwork, str | None] = field(default_factory=dict)
    absent: dict[str, float] = field(default_factory=dict)
    #: Other nodes' labels; a node missing here is not registered.
    nodes: dict[str, Mapping[str, str]] = field(default_factory=dict)
    #: Topology ranges and who holds them; those not listed (full) in ``unlisted``.
    ranges: dict[IPNetwork, Versioned[TopologyRange]] = field(default_factory=dict)
    unlisted: set[IPNetwork] = field(default_factory=set)
    keys: KeySchema = field(default_factory=KeySchema)

    def add(self, *blocks: Block, revision: int = 1) -> InMemoryView:
        for block in blocks:
            self.blocks[block.cidr] = Versioned(block, revision)
        return self

    def indexed(self, nodes: Iterable[str] = ()) -> InMemoryView:
        """Room entries for every claim window with an unclaimed block (as seen from
        this node and ``nodes``), free-block entries for every block with room."""
        state = self.state()
        existing = set(self.blocks)
        self.rooms = set()
        for pool in state.pools:
            for node in {self.node, *nodes}:
                for window in claim_windows(pool, node):
                    if first_unclaimed_block(pool, existing, state.reservations,
                                             window) is not None:
                        self.rooms.add(window)
        self.free = {cidr: v.value.affinity for cidr, v in self.blocks.items()
                     if has_free(v.value, state.pools)}
        return self

    def state(self) -> ClusterState:
        return ClusterState(self.config, tuple(self.pools), self.labels, self.reservations)

    def affine_blocks(self) -> list[Versioned[Block]]:
        return [v for v in self.blocks.values() if v.value.affinity == self.node]

    def block(self, cidr: IPNetwork) -> Versioned[Block] | None:
        return self.blocks.get(cidr)

    def block_containing(self, address: IPAddress) -> Versioned[Block] | None:
        return next((v for cidr, v in self.blocks.items() if address in cidr), None)

    def block_cidrs(self, within: IPNetwork) -> set[IPNetwork]:
        return {cidr for cidr in self.blocks if _inside(cidr, within)}

    def pool_blocks(self, within: IPNetwork) -> list[Versioned[Block]]:
        return [self.blocks[cidr] for cidr in self._ordered(self.blocks, within, None,
                                                            self.keys.block)]

    def claim_reads(self, pool_cidr: IPNetwork, own: IPNetwork, limit: int
                    ) -> tuple[list[IPNetwork], set[IPNetwork] | None]:
        rooms = self.room_windows(pool_cidr, own, limit)
        return rooms, (self.block_cidrs(own) if own in self.rooms else None)

    def room_windows(self, within: IPNetwork, start: IPNetwork | None, limit: int
                     ) -> list[IPNetwork]:
        found = self._ordered(self.rooms, within, start, self.keys.room)
        return found[:limit] if limit else found

    def survey_blocks(self, window: IPNetwork, groups: tuple[IPNetwork, ...]
                      ) -> tuple[set[IPNetwork], list[int]]:
        return self.block_cidrs(window), [len(self.block_cidrs(g)) for g in groups]

    def free_blocks(self, within: IPNetwork, start: IPNetwork | None, limit: int
                    ) -> list[tuple[IPNetwork, str | None]]:
        found = self._ordered(self.free, within, start, self.keys.free_block)
        return [(cidr, self.free[cidr]) for cidr in (found[:limit] if limit else found)]

    def handle(self, handle_id: str) -> Versioned[Handle] | None:
        return self.handles.get(handle_id)

    def identity(self, identity_id: str) -> Versioned[Identity] | None:
        return self.identities.get(identity_id)

    def node_labels(self, node: str) -> Mapping[str, str] | None:
        return self.labels if node == self.node else self.nodes.get(node)

    def value_ranges(self, pool: str, value: str | None) -> list[Versioned[TopologyRange]]:
        held = [v for v in self.ranges.values() if v.value.pool == pool
                and v.value.value == value and v.value.cidr not in self.unlisted]
        return sorted(held, key=lambda v: self.keys.topology_range(v.value.cidr))

    def range_holder(self, cidr: IPNetwork) -> Versioned[TopologyRange] | None:
        return self.ranges.get(cidr)

    def range_holders(self, spans: tuple[IPNetwork, ...]) -> dict[IPNetwork, TopologyRange]:
        return {c: self.ranges[c].value for c in spans if c in self.ranges}

    def held_ranges(self, within: IPNetwork, start: IPNetwork | None, limit: int
                    ) -> list[IPNetwork]:
        found = self._ordered(self.ranges, within, start, self.keys.topology_range)
        return found[:limit] if limit else found

    def holders_from(self, within: IPNetwork, start: IPNetwork | None, limit: int
                     ) -> list[TopologyRange]:
        return [self.ranges[c].value for c in self.held_ranges(within, start, limit)]

    def daemon_absence(self, node: str) -> DaemonAbsence | None:
        if node not in self.absent:
            return None
        return DaemonAbsence(node, self.absent[node], 1)

    @staticmethod
    def _ordered(cidrs: Iterable[IPNetwork], within: IPNetwork, start: IPNetwork | None,
                 key: Callable[[IPNetwork], bytes]) -> list[IPNetwork]:
        """The CIDRs inside ``within``, in key order, from ``start``'s key on."""
        low = key(start) if start is not None else b""
        return sorted((c for c in cidrs if _inside(c, within) and key(c) >= low), key=key)


def _inside(cidr: IPNetwork, within: IPNetwork) -> bool:
    return cidr.version == within.version and within.supernet_of(cidr)  # type: ignore[arg-type]


__all__ = ["ClusterState", "DaemonAbsence", "InMemoryView", "NeedRead", "Read", "ReadingView",
           "View"]
