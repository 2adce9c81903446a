"""`topoipamctl`: the admin CLI. Talks to etcd directly, calicoctl-style.

Every change is one compare-and-swap etcd transaction built from the domain
writes of :mod:`topoipam.daemon.store`: the CLI reads, validates everything,
then commits with the read revisions as guards. A guard that fails means
someone else changed the same object in between; the CLI then re-reads and
re-validates (bounded), so it never overwrites a change it did not see and
never writes half of a manifest.

Expected failures print one ``error: ...`` line on stderr and exit 1; usage
errors exit 2 (argparse). Reports (``ipam check``, ``check ...``) print on
stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import yaml

from topoipam.client import manifests
from topoipam.client.manifests import Document, Resource, resource_id
from topoipam.daemon import allocator
from topoipam.daemon.errors import (
    AlreadyExists,
    Conflict,
    DatastoreUnavailable,
    InvalidInput,
    NoPoolForNode,
    NotFound,
    PoolInUse,
    TopoipamError,
)
from topoipam.daemon.ipam import Ipam
from topoipam.daemon.model import (
    ASSIGNMENT_MODES,
    DEFAULT_BLOCK_SIZE,
    Block,
    Handle,
    IPAddress,
    IPAMConfig,
    IPNetwork,
    IPPool,
    IPReservation,
    Node,
    check_pool_overlaps,
    parse_address,
    parse_gateway_spec,
    parse_network,
)
from topoipam.daemon.store import (
    DEFAULT_PREFIX,
    DeleteAffinity,
    DeleteBlock,
    DeleteHandle,
    DeleteObject,
    EtcdOptions,
    EtcdStore,
    PoolsUnchangedSince,
    PutBlock,
    PutHandle,
    PutObject,
    Versioned,
    Write,
)

DEFAULT_ENDPOINTS = "http://127.0.0.1:2379"
# Short: an operator at a terminal wants "etcd is down" in seconds, not a hang.
DEFAULT_TIMEOUT = 3.0
# Re-read-and-revalidate rounds when a guarded write loses a race.
WRITE_ATTEMPTS = 5
# etcd's default --max-txn-ops; a bigger manifest cannot be applied atomically.
MAX_TXN_OPS = 128
# Empty blocks of deleted pools are dropped in transactions of this many blocks
# (two ops each: block and affinity).
BLOCK_DROP_BATCH = 50
# `ipam release` frees addresses wherever they are: the node is only a label.
RELEASE_NODE = "<any>"
CONFIG_FLAGS = ("strict_affinity", "max_blocks_per_host", "auto_allocate_blocks",
                "ip_cooldown_seconds")

STORE_KIND = {"IPPool": "pool", "Node": "node", "IPReservation": "reservation"}
GET_KINDS = {
    "ippool": "IPPool", "ippools": "IPPool",
    "node": "Node", "nodes": "Node",
    "ipamconfig": "IPAMConfig", "ipamconfigs": "IPAMConfig",
    "ipreservation": "IPReservation", "ipreservations": "IPReservation",
    "allocation": "allocations", "allocations": "allocations",
}

Handler: TypeAlias = Callable[[EtcdStore, argparse.Namespace], Awaitable[int]]


# ---------------------------------------------------------------------------- output


def print_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    rows = [list(r) for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [list(headers), *rows]:
        print("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def print_document(data: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def show_labels(labels: dict[str, str] | Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "<none>"


def show(value: object) -> str:
    return "-" if value is None else str(value)


def family_name(family: int) -> str:
    return f"IPv{family}"


def address_order(address: IPAddress) -> tuple[int, int]:
    return address.version, int(address)


def network_order(cidr: IPNetwork) -> tuple[int, int, int]:
    return cidr.version, int(cidr.network_address), cidr.prefixlen


# ---------------------------------------------------------------------------- reads


def key_of(store: EtcdStore, kind: str, name: str) -> bytes:
    keys = store.keys
    if kind == "IPPool":
        return keys.pool(name)
    if kind == "Node":
        return keys.node(name)
    if kind == "IPReservation":
        return keys.reservation(name)
    return keys.config()


async def read_current(store: EtcdStore, kind: str, name: str) -> tuple[Resource | None, int]:
    """The stored object and its mod_revision; (None, 0) if absent, (None, rev) if corrupt.

    A corrupt stored value is reported as existing-but-unreadable so that
    `apply` can overwrite it and `create` refuses, instead of crashing.
    """
    key = key_of(store, kind, name)
    raw = await store.get_raw(key)
    if raw is None:
        return None, 0
    value, revision = raw
    try:
        decoded: Resource
        if kind == "IPPool":
            decoded = store.decode_pool(key, value)
        elif kind == "Node":
            decoded = store.decode_node(key, value)
        elif kind == "IPReservation":
            decoded = store.decode_reservation(key, value)
        else:
            decoded = store.decode_config(value)
    except InvalidInput as exc:
        warn(f"{kind.lower()} {name}: stored value is corrupt ({exc})")
        return None, revision
    return decoded, revision


async def allocated_in(store: EtcdStore, cidr: IPNetwork) -> int:
    return sum(b.value.in_use for b in await store.list_blocks(cidr))


def owning_pool(pools: Iterable[IPPool], cidr: IPNetwork) -> IPPool | None:
    """The pool a block belongs to: inside its CIDR and of its block size."""
    pool = allocator.pool_of_block(pools, cidr)
    return pool if pool is not None and pool.block_size == cidr.prefixlen else None


@dataclass(frozen=True)
class AllocationRow:
    """One allocated address: the block's view joined with its handle (None if missing)."""

    ip: IPAddress
    block: Block
    handle_id: str
    handle: Handle | None
    pool: IPPool | None

    @property
    def node(self) -> str | None:
        return self.handle.node if self.handle is not None else None

    def attribute(self, name: str) -> str | None:
        return self.handle.attributes.get(name) if self.handle is not None else None

    @property
    def pod(self) -> str:
        namespace, pod = self.attribute("namespace"), self.attribute("pod")
        if pod is None:
            return "-"
        return f"{namespace}/{pod}" if namespace else pod

    def to_json(self) -> dict[str, str | None]:
        return {
            "ip": str(self.ip),
            "node": self.node,
            "pool": self.pool.name if self.pool is not None else None,
            "block": str(self.block.cidr),
            "handle": self.handle_id,
            "namespace": self.attribute("namespace"),
            "pod": self.attribute("pod"),
            "container_id": self.attribute("container_id"),
            "ifname": self.attribute("ifname"),
        }


