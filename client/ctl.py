"""`topoipamctl`: the admin CLI. Talks to etcd directly, calicoctl-style.

This module parses arguments, calls and prints tables. What a verb does lives
in the daemon package, usable from the library: writes in
:mod:`topoipam.daemon.admin` (every change one compare-and-swap transaction,
re-read and re-validated after a lost race, never half a manifest), reports
in :mod:`topoipam.daemon.audit` (one snapshot at one revision).

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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeAlias

import yaml

from topoipam.client import cni_bundle, manifests
from topoipam.client.manifests import Document
from topoipam.daemon import allocator
from topoipam.daemon.admin import (
    Plan,
    Target,
    allocated_in,
    configure,
    drop_stray_empty_blocks,
    label_node,
    merge_patch,
    parse_label_changes,
    plan_writes,
    read_current,
    read_holding,
    refuse_live,
    release_holding,
    repair_free_index,
    retire_node,
    unlist_address,
    write_targets,
)
from topoipam.daemon.audit import (
    DEFAULT_ROUTE_LABEL,
    allocation_steps,
    borrowed_by,
    describe_address,
    find_inconsistencies,
    find_warnings,
    identity_destinations,
    load_snapshot,
    network_order,
    placement_problem,
    route_report,
    show,
    usable_capacity,
)
from topoipam.daemon.engine import AllocationEngine
from topoipam.daemon.errors import (
    DatastoreUnavailable,
    InvalidInput,
    NoPoolForNode,
    NotFound,
    TopoipamError,
    gone_clause,
    park_command,
)
from topoipam.daemon.keys import DEFAULT_PREFIX
from topoipam.daemon.model import (
    ASSIGNMENT_MODES,
    CONFIG_NAME,
    DEFAULT_BLOCK_SIZE,
    Identity,
    IPAMConfig,
    IPPool,
    IPReservation,
    Node,
    Resource,
    check_identity,
    name_of,
    parse_address,
    parse_gateway_spec,
    parse_network,
)
from topoipam.daemon.resolve import KEEP_SIDES, list_conflicts, resolve_conflict
from topoipam.daemon.store import EtcdOptions, EtcdStore
from topoipam.daemon.writes import PutObject, Write

DEFAULT_ENDPOINTS = "http://127.0.0.1:2379"
# Short: an operator at a terminal wants "etcd is down" in seconds, not a hang.
DEFAULT_TIMEOUT = 3.0
CONFIG_FLAGS = ("strict_affinity", "max_blocks_per_host", "auto_allocate_blocks",
                "ip_cooldown_seconds", "warm_addresses", "sticky_hold_seconds",
                "sticky_takeover_seconds")

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




def family_name(family: int) -> str:
    return f"IPv{family}"






# ---------------------------------------------------------------------------- reads
















# ---------------------------------------------------------------------------- writes




























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


def target_of(document: Document) -> Target:
    return Target(document.kind, document.name, document.obj, document.where)


async def cmd_apply(store: EtcdStore, args: argparse.Namespace) -> int:
    parsed = read_manifests(args.filename)
    return report(await write_targets(store, [target_of(d) for d in parsed.documents], "apply"))


async def cmd_create(store: EtcdStore, args: argparse.Namespace) -> int:
    if args.filename is not None:
        parsed = read_manifests(args.filename)
        targets = [target_of(d) for d in parsed.documents]
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
        targets = [target_of(d) for d in parsed.documents]
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
    released, deleted, kept = await retire_node(store, name, force)
    print(f"node/{name} deleted ({released} attachment(s) released, {deleted} block(s) "
          f"deleted, {kept} block(s) with borrowed addresses kept without affinity)")
    return 0


# ---------------------------------------------------------------------------- verbs: patch




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

    async def attempt() -> tuple[list[Write], Plan]:
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
        # Guarded by the revision the patch was applied to, not the one plan_writes read.
        return [dataclasses.replace(w, expect_revision=revision) if isinstance(w, PutObject)
                else w for w in plan.writes], plan

    return report(await store.commit_with_retry(attempt, f"ippool {args.name}"))


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
    return sorted(objs, key=name_of)


async def cmd_get(store: EtcdStore, args: argparse.Namespace) -> int:
    kind = GET_KINDS[args.kind]
    if kind == "allocations":
        return await get_allocations(store, args.node, args.output)
    objs = await list_objects(store, kind)
    if args.name is not None:
        objs = [o for o in objs if name_of(o) == args.name]
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
        # Wide adds the sticky identities' settings.
        extra = ["STICKYHOLDSECONDS", "STICKYTAKEOVERSECONDS"] if wide else []
        print_table(["NAME", "STRICTAFFINITY", "MAXBLOCKSPERHOST", "AUTOALLOCATEBLOCKS",
                     "IPCOOLDOWNSECONDS", "WARMADDRESSES", *extra], [
            [CONFIG_NAME, str(o.strict_affinity).lower(), str(o.max_blocks_per_host),
             str(o.auto_allocate_blocks).lower(), str(o.ip_cooldown_seconds),
             str(o.warm_addresses), *([str(o.sticky_hold_seconds),
                                       str(o.sticky_takeover_seconds)] if wide else [])]
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
    sticky = any(r.identity is not None for r in rows)
    if sticky:
        headers += ["IDENTITY", "STICKY"]
    if output == "wide":
        headers += ["BLOCK", "HANDLE", "CONTAINER-ID", "IFNAME"]
    table = []
    for row in rows:
        line = [str(row.ip), show(row.node), show(row.pool and row.pool.name), row.pod]
        if sticky:
            line += [show(row.identity and row.identity.id), row.sticky_state]
        if output == "wide":
            line += [str(row.block.cidr), row.handle_id, show(row.attribute("container_id")),
                     show(row.attribute("ifname"))]
        table.append(line)
    print_table(headers, table)
    return 0


# ---------------------------------------------------------------------------- verbs: label




async def cmd_label(store: EtcdStore, args: argparse.Namespace) -> int:
    changed, missing = await label_node(store, args.name, parse_label_changes(args.labels),
                                        overwrite=args.overwrite, create=args.create)
    for key in missing:
        warn(f"node {args.name} has no label {key}")
    print(f"node/{args.name} {'labeled' if changed else 'not labeled'}")
    return 0


# ---------------------------------------------------------------------------- verbs: ipam




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












async def cmd_ipam_check(store: EtcdStore, args: argparse.Namespace) -> int:
    snap = await load_snapshot(store)
    counts = (f"{len(snap.blocks)} blocks, {len(snap.handles)} handles, "
              f"{sum(b.in_use for b in snap.blocks.values())} addresses")
    return print_findings("ipam check", find_inconsistencies(snap), find_warnings(snap),
                          counts, args.fail_on_warnings)










async def cmd_ipam_release(store: EtcdStore, args: argparse.Namespace) -> int:
    if args.identity is not None:
        if args.ip:
            raise InvalidInput("--identity does not take --ip")
        if args.force and not args.park:
            raise InvalidInput("--identity takes --force only with --park")
        return await release_identity(store, args.identity, args.park, args.force)
    if args.park:
        raise InvalidInput("--park goes with --identity ID")
    if not args.ip:
        raise InvalidInput("name what to free: --ip ADDRESS or --identity ID")
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
        contested = released.block.value.contested.get(
            released.block.value.ordinal(address)) if released is not None else None
        if released is not None and contested is not None:
            print(f"released {address} (handle {released.holder}); it now belongs to "
                  f"{contested[0]} (node {contested[1]}), which used it too since a restore")
        elif released is not None:
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




async def cmd_ipam_conflicts(store: EtcdStore, args: argparse.Namespace) -> int:
    views = await list_conflicts(store)
    if args.output == "json":
        print(json.dumps([{
            "node": v.conflict.node, "address": str(v.conflict.address),
            "attachment": v.conflict.handle.id, "holder": v.holder or "",
            "holds": v.standing.holds, "what": v.standing.what, "fix": v.standing.fix,
            "detected": v.conflict.detected} for v in views], indent=2))
        return 0
    print_table(("NODE", "ADDRESS", "RECORDED", "IN ETCD", "WHAT"), [
        (v.conflict.node, str(v.conflict.address), v.conflict.handle.id, v.holder or "-",
         f"{v.standing.what}; {v.standing.fix}") for v in views])
    return 0


async def cmd_ipam_resolve_conflict(store: EtcdStore, args: argparse.Namespace) -> int:
    address = parse_address(args.ip, "IP")
    print(await resolve_conflict(store, args.node, address, args.keep))
    return 0


async def cmd_ipam_repair_index(store: EtcdStore, args: argparse.Namespace) -> int:
    fixed = await repair_free_index(store)
    print(f"free-block index: {fixed} entr{'y' if fixed == 1 else 'ies'} fixed")
    return 0


async def cmd_ipam_configure(store: EtcdStore, args: argparse.Namespace) -> int:
    changes = {name: getattr(args, name) for name in CONFIG_FLAGS
               if getattr(args, name) is not None}
    changed = await configure(store, changes)
    print(f"ipamconfig/default {'configured' if changed else 'unchanged'}")
    return 0


# ---------------------------------------------------------------------------- verbs: explain, check


async def release_identity(store: EtcdStore, identity_id: str, park: bool = False,
                           force: bool = False) -> int:
    """Free a parked sticky identity's addresses now, or (``park``) park a live one whose
    node is lost; one guarded transaction either way."""
    if park and await store.get_identity(check_identity(identity_id)) is None:
        raise NotFound(f"sticky identity {identity_id} does not exist (never allocated, "
                       "released, or its hold is over)")
    engine = AllocationEngine(store, "topoipamctl")
    try:
        if park:
            parked = await engine.park_identity(identity_id, force)
        else:
            freed = await engine.release_identity(identity_id)
    finally:
        await engine.close()
    if park:
        hold = (await store.get_config()).value.sticky_hold_seconds
        print(f"sticky identity {identity_id}: "
              + (f"parked {', '.join(map(str, parked))} for its next ADD on any node "
                 f"(stickyHoldSeconds {hold})" if parked else "is parked already: nothing to park"))
        return 0
    print(f"sticky identity {identity_id}: "
          + (f"released {', '.join(map(str, freed))}" if freed else "holds no parked address"))
    return 0


async def cmd_explain_identity(store: EtcdStore, identity_id: str) -> int:
    snap = await load_snapshot(store)
    identity = snap.identities.get(identity_id)
    if identity is None:
        raise NotFound(f"sticky identity {identity_id} does not exist (never allocated, "
                       "released, or its hold is over)")
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(identity.parked_until or 0))
    if not identity.parked:
        state = f"live under attachment {identity.handle}"
    elif (identity.parked_until or 0) > time.time():
        state = f"parked until {until}"
    else:  # only the daemon of each block's node expires holds, while it runs
        state = (f"parked, hold over since {until} (freed by the daemon of the node whose "
                 f"block holds it when it runs, by its next ADD, or by `topoipamctl ipam "
                 f"release --identity {identity.id}`)")
    print(f"Identity: {identity.id}")
    print(f"State: {state} (last node {identity.node})")
    print(f"Addresses: {', '.join(str(a.ip) for a in identity.addresses) or '<none>'}")
    config = (await store.get_config()).value
    if not identity.parked:
        print(f"Takeover: {await takeover_state(store, identity, config)}")
    destinations = identity_destinations(snap, config, identity)
    if not destinations:
        print("Nodes that keep its addresses: <none> (its next ADD gets a new address)")
        return 0
    print("Nodes that keep its addresses"
          + (" (strictAffinity: only the blocks' own nodes):" if config.strict_affinity
             else ":"))
    print_table(["NODE", "WHY"], [[node, why] for node, why in destinations])
    return 0


async def takeover_state(store: EtcdStore, identity: Identity, config: IPAMConfig) -> str:
    """Whether another node's ADD may take a live identity over, and when (read only)."""
    absence = await store.daemon_absence(identity.node, note=False)
    if absence is None:
        return (f"no: node {identity.node}'s topoipamd is alive (delete the pod there; "
                f"if the node is lost all the same: `{park_command(identity.id)} --force`)")
    if absence.seconds is None:
        return (f"node {identity.node} has no live topoipamd; the takeover clock starts at "
                f"this identity's next ADD on another node (stickyTakeoverSeconds="
                f"{config.sticky_takeover_seconds}); park it now with "
                f"`{park_command(identity.id)}`")
    return gone_clause(identity.id, identity.node, absence.seconds,
                       config.sticky_takeover_seconds)


