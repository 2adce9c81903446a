"""`topoipamctl`: the admin CLI. Talks to etcd directly, calicoctl-style.

Every change is one compare-and-swap etcd transaction built from the domain
writes of :mod:`topoipam.daemon.store`: the CLI reads, validates everything,
then commits with the read revisions as guards. A guard that fails means
someone else changed the same object in between; the CLI then re-reads and
re-validates (bounded), so it never overwrites a change it did not see and
never writes half of a manifest.

Exit status: 0 success; 1 an expected failure (one ``error: ...`` line on
stderr) or, for the ``check`` reports, problems found; 2 usage errors
(argparse); 141 (128 + SIGPIPE, what a shell shows for ``| head``) when
stdout is closed early, quietly. Reports (``ipam check``, ``check ...``)
print on stdout: problem lines, then ``warning: ...`` lines, then a summary;
warnings alone exit 0 unless ``--fail-on-warnings``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import netaddr
import yaml

from topoipam.client import cni_bundle, manifests
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
    check_kubernetes_label,
    check_pool_name,
    check_pool_overlaps,
    parse_address,
    parse_gateway_spec,
    parse_network,
    reserved_range_problem,
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
CONFIG_FLAGS = ("strict_affinity", "max_blocks_per_host", "auto_allocate_blocks",
                "ip_cooldown_seconds")

STORE_KIND = {"IPPool": "pool", "Node": "node", "IPReservation": "reservation"}
# Resource names as calicoctl and kubectl spell them, with their short forms.
POOL_NAMES = ("ippool", "ippools", "ipp", "ipps", "pool", "pools")
NODE_NAMES = ("node", "nodes", "no")
RESERVATION_NAMES = ("ipreservation", "ipreservations", "ipr")
GET_KINDS = {
    **dict.fromkeys(POOL_NAMES, "IPPool"),
    **dict.fromkeys(NODE_NAMES, "Node"),
    "ipamconfig": "IPAMConfig", "ipamconfigs": "IPAMConfig",
    **dict.fromkeys(RESERVATION_NAMES, "IPReservation"),
    "allocation": "allocations", "allocations": "allocations",
}
# 128 + SIGPIPE: the status a shell shows for a writer whose reader went away.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

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
    snapshot: Snapshot | None = None
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
            problem = reserved_range_problem(pool.cidr)
            if problem is not None:
                raise InvalidInput(f"{target.context}ippool {pool.name}: {problem}")
            if revision == 0:
                try:
                    check_pool_name(pool.name)
                except InvalidInput as exc:
                    raise InvalidInput(f"{target.context}{exc}") from exc
            # Against the stored pools this file does not replace, and against the
            # earlier pools of the file: an overlap is reported at the later document.
            # Checked before the leftover blocks, so that the blocks of a live pool
            # are blamed on that pool, not on "a deleted pool".
            others = [p for p in stored_pools if p.name not in {f.name for f in file_pools}]
            earlier = file_pools[:file_pools.index(pool)]
            try:
                check_pool_overlaps(pool, [*others, *earlier])
            except InvalidInput as exc:
                raise InvalidInput(f"{target.context}{exc}") from exc
            if isinstance(current, IPPool):
                check_immutable(target, current, pool)
            else:
                family = pool.family
                if family not in block_cidrs:
                    block_cidrs[family] = await existing_block_cidrs(store, family)
                check_leftover_blocks(target, pool, block_cidrs[family])
        if isinstance(target.obj, IPReservation) and current != target.obj:
            if snapshot is None:
                snapshot = await load_snapshot(store)
            pools_after = [*(p for p in stored_pools if p.name not in {f.name for f in file_pools}),
                           *file_pools]
            plan.warnings.extend(reservation_warnings(target.obj, snapshot, pools_after))
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


def reservation_warnings(
    reservation: IPReservation, snap: Snapshot, pools: Sequence[IPPool]
) -> list[str]:
    """What an operator must know when writing ``reservation``: allocations it cannot take
    back, and CIDRs that reserve nothing because no pool contains them."""
    what = f"ipreservation {reservation.name}"
    lines = [
        f"{what}: {row.ip} is allocated to {row.pod if row.handle else 'a leaked handle'} "
        f"(handle {row.handle_id}, node {show(row.node)}); the reservation keeps it only once "
        "it is released"
        for row in snap.allocations() if reserves(reservation, row.ip)
    ]
    lines += [f"{what}: {cidr} is outside every pool (it reserves nothing)"
              for cidr in outside_pools(reservation, pools)]
    return lines


def reserves(reservation: IPReservation, address: IPAddress) -> bool:
    return any(address.version == c.version and address in c for c in reservation.cidrs)


def outside_pools(reservation: IPReservation, pools: Iterable[IPPool]) -> list[IPNetwork]:
    pools = list(pools)
    return [c for c in reservation.cidrs
            if not any(p.family == c.version and p.cidr.overlaps(c)
                       for p in pools)]


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
    daemon = await store.get_daemon(name)
    if daemon is not None:
        where = (f" (host {daemon.get('host')}, pid {daemon.get('pid')})"
                 if "host" in daemon else "")
        if not force:
            raise InvalidInput(
                f"node {name} is served by a running topoipamd{where}: deleting it would leave "
                "that daemon serving with no labels; stop the daemon first, or use --force"
            )
        warn(f"node {name} is served by a running topoipamd{where}: it keeps serving with no "
             "labels, and its node record comes back only when it restarts")
    released, deleted, kept = await Ipam(store, name).retire_node(force)
    print(f"node/{name} deleted ({released} attachment(s) released, {deleted} block(s) "
          f"deleted, {kept} block(s) with borrowed addresses kept without affinity)")
    return 0


# ---------------------------------------------------------------------------- verbs: patch


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


async def cmd_patch(store: EtcdStore, args: argparse.Namespace) -> int:
    """Read the pool, patch its manifest, validate and write it guarded by the read revision.

    Like `apply` of the patched manifest: the same checks, one transaction,
    re-read and re-patched if the pool changed in between.
    """
    if args.patch is not None:
        try:
            patch = json.loads(args.patch)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"-p is not valid JSON: {exc.msg} at column {exc.colno}") from exc
        if not isinstance(patch, dict):
            raise InvalidInput("-p must be a JSON object, e.g. '{\"spec\": {\"disabled\": true}}'")
    else:
        patch = {"spec": {"disabled": args.disabled}}
    for _ in range(WRITE_ATTEMPTS):
        current, revision = await read_current(store, "IPPool", args.name)
        if revision == 0:
            raise NotFound(f"ippool {args.name} does not exist")
        if not isinstance(current, IPPool):
            raise InvalidInput(f"ippool {args.name}: stored value is corrupt; use apply -f")
        patched = merge_patch(manifests.to_manifest(current), patch)
        metadata = patched.get("metadata") if isinstance(patched, dict) else None
        if not isinstance(metadata, dict) or metadata.get("name") != args.name:
            raise InvalidInput(f"ippool {args.name}: metadata.name cannot change")
        parsed = manifests.load(json.dumps(patched), "patch")
        [document] = parsed.documents
        target = Target(document.kind, args.name, document.obj)
        plan = await plan_writes(store, [target], "apply", force=False)
        if not plan.writes or (await store.commit(
                [dataclasses.replace(w, expect_revision=revision) if isinstance(w, PutObject)
                 else w for w in plan.writes])).succeeded:
            return report(plan)
    raise Conflict(f"ippool {args.name} changed concurrently {WRITE_ATTEMPTS} times; try again")


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
    reservations = allocator.Reservations(r.value for r in await store.list_reservations())
    print_table(
        ["NAME", "CIDR", "BLOCKSIZE", "SELECTOR", "DISABLED", "ASSIGNMENTMODE", "GATEWAY",
         "IN-USE", "TOTAL"],
        [[p.name, str(p.cidr), str(p.block_size), p.node_selector, str(p.disabled).lower(),
          p.assignment_mode, show(p.gateway), str(used), str(usable_capacity(p, reservations))]
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
    if output in ("json", "yaml"):
        print_document([r.to_json() for r in rows], output)
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
    for key, value in changes.items():
        check_kubernetes_label(key, "" if value is None else value, f"node {args.name}")
    for _ in range(WRITE_ATTEMPTS):
        current, revision = await read_current(store, "Node", args.name)
        if revision == 0 and not args.create:
            # A typo would otherwise create a node no daemon serves. Daemons
            # register their own node when they start.
            raise NotFound(f"node {args.name} does not exist; use --create to create it")
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
        # With --create a node that does not exist yet is created, unless nothing is set.
        unchanged = labels == before
        if unchanged or (await store.commit([PutObject(Node(args.name, labels),
                                                       revision)])).succeeded:
            for key in missing:
                warn(f"node {args.name} has no label {key}")
            print(f"node/{args.name} {'not labeled' if unchanged else 'labeled'}")
            return 0
    raise Conflict(f"node {args.name} changed concurrently {WRITE_ATTEMPTS} times; try again")


# ---------------------------------------------------------------------------- verbs: ipam


def usable_capacity(pool: IPPool, reservations: allocator.Reservations) -> int:
    """How many addresses of ``pool`` can ever be allocated: all of them, less the
    unusable ones and those IPReservations keep (each counted once)."""
    excluded = netaddr.IPSet(str(a) for a in pool.unusable())
    if reservations:
        excluded |= reservations.ip_set & netaddr.IPSet([str(pool.cidr)])
    return pool.cidr.num_addresses - int(excluded.size)


async def cmd_ipam_show(store: EtcdStore, args: argparse.Namespace) -> int:
    snap = await load_snapshot(store)
    if args.ip is not None:
        print(describe_address(snap, parse_address(args.ip, "--ip")))
        return 0
    pool_of = {cidr: allocator.pool_of_block(snap.pools, cidr) for cidr in snap.blocks}
    reservations = allocator.Reservations(snap.reservations)
    used: Counter[str | None] = Counter()
    for cidr, block in snap.blocks.items():
        pool = pool_of[cidr]
        used[pool.name if pool else None] += block.in_use
    rows = []
    for p in snap.pools:
        capacity = usable_capacity(p, reservations)
        share = f"{100 * used[p.name] / capacity:.1f}%" if capacity else "-"
        rows.append([p.name, str(p.cidr), str(used[p.name]), str(capacity), share])
    if used[None]:
        rows.append(["(no pool)", "-", str(used[None]), "-", "-"])
    print_table(["POOL", "CIDR", "IN-USE", "CAPACITY", "USED"], rows)
    if args.show_blocks:
        block_rows = []
        for cidr in sorted(snap.blocks, key=network_order):
            block, pool = snap.blocks[cidr], pool_of[cidr]
            # A block no pool owns hands nothing out: its addresses are not free.
            free = (allocator.free_count(block, allocator.AssignContext(pool, reservations))
                    if pool else 0)
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
        reserved = reserved_by(snap, address)
        also = (f"; it is also reserved by ipreservation {', '.join(reserved)}"
                if reserved else "")
        return (f"{address} is allocated to handle {holder} on node {handle.node} "
                f"(pod {row.pod}) in {where}{also}")
    pool = allocator.pool_of(snap.pools, address)
    if pool is None:
        return f"{address} is not in any pool"
    if address == pool.gateway:
        return f"{address} is the gateway of pool {pool.name} (never handed out)"
    if not pool.usable(address):
        return f"{address} is the network or broadcast address of pool {pool.name} (never used)"
    reserved = reserved_by(snap, address)
    if reserved:
        return f"{address} is reserved by ipreservation {', '.join(reserved)} (pool {pool.name})"
    cidr = pool.block_of(address)
    claimed = snap.blocks.get(cidr)
    where = (f"block {cidr}, affinity {show(claimed.affinity)}" if claimed is not None
             else f"block {cidr} not claimed yet")
    return f"{address} is free (pool {pool.name}, {where})"


def reserved_by(snap: Snapshot, address: IPAddress) -> list[str]:
    return sorted(r.name for r in snap.reservations if reserves(r, address))


def find_inconsistencies(snap: Snapshot) -> list[str]:
    """Every disagreement between blocks, handles, affinities and pools, one line each.

    These are problems: state that can hand an address out twice or lose it.
    """
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


def find_warnings(snap: Snapshot) -> list[str]:
    """Deliberate or harmless states an operator should know about, one line each.

    Blocks left by a forced pool deletion (until their last address is
    released), reserved addresses that are still allocated, reservations
    outside every pool.
    """
    lines = []
    for cidr in sorted(snap.blocks, key=network_order):
        if allocator.pool_of_block(snap.pools, cidr) is None:
            lines.append(f"block {cidr} is not inside any pool (block of a deleted pool; "
                         f"{snap.blocks[cidr].in_use} address(es) in use)")
    for row in snap.allocations():
        for name in reserved_by(snap, row.ip):
            lines.append(f"reserved address {row.ip} (ipreservation {name}) is allocated to "
                         f"handle {row.handle_id} (node {show(row.node)})")
    for reservation in sorted(snap.reservations, key=lambda r: r.name):
        lines += [f"ipreservation {reservation.name}: {cidr} is outside every pool"
                  for cidr in outside_pools(reservation, snap.pools)]
    return lines


def print_findings(report_name: str, problems: Sequence[str], warnings: Sequence[str],
                   counts: str, fail_on_warnings: bool) -> int:
    """The shared tail of every check verb: problems, warnings, one summary, the status.

    0: no problems (warnings allowed, unless ``fail_on_warnings``); 1: problems.
    """
    for line in problems:
        print(line)
    for line in warnings:
        print(f"warning: {line}")
    noted = f", {len(warnings)} warning(s)" if warnings else ""
    if problems:
        print(f"{report_name}: {len(problems)} problem(s){noted} found ({counts})")
        return 1
    print(f"{report_name}: OK{noted} ({counts})")
    return 1 if warnings and fail_on_warnings else 0


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
    """Blocks cut to another size than their pool's (blocks of no pool are warnings)."""
    for cidr in sorted(snap.blocks, key=network_order):
        pool = allocator.pool_of_block(snap.pools, cidr)
        if pool is not None and pool.block_size != cidr.prefixlen:
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
    counts = (f"{len(snap.blocks)} blocks, {len(snap.handles)} handles, "
              f"{sum(b.in_use for b in snap.blocks.values())} addresses")
    return print_findings("ipam check", find_inconsistencies(snap), find_warnings(snap),
                          counts, args.fail_on_warnings)


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
    for _ in range(WRITE_ATTEMPTS):
        holding = await read_holding(store, address)
        if holding is None:
            return None
        if holding.live and not force:
            raise refuse_live(holding)
        block, _ = allocator.release_addresses(holding.block.value, [address], None, time.time())
        writes: list[Write] = [PutBlock(block, holding.block.mod_revision)]
        handle = holding.handle
        if handle is None:
            writes.append(DeleteHandle(holding.holder, 0))  # a guard: still absent
        else:
            rest = tuple(a for a in handle.value.addresses if a.ip != address)
            writes.append(
                PutHandle(dataclasses.replace(handle.value, addresses=rest), handle.mod_revision)
                if rest else DeleteHandle(holding.holder, handle.mod_revision))
        if (await store.commit(writes)).succeeded:
            return holding
    raise Conflict(f"{address} changed concurrently {WRITE_ATTEMPTS} times; try again")