@dataclass
class Snapshot:
    """Everything the reports need, read at one etcd revision (so they agree with each other)."""

    revision: int
    pools: list[IPPool]
    nodes: dict[str, Node]
    reservations: list[IPReservation]
    blocks: dict[IPNetwork, Block]
    affinities: list[tuple[str, IPNetwork]]
    handles: dict[str, Handle]
    corrupt: list[str] = field(default_factory=list)

    def allocations(self) -> list[AllocationRow]:
        rows = []
        for block in self.blocks.values():
            pool = allocator.pool_of_block(self.pools, block.cidr)
            for ordinal, handle_id in block.allocations.items():
                rows.append(AllocationRow(block.address(ordinal), block, handle_id,
                                          self.handles.get(handle_id), pool))
        return sorted(rows, key=lambda r: address_order(r.ip))


async def load_snapshot(store: EtcdStore) -> Snapshot:
    keys = store.keys
    pool_kvs, revision = await store.prefix_raw(keys.pools())
    (node_kvs, _), (reservation_kvs, _), (block_kvs, _), (affinity_kvs, _), (handle_kvs, _) = (
        await asyncio.gather(
            store.prefix_raw(keys.nodes(), revision=revision),
            store.prefix_raw(keys.reservations(), revision=revision),
            store.prefix_raw(keys.blocks(), revision=revision),
            store.prefix_raw(keys.affinities(), keys_only=True, revision=revision),
            store.prefix_raw(keys.handles(), revision=revision),
        )
    )
    snap = Snapshot(revision, [], {}, [], {}, [], {})

    def decoded(kvs: Iterable[Any], decode: Callable[[bytes, bytes], Any]) -> Iterator[Any]:
        """The values that decode; the others are reported by ``ipam check``."""
        for kv in kvs:
            try:
                yield decode(kv.key, kv.value)
            except (InvalidInput, ValueError) as exc:
                snap.corrupt.append(f"corrupt value at {kv.key.decode(errors='replace')}: {exc}")

    snap.pools.extend(sorted(decoded(pool_kvs, store.decode_pool), key=lambda p: p.name))
    snap.nodes.update((n.name, n) for n in decoded(node_kvs, store.decode_node))
    snap.reservations.extend(decoded(reservation_kvs, store.decode_reservation))
    snap.blocks.update((b.cidr, b) for b in decoded(block_kvs, store.decode_block))
    snap.affinities.extend(decoded(affinity_kvs, lambda key, _: keys.affinity_of(key)))
    snap.handles.update((h.id, h) for h in decoded(handle_kvs, store.decode_handle))
    return snap


# ---------------------------------------------------------------------------- writes


@dataclass(frozen=True)
class Target:
    """What a write is about; ``obj`` is None when deleting by name."""

    kind: str
    name: str
    obj: Resource | None
    where: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind.lower()} {self.name}"

    @property
    def context(self) -> str:
        return f"{self.where}: " if self.where else ""

    @classmethod
    def of(cls, document: Document) -> Target:
        return cls(document.kind, document.name, document.obj, document.where)


@dataclass
class Plan:
    writes: list[Write] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    deletes_pool: bool = False


async def plan_writes(
    store: EtcdStore, targets: Sequence[Target], action: str, force: bool
) -> Plan:
    """Validate every target against etcd as it is now and plan one guarded transaction.

    Raises before anything is written: duplicates in the file, create of an
    existing object, delete of a missing one or of a pool in use, pool
    overlaps (with stored pools and within the file), changed CIDRs.
    """
    seen: dict[tuple[str, str], str] = {}
    for target in targets:
        first = seen.setdefault((target.kind, target.name), target.where)
        if first != target.where:
            raise InvalidInput(f"{target.context}{target.label} appears twice (also in {first})")
        if action == "delete" and target.kind not in ("IPPool", "IPReservation"):
            raise InvalidInput(
                f"{target.context}deleting {target.kind} objects is not supported "
                "(IPAMConfig: use `topoipamctl ipam configure`; Node: not yet)"
            )
    currents = await asyncio.gather(*(read_current(store, t.kind, t.name) for t in targets))
    stored, pools_revision = await store.pools_at_revision()
    stored_pools = [p.value for p in stored]
    file_pools = [t.obj for t in targets if isinstance(t.obj, IPPool)]
    block_cidrs: dict[int, list[IPNetwork]] = {}
    plan = Plan()
    for target, (current, revision) in zip(targets, currents, strict=True):
        if action == "delete":
            await plan_delete(store, target, current, revision, force, plan)
            continue
        assert target.obj is not None
        if action == "create" and revision != 0:
            raise AlreadyExists(f"{target.context}{target.label} already exists")
        if isinstance(target.obj, IPPool):
            pool = target.obj
            if isinstance(current, IPPool):
                check_immutable(target, current, pool)
            else:
                family = pool.family
                if family not in block_cidrs:
                    block_cidrs[family] = await existing_block_cidrs(store, family)
                check_leftover_blocks(target, pool, block_cidrs[family])
            # Against the stored pools this file does not replace, and against the
            # earlier pools of the file: an overlap is reported at the later document.
            others = [p for p in stored_pools if p.name not in {f.name for f in file_pools}]
            earlier = file_pools[:file_pools.index(pool)]
            try:
                check_pool_overlaps(pool, [*others, *earlier])
            except InvalidInput as exc:
                raise InvalidInput(f"{target.context}{exc}") from exc
        if current == target.obj:
            plan.lines.append(f"{resource_id(target.obj)} unchanged")
            continue
        plan.writes.append(PutObject(target.obj, revision))
        outcome = "configured" if revision else "created"
        plan.lines.append(f"{resource_id(target.obj)} {outcome}")
    if any(isinstance(w, PutObject) and isinstance(w.obj, IPPool) for w in plan.writes):
        # The overlap checks above hold only if no pool appears meanwhile.
        plan.writes.append(PoolsUnchangedSince(pools_revision))
    if len(plan.writes) > MAX_TXN_OPS:
        raise InvalidInput(
            f"{len(plan.writes)} changes do not fit in one etcd transaction (at most "
            f"{MAX_TXN_OPS}); split the manifest"
        )
    return plan


