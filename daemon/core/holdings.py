"""Who holds which address: attachments, handles, sticky identities and blocks.

Plain values with their validation and their etcd encoding (the key schema is
:mod:`topoipam.daemon.core.keys`); the allocator plans changes on copies of
them. The operator's objects (pools, nodes, config, reservations) are in
:mod:`topoipam.daemon.core.model`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .errors import InvalidInput
from .model import IPAddress, IPNetwork, encode

# Attachment identifiers become part of an etcd key: no '/' and no control chars.
_ATTACHMENT_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$")
_IFNAME_RE = re.compile(r"^[^/\s:]{1,15}$")


@dataclass(frozen=True)
class Attachment:
    """One container interface on one network: the unit a handle tracks."""

    network: str
    container_id: str
    ifname: str

    def __post_init__(self) -> None:
        if not isinstance(self.network, str) or not _ATTACHMENT_PART_RE.fullmatch(self.network):
            raise InvalidInput(f"invalid network name {self.network!r}")
        if not isinstance(self.container_id, str) or not _ATTACHMENT_PART_RE.fullmatch(
            self.container_id
        ):
            raise InvalidInput(f"invalid container ID {self.container_id!r}")
        # Characters, not bytes: the plugin refuses an ADD of a name over 15
        # bytes, but a DEL of one that 0.1 accepted must still find its handle.
        if not isinstance(self.ifname, str) or not _IFNAME_RE.fullmatch(self.ifname) or (
                self.ifname in (".", "..")):
            raise InvalidInput(f"invalid interface name {self.ifname!r}")

    @property
    def handle_id(self) -> str:
        """``<network>/<containerID>/<ifname>``: unambiguous, as no part may hold a '/'.

        (Network names and container IDs may hold dots, so the dotted join of
        earlier versions could give two attachments one handle.)
        """
        return f"{self.network}/{self.container_id}/{self.ifname}"

    @property
    def legacy_handle_id(self) -> str:
        """The dotted id of handles written before 0.2; see :meth:`Handle.belongs_to`."""
        return f"{self.network}.{self.container_id}.{self.ifname}"


def handle_prefix(network: str) -> str:
    """What the ids of every handle of ``network`` (and only of it) start with."""
    return f"{network}/"


@dataclass(frozen=True)
class HandleAddress:
    """One address of a handle, with what ADD reported for it.

    ``pool``, ``subnet`` and ``gateway`` are recorded at allocation, so a
    repeated ADD or a CHECK answers what the first ADD did, whatever happened
    to the pool since (handles written before 0.2 lack them).
    """

    ip: IPAddress
    block: IPNetwork
    pool: str = ""
    subnet: IPNetwork | None = None
    gateway: IPAddress | None = None

    def to_dict(self) -> dict[str, str]:
        data = {"ip": str(self.ip), "block": str(self.block)}
        if self.subnet is not None:
            data["pool"] = self.pool
            data["subnet"] = str(self.subnet)
            if self.gateway is not None:
                data["gateway"] = str(self.gateway)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HandleAddress:
        subnet, gateway = data.get("subnet"), data.get("gateway")
        return cls(
            ipaddress.ip_address(data["ip"]), ipaddress.ip_network(data["block"]),
            str(data.get("pool", "")),
            ipaddress.ip_network(subnet) if subnet is not None else None,
            ipaddress.ip_address(gateway) if gateway is not None else None,
        )


@dataclass(frozen=True)
class Handle:
    """Who holds which addresses. Written in the same transaction as its blocks."""

    id: str
    node: str
    addresses: tuple[HandleAddress, ...]
    attributes: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "addresses": [a.to_dict() for a in self.addresses],
            "attributes": dict(self.attributes),
        }

    @cached_property
    def value(self) -> bytes:
        """The handle as etcd holds it, encoded once: the commit and the node's record share it."""
        return encode(self.to_dict())

    def belongs_to(self, attachment: Attachment) -> bool:
        """Whether this handle was written for ``attachment`` (by its recorded attributes).

        A legacy dotted id alone cannot tell ``a``/``b.c`` from ``a.b``/``c``;
        the attributes every handle records can.
        """
        return (self.attributes.get("network") == attachment.network
                and self.attributes.get("container_id") == attachment.container_id
                and self.attributes.get("ifname") == attachment.ifname)

    @classmethod
    def from_dict(cls, handle_id: str, data: Mapping[str, Any]) -> Handle:
        try:
            return cls(
                id=handle_id,
                node=str(data["node"]),
                addresses=tuple(HandleAddress.from_dict(a) for a in data.get("addresses", [])),
                attributes={str(k): str(v) for k, v in (data.get("attributes") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidInput(f"handle {handle_id}: corrupt value ({exc})") from exc


# An identity: '/'-separated parts of printable characters without whitespace.
_IDENTITY_PART_RE = re.compile(r"^[A-Za-z0-9_.:@+=-]{1,253}$")
#: Block holders that start with this are parked sticky identities, not handles
#: (no handle id can: network names hold no ':').
PARKED_PREFIX = "identity:"
IDENTITY_LIVE = "live"
IDENTITY_PARKED = "parked"


def check_identity(identity: object) -> str:
    """A sticky identity id: ``<network>/<namespace>/<pod>/<ifname>`` or an explicit one."""
    if (not isinstance(identity, str) or len(identity) > 512
            or not all(_IDENTITY_PART_RE.fullmatch(p) for p in identity.split("/"))):
        raise InvalidInput(
            f"invalid sticky identity {identity!r}: use '/'-separated parts of letters, "
            "digits and _ . : @ + = - (at most 512 characters)")
    return identity


def parked_holder(identity: str) -> str:
    """What a block records as the holder of an address parked for ``identity``."""
    return PARKED_PREFIX + identity


def parked_identity(holder: str) -> str | None:
    """The identity a block holder parks an address for, or None for a handle."""
    return holder[len(PARKED_PREFIX):] if holder.startswith(PARKED_PREFIX) else None


@dataclass(frozen=True)
class Identity:
    """A sticky owner's addresses, kept across its attachments (``identities/<id>``).

    Live: ``handle`` holds the addresses (the blocks give them to it). Parked:
    no handle; the blocks give the addresses to :func:`parked_holder` until
    ``parked_until``. Written in the same transaction as its handle and blocks.
    """

    id: str
    addresses: tuple[HandleAddress, ...]
    state: str
    handle: str
    node: str
    parked_until: float | None = None

    @property
    def parked(self) -> bool:
        return self.state == IDENTITY_PARKED

    def expired(self, now: float) -> bool:
        return self.parked and (self.parked_until or 0.0) <= now

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "addresses": [a.to_dict() for a in self.addresses],
            "state": self.state,
            "handle": self.handle,
            "node": self.node,
        }
        if self.parked_until is not None:
            data["parkedUntil"] = self.parked_until
        return data

    @classmethod
    def from_dict(cls, identity_id: str, data: Mapping[str, Any]) -> Identity:
        try:
            state = str(data["state"])
            if state not in (IDENTITY_LIVE, IDENTITY_PARKED):
                raise ValueError(f"state {state!r}")
            until = data.get("parkedUntil")
            return cls(
                id=identity_id,
                addresses=tuple(HandleAddress.from_dict(a) for a in data.get("addresses", [])),
                state=state,
                handle=str(data.get("handle", "")),
                node=str(data.get("node", "")),
                parked_until=float(until) if until is not None else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidInput(f"identity {identity_id}: corrupt value ({exc})") from exc


@dataclass(frozen=True)
class TopologyRange:
    """An aligned range of a pool with a ``topologyKey``, held by one value of that label.

    The nodes whose label has ``value`` (None: nodes without the label) claim
    their blocks of ``pool`` inside the ranges their value holds. Stored under
    ``ranges/<cidr>`` (one holder per range), and listed under its pool and
    value while it has an unclaimed block (a value's ranges with room: one
    small prefix read); both keys are written in the same transaction.
    """

    cidr: IPNetwork
    pool: str
    value: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"cidr": str(self.cidr), "pool": self.pool, "value": self.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TopologyRange:
        try:
            value = data["value"]
            return cls(ipaddress.ip_network(str(data["cidr"])), str(data["pool"]),
                       None if value is None else str(value))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"topology range: corrupt value ({exc})") from exc


@dataclass
class Block:
    """A block of addresses, its owner node and its allocations.

    ``unallocated`` is the free list in hand-out order: released ordinals go
    to its back so an address is reused as late as possible. ``released_at``
    keeps each ordinal's last release time: the reuse cooldown (free ordinals),
    and, kept while the ordinal is held again, what tells a daemon checking its
    record that an address was released before it was reused.
    ``contested`` marks addresses in conflict after a restore: the ordinal is
    held by one handle while a node's record says another attachment (handle,
    node) uses it too; releasing it hands it to that attachment instead of
    freeing it (:func:`topoipam.daemon.core.allocator.release_addresses`). A Block
    is mutable only while an allocator plans a change on its own copy
    (:meth:`copy`); cached blocks are never modified in place.
    """

    cidr: IPNetwork
    affinity: str | None
    allocations: dict[int, str]
    unallocated: list[int]
    released_at: dict[int, float] = field(default_factory=dict)
    contested: dict[int, tuple[str, str]] = field(default_factory=dict)
    # First and last address as integers: cheap ordering and containment tests.
    first: int = field(init=False, repr=False, compare=False)
    last: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.first = int(self.cidr.network_address)
        self.last = self.first + (1 << (self.cidr.max_prefixlen - self.cidr.prefixlen)) - 1

    @classmethod
    def empty(cls, cidr: IPNetwork, affinity: str | None) -> Block:
        return cls(cidr, affinity, {}, list(range(cidr.num_addresses)))

    def copy(self) -> Block:
        return Block(
            self.cidr, self.affinity, dict(self.allocations), list(self.unallocated),
            dict(self.released_at), dict(self.contested),
        )

    @property
    def size(self) -> int:
        return self.cidr.num_addresses


    @property
    def family(self) -> int:
        return self.cidr.version

    def address(self, ordinal: int) -> IPAddress:
        return self.cidr.network_address + ordinal

    def ordinal(self, address: IPAddress) -> int:
        if address not in self.cidr:
            raise InvalidInput(f"{address} is not in block {self.cidr}")
        return int(address) - int(self.cidr.network_address)

    @property
    def in_use(self) -> int:
        return len(self.allocations)

    def is_empty(self) -> bool:
        return not self.allocations

    def to_dict(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "cidr": str(self.cidr),
            "affinity": self.affinity,
            "allocations": {str(k): v for k, v in self.allocations.items()},
            "unallocated": self.unallocated,
            "releasedAt": {str(k): v for k, v in self.released_at.items()},
        }
        if self.contested:  # absent in the common case: block values stay as they were
            value["contested"] = {str(k): {"handle": h, "node": n}
                                  for k, (h, n) in self.contested.items()}
        return value

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Block:
        try:
            cidr = ipaddress.ip_network(data["cidr"])
            block = cls(
                cidr=cidr,
                affinity=data.get("affinity"),
                allocations={int(k): str(v) for k, v in data.get("allocations", {}).items()},
                unallocated=[int(o) for o in data.get("unallocated", [])],
                released_at={int(k): float(v) for k, v in data.get("releasedAt", {}).items()},
                contested={int(k): (str(v["handle"]), str(v["node"]))
                           for k, v in data.get("contested", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidInput(f"corrupt block value ({exc})") from exc
        seen = set(block.allocations) | set(block.unallocated)
        if len(seen) != cidr.num_addresses or len(block.unallocated) + len(
            block.allocations
        ) != cidr.num_addresses or min(seen, default=0) < 0 or max(
            seen, default=0
        ) >= cidr.num_addresses:
            raise InvalidInput(f"corrupt block {cidr}: allocations and free list disagree")
        return block
