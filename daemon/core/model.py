"""Plain values of the operator's data model: pools, nodes, config, reservations.

No I/O here. Every value validates itself on construction and raises
:class:`InvalidInput` with a message that names the object and the field, so a
bad manifest, flag or etcd value is refused before anything is written.
``to_dict``/``from_dict`` give the JSON shape stored in etcd; the
store owns the keys. Who holds which address (attachments, handles, sticky
identities, blocks) is in :mod:`topoipam.daemon.core.holdings`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from topoipam.proto import cjson

from .errors import InvalidInput, SelectorSyntaxError
from .selector import Selector, parse


def encode(value: dict[str, Any]) -> bytes:
    """A value as etcd holds it: compact JSON (``json.dumps`` with "," and ":")."""
    return cjson.dumps(value, separators=(",", ":")).encode()


IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_BLOCK_SIZE = {4: 26, 6: 122}
BLOCK_SIZE_RANGE = {4: (20, 32), 6: (116, 128)}
ASSIGNMENT_MODES = ("Automatic", "Manual")
#: spec.priority of an IPPool: higher serves first.
PRIORITY_RANGE = (-1000, 1000)
#: The IPPool ``gateway`` value of a routed pool that reserves no gateway address.
GATEWAY_NONE = "none"

_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9_./-]{1,253}$")
# Kubernetes label syntax (apimachinery validation.IsQualifiedName / IsValidLabelValue).
_K8S_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-', "
            "starting and ending with a letter or digit (at most 253 characters)"
        )
    return name


def check_pool_name(name: object) -> str:
    """A new pool's name: a DNS-1123 label, as calicoctl requires.

    Only names being written are held to this; pools stored by older versions
    keep decoding under :func:`check_name`.
    """
    if not isinstance(name, str) or not _DNS_LABEL_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid ippool name {name!r}: must be a DNS-1123 label (lowercase letters, "
            "digits and '-', starting and ending with a letter or digit, at most 63 characters)"
        )
    return name


# Ranges no pod address may come from (IANA special-purpose registries).
_RESERVED_RANGES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), reason) for cidr, reason in (
        ("0.0.0.0/8", "unspecified (\"this network\")"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved (including the broadcast address)"),
        ("::/127", "unspecified/loopback"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)


def reserved_range_problem(cidr: IPNetwork) -> str | None:
    """Why no pod may get addresses from ``cidr``, or None if it may.

    A /0 is refused outright; otherwise any overlap with a special-purpose
    range is named. IPv4-mapped IPv6 (``::ffff:10.8.0.0/120``) is refused
    rather than compared with the IPv4 pools: it would be the same addresses
    seen twice.
    """
    if cidr.prefixlen == 0:
        return f"{cidr} covers every address (a wildcard, not a pool)"
    for reserved, reason in _RESERVED_RANGES:
        if reserved.version == cidr.version and reserved.overlaps(cidr):
            detail = ""
            if reason == "IPv4-mapped":
                mapped = ipaddress.ip_network(
                    f"{ipaddress.IPv4Address(int(cidr.network_address) & 0xFFFFFFFF)}/"
                    f"{max(cidr.prefixlen - 96, 0)}", strict=False)
                detail = f" (the IPv4 range {mapped} written as IPv6; use an IPv4 pool)"
            return f"{cidr} is {reason} ({reserved}){detail}: no pod may have these addresses"
    return None


def parse_network(value: object, what: str) -> IPNetwork:
    """A strictly masked CIDR ("192.168.0.0/24", not "192.168.0.1/24")."""
    if not isinstance(value, str) or "/" not in value:
        raise InvalidInput(f"{what}: {value!r} is not a CIDR (expected e.g. 192.168.0.0/24)")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise InvalidInput(f"{what}: {value!r} is not a valid CIDR") from exc
        raise InvalidInput(
            f"{what}: {value!r} has host bits set (did you mean {loose}?)"
        ) from exc


def parse_address(value: object, what: str) -> IPAddress:
    if not isinstance(value, str):
        raise InvalidInput(f"{what}: {value!r} is not an IP address")
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError as exc:
        raise InvalidInput(f"{what}: {value!r} is not a valid IP address") from exc


def _expect_keys(what: str, data: Mapping[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InvalidInput(f"{what}: unknown field(s) {', '.join(unknown)}")


def _bool(what: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{what}: expected true or false, got {value!r}")
    return value


def _int(what: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInput(f"{what}: expected a whole number >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class IPPool:
    name: str
    cidr: IPNetwork
    block_size: int
    node_selector: str = "all()"
    disabled: bool = False
    assignment_mode: str = "Automatic"
    #: The IPPool's ``gateway`` field: None for the default (the pool's first
    #: usable address), ``"none"`` for a routed pool that needs none, or an address.
    gateway_spec: str | None = None
    #: Pools that select a node serve it highest priority first (per family); a lower
    #: priority serves only when every higher one cannot. Equal priorities: name order.
    priority: int = 0
    #: A node label key: nodes with the same value of it claim their blocks inside
    #: aligned ranges of /``topology_block_size`` that belong to that value ("": none).
    topology_key: str = ""
    #: The ranges' prefix length (None: :attr:`block_size` - 4, within the pool).
    topology_block_size: int | None = None
    selector: Selector = field(init=False, repr=False, compare=False)
    #: The address pods of this pool route through; never handed out when inside the pool.
    gateway: IPAddress | None = field(init=False, repr=False, compare=False)
    #: :meth:`unusable` as integers, computed once: the allocator's hot path compares ints.
    unusable_ints: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_name("pool", self.name)
        low, high = BLOCK_SIZE_RANGE[self.cidr.version]
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or not (
            low <= self.block_size <= high
        ):
            raise InvalidInput(
                f"pool {self.name}: block size {self.block_size!r} is out of range for "
                f"IPv{self.cidr.version} (allowed {low}-{high})"
            )
        if self.cidr.prefixlen > self.block_size:
            raise InvalidInput(
                f"pool {self.name}: CIDR {self.cidr} is smaller than one /{self.block_size} block"
            )
        low, high = PRIORITY_RANGE
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or not (
            low <= self.priority <= high
        ):
            raise InvalidInput(f"pool {self.name}: priority {self.priority!r} must be an "
                               f"integer from {low} to {high}")
        self._check_topology()
        if self.assignment_mode not in ASSIGNMENT_MODES:
            raise InvalidInput(
                f"pool {self.name}: assignmentMode {self.assignment_mode!r} must be "
                "Automatic or Manual"
            )
        try:
            selector = parse(self.node_selector)
        except SelectorSyntaxError as exc:
            raise InvalidInput(f"pool {self.name}: {exc}") from exc
        object.__setattr__(self, "node_selector", str(selector))
        object.__setattr__(self, "selector", selector)
        object.__setattr__(self, "gateway", self._resolve_gateway())
        object.__setattr__(self, "unusable_ints", frozenset(int(a) for a in self.unusable()))

    def _check_topology(self) -> None:
        if self.topology_key:
            check_kubernetes_label(self.topology_key, "", f"pool {self.name}: topologyKey")
        size = self.topology_block_size
        if size is None:
            return
        if not self.topology_key:
            raise InvalidInput(f"pool {self.name}: topologyBlockSize needs a topologyKey")
        low, high = self.cidr.prefixlen, self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or not low <= size <= high:
            raise InvalidInput(f"pool {self.name}: topologyBlockSize {size!r} must be a prefix "
                               f"length from {low} (the pool's) to {high} (its blockSize)")

    @property
    def topology_prefix(self) -> int:
        """The prefix length of the pool's topology ranges."""
        if self.topology_block_size is not None:
            return self.topology_block_size
        return max(self.cidr.prefixlen, self.block_size - 4)

    def topology_range(self, cidr: IPNetwork) -> IPNetwork:
        """The topology range that holds block ``cidr``."""
        return cidr.supernet(new_prefix=self.topology_prefix)

    def _resolve_gateway(self) -> IPAddress | None:
        spec = self.gateway_spec
        if spec is None:
            # A pool of one or two addresses (a /31, /32, /127, /128) is routed:
            # every address of it is a host, none is a gateway.
            if self.cidr.num_addresses <= 2:
                return None
            return self.cidr.network_address + 1
        if spec == GATEWAY_NONE:
            return None
        address = parse_address(spec, f"pool {self.name}: gateway")
        if address.version != self.family:
            raise InvalidInput(
                f"pool {self.name}: gateway {address} is not an IPv{self.family} address")
        if address in self.cidr and not self._host_address(address):
            raise InvalidInput(
                f"pool {self.name}: gateway {address} is the network or broadcast address "
                f"of {self.cidr}")
        return address

    @property
    def family(self) -> int:
        return self.cidr.version

    @property
    def bounds(self) -> tuple[int, int]:
        """First and last address of the pool, as integers (cheap containment tests)."""
        return int(self.cidr.network_address), int(self.cidr.broadcast_address)

    @property
    def automatic(self) -> bool:
        return self.assignment_mode == "Automatic"

    def selects(self, labels: Mapping[str, str]) -> bool:
        return self.selector.matches(labels)

    def block_cidrs(self) -> Iterator[IPNetwork]:
        """Every block CIDR of the pool, in address order."""
        return self.cidr.subnets(new_prefix=self.block_size)

    def block_of(self, address: IPAddress) -> IPNetwork:
        return ipaddress.ip_network(f"{address}/{self.block_size}", strict=False)

    def _host_address(self, address: IPAddress) -> bool:
        """False for the pool's own network address (and IPv4 broadcast address)."""
        if self.cidr.num_addresses <= 2:
            return True
        if address == self.cidr.network_address:
            return False
        return not (self.family == 4 and address == self.cidr.broadcast_address)

    def usable(self, address: IPAddress) -> bool:
        """False for the pool's network and IPv4 broadcast address, and its gateway.

        Pods may sit on a bridge whose subnet is the pool; handing them the
        subnet's network or broadcast address, or the address the bridge (or
        the host side of a ptp link) takes as their gateway, would break them.
        """
        return address != self.gateway and self._host_address(address)

    def unusable(self) -> list[IPAddress]:
        """The addresses of the pool that are never handed out (reservations aside)."""
        candidates = [self.cidr.network_address, self.cidr.broadcast_address]
        if self.gateway is not None and self.gateway in self.cidr:
            candidates.append(self.gateway)
        return sorted({a for a in candidates if not self.usable(a)})

    @property
    def capacity(self) -> int:
        return self.cidr.num_addresses - len(self.unusable())

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "cidr": str(self.cidr),
            "blockSize": self.block_size,
            "nodeSelector": self.node_selector,
            "disabled": self.disabled,
            "assignmentMode": self.assignment_mode,
        }
        if self.gateway_spec is not None:
            data["gateway"] = self.gateway_spec
        if self.priority:
            data["priority"] = self.priority
        if self.topology_key:
            data["topologyKey"] = self.topology_key
        if self.topology_block_size is not None:
            data["topologyBlockSize"] = self.topology_block_size
        return data

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> IPPool:
        what = f"pool {name}"
        if not isinstance(data, Mapping):
            raise InvalidInput(f"{what}: spec must be a mapping")
        _expect_keys(what, data, ("cidr", "blockSize", "nodeSelector", "disabled",
                                  "assignmentMode", "gateway", "priority", "topologyKey",
                                  "topologyBlockSize"))
        if "cidr" not in data:
            raise InvalidInput(f"{what}: cidr is required")
        cidr = parse_network(data["cidr"], f"{what}: cidr")
        block_size = data.get("blockSize", DEFAULT_BLOCK_SIZE[cidr.version])
        if isinstance(block_size, str):
            raise InvalidInput(
                f"{what}: blockSize must be a number, not the text {block_size!r} "
                f"(write blockSize: {block_size.strip()}, without quotes)"
            )
        priority = data.get("priority")
        if priority is None:  # absent or null: the default, as for the other optional fields
            priority = 0
        if isinstance(priority, str):
            raise InvalidInput(
                f"{what}: priority must be an integer from {PRIORITY_RANGE[0]} to "
                f"{PRIORITY_RANGE[1]}, not the text {priority!r}")
        topology_size = data.get("topologyBlockSize")
        if isinstance(topology_size, str):
            raise InvalidInput(f"{what}: topologyBlockSize must be a prefix length (a number), "
                               f"not the text {topology_size!r}")
        topology_key = data.get("topologyKey") or ""
        if not isinstance(topology_key, str):
            raise InvalidInput(f"{what}: topologyKey must be a node label key, "
                               f"not {topology_key!r}")
        selector = data.get("nodeSelector") or "all()"
        if not isinstance(selector, str):
            raise InvalidInput(f"{what}: nodeSelector must be a string")
        return cls(
            name=name,
            cidr=cidr,
            block_size=block_size,
            node_selector=selector,
            disabled=_bool(f"{what}: disabled", data.get("disabled", False)),
            assignment_mode=data.get("assignmentMode", "Automatic"),
            gateway_spec=parse_gateway_spec(what, data.get("gateway")),
            priority=priority,
            topology_key=topology_key,
            topology_block_size=topology_size,
        )