async def plan_delete(
    store: EtcdStore, target: Target, current: Resource | None, revision: int, force: bool,
    plan: Plan,
) -> None:
    if revision == 0:
        raise NotFound(f"{target.context}{target.label} does not exist")
    if isinstance(current, IPPool):
        in_use = await allocated_in(store, current.cidr)
        if in_use and not force:
            raise PoolInUse(target.name, in_use)
        if in_use:
            plan.warnings.append(
                f"ippool {target.name}: {in_use} allocated address(es) stay allocated in the "
                "pool's blocks until released (see `topoipamctl check placement`)"
            )
    plan.deletes_pool = plan.deletes_pool or target.kind == "IPPool"
    plan.writes.append(DeleteObject(STORE_KIND[target.kind], target.name, revision))
    plan.lines.append(f"{target.kind.lower()}/{target.name} deleted")


def check_immutable(target: Target, current: IPPool, pool: IPPool) -> None:
    # Existing blocks are cut at the old CIDR and block size; changing either would
    # orphan them or let two blocks overlap. Calico refuses this too.
    if (current.cidr, current.block_size) != (pool.cidr, pool.block_size):
        raise InvalidInput(
            f"{target.context}ippool {pool.name}: cidr and blockSize cannot change "
            f"({current.cidr} /{current.block_size} -> {pool.cidr} /{pool.block_size}); "
            "create a new pool instead"
        )


async def existing_block_cidrs(store: EtcdStore, family: int) -> list[IPNetwork]:
    kvs, _ = await store.prefix_raw(store.keys.blocks(family), keys_only=True)
    cidrs = []
    for kv in kvs:
        try:
            cidrs.append(store.keys.block_cidr(kv.key))
        except (InvalidInput, ValueError):
            continue  # reported by `ipam check`
    return cidrs


def check_leftover_blocks(target: Target, pool: IPPool, cidrs: Iterable[IPNetwork]) -> None:
    """Refuse a new pool over blocks of another size (left by a deleted pool).

    The allocator only recognises blocks of its pool's size; a differently cut
    block in the range would let the same address be handed out twice.
    Blocks of the right size are simply adopted by the new pool.
    """
    for cidr in cidrs:
        if not cidr.overlaps(pool.cidr):
            continue
        if owning_pool([pool], cidr) is pool:
            continue
        raise InvalidInput(
            f"{target.context}ippool {pool.name}: block {cidr} of a deleted pool overlaps "
            f"{pool.cidr} but is not a /{pool.block_size} block of it; release its "
            "addresses first (`topoipamctl ipam show --show-blocks`)"
        )


async def write_targets(
    store: EtcdStore, targets: Sequence[Target], action: str, force: bool = False
) -> Plan:
    """Validate and commit ``targets`` in one transaction, re-validating after lost races."""
    for _ in range(WRITE_ATTEMPTS):
        plan = await plan_writes(store, targets, action, force)
        if not plan.writes:
            return plan
        result = await store.commit(plan.writes)
        if result.succeeded:
            if plan.deletes_pool:
                dropped = await drop_stray_empty_blocks(store)
                if dropped:
                    plan.lines.append(f"dropped {dropped} empty block(s) of deleted pools")
            return plan
    raise Conflict(f"the objects changed concurrently {WRITE_ATTEMPTS} times; try again")


async def drop_stray_empty_blocks(store: EtcdStore) -> int:
    """Delete empty blocks (and their affinities) that no pool owns any more.

    Each delete is guarded by the block's revision, so a block that a daemon
    with a stale view allocates from in the meantime is kept. Blocks with
    allocations are never touched.
    """
    pools = [p.value for p in await store.list_pools()]
    stray = [
        b for b in await store.list_blocks()
        if b.value.is_empty() and owning_pool(pools, b.value.cidr) is None
    ]
    dropped = 0
    for start in range(0, len(stray), BLOCK_DROP_BATCH):
        batch = stray[start:start + BLOCK_DROP_BATCH]
        result = await store.commit([w for b in batch for w in block_drop_writes(b)])
        if result.succeeded:
            dropped += len(batch)
            continue
        for block in batch:  # one of them changed: keep that one, drop the others
            if (await store.commit(block_drop_writes(block))).succeeded:
                dropped += 1
    return dropped


def block_drop_writes(current: Versioned[Block]) -> list[Write]:
    block = current.value
    writes: list[Write] = [DeleteBlock(block.cidr, current.mod_revision)]
    if block.affinity is not None:
        writes.append(DeleteAffinity(block.affinity, block.cidr))
    return writes


def report(plan: Plan) -> int:
    for line in plan.lines:
        print(line)
    for message in plan.warnings:
        warn(message)
    return 0


# ---------------------------------------------------------------------------- verbs: manifests


def read_manifests(path: str) -> manifests.Manifests:
    source = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
    except OSError as exc:
        raise InvalidInput(f"cannot read {source}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{source} is not UTF-8 text ({exc.reason})") from exc
    parsed = manifests.load(text, source)
    for message in parsed.warnings:
        warn(message)
    return parsed


async def cmd_apply(store: EtcdStore, args: argparse.Namespace) -> int:
    parsed = read_manifests(args.filename)
    return report(await write_targets(store, [Target.of(d) for d in parsed.documents], "apply"))


async def cmd_create(store: EtcdStore, args: argparse.Namespace) -> int:
    if args.filename is not None:
        parsed = read_manifests(args.filename)
        targets = [Target.of(d) for d in parsed.documents]
    else:
        cidr = parse_network(args.cidr, f"pool {args.name}: --cidr")
        pool = IPPool(
            name=args.name,
            cidr=cidr,
            block_size=(args.block_size if args.block_size is not None
                        else DEFAULT_BLOCK_SIZE[cidr.version]),
            node_selector=args.node_selector,
            disabled=args.disabled,
            assignment_mode=args.assignment_mode,
            gateway_spec=parse_gateway_spec(f"pool {args.name}", args.gateway),
        )
        targets = [Target("IPPool", pool.name, pool)]
    return report(await write_targets(store, targets, "create"))


