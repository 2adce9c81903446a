"""The calls the planner plans: what was asked, and what its plan gives back.

A call is planned into a :class:`~.allocator.TxnPlan` (the writes of one
transaction, shared by a batch of calls) and records beside it what the
caller will answer once that transaction commits: the addresses given, the
addresses freed, an identity taken over. A call that needs no write at all
(a repeated ADD, the DEL of an unknown attachment) is answered by the plan
itself: :attr:`Call.result` is set and the plan returns True.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput
from .holdings import Attachment, check_identity
from .model import IPAddress, IPNetwork, IPPool
from .view import DaemonAbsence


@dataclass(frozen=True)
class AllocationRequest:
    attachment: Attachment
    ipv4: bool = True
    ipv6: bool = False
    ipv4_pools: tuple[str, ...] = ()
    ipv6_pools: tuple[str, ...] = ()
    addresses: tuple[IPAddress, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    #: The network config's gateways: never handed out to this request.
    gateways: tuple[IPAddress, ...] = ()
    #: The sticky identity the addresses belong to ("": not sticky).
    identity: str = ""

    def __post_init__(self) -> None:
        if self.identity:
            check_identity(self.identity)
        families = [a.version for a in self.addresses]
        if len(set(families)) != len(families):
            raise InvalidInput("at most one specific address per IP family may be requested")
        if not (self.ipv4 or self.ipv6 or self.addresses):
            raise InvalidInput("nothing to allocate: both assign_ipv4 and assign_ipv6 are off")

    def families(self) -> list[int]:
        wanted = {a.version for a in self.addresses}
        if self.ipv4:
            wanted.add(4)
        if self.ipv6:
            wanted.add(6)
        return sorted(wanted)

    def requested_pools(self, family: int) -> tuple[str, ...]:
        return self.ipv4_pools if family == 4 else self.ipv6_pools

    def specific(self, family: int) -> IPAddress | None:
        return next((a for a in self.addresses if a.version == family), None)


@dataclass(frozen=True)
class AllocatedAddress:
    """An address as ADD reports it: its pool, the pool's subnet and gateway."""

    ip: IPAddress
    block: IPNetwork
    pool: str = ""
    subnet: IPNetwork | None = None  # None: the pool is unknown (deleted before 0.2)
    gateway: IPAddress | None = None

    @classmethod
    def of(cls, ip: IPAddress, block: IPNetwork, pool: IPPool | None) -> AllocatedAddress:
        if pool is None:
            return cls(ip, block)
        return cls(ip, block, pool.name, pool.cidr, pool.gateway)


@dataclass(frozen=True)
class Allocation:
    handle_id: str
    addresses: tuple[AllocatedAddress, ...]
    #: (the top-priority pool, the lower one that served) for each address a node's
    #: higher-priority pools could not give
    fallbacks: tuple[tuple[str, str], ...] = ()


_UNANSWERED: Any = object()


@dataclass
class Call:
    """What every call records: its answer when its plan needed no write."""

    result: Any = field(default=_UNANSWERED, init=False)

    def answer(self, result: Any) -> bool:
        """Answer the call without a write; True, as the plan returns it."""
        self.result = result
        return True

    @property
    def answered(self) -> bool:
        return self.result is not _UNANSWERED

    def start(self) -> None:
        """Forget what an earlier plan of this call recorded (it is planned again)."""
        self.result = _UNANSWERED


@dataclass
class AllocateCall(Call):
    """An ADD: the addresses planned for it, and the identity it takes over, if so."""

    request: AllocationRequest
    addresses: list[AllocatedAddress] = field(default_factory=list)
    # The sticky identity this ADD takes over from a node without a live daemon.
    took_over: tuple[str, DaemonAbsence] | None = None
    # (top-priority pool, the pool that served) per address served below the top tier.
    fallbacks: list[tuple[str, str]] = field(default_factory=list)

    def start(self) -> None:
        super().start()
        self.addresses, self.took_over, self.fallbacks = [], None, []


@dataclass
class ReleaseCall(Call):
    """A DEL: the handle to release, and the addresses that freed."""

    handle_id: str
    # For a release by attachment: where to look when no handle has the current id.
    legacy: Attachment | None = None
    freed: list[IPAddress] = field(default_factory=list)

    def start(self) -> None:
        super().start()
        self.freed = []


@dataclass
class ReleaseIdentityCall(Call):
    """Free a parked sticky identity's addresses and forget it (``only_expired``: if its
    hold is over), in one transaction with its blocks; or (``park``) park a live one."""

    identity_id: str
    only_expired: bool = False
    park: bool = False
    force: bool = False  # park although its node's daemon is alive
    freed: list[IPAddress] = field(default_factory=list)

    def start(self) -> None:
        super().start()
        self.freed = []


AnyCall = AllocateCall | ReleaseCall | ReleaseIdentityCall


class Defer(Exception):
    """The call touches what another call of the same batch changes: plan it in the next."""