def parse_gateway_spec(what: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what}: gateway must be an IP address or {GATEWAY_NONE!r}, "
                           f"not {value!r}")
    value = value.strip()
    if value.lower() == GATEWAY_NONE:
        return GATEWAY_NONE
    return str(parse_address(value, f"{what}: gateway"))


def check_pool_overlaps(pool: IPPool, others: Iterable[IPPool]) -> None:
    """Raise PoolOverlap if ``pool`` overlaps any other pool (same name is ignored)."""
    from .errors import PoolOverlap

    for other in others:
        if other.name != pool.name and other.family == pool.family and other.cidr.overlaps(
            pool.cidr
        ):
            raise PoolOverlap(pool.name, str(pool.cidr), other.name, str(other.cidr))


@dataclass(frozen=True)
class Node:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("node", self.name)
        if not isinstance(self.labels, Mapping):
            raise InvalidInput(f"node {self.name}: labels must be a mapping")
        for key, value in self.labels.items():
            check_label(key, value, f"node {self.name}")
        object.__setattr__(self, "labels", dict(self.labels))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": dict(sorted(self.labels.items()))}

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> Node:
        if not isinstance(data, Mapping):
            raise InvalidInput(f"node {name}: spec must be a mapping")
        _expect_keys(f"node {name}", data, ("labels",))
        return cls(name=name, labels=data.get("labels") or {})