async def cmd_delete(store: EtcdStore, args: argparse.Namespace) -> int:
    if args.kind in ("node", "nodes"):
        return await delete_node(store, args.name, args.force)
    if args.filename is not None:
        parsed = read_manifests(args.filename)
        targets = [Target.of(d) for d in parsed.documents]
    else:
        kind = GET_KINDS[args.kind]
        targets = [Target(kind, args.name, None)]
    return report(await write_targets(store, targets, "delete", args.force))


async def delete_node(store: EtcdStore, name: str, force: bool) -> int:
    if await store.get_node(name) is None and not await store.list_affinities(name):
        raise NotFound(f"node {name} does not exist")
    released, deleted, kept = await Ipam(store, name).retire_node(force)
    print(f"node/{name} deleted ({released} attachment(s) released, {deleted} block(s) "
          f"deleted, {kept} block(s) with borrowed addresses kept without affinity)")
    return 0


# ---------------------------------------------------------------------------- verbs: get


async def list_objects(store: EtcdStore, kind: str) -> list[Resource]:
    objs: list[Resource]
    if kind == "IPPool":
        objs = [p.value for p in await store.list_pools()]
    elif kind == "Node":
        objs = [n.value for n in await store.list_nodes()]
    elif kind == "IPReservation":
        objs = [r.value for r in await store.list_reservations()]
    else:
        objs = [(await store.get_config()).value]
    return sorted(objs, key=manifests.name_of)


async def cmd_get(store: EtcdStore, args: argparse.Namespace) -> int:
    kind = GET_KINDS[args.kind]
    if kind == "allocations":
        return await get_allocations(store, args.node, args.output)
    objs = await list_objects(store, kind)
    if args.name is not None:
        objs = [o for o in objs if manifests.name_of(o) == args.name]
        if not objs:
            raise NotFound(f"{kind.lower()} {args.name} not found")
    if args.output in ("yaml", "json"):
        document = (manifests.to_manifest(objs[0]) if args.name is not None
                    else manifests.to_list_manifest(objs))
        print_document(document, args.output)
        return 0
    wide = args.output == "wide"
    if kind == "IPPool":
        await print_pools([o for o in objs if isinstance(o, IPPool)], store, wide)
    elif kind == "Node":
        await print_nodes([o for o in objs if isinstance(o, Node)], store, wide)
    elif kind == "IPReservation":
        print_table(["NAME", "CIDRS"], [
            [o.name, ",".join(str(c) for c in o.cidrs)]
            for o in objs if isinstance(o, IPReservation)
        ])
    else:
        print_table(["NAME", "STRICTAFFINITY", "MAXBLOCKSPERHOST", "AUTOALLOCATEBLOCKS",
                     "IPCOOLDOWNSECONDS"], [
            [manifests.CONFIG_NAME, str(o.strict_affinity).lower(), str(o.max_blocks_per_host),
             str(o.auto_allocate_blocks).lower(), str(o.ip_cooldown_seconds)]
            for o in objs if isinstance(o, IPAMConfig)
        ])
    return 0


async def print_pools(pools: list[IPPool], store: EtcdStore, wide: bool) -> None:
    if not wide:
        print_table(["NAME", "CIDR", "SELECTOR"],
                    [[p.name, str(p.cidr), p.node_selector] for p in pools])
        return
    in_use = await asyncio.gather(*(allocated_in(store, p.cidr) for p in pools))
    print_table(
        ["NAME", "CIDR", "BLOCKSIZE", "SELECTOR", "DISABLED", "ASSIGNMENTMODE", "GATEWAY",
         "IN-USE", "TOTAL"],
        [[p.name, str(p.cidr), str(p.block_size), p.node_selector, str(p.disabled).lower(),
          p.assignment_mode, show(p.gateway), str(used), str(p.capacity)]
         for p, used in zip(pools, in_use, strict=True)],
    )


async def print_nodes(nodes: list[Node], store: EtcdStore, wide: bool) -> None:
    if not wide:
        print_table(["NAME", "LABELS"], [[n.name, show_labels(n.labels)] for n in nodes])
        return
    pools = sorted((p.value for p in await store.list_pools()), key=lambda p: p.name)
    blocks = Counter(node for node, _ in await store.list_affinities())
    rows = []
    for node in nodes:
        selected = [p.name for p in pools if allocator.explain_pool(p, node.labels)[0]]
        rows.append([node.name, show_labels(node.labels), ",".join(selected) or "<none>",
                     str(blocks[node.name])])
    print_table(["NAME", "LABELS", "POOLS", "BLOCKS"], rows)


async def get_allocations(store: EtcdStore, node: str | None, output: str | None) -> int:
    rows = (await load_snapshot(store)).allocations()
    if node is not None:
        rows = [r for r in rows if r.node == node]
    if output == "json":
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return 0
    headers = ["IP", "NODE", "POOL", "POD"]
    if output == "wide":
        headers += ["BLOCK", "HANDLE", "CONTAINER-ID", "IFNAME"]
    table = []
    for row in rows:
        line = [str(row.ip), show(row.node), show(row.pool and row.pool.name), row.pod]
        if output == "wide":
            line += [str(row.block.cidr), row.handle_id, show(row.attribute("container_id")),
                     show(row.attribute("ifname"))]
        table.append(line)
    print_table(headers, table)
    return 0


# ---------------------------------------------------------------------------- verbs: label


def parse_label_changes(items: Sequence[str]) -> dict[str, str | None]:
    """``k=v`` sets, ``k-`` removes (kubectl syntax); None means remove."""
    changes: dict[str, str | None] = {}
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            change: str | None = value
        elif item.endswith("-") and len(item) > 1:
            key, change = item[:-1], None
        else:
            raise InvalidInput(f"invalid label change {item!r}: use KEY=VALUE or KEY-")
        if key in changes:
            raise InvalidInput(f"label {key} is given more than once")
        changes[key] = change
    return changes