async def cmd_ipam_release(store: EtcdStore, args: argparse.Namespace) -> int:
    addresses = [parse_address(text, "--ip") for text in args.ip]
    if not args.force:
        # All or nothing: refuse before releasing any of them.
        for address in addresses:
            holding = await read_holding(store, address)
            if holding is not None and holding.live:
                raise refuse_live(holding)
    failed = 0
    for address in addresses:
        released = await release_holding(store, address, args.force)
        holder = released.holder if released is not None else None
        if released is not None:
            print(f"released {address} (handle {released.holder})")
            if released.live:
                warn(f"released {address} although attachment {released.attachment} still uses "
                     "it: the next allocation may hand it out again (a duplicate) "
                     "until that pod is deleted")
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
    snap = await load_snapshot(store)
    config = (await store.get_config()).value
    for family in sorted({p.family for p in pools} or {4}):
        try:
            order = allocator.pools_for_node(pools, args.name, labels, family)
        except NoPoolForNode as exc:
            print(f"{family_name(family)} allocation order: none: {exc}")
            continue
        print(f"{family_name(family)} allocation order:")
        for line in allocation_steps(args.name, order, snap, config):
            print(f"  {line}")
    return 0


def allocation_steps(node: str, order: Sequence[IPPool], snap: Snapshot, config: IPAMConfig
                     ) -> list[str]:
    """The allocator's three steps (DESIGN §4) for ``node``, as they stand now."""
    reservations = allocator.Reservations(snap.reservations)
    now, cooldown = time.time(), float(config.ip_cooldown_seconds)
    own = []
    affine = [b for b in snap.blocks.values() if b.affinity == node]
    for pool in order:  # pool order, then address order, like the allocator
        ctx = allocator.AssignContext(pool, reservations, now, cooldown)
        for block in sorted((b for b in affine if owning_pool([pool], b.cidr) is pool),
                            key=lambda b: network_order(b.cidr)):
            free = allocator.free_count(block, ctx)
            if free:
                own.append(f"{block.cidr} (pool {pool.name}, {free} free)")
    names = ", ".join(p.name for p in order)
    steps = [f"1. {node}'s blocks with free addresses: {', '.join(own) or 'none'}"]
    if not config.auto_allocate_blocks:
        steps.append("2. no new blocks: autoAllocateBlocks is off")
    elif config.max_blocks_per_host and len(affine) >= config.max_blocks_per_host:
        steps.append(f"2. no new blocks: node has reached maxBlocksPerHost="
                     f"{config.max_blocks_per_host}")
    else:
        steps.append(f"2. claim a new block in: {names}")
    steps.append("3. no borrowing: strictAffinity is on" if config.strict_affinity
                 else f"3. borrow a free address from other nodes' blocks in: {names}")
    return steps


