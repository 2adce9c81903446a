"""A storm of concurrent Allocate, then Release, calls against a sequential CAS baseline.

Storm: N (default 256) concurrent Allocate calls (distinct attachments) on one
daemon through grpc.aio (one channel by default), then N concurrent Release
calls of the same attachments. Throughput = N / wall time of the phase.

Baseline, against the same etcd (another prefix): one compare-and-swap
transaction per address, in sequence, the way Calico commits each address —
read-modify-write of one JSON block value (decode, take the first free
ordinal, encode) in a transaction that compares the block's mod_revision and
puts the block and the handle (release: puts the block, deletes the handle).
The baseline never re-reads: the new mod_revision comes back in the put's
header, so it pays exactly one etcd round trip per address.

Target: the Allocate storm over the daemon's CNI socket (the framed-JSON path
every pod's plugin takes) >= 4 x baseline throughput, and zero errors. The
same storms over gRPC, and the Release storm over the CNI socket, are
information.
Rounds alternate baseline and storm phases; medians over rounds are reported,
with the p99 latency of the storm calls, the etcd transactions each phase took
(how well group commit batched) and the CPU each process used per call.

References, information only: the same storm of *empty* grpc.aio calls to an
echo server in another process (the ceiling of grpc.aio on this machine with
this client).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
from dataclasses import dataclass
from typing import Any

from clients import CniSocketClient, IpamClient, metric
from common import (
    STATS_HEADERS,
    Daemon,
    EchoFloor,
    Etcd,
    EtcdTxnFloor,
    Report,
    Stats,
    Workspace,
    cpu_seconds,
    etcd_channel,
    fmt,
    ns,
    pool,
    print_table,
    py_spy,
    run_main,
)

PREFIX = "/topoipam-bench/storm/v1"
BASELINE_PREFIX = "/topoipam-bench/storm-baseline/v1"


class CasBaseline:
    """Calico-style sequential commits: one block CAS transaction per address."""

    def __init__(self, endpoint: str, blocks: int) -> None:
        from aetcd import rpc

        from topoipam.daemon.core.holdings import Block
        from topoipam.daemon.core.keys import KeySchema
        from topoipam.daemon.core.model import encode

        self.rpc = rpc
        self.channel = etcd_channel(endpoint)
        self.kv = rpc.KVStub(self.channel)
        self.keys = KeySchema(BASELINE_PREFIX)
        self.encode = encode
        network = ipaddress.IPv4Network("10.128.0.0/16")
        cidrs = list(network.subnets(new_prefix=26))[:blocks]
        # key -> [value bytes, mod_revision]
        self.blocks: dict[bytes, list[Any]] = {
            self.keys.block(c): [encode(Block.empty(c, "baseline").to_dict()), 0] for c in cidrs
        }
        self.held: dict[str, tuple[bytes, int]] = {}  # handle -> (block key, ordinal)

    async def setup(self) -> None:
        for key, entry in self.blocks.items():
            reply = await self.kv.Put(self.rpc.PutRequest(key=key, value=entry[0]))
            entry[1] = int(reply.header.revision)

    async def _cas(self, key: bytes, block: dict[str, Any], handle_op: Any) -> None:
        rpc = self.rpc
        entry = self.blocks[key]
        value = self.encode(block)
        reply = await self.kv.Txn(rpc.TxnRequest(
            compare=[rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                                 mod_revision=entry[1])],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value)), handle_op],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
        ))
        if not reply.succeeded:
            raise RuntimeError("baseline lost a compare: is something else writing?")
        entry[0], entry[1] = value, int(reply.responses[0].response_put.header.revision)

    async def allocate(self, handle_id: str) -> None:
        for key, entry in self.blocks.items():
            block = json.loads(entry[0])
            if not block["unallocated"]:
                continue
            ordinal = block["unallocated"].pop(0)
            block["allocations"][str(ordinal)] = handle_id
            handle = {"node": "baseline", "addresses": [
                {"ip": str(ipaddress.ip_network(block["cidr"]).network_address + ordinal),
                 "block": block["cidr"]}], "attributes": {}}
            await self._cas(key, block, self.rpc.RequestOp(request_put=self.rpc.PutRequest(
                key=self.keys.handle(handle_id), value=self.encode(handle))))
            self.held[handle_id] = (key, ordinal)
            return
        raise RuntimeError("baseline blocks are full")

    async def release(self, handle_id: str) -> None:
        key, ordinal = self.held.pop(handle_id)
        block = json.loads(self.blocks[key][0])
        del block["allocations"][str(ordinal)]
        block["unallocated"].append(ordinal)
        await self._cas(key, block, self.rpc.RequestOp(
            request_delete_range=self.rpc.DeleteRangeRequest(key=self.keys.handle(handle_id))))

    async def close(self) -> None:
        await self.channel.close()


async def storm_phase(clients: list[IpamClient] | list[CniSocketClient], containers: list[str],
                      release: bool) -> tuple[float, list[int], list[str], set[str]]:
    """Fire every call at once; returns (wall seconds, latencies, errors, addresses)."""

    async def one(index: int, container: str) -> tuple[int, Any]:
        client = clients[index % len(clients)]
        started = ns()
        if release:
            reply = await client.release(container)
        else:
            reply = await client.allocate(container)
        return ns() - started, reply

    def ips(reply: Any) -> list[str]:
        if isinstance(reply, dict):  # CNI socket: proto3 JSON
            return [a["ip"] for a in reply.get("addresses", [])]
        return [a.ip for a in reply.addresses]

    started = ns()
    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(containers)),
                                   return_exceptions=True)
    wall = (ns() - started) / 1e9
    latencies, errors, addresses = [], [], set()
    for result in results:
        if isinstance(result, BaseException):
            errors.append(f"{type(result).__name__}: {result}")
            continue
        latencies.append(result[0])
        if not release:
            addresses.update(ips(result[1]))
    return wall, latencies, errors, addresses


async def baseline_phase(baseline: CasBaseline, handles: list[str], release: bool) -> float:
    started = ns()
    for handle in handles:
        if release:
            await baseline.release(handle)
        else:
            await baseline.allocate(handle)
    return (ns() - started) / 1e9


@dataclass
class Phase:
    """One storm phase and the baseline phase it is compared with."""

    wall: float
    baseline_wall: float
    latencies: list[int]
    errors: list[str]
    txns: int
    conflicts: int
    cpu: dict[str, float]  # CPU seconds used during the storm phase: client, daemon, etcd

    def cells(self, n: int) -> list[str]:
        return [f"{n / self.wall:,.0f}", f"{n / self.baseline_wall:,.0f}",
                f"{self.baseline_wall / self.wall:.2f}x", fmt(Stats.of_ns(self.latencies).p99),
                f"{self.txns}/{self.conflicts}"]


async def one_round(ws: Workspace, daemon: Daemon,
                    clients: list[IpamClient] | list[CniSocketClient],
                    baseline: CasBaseline, tag: str, n: int) -> tuple[Phase, Phase]:
    """Baseline allocations, storm of Allocate, baseline releases, storm of Release."""
    containers = [f"{tag}-{i:04d}" for i in range(n)]
    phases = []
    for release in (False, True):
        baseline_wall = await baseline_phase(baseline, containers, release)
        txns, conflicts = _etcd_txns(ws.etcd), _conflicts(daemon)
        cpu = _cpu(daemon, ws.etcd)
        wall, latencies, errors, addresses = await storm_phase(clients, containers, release)
        cpu = {k: v - cpu[k] for k, v in _cpu(daemon, ws.etcd).items()}
        txns, conflicts = _etcd_txns(ws.etcd) - txns, _conflicts(daemon) - conflicts
        if not release and len(addresses) != n - len(errors):
            errors.append(f"{n - len(errors)} allocations gave {len(addresses)} addresses")
        phases.append(Phase(wall, baseline_wall, latencies, errors, txns, conflicts, cpu))
    return phases[0], phases[1]


async def measure(args: argparse.Namespace) -> Report:
    report = Report("storm")
    n = args.calls
    rounds: list[tuple[Phase, Phase]] = []
    cni_rounds: list[tuple[Phase, Phase]] = []
    echo_phases: list[Phase] = []
    rows: list[list[str]] = []
    with Workspace("storm") as ws:
        await ws.seed(PREFIX, [pool("bench-pool", "10.0.0.0/16")])
        daemon = ws.daemon("node-0", PREFIX, metrics=True)
        clients = [IpamClient(daemon.socket) for _ in range(args.channels)]
        cni = CniSocketClient(daemon.socket)
        echo_server = ws.echo_server()
        echos = [EchoFloor(echo_server.socket) for _ in range(args.channels)]
        baseline = CasBaseline(ws.etcd.endpoint, blocks=(n + 63) // 64)
        txn_floor = EtcdTxnFloor(ws.etcd.endpoint, b"/topoipam-bench/floor/storm", b"{}")
        await baseline.setup()
        await txn_floor.setup()
        try:
            for i in range(args.warmup_rounds):
                await echo_storm(echos, echo_server.pid, n)
                alloc, rel = await one_round(ws, daemon, clients, baseline, f"w{i}", n)
                rows.append([f"w{i} (warm-up)", *alloc.cells(n), *rel.cells(n),
                             str(len(alloc.errors) + len(rel.errors))])
            with py_spy(daemon.pid if args.profile else None, args.profile or ""):
                for i in range(args.rounds):
                    alloc, rel = await one_round(ws, daemon, clients, baseline, f"r{i}", n)
                    rounds.append((alloc, rel))
                    echo_phases.append(await echo_storm(echos, echo_server.pid, n))
                    if args.cni_socket:
                        cni_rounds.append(await one_round(ws, daemon, [cni], baseline,
                                                          f"cni{i}", n))
                    rows.append([f"r{i}", *alloc.cells(n), *rel.cells(n),
                                 str(len(alloc.errors) + len(rel.errors))])
            txn_ns = [await txn_floor.once() for _ in range(200)]
        finally:
            for client in clients:
                await client.close()
            for echo in echos:
                await echo.close()
            await baseline.close()
            await txn_floor.close()

    print_table(f"storm rounds: {n} concurrent calls per phase, {args.channels} channel(s); "
                "txns/confl = etcd transactions / daemon conflicts during the phase",
                ["round", "alloc/s", "base/s", "ratio", "p99 ms", "txns/confl",
                 "release/s", "base/s", "ratio", "p99 ms", "txns/confl", "errors"], rows)
    alloc_stats = Stats.of_ns([x for a, _ in rounds for x in a.latencies])
    rel_stats = Stats.of_ns([x for _, r in rounds for x in r.latencies])
    print_table("storm call latency over all measured rounds", STATS_HEADERS,
                [alloc_stats.row("Allocate storm"), rel_stats.row("Release storm"),
                 Stats.of_ns(txn_ns).row("raw etcd txn (reference)")])
    cpu_rows = []
    for name, phases in (("Allocate storm", [a for a, _ in rounds]),
                         ("Release storm", [r for _, r in rounds]),
                         ("empty gRPC storm (echo server)", echo_phases),
                         ("Allocate storm, CNI socket", [a for a, _ in cni_rounds]),
                         ("Release storm, CNI socket", [r for _, r in cni_rounds])):
        if not phases:
            continue
        wall = sum(p.wall for p in phases)
        calls = n * len(phases)
        cpu_rows.append([name, f"{1000 * wall / calls:.3f}"] + [
            f"{1000 * sum(p.cpu[k] for p in phases) / calls:.3f}"
            for k in ("client", "daemon", "etcd")
        ] + [f"{100 * sum(p.cpu['daemon'] for p in phases) / wall:.0f}%"])
    print_table("where the CPU goes during the storms (per call, machine has 2 cores)",
                ["phase", "wall ms/call", "client CPU ms", "server CPU ms", "etcd CPU ms",
                 "server busy"], cpu_rows)
    echo_rate = statistics.median(n / p.wall for p in echo_phases)
    cni_retries = cni.retries
    errors = [e for a, r in rounds for e in a.errors + r.errors]
    for line in errors[:10]:
        print(f"  error: {line}")

    # The CNI socket is the path pods take (the plugin's one call per exec):
    # its Allocate storm is the gate. The gRPC storms are information, beside
    # the empty grpc.aio storm that bounds them on this machine.
    if cni_rounds:
        for index, name, gate in ((0, "Allocate", True), (1, "Release", False)):
            report.check(f"{name} storm over the CNI socket (median)" if gate
                         else f"info: {name} storm over the CNI socket",
                         statistics.median(n / r[index].wall for r in cni_rounds),
                         statistics.median(n / r[index].baseline_wall for r in cni_rounds),
                         4.0, unit="calls/s", higher_is_better=True, gate=gate)
    else:
        report.notes.append("--no-cni-socket: the gated CNI socket storm was not run")
        report.check("Allocate storm over the CNI socket (median)", float("nan"), None, 0.0,
                     unit="calls/s", higher_is_better=True)
    for index, name in ((0, "Allocate"), (1, "Release")):
        storm = statistics.median(n / r[index].wall for r in rounds)
        base = statistics.median(n / r[index].baseline_wall for r in rounds)
        report.check(f"info: {name} storm over gRPC (median)", storm, base, 4.0,
                     unit="calls/s", higher_is_better=True, gate=False)
    base_alloc = statistics.median(n / a.baseline_wall for a, _ in rounds)
    report.check("reference: empty gRPC storm throughput", echo_rate, base_alloc, 4.0,
                 unit="calls/s", higher_is_better=True, gate=False)
    report.check("errors (gRPC and CNI socket storms)",
                 float(len(errors) + sum(len(a.errors + r.errors) for a, r in cni_rounds)),
                 None, 0.0, unit="")
    cni_errors = [e for a, r in cni_rounds for e in a.errors + r.errors]
    if cni_errors:
        report.notes.append(f"CNI socket storm errors: {len(cni_errors)}, e.g. {cni_errors[0]}")
    if cni_rounds:
        report.notes.append(
            f"CNI socket storm: {cni_retries} of {2 * n * len(cni_rounds)} calls had to "
            "reconnect because the daemon's listen backlog was full (a real plugin gets "
            "EAGAIN from connect() there and fails with CNI error 11)")
    report.check("Allocate storm p99", alloc_stats.p99, None, float("inf"), gate=False)
    report.check("Release storm p99", rel_stats.p99, None, float("inf"), gate=False)
    return report


def _etcd_txns(etcd: Etcd) -> int:
    """Transactions etcd has handled so far (all clients: read it around one writer's phase)."""
    return int(metric(etcd.metrics(), "grpc_server_handled_total", grpc_method="Txn"))


def _cpu(daemon: Daemon, etcd: Etcd) -> dict[str, float]:
    return {"client": cpu_seconds(), "daemon": cpu_seconds(daemon.pid),
            "etcd": cpu_seconds(etcd.process.pid)}


async def echo_storm(echos: list[EchoFloor], server_pid: int, n: int) -> Phase:
    """n concurrent empty calls to the echo server: the ceiling of grpc.aio on this machine."""
    started, cpu = ns(), {"client": cpu_seconds(), "daemon": cpu_seconds(server_pid)}
    latencies = await asyncio.gather(*(echos[i % len(echos)].once() for i in range(n)))
    wall = (ns() - started) / 1e9
    used = {"client": cpu_seconds() - cpu["client"],
            "daemon": cpu_seconds(server_pid) - cpu["daemon"], "etcd": 0.0}
    return Phase(wall, wall, list(latencies), [], 0, 0, used)


def _conflicts(daemon: Daemon) -> int:
    return int(metric(daemon.metrics(), "topoipam_etcd_conflicts_total"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=256, help="concurrent calls per phase")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--channels", type=int, default=1,
                        help="grpc.aio channels the calls are spread over (default 1)")
    parser.add_argument("--no-cni-socket", dest="cni_socket", action="store_false",
                        help="skip the information-only storm over the framed-JSON CNI socket")
    run_main(measure, parser, profile_during="the measured rounds")


if __name__ == "__main__":
    main()