async def cmd_label(store: EtcdStore, args: argparse.Namespace) -> int:
    changes = parse_label_changes(args.labels)
    for _ in range(WRITE_ATTEMPTS):
        current, revision = await read_current(store, "Node", args.name)
        labels = dict(current.labels) if isinstance(current, Node) else {}
        before = dict(labels)
        missing = []
        for key, value in changes.items():
            if value is None:
                if labels.pop(key, None) is None:
                    missing.append(key)
            elif key in labels and labels[key] != value and not args.overwrite:
                raise InvalidInput(
                    f"node {args.name} already has label {key}={labels[key]}; "
                    f"use --overwrite to change it to {value}"
                )
            else:
                labels[key] = value
        # A node that does not exist yet is created, unless nothing would be set.
        unchanged = labels == before
        if unchanged or (await store.commit([PutObject(Node(args.name, labels),
                                                       revision)])).succeeded:
            for key in missing:
                warn(f"node {args.name} has no label {key}")
            print(f"node/{args.name} {'not labeled' if unchanged else 'labeled'}")
            return 0
    raise Conflict(f"node {args.name} changed concurrently {WRITE_ATTEMPTS} times; try again")


# ---------------------------------------------------------------------------- verbs: ipam


async def cmd_ipam_show(store: EtcdStore, args: argparse.Namespace) -> int:
    snap = await load_snapshot(store)
    if args.ip is not None:
        print(describe_address(snap, parse_address(args.ip, "--ip")))
        return 0
    pool_of = {cidr: allocator.pool_of_block(snap.pools, cidr) for cidr in snap.blocks}
    used: Counter[str | None] = Counter()
    for cidr, block in snap.blocks.items():
        pool = pool_of[cidr]
        used[pool.name if pool else None] += block.in_use
    rows = [[p.name, str(p.cidr), str(used[p.name]), str(p.capacity),
             f"{100 * used[p.name] / p.capacity:.1f}%"] for p in snap.pools]
    if used[None]:
        rows.append(["(no pool)", "-", str(used[None]), "-", "-"])
    print_table(["POOL", "CIDR", "IN-USE", "CAPACITY", "USED"], rows)
    if args.show_blocks:
        reservations = allocator.Reservations(snap.reservations)
        block_rows = []
        for cidr in sorted(snap.blocks, key=network_order):
            block, pool = snap.blocks[cidr], pool_of[cidr]
            free = (allocator.free_count(block, allocator.AssignContext(pool, reservations))
                    if pool else len(block.unallocated))
            block_rows.append([str(cidr), pool.name if pool else "(no pool)",
                               show(block.affinity), str(block.in_use), str(free)])
        print()
        print_table(["BLOCK", "POOL", "AFFINITY", "IN-USE", "FREE"], block_rows)
    if args.show_borrowed:
        borrowed = [r for r in snap.allocations()
                    if r.handle is not None and r.node != r.block.affinity]
        print()
        print_table(["IP", "BLOCK", "AFFINITY", "NODE", "HANDLE", "POD"], [
            [str(r.ip), str(r.block.cidr), show(r.block.affinity), show(r.node), r.handle_id,
             r.pod] for r in borrowed
        ])
    return 0


def describe_address(snap: Snapshot, address: IPAddress) -> str:
    for block in snap.blocks.values():
        if address.version != block.family or address not in block.cidr:
            continue
        holder = block.allocations.get(block.ordinal(address))
        if holder is None:
            continue
        pool = allocator.pool_of_block(snap.pools, block.cidr)
        where = f"block {block.cidr} of {f'pool {pool.name}' if pool else 'no pool'}"
        handle = snap.handles.get(holder)
        if handle is None:
            return (f"{address} is allocated to handle {holder} in {where}, but that handle "
                    f"does not exist (leaked; free it with `topoipamctl ipam release --ip "
                    f"{address}`)")
        row = AllocationRow(address, block, holder, handle, pool)
        return (f"{address} is allocated to handle {holder} on node {handle.node} "
                f"(pod {row.pod}) in {where}")
    pool = allocator.pool_of(snap.pools, address)
    if pool is None:
        return f"{address} is not in any pool"
    if address == pool.gateway:
        return f"{address} is the gateway of pool {pool.name} (never handed out)"
    if not pool.usable(address):
        return f"{address} is the network or broadcast address of pool {pool.name} (never used)"
    reserved_by = [r.name for r in snap.reservations
                   if any(address.version == c.version and address in c for c in r.cidrs)]
    if reserved_by:
        return f"{address} is reserved by ipreservation {', '.join(reserved_by)} (pool {pool.name})"
    cidr = pool.block_of(address)
    claimed = snap.blocks.get(cidr)
    where = (f"block {cidr}, affinity {show(claimed.affinity)}" if claimed is not None
             else f"block {cidr} not claimed yet")
    return f"{address} is free (pool {pool.name}, {where})"


def find_inconsistencies(snap: Snapshot) -> list[str]:
    """Every disagreement between blocks, handles, affinities and pools, one line each."""
    return [
        *snap.corrupt,
        *handle_problems(snap),
        *block_problems(snap),
        *affinity_problems(snap),
        *pool_problems(snap),
        *double_allocations(snap),
        *gateway_problems(snap),
    ]


def gateway_problems(snap: Snapshot) -> Iterator[str]:
    """Allocations that hold their pool's gateway (made before pools had gateways)."""
    for row in snap.allocations():
        if row.pool is not None and row.ip == row.pool.gateway:
            yield (f"gateway allocated: {row.ip} is the gateway of pool {row.pool.name} but "
                   f"is held by handle {row.handle_id} (pod {row.pod}); recreate that pod, "
                   "or give the pool another gateway")


def handle_problems(snap: Snapshot) -> Iterator[str]:
    """Handles whose addresses their blocks do not give them (orphans and mismatches)."""
    for handle in sorted(snap.handles.values(), key=lambda h: h.id):
        who = f"handle {handle.id} (node {handle.node})"
        if not handle.addresses:
            yield f"orphaned handle: {who} holds no address"
        for entry in handle.addresses:
            block = snap.blocks.get(entry.block)
            if block is None:
                yield (f"orphaned handle: {who} lists {entry.ip} in block {entry.block}, "
                       "which does not exist")
            elif entry.ip.version != block.family or entry.ip not in block.cidr:
                yield (f"mismatch: {who} lists {entry.ip} in block {entry.block}, which does "
                       "not contain it")
            elif (holder := block.allocations.get(block.ordinal(entry.ip))) != handle.id:
                state = "has it free" if holder is None else f"gives it to handle {holder}"
                yield (f"mismatch: {who} lists {entry.ip}, but block {block.cidr} {state} "
                       f"(fix: topoipamctl ipam release --ip {entry.ip})")


