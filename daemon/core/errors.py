"""The one exception tree of topoipam.

Every expected failure is a :class:`TopoipamError` subclass that carries the
data an operator needs (node, labels, pools tried). ``retriable`` is read by
the retry loops and by the CNI error-code mapping: a retriable error means
"try again later" (CNI code 11, gRPC UNAVAILABLE); anything else is final.
``code`` names the gRPC status the service answers with, through one table in
the servicer (retriable errors are always UNAVAILABLE / CNI 11 there).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from topoipam.proto import cniwire


class TopoipamError(Exception):
    """Root of every expected topoipam error; the message is one line for users."""

    retriable: bool = False
    #: gRPC status code name (grpc.StatusCode member) the service maps this to.
    code: str = "FAILED_PRECONDITION"
    #: CNI error code the plugin reports (>= 100 are plugin-specific).
    cni_code: int = cniwire.CNI_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(TopoipamError):
    """A request, manifest, flag or value that is malformed or out of range."""

    code = "INVALID_ARGUMENT"
    cni_code = cniwire.CNI_INVALID_CONFIG


class SelectorSyntaxError(InvalidInput):
    """A node selector that does not parse; ``column`` is 1-based."""

    def __init__(self, selector: str, column: int, reason: str) -> None:
        self.selector = selector
        self.column = column
        self.reason = reason
        shown = selector if len(selector) <= 80 else selector[:77] + "..."
        super().__init__(f"invalid selector {shown!r} at column {column}: {reason}")


class NotFound(TopoipamError):
    code = "NOT_FOUND"
    cni_code = cniwire.CNI_NOT_FOUND


class AlreadyExists(TopoipamError):
    code = "ALREADY_EXISTS"
    cni_code = cniwire.CNI_ALREADY_EXISTS


class PoolOverlap(InvalidInput):
    def __init__(self, name: str, cidr: str, other: str, other_cidr: str) -> None:
        self.name, self.cidr, self.other, self.other_cidr = name, cidr, other, other_cidr
        super().__init__(
            f"pool {name} ({cidr}) overlaps pool {other} ({other_cidr})"
        )


class PoolInUse(TopoipamError):
    def __init__(self, name: str, allocated: int) -> None:
        self.name, self.allocated = name, allocated
        super().__init__(
            f"pool {name} still has {allocated} allocated address(es); "
            "release them first or use --force"
        )


class NodeInUse(TopoipamError):
    def __init__(self, name: str, handles: int) -> None:
        self.name, self.handles = name, handles
        super().__init__(
            f"node {name} still holds addresses for {handles} attachment(s); "
            "release them first or use --force"
        )


class NodeAlive(TopoipamError):
    """Refused because the node's daemon is alive: the node is not lost."""

    def __init__(self, node: str, what: str) -> None:
        self.node = node
        super().__init__(f"node {node}'s topoipamd is alive; {what}")


def _describe_labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return "{}"
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def _describe_pools(pools: Iterable[str]) -> str:
    names = list(pools)
    return ", ".join(names) if names else "none"


class NoPoolForNode(TopoipamError):
    """No enabled pool selects the node (or the requested pools are unusable)."""

    code = "FAILED_PRECONDITION"
    cni_code = cniwire.CNI_NO_POOL

    def __init__(
        self, node: str, labels: Mapping[str, str], family: int, pools_considered: Iterable[str],
        manual: Iterable[str] = (),
    ) -> None:
        self.node, self.labels, self.family = node, dict(labels), family
        self.pools_considered = list(pools_considered)
        # Manual pools are never candidates here; named apart so nobody wonders why
        # one that would select the node is not used.
        self.manual = list(manual)
        also = (f"; Manual pools, used only when named: {', '.join(self.manual)}"
                if self.manual else "")
        super().__init__(
            f"no enabled IPv{family} pool selects node {node} "
            f"(labels {_describe_labels(self.labels)}; pools considered: "
            f"{_describe_pools(self.pools_considered)}{also})"
        )


class PoolExhausted(TopoipamError):
    """Every selected pool is full for this node."""

    code = "RESOURCE_EXHAUSTED"
    cni_code = cniwire.CNI_EXHAUSTED

    def __init__(
        self, node: str, labels: Mapping[str, str], family: int, pools: Iterable[str],
        reason: str = "",
    ) -> None:
        self.node, self.labels, self.family = node, dict(labels), family
        self.pools, self.reason = list(pools), reason
        extra = f"; {reason}" if reason else ""
        super().__init__(
            f"no free IPv{family} address for node {node} "
            f"(labels {_describe_labels(self.labels)}) in pools "
            f"{_describe_pools(self.pools)}{extra}"
        )


