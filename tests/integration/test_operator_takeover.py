"""Hostile reproductions of the sticky takeover: real etcd, real daemons,
the installed plugin."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EtcdServer
from tests.daemons import DaemonProcess, cni, ctl, rack_pools_manifest

NETWORK = "hunt-net"
LEASE = 3
TAKEOVER = 2


def run(ctl_env: dict[str, str], *args: str, input: str | None = None) -> str:
    done = ctl(ctl_env, *args, input=input)
    assert done.returncode == 0, f"topoipamctl {' '.join(args)}: {done.stderr}"
    return done.stdout


def start(nodes: dict[str, dict[str, str]], etcd: EtcdServer, prefix: str, tmp_path: Path
          ) -> dict[str, DaemonProcess]:
    started: dict[str, DaemonProcess] = {}
    for node, env in nodes.items():
        run_dir = tmp_path / node
        run_dir.mkdir(mode=0o750)
        started[node] = DaemonProcess(
            node, str(run_dir / "topoipamd.sock"), etcd.endpoint, prefix,
            str(tmp_path / f"{node}.log"),
            ["--labels", "rack=0", "--node-lease-seconds", str(LEASE)], env=env,
        ).start(wait=False)
    for daemon in started.values():
        daemon.wait_serving(30)
    return started


@pytest.fixture
def cluster(etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]
            ) -> Iterator[tuple[dict[str, DaemonProcess], Path]]:
    run(ctl_env, "apply", "-f", "-", input=rack_pools_manifest())
    run(ctl_env, "ipam", "configure", "--sticky-takeover-seconds", str(TAKEOVER))
    holder: dict[str, DaemonProcess] = {}
    try:
        yield holder, tmp_path
    finally:
        for daemon in holder.values():
            if daemon.process is not None and daemon.process.poll() is None:
                os.kill(daemon.process.pid, signal.SIGCONT)
            daemon.stop()


def conf(daemon: DaemonProcess, identity: str) -> dict[str, Any]:
    return {"cniVersion": "1.1.0", "name": NETWORK, "args": {"cni": {"identity": identity}},
            "ipam": {"type": "topoipam", "socket": daemon.socket, "sticky": True}}


def add(daemon: DaemonProcess, container: str, identity: str
        ) -> tuple[int, dict[str, Any] | None, str]:
    return cni("ADD", conf(daemon, identity), container=container)


def address_of(result: tuple[int, dict[str, Any] | None, str]) -> str:
    code, out, err = result
    assert code == 0 and out is not None, (out, err)
    return str(out["ips"][0]["address"]).split("/")[0]


def add_until_taken(daemon: DaemonProcess, container: str, identity: str,
                    limit: float = 30) -> str:
    deadline = time.monotonic() + limit
    while True:
        result = add(daemon, container, identity)
        if result[0] == 0:
            return address_of(result)
        assert time.monotonic() < deadline, result
        time.sleep(0.3)


def holders(ctl_env: dict[str, str], address: str) -> list[str]:
    rows = run(ctl_env, "get", "allocations", "-o", "wide").splitlines()
    return [row for row in rows if f" {address} " in f" {row} " or row.split()[:1] == [address]
            or address in row.split()]


def test_clock_skew_between_hosts_makes_the_returning_node_reassert_a_taken_over_address(
        cluster: tuple[dict[str, DaemonProcess], Path], etcd: EtcdServer, prefix: str,
        ctl_env: dict[str, str]) -> None:
    """n2's clock is 10 minutes behind n1's (docs/design.md#sticky-addresses: clock skew
    between hosts does not matter). n2 takes web-0 over after n1's daemon was killed;
    n1's daemon restarts.
    Its record check should drop web-0's old handle, not re-assert it against n2."""
    holder, tmp_path = cluster
    skew = tmp_path / "skew"
    skew.mkdir()
    (skew / "sitecustomize.py").write_text(
        # Only the engine's clock (the wall clock of n2's host): gRPC deadlines stay true.
        "import sys, time\n_real = time.time\n"
        "def _skewed() -> float:\n"
        "    caller = sys._getframe(1).f_globals.get('__name__', '')\n"
        "    return _real() - 600 if caller in ('topoipam.daemon.engine',) else _real()\n"
        "time.time = _skewed\n")
    holder.update(start({"n1": {}, "n2": {"PYTHONPATH": str(skew)}}, etcd, prefix, tmp_path))
    n1, n2 = holder["n1"], holder["n2"]
    web0 = address_of(add(n1, "n1-web-0", "db/web-0"))
    time.sleep(1.5)  # n1's record is written
    n1.kill()
    assert add_until_taken(n2, "n2-web-0", "db/web-0") == web0
    n1.start()
    time.sleep(3)
    log = n1.log().lower()
    check = ctl(ctl_env, "ipam", "check")
    conflicts = ctl(ctl_env, "ipam", "conflicts")
    rows = run(ctl_env, "get", "allocations", "-o", "wide")
    # web-0 on n2 is deleted and starts again on n2: it must keep its sticky address.
    assert cni("DEL", conf(n2, "db/web-0"), container="n2-web-0")[0] == 0
    again = add(n2, "n2-web-0b", "db/web-0")
    after = ctl(ctl_env, "ipam", "check")
    rows_after = run(ctl_env, "get", "allocations", "-o", "wide")
    print(f"AFTER re-ADD:\n{after.stdout}{after.stderr}\n{rows_after}")
    # The old pod's DEL finally comes (kubelet cleans up n1): it must free nothing of n2's.
    print("OLD DEL", cni("DEL", conf(n1, "db/web-0"), container="n1-web-0"))
    time.sleep(1)
    final = ctl(ctl_env, "ipam", "check")
    print(f"FINAL:\n{final.stdout}{final.stderr}\n"
          f"{run(ctl_env, 'get', 'allocations', '-o', 'wide')}")
    fresh = address_of(cni("ADD", {"cniVersion": "1.1.0", "name": NETWORK,
                                   "ipam": {"type": "topoipam", "socket": n1.socket}},
                           container="n1-fresh"))
    assert fresh != web0, "the old pod's DEL freed web-0's address under the running n2 pod"
    report = (f"n1 log:\n{n1.log()}\ncheck:\n{check.stdout}{check.stderr}\nconflicts:\n"
              f"{conflicts.stdout}{conflicts.stderr}\nallocations:\n{rows}\nre-ADD: {again}")
    assert "conflict" not in log and "contested" not in log, report
    assert check.returncode == 0 and "OK" in check.stdout, report
    assert address_of(again) == web0, report


