"""What the node-local record of allocations costs a pod: Allocate p50 with it and without.

The daemon keeps a record of its live allocations in ``--state-dir`` so that
it can re-assert them should etcd be restored from an older snapshot
(docs/design.md#etcd-restored-from-a-backup-the-nodes-record). It is written
off the pod's path (a commit only appends to a list; a worker thread writes
and fdatasyncs a few milliseconds later). This measures
that: two daemons on one etcd, one with ``--record-allocations false``,
interleaved chunks of sequential Allocate then Release over the plugin's CNI
socket (the path pods take). Target: Allocate p50 with the record <= 1.05 x
without.
"""

from __future__ import annotations

import argparse

from clients import CniSocketClient
from common import STATS_HEADERS, Report, Stats, Workspace, pool, print_table, run_main

PREFIX = "/topoipam-bench/record-cost/v1"


async def measure(args: argparse.Namespace) -> Report:
    report = Report("record_cost")
    with Workspace("record-cost") as ws:
        await ws.seed(PREFIX, [pool("bench-pool", "10.0.0.0/16")])
        daemons = {"with record": ws.daemon("node-rec", PREFIX),
                   "without record": ws.daemon("node-norec", PREFIX,
                                               extra=["--record-allocations", "false"])}
        clients = {name: CniSocketClient(d.socket, network=f"rec-{i}")
                   for i, (name, d) in enumerate(daemons.items())}
        latencies: dict[str, list[int]] = {name: [] for name in daemons}
        for chunk in range(args.warmup + args.chunks):
            order = list(clients) if chunk % 2 == 0 else list(reversed(clients))
            for name in order:
                client = clients[name]
                containers = [f"c{chunk}-{i}" for i in range(args.batch)]
                timings = [await client.timed_allocate(c) for c in containers]
                for container in containers:
                    await client.release(container)
                if chunk >= args.warmup:
                    latencies[name] += timings
    stats = {name: Stats.of_ns(values) for name, values in latencies.items()}
    print_table(f"Allocate over the CNI socket ({args.chunks} interleaved chunks of "
                f"{args.batch})", STATS_HEADERS, [stats[n].row(n) for n in stats])
    report.check("Allocate p50 with the record vs without", stats["with record"].p50,
                 stats["without record"].p50, 1.05)
    report.check("info: Allocate p99 with the record vs without", stats["with record"].p99,
                 stats["without record"].p99, float("inf"), gate=False)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20, help="measured chunks per daemon")
    parser.add_argument("--batch", type=int, default=50, help="Allocates per chunk")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up chunks")
    run_main(measure, parser)


if __name__ == "__main__":
    main()
