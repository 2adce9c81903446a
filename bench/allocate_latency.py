"""Sequential Allocate / Release latency over the daemon's gRPC unix socket, against floors.

Floor = p50 of one raw etcd transaction (aetcd's generated KV stub on a grpc.aio
channel: compare mod_revision, put a block-sized value, get in the failure
branch — what the daemon's commit does) + p50 of an empty unary grpc.aio call
to a generic-handler server in *another process* on a unix socket (the daemon
is another process too). Client style everywhere: grpc.aio, one channel.

Targets: Allocate and Release p50 <= 1.5 x floor, p99 <= 3 x floor.

References (information, not targets): the same Allocate loop against a
minimal grpc.aio Ipam server whose handler does nothing but one raw etcd
transaction — what any Python grpc.aio daemon costs before doing any work of
its own (two gRPC stacks and a poller thread in one process); and the same
daemon's Allocate / Release over its framed-JSON CNI socket, one connection per
call as the ``topoipam`` plugin makes them (the path a pod's address takes).
Measurements are interleaved in chunks (daemon calls, etcd floor, gRPC floor,
...) so machine noise hits all of them alike. Every allocation uses a distinct
container id in a 10.0.0.0/16 pool; then the same attachments are released one
by one.
"""

from __future__ import annotations

import argparse

from clients import CniSocketClient, IpamClient, metric
from common import (
    STATS_HEADERS,
    EchoFloor,
    EtcdTxnFloor,
    Report,
    Stats,
    Workspace,
    block_value,
    chunks,
    pool,
    print_table,
    py_spy,
    run_main,
    sample,
)

PREFIX = "/topoipam-bench/latency/v1"