async def cmd_check_coverage(store: EtcdStore, args: argparse.Namespace) -> int:
    pools = [p.value for p in await store.list_pools()]
    nodes = sorted((n.value for n in await store.list_nodes()), key=lambda n: n.name)
    # With no pool at all nobody gets an address: report that for IPv4.
    families = sorted({p.family for p in pools} or {4})
    uncovered = set()
    problems = []
    for node in nodes:
        for family in families:
            try:
                allocator.pools_for_node(pools, node.name, node.labels, family)
            except NoPoolForNode as exc:
                # A problem: pods on this node get no address of this family.
                problems.append(f"uncovered node: {exc}")
                uncovered.add(node.name)
    counts = f"{len(nodes)} nodes, {len(pools)} pools"
    if uncovered:
        counts = (f"{len(uncovered)} of {len(nodes)} node(s) not selected by any enabled "
                  f"Automatic pool; {len(pools)} pools")
    return print_findings("check coverage", problems, [], counts, args.fail_on_warnings)


def placement_problem(row: AllocationRow, snap: Snapshot) -> str | None:
    """Why ``row`` would not be allocated where it is today, or None if it would."""
    pool = row.pool
    if pool is None:
        return "its pool was deleted"
    if pool.disabled:
        return f"pool {pool.name} is disabled"
    if not pool.automatic:
        return None  # Manual pools are used when named, whatever the node's labels
    reserved = reserved_by(snap, row.ip)
    if reserved:
        return f"the address is reserved by ipreservation {', '.join(reserved)}"
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
    # Warnings: these allocations work; they are the workloads to recreate in a
    # maintenance window. The table is the report, so no "warning:" lines.
    if found:
        print_table(["IP", "NODE", "POOL", "HANDLE", "POD", "REASON"], [
            [str(r.ip), show(r.node), r.pool.name if r.pool else "-", r.handle_id, r.pod,
             reason] for r, reason in found
        ])
        print(f"check placement: {len(found)} of {len(rows)} allocation(s) outside their "
              "node's pools")
        return 1 if args.fail_on_warnings else 0
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
    group.add_argument("--etcd-ca", metavar="FILE", default=default("TOPOIPAM_ETCD_CA"),
                       help="CA certificate for etcd TLS (env TOPOIPAM_ETCD_CA)")
    group.add_argument("--etcd-cert", metavar="FILE", default=default("TOPOIPAM_ETCD_CERT"),
                       help="client certificate for etcd TLS (env TOPOIPAM_ETCD_CERT)")
    group.add_argument("--etcd-key", metavar="FILE", default=default("TOPOIPAM_ETCD_KEY"),
                       help="client key for etcd TLS (env TOPOIPAM_ETCD_KEY)")
    group.add_argument("--etcd-user", default=default("TOPOIPAM_ETCD_USER"),
                       help="etcd user name (env TOPOIPAM_ETCD_USER)")
    group.add_argument("--etcd-password-file", metavar="FILE",
                       default=default("TOPOIPAM_ETCD_PASSWORD_FILE"),
                       help="file holding the etcd password (env TOPOIPAM_ETCD_PASSWORD_FILE)")
    group.add_argument("--etcd-timeout", metavar="SECONDS", type=float,
                       default=default("TOPOIPAM_ETCD_TIMEOUT", str(DEFAULT_TIMEOUT)),
                       help=f"per-request etcd timeout (default {DEFAULT_TIMEOUT})")