def block_problems(snap: Snapshot) -> Iterator[str]:
    """Allocated addresses whose handle is gone or does not list them (leaks)."""
    for cidr in sorted(snap.blocks, key=network_order):
        block = snap.blocks[cidr]
        for ordinal, holder in sorted(block.allocations.items()):
            address = block.address(ordinal)
            handle = snap.handles.get(holder)
            if handle is None:
                reason = f"handle {holder} does not exist"
            elif not any(a.ip == address and a.block == cidr for a in handle.addresses):
                reason = f"handle {holder} (node {handle.node}) does not list it"
            else:
                continue
            yield (f"leaked address: {address} in block {cidr}: {reason} "
                   f"(free it: topoipamctl ipam release --ip {address})")


def affinity_problems(snap: Snapshot) -> Iterator[str]:
    """Affinity keys and block owners that do not point at each other."""
    affinity_keys = set(snap.affinities)
    for node, cidr in sorted(snap.affinities, key=lambda a: (a[0], network_order(a[1]))):
        block = snap.blocks.get(cidr)
        if block is None:
            yield (f"affinity mismatch: node {node} has an affinity for block {cidr}, which "
                   "does not exist")
        elif block.affinity != node:
            yield (f"affinity mismatch: node {node} has an affinity for block {cidr}, but the "
                   f"block belongs to {show(block.affinity)}")
    for cidr in sorted(snap.blocks, key=network_order):
        owner = snap.blocks[cidr].affinity
        if owner is not None and (owner, cidr) not in affinity_keys:
            yield (f"affinity mismatch: block {cidr} belongs to node {owner}, which has no "
                   "affinity for it")


def pool_problems(snap: Snapshot) -> Iterator[str]:
    """Blocks outside every pool (a warning: the pool was deleted) or cut to another size."""
    for cidr in sorted(snap.blocks, key=network_order):
        pool = allocator.pool_of_block(snap.pools, cidr)
        if pool is None:
            yield (f"warning: block {cidr} is not inside any pool (block of a deleted pool; "
                   f"{snap.blocks[cidr].in_use} address(es) in use)")
        elif pool.block_size != cidr.prefixlen:
            yield (f"block size mismatch: block {cidr} lies in pool {pool.name}, whose blocks "
                   f"are /{pool.block_size}")


def double_allocations(snap: Snapshot) -> Iterator[str]:
    """Addresses allocated in two (overlapping) blocks, or listed by two handles."""
    in_blocks: dict[IPAddress, list[str]] = {}
    for cidr in sorted(snap.blocks, key=network_order):
        for ordinal, holder in sorted(snap.blocks[cidr].allocations.items()):
            in_blocks.setdefault(snap.blocks[cidr].address(ordinal), []).append(
                f"block {cidr} (handle {holder})")
    in_handles: dict[IPAddress, list[str]] = {}
    for handle in snap.handles.values():
        for entry in handle.addresses:
            in_handles.setdefault(entry.ip, []).append(handle.id)
    for address in sorted(in_blocks, key=address_order):
        if len(in_blocks[address]) > 1:
            yield (f"double allocation: {address} is allocated in "
                   f"{' and '.join(in_blocks[address])}")
    for address in sorted(in_handles, key=address_order):
        if len(in_handles[address]) > 1:
            yield (f"double allocation: {address} is listed by handles "
                   f"{', '.join(sorted(in_handles[address]))}")


async def cmd_ipam_check(store: EtcdStore, args: argparse.Namespace) -> int:
    snap = await load_snapshot(store)
    problems = find_inconsistencies(snap)
    counts = (f"{len(snap.blocks)} blocks, {len(snap.handles)} handles, "
              f"{sum(b.in_use for b in snap.blocks.values())} addresses")
    for line in problems:
        print(line)
    if problems:
        print(f"ipam check: {len(problems)} problem(s) found ({counts})")
        return 1
    print(f"ipam check: OK ({counts})")
    return 0


async def cmd_ipam_release(store: EtcdStore, args: argparse.Namespace) -> int:
    addresses = [parse_address(text, "--ip") for text in args.ip]
    ipam = Ipam(store, node=RELEASE_NODE)
    failed = 0
    for address in addresses:
        holder = await ipam.release_address(address)
        if holder is not None:
            print(f"released {address} (handle {holder})")
        unlisted = await unlist_address(store, address)
        for handle_id in unlisted:
            print(f"removed {address} from handle {handle_id}, which listed it without "
                  "holding it")
        if holder is None and not unlisted:
            print(f"error: {address} is not allocated", file=sys.stderr)
            failed += 1
    await drop_stray_empty_blocks(store)
    return 1 if failed else 0


async def unlist_address(store: EtcdStore, address: IPAddress) -> list[str]:
    """Remove ``address`` from handles that list it although its block does not give it to them.

    Such a handle (an orphan, reported by `ipam check`) would otherwise keep
    the address in `get allocations` of its pod forever. The block is written
    back unchanged in the same transaction so that the fix is guarded by its
    revision too: if it was handed to the handle meanwhile, nothing changes.
    """
    fixed = []
    for _ in range(WRITE_ATTEMPTS):
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
        if not pending:
            return fixed
    raise Conflict(f"handles of {address} changed concurrently {WRITE_ATTEMPTS} times; "
                   "try again")


async def cmd_ipam_configure(store: EtcdStore, args: argparse.Namespace) -> int:
    changes = {name: getattr(args, name) for name in CONFIG_FLAGS
               if getattr(args, name) is not None}
    for _ in range(WRITE_ATTEMPTS):
        current = await store.get_config()
        config = dataclasses.replace(current.value, **changes)
        if config == current.value and current.mod_revision:
            print("ipamconfig/default unchanged")
            return 0
        if (await store.commit([PutObject(config, current.mod_revision)])).succeeded:
            print("ipamconfig/default configured")
            return 0
    raise Conflict(f"ipamconfig changed concurrently {WRITE_ATTEMPTS} times; try again")


# ---------------------------------------------------------------------------- verbs: explain, check


