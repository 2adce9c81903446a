"""Routes per rack: racks of nodes claiming interleaved from one shared pool, with and without
topologyKey.

N racks of M nodes each (every combination of --racks and --nodes-per-rack)
take turns to fill their blocks in one shared pool (/28 blocks, so a node
claims often), --rounds blocks each, under strictAffinity. The nodes are the
daemon's own engines (the allocation policy and its etcd transactions, in this
process) against a real etcd; the routes are what ``topoipamctl check routes
--by rack`` counts (the route report over the resulting blocks).

Floor: the same claims in the same pool without topologyKey, in the same run.
Targets (with topologyKey, ranges of /--range): at most 2 prefixes per rack,
each rack's blocks inside ranges of its own.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

from common import Report, Workspace, open_store, print_table, put_objects, run_main

POOL = "10.50.0.0/16"
BLOCK = 28


async def fill(endpoint: str, prefix: str, racks: int, per_rack: int, rounds: int,
               topology: int | None) -> Any:
    """Run the claims; the route report by rack of what they left."""
    from topoipam.daemon.audit import load_snapshot
    from topoipam.daemon.core.holdings import Attachment
    from topoipam.daemon.core.model import IPAMConfig, IPPool, Node
    from topoipam.daemon.engine import AllocationEngine, AllocationRequest
    from topoipam.daemon.reports import route_report

    extra: dict[str, Any] = ({"topology_key": "rack", "topology_block_size": topology}
                             if topology else {})
    shared = IPPool("shared", ipaddress.ip_network(POOL), BLOCK, **extra)
    nodes = [(f"r{r}-n{n}", str(r)) for n in range(per_rack) for r in range(racks)]
    store = await open_store(endpoint, prefix)
    try:
        await put_objects(store, [shared, IPAMConfig(strict_affinity=True),
                                  *(Node(name, {"rack": rack}) for name, rack in nodes)])
        engines = [AllocationEngine(store, name) for name, _ in nodes]
        per_block = (1 << (32 - BLOCK)) - 2  # what any block of the pool can give
        for round_ in range(rounds):
            for engine in engines:  # interleaved: each node claims its next block in turn
                for pod in range(per_block):
                    await engine.allocate(AllocationRequest(
                        Attachment("bench", f"{engine.node}-{round_}-{pod}", "eth0")))
        for engine in engines:
            await engine.close()
        return route_report(await load_snapshot(store), "rack")
    finally:
        await store.close()


async def measure(args: argparse.Namespace) -> Report:
    report = Report("topology_routes")
    rows = []
    with Workspace("topology") as ws:
        run = 0
        for racks in args.racks:
            for per_rack in args.nodes_per_rack:
                results = {}
                for topology in (None, args.range):
                    run += 1
                    routes = await fill(ws.etcd.endpoint, f"/topoipam-bench/topology/{run}",
                                        racks, per_rack, args.rounds, topology)
                    counts = [len(d.prefixes) for d in routes.domains]
                    spans = [len({p.supernet(new_prefix=args.range) for p in d.aggregate})
                             for d in routes.domains]
                    results[topology] = (counts, spans, routes.prefix_count)
                    rows.append([f"{racks} x {per_rack}", "topologyKey" if topology else "-",
                                 str(max(counts)), str(sum(counts)), str(max(spans))])
                without, with_key = results[None], results[args.range]
                what = f"{racks} racks x {per_rack} nodes"
                report.check(f"{what}: prefixes per rack, most (with topologyKey)",
                             max(with_key[0]), None, 2, unit="")
                report.check(f"{what}: all prefixes, with vs without topologyKey",
                             with_key[2], without[2], 1.0, unit="")
    print_table(f"routes by rack, /{BLOCK} blocks in {POOL}, {args.rounds} block(s) per node, "
                f"claimed interleaved", ["racks x nodes", "pool", "most prefixes / rack",
                                          "all prefixes", f"most /{args.range} spans / rack"],
                rows)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--racks", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--nodes-per-rack", type=int, nargs="+", default=[3, 6])
    parser.add_argument("--rounds", type=int, default=2, help="blocks each node claims")
    parser.add_argument("--range", type=int, default=24,
                        help="topologyBlockSize: the ranges' prefix length (default 24)")
    run_main(measure, parser)


if __name__ == "__main__":
    main()
