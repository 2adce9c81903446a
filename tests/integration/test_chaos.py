"""Chaos: CNI churn on four daemons while daemons and etcd members die, restart and stall.

A three-member etcd cluster, four ``topoipamd`` (two per rack) started with
all three etcd endpoints, two small rack pools (/26 in /29 blocks, at most two
blocks per host, borrowing allowed) and one thread per node that execs the
real ``topoipam`` plugin (ADD, DEL, now and then a repeated ADD). Meanwhile the
main thread injects faults one after another, with churn in between: SIGKILL
and restart of daemons, SIGKILL of an etcd follower and then of the leader
(each restarted later), the whole etcd cluster stopped for 5 s, and a
compaction while one daemon is frozen (SIGSTOP) long enough for etcd to drop
its connection, so that it must relist.

Only CNI code 11 (try again) is an acceptable failure: such a call is retried
later (or, for an ADD, sometimes abandoned to GC, as a runtime would). Every
acknowledged ADD is checked at once against every other live address, and at
quiet points (churn paused) and at the end etcd itself is read through its
JSON gateway: no address held twice, every acknowledged and not deleted
allocation present with its address, nothing left of an acknowledged DEL.
Then ``topoipamctl ipam check``, CNI GC per node with the live containers as
valid attachments, DEL of everything, and no address may remain allocated.

Part of the churn is on a sticky network (issue 16): one identity per rack,
whose containers come and go on either node of the rack, never two at once.
An ADD acknowledged within the hold of the identity's last acknowledged DEL
must return the same address; holds are short, so they also expire under the
faults, and after the final DELs every hold must expire by itself.

The summary (printed, and written as JSON to ``$TOPOIPAM_CHAOS_REPORT`` if
set) counts operations, faults and invariant checks.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from tests.daemons import DaemonProcess, ctl
from tests.etcd_cluster import TCP_ESTABLISHED, EtcdCluster, process_tcp_sockets
from tests.integration.chaos import (
    BLOCK_SIZE,
    CAPACITY,
    CNI_TIMEOUT,
    MAX_BLOCKS_PER_HOST,
    NETWORK,
    POOLS,
    RACK,
    SEED,
    STICKY_HOLD,
    STICKY_NETWORK,
    WARM_ADDRESSES,
    Gate,
    Ledger,
    Worker,
    addresses_in_etcd,
    check_etcd,
    handle_id,
    is_sticky,
    metric,
    net_config,
    retry_until_done,
    wait_for,
)
from topoipam.daemon.local_etcd import free_port
from topoipam.proto import ipam_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    # A short server keepalive so that etcd drops a client that stops answering pings
    # (the frozen daemon of the compaction fault) within a few seconds.
    cluster = EtcdCluster(str(tmp_path / "etcd"), extra=(
        "--grpc-keepalive-interval", "1s", "--grpc-keepalive-timeout", "2s"))
    try:
        yield cluster.start()
    finally:
        cluster.close()



def test_churn_under_daemon_and_etcd_faults(etcd_cluster: EtcdCluster, prefix: str,
                                            tmp_path: Path) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    cluster = etcd_cluster
    ctl_env = {k: v for k, v in os.environ.items() if not k.startswith("TOPOIPAM_")}
    ctl_env.update(TOPOIPAM_ETCD_ENDPOINTS=cluster.endpoints, TOPOIPAM_PREFIX=prefix)

    def run_ctl(*args: str) -> str:
        done = ctl(ctl_env, *args)
        assert done.returncode == 0, f"topoipamctl {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    for rack, cidr in POOLS.items():
        run_ctl("create", "ippool", f"rack-{rack}", "--cidr", str(cidr), "--block-size",
                str(BLOCK_SIZE), "--node-selector", f'rack == "{rack}"')
    # Warm reserves on: background claims race the churn's claims and borrows.
    run_ctl("ipam", "configure", "--strictaffinity", "false", "--max-blocks-per-host",
            str(MAX_BLOCKS_PER_HOST), "--warm-addresses", str(WARM_ADDRESSES),
            "--sticky-hold-seconds", str(STICKY_HOLD))

    daemons: dict[str, DaemonProcess] = {}
    metrics_port: dict[str, int] = {}
    ledger = Ledger()
    stop = threading.Event()
    gate = Gate(len(RACK))
    workers: list[Worker] = []
    faults: Counter[str] = Counter()
    phases: dict[str, dict[str, int]] = {}
    failed_over: dict[str, list[str]] = {}
    borrowed_seen = 0
    in_doubt_adds: dict[str, int] = {}
    try:
        members = cluster.endpoints.split(",")
        for index, (node, rack) in enumerate(RACK.items()):
            # Rotated lists: gRPC connects to the first reachable endpoint, so the
            # daemons spread over the members and every member kill cuts some off.
            endpoints = ",".join(members[index % 3:] + members[:index % 3])
            run_dir = tmp_path / node
            run_dir.mkdir(mode=0o750)
            metrics_port[node] = free_port()
            daemons[node] = DaemonProcess(
                node, str(run_dir / "topoipamd.sock"), endpoints, prefix,
                str(tmp_path / f"{node}.log"),
                ["--labels", f"rack={rack}", "--metrics-address",
                 f"127.0.0.1:{metrics_port[node]}"]).start(wait=False)
        for daemon in daemons.values():
            daemon.wait_serving(30)

        # The small nodes claim both their blocks first, so the big ones must borrow.
        for node in ("node-1", "node-3"):
            for command in ("ADD", "DEL"):
                for i in range(9):
                    retry_until_done(ledger, command, daemons[node], f"warm-{node}-{i}")
                    ledger.ops[f"{command.lower()}_acknowledged"] += 1
            affinities = cluster.range_prefix(f"{prefix}/affinities/{node}/")
            assert len(affinities) == MAX_BLOCKS_PER_HOST, affinities

        for index, node in enumerate(RACK):
            workers.append(Worker(node, daemons[node], ledger, gate, stop, SEED + index))
        for worker in workers:
            worker.start()

        def churn(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not stop.is_set():
                time.sleep(0.1)
            assert not ledger.violations, "\n".join(ledger.violations)

        def quiet_check() -> None:
            nonlocal borrowed_seen
            wait_for("every daemon SERVING",
                     lambda: all(d.health() == "SERVING" for d in daemons.values()))
            gate.pause()
            try:
                borrowed_seen = max(borrowed_seen, check_etcd(cluster, prefix, ledger))
            finally:
                gate.resume()

        @contextmanager
        def phase(name: str) -> Iterator[None]:
            """A fault window; the churn must really have run through it."""
            with ledger.lock:
                before = Counter(ledger.ops)
            yield
            with ledger.lock:
                delta = Counter(ledger.ops)
                delta.subtract(before)
            phases[name] = {"attempted": delta["attempted"],
                            "acknowledged": delta["add_acknowledged"] + delta["del_acknowledged"],
                            "answered_try_again": delta["answered_try_again"]}
            assert delta["attempted"] >= 5, f"almost no churn during {name}: {phases[name]}"

        def connected_member(daemon: DaemonProcess) -> int | None:
            """The etcd member the daemon's gRPC channel is connected to, from /proc."""
            assert daemon.process is not None
            ports = {m.client_port: i for i, m in enumerate(cluster.members)}
            for sock in process_tcp_sockets(daemon.process.pid):
                if sock.state == TCP_ESTABLISHED and sock.remote_port in ports:
                    return ports[sock.remote_port]
            return None

        def kill_member_and_fail_over(index: int, kind: str) -> None:
            clients = [n for n, d in daemons.items() if connected_member(d) == index]
            cluster.kill_member(index)
            faults[kind] += 1
            churn(1)
            # Each daemon knows all three endpoints: the ones that lost their member
            # reconnect to a survivor and are in sync again while it is still down.
            wait_for("every daemon SERVING with a member down",
                     lambda: all(d.health() == "SERVING" for d in daemons.values()))
            for node in clients:
                assert connected_member(daemons[node]) not in (None, index), node
            ledger.checks[f"failover_verified_{kind}"] += len(clients)
            ledger.checks["serving_with_member_down"] += len(daemons)
            failed_over[kind] = clients
            churn(3)
            cluster.start_member(index)
            churn(2)

        with phase("warmup"):
            churn(6)
        quiet_check()

        # 1. daemons SIGKILLed and restarted
        with phase("daemon_sigkill_restart"):
            for _ in range(3):
                victim = daemons[rng.choice(sorted(daemons))]
                victim.kill()
                faults["daemon_sigkill_restart"] += 1
                churn(1.0)
                victim.start(wait=True, timeout=30)
                churn(2.5)
        quiet_check()

        # 2. an etcd follower killed, later restarted (one that daemons are connected to)
        with phase("etcd_follower_kill"):
            leader = cluster.leader()
            followers = [i for i in range(3) if i != leader]
            in_use = [i for i in followers
                      if any(connected_member(d) == i for d in daemons.values())]
            kill_member_and_fail_over(rng.choice(in_use or followers), "etcd_follower_kill")
        quiet_check()

        # 3. the etcd leader killed, later restarted
        with phase("etcd_leader_kill"):
            kill_member_and_fail_over(cluster.leader(), "etcd_leader_kill")
        quiet_check()

        # 4. the whole etcd cluster stopped for 5 s
        with phase("etcd_cluster_stop_5s"):
            down = time.monotonic()
            for index in range(3):
                cluster.stop_member(index)
            faults["etcd_cluster_stop_5s"] += 1
            # No daemon may claim to be ready while etcd is gone.
            wait_for("every daemon NOT_SERVING while etcd is down",
                     lambda: all(d.health() == "NOT_SERVING" for d in daemons.values()),
                     timeout=4)
            ledger.checks["not_serving_while_etcd_down"] += len(daemons)
            churn(5 - (time.monotonic() - down))
            for index in range(3):
                cluster.start_member(index, wait=False)
            cluster.wait_healthy(30)
            churn(3)
        quiet_check()

        # 5. compaction while a daemon is frozen and etcd has dropped its connection
        with phase("etcd_compaction_while_daemon_disconnected"):
            victim = daemons[rng.choice(sorted(daemons))]
            assert victim.process is not None
            relists_before = metric(victim, metrics_port[victim.node], "topoipam_cache_relists")
            victim.process.send_signal(signal.SIGSTOP)
            try:
                run_ctl("label", "nodes", victim.node, "chaos-epoch=1")
                churn(1)  # the others write too (and may borrow from the frozen node's blocks)
                wait_for("etcd to drop the frozen daemon's connection",
                         lambda: connected_member(victim) is None, timeout=20)
                cluster.compact(cluster.revision())
                faults["etcd_compaction_while_daemon_disconnected"] += 1
            finally:
                victim.process.send_signal(signal.SIGCONT)

            def sees_new_label() -> bool:
                try:
                    with victim.stub() as stub:
                        status = stub.Status(ipam_pb2.StatusRequest(), timeout=2)
                except grpc.RpcError:
                    return False
                return bool(status.in_sync and status.labels.get("chaos-epoch") == "1")

            wait_for(f"{victim.node} to relist and see its new label", sees_new_label, timeout=30)
            relists_after = metric(victim, metrics_port[victim.node], "topoipam_cache_relists")
            assert relists_after > relists_before, (relists_before, relists_after)
            ledger.checks["relist_after_compaction_observed"] += 1
            churn(3)
        quiet_check()

        stop.set()
        for worker in workers:
            worker.join(CNI_TIMEOUT * 3)
            assert not worker.is_alive(), f"{worker.name} did not stop"
        assert not ledger.violations, "\n".join(ledger.violations)

        # ------------------------------------------------------------ settle
        for daemon in daemons.values():
            daemon.wait_serving(30)
        for container, (node, _) in sorted(ledger.pending_del.items()):
            ledger.ops["retried"] += 1  # the first call of the loop retries the churn's DEL
            retry_until_done(ledger, "DEL", daemons[node], container)
            ledger.ops["del_acknowledged"] += 1
            del ledger.pending_del[container]
            ledger.deleted[container] = node
        for i, (container, node) in enumerate(sorted(ledger.pending_add.items())):
            if i % 2:
                ledger.abandoned[container] = node  # the runtime gave up: GC's job
                continue
            ledger.ops["retried"] += 1
            out = retry_until_done(ledger, "ADD", daemons[node], container)
            assert out is not None
            ledger.acknowledge_add(container, node, out["ips"][0]["address"].split("/")[0])
        ledger.pending_add.clear()
        # Top the big nodes up to their capacity: they must borrow now.
        for node in ("node-0", "node-2"):
            while ledger.held_by(node) + sum(
                    1 for n in ledger.abandoned.values() if n == node) < CAPACITY[node]:
                container = ledger.new_container(node)
                out = retry_until_done(ledger, "ADD", daemons[node], container)
                assert out is not None
                ledger.acknowledge_add(container, node, out["ips"][0]["address"].split("/")[0])
        assert not ledger.violations, "\n".join(ledger.violations)
        borrowed = check_etcd(cluster, prefix, ledger)
        borrowed_seen = max(borrowed_seen, borrowed)
        assert borrowed > 0, "no address is borrowed from another node's block"

        check = ctl(ctl_env, "ipam", "check")
        assert check.returncode == 0, check.stdout + check.stderr
        ledger.checks["ipam_check_exit_0"] += 1

        # ------------------------------------------------------------ GC
        # ADDs that answered 11 and were given up: some were committed all the same.
        _, handles = addresses_in_etcd(cluster, prefix)
        in_doubt_adds = {"given_up": len(ledger.abandoned), "committed_anyway": sum(
            1 for c in ledger.abandoned if handle_id(c) in handles)}
        for node in RACK:  # two acknowledged pods per node vanish without a DEL
            for container in sorted(c for c, (n, _) in ledger.live.items() if n == node)[:2]:
                ledger.start_del(container)
                ledger.abandoned[container] = node
        for (node, daemon), network in ((d, n) for d in daemons.items()
                                        for n in (NETWORK, STICKY_NETWORK)):
            valid = [{"containerID": c, "ifname": "eth0"}
                     for c, (n, _) in sorted(ledger.live.items())
                     if n == node and is_sticky(c) == (network == STICKY_NETWORK)]
            gc_config = {**net_config(daemon, "1.1.0", network=network),
                         "cni.dev/valid-attachments": valid}
            retry_until_done(ledger, "GC", daemon, "", config=gc_config)
            ledger.ops["gc_acknowledged"] += 1
        _, handles = addresses_in_etcd(cluster, prefix)
        expected = {handle_id(c): (n, ip) for c, (n, ip) in ledger.live.items()}
        actual = {hid: (h["node"], h["addresses"][0]["ip"]) for hid, h in handles.items()}
        assert actual == expected, {"left by GC": set(actual) - set(expected),
                                    "lost by GC": set(expected) - set(actual)}
        ledger.checks["gc_released_exactly_the_invalid"] += 1
        ledger.deleted.update(ledger.abandoned)
        ledger.abandoned.clear()
        check_etcd(cluster, prefix, ledger)
        check = ctl(ctl_env, "ipam", "check")
        assert check.returncode == 0, check.stdout + check.stderr
        ledger.checks["ipam_check_exit_0"] += 1

        # ------------------------------------------------------------ DEL everything
        for container, (node, _) in sorted(ledger.live.items()):
            ledger.start_del(container)
            retry_until_done(ledger, "DEL", daemons[node], container)
            ledger.ops["del_acknowledged"] += 1
            ledger.deleted[container] = node
        # The sticky pods' addresses are parked: their holds end by themselves.
        wait_for("every sticky hold to expire", lambda: all(
            not b["allocations"] for b in addresses_in_etcd(cluster, prefix)[0].values()),
            timeout=STICKY_HOLD + 15)
        assert not cluster.range_prefix(f"{prefix}/identities/")
        ledger.checks["sticky_holds_expired_after_del_all"] += 1
        blocks, handles = addresses_in_etcd(cluster, prefix)
        assert handles == {}, handles
        assert all(not b["allocations"] for b in blocks.values()), blocks
        ledger.checks["no_leak_after_del_all"] += 1
        check_etcd(cluster, prefix, ledger)
        check = ctl(ctl_env, "ipam", "check")
        assert check.returncode == 0, check.stdout + check.stderr
        ledger.checks["ipam_check_exit_0"] += 1
    finally:
        stop.set()
        gate.resume()
        for worker in workers:
            worker.join(CNI_TIMEOUT * 3)
        for daemon in daemons.values():
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGCONT)
            daemon.stop()

    summary = {
        "seed": SEED,
        "duration_seconds": round(time.monotonic() - started, 1),
        "operations": {
            "attempted": ledger.ops["attempted"],
            "acknowledged": ledger.ops["add_acknowledged"] + ledger.ops["del_acknowledged"],
            "add_acknowledged": ledger.ops["add_acknowledged"],
            "del_acknowledged": ledger.ops["del_acknowledged"],
            "answered_try_again": ledger.ops["answered_try_again"],
            "retried": ledger.ops["retried"],
            "gc_acknowledged": ledger.ops["gc_acknowledged"],
        },
        "faults": dict(faults),
        "operations_during_fault_phases": phases,
        "daemons_that_failed_over": failed_over,
        "invariant_checks": {**dict(ledger.checks), "total": sum(ledger.checks.values())},
        "max_borrowed_addresses_seen": borrowed_seen,
        "in_doubt_adds_left_to_gc": in_doubt_adds,
    }
    print("topoipam chaos summary:", json.dumps(summary, indent=2))
    report = os.environ.get("TOPOIPAM_CHAOS_REPORT")
    if report:
        Path(report).write_text(json.dumps(summary, indent=2) + "\n")