async def cmd_explain(store: EtcdStore, args: argparse.Namespace) -> int:
    if args.resource == "identity":
        return await cmd_explain_identity(store, args.name)
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
    borrowed = borrowed_by(snap, args.name)
    if borrowed:
        print()
        print(f"borrowed: {args.name} holds {len(borrowed)} address(es) in blocks it does not "
              "own (routes that may break aggregation: see `topoipamctl check routes`):")
        for row in borrowed:
            owner = (f"node {row.block.affinity}" if row.block.affinity is not None
                     else "no node")
            print(f"  {row.ip} in block {row.block.cidr} of {owner} (pod {row.pod})")
    return 0




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


async def cmd_check_routes(store: EtcdStore, args: argparse.Namespace) -> int:
    report = route_report(await load_snapshot(store), args.by)
    breaking = report.breaking
    counts = (f"{len(report.domains)} {args.by} value(s), {report.prefix_count} prefix(es) to "
              f"route, {len(breaking)} breaking aggregation")
    if args.output == "json":
        print(json.dumps(report.to_json(), indent=2))
        if breaking:
            return 1
        return 1 if report.warnings and args.fail_on_warnings else 0
    rows = []
    for domain in report.domains:
        rows.append([show(domain.value), ",".join(domain.nodes) or "-",
                     ",".join(domain.pools) or "-", str(len(domain.prefixes)),
                     " ".join(map(str, domain.aggregate)) or "-",
                     " ".join(str(e.prefix) for e in domain.exceptions) or "-"])
    print_table([args.by.upper(), "NODES", "POOLS", "PREFIXES", "AGGREGATE", "BREAKING"], rows)
    print()
    problems = [f"breaks aggregation: {e.prefix} routed to {args.by}="
                f"{show(domain.value)} (node {e.node}): {e.reason}"
                for domain in report.domains for e in domain.exceptions]
    return print_findings("check routes", problems, report.warnings, counts,
                          args.fail_on_warnings)


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
                                     help="show, check, release, conflicts, resolve-conflict, "
                                          "repair-index or configure")
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
    ipam_release.add_argument("--ip", action="append",
                              help="address to free (repeat for several; all or nothing)")
    ipam_release.add_argument("--identity", metavar="ID",
                              help="free the addresses parked for this sticky identity now "
                                   "(refused while it is live)")
    ipam_release.add_argument("--park", action="store_true",
                              help="with --identity: park a live identity whose node is lost "
                                   "(its pod never sends DEL), for its next ADD on any node; "
                                   "refused while that node's topoipamd is alive, unless --force")
    ipam_release.add_argument(
        "--force", action="store_true",
        help="also free addresses whose attachment still exists: the pod keeps using it and "
             "the next allocation may hand it out again (a duplicate); with --park: park "
             "although the identity's node has a live topoipamd")
    ipam_conflicts = verb(ipam_verbs, "conflicts", cmd_ipam_conflicts,
                          "addresses a node's record holds that etcd gave another pod, or "
                          "no pool contains (after a restore), while that holds")
    ipam_conflicts.add_argument("-o", "--output", choices=["json"], help="a JSON list")
    ipam_resolve = verb(ipam_verbs, "resolve-conflict", cmd_ipam_resolve_conflict,
                        "settle one conflict: which side keeps the address (a conflict that "
                        "ended needs no side: its record is removed)")
    ipam_resolve.add_argument("node", help="the node that recorded the conflict")
    ipam_resolve.add_argument("ip", help="the address in conflict")
    ipam_resolve.add_argument("--keep", metavar="|".join(KEEP_SIDES),
                              help="record: the attachment the node's record names keeps it "
                                   "(the other pod must go); datastore: the pod etcd gave it "
                                   "to keeps it (the recorded one must go)")
    verb(ipam_verbs, "repair-index", cmd_ipam_repair_index,
         "rebuild the free-block index (borrowers' hints) from the blocks")
    ipam_configure = verb(ipam_verbs, "configure", cmd_ipam_configure, "change IPAMConfig")
    ipam_configure.add_argument("--strictaffinity", dest="strict_affinity", type=bool_flag,
                                metavar="true|false",
                                help="forbid borrowing addresses from other nodes' blocks")
    ipam_configure.add_argument("--max-blocks-per-host", type=whole_number, metavar="N",
                                help="blocks of each IP family a node may claim (0: no limit)")
    ipam_configure.add_argument("--auto-allocate-blocks", type=bool_flag, metavar="true|false",
                                help="let nodes claim new blocks")
    ipam_configure.add_argument("--ip-cooldown-seconds", type=whole_number, metavar="N",
                                help="keep released addresses out of use this long")
    ipam_configure.add_argument("--sticky-hold-seconds", type=whole_number, metavar="N",
                                help="how long DEL parks a sticky identity's address "
                                     "(default 600)")
    ipam_configure.add_argument("--sticky-takeover-seconds", type=whole_number, metavar="N",
                                help="after how long without a live topoipamd on its node a "
                                     "live sticky identity may be taken over by its ADD on "
                                     "another node (default 300; 0: never)")
    ipam_configure.add_argument("--warm-addresses", type=whole_number, metavar="N",
                                help="free addresses each node keeps ready in its own blocks, "
                                     "claiming blocks in the background (0: off)")

    explain = verb(verbs, "explain", cmd_explain,
                   "which pools select a node, why, and the order addresses come from")
    explain.add_argument("resource", choices=(*NODE_NAMES, "identity"),
                         help="node (no), or identity: the nodes a sticky identity can "
                              "move to and keep its addresses")
    explain.add_argument("name", help="the node, or the sticky identity")

    check = verbs.add_parser("check", help="cluster-wide reports",
                             description="cluster-wide reports", epilog=EXIT_CODES)
    check_verbs = check.add_subparsers(dest="check_verb", required=True, metavar="REPORT",
                                       help="coverage, placement or routes")
    coverage = verb(check_verbs, "coverage", cmd_check_coverage,
                    "nodes that no enabled pool selects (problems)")
    report_flags(coverage)
    placement = verb(check_verbs, "placement", cmd_check_placement,
                     "allocations outside their node's pools (warnings)")
    report_flags(placement)
    placement.add_argument("--fail-on-found", dest="fail_on_warnings", action="store_true",
                           help="the same as --fail-on-warnings (older name)")
    routes = verb(check_verbs, "routes", cmd_check_routes,
                  "per value of a node label (a rack): the prefixes a fabric must route there, "
                  "the aggregate of its nodes' blocks plus each block or address that breaks "
                  "aggregation (problems)")
    report_flags(routes)
    routes.add_argument("--by", metavar="LABEL", default=DEFAULT_ROUTE_LABEL,
                        help="the node label whose values are the routing domains "
                             f"(default {DEFAULT_ROUTE_LABEL})")
    routes.add_argument("-o", "--output", choices=["json"],
                        help="a json document instead of the table and lines")
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