async def cmd_explain(store: EtcdStore, args: argparse.Namespace) -> int:
    current, _ = await read_current(store, "Node", args.name)
    pools = sorted((p.value for p in await store.list_pools()), key=lambda p: p.name)
    if isinstance(current, Node):
        labels = dict(current.labels)
    else:
        labels = {}
        warn(f"node {args.name} is not registered; explaining for a node without labels")
    print(f"node: {args.name}")
    print(f"labels: {show_labels(labels)}")
    print()
    rows = []
    for pool in pools:
        match, reason = allocator.explain_pool(pool, labels)
        rows.append([pool.name, str(pool.cidr), family_name(pool.family),
                     "disabled" if pool.disabled else "enabled", pool.assignment_mode,
                     pool.node_selector, "yes" if match else "no", reason])
    print_table(["POOL", "CIDR", "FAMILY", "STATE", "MODE", "SELECTOR", "MATCH", "REASON"], rows)
    print()
    for family in sorted({p.family for p in pools} or {4}):
        try:
            order = allocator.pools_for_node(pools, args.name, labels, family)
            text = ", ".join(p.name for p in order)
        except NoPoolForNode as exc:
            text = f"none: {exc}"
        print(f"{family_name(family)} allocation order: {text}")
    return 0


async def cmd_check_coverage(store: EtcdStore, args: argparse.Namespace) -> int:
    pools = [p.value for p in await store.list_pools()]
    nodes = sorted((n.value for n in await store.list_nodes()), key=lambda n: n.name)
    # With no pool at all nobody gets an address: report that for IPv4.
    families = sorted({p.family for p in pools} or {4})
    uncovered = set()
    for node in nodes:
        for family in families:
            try:
                allocator.pools_for_node(pools, node.name, node.labels, family)
            except NoPoolForNode as exc:
                print(f"warning: {exc}")
                uncovered.add(node.name)
    if uncovered:
        print(f"check coverage: {len(uncovered)} of {len(nodes)} node(s) not selected by any "
              "enabled Automatic pool")
        return 1
    print(f"check coverage: OK ({len(nodes)} nodes, {len(pools)} pools)")
    return 0


def placement_problem(row: AllocationRow, snap: Snapshot) -> str | None:
    """Why ``row`` would not be allocated where it is today, or None if it would."""
    pool = row.pool
    if pool is None:
        return "its pool was deleted"
    if pool.disabled:
        return f"pool {pool.name} is disabled"
    if not pool.automatic:
        return None  # Manual pools are used when named, whatever the node's labels
    node = snap.nodes.get(row.node or "")
    labels = node.labels if node is not None else {}
    if pool.selects(labels):
        return None
    _, reason = allocator.explain_pool(pool, labels)
    return reason if node is not None else f"node is not registered; {reason}"


async def cmd_check_placement(store: EtcdStore, args: argparse.Namespace) -> int:
    snap = await load_snapshot(store)
    # Addresses without a handle have no holder to judge; `ipam check` reports them.
    rows = [r for r in snap.allocations() if r.handle is not None]
    found = [(r, reason) for r in rows if (reason := placement_problem(r, snap)) is not None]
    if found:
        print_table(["IP", "NODE", "POOL", "HANDLE", "POD", "REASON"], [
            [str(r.ip), show(r.node), r.pool.name if r.pool else "-", r.handle_id, r.pod,
             reason] for r, reason in found
        ])
        print(f"check placement: {len(found)} of {len(rows)} allocation(s) outside their "
              "node's pools")
        return 1 if args.fail_on_found else 0
    print(f"check placement: OK ({len(rows)} allocations)")
    return 0


# ---------------------------------------------------------------------------- arguments


