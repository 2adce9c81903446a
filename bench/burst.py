"""A node becomes ready with N pending pods: N CNI ADDs exec'd P at a time, then their DELs.

This is what a runtime does when a node joins with pods already scheduled to
it (kubelet creates sandboxes in parallel): default 110 pods (kubelet's
default max-pods), 8 plugin processes at a time. Each topoipam round starts a
fresh daemon in a fresh etcd prefix, so the node has no blocks yet and claims
them during the burst (110 addresses need two /26 blocks). Each host-local
round uses a fresh dataDir. Rounds alternate topoipam and host-local so that
machine noise hits both alike.

The plugin exec'd is the installed file (``topoipamctl install-cni``), with
the network config a runtime would pass. Every ADD's exit status and result
are checked; after each topoipam burst (outside the timed region) the
addresses must be distinct and every one committed in etcd under its
attachment's handle, and after the DELs no handle may be left.

Printed per phase: whole-burst wall time (first spawn to last exit), per-ADD
latency p50/p99 pooled over rounds, errors. Targets: whole-burst wall (median
of rounds) <= 3 x host-local's (goal 2 x), per-ADD p99 <= 3 x host-local's,
zero errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from clients import metric
from common import (
    HOST_LOCAL,
    STATS_HEADERS,
    Report,
    Stats,
    Workspace,
    fmt,
    install_plugin,
    ns,
    open_store,
    pool,
    print_table,
    run_main,
)

NETWORK = "burstnet"


@dataclass
class Burst:
    """One phase: N execs of one verb, P at a time."""

    wall_ns: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)  # container -> address


def _env(command: str, container: str, cni_path: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_NETNS": f"/var/run/netns/{container}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": cni_path,
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=burst;K8S_POD_NAME={container}",
    }


def burst(plugin: str, command: str, config: bytes, containers: list[str], parallel: int,
          cni_path: str) -> Burst:
    """Exec ``plugin`` once per container, ``parallel`` at a time; timed and checked."""
    result = Burst()

    def one(container: str) -> tuple[str, int, subprocess.CompletedProcess[bytes]]:
        started = ns()
        done = subprocess.run([plugin], input=config, env=_env(command, container, cni_path),
                              capture_output=True, timeout=120)
        return container, ns() - started, done

    started = ns()
    with ThreadPoolExecutor(max_workers=parallel) as pool_:
        outcomes = list(pool_.map(one, containers))
    result.wall_ns = ns() - started
    for container, elapsed, done in outcomes:
        result.latencies_ns.append(elapsed)
        if done.returncode != 0:
            result.errors.append(f"{command} {container}: exit {done.returncode} "
                                 f"{done.stdout.decode(errors='replace').strip()[:200]}")
            continue
        if command == "ADD":
            try:
                ips = json.loads(done.stdout)["ips"]
                result.addresses[container] = str(ips[0]["address"]).split("/")[0]
            except (ValueError, KeyError, IndexError, TypeError):
                result.errors.append(f"ADD {container}: no address in {done.stdout[:200]!r}")
    return result


async def measure(args: argparse.Namespace) -> Report:
    report = Report("burst")
    n, parallel = args.pods, args.parallel
    cni_path = os.path.dirname(HOST_LOCAL)
    phases: dict[str, list[Burst]] = {"topoipam ADD": [], "topoipam DEL": [],
                                      "host-local ADD": [], "host-local DEL": [],
                                      "warm reserve ADD": [], "blocks exist ADD": []}
    request_claims: list[float] = []
    verify_errors: list[str] = []
    with Workspace("burst") as ws:
        plugin = install_plugin(ws)
        store_prefixes = []
        for round_ in range(args.warmup + args.rounds):
            measured = round_ >= args.warmup
            # topoipam: a fresh prefix and a fresh daemon, so no blocks exist yet.
            prefix = f"/topoipam-bench/burst-{round_}/v1"
            store_prefixes.append(prefix)
            await ws.seed(prefix, [pool("burst-pool", "10.32.0.0/16")])
            store = await open_store(ws.etcd.endpoint, prefix)
            daemon = ws.daemon("node-0", prefix)
            config = json.dumps({"cniVersion": "1.0.0", "name": NETWORK, "type": "bridge",
                                 "ipam": {"type": "topoipam", "socket": daemon.socket}}).encode()
            containers = [f"pod-{round_}-{i:04d}" for i in range(n)]
            added = burst(plugin, "ADD", config, containers, parallel, cni_path)
            if len(set(added.addresses.values())) != len(added.addresses):
                verify_errors.append(f"round {round_}: duplicate addresses in the burst")
            for container, address in added.addresses.items():
                handle = await store.get_handle(f"{NETWORK}/{container}/eth0")
                if handle is None or address not in {str(a.ip) for a in handle.value.addresses}:
                    verify_errors.append(f"{container} printed {address}, etcd has {handle}")
            deleted = burst(plugin, "DEL", config, containers, parallel, cni_path)
            for container in containers:
                if await store.get_handle(f"{NETWORK}/{container}/eth0") is not None:
                    verify_errors.append(f"{container}: handle left after DEL")
            await store.close()
            daemon.stop()
            # host-local: the same burst on a fresh dataDir.
            data_dir = ws.path(f"host-local-{round_}")
            hl_config = json.dumps({
                "cniVersion": "1.0.0", "name": NETWORK, "type": "bridge",
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.33.0.0/16"}]],
                         "dataDir": data_dir}}).encode()
            hl_added = burst(HOST_LOCAL, "ADD", hl_config, containers, parallel, cni_path)
            hl_deleted = burst(HOST_LOCAL, "DEL", hl_config, containers, parallel, cni_path)
            shutil.rmtree(data_dir, ignore_errors=True)
            # The same burst on a fresh node with a warm reserve of n addresses, and on a
            # node whose blocks already exist (claimed by an earlier, unmeasured burst).
            warm, claims = await variant_burst(ws, plugin, cni_path, f"{prefix}-warm",
                                               containers, parallel, warm=n)
            existing, _ = await variant_burst(ws, plugin, cni_path, f"{prefix}-existing",
                                              containers, parallel, warm=0)
            if measured:
                phases["warm reserve ADD"].append(warm)
                phases["blocks exist ADD"].append(existing)
                request_claims.append(claims)
            if measured:
                for name, phase in (("topoipam ADD", added), ("topoipam DEL", deleted),
                                    ("host-local ADD", hl_added), ("host-local DEL", hl_deleted)):
                    phases[name].append(phase)
            print(f"round {round_}{'' if measured else ' (warm-up)'}: "
                  f"topoipam ADD {added.wall_ns / 1e6:.0f} ms, DEL {deleted.wall_ns / 1e6:.0f} ms;"
                  f" host-local ADD {hl_added.wall_ns / 1e6:.0f} ms, "
                  f"DEL {hl_deleted.wall_ns / 1e6:.0f} ms", flush=True)

    walls = {name: statistics.median(p.wall_ns / 1e6 for p in runs)
             for name, runs in phases.items()}
    stats = {name: Stats.of_ns([x for p in runs for x in p.latencies_ns])
             for name, runs in phases.items()}
    errors = {name: sum(len(p.errors) for p in runs) for name, runs in phases.items()}
    print_table(f"whole burst of {n} execs, {parallel} at a time (median of {args.rounds} rounds)",
                ["phase", "wall ms", "errors"],
                [[name, fmt(walls[name]), str(errors[name])] for name in phases])
    print_table("per-exec latency, pooled over rounds", STATS_HEADERS,
                [stats[name].row(name) for name in phases])
    for runs in phases.values():
        for p in runs:
            for line in p.errors[:5]:
                print(f"  error: {line}")
    for line in verify_errors[:10]:
        print(f"  verify: {line}")

    report.check(f"whole burst of {n} ADDs, wall (median)", walls["topoipam ADD"],
                 walls["host-local ADD"], 3.0)
    report.check("goal: whole burst wall", walls["topoipam ADD"], walls["host-local ADD"], 2.0,
                 gate=False)
    report.check("per-ADD p99", stats["topoipam ADD"].p99, stats["host-local ADD"].p99, 3.0)
    report.check("info: per-ADD p50", stats["topoipam ADD"].p50, stats["host-local ADD"].p50,
                 float("inf"), gate=False)
    report.check(f"info: whole burst of {n} DELs, wall (median)", walls["topoipam DEL"],
                 walls["host-local DEL"], float("inf"), gate=False)
    report.check(f"warmAddresses={n}: blocks claimed on the request path during the burst",
                 sum(request_claims), None, 0.0, unit="")
    report.check("warm reserve per-ADD p99 vs a node whose blocks exist",
                 stats["warm reserve ADD"].p99, stats["blocks exist ADD"].p99, 1.2)
    report.check("errors (ADD and DEL, both plugins) and failed etcd checks",
                 float(sum(errors.values()) + len(verify_errors)), None, 0.0, unit="")
    return report


async def variant_burst(ws: Workspace, plugin: str, cni_path: str, prefix: str,
                        containers: list[str], parallel: int, warm: int) -> tuple[Burst, float]:
    """A burst on a daemon of its own: with ``warm``, once its reserve is claimed; else
    after an unmeasured burst has claimed its blocks. Returns the burst and the blocks
    claimed on the request path during it."""
    from topoipam.daemon.core.model import IPAMConfig

    await ws.seed(prefix, [pool("burst-pool", "10.32.0.0/16"), IPAMConfig(warm_addresses=warm)])
    daemon = ws.daemon("node-0", prefix, metrics=True)
    config = json.dumps({"cniVersion": "1.0.0", "name": NETWORK, "type": "bridge",
                         "ipam": {"type": "topoipam", "socket": daemon.socket}}).encode()
    try:
        if warm:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and metric(
                    daemon.metrics(), "topoipam_block_claims_total", path="background"
            ) * 64 < warm:
                time.sleep(0.02)
        else:
            early = [f"early-{c}" for c in containers]
            burst(plugin, "ADD", config, early, parallel, cni_path)
            burst(plugin, "DEL", config, early, parallel, cni_path)
        before = metric(daemon.metrics(), "topoipam_block_claims_total", path="request")
        added = burst(plugin, "ADD", config, containers, parallel, cni_path)
        claims = metric(daemon.metrics(), "topoipam_block_claims_total", path="request") - before
        burst(plugin, "DEL", config, containers, parallel, cni_path)
        return added, claims
    finally:
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=110, help="ADDs per burst (default 110)")
    parser.add_argument("--parallel", type=int, default=8,
                        help="plugin processes at a time (default 8)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    run_main(measure, parser)


if __name__ == "__main__":
    main()