def check_label(key: object, value: object, what: str) -> None:
    if not isinstance(key, str) or not _LABEL_KEY_RE.fullmatch(key):
        raise InvalidInput(
            f"{what}: invalid label key {key!r} (letters, digits, '_', '.', '/', '-')"
        )
    if not isinstance(value, str):
        raise InvalidInput(f"{what}: label {key} must have a string value, got {value!r}")
    if len(value) > 253 or any(ord(c) < 32 for c in value) or ('"' in value and "'" in value):
        raise InvalidInput(f"{what}: invalid value {value!r} for label {key}")


def check_kubernetes_label(key: object, value: object, what: str) -> None:
    """Kubernetes label rules, for labels being written (CLI, manifests, daemon config).

    Key: an optional DNS-subdomain prefix (at most 253 characters) and '/',
    then a name of at most 63 characters of ``[A-Za-z0-9._-]``, alphanumeric
    at both ends. Value: empty, or at most 63 such characters. Stored labels
    are read back under the older, looser :func:`check_label`.
    """
    if not isinstance(key, str):
        raise InvalidInput(f"{what}: invalid label key {key!r}: must be a string")
    prefix, slash, name = key.rpartition("/")
    problem = ""
    if key.count("/") > 1:
        problem = "at most one '/' (prefix/name)"
    elif slash and not prefix:
        problem = "the prefix before '/' is empty"
    elif slash and (len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.fullmatch(prefix)):
        problem = "the prefix must be a lowercase DNS subdomain of at most 253 characters"
    elif not name:
        problem = "the name is empty"
    elif len(name) > 63:
        problem = f"the name part longer than 63 characters ({len(name)})"
    elif not _K8S_NAME_RE.fullmatch(name):
        problem = ("the name must be letters, digits, '-', '_' and '.', starting and ending "
                   "with a letter or digit")
    if problem:
        shown = key if len(key) <= 80 else key[:77] + "..."
        raise InvalidInput(f"{what}: invalid label key {shown!r}: {problem}")
    if not isinstance(value, str):
        raise InvalidInput(f"{what}: label {key} must have a string value, got {value!r}")
    if len(value) > 63:
        raise InvalidInput(f"{what}: invalid value for label {key}: longer than 63 characters "
                           f"({len(value)})")
    if value and not _K8S_NAME_RE.fullmatch(value):
        raise InvalidInput(
            f"{what}: invalid value {value!r} for label {key}: use letters, digits, '-', '_' "
            "and '.', starting and ending with a letter or digit (at most 63 characters)"
        )


