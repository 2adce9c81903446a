"""topoipamctl's read-only explanations and cluster reports: ``explain node|identity``
and ``check coverage|placement|routes``.

Each reads etcd (one snapshot where it needs several kinds) and prints; the
reports end with :func:`topoipam.client.ctl_output.print_findings`.
"""

from __future__ import annotations

import argparse
import json
import time

from topoipam.client.ctl_foresight import cmd_explain_pod, domain_label
from topoipam.client.ctl_output import family_name, print_findings, print_table, show_labels, warn
from topoipam.daemon.admin import read_current
from topoipam.daemon.audit import (
    load_snapshot,
    show,
)
from topoipam.daemon.core import allocator
from topoipam.daemon.core.errors import NoPoolForNode, NotFound, gone_clause, park_command
from topoipam.daemon.core.holdings import Identity
from topoipam.daemon.core.model import (
    IPAMConfig,
    Node,
)
from topoipam.daemon.reports import (
    allocation_steps,
    borrowed_by,
    identity_destinations,
    placement_problem,
    route_report,
)
from topoipam.daemon.store import EtcdStore


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
    if args.resource == "pod":
        return await cmd_explain_pod(store, args)
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
        tiers = allocator.priority_tiers(order)
        if len(tiers) == 1:
            print(f"{family_name(family)} allocation order:")
            for line in allocation_steps(args.name, order, snap, config):
                print(f"  {line}")
            continue
        print(f"{family_name(family)} allocation order, {len(tiers)} priority tiers (a lower "
              "tier serves only when every higher one cannot):")
        for number, tier in enumerate(tiers, 1):
            print(f"  tier {number}, priority {tier[0].priority}: "
                  f"{', '.join(p.name for p in tier)}")
            for line in allocation_steps(args.name, tier, snap, config):
                print(f"    {line}")
    topology_pools = [p for p in pools if p.topology_key and allocator.explain_pool(p, labels)[0]]
    if topology_pools:
        held = [r.value for r in await store.list_ranges()]
        print()
        for pool in topology_pools:
            value = labels.get(pool.topology_key)
            spans = [str(r.cidr) for r in held if r.pool == pool.name and r.value == value]
            who = (f"{pool.topology_key}={value}" if value is not None
                   else f"nodes without {pool.topology_key}")
            print(f"topology: pool {pool.name} keeps the blocks of {who} in its "
                  f"/{pool.topology_prefix} ranges: "
                  f"{', '.join(spans) or 'none yet (the first claim takes one)'}")
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
    report = route_report(await load_snapshot(store), domain_label(args))
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
