"""Release by address: who holds an address, and freeing or unlisting it.

What ``topoipamctl ipam release --ip`` does (and ``ipam check``'s advice): the
holder of an address read with the revisions a release must guard; a live
holder is refused unless forced; a parked sticky address takes its identity
with it; an address no block lists is unlisted from the handles that name it.
Each is one guarded transaction through the one retry policy.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from .core import allocator
from .core.allocator import free_mark_writes, has_free
from .core.errors import InvalidInput
from .core.holdings import Block, Handle, parked_identity
from .core.model import IPAddress
from .core.writes import (
    DeleteHandle,
    DeleteIdentity,
    PutBlock,
    PutHandle,
    PutIdentity,
    Versioned,
    Write,
)
from .store import LOST_RACE, EtcdStore, LostRace, retry_cas


@dataclass(frozen=True)
class Holding:
    """Who holds ``address`` in its block, read with the revisions a release must guard."""

    address: IPAddress
    block: Versioned[Block]
    holder: str
    handle: Versioned[Handle] | None

    @property
    def live(self) -> bool:
        """The holder's attachment still exists and claims the address: a pod uses it."""
        return self.handle is not None and any(
            a.ip == self.address for a in self.handle.value.addresses)

    @property
    def attachment(self) -> str:
        """namespace/pod/container, from the handle's attributes (what is known of them)."""
        attributes = self.handle.value.attributes if self.handle is not None else {}
        parts = [attributes.get(k) for k in ("namespace", "pod", "container_id")]
        return "/".join(p for p in parts if p) or f"handle {self.holder}"

    def describe(self) -> str:
        node = self.handle.value.node if self.handle is not None else "?"
        return f"attachment {self.attachment} (handle {self.holder}, node {node})"


async def read_holding(store: EtcdStore, address: IPAddress) -> Holding | None:
    block = await store.block_containing(address)
    if block is None:
        return None
    holder = block.value.allocations.get(block.value.ordinal(address))
    if holder is None:
        return None
    return Holding(address, block, holder, await store.get_handle(holder))


def refuse_live(holding: Holding) -> InvalidInput:
    return InvalidInput(
        f"{holding.address} is held by {holding.describe()}, which still exists: releasing it "
        "would let the next pod get the same address; delete the pod, or use --force"
    )


async def release_holding(store: EtcdStore, address: IPAddress, force: bool
                          ) -> Holding | None:
    """Free ``address`` in its block, in one transaction with its handle.

    The transaction guards the block and the handle as read (an absent handle
    must still be absent), so an attachment that appears or changes meanwhile
    makes it re-read and re-decide: a live attachment's address is freed only
    with ``force``. Returns what was released, or None if the address was free.
    """
    async def attempt() -> tuple[list[Write], Holding | None]:
        holding = await read_holding(store, address)
        if holding is None:
            return [], None
        pools = [p.value for p in await store.list_pools()]
        if holding.live and not force:
            raise refuse_live(holding)
        block, _ = allocator.release_addresses(holding.block.value, [address], None, time.time())
        writes: list[Write] = [PutBlock(block, holding.block.mod_revision), *free_mark_writes(
            block.cidr, has_free(holding.block.value, pools), block, pools)]
        handle = holding.handle
        if handle is None:
            writes.append(DeleteHandle(holding.holder, 0))  # a guard: still absent
        else:
            rest = tuple(a for a in handle.value.addresses if a.ip != address)
            writes.append(
                PutHandle(dataclasses.replace(handle.value, addresses=rest), handle.mod_revision)
                if rest else DeleteHandle(holding.holder, handle.mod_revision))
        writes += await identity_release_writes(store, holding)
        return writes, holding

    return await store.commit_with_retry(attempt, str(address))


async def identity_release_writes(store: EtcdStore, holding: Holding) -> list[Write]:
    """The sticky identity's part of freeing ``holding``: the address leaves its record,
    and the record goes with its last address (or, live, with its handle)."""
    handle = holding.handle
    identity_id = parked_identity(holding.holder) or (
        handle.value.attributes.get("identity") if handle is not None else None)
    if not identity_id:
        return []
    identity = await store.get_identity(identity_id)
    if identity is None:
        return []
    value = identity.value
    if value.parked != (parked_identity(holding.holder) is not None) or (
            not value.parked and value.handle != holding.holder):
        return []  # the record is about another attachment: ipam check reports it
    rest = tuple(a for a in value.addresses if a.ip != holding.address)
    handle_gone = handle is not None and not any(
        a.ip != holding.address for a in handle.value.addresses)
    if not rest or handle_gone:
        return [DeleteIdentity(identity_id, identity.mod_revision)]
    return [PutIdentity(dataclasses.replace(value, addresses=rest), identity.mod_revision)]


async def unlist_address(store: EtcdStore, address: IPAddress) -> list[str]:
    """Remove ``address`` from handles that list it although its block does not give it to them.

    Such a handle (an orphan, reported by `ipam check`) would otherwise keep
    the address in `get allocations` of its pod forever. The block is written
    back unchanged in the same transaction so that the fix is guarded by its
    revision too: if it was handed to the handle meanwhile, nothing changes.
    """
    fixed: list[str] = []

    async def round_() -> list[str] | LostRace:
        # Each handle is its own guarded commit: a round that lost any of them runs again.
        pending = False
        for current in await store.list_handles():
            handle = current.value
            entries = [a for a in handle.addresses if a.ip == address]
            if not entries:
                continue
            block = await store.get_block(entries[0].block)
            if block is not None and address in block.value.cidr and (
                block.value.allocations.get(block.value.ordinal(address)) == handle.id
            ):
                continue
            rest = tuple(a for a in handle.addresses if a.ip != address)
            writes: list[Write] = [
                PutHandle(Handle(handle.id, handle.node, rest, handle.attributes),
                          current.mod_revision) if rest
                else DeleteHandle(handle.id, current.mod_revision)
            ]
            if block is not None:
                writes.append(PutBlock(block.value, block.mod_revision))
            if (await store.commit(writes)).succeeded:
                fixed.append(handle.id)
            else:
                pending = True
        return LOST_RACE if pending else fixed

    return await retry_cas(round_, f"handles of {address}")