#: How long a node's absence (no live daemon) is remembered, and so the longest
#: stickyTakeoverSeconds that can ever elapse.
MAX_STICKY_TAKEOVER_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True)
class IPAMConfig:
    strict_affinity: bool = False
    max_blocks_per_host: int = 0
    auto_allocate_blocks: bool = True
    ip_cooldown_seconds: int = 0
    #: Free addresses each daemon keeps ready in its own blocks (background claims).
    #: Off by default: it claims blocks ahead of need, which small per-rack pools
    #: cannot always spare.
    warm_addresses: int = 0
    #: How long DEL of a sticky attachment parks its address for the identity's next
    #: ADD. Ten minutes: long enough for a drained node's StatefulSet pod or a
    #: restarted VM to be rescheduled, pull its image and come back; short enough
    #: that a deleted workload's addresses return within one maintenance window.
    sticky_hold_seconds: int = 600
    #: How long the node of a live sticky identity must have had no live daemon (its
    #: fence gone) before an ADD of that identity on another node takes the address
    #: over (0: never). Five minutes, like Kubernetes' default eviction timeout.
    sticky_takeover_seconds: int = 300

    _FIELDS = {
        "strictAffinity": "strict_affinity",
        "maxBlocksPerHost": "max_blocks_per_host",
        "autoAllocateBlocks": "auto_allocate_blocks",
        "ipCooldownSeconds": "ip_cooldown_seconds",
        "warmAddresses": "warm_addresses",
        "stickyHoldSeconds": "sticky_hold_seconds",
        "stickyTakeoverSeconds": "sticky_takeover_seconds",
    }

    def __post_init__(self) -> None:
        _bool("ipamconfig: strictAffinity", self.strict_affinity)
        _bool("ipamconfig: autoAllocateBlocks", self.auto_allocate_blocks)
        _int("ipamconfig: maxBlocksPerHost", self.max_blocks_per_host)
        _int("ipamconfig: ipCooldownSeconds", self.ip_cooldown_seconds)
        _int("ipamconfig: warmAddresses", self.warm_addresses)
        _int("ipamconfig: stickyHoldSeconds", self.sticky_hold_seconds)
        _int("ipamconfig: stickyTakeoverSeconds", self.sticky_takeover_seconds)
        if self.sticky_takeover_seconds > MAX_STICKY_TAKEOVER_SECONDS:
            raise InvalidInput(
                f"ipamconfig: stickyTakeoverSeconds: at most {MAX_STICKY_TAKEOVER_SECONDS} "
                f"(30 days, as long as a node's absence is remembered), got "
                f"{self.sticky_takeover_seconds}")

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, attr) for key, attr in self._FIELDS.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IPAMConfig:
        if not isinstance(data, Mapping):
            raise InvalidInput("ipamconfig: spec must be a mapping")
        _expect_keys("ipamconfig", data, cls._FIELDS)
        return cls(**{cls._FIELDS[k]: v for k, v in data.items()})


