"""Typed reads of topoipam objects and the allocator's index queries.

Every value is decoded through one skip-corrupt loop (:func:`decode_each`):
a corrupt value is logged (or reported) and skipped, never fatal. The index
queries (``block_containing``, ``survey_blocks``, ``claim_reads``,
``room_windows``, ``free_blocks``, ``free_marked``) read, in one round trip
each, exactly what a claim or a borrow needs, so the engine never reads a
whole pool on a pod's path.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from aetcd import rpc

from ..core.errors import InvalidInput
from ..core.holdings import (
    Block,
    Handle,
    Identity,
    TopologyRange,
)
from ..core.model import (
    BLOCK_SIZE_RANGE,
    IPAddress,
    IPAMConfig,
    IPNetwork,
    IPPool,
    IPReservation,
    Node,
)
from ..core.writes import Versioned
from .transport import EtcdTransport

log = logging.getLogger(__name__)

T = TypeVar("T")


def decode_each(kvs: Iterable[Any], decoder: Callable[[bytes, bytes], T],
                on_corrupt: Callable[[str], None] | None = None) -> list[Versioned[T]]:
    """The values of ``kvs`` that decode, with their mod_revision: the one skip-corrupt loop.

    A corrupt value is never fatal: it is logged (or handed to ``on_corrupt``,
    which ``ipam check`` reports) and skipped, so one bad key cannot stop a
    daemon or a report.
    """
    decoded = []
    for kv in kvs:
        try:
            decoded.append(Versioned(decoder(kv.key, kv.value), kv.mod_revision))
        except (InvalidInput, ValueError) as exc:
            line = f"corrupt value at {kv.key.decode(errors='replace')}: {exc}"
            if on_corrupt is None:
                log.warning("skipping %s", line)
            else:
                on_corrupt(line)
    return decoded


def decode(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what}: value is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise InvalidInput(f"{what}: value is not a JSON object")
    return value



class EtcdReads(EtcdTransport):
    """Typed reads: each returns decoded values with their mod_revision (the CAS guard)."""

    def _decode_named(self, key: bytes, raw: bytes, what: str,
                      from_dict: Callable[[str, dict[str, Any]], T]) -> T:
        """An object whose key ends in its name (or id): ``what`` names its kind in errors."""
        name = self.keys.name_of(key)
        return from_dict(name, decode(raw, f"{what} {name}"))

    def decode_pool(self, key: bytes, raw: bytes) -> IPPool:
        return self._decode_named(key, raw, "pool", IPPool.from_dict)

    def decode_node(self, key: bytes, raw: bytes) -> Node:
        return self._decode_named(key, raw, "node", Node.from_dict)

    def decode_block(self, key: bytes, raw: bytes) -> Block:
        block = Block.from_dict(decode(raw, f"block {key.decode(errors='replace')}"))
        if self.keys.block(block.cidr) != key:
            raise InvalidInput(f"block {block.cidr} stored under the wrong key {key!r}")
        return block

    def decode_handle(self, key: bytes, raw: bytes) -> Handle:
        return self._decode_named(key, raw, "handle", Handle.from_dict)

    def decode_identity(self, key: bytes, raw: bytes) -> Identity:
        return self._decode_named(key, raw, "identity", Identity.from_dict)

    def decode_reservation(self, key: bytes, raw: bytes) -> IPReservation:
        return self._decode_named(key, raw, "ipreservation", IPReservation.from_dict)

    def decode_config(self, raw: bytes) -> IPAMConfig:
        return IPAMConfig.from_dict(decode(raw, "ipamconfig"))

    async def _typed_prefix(self, prefix: bytes, decoder: Any) -> list[Versioned[Any]]:
        kvs, _ = await self.prefix_raw(prefix)
        return decode_each(kvs, decoder)

    def _typed_value(self, key: bytes, raw: tuple[bytes, int] | None,
                     decoder: Callable[[bytes, bytes], T]) -> Versioned[T] | None:
        return None if raw is None else Versioned(decoder(key, raw[0]), raw[1])

    async def get_config(self) -> Versioned[IPAMConfig]:
        raw = await self.get_raw(self.keys.config())
        if raw is None:
            return Versioned(IPAMConfig(), 0)
        try:
            return Versioned(self.decode_config(raw[0]), raw[1])
        except InvalidInput as exc:
            log.warning("ignoring corrupt ipamconfig, using defaults: %s", exc)
            return Versioned(IPAMConfig(), raw[1])

    async def list_pools(self) -> list[Versioned[IPPool]]:
        return (await self.pools_at_revision())[0]

    async def pools_at_revision(self) -> tuple[list[Versioned[IPPool]], int]:
        """Every pool, and the revision the read was made at (for PoolsUnchangedSince)."""
        kvs, revision = await self.prefix_raw(self.keys.pools())
        return decode_each(kvs, self.decode_pool), revision

    async def get_pool(self, name: str) -> Versioned[IPPool] | None:
        key = self.keys.pool(name)
        return self._typed_value(key, await self.get_raw(key), self.decode_pool)

    async def list_nodes(self) -> list[Versioned[Node]]:
        return await self._typed_prefix(self.keys.nodes(), self.decode_node)

    async def get_node(self, name: str) -> Versioned[Node] | None:
        key = self.keys.node(name)
        return self._typed_value(key, await self.get_raw(key), self.decode_node)

    async def list_reservations(self) -> list[Versioned[IPReservation]]:
        return await self._typed_prefix(self.keys.reservations(), self.decode_reservation)

    async def get_block(self, cidr: IPNetwork) -> Versioned[Block] | None:
        key = self.keys.block(cidr)
        return self._typed_value(key, await self.get_raw(key), self.decode_block)

    async def block_containing(self, address: IPAddress) -> Versioned[Block] | None:
        """The block that holds ``address``, whatever its size, in one round trip."""
        low, high = BLOCK_SIZE_RANGE[address.version]
        cidrs = [ipaddress.ip_network(f"{address}/{length}", strict=False)
                 for length in range(low, high + 1)]
        response = await self._call("Txn", rpc.TxnRequest(success=[
            rpc.RequestOp(request_range=rpc.RangeRequest(key=self.keys.block(c))) for c in cidrs
        ]))
        for cidr, op in zip(cidrs, response.responses, strict=True):
            kvs = op.response_range.kvs
            if kvs:
                return Versioned(self.decode_block(self.keys.block(cidr), kvs[0].value),
                                 kvs[0].mod_revision)
        return None

    async def list_blocks(self, within: IPNetwork | None = None) -> list[Versioned[Block]]:
        if within is None:
            return await self._typed_prefix(self.keys.blocks(), self.decode_block)
        start, end = self.keys.blocks_in(within)
        kvs, _ = await self.range_raw(start, end)
        return decode_each(kvs, self.decode_block)

    async def block_cidrs(self, within: IPNetwork | int) -> set[IPNetwork]:
        """CIDRs of the blocks that exist inside ``within``, or of a whole IP family
        (keys only: cheap). Malformed keys are logged and skipped."""
        if isinstance(within, int):
            kvs, _ = await self.prefix_raw(self.keys.blocks(within), keys_only=True)
        else:
            kvs, _ = await self.range_raw(*self.keys.blocks_in(within), keys_only=True)
        return {v.value for v in decode_each(kvs, lambda key, _: self.keys.block_cidr(key))}

    async def survey_blocks(self, window: IPNetwork, groups: Sequence[IPNetwork]
                            ) -> tuple[set[IPNetwork], list[int]]:
        """In one round trip: the block CIDRs inside ``window`` (keys only) and the number
        of block keys inside each of ``groups`` (counts only): what a claim needs to
        find room without reading the pool."""
        ranges = [rpc.RequestOp(request_range=rpc.RangeRequest(
            key=start, range_end=end, keys_only=True))
            for start, end in [self.keys.blocks_in(window)]]
        ranges += [rpc.RequestOp(request_range=rpc.RangeRequest(
            key=start, range_end=end, count_only=True))
            for start, end in (self.keys.blocks_in(group) for group in groups)]
        response = await self._call("Txn", rpc.TxnRequest(success=ranges))
        first, *counts = response.responses
        existing = {v.value for v in decode_each(
            first.response_range.kvs, lambda key, _: self.keys.block_cidr(key))}
        return existing, [int(c.response_range.count) for c in counts]

    async def room_windows(self, within: IPNetwork, start: IPNetwork | None = None,
                           limit: int = 0) -> list[IPNetwork]:
        """Claim windows inside ``within`` whose room index entry says they may have an
        unclaimed block: from ``start`` on, at most ``limit`` (0: all)."""
        return await self._index_cidrs("room", self.keys.room_in(within),
                                       None if start is None else self.keys.room(start), limit)

    async def free_marked(self, cidrs: Sequence[IPNetwork]) -> set[IPNetwork]:
        """Which of ``cidrs`` have a free-block index entry, in one round trip per 120."""
        marked: set[IPNetwork] = set()
        for start in range(0, len(cidrs), 120):
            chunk = cidrs[start:start + 120]
            response = await self._call("Txn", rpc.TxnRequest(success=[
                rpc.RequestOp(request_range=rpc.RangeRequest(
                    key=self.keys.free_block(cidr), count_only=True)) for cidr in chunk]))
            marked.update(cidr for cidr, op in zip(chunk, response.responses, strict=True)
                          if op.response_range.count)
        return marked

    async def claim_reads(self, pool_cidr: IPNetwork, own: IPNetwork, limit: int
                          ) -> tuple[list[IPNetwork], set[IPNetwork] | None]:
        """In one round trip: up to ``limit`` room index entries of the pool from window
        ``own`` on, and the block CIDRs inside ``own`` (keys only) if the index lists
        ``own`` (None if not: a full window's 16 keys would be read for nothing)."""
        low, end = self.keys.room_in(pool_cidr)
        window_low, window_end = self.keys.blocks_in(own)
        rooms_read = rpc.RequestOp(request_range=rpc.RangeRequest(
            key=max(low, self.keys.room(own)), range_end=end, keys_only=True, limit=limit))
        response = await self._call("Txn", rpc.TxnRequest(
            compare=[rpc.Compare(key=self.keys.room(own), result=rpc.Compare.GREATER,
                                 target=rpc.Compare.CREATE, create_revision=0)],
            success=[rooms_read, rpc.RequestOp(request_range=rpc.RangeRequest(
                key=window_low, range_end=window_end, keys_only=True))],
            failure=[rooms_read]))
        rooms_op = response.responses[0]
        rooms = [v.value for v in decode_each(rooms_op.response_range.kvs, lambda key, _: (
            self.keys.block_cidr(key, "room")))]
        if not response.succeeded:
            return rooms, None
        blocks = {v.value for v in decode_each(
            response.responses[1].response_range.kvs, lambda key, _: self.keys.block_cidr(key))}
        return rooms, blocks

    async def room_windows_all(self) -> set[IPNetwork]:
        """Every claim window the room index lists (for audits and repairs)."""
        kvs, _ = await self.prefix_raw(self.keys.rooms(), keys_only=True)
        return {v.value for v in decode_each(kvs, lambda key, _: self.keys.block_cidr(
            key, "room"))}

    async def free_blocks(self, within: IPNetwork, start: IPNetwork | None = None,
                          limit: int = 0) -> list[tuple[IPNetwork, str | None]]:
        """Entries of the free-block index inside ``within``: (block, its affinity).

        From ``start`` on (default: the beginning), at most ``limit`` of them
        (0: all): a borrower reads a small window, not the whole pool.
        """
        low, end = self.keys.free_blocks_in(within)
        if start is not None:
            low = max(low, self.keys.free_block(start))
        kvs, _ = await self.range_raw(low, end, limit=limit)
        return [v.value for v in decode_each(kvs, lambda key, raw: (
            self.keys.block_cidr(key, "free"), decode(raw, "free-block entry").get("node")))]

    async def value_ranges(self, pool: str, value: str | None) -> list[Versioned[TopologyRange]]:
        """The topology ranges ``value`` of the label holds in ``pool``, in address order."""
        return await self._typed_prefix(self.keys.value_ranges(pool, value),
                                        lambda _, raw: TopologyRange.from_dict(
                                            decode(raw, "topology range")))

    async def range_holder(self, cidr: IPNetwork) -> Versioned[TopologyRange] | None:
        """Who holds topology range ``cidr`` (None: its pool's to give)."""
        key = self.keys.topology_range(cidr)
        return self._typed_value(key, await self.get_raw(key), lambda _, raw: (
            TopologyRange.from_dict(decode(raw, "topology range"))))

    async def range_holders(self, spans: tuple[IPNetwork, ...]
                            ) -> dict[IPNetwork, TopologyRange]:
        """Who holds each of ``spans`` (held ones only), in one round trip per 120."""
        held: dict[IPNetwork, TopologyRange] = {}
        for start in range(0, len(spans), 120):
            chunk = spans[start:start + 120]
            response = await self._call("Txn", rpc.TxnRequest(success=[
                rpc.RequestOp(request_range=rpc.RangeRequest(key=self.keys.topology_range(c)))
                for c in chunk]))
            for op in response.responses:
                for item in decode_each(op.response_range.kvs, lambda _, raw: (
                        TopologyRange.from_dict(decode(raw, "topology range")))):
                    held[item.value.cidr] = item.value
        return held

    async def held_ranges(self, within: IPNetwork, start: IPNetwork | None = None,
                          limit: int = 0) -> list[IPNetwork]:
        """Topology ranges inside ``within`` that some value holds, from ``start`` on (a
        claimer looking for a free range reads a few keys, not the pool)."""
        return await self._index_cidrs(
            "ranges", self.keys.topology_ranges_in(within),
            None if start is None else self.keys.topology_range(start), limit)

    async def _index_cidrs(self, kind: str, span: tuple[bytes, bytes], start: bytes | None,
                           limit: int) -> list[IPNetwork]:
        """The CIDRs an index (``kind``: room, ranges) names in key range ``span``, from
        key ``start`` on, at most ``limit`` (0: all): a keys-only read."""
        low, end = span
        kvs, _ = await self.range_raw(low if start is None else max(low, start), end,
                                      keys_only=True, limit=limit)
        return [v.value for v in decode_each(kvs, lambda key, _: self.keys.block_cidr(
            key, kind))]

    async def holders_from(self, within: IPNetwork, start: IPNetwork | None = None,
                           limit: int = 0) -> list[TopologyRange]:
        """The holders of the topology ranges inside ``within``, from ``start`` on, at
        most ``limit``: one read (a borrower looking for its value's full ranges)."""
        low, end = self.keys.topology_ranges_in(within)
        if start is not None:
            low = max(low, self.keys.topology_range(start))
        kvs, _ = await self.range_raw(low, end, limit=limit)
        return [v.value for v in decode_each(kvs, lambda _, raw: TopologyRange.from_dict(
            decode(raw, "topology range")))]

    async def list_ranges(self) -> list[Versioned[TopologyRange]]:
        """Every topology range (audits)."""
        return await self._typed_prefix(self.keys.topology_ranges(), lambda _, raw: (
            TopologyRange.from_dict(decode(raw, "topology range"))))

    async def list_affinities(self, node: str | None = None) -> list[tuple[str, IPNetwork]]:
        kvs, _ = await self.prefix_raw(self.keys.affinities(node), keys_only=True)
        return [v.value for v in decode_each(kvs, lambda key, _: self.keys.affinity_of(key))]

    async def get_handle(self, handle_id: str) -> Versioned[Handle] | None:
        key = self.keys.handle(handle_id)
        raw = await self.get_raw(key)
        return None if raw is None else Versioned(self.decode_handle(key, raw[0]), raw[1])

    async def list_handles(self, id_prefix: str = "") -> list[Versioned[Handle]]:
        return await self._typed_prefix(self.keys.handles() + id_prefix.encode(),
                                        self.decode_handle)

    async def get_identity(self, identity_id: str) -> Versioned[Identity] | None:
        key = self.keys.identity(identity_id)
        return self._typed_value(key, await self.get_raw(key), self.decode_identity)

    async def list_identities(self) -> list[Versioned[Identity]]:
        return await self._typed_prefix(self.keys.identities(), self.decode_identity)