def test_frozen_daemon_resumed_after_takeover_does_not_claim_the_address_back(
        cluster: tuple[dict[str, DaemonProcess], Path], etcd: EtcdServer, prefix: str,
        ctl_env: dict[str, str]) -> None:
    """n1's daemon is frozen (SIGSTOP), not dead; n2 takes web-0 over; n1 resumes (SIGCONT)."""
    holder, tmp_path = cluster
    holder.update(start({"n1": {}, "n2": {}}, etcd, prefix, tmp_path))
    n1, n2 = holder["n1"], holder["n2"]
    web0 = address_of(add(n1, "n1-web-0", "db/web-0"))
    time.sleep(1.5)
    assert n1.process is not None
    os.kill(n1.process.pid, signal.SIGSTOP)
    assert add_until_taken(n2, "n2-web-0", "db/web-0") == web0
    os.kill(n1.process.pid, signal.SIGCONT)
    n1.wait_serving(20)
    time.sleep(3)
    # The resumed n1 answers its old pod: CHECK must fail, a repeated ADD must be refused.
    code, out, _ = cni("CHECK", conf(n1, "db/web-0") | {"prevResult": {
        "cniVersion": "1.1.0", "ips": [{"address": f"{web0}/24"}]}}, container="n1-web-0")
    assert code != 0, out
    again = add(n1, "n1-web-0", "db/web-0")
    assert again[0] != 0, again
    # A new pod on n1 must not get web-0's address.
    other = address_of(cni("ADD", {"cniVersion": "1.1.0", "name": NETWORK,
                                   "ipam": {"type": "topoipam", "socket": n1.socket}},
                           container="n1-other"))
    assert other != web0
    log = n1.log().lower()
    assert "conflict" not in log and "contested" not in log, n1.log()
    check = ctl(ctl_env, "ipam", "check")
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr


