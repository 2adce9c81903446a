"""topoipamctl's resource verbs: apply, create, delete, patch, get, label.

Writes go through :mod:`topoipam.daemon.admin` (every change one
compare-and-swap transaction, re-read and re-validated after a lost race,
never half a manifest); this module reads the manifests and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections import Counter

from topoipam.client import manifests
from topoipam.client.ctl_foresight import show_impact
from topoipam.client.ctl_output import print_document, print_table, report, show_labels, warn
from topoipam.client.manifests import Document
from topoipam.daemon.admin import (
    Plan,
    Target,
    allocated_in,
    label_node,
    label_writes,
    merge_patch,
    parse_label_changes,
    plan_writes,
    read_current,
    retire_node,
    write_targets,
)
from topoipam.daemon.audit import load_snapshot, show
from topoipam.daemon.core import allocator
from topoipam.daemon.core.errors import InvalidInput, NotFound
from topoipam.daemon.core.model import (
    CONFIG_NAME,
    DEFAULT_BLOCK_SIZE,
    IPAMConfig,
    IPPool,
    IPReservation,
    Node,
    Resource,
    name_of,
    parse_gateway_spec,
    parse_network,
)
from topoipam.daemon.core.writes import PutObject, Write
from topoipam.daemon.store import EtcdStore

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


async def write_or_foresee(store: EtcdStore, args: argparse.Namespace, targets: list[Target],
                           action: str, force: bool = False) -> int:
    """Write ``targets`` (one transaction), or with --dry-run validate them the same way and
    show what they would do."""
    if args.dry_run:
        plan = await plan_writes(store, targets, action, force)
        for line in plan.warnings:
            warn(line)
        return await show_impact(store, plan.writes, plan.lines, args)
    return report(await write_targets(store, targets, action, force))


async def cmd_apply(store: EtcdStore, args: argparse.Namespace) -> int:
    parsed = read_manifests(args.filename)
    return await write_or_foresee(store, args, [target_of(d) for d in parsed.documents],
                                  "apply")


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
            priority=args.priority,
            topology_key=args.topology_key,
            topology_block_size=args.topology_block_size,
        )
        targets = [Target("IPPool", pool.name, pool)]
    return await write_or_foresee(store, args, targets, "create")


async def cmd_delete(store: EtcdStore, args: argparse.Namespace) -> int:
    if args.kind in ("node", "nodes"):
        return await delete_node(store, args.name, args.force)
    if args.filename is not None:
        parsed = read_manifests(args.filename)
        targets = [target_of(d) for d in parsed.documents]
    else:
        kind = GET_KINDS[args.kind]
        targets = [Target(kind, args.name, None)]
    return await write_or_foresee(store, args, targets, "delete", args.force)


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

    if args.dry_run:
        writes, plan = await attempt()
        return await show_impact(store, writes, plan.lines, args)
    return report(await store.commit_with_retry(attempt, f"ippool {args.name}"))


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
        ["NAME", "CIDR", "BLOCKSIZE", "SELECTOR", "PRIORITY", "DISABLED", "ASSIGNMENTMODE",
         "GATEWAY", "IN-USE", "TOTAL"],
        [[p.name, str(p.cidr), str(p.block_size), p.node_selector, str(p.priority),
          str(p.disabled).lower(), p.assignment_mode, show(p.gateway), str(used),
          str(allocator.usable_capacity(p, reservations))]
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


async def cmd_label(store: EtcdStore, args: argparse.Namespace) -> int:
    changes = parse_label_changes(args.labels)
    if args.dry_run:
        writes, (changed, missing) = await label_writes(store, args.name, changes,
                                                        args.overwrite, args.create)
        for key in missing:
            warn(f"node {args.name} has no label {key}")
        return await show_impact(store, writes, [f"node/{args.name} labeled"] if changed
                                 else [f"node/{args.name} not labeled"], args)
    changed, missing = await label_node(store, args.name, changes,
                                        overwrite=args.overwrite, create=args.create)
    for key in missing:
        warn(f"node {args.name} has no label {key}")
    print(f"node/{args.name} {'labeled' if changed else 'not labeled'}")
    return 0
