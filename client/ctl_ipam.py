"""topoipamctl's ``ipam`` verbs: show, check, release, conflicts, resolve-conflict,
repair-index, configure.

Reports read one snapshot at one revision (:mod:`topoipam.daemon.audit`);
repairs and releases are guarded transactions of :mod:`topoipam.daemon.admin`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from topoipam.client.ctl_output import print_findings, print_table, warn
from topoipam.daemon.admin import configure, drop_stray_empty_blocks, repair_free_index
from topoipam.daemon.audit import (
    describe_address,
    find_inconsistencies,
    find_warnings,
    load_snapshot,
    network_order,
    show,
)
from topoipam.daemon.core import allocator
from topoipam.daemon.core.errors import InvalidInput, NotFound
from topoipam.daemon.core.holdings import check_identity
from topoipam.daemon.core.model import parse_address
from topoipam.daemon.planning import release_identity as release_identity_now
from topoipam.daemon.release import read_holding, refuse_live, release_holding, unlist_address
from topoipam.daemon.resolve import list_conflicts, resolve_conflict
from topoipam.daemon.store import EtcdStore

CONFIG_FLAGS = ("strict_affinity", "max_blocks_per_host", "auto_allocate_blocks",
                "ip_cooldown_seconds", "warm_addresses", "sticky_hold_seconds",
                "sticky_takeover_seconds")


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
        capacity = allocator.usable_capacity(p, reservations)
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


async def release_identity(store: EtcdStore, identity_id: str, park: bool = False,
                           force: bool = False) -> int:
    """Free a parked sticky identity's addresses now, or (``park``) park a live one whose
    node is lost; one guarded transaction either way."""
    if park and await store.get_identity(check_identity(identity_id)) is None:
        raise NotFound(f"sticky identity {identity_id} does not exist (never allocated, "
                       "released, or its hold is over)")
    parked = freed = await release_identity_now(store, identity_id, park, force)
    if park:
        hold = (await store.get_config()).value.sticky_hold_seconds
        print(f"sticky identity {identity_id}: "
              + (f"parked {', '.join(map(str, parked))} for its next ADD on any node "
                 f"(stickyHoldSeconds {hold})" if parked else "is parked already: nothing to park"))
        return 0
    print(f"sticky identity {identity_id}: "
          + (f"released {', '.join(map(str, freed))}" if freed else "holds no parked address"))
    return 0