class AddressUnavailable(TopoipamError):
    """A specifically requested address is in use, reserved, or outside every usable pool."""

    code = "FAILED_PRECONDITION"
    cni_code = cniwire.CNI_ADDRESS_UNAVAILABLE


class IdentityInUse(TopoipamError):
    """A sticky identity is live under another attachment: never two owners at once."""

    code = "FAILED_PRECONDITION"
    cni_code = cniwire.CNI_ADDRESS_UNAVAILABLE

    def __init__(self, identity: str, holder: str, holder_node: str, wanted: str = "",
                 node: str = "", *, holder_alive: bool = False, gone_seconds: float | None = None,
                 takeover_seconds: int = 0) -> None:
        """``gone_seconds``: the holder's node has had no live daemon for that long (None:
        alive, or not known); ``takeover_seconds``: stickyTakeoverSeconds then."""
        self.identity, self.holder, self.wanted = identity, holder, wanted
        self.gone_seconds = gone_seconds
        message = (f"sticky identity {identity} is live under attachment {holder} "
                   f"(node {holder_node}); ")
        if wanted:
            message += f"attachment {wanted} (node {node}) cannot take it too: "
        if gone_seconds is not None:
            message += gone_clause(identity, holder_node, gone_seconds, takeover_seconds)
        elif wanted:
            message += "delete the other pod first" + (
                f" (node {holder_node}'s topoipamd is alive)" if holder_alive else "")
        else:
            message += (f"delete that pod first (its DEL parks it), or, if node {holder_node} "
                        f"is lost, park it with `{park_command(identity)}`")
        super().__init__(message)


def park_command(identity: str) -> str:
    """The operator's command that parks a live sticky identity now."""
    return f"topoipamctl ipam release --identity {identity} --park"


def gone_clause(identity: str, node: str, gone_seconds: float, takeover_seconds: int) -> str:
    """What an identity held live on a node without a live daemon waits for, and the way out."""
    gone = f"node {node} has had no live topoipamd for {gone_seconds:.0f} s"
    if not takeover_seconds:
        wait = "and stickyTakeoverSeconds is 0 (never taken over)"
    else:
        left = max(0.0, takeover_seconds - gone_seconds)
        wait = (f"another node's ADD takes it over at stickyTakeoverSeconds={takeover_seconds} "
                f"(in {left:.0f} s)")
    return f"{gone}; {wait}; park it now with `{park_command(identity)}`"


class UnknownPool(InvalidInput):
    def __init__(self, pool: str, reason: str = "does not exist") -> None:
        self.pool = pool
        super().__init__(f"requested pool {pool} {reason}")


class Conflict(TopoipamError):
    """Optimistic concurrency retries were exhausted; safe to retry later."""

    retriable = True


class DatastoreUnavailable(TopoipamError):
    """etcd could not be reached or did not answer in time."""

    retriable = True


class AuthenticationFailed(DatastoreUnavailable):
    """etcd refused our credentials: retrying soon will not help, but a fixed password may."""


class NotReady(TopoipamError):
    """The daemon's cache is not in sync with etcd; answering would risk stale data."""

    retriable = True


class NodeFenced(DatastoreUnavailable):
    """This daemon does not hold its node's fence (another daemon serves the node, or our
    etcd lease lapsed): it must not write for the node. Retriable: the runtime retries
    and reaches whichever daemon holds the fence."""

    def __init__(self, node: str, reason: str) -> None:
        self.node, self.reason = node, reason
        super().__init__(f"topoipamd does not serve node {node}: {reason}; try again")


class EtcdOutOfSpace(DatastoreUnavailable):
    """etcd raised its NOSPACE alarm: it refuses every write until an operator acts."""

    def __init__(self, details: str) -> None:
        super().__init__(
            f"etcd is out of space (NOSPACE alarm: {details}); nothing was written. "
            "The operator must compact, defragment and disarm it "
            "(etcdctl compact, etcdctl defrag, etcdctl alarm disarm)")


class EtcdWentBack(DatastoreUnavailable):
    """etcd's history moved backwards (restored from a snapshot, or another cluster)."""