async def measure(args: argparse.Namespace) -> Report:
    report = Report("allocate_latency")
    with Workspace("latency") as ws:
        await ws.seed(PREFIX, [pool("bench-pool", "10.0.0.0/16")])
        daemon = ws.daemon("node-0", PREFIX, metrics=True)
        echo_server = ws.echo_server()
        minimal_server = ws.minimal_server()

        client = IpamClient(daemon.socket)
        cni = CniSocketClient(daemon.socket)
        minimal = IpamClient(minimal_server.socket)
        etcd_floor = EtcdTxnFloor(ws.etcd.endpoint, b"/topoipam-bench/floor/block",
                                  block_value("10.255.0.0/26"))
        echo_floor = EchoFloor(echo_server.socket)
        await etcd_floor.setup()
        try:
            # Warm-up: channels connected, daemon cache and first blocks claimed, code paths hot.
            for i in range(args.warmup):
                await client.allocate(f"warm-{i}")
            for i in range(args.warmup):
                await client.release(f"warm-{i}")
            await sample(etcd_floor.once, args.warmup)
            await sample(echo_floor.once, args.warmup)
            for i in range(args.warmup):
                await minimal.allocate(f"warm-{i}")
                await cni.allocate(f"warm-{i}")
                await cni.release(f"warm-{i}")
            before = daemon.metrics()

            alloc_ns: list[int] = []
            release_ns: list[int] = []
            etcd_ns: list[int] = []
            echo_ns: list[int] = []
            minimal_ns: list[int] = []
            cni_alloc_ns: list[int] = []
            cni_release_ns: list[int] = []
            addresses: set[str] = set()
            containers = [f"c-{i:06d}" for i in range(args.samples)]
            parts = chunks(args.samples, args.chunks)
            floor_parts = chunks(args.floor_samples, 2 * len(parts))
            with py_spy(daemon.pid if args.profile else None, args.profile or ""):
                start = 0
                for i, size in enumerate(parts):
                    for container in containers[start:start + size]:
                        elapsed, reply = await client.timed_allocate(container)
                        alloc_ns.append(elapsed)
                        addresses.update(a.ip for a in reply.addresses)
                    start += size
                    etcd_ns += await sample(etcd_floor.once, floor_parts[i])
                    echo_ns += await sample(echo_floor.once, floor_parts[i])
                    for j in range(floor_parts[i]):
                        minimal_ns.append((await minimal.timed_allocate(f"m{i}-{j}"))[0])
                    for j in range(floor_parts[i]):
                        cni_alloc_ns.append(await cni.timed_allocate(f"cni-{i}-{j}"))
                if len(addresses) != args.samples:
                    raise RuntimeError(
                        f"{args.samples} allocations gave {len(addresses)} addresses")
                start = 0
                for i, size in enumerate(parts):
                    for container in containers[start:start + size]:
                        release_ns.append(await client.timed_release(container))
                    start += size
                    etcd_ns += await sample(etcd_floor.once, floor_parts[len(parts) + i])
                    echo_ns += await sample(echo_floor.once, floor_parts[len(parts) + i])
                    for j in range(floor_parts[i]):
                        cni_release_ns.append(await cni.timed_release(f"cni-{i}-{j}"))
            after = daemon.metrics()
        finally:
            await client.close()
            await minimal.close()
            await etcd_floor.close()
            await echo_floor.close()

    alloc, release = Stats.of_ns(alloc_ns), Stats.of_ns(release_ns)
    etcd, echo = Stats.of_ns(etcd_ns), Stats.of_ns(echo_ns)
    minimal_stats = Stats.of_ns(minimal_ns)
    cni_alloc, cni_release = Stats.of_ns(cni_alloc_ns), Stats.of_ns(cni_release_ns)
    floor = etcd.p50 + echo.p50
    print_table("latency (sequential, grpc.aio client, unix socket)", STATS_HEADERS, [
        alloc.row("Allocate (daemon)"), release.row("Release (daemon)"),
        etcd.row("floor: raw etcd txn"), echo.row("floor: empty gRPC call"),
        minimal_stats.row("ref: minimal server, 1 txn/call"),
        cni_alloc.row("ref: Allocate, CNI socket"), cni_release.row("ref: Release, CNI socket"),
    ])

    # Where the daemon's time goes: its own handler histogram (server side, excludes
    # the transport), from the Prometheus endpoint. The histogram has no transport
    # label, so its mean covers the gRPC and the CNI-socket calls alike (same handler).
    rows = []
    for method, client_stats in (("Allocate", alloc), ("Release", release)):
        count = (metric(after, "topoipam_request_duration_seconds_count", method=method)
                 - metric(before, "topoipam_request_duration_seconds_count", method=method))
        total = (metric(after, "topoipam_request_duration_seconds_sum", method=method)
                 - metric(before, "topoipam_request_duration_seconds_sum", method=method))
        handler_ms = 1000 * total / count if count else float("nan")
        rows.append([method, f"{int(count)}", f"{client_stats.mean:.3f}", f"{handler_ms:.3f}",
                     f"{client_stats.mean - handler_ms:.3f}"])
    print_table("daemon handler time (from topoipam_request_duration_seconds)",
                ["method", "calls", "client mean ms", "handler mean ms", "transport+grpc ms"],
                rows)
    print(f"\nfloor = etcd txn p50 {etcd.p50:.3f} ms + empty gRPC p50 {echo.p50:.3f} ms "
          f"= {floor:.3f} ms")

    report.check("Allocate p50", alloc.p50, floor, 1.5)
    report.check("Allocate p99", alloc.p99, floor, 3.0)
    report.check("Release p50", release.p50, floor, 1.5)
    report.check("Release p99", release.p99, floor, 3.0)
    report.check("reference: minimal server p50", minimal_stats.p50, floor, 1.5, gate=False)
    report.check("reference: minimal server p99", minimal_stats.p99, floor, 3.0, gate=False)
    report.check("reference: etcd txn p99 (floor's own tail)", etcd.p99, floor, 3.0,
                 gate=False)
    for name, stats in (("Allocate", cni_alloc), ("Release", cni_release)):
        report.check(f"info: {name} p50 over the CNI socket", stats.p50, floor, 1.5, gate=False)
        report.check(f"info: {name} p99 over the CNI socket", stats.p99, floor, 3.0, gate=False)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000,
                        help="allocations (and releases) measured (default 2000)")
    parser.add_argument("--floor-samples", type=int, default=2000,
                        help="samples of each floor (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up calls (default 200)")
    parser.add_argument("--chunks", type=int, default=10,
                        help="interleaving chunks per phase (default 10)")
    run_main(measure, parser, profile_during="the measurement")


if __name__ == "__main__":
    main()
