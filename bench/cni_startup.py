"""Wall time of one installed ``topoipam`` CNI ADD, exec'd as a runtime does, against floors.

Each sample is a fresh process started with ``subprocess.run`` exactly like a
runtime starts an IPAM plugin: ``CNI_COMMAND=ADD`` and friends in the
environment, the network config (with ``"ipam": {"type": "topoipam",
"socket": ...}``) on stdin, the result on stdout. Every ADD uses a new
container id; its exit status and result are checked and the address is
checked in etcd (outside the timed region).

Measured in the same run, interleaved A, B, C, D, E, A, B, ... so machine
noise hits all alike:

A. the installed plugin's ADD: the file ``topoipamctl install-cni`` writes,
   which runs as ``<venv python> -I -S``;
B. ``python -I -S -c pass`` with the same interpreter (floor: the bare
   interpreter; target A <= 1.5 x B);
C. Debian's ``host-local`` ADD with a host-local IPAM config (ranges) and a
   temp dataDir (floor: target A <= 3 x C, goal 2 x);
D. the ``topoipam`` console script's ADD (information: the same source with
   ``site`` and the venv's ``.pth`` files);
E. ``python -I -c pass`` (information: what ``site`` costs here).

Then a ``python -X importtime`` summary of the installed plugin's imports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import (
    HOST_LOCAL,
    STATS_HEADERS,
    TOPOIPAM,
    Report,
    Stats,
    Workspace,
    cpu_seconds,
    install_plugin,
    ns,
    open_store,
    pool,
    print_table,
    put_objects,
    run_main,
)

PREFIX = "/topoipam-bench/cni/v1"
NETWORK = "benchnet"


@dataclass
class Exec:
    """One way of starting a process, timed from spawn to exit."""

    name: str
    argv: list[str]
    stdin: bytes = b""
    env: Callable[[int], dict[str, str]] | None = None
    check: Callable[[int, subprocess.CompletedProcess[bytes]], None] | None = None

    def run(self, index: int) -> tuple[int, subprocess.CompletedProcess[bytes], float]:
        """(wall ns, the finished process, its user + system CPU seconds)."""
        env = self.env(index) if self.env else {"PATH": os.environ.get("PATH", "")}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = ns()
        done = subprocess.run(self.argv, input=self.stdin, env=env, capture_output=True,
                              timeout=60)
        elapsed = ns() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return elapsed, done, cpu


def cni_env(container: str, cni_path: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": container,
        "CNI_NETNS": f"/var/run/netns/{container}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": cni_path,
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={container}",
    }


def network_config(ipam: dict[str, Any]) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": NETWORK, "type": "bridge",
                       "bridge": "cni-bench", "ipam": ipam}).encode()


def _result_ip(done: subprocess.CompletedProcess[bytes], what: str) -> str:
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stdout!r} {done.stderr!r}")
    result = json.loads(done.stdout)
    ips = result.get("ips") or []
    if not ips:
        raise RuntimeError(f"{what} returned no address: {result}")
    return str(ips[0]["address"]).split("/")[0]


def import_summary(argv: list[str], env: dict[str, str], stdin: bytes, runs: int,
                   top: int) -> None:
    """``-X importtime`` of the plugin: top imports by cumulative time (min over runs)."""
    best: dict[str, tuple[int, int, int]] = {}  # module -> (self us, cumulative us, depth)
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-X", "importtime", *argv], input=stdin, env=env,
                              capture_output=True, timeout=60)
        for line in done.stderr.decode().splitlines():
            if not line.startswith("import time:") or "imported package" in line:
                continue
            self_us, cumulative, name = line[len("import time:"):].split("|")
            depth = (len(name) - len(name.lstrip())) // 2
            key = name.strip()
            entry = (int(self_us), int(cumulative), depth)
            if key not in best or entry[1] < best[key][1]:
                best[key] = entry
    top_level = {k: v for k, v in best.items() if v[2] <= 1}
    total = sum(v[1] for v in top_level.values())
    rows = [[("  " * (v[2] - 1)) + k, f"{v[1] / 1000:.2f}", f"{v[0] / 1000:.2f}",
             f"{100 * v[1] / total:.0f}%" if total else "-"]
            for k, v in sorted(top_level.items(), key=lambda kv: -kv[1][1])[:top]]
    print_table(f"python -X importtime {os.path.basename(argv[-1])} ADD: top-level imports "
                f"(min of {runs} runs; total {total / 1000:.1f} ms)",
                ["module", "cumulative ms", "self ms", "share"], rows)
    rows = [[k, f"{v[0] / 1000:.2f}", f"{v[1] / 1000:.2f}"]
            for k, v in sorted(best.items(), key=lambda kv: -kv[1][0])[:top]]
    print_table("heaviest modules by self time (any depth)", ["module", "self ms",
                                                               "cumulative ms"], rows)


async def measure(args: argparse.Namespace) -> Report:
    report = Report("cni_startup")
    with Workspace("cni") as ws:
        store = await open_store(ws.etcd.endpoint, PREFIX)
        await put_objects(store, [pool("bench-pool", "10.0.0.0/16")])
        daemon = ws.daemon("node-0", PREFIX)
        data_dir = ws.path("host-local")
        cni_path = os.path.dirname(HOST_LOCAL)
        topoipam_stdin = network_config({"type": "topoipam", "socket": daemon.socket})
        checks: list[tuple[str, str]] = []  # (container, address) to verify in etcd

        def host_local_check(index: int, done: subprocess.CompletedProcess[bytes]) -> None:
            _result_ip(done, "host-local ADD")

        plugin = install_plugin(ws)
        print(f"installed plugin: {plugin} (runs {sys.executable} -I -S)")

        def add(name: str, argv: list[str], prefix: str) -> Exec:
            def check(index: int, done: subprocess.CompletedProcess[bytes]) -> None:
                checks.append((f"{prefix}-{index:05d}", _result_ip(done, name)))
            return Exec(name, argv, topoipam_stdin,
                        lambda i: cni_env(f"{prefix}-{i:05d}", cni_path), check)

        execs = [
            add("installed plugin ADD", [plugin], "cni"),
            Exec("python -I -S -c pass", [sys.executable, "-I", "-S", "-c", "pass"]),
            Exec("host-local ADD", [HOST_LOCAL], network_config({
                "type": "host-local", "ranges": [[{"subnet": "10.1.0.0/16"}]],
                "dataDir": data_dir}), lambda i: cni_env(f"hl-{i:05d}", cni_path),
                host_local_check),
            add("console script ADD (info)", [TOPOIPAM], "script"),
            Exec("python -I -c pass (info)", [sys.executable, "-I", "-c", "pass"]),
        ]
        samples: dict[str, list[int]] = {e.name: [] for e in execs}
        # CPU seconds per kind: the exec'd process, and the daemon and etcd meanwhile
        # (/proc's clock ticks are coarse; summed over all samples they are not).
        cpu: dict[str, list[float]] = {e.name: [0.0, 0.0, 0.0] for e in execs}
        servers = (daemon.pid, ws.etcd.process.pid)
        for i in range(args.warmup + args.samples):
            for e in execs:
                before = [cpu_seconds(pid) for pid in servers]
                elapsed, done, own = e.run(i)
                after = [cpu_seconds(pid) for pid in servers]
                if e.check is not None:
                    e.check(i, done)
                if i >= args.warmup:
                    samples[e.name].append(elapsed)
                    totals = cpu[e.name]
                    totals[0] += own
                    totals[1] += after[0] - before[0]
                    totals[2] += after[1] - before[1]
        # Every ADD must be committed in etcd with the address it printed.
        for container, address in checks:
            handle = await store.get_handle(f"{NETWORK}/{container}/eth0")
            if handle is None or address not in {str(a.ip) for a in handle.value.addresses}:
                raise RuntimeError(f"ADD of {container} printed {address} but etcd has {handle}")
        await store.close()
        print(f"\nverified {len(checks)} ADDs: every printed address is committed in etcd")
        import_summary(["-I", "-S", plugin], cni_env("importtime", cni_path), topoipam_stdin,
                       args.importtime_runs, args.top)

    stats = {name: Stats.of_ns(values) for name, values in samples.items()}
    print_table(f"process wall time, spawn to exit ({args.samples} interleaved samples each)",
                STATS_HEADERS, [s.row(name) for name, s in stats.items()])
    print_table("CPU per exec, ms (mean): what a burst of pod starts has to share",
                ["what", "process", "daemon", "etcd", "all"],
                [[name, *(f"{1000 * t / args.samples:.2f}" for t in (*totals, sum(totals)))]
                 for name, totals in cpu.items()])
    plugin = stats["installed plugin ADD"].p50
    bare = stats["python -I -S -c pass"].p50
    host_local = stats["host-local ADD"].p50
    report.check("installed plugin ADD p50 vs python -I -S -c pass", plugin, bare, 1.5)
    report.check("installed plugin ADD p50 vs host-local ADD", plugin, host_local, 3.0)
    report.check("goal: installed plugin ADD p50 vs host-local ADD", plugin, host_local, 2.0,
                 gate=False)
    report.check("info: console script ADD p50 vs installed plugin ADD",
                 stats["console script ADD (info)"].p50, plugin, float("inf"), gate=False)
    report.check("info: python -I -c pass vs python -I -S -c pass",
                 stats["python -I -c pass (info)"].p50, bare, float("inf"), gate=False)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="samples of each (default 200)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--importtime-runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=15, help="rows of the import summary")
    run_main(measure, parser)


if __name__ == "__main__":
    main()