EXIT_CODES = """\
exit status: 0 success (reports: no problems; warnings allowed); 1 an error, or a report
found problems; 2 usage error; 141 stdout closed early (e.g. `| head`), quietly."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topoipamctl", description="Administer topoipam pools, nodes and allocations.",
        epilog=EXIT_CODES)
    add_global_options(parser, top=True)
    connection = argparse.ArgumentParser(add_help=False)
    add_global_options(connection, top=False)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB",
                                  help="what to do (VERB --help for its options)")

    def verb(parent: Any, name: str, handler: Handler, help: str,
             **extra: Any) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name, help=help, description=help, parents=[connection], **extra)
        sub.set_defaults(handler=handler, usage_parser=sub)
        return sub

    def report_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--fail-on-warnings", action="store_true",
                         help="exit 1 on warnings too (problems always exit 1)")
        sub.epilog = EXIT_CODES

    apply = verb(verbs, "apply", cmd_apply, "create or update resources from a manifest")
    apply.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")

    create = verb(verbs, "create", cmd_create, "create resources (fails if they exist)")
    create.add_argument("kind", nargs="?", choices=["ippool"], help="ippool (with flags)")
    create.add_argument("name", nargs="?",
                        help="pool name: a DNS-1123 label (lowercase, digits, '-')")
    create.add_argument("-f", "--filename", help="manifest file, or - for stdin")
    create.add_argument("--cidr", help="the pool's CIDR, e.g. 192.168.0.0/24")
    create.add_argument("--block-size", type=int,
                        help="prefix length of the pool's blocks (default 26 / 122)")
    create.add_argument("--node-selector", default="all()",
                        help="which nodes the pool serves (default all())")
    create.add_argument("--disabled", action="store_true",
                        help="create the pool disabled (no new allocations)")
    create.add_argument("--assignment-mode", choices=ASSIGNMENT_MODES, default="Automatic",
                        help="Manual pools serve only CNI configs that name them")
    create.add_argument("--gateway", help="the pool's gateway address, never handed out "
                        "(default: its first usable address; 'none' for a routed pool)")

    delete = verb(verbs, "delete", cmd_delete, "delete resources")
    delete.add_argument("kind", nargs="?", choices=[*POOL_NAMES, *RESERVATION_NAMES,
                                                    *NODE_NAMES],
                        help="ippool (ipp), ipreservation (ipr) or node (no)")
    delete.add_argument("name", nargs="?", help="name of the object to delete")
    delete.add_argument("-f", "--filename", help="manifest file, or - for stdin")
    delete.add_argument("--force", action="store_true",
                        help="delete pools even while addresses in them are allocated; "
                             "delete a node while its daemon runs, and release the addresses "
                             "it holds")

    patch = verb(verbs, "patch", cmd_patch, "change fields of an IP pool in place")
    patch.add_argument("kind", choices=POOL_NAMES, help="ippool (ipp)")
    patch.add_argument("name", help="the pool to change")
    patch.add_argument("--disabled", type=bool_flag, metavar="true|false",
                       help="disable (true) or enable (false) the pool")
    patch.add_argument("-p", "--patch", metavar="JSON",
                       help="JSON merge patch (RFC 7386) of the pool's manifest, e.g. "
                            "'{\"spec\": {\"nodeSelector\": \"rack == \\\"0\\\"\"}}'")

    get = verb(verbs, "get", cmd_get, "list resources or allocations")
    get.add_argument("kind", choices=sorted(GET_KINDS),
                     help="ippool (ipp), node (no), ipamconfig, ipreservation (ipr), "
                          "allocations")
    get.add_argument("name", nargs="?", help="only this object")
    get.add_argument("-o", "--output", choices=["wide", "yaml", "json"],
                     help="wide table, or a yaml/json document")
    get.add_argument("--node", help="only allocations held by this node")

    label = verb(verbs, "label", cmd_label,
                 "set (k=v) or remove (k-) node labels (Kubernetes label syntax)")
    label.add_argument("resource", choices=NODE_NAMES, help="nodes (no)")
    label.add_argument("name", help="the node")
    label.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-",
                       help="labels to set or remove")
    label.add_argument("--overwrite", action="store_true",
                       help="allow changing the value of an existing label")
    label.add_argument("--create", action="store_true",
                       help="create the node if it does not exist (daemons register their "
                            "own node; without this a mistyped name is refused)")

    ipam = verbs.add_parser("ipam", help="inspect and repair address allocations",
                            description="inspect and repair address allocations")
    ipam_verbs = ipam.add_subparsers(dest="ipam_verb", required=True, metavar="ACTION",
                                     help="show, check, release or configure")
    ipam_show = verb(ipam_verbs, "show", cmd_ipam_show,
                     "utilisation per pool (CAPACITY: addresses that can be handed out)")
    ipam_show.add_argument("--show-blocks", action="store_true",
                           help="also list every block with its affinity and free addresses")
    ipam_show.add_argument("--show-borrowed", action="store_true",
                           help="also list addresses held by a node other than the block's")
    ipam_show.add_argument("--ip", help="who holds this address (or why it is not used)")
    ipam_check = verb(ipam_verbs, "check", cmd_ipam_check,
                      "find leaks, orphans and mismatches (problems) and leftovers (warnings)")
    report_flags(ipam_check)
    ipam_release = verb(
        ipam_verbs, "release", cmd_ipam_release,
        "free leaked addresses (whose attachment is gone); refuses an address a live "
        "attachment holds unless --force")
    ipam_release.add_argument("--ip", action="append", required=True,
                              help="address to free (repeat for several; all or nothing)")
    ipam_release.add_argument(
        "--force", action="store_true",
        help="also free addresses whose attachment still exists: the pod keeps using it and "
             "the next allocation may hand it out again (a duplicate)")
    ipam_configure = verb(ipam_verbs, "configure", cmd_ipam_configure, "change IPAMConfig")
    ipam_configure.add_argument("--strictaffinity", dest="strict_affinity", type=bool_flag,
                                metavar="true|false",
                                help="forbid borrowing addresses from other nodes' blocks")
    ipam_configure.add_argument("--max-blocks-per-host", type=whole_number, metavar="N",
                                help="blocks a node may claim (0: no limit)")
    ipam_configure.add_argument("--auto-allocate-blocks", type=bool_flag, metavar="true|false",
                                help="let nodes claim new blocks")
    ipam_configure.add_argument("--ip-cooldown-seconds", type=whole_number, metavar="N",
                                help="keep released addresses out of use this long")

    explain = verb(verbs, "explain", cmd_explain,
                   "which pools select a node, why, and the order addresses come from")
    explain.add_argument("resource", choices=NODE_NAMES, help="node (no)")
    explain.add_argument("name", help="the node")

    check = verbs.add_parser("check", help="cluster-wide reports",
                             description="cluster-wide reports", epilog=EXIT_CODES)
    check_verbs = check.add_subparsers(dest="check_verb", required=True, metavar="REPORT",
                                       help="coverage or placement")
    coverage = verb(check_verbs, "coverage", cmd_check_coverage,
                    "nodes that no enabled pool selects (problems)")
    report_flags(coverage)
    placement = verb(check_verbs, "placement", cmd_check_placement,
                     "allocations outside their node's pools (warnings)")
    report_flags(placement)
    placement.add_argument("--fail-on-found", dest="fail_on_warnings", action="store_true",
                           help="the same as --fail-on-warnings (older name)")
    cni_bundle.add_parser(verbs)
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
    if verb == "get" and GET_KINDS[args.kind] == "allocations" and args.name is not None:
        return "get allocations takes no NAME (use --node NODE to filter)"
    if verb == "patch" and (args.disabled is None) == (args.patch is None):
        return "patch needs exactly one of --disabled true|false and -p JSON"
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
    if getattr(args, "local_handler", None):  # a verb that needs no etcd (install-cni)
        return int(args.local_handler(args))
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
    except BrokenPipeError:
        raise  # stdout went away: main() ends quietly
    except OSError as exc:
        return fail(str(exc))


def main(argv: list[str] | None = None) -> int:
    # The store logs values it skips (corrupt, unknown); say so the way other warnings read.
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        code = asyncio.run(run(argv))
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return code
    except BrokenPipeError:
        # `topoipamctl ... | head -1`: the reader has what it wanted. End like a
        # writer killed by SIGPIPE would (status 141), without a message, and
        # point stdout at /dev/null so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
