"""Conflicts after a restore, as plain values: what was recorded, and whether it still holds.

A daemon that re-asserts its node's record after etcd went back (a restore)
may find a recorded address given to another pod meanwhile. It never hands
it out twice: it puts its handle back, marks the address *contested* in its
block (the block still gives it to the other pod; releasing it there hands it
to the recorded attachment in the same write), and writes a
:class:`ConflictRecord` under ``conflicts/<node>/<ip>`` for the operator.
Where no pool contains the address any more, the handle stays in the
node's record only, and the record says so.

Whether a recorded conflict still *holds* is a function of the state now
(:func:`standing`): ``ipam check`` and ``ipam conflicts`` report only those
that hold, and the node's daemon deletes the others. No I/O here.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from . import allocator
from .errors import InvalidInput
from .holdings import (
    Block,
    Handle,
    parked_identity,
)
from .model import (
    IPAddress,
    IPPool,
    encode,
)
from .writes import PutConflict

#: ``resolved`` of a record the operator settled for etcd's side: the node's daemon
#: forgets the recorded attachment at its next check, then deletes the record.
KEEP_DATASTORE = "datastore"


@dataclass(frozen=True)
class ConflictRecord:
    """``address`` is used by ``handle`` (the node's record) but etcd gave it to ``holder``
    ("" when no pool contained it) when the node's daemon re-asserted its record."""

    node: str
    address: IPAddress
    handle: Handle
    holder: str
    detected: float
    resolved: str = ""

    def to_value(self) -> bytes:
        return encode({
            "address": str(self.address), "node": self.node, "handle": self.handle.id,
            "attachment": self.handle.to_dict(), "holder": self.holder,
            "container_id": self.handle.attributes.get("container_id", ""),
            "detected": self.detected, **({"resolved": self.resolved} if self.resolved else {}),
        })

    def as_write(self) -> PutConflict:
        """The write that stores this record under ``conflicts/<node>/<ip>``."""
        return PutConflict(self.node, self.address, self.to_value())

    @classmethod
    def from_value(cls, node: str, address: str, raw: bytes) -> ConflictRecord:
        """Decode a record (also one written before records carried the attachment)."""
        try:
            data: dict[str, Any] = json.loads(raw)
            handle_id = str(data["handle"])
            attachment = data.get("attachment")
            container = str(data.get("container_id", ""))
            handle = (Handle.from_dict(handle_id, attachment) if isinstance(attachment, dict)
                      else Handle(handle_id, node, (),
                                  {"container_id": container} if container else {}))
            return cls(node, ipaddress.ip_address(address), handle, str(data.get("holder", "")),
                       float(data.get("detected", 0.0)), str(data.get("resolved", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"conflict {node}/{address}: corrupt value ({exc})") from exc


@dataclass(frozen=True)
class Standing:
    """What a recorded conflict is now: whether it holds, what is there, what fixes it."""

    holds: bool
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"conflict: {self.what}; {self.fix}" if self.fix else f"conflict: {self.what}"


def who(handle_id: str, handle: Handle | None) -> str:
    """``net/web-0/eth0 (pod db/web-0) on node n1``, as much as is known."""
    identity = parked_identity(handle_id)
    if identity is not None:
        return f"sticky identity {identity} (parked)"
    if handle is None:
        return handle_id
    pod = "/".join(p for p in (handle.attributes.get("namespace"), handle.attributes.get("pod"))
                   if p)
    return f"{handle_id}{f' (pod {pod})' if pod else ''} on node {handle.node}"


def standing(conflict: ConflictRecord, block: Block | None, recorded_now: Handle | None,
             holder_now: Handle | None, pools: list[IPPool], in_record: bool = True
             ) -> Standing:
    """Whether ``conflict`` still holds, given the state now.

    ``block`` is the block containing the address (None: none), ``recorded_now``
    the recorded attachment's handle in etcd, ``holder_now`` the handle of the
    block's holder of the address; ``in_record`` whether the node's record
    still has the attachment (False only when the node's daemon knows it
    forgot it: its pod was deleted).
    """
    address, node, handle_id = conflict.address, conflict.node, conflict.handle.id
    recorded = f"{who(handle_id, conflict.handle)} (in node {node}'s record from before " \
               "etcd was restored)"
    resolve = f"topoipamctl ipam resolve-conflict {node} {address}"
    if conflict.resolved:
        return Standing(False, f"{address}: resolved for etcd's side; node {node}'s daemon "
                        f"forgets {handle_id} at its next check")
    ordinal = block.ordinal(address) if block is not None and address in block.cidr else None
    holder = block.allocations.get(ordinal) if block is not None and ordinal is not None \
        else None
    if holder == handle_id:
        return Standing(False, f"{address}: {handle_id} holds it in etcd")
    if recorded_now is not None and address not in {a.ip for a in recorded_now.addresses}:
        return Standing(False, f"{address}: {handle_id} no longer claims it")
    if recorded_now is None and not in_record:
        return Standing(False, f"{address}: node {node} no longer records {handle_id}")
    if recorded_now is None and conflict.handle.addresses:
        # A record names the attachment only once it is back in etcd: gone again, it was
        # released (its DEL, `delete node --force`), and the address went with the holder.
        return Standing(False, f"{address}: {handle_id} was released"
                        + (f"; it stays with {holder}" if holder else ""))
    if holder is None:
        if block is None and allocator.pool_of(pools, address) is None:
            return Standing(
                True, f"{address} is used by one pod, {recorded}, and no pool contains it",
                f"create a pool that contains {address} and node {node}'s daemon puts it "
                f"back; if that pod is gone: {resolve} --keep datastore")
        return Standing(
            True, f"{address} is used by {recorded}, and is free in etcd",
            f"node {node}'s daemon puts it back when it runs; now: {resolve} --keep record")
    return Standing(
        True, f"{address} is used by two pods: {recorded}, and {who(holder, holder_now)} "
              "(in etcd)",
        f"delete either pod and the address stays with the other, or keep one now: "
        f"{resolve} --keep record ({handle_id}) or --keep datastore ({holder})")
