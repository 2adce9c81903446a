"""The etcd key schema, both directions: objects to keys and keys to objects.

The one place that knows how keys are spelled, under a prefix with a
version segment (default ``/topoipam/v1``); docs/design.md#the-etcd-keys lists
every kind with its value (tests/test_docs.py checks that list against this
class). Block keys carry the
fixed-width hex of the network address, so the blocks of one pool form one
contiguous, numerically ordered key range (:meth:`KeySchema.blocks_in`).
"""

from __future__ import annotations

import ipaddress

from .errors import InvalidInput
from .model import IPAddress, IPNetwork

DEFAULT_PREFIX = "/topoipam/v1"


def _family_segment(version: int) -> str:
    return "v4" if version == 4 else "v6"


def _hex_network(cidr: IPNetwork) -> str:
    width = 8 if cidr.version == 4 else 32
    return f"{int(cidr.network_address):0{width}x}-{cidr.prefixlen}"


def _network_from_hex(segment: str, family: str) -> IPNetwork:
    hex_part, _, length = segment.partition("-")
    version = 4 if family == "v4" else 6
    address = ipaddress.ip_address(int(hex_part, 16)) if version == 4 else ipaddress.IPv6Address(
        int(hex_part, 16)
    )
    return ipaddress.ip_network(f"{address}/{int(length)}")


