"""Time from a label or pool change in etcd to the first allocation that follows the new rule.

Two rack pools, ``rack-0`` 10.0.0.0/16 (``rack == "0"``) and ``rack-1``
10.1.0.0/16 (``rack == "1"``), one daemon on node ``node-0``.

* label changes: relabel the node rack=0 <-> rack=1;
* pool changes: swap the two pools' node selectors (both pools in one
  transaction), the node's labels unchanged.

Each change is written with the project's EtcdStore (what topoipamctl uses);
t0 is when etcd acknowledged the write (commit time; the time from sending
it is printed too). Right after, the benchmark polls Allocate (each attempt
then Released) until an address comes from the pool that now selects the
node; the latency is t(first such reply) - t0.

Target: p50 <= 100 ms for each kind of change.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from typing import Any

from clients import IpamClient
from common import (
    STATS_HEADERS,
    Report,
    Stats,
    Workspace,
    ns,
    open_store,
    percentile,
    pool,
    print_table,
    put_objects,
    run_main,
)

PREFIX = "/topoipam-bench/policy/v1"
NODE = "node-0"


@dataclass
class Change:
    kind: str
    from_ack_ns: int  # the timeout when the change was never followed
    from_send_ns: int
    polls: int
    followed: bool
    revision: int


def pools(swapped: bool) -> list[Any]:
    a, b = ('rack == "1"', 'rack == "0"') if swapped else ('rack == "0"', 'rack == "1"')
    return [pool("rack-0", "10.0.0.0/16", a), pool("rack-1", "10.1.0.0/16", b)]


def node(rack: int) -> Any:
    from topoipam.daemon.core.model import Node

    return Node(NODE, {"rack": str(rack)})


async def follow(client: IpamClient, store: Any, writes: list[Any], want_pool: str, tag: str,
                 timeout: float) -> Change:
    """Write the change, then Allocate/Release until an address comes from ``want_pool``.

    Gives up after ``timeout`` seconds (docs/design.md#changes-of-pools-and-labels:
    "within a second"); such a change counts as missed, with the timeout as its
    latency.
    """
    from topoipam.daemon.core.writes import PutObject

    sent = ns()
    result = await store.commit([PutObject(obj) for obj in writes])
    acked = ns()
    if not result.succeeded:
        raise RuntimeError(f"change {tag} was not committed")
    polls = 0
    deadline = acked + int(timeout * 1e9)
    while ns() < deadline:
        polls += 1
        container = f"{tag}-{polls}"
        reply = await client.allocate(container)
        done = ns()
        await client.release(container)
        if reply.addresses and reply.addresses[0].pool == want_pool:
            return Change(tag.split("-")[0], done - acked, done - sent, polls, True,
                          result.revision)
    print(f"  MISSED: {tag} (etcd revision {result.revision}): after {polls} Allocates in "
          f"{timeout}s the daemon still allocates from "
          f"{reply.addresses[0].pool if reply.addresses else '?'}, not {want_pool}")
    status = await client.stub.Status(client.pb.StatusRequest(), timeout=10)
    print(f"          daemon Status: in_sync={status.in_sync} labels={dict(status.labels)} "
          + "; ".join(f"{p.name}: {p.reason}" for p in status.pools))
    return Change(tag.split("-")[0], deadline - acked, deadline - sent, polls, False,
                  result.revision)


async def measure(args: argparse.Namespace) -> Report:
    report = Report("policy_change")
    changes: list[Change] = []
    with Workspace("policy") as ws:
        store = await open_store(ws.etcd.endpoint, PREFIX)
        await put_objects(store, [*pools(False), node(0)])
        daemon = ws.daemon(NODE, PREFIX)
        client = IpamClient(daemon.socket)
        try:
            for i in range(args.warmup):  # both pools' blocks claimed, paths warm
                await client.allocate(f"warm-{i}")
                await client.release(f"warm-{i}")
            rack, swapped = 0, False
            for i in range(max(args.label_changes, args.pool_changes)):
                if i < args.label_changes:
                    rack = 1 - rack
                    want = f"rack-{rack ^ int(swapped)}"
                    changes.append(await follow(client, store, [node(rack)], want,
                                                f"label-{i}", args.timeout))
                if i < args.pool_changes:
                    swapped = not swapped
                    want = f"rack-{rack ^ int(swapped)}"
                    changes.append(await follow(client, store, pools(swapped), want,
                                                f"pool-{i}", args.timeout))
                await asyncio.sleep(args.pause)
        finally:
            await client.close()
            await store.close()

    rows = []
    for kind in ("label", "pool"):
        chosen = [c for c in changes if c.kind == kind]
        if not chosen:
            continue
        rows.append(Stats.of_ns([c.from_ack_ns for c in chosen]).row(f"{kind}: from etcd ack"))
        rows.append(Stats.of_ns([c.from_send_ns for c in chosen]).row(f"{kind}: from send"))
        polls = [c.polls for c in chosen]
        rows.append([f"{kind}: Allocate polls needed", str(len(polls)),
                     *(f"{percentile(polls, q):.0f}" for q in (50, 90, 99)), str(max(polls)),
                     f"{sum(polls) / len(polls):.2f}"])
    print_table("change -> first allocation under the new rule", STATS_HEADERS, rows)
    for kind in ("label", "pool"):
        chosen = [c for c in changes if c.kind == kind]
        if chosen:
            report.check(f"{kind} change p50 (misses count as {args.timeout:g} s)",
                         Stats.of_ns([c.from_ack_ns for c in chosen]).p50, None, args.limit_ms)
            report.check(f"{kind} changes never followed within {args.timeout:g} s",
                         float(sum(not c.followed for c in chosen)), None, 0.0,
                         unit=f"of {len(chosen)}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label-changes", type=int, default=30)
    parser.add_argument("--pool-changes", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--pause", type=float, default=0.05,
                        help="seconds between changes (default 0.05)")
    parser.add_argument("--timeout", type=float, default=2.0,
                        help="a change not followed after this many seconds is missed")
    parser.add_argument("--limit-ms", type=float, default=100.0, help="target p50 (ms)")
    run_main(measure, parser)


if __name__ == "__main__":
    main()
