"""The daemon on a cluster-sized etcd: start-up time, memory, Allocate latency, what it reads.

Seeds one etcd directly (batched transactions of --per-txn puts, several in
flight) with a big data set under one prefix — by default 5,000 nodes in 5
racks, 20,000 /26 blocks (4 per node, each affine to its node, with its
affinity key) in 5 rack pools (/14 each, selector ``rack == "r"``), 200,000
allocations (10 per block: handles and block allocations consistent with
each other) — and a 10-node data set of the same shape under another prefix.
With ``--topology`` the racks share one pool (10.0.0.0/8, ``topologyKey: rack``,
ranges of /22): the same blocks, in ranges held by their rack's value.
More nodes get more racks (at least 5; a /14 holds 4,096 blocks, less room
for the joining nodes' claims), up to the 64 /14s of 10.0.0.0/8: every block
lies in the pool that selects its node. Both data sets have the same racks.
Values are built with ``topoipam.daemon.core.model`` (Block, Handle, Node, IPPool)
and written with the store's KeySchema and encode: byte for byte what the
daemon writes. The measured node (``node-00007``) has the same blocks
and allocations in both data sets, so the only difference is everything else.

Targets (big data set): start to ready (sd_notify READY=1, then health
SERVING) <= 2 s; VmRSS after ready and after the allocations <= 80 MB;
Allocate p50 <= 1.2 x the same loop's p50 on the 10-node data set (interleaved
rounds of --batch allocations then their releases, the node's own blocks have
room for them). And the daemon must not read other nodes' blocks while its own
have free space: etcd's own counters (Range RPCs, bytes sent to clients) during
start-up and during the Allocate loop must be the same for the big and the
small data set (a read of the big set's blocks would be megabytes).

The two other paths of an allocation, measured the same way (interleaved,
big vs 10-node, etcd's counters around each call): the first Allocate of a
node that joins rack 2 with no blocks (it claims one: <= 1.2x, etcd bytes
<= 2x), and, with maxBlocksPerHost=1, an Allocate of a joined node whose one
block is full (it borrows from another node's block: <= 1.2x, etcd bytes
<= 2x and under 20 KB).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from clients import IpamClient, metric
from common import (
    STATS_HEADERS,
    Daemon,
    Etcd,
    Report,
    Stats,
    Workspace,
    etcd_channel,
    fmt,
    print_table,
    run_main,
    timer,
)

BIG_PREFIX = "/topoipam-bench/scale-big/v1"
SMALL_PREFIX = "/topoipam-bench/scale-small/v1"
RACKS = 5  # at least: more when the nodes' blocks would not fit (racks_for)
MAX_RACKS = 64  # the /14 pools 10.0.0.0/8 holds
BLOCKS_PER_POOL = 1 << (26 - 14)
MEASURED_NODE = 7  # the same rack and blocks in both data sets
JOIN_RACK = 2
TOPOLOGY_RANGE = 22  # --topology: ranges of 16 /26 blocks
NETWORK = "k8s-pod-network"


@dataclass
class DataSet:
    prefix: str
    nodes: int
    blocks_per_node: int
    allocations_per_block: int
    racks: int
    #: One shared pool with topologyKey rack (ranges of /TOPOLOGY_RANGE) instead of a pool
    #: per rack; each rack's blocks in the same place, in ranges its value holds.
    topology: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    value_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def node(self) -> str:
        return node_name(MEASURED_NODE)

    def pools(self) -> list[Any]:
        from topoipam.daemon.core.model import IPPool

        if self.topology:
            return [IPPool("shared", ipaddress.ip_network("10.0.0.0/8"), 26, "all()",
                           topology_key="rack", topology_block_size=TOPOLOGY_RANGE)]
        return [IPPool(f"rack-{r}", ipaddress.ip_network(f"10.{4 * r}.0.0/14"), 26,
                       f'rack == "{r}"') for r in range(self.racks)]

    def base(self, rack: int) -> int:
        """Where rack ``rack``'s blocks start: its pool (a /14 each); with --topology, where
        its value's claims start in the shared pool (its ranges grow from there: see
        topoipam.daemon.core.topology.value_origin)."""
        if not self.topology:
            return int(ipaddress.IPv4Address(f"10.{4 * rack}.0.0"))
        from topoipam.daemon.core.topology import value_origin

        return int(value_origin(self.pools()[0], str(rack)).network_address)

    def check_topology_fits(self) -> None:
        """With --topology, each rack's ranges (consecutive from its base) inside the pool
        and apart from the other racks'; one line and exit 1 if not."""
        spans = []
        for rack in range(self.racks):
            blocks = len(range(rack, self.nodes, self.racks)) * self.blocks_per_node
            first = self.base(rack)
            last = first + blocks * 64 - 1
            if last > int(ipaddress.IPv4Address("10.255.255.255")) or any(
                    first <= b and a <= last for a, b in spans):
                raise SystemExit(f"scale --topology: rack {rack}'s blocks do not fit from its "
                                 "origin; try another --nodes")
            spans.append((first, last))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every key and value of the data set, as the daemon would write them."""
        from topoipam.daemon.core import allocator
        from topoipam.daemon.core.holdings import (
            Block,
            Handle,
            HandleAddress,
            TopologyRange,
        )
        from topoipam.daemon.core.keys import KeySchema
        from topoipam.daemon.core.model import (
            Node,
            encode,
        )

        keys = KeySchema(self.prefix)
        pools = self.pools()

        def emit(kind: str, key: bytes, value: bytes) -> tuple[bytes, bytes]:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.value_bytes[kind] = self.value_bytes.get(kind, 0) + len(key) + len(value)
            return key, value

        for p in pools:
            yield emit("pools", keys.pool(p.name), encode(p.to_dict()))
        # The room index, as pool creation and claims leave it: the claim windows that
        # still have an unclaimed block (the seeded blocks fill each rack pool from
        # its start).
        for rack in range(self.racks):
            per_pool = len(range(rack, self.nodes, self.racks)) * self.blocks_per_node
            if self.topology:  # the rack's ranges, as its claims took them; listed if not full
                p = pools[0]
                per_range = 1 << (p.block_size - TOPOLOGY_RANGE)
                for index in range(-(-per_pool // per_range)):
                    span = ipaddress.IPv4Network((self.base(rack) + index * per_range * 64,
                                                  TOPOLOGY_RANGE))
                    held = encode(TopologyRange(span, p.name, str(rack)).to_dict())
                    yield emit("ranges", keys.topology_range(span), held)
                    if (index + 1) * per_range > per_pool:
                        yield emit("ranges", keys.value_range(p.name, str(rack), span), held)
                continue  # topology claims look in the ranges, not the room index
            p = pools[rack]
            prefix = allocator.window_prefix(p)
            per_window = 1 << (p.block_size - prefix)
            for index, window in enumerate(p.cidr.subnets(new_prefix=prefix)):
                if (index + 1) * per_window > per_pool:
                    yield emit("rooms", keys.room(window), b"{}")
        container = 0
        for i in range(self.nodes):
            name, rack = node_name(i), i % self.racks
            yield emit("nodes", keys.node(name), encode(Node(name, {"rack": str(rack)})
                                                        .to_dict()))
            base = ipaddress.IPv4Address(self.base(rack))
            for k in range(self.blocks_per_node):
                index = (i // self.racks) * self.blocks_per_node + k
                cidr = ipaddress.ip_network(f"{base + 64 * index}/26")
                block = Block.empty(cidr, name)
                for ordinal in range(1, self.allocations_per_block + 1):
                    handle_id = f"{NETWORK}/c{container:07d}/eth0"
                    block.allocations[ordinal] = handle_id
                    block.unallocated.remove(ordinal)
                    handle = Handle(handle_id, name, (HandleAddress(block.address(ordinal),
                                                                    cidr),),
                                    {"network": NETWORK, "container_id": f"c{container:07d}",
                                     "ifname": "eth0", "namespace": "default",
                                     "pod": f"pod-{container}"})
                    yield emit("handles", keys.handle(handle_id), encode(handle.to_dict()))
                    container += 1
                yield emit("blocks", keys.block(cidr), encode(block.to_dict()))
                yield emit("affinities", keys.affinity(name, cidr), b"{}")
                # Every seeded block has room: its free-block index entry, as the
                # daemon writes it in the claim's transaction.
                yield emit("free", keys.free_block(cidr), encode({"node": name}))


def node_name(index: int) -> str:
    return f"node-{index:05d}"


def racks_for(nodes: int, blocks_per_node: int, spare: int) -> int:
    """The fewest racks (at least RACKS) whose /14 pools hold every node's blocks and
    ``spare`` more (the joining nodes' claims); one line and exit 1 if none do."""
    if nodes <= MEASURED_NODE or blocks_per_node < 1:
        raise SystemExit(f"scale: --nodes must be more than {MEASURED_NODE} and "
                         "--blocks-per-node at least 1")
    for racks in range(RACKS, MAX_RACKS + 1):
        if -(-nodes // racks) * blocks_per_node + spare <= BLOCKS_PER_POOL:
            return racks
    most = MAX_RACKS * ((BLOCKS_PER_POOL - spare) // blocks_per_node)
    raise SystemExit(f"scale: --nodes {nodes} with --blocks-per-node {blocks_per_node} does "
                     f"not fit {MAX_RACKS} racks of /14 pools (10.0.0.0/8): at most {most} "
                     "nodes")


async def seed(endpoint: str, items: Iterator[tuple[bytes, bytes]], per_txn: int,
               in_flight: int) -> int:
    """Write every item with transactions of ``per_txn`` puts, ``in_flight`` at a time."""
    from aetcd import rpc

    channel = etcd_channel(endpoint)
    kv = rpc.KVStub(channel)
    pending: set[asyncio.Future[Any]] = set()
    written = 0

    async def put(batch: list[tuple[bytes, bytes]]) -> None:
        await kv.Txn(rpc.TxnRequest(success=[
            rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v)) for k, v in batch]),
            timeout=60)

    try:
        batch: list[tuple[bytes, bytes]] = []
        for item in items:
            batch.append(item)
            if len(batch) == per_txn:
                if len(pending) >= in_flight:
                    done, pending = await asyncio.wait(pending,
                                                       return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
                pending.add(asyncio.create_task(put(batch)))
                written += len(batch)
                batch = []
        if batch:
            pending.add(asyncio.create_task(put(batch)))
            written += len(batch)
        for task in asyncio.as_completed(pending):
            await task
    finally:
        await channel.close()
    return written


@dataclass
class EtcdTraffic:
    """What etcd served in a window: Range RPCs, Txn RPCs, bytes sent to all clients."""

    ranges: float
    txns: float
    sent: float

    @classmethod
    def now(cls, etcd: Etcd) -> EtcdTraffic:
        values = etcd.metrics()
        return cls(metric(values, "grpc_server_handled_total", grpc_method="Range"),
                   metric(values, "grpc_server_handled_total", grpc_method="Txn"),
                   metric(values, "etcd_network_client_grpc_sent_bytes_total"))

    def __sub__(self, other: EtcdTraffic) -> EtcdTraffic:
        return EtcdTraffic(self.ranges - other.ranges, self.txns - other.txns,
                           self.sent - other.sent)

    def __add__(self, other: EtcdTraffic) -> EtcdTraffic:
        return EtcdTraffic(self.ranges + other.ranges, self.txns + other.txns,
                           self.sent + other.sent)


def start_daemon(ws: Workspace, data: DataSet) -> tuple[Daemon, EtcdTraffic]:
    before = EtcdTraffic.now(ws.etcd)
    daemon = ws.daemon(data.node, data.prefix)
    return daemon, EtcdTraffic.now(ws.etcd) - before


async def allocate_round(client: IpamClient, tag: str, batch: int) -> list[int]:
    """``batch`` sequential Allocates (timed), then their Releases (untimed)."""
    containers = [f"{tag}-{i:04d}" for i in range(batch)]
    latencies = []
    for container in containers:
        elapsed, reply = await client.timed_allocate(container)
        if len(reply.addresses) != 1:
            raise RuntimeError(f"Allocate {container} returned {reply}")
        latencies.append(elapsed)
    for container in containers:
        await client.release(container)
    return latencies


async def measure(args: argparse.Namespace) -> Report:
    report = Report("scale")
    racks = racks_for(args.nodes, args.blocks_per_node, args.joins)
    big = DataSet(BIG_PREFIX, args.nodes, args.blocks_per_node, args.allocations_per_block,
                  racks, args.topology)
    small = DataSet(SMALL_PREFIX, 10, args.blocks_per_node, args.allocations_per_block, racks,
                    args.topology)
    for data in (big, small):
        if data.topology:
            data.check_topology_fits()
    with Workspace("scale") as ws:
        etcd = ws.etcd
        seeded = {}
        for data in (big, small):
            with timer() as elapsed:
                written = await seed(etcd.endpoint, data.items(), args.per_txn, args.in_flight)
            seeded[data.prefix] = (written, elapsed())
        print_table("seeded data sets (written straight to etcd)",
                    ["data set", "nodes", "blocks", "affinities", "handles", "keys", "MB",
                     "seconds"],
                    [[name, str(d.counts["nodes"]), str(d.counts["blocks"]),
                      str(d.counts["affinities"]), str(d.counts["handles"]),
                      str(seeded[d.prefix][0]), f"{sum(d.value_bytes.values()) / 1e6:.1f}",
                      f"{seeded[d.prefix][1]:.1f}"] for name, d in (("big", big),
                                                                    ("small", small))])

        # Start-up: several starts of each, alternating, with etcd's counters around each.
        starts: dict[str, list[Daemon]] = {"big": [], "small": []}
        start_traffic: dict[str, list[EtcdTraffic]] = {"big": [], "small": []}
        for attempt in range(args.starts):
            for name, data in (("big", big), ("small", small)):
                daemon, traffic = start_daemon(ws, data)
                starts[name].append(daemon)
                start_traffic[name].append(traffic)
                if attempt < args.starts - 1:
                    daemon.stop()
        daemons = {name: starts[name][-1] for name in starts}
        rss_ready = {name: d.rss_mib() for name, d in daemons.items()}

        clients = {name: IpamClient(d.socket) for name, d in daemons.items()}
        try:
            for name, client in clients.items():  # warm-up
                await allocate_round(client, f"warm-{name}", args.batch)
            latencies: dict[str, list[int]] = {"big": [], "small": []}
            loop_traffic = {"big": EtcdTraffic(0, 0, 0), "small": EtcdTraffic(0, 0, 0)}
            for r in range(args.rounds):
                order = ("big", "small") if r % 2 == 0 else ("small", "big")
                for name in order:
                    before = EtcdTraffic.now(etcd)
                    latencies[name] += await allocate_round(clients[name], f"r{r}-{name}",
                                                            args.batch)
                    loop_traffic[name] = loop_traffic[name] + (EtcdTraffic.now(etcd) - before)
        finally:
            for client in clients.values():
                await client.close()
        rss_after = {name: d.rss_mib() for name, d in daemons.items()}
        for daemon in daemons.values():
            daemon.stop()
        joins = await measure_joins(ws, {"big": big, "small": small}, args.joins)

    rows = []
    for name in ("big", "small"):
        ready = [d.ready_seconds for d in starts[name]]
        serving = [d.serving_seconds for d in starts[name]]
        rows.append([name, " ".join(f"{s:.3f}" for s in ready),
                     " ".join(f"{s:.3f}" for s in serving), f"{statistics.median(serving):.3f}"])
    print_table("start to ready, seconds (each start: READY=1 / first health SERVING)",
                ["data set", "READY=1", "SERVING", "median SERVING"], rows)
    stats = {name: Stats.of_ns(values) for name, values in latencies.items()}
    print_table(f"Allocate latency, node {big.node} ({args.rounds} interleaved rounds of "
                f"{args.batch})", STATS_HEADERS,
                [stats["big"].row("big data set"), stats["small"].row("10-node data set")])
    print_table("daemon memory (VmRSS, MiB)", ["data set", "after ready", "after allocations"],
                [[n, f"{rss_ready[n]:.1f}", f"{rss_after[n]:.1f}"] for n in ("big", "small")])
    calls = args.rounds * args.batch * 2  # allocations + releases
    traffic_rows = []
    for name in ("big", "small"):
        s = start_traffic[name][-1]
        lt = loop_traffic[name]
        traffic_rows.append([name, f"{s.ranges:.0f}", f"{s.sent / 1024:.1f}",
                             f"{lt.ranges / calls:.3f}", f"{lt.txns / calls:.3f}",
                             f"{lt.sent / calls:.0f}"])
    print_table("what etcd served the daemon (etcd's grpc_server_handled_total and "
                "etcd_network_client_grpc_sent_bytes_total)",
                ["data set", "start: Range RPCs", "start: KiB sent", "loop: Ranges/call",
                 "loop: Txns/call", "loop: bytes sent/call"], traffic_rows)
    other_blocks_mb = big.value_bytes["blocks"] / 1e6
    print(f"\nfor scale: the big data set's blocks alone are {other_blocks_mb:.1f} MB, its "
          f"handles {big.value_bytes['handles'] / 1e6:.1f} MB")

    median_ready = statistics.median(d.serving_seconds for d in starts["big"])
    report.check("start to ready (health SERVING), big, median", median_ready, None, 2.0,
                 unit="s")
    report.check("VmRSS after ready, big", rss_ready["big"], None, 80.0, unit="MiB")
    report.check("VmRSS after allocations, big", rss_after["big"], None, 80.0, unit="MiB")
    report.check("Allocate p50 big vs 10-node", stats["big"].p50, stats["small"].p50, 1.2)
    # Reads that do not depend on the data set's size: same counts, same bytes.
    big_start, small_start = start_traffic["big"][-1], start_traffic["small"][-1]
    report.check("start-up bytes from etcd, big vs 10-node", big_start.sent,
                 small_start.sent, 1.2, unit="B")
    report.check("start-up Range RPCs, big vs 10-node", big_start.ranges,
                 small_start.ranges, 1.0, unit="")
    report.check("Allocate loop bytes from etcd, big vs 10-node",
                 loop_traffic["big"].sent, loop_traffic["small"].sent, 1.2, unit="B")
    report.check("Allocate loop Range RPCs (big)", loop_traffic["big"].ranges,
                 None, loop_traffic["small"].ranges, unit="")
    for path, (timings, traffic) in joins.items():
        join_stats = {name: Stats.of_ns(values) for name, values in timings.items()}
        print_table(f"{path}: Allocate latency and etcd bytes sent per call "
                    f"({len(timings['big'])} joining nodes per data set)", [
                        *STATS_HEADERS, "bytes/call"],
                    [[*join_stats[name].row(f"{name} data set"),
                      f"{statistics.median(traffic[name]):.0f}"] for name in ("big", "small")])
        report.check(f"{path} Allocate p50, big vs 10-node", join_stats["big"].p50,
                     join_stats["small"].p50, 1.2)
        big_bytes, small_bytes = (statistics.median(traffic[n]) for n in ("big", "small"))
        report.check(f"{path}: etcd bytes per call, big vs 10-node", big_bytes, small_bytes,
                     2.0, unit="B")
        if path == "borrow":
            report.check("borrow: etcd bytes per call, big", big_bytes, None, 20_000, unit="B")
    report.notes.append(f"big data set: {fmt(seeded[BIG_PREFIX][1])} s to seed "
                        f"{seeded[BIG_PREFIX][0]} keys")
    return report


async def measure_joins(ws: Workspace, data: dict[str, DataSet], count: int
                        ) -> dict[str, tuple[dict[str, list[int]], dict[str, list[float]]]]:
    """First Allocate of joining nodes (a claim), then, with maxBlocksPerHost=1 and the
    joiner's one block full, an Allocate that must borrow: latency and etcd bytes."""
    from topoipam.daemon.core.model import IPAMConfig

    results: dict[str, tuple[dict[str, list[int]], dict[str, list[float]]]] = {
        path: ({"big": [], "small": []}, {"big": [], "small": []})
        for path in ("claim", "borrow")}
    for d in data.values():
        await ws.seed(d.prefix, [IPAMConfig(max_blocks_per_host=1)])
    for r in range(count):
        for name in (("big", "small") if r % 2 == 0 else ("small", "big")):
            node = f"joiner-{r:02d}"
            daemon = ws.daemon(node, data[name].prefix, labels={"rack": str(JOIN_RACK)})
            client = IpamClient(daemon.socket)
            try:
                for path in ("claim", "borrow"):
                    if path == "borrow":  # fill the one block the claim gave the joiner
                        for i in range(63):
                            await client.allocate(f"{node}-fill-{i}")
                    before = EtcdTraffic.now(ws.etcd)
                    elapsed, reply = await client.timed_allocate(f"{node}-{path}")
                    traffic = EtcdTraffic.now(ws.etcd) - before
                    if len(reply.addresses) != 1:
                        raise RuntimeError(f"{path} Allocate of {node} returned {reply}")
                    results[path][0][name].append(elapsed)
                    results[path][1][name].append(traffic.sent)
            finally:
                await client.close()
                daemon.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--blocks-per-node", type=int, default=4)
    parser.add_argument("--allocations-per-block", type=int, default=10)
    parser.add_argument("--per-txn", type=int, default=100, help="puts per seeding transaction")
    parser.add_argument("--in-flight", type=int, default=8, help="seeding transactions at once")
    parser.add_argument("--starts", type=int, default=3, help="daemon starts per data set")
    parser.add_argument("--rounds", type=int, default=10,
                        help="interleaved Allocate rounds per data set (default 10)")
    parser.add_argument("--batch", type=int, default=100,
                        help="allocations per round, then released (default 100)")
    parser.add_argument("--joins", type=int, default=10,
                        help="joining nodes per data set for the claim and borrow paths")
    parser.add_argument("--topology", action="store_true",
                        help="one shared pool with topologyKey rack (ranges of /22) instead of "
                        "a pool per rack")
    run_main(measure, parser)


if __name__ == "__main__":
    main()