def bool_flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def add_global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """The connection options, accepted before and after the verb.

    On sub-commands the defaults are SUPPRESS so that an option given before
    the verb is not reset by the sub-parser.
    """
    def default(env: str, fallback: str | None = None) -> str | None:
        return os.environ.get(env, fallback) if top else argparse.SUPPRESS

    group = parser.add_argument_group("etcd connection")
    group.add_argument("--etcd-endpoints", metavar="URLS",
                       default=default("TOPOIPAM_ETCD_ENDPOINTS", DEFAULT_ENDPOINTS),
                       help="comma-separated etcd endpoints (env TOPOIPAM_ETCD_ENDPOINTS)")
    group.add_argument("--prefix", default=default("TOPOIPAM_PREFIX", DEFAULT_PREFIX),
                       help="etcd key prefix (env TOPOIPAM_PREFIX)")
    group.add_argument("--etcd-ca", metavar="FILE", default=default("TOPOIPAM_ETCD_CA"))
    group.add_argument("--etcd-cert", metavar="FILE", default=default("TOPOIPAM_ETCD_CERT"))
    group.add_argument("--etcd-key", metavar="FILE", default=default("TOPOIPAM_ETCD_KEY"))
    group.add_argument("--etcd-user", default=default("TOPOIPAM_ETCD_USER"))
    group.add_argument("--etcd-password-file", metavar="FILE",
                       default=default("TOPOIPAM_ETCD_PASSWORD_FILE"))
    group.add_argument("--etcd-timeout", metavar="SECONDS", type=float,
                       default=default("TOPOIPAM_ETCD_TIMEOUT", str(DEFAULT_TIMEOUT)),
                       help=f"per-request etcd timeout (default {DEFAULT_TIMEOUT})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topoipamctl", description="Administer topoipam pools, nodes and allocations.")
    add_global_options(parser, top=True)
    connection = argparse.ArgumentParser(add_help=False)
    add_global_options(connection, top=False)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(parent: Any, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help, parents=[connection])
        sub.set_defaults(handler=handler, usage_parser=sub)
        return sub

    apply = verb(verbs, "apply", cmd_apply, "create or update resources from a manifest")
    apply.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")

    create = verb(verbs, "create", cmd_create, "create resources (fails if they exist)")
    create.add_argument("kind", nargs="?", choices=["ippool"])
    create.add_argument("name", nargs="?")
    create.add_argument("-f", "--filename", help="manifest file, or - for stdin")
    create.add_argument("--cidr")
    create.add_argument("--block-size", type=int)
    create.add_argument("--node-selector", default="all()")
    create.add_argument("--disabled", action="store_true")
    create.add_argument("--assignment-mode", choices=ASSIGNMENT_MODES, default="Automatic")
    create.add_argument("--gateway", help="the pool's gateway address, never handed out "
                        "(default: its first usable address; 'none' for a routed pool)")

    delete = verb(verbs, "delete", cmd_delete, "delete resources")
    delete.add_argument("kind", nargs="?",
                        choices=["ippool", "ippools", "ipreservation", "ipreservations", "node",
                                 "nodes"])
    delete.add_argument("name", nargs="?")
    delete.add_argument("-f", "--filename", help="manifest file, or - for stdin")
    delete.add_argument("--force", action="store_true",
                        help="delete pools even while addresses in them are allocated; "
                             "delete a node and release the addresses it holds")

    get = verb(verbs, "get", cmd_get, "list resources or allocations")
    get.add_argument("kind", choices=sorted(GET_KINDS))
    get.add_argument("name", nargs="?")
    get.add_argument("-o", "--output", choices=["wide", "yaml", "json"])
    get.add_argument("--node", help="only allocations held by this node")

    label = verb(verbs, "label", cmd_label, "set (k=v) or remove (k-) node labels")
    label.add_argument("resource", choices=["nodes", "node"])
    label.add_argument("name")
    label.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-")
    label.add_argument("--overwrite", action="store_true",
                       help="allow changing the value of an existing label")

    ipam = verbs.add_parser("ipam", help="inspect and repair address allocations")
    ipam_verbs = ipam.add_subparsers(dest="ipam_verb", required=True, metavar="ACTION")
    ipam_show = verb(ipam_verbs, "show", cmd_ipam_show, "utilisation per pool")
    ipam_show.add_argument("--show-blocks", action="store_true")
    ipam_show.add_argument("--show-borrowed", action="store_true")
    ipam_show.add_argument("--ip", help="who holds this address")
    verb(ipam_verbs, "check", cmd_ipam_check, "find leaks, orphans and mismatches")
    ipam_release = verb(ipam_verbs, "release", cmd_ipam_release, "free addresses")
    ipam_release.add_argument("--ip", action="append", required=True)
    ipam_configure = verb(ipam_verbs, "configure", cmd_ipam_configure, "change IPAMConfig")
    ipam_configure.add_argument("--strictaffinity", dest="strict_affinity", type=bool_flag,
                                metavar="true|false")
    ipam_configure.add_argument("--max-blocks-per-host", type=whole_number, metavar="N")
    ipam_configure.add_argument("--auto-allocate-blocks", type=bool_flag, metavar="true|false")
    ipam_configure.add_argument("--ip-cooldown-seconds", type=whole_number, metavar="N")

    explain = verb(verbs, "explain", cmd_explain, "which pools select a node, and why")
    explain.add_argument("resource", choices=["node", "nodes"])
    explain.add_argument("name")

    check = verbs.add_parser("check", help="cluster-wide reports")
    check_verbs = check.add_subparsers(dest="check_verb", required=True, metavar="REPORT")
    verb(check_verbs, "coverage", cmd_check_coverage, "nodes that no enabled pool selects")
    placement = verb(check_verbs, "placement", cmd_check_placement,
                     "allocations outside their node's pools")
    placement.add_argument("--fail-on-found", action="store_true")
    return parser


def usage_problem(args: argparse.Namespace) -> str | None:
    """Flag combinations argparse cannot express; checked before etcd is contacted."""
    verb = args.verb
    if verb == "create" and args.filename is not None and (args.kind or args.name or args.cidr):
        return "create takes either -f FILE or `ippool NAME --cidr CIDR`, not both"
    if verb == "create" and args.filename is None and not (args.kind and args.name and args.cidr):
        return "create needs -f FILE, or `ippool NAME --cidr CIDR`"
    if verb == "delete" and args.filename is not None and (args.kind or args.name):
        return "delete takes either -f FILE or KIND NAME, not both"
    if verb == "delete" and args.filename is None and not (args.kind and args.name):
        return "delete needs -f FILE, or KIND NAME (e.g. `delete ippool rack-0`)"
    if verb == "get" and GET_KINDS[args.kind] == "allocations" and (
        args.name is not None or args.output == "yaml"
    ):
        return "get allocations takes no NAME, and -o wide or -o json"
    if verb == "get" and GET_KINDS[args.kind] != "allocations" and args.node is not None:
        return "--node only applies to `get allocations`"
    if verb == "ipam" and args.ipam_verb == "configure" and all(
        getattr(args, name) is None for name in CONFIG_FLAGS
    ):
        return "ipam configure needs at least one setting, e.g. --strictaffinity true"
    return None


def etcd_options(args: argparse.Namespace) -> EtcdOptions:
    password = None
    if args.etcd_password_file:
        try:
            with open(args.etcd_password_file, encoding="utf-8") as handle:
                password = handle.read().rstrip("\r\n")
        except OSError as exc:
            raise InvalidInput(
                f"cannot read etcd password file {args.etcd_password_file}: {exc.strerror}"
            ) from exc
    if args.etcd_timeout <= 0:
        raise InvalidInput("--etcd-timeout must be positive")
    return EtcdOptions(
        endpoints=tuple(e.strip() for e in args.etcd_endpoints.split(",") if e.strip()),
        ca_file=args.etcd_ca or None,
        cert_file=args.etcd_cert or None,
        key_file=args.etcd_key or None,
        user=args.etcd_user or None,
        password=password,
        timeout=args.etcd_timeout,
    )


def fail(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 1


async def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; the in-process entry point (tests call this).

    Returns the exit code; usage errors raise SystemExit(2) like argparse.
    """
    args = build_parser().parse_args(argv)
    problem = usage_problem(args)
    if problem is not None:
        args.usage_parser.error(problem)
    try:
        options = etcd_options(args)
        async with EtcdStore(options, args.prefix) as store:
            # Fail within the short timeout when etcd does not answer: some reads
            # below use the store's long timeout for big ranges.
            await store.ping()
            return int(await args.handler(store, args))
    except DatastoreUnavailable as exc:
        return fail(f"{exc} (etcd endpoints: {args.etcd_endpoints})")
    except TopoipamError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(str(exc))


def main(argv: list[str] | None = None) -> int:
    # The store logs values it skips (corrupt, unknown); say so the way other warnings read.
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        return asyncio.run(run(argv))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