def test_two_nodes_taking_over_one_identity_at_once_one_wins(
        cluster: tuple[dict[str, DaemonProcess], Path], etcd: EtcdServer, prefix: str,
        ctl_env: dict[str, str]) -> None:
    holder, tmp_path = cluster
    holder.update(start({"n1": {}, "n2": {}, "n3": {}}, etcd, prefix, tmp_path))
    n1 = holder["n1"]
    web0 = address_of(add(n1, "n1-web-0", "db/web-0"))
    n1.kill()
    # Start the clock, then wait past the takeover time.
    deadline = time.monotonic() + 20
    while add(holder["n2"], "probe", "db/web-0")[0] != 0 or False:
        explained = run(ctl_env, "explain", "identity", "db/web-0")
        if "no live topoipamd for" in explained and time.monotonic() > 0:
            break
        assert time.monotonic() < deadline
        time.sleep(0.3)
    else:
        pytest.fail("took over by the probe")
    time.sleep(TAKEOVER + 1)
    results: dict[str, tuple[int, dict[str, Any] | None, str]] = {}

    def go(node: str) -> None:
        results[node] = add(holder[node], f"{node}-web-0", "db/web-0")

    threads = [threading.Thread(target=go, args=(n,)) for n in ("n2", "n3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [n for n, r in results.items() if r[0] == 0]
    assert len(won) == 1, results
    assert address_of(results[won[0]]) == web0
    check = ctl(ctl_env, "ipam", "check")
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_park_racing_the_old_nodes_del_and_the_takeover_metric(
        cluster: tuple[dict[str, DaemonProcess], Path], etcd: EtcdServer, prefix: str,
        ctl_env: dict[str, str]) -> None:
    """--park --force races n1's own DEL of the pod; then n2 takes web-1 over (metric)."""
    import urllib.request
    holder, tmp_path = cluster
    port = free_port()
    holder.update(start({"n1": {}}, etcd, prefix, tmp_path))
    n2 = DaemonProcess("n2", str(tmp_path / "n2.sock"), etcd.endpoint, prefix,
                       str(tmp_path / "n2.log"),
                       ["--labels", "rack=0", "--metrics-address", f"127.0.0.1:{port}"])
    holder["n2"] = n2.start()
    n1 = holder["n1"]
    for round_ in range(5):
        identity = f"db/race-{round_}"
        address_of(add(n1, f"n1-{round_}", identity))
        outcome: dict[str, Any] = {}

        def park(outcome: dict[str, Any] = outcome, identity: str = identity) -> None:
            outcome["park"] = ctl(ctl_env, "ipam", "release", "--identity", identity,
                                  "--park", "--force")

        def delete(outcome: dict[str, Any] = outcome, identity: str = identity,
                   round_: int = round_) -> None:
            outcome["del"] = cni("DEL", conf(n1, identity), container=f"n1-{round_}")

        threads = [threading.Thread(target=park), threading.Thread(target=delete)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcome["del"][0] == 0, outcome
        assert "Traceback" not in outcome["park"].stderr, outcome
        # Parked exactly once: n2 gets the same address back.
        explained = run(ctl_env, "explain", "identity", identity)
        assert "parked" in explained, explained
    check = ctl(ctl_env, "ipam", "check")
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr
    web1 = address_of(add(n1, "n1-web-1", "db/web-1"))
    n1.kill()
    assert add_until_taken(n2, "n2-web-1", "db/web-1") == web1
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    lines = [line for line in body.splitlines()
             if line.startswith("topoipam_sticky_takeovers_total")]
    assert lines and lines[0].split()[-1] in ("1.0", "1"), lines


def test_takeover_zero_means_never_and_delete_node_leaves_no_absence_record(
        cluster: tuple[dict[str, DaemonProcess], Path], etcd: EtcdServer, prefix: str,
        ctl_env: dict[str, str]) -> None:
    from tests.etcd_cluster import etcdctl
    holder, tmp_path = cluster
    run(ctl_env, "ipam", "configure", "--sticky-takeover-seconds", "0")
    holder.update(start({"n1": {}, "n2": {}}, etcd, prefix, tmp_path))
    n1, n2 = holder["n1"], holder["n2"]
    address_of(add(n1, "n1-web-0", "db/web-0"))
    n1.kill()
    deadline = time.monotonic() + LEASE + 6
    while time.monotonic() < deadline:
        result = add(n2, "n2-web-0", "db/web-0")
        assert result[0] != 0, result
        time.sleep(0.5)
    assert result[1] is not None and "--park" in str(result[1].get("msg")), result
    assert "never" in run(ctl_env, "explain", "identity", "db/web-0").lower()
    done = ctl(ctl_env, "delete", "node", "n1", "--force")
    assert done.returncode == 0, done.stderr
    keys = etcdctl(etcd.endpoint, "get", "--prefix", "--keys-only", f"{prefix}/absent/").stdout
    check = ctl(ctl_env, "ipam", "check")
    assert check.returncode == 0 and "Traceback" not in check.stderr, check.stdout + check.stderr
    assert not keys.strip(), keys
