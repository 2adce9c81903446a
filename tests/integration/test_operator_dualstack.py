"""Hostile reproductions: dual-stack sticky takeover and maxBlocksPerHost per
IP family with strictAffinity and the warm reserve; real etcd, real daemons."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EtcdServer
from tests.daemons import DaemonProcess, NodeDaemons, cni, ctl

POOLS = """apiVersion: topoipam/v1
kind: IPPool
metadata:
  name: v4
spec:
  cidr: 192.168.0.0/24
  blockSize: 29
  nodeSelector: rack == "0"
---
apiVersion: topoipam/v1
kind: IPPool
metadata:
  name: v6
spec:
  cidr: fd00:10::/120
  blockSize: 125
  nodeSelector: rack == "0"
"""


def run(ctl_env: dict[str, str], *args: str, input: str | None = None) -> str:
    done = ctl(ctl_env, *args, input=input)
    assert done.returncode == 0, f"topoipamctl {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture
def nodes(node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> dict[str, DaemonProcess]:
    run(ctl_env, "apply", "-f", "-", input=POOLS)
    flags = ["--labels", "rack=0", "--node-lease-seconds", "3"]
    return node_daemons.start_all({"n1": flags, "n2": flags})


def conf(daemon: DaemonProcess, identity: str = "", v4: bool = True, v6: bool = True
         ) -> dict[str, Any]:
    ipam: dict[str, Any] = {"type": "topoipam", "socket": daemon.socket,
                            "assign_ipv4": v4, "assign_ipv6": v6}
    config: dict[str, Any] = {"cniVersion": "1.1.0", "name": "ds", "ipam": ipam}
    if identity:
        ipam["sticky"] = True
        config["args"] = {"cni": {"identity": identity}}
    return config


def addresses(result: tuple[int, dict[str, Any] | None, str]) -> list[str]:
    code, out, err = result
    assert code == 0 and out is not None, (out, err)
    return sorted(str(ip["address"]).split("/")[0] for ip in out["ips"])


def test_dual_stack_identity_is_taken_over_with_both_families(
        nodes: dict[str, DaemonProcess], ctl_env: dict[str, str]) -> None:
    run(ctl_env, "ipam", "configure", "--sticky-takeover-seconds", "2")
    time.sleep(1)
    n1, n2 = nodes["n1"], nodes["n2"]
    before = addresses(cni("ADD", conf(n1, "db/web-0"), container="n1-web-0"))
    assert len(before) == 2
    n1.kill()
    deadline = time.monotonic() + 30
    while True:
        result = cni("ADD", conf(n2, "db/web-0"), container="n2-web-0")
        if result[0] == 0:
            break
        assert time.monotonic() < deadline, result
        time.sleep(0.3)
    assert addresses(result) == before
    check = ctl(ctl_env, "ipam", "check")
    assert check.returncode == 0 and "Traceback" not in check.stderr, check.stdout + check.stderr
    explained = ctl(ctl_env, "explain", "identity", "db/web-0")
    assert explained.returncode == 0, explained.stderr


def test_max_blocks_per_host_per_family_with_strict_affinity_and_warm_reserve(
        nodes: dict[str, DaemonProcess], ctl_env: dict[str, str]) -> None:
    run(ctl_env, "ipam", "configure", "--strictaffinity", "true", "--max-blocks-per-host", "1",
        "--warm-addresses", "20")
    time.sleep(3)  # the reserve is topped up
    n1 = nodes["n1"]
    first = addresses(cni("ADD", conf(n1), container="c0"))
    assert len(first) == 2, first
    shown = run(ctl_env, "ipam", "show", "--show-blocks")
    # One block per family for n1, none more (the cap is per family).
    n1_blocks = [line for line in shown.splitlines() if " n1" in f" {line}"]
    v4 = [b for b in n1_blocks if "192.168." in b]
    v6 = [b for b in n1_blocks if "fd00:" in b]
    assert len(v4) == 1 and len(v6) == 1, shown
    # Fill the IPv4 block: then IPv4 ADDs fail (cap), IPv6-only ADDs still work.
    codes = []
    for i in range(1, 10):
        codes.append(cni("ADD", conf(n1, v6=False), container=f"v4-{i}")[0])
    assert codes.count(0) >= 1 and codes[-1] != 0, codes
    assert addresses(cni("ADD", conf(n1, v4=False), container="v6only"))
    failed = cni("ADD", conf(n1), container="ds-late")
    assert failed[0] != 0 and failed[1] is not None, failed
    assert "Traceback" not in failed[2]
    # Nothing half-written: the failed dual-stack ADD left no IPv6 address behind.
    rows = run(ctl_env, "get", "allocations", "-o", "wide")
    assert "ds-late" not in rows, rows
    check = ctl(ctl_env, "ipam", "check")
    assert check.returncode == 0, check.stdout + check.stderr


SMALL_V4 = """apiVersion: topoipam/v1
kind: IPPool
metadata:
  name: v4small
spec:
  cidr: 10.5.0.0/29
  blockSize: 29
---
apiVersion: topoipam/v1
kind: IPPool
metadata:
  name: v6big
spec:
  cidr: fd00:20::/120
  blockSize: 125
"""


def test_warm_reserve_of_ipv6_is_not_blocked_by_an_exhausted_ipv4_pool(
        etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]) -> None:
    """The only IPv4 block belongs to n2; n1's IPv4 reserve can never be met. Its IPv6
    reserve must still be topped up (the reserve is per family)."""
    run(ctl_env, "apply", "-f", "-", input=SMALL_V4)
    started: list[DaemonProcess] = []
    try:
        n2 = DaemonProcess("n2", str(tmp_path / "n2.sock"), etcd.endpoint, prefix,
                           str(tmp_path / "n2.log")).start()
        started.append(n2)
        assert cni("ADD", conf(n2, v6=False), container="n2-c0")[0] == 0
        n1 = DaemonProcess("n1", str(tmp_path / "n1.sock"), etcd.endpoint, prefix,
                           str(tmp_path / "n1.log")).start()
        started.append(n1)
        run(ctl_env, "ipam", "configure", "--warm-addresses", "4")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            shown = run(ctl_env, "ipam", "show", "--show-blocks")
            n1_v6 = [line for line in shown.splitlines()
                     if "fd00:20:" in line and " n1" in f" {line}"]
            n2_v6 = [line for line in shown.splitlines()
                     if "fd00:20:" in line and " n2" in f" {line}"]
            if n1_v6 and n2_v6:
                break
            time.sleep(0.5)
        assert n2_v6, shown  # n2's IPv4 reserve is met: its IPv6 one is topped up
        assert n1_v6, shown  # n1's IPv6 reserve waits behind an IPv4 pool with no block
    finally:
        for daemon in started:
            daemon.stop()