@dataclass(frozen=True)
class IPReservation:
    name: str
    cidrs: tuple[IPNetwork, ...]

    def __post_init__(self) -> None:
        check_name("ipreservation", self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"cidrs": [str(c) for c in self.cidrs]}

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> IPReservation:
        what = f"ipreservation {name}"
        if not isinstance(data, Mapping):
            raise InvalidInput(f"{what}: spec must be a mapping")
        _expect_keys(what, data, ("cidrs", "reservedCIDRs"))
        raw = data.get("cidrs", data.get("reservedCIDRs"))
        if not isinstance(raw, list) or not raw:
            raise InvalidInput(f"{what}: cidrs must be a non-empty list")
        cidrs = []
        for item in raw:
            text = item if isinstance(item, str) and "/" in item else f"{item}"
            if isinstance(item, str) and "/" not in item:
                addr = parse_address(item, f"{what}: cidrs")
                text = f"{addr}/{addr.max_prefixlen}"
            cidrs.append(parse_network(text, f"{what}: cidrs"))
        return cls(name=name, cidrs=tuple(cidrs))


#: The objects an operator writes (manifests, `topoipamctl`).
Resource: TypeAlias = IPPool | Node | IPAMConfig | IPReservation
#: The name of the one IPAMConfig object.
CONFIG_NAME = "default"


def kind_of(obj: Resource) -> str:
    return type(obj).__name__


def name_of(obj: Resource) -> str:
    return CONFIG_NAME if isinstance(obj, IPAMConfig) else obj.name


def resource_id(obj: Resource) -> str:
    """kubectl-style ``ippool/rack-0``, used in every per-object output line."""
    return f"{kind_of(obj).lower()}/{name_of(obj)}"