def prefix_range_end(prefix: bytes) -> bytes:
    """The etcd range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class KeySchema:
    """Both directions of the etcd key schema: objects to keys and keys to objects."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        prefix = prefix.rstrip("/")
        if not prefix.startswith("/"):
            raise InvalidInput(f"etcd prefix {prefix!r} must start with '/'")
        self.prefix = prefix

    def _key(self, *parts: str) -> bytes:
        return "/".join((self.prefix, *parts)).encode()

    # objects -> keys
    def config(self) -> bytes:
        return self._key("config")

    def pool(self, name: str) -> bytes:
        return self._key("pools", name)

    def pools(self) -> bytes:
        return self._key("pools", "")

    def node(self, name: str) -> bytes:
        return self._key("nodes", name)

    def nodes(self) -> bytes:
        return self._key("nodes", "")

    def block(self, cidr: IPNetwork) -> bytes:
        return self._key("blocks", _family_segment(cidr.version), _hex_network(cidr))

    def blocks(self, family: int | None = None) -> bytes:
        return self._family_prefix("blocks", family)

    def blocks_in(self, cidr: IPNetwork) -> tuple[bytes, bytes]:
        """Key range [start, end) that holds exactly the blocks inside ``cidr``."""
        return self._range_in("blocks", cidr)

    def free_block(self, cidr: IPNetwork) -> bytes:
        """The free-block index entry of a block: present while it has an address to give."""
        return self._key("free", _family_segment(cidr.version), _hex_network(cidr))

    def free_blocks(self, family: int | None = None) -> bytes:
        return self._family_prefix("free", family)

    def free_blocks_in(self, cidr: IPNetwork) -> tuple[bytes, bytes]:
        return self._range_in("free", cidr)

    def room(self, window: IPNetwork) -> bytes:
        """The room index entry of a claim window: present while it may have an
        unclaimed block (a hint that saves claimers a search)."""
        return self._key("room", _family_segment(window.version), _hex_network(window))

    def rooms(self) -> bytes:
        return self._family_prefix("room", None)

    def room_in(self, cidr: IPNetwork) -> tuple[bytes, bytes]:
        return self._range_in("room", cidr)

    def _family_prefix(self, kind: str, family: int | None) -> bytes:
        if family is None:
            return self._key(kind, "")
        return self._key(kind, _family_segment(family), "")

    def _range_in(self, kind: str, cidr: IPNetwork) -> tuple[bytes, bytes]:
        # Keys hold the fixed-width hex of the network address: the ones inside
        # ``cidr`` sort between its first address and the address after it.
        start = self._key(kind, _family_segment(cidr.version), _hex_network(cidr))[
            : -len(f"-{cidr.prefixlen}")]
        after = int(cidr.broadcast_address) + 1
        if after >> cidr.max_prefixlen:  # the range ends at the top of the address space
            return start, prefix_range_end(self._family_prefix(kind, cidr.version))
        width = 8 if cidr.version == 4 else 32
        return start, self._key(kind, _family_segment(cidr.version), f"{after:0{width}x}")

    def topology_range(self, cidr: IPNetwork) -> bytes:
        """A topology range's holder: one key per range, whoever holds it."""
        return self._key("ranges", _family_segment(cidr.version), _hex_network(cidr))

    def topology_ranges(self) -> bytes:
        return self._key("ranges", "")

    def topology_ranges_in(self, cidr: IPNetwork) -> tuple[bytes, bytes]:
        return self._range_in("ranges", cidr)

    def value_range(self, pool: str, value: str | None, cidr: IPNetwork) -> bytes:
        """The same range listed under its pool and value (a value's ranges: one prefix)."""
        return self.value_ranges(pool, value) + _hex_network(cidr).encode()

    def value_listings(self) -> bytes:
        """Every value listing of every pool."""
        return self._key("topology", "")

    def pool_value_ranges(self, pool: str) -> bytes:
        """Every value listing of ``pool``: what goes with the pool when it is deleted."""
        return self._key("topology", pool, "")

    def value_ranges(self, pool: str, value: str | None) -> bytes:
        # The value hex-encoded ("-" for nodes without the label): any text is one segment.
        segment = "-" if value is None else "=" + value.encode().hex()
        return self._key("topology", pool, segment, "")

    def affinity(self, node: str, cidr: IPNetwork) -> bytes:
        return self._key("affinities", node, _family_segment(cidr.version), _hex_network(cidr))

    def affinities(self, node: str | None = None) -> bytes:
        return self._key("affinities", node, "") if node else self._key("affinities", "")

    def handle(self, handle_id: str) -> bytes:
        return self._key("handles", handle_id)

    def handles(self) -> bytes:
        return self._key("handles", "")

    def identity(self, identity_id: str) -> bytes:
        """A sticky identity's record (its id may hold '/')."""
        return self._key("identities", identity_id)

    def identities(self) -> bytes:
        return self._key("identities", "")

    def reservation(self, name: str) -> bytes:
        return self._key("reservations", name)

    def reservations(self) -> bytes:
        return self._key("reservations", "")

    def daemon(self, node: str) -> bytes:
        return self._key("daemons", node)

    def daemon_absence(self, node: str) -> bytes:
        """When ``node`` was first found without a live daemon (its age is its lease's)."""
        return self._key("absent", node)

    def conflict(self, node: str, address: IPAddress) -> bytes:
        """An address the node re-asserted after etcd went back, found held by another."""
        return self._key("conflicts", node, str(address))

    def conflicts(self, node: str | None = None) -> bytes:
        return self._key("conflicts", node, "") if node else self._key("conflicts", "")

    def conflict_of(self, key: bytes) -> tuple[str, str]:
        """(node, address text) of a conflict key."""
        kind, rest = self.kind_of(key)
        if kind != "conflicts" or len(rest) != 2:
            raise InvalidInput(f"not a conflict key: {key!r}")
        return rest[0], rest[1]

    def datastore(self) -> bytes:
        """The datastore's identity: written once, before its first object (a restore
        keeps it; a new etcd or another prefix has another one)."""
        return self._key("datastore")

    # keys -> objects
    def kind_of(self, key: bytes) -> tuple[str, list[str]]:
        """('pools', ['name']), ('blocks', ['v4', 'c0a80000-26']), ... or ('', [])."""
        text = key.decode(errors="replace")
        if not text.startswith(self.prefix + "/"):
            return "", []
        parts = text[len(self.prefix) + 1 :].split("/")
        return parts[0], parts[1:]

    def block_cidr(self, key: bytes, kind: str = "blocks") -> IPNetwork:
        """The CIDR of a block key (or, with ``kind="free"``, of a free-index entry)."""
        found, rest = self.kind_of(key)
        if found != kind or len(rest) != 2:
            raise InvalidInput(f"not a {kind} key: {key!r}")
        return _network_from_hex(rest[1], rest[0])

    def affinity_of(self, key: bytes) -> tuple[str, IPNetwork]:
        kind, rest = self.kind_of(key)
        if kind != "affinities" or len(rest) != 3:
            raise InvalidInput(f"not an affinity key: {key!r}")
        return rest[0], _network_from_hex(rest[2], rest[1])

    def name_of(self, key: bytes) -> str:
        _, rest = self.kind_of(key)
        return "/".join(rest)
