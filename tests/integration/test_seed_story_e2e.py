"""The seed's story, all of README's eight steps: four daemons, topoipamctl, the plugin exec'd."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EtcdServer
from tests.daemons import DaemonProcess, cni, ctl, rack_pools_manifest

RACK_POOLS = rack_pools_manifest()

RACK = {"node-0": "0", "node-1": "0", "node-2": "1", "node-3": "1"}
POOL_OF_RACK = {"0": ipaddress.ip_network("192.168.0.0/24"),
                "1": ipaddress.ip_network("192.168.1.0/24")}


@pytest.fixture
def cluster(etcd: EtcdServer, prefix: str, tmp_path: Path) -> Iterator[dict[str, DaemonProcess]]:
    daemons: dict[str, DaemonProcess] = {}
    try:
        for node in [*RACK, "node-4"]:
            run_dir = tmp_path / node
            run_dir.mkdir(mode=0o750)
            daemons[node] = DaemonProcess(node, str(run_dir / "topoipamd.sock"), etcd.endpoint,
                                          prefix, str(tmp_path / f"{node}.log")).start(wait=False)
        for daemon in daemons.values():
            daemon.wait_serving()
        yield daemons
    finally:
        for daemon in daemons.values():
            daemon.stop()


def net_config(daemon: DaemonProcess, version: str = "1.0.0") -> dict[str, Any]:
    return {"cniVersion": version, "name": "k8s-pod-network",
            "ipam": {"type": "topoipam", "socket": daemon.socket}}


def add(daemon: DaemonProcess, container: str, pod: str) -> str:
    code, result, err = cni("ADD", net_config(daemon), container=container,
                            args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}")
    assert code == 0, f"{result} {err}"
    assert result is not None and "Traceback" not in err
    return str(result["ips"][0]["address"]).split("/")[0]


def test_seed_story_end_to_end(cluster: dict[str, DaemonProcess], ctl_env: dict[str, str]
                               ) -> None:
    def run(*args: str, input: str | None = None, expect: int = 0) -> str:
        done = ctl(ctl_env, *args, input=input)
        assert done.returncode == expect, f"topoipamctl {' '.join(args)}: {done.stderr}"
        assert "Traceback" not in done.stderr
        return done.stdout

    # 1. the default pool exists and is listed
    run("create", "ippool", "default-ipv4-ippool", "--cidr", "192.168.0.0/16")
    assert "192.168.0.0/16" in run("get", "ippool", "-o", "wide")
    # 2. the operator deletes it
    run("delete", "ippool", "default-ipv4-ippool")
    # 3. labels the nodes
    for node, rack in RACK.items():
        run("label", "nodes", node, f"rack={rack}")
    # 4. one pool per rack from a manifest
    run("apply", "-f", "-", input=RACK_POOLS)
    wide = run("get", "ippool", "-o", "wide")
    assert "rack-0-ippool" in wide and "rack-1-ippool" in wide
    assert "default-ipv4-ippool" not in wide
    # 8. every node is covered (node-4 is labelled later)
    run("label", "nodes", "node-4", "rack=0")
    run("check", "coverage")

    # 5. five workloads across the four nodes, each from its rack's pool
    placed = {}
    for i, node in enumerate(["node-0", "node-1", "node-2", "node-3", "node-0"]):
        ip = add(cluster[node], f"nginx-{i}-cid", f"nginx-{i}")
        assert ipaddress.ip_address(ip) in POOL_OF_RACK[RACK[node]], (node, ip)
        placed[ip] = (node, f"nginx-{i}")
    allocations = json.loads(run("get", "allocations", "-o", "json"))
    assert {a["ip"]: (a["node"], a["pod"]) for a in allocations} == placed
    assert {a["namespace"] for a in allocations} == {"default"}
    assert "192.168.0." in run("ipam", "show", "--show-blocks")

    # 6. a node that no pool selects gets a clear CNI error
    run("label", "nodes", "node-4", "rack=2", "--overwrite")
    deadline = time.monotonic() + 1
    while True:
        code, error, err = cni("ADD", net_config(cluster["node-4"]), container="lonely-cid",
                               args="K8S_POD_NAMESPACE=default;K8S_POD_NAME=lonely")
        if code != 0 or time.monotonic() > deadline:
            break
        cni("DEL", net_config(cluster["node-4"]), container="lonely-cid")
    assert code == 1 and error is not None, error
    assert error["code"] >= 100
    message = error["msg"] + " " + str(error.get("details", ""))
    for fragment in ("node-4", "rack=2", "rack-0-ippool", "rack-1-ippool"):
        assert fragment in message, message
    assert "Traceback" not in err
    # 8. coverage names it
    coverage = ctl(ctl_env, "check", "coverage")
    assert coverage.returncode == 1 and "node-4" in coverage.stdout + coverage.stderr

    # 7. relabelling moves the next allocation within a second; earlier addresses stay
    old_ips = [ip for ip, (node, _) in placed.items() if node == "node-0"]
    run("label", "nodes", "node-0", "rack=1", "--overwrite")
    changed = time.monotonic()
    new_ip = add(cluster["node-0"], "moved-cid", "moved")
    while ipaddress.ip_address(new_ip) not in POOL_OF_RACK["1"]:
        assert time.monotonic() - changed < 1.0, "the relabel took more than a second"
        cni("DEL", net_config(cluster["node-0"]), container="moved-cid")
        new_ip = add(cluster["node-0"], "moved-cid", "moved")
    allocations = json.loads(run("get", "allocations", "-o", "json"))
    assert {a["ip"] for a in allocations} >= set(old_ips)
    placement = run("check", "placement")
    for ip in old_ips:
        assert ip in placement


def test_cni_verbs_against_a_real_daemon(cluster: dict[str, DaemonProcess],
                                         ctl_env: dict[str, str]) -> None:
    assert ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.50.0.0/24").returncode == 0
    daemon = cluster["node-1"]
    config = net_config(daemon)
    first = add(daemon, "c1", "p1")
    assert add(daemon, "c1", "p1") == first  # ADD is idempotent per container and ifname
    code, result, _ = cni("ADD", config, container="c1")
    assert code == 0 and result is not None
    code, _, err = cni("CHECK", {**config, "prevResult": result}, container="c1")
    assert code == 0, err
    for _ in range(2):  # DEL twice succeeds
        code, out, err = cni("DEL", config, container="c1")
        assert code == 0, f"{out} {err}"
    code, error, _ = cni("CHECK", {**config, "prevResult": result}, container="c1")
    assert code == 1 and error is not None and error["code"] >= 100

    # GC keeps the valid attachments and releases the rest
    keep, drop = add(daemon, "keep", "k"), add(daemon, "drop", "d")
    gc_config = {**net_config(daemon, "1.1.0"), "cni.dev/valid-attachments": [
        {"containerID": "keep", "ifname": "eth0"}]}
    code, out, err = cni("GC", gc_config)
    assert code == 0, f"{out} {err}"
    held = {a["ip"] for a in json.loads(ctl(ctl_env, "get", "allocations", "-o",
                                              "json").stdout)}
    assert keep in held and drop not in held

    # STATUS: fine while the daemon runs, 50 when it is gone
    status_config = net_config(daemon, "1.1.0")
    code, out, err = cni("STATUS", status_config)
    assert code == 0, f"{out} {err}"
    daemon.stop()
    code, error, _ = cni("STATUS", status_config)
    assert code == 1 and error is not None and error["code"] == 50
    code, error, _ = cni("ADD", config, container="c9")
    assert code == 1 and error is not None and error["code"] == 11
