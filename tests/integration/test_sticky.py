"""Sticky addresses (issue 16): the plugin exec'd against real daemons on three nodes in
two racks, and real etcd.

web-0 keeps its address across container IDs and nodes of its rack, parks it on
DEL, loses it to a new rack or to the end of its hold, and is never live twice.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import EtcdServer
from tests.daemons import DaemonProcess, NodeDaemons, cni, ctl, rack_pools_manifest
from tests.etcd_cluster import etcdctl_binary

NETWORK = "sticky-net"
RACKS = {"node-0": "0", "node-1": "0", "node-2": "1"}


@pytest.fixture
def daemons(node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> dict[str, DaemonProcess]:
    run(ctl_env, "apply", "-f", "-", input=rack_pools_manifest())
    return node_daemons.start_all({node: ["--labels", f"rack={rack},host={node}"]
                                   for node, rack in RACKS.items()})


def run(ctl_env: dict[str, str], *args: str, input: str | None = None) -> str:
    done = ctl(ctl_env, *args, input=input)
    assert done.returncode == 0, f"topoipamctl {' '.join(args)}: {done.stderr}"
    return done.stdout


def conf(daemon: DaemonProcess, sticky: bool = True, identity: str = "") -> dict[str, Any]:
    config: dict[str, Any] = {"cniVersion": "1.1.0", "name": NETWORK,
                              "ipam": {"type": "topoipam", "socket": daemon.socket,
                                       "sticky": sticky}}
    if identity:
        config["args"] = {"cni": {"identity": identity}}
    return config


def pod_args(pod: str, namespace: str = "default") -> str:
    return f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"


def add(daemon: DaemonProcess, container: str, pod: str = "web-0", **kw: Any) -> str:
    code, result, err = cni("ADD", conf(daemon, **kw), container=container, args=pod_args(pod))
    assert code == 0, f"{result} {err}\n{daemon.log()}"
    assert result is not None
    return str(result["ips"][0]["address"]).split("/")[0]


def delete(daemon: DaemonProcess, container: str, pod: str = "web-0") -> None:
    code, result, err = cni("DEL", conf(daemon), container=container, args=pod_args(pod))
    assert code == 0, (result, err)


def allocations(ctl_env: dict[str, str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(run(ctl_env, "get", "allocations", "-o", "json"))
    return rows


def held(ctl_env: dict[str, str], address: str) -> dict[str, Any] | None:
    return next((r for r in allocations(ctl_env) if r["ip"] == address), None)


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def in_rack(address: str, rack: str) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(f"192.168.{rack}.0/24")


def test_web_0_keeps_its_address_in_its_rack_and_loses_it_to_another_rack(
        daemons: dict[str, DaemonProcess], ctl_env: dict[str, str]) -> None:
    identity = f"{NETWORK}/default/web-0/eth0"
    first = add(daemons["node-0"], "c1")
    assert in_rack(first, "0")
    assert add(daemons["node-0"], "c1") == first  # idempotent ADD
    delete(daemons["node-0"], "c1")
    delete(daemons["node-0"], "c1")  # DEL twice
    parked = held(ctl_env, first)
    assert parked is not None and parked["identity"] == identity
    assert parked["state"] == "parked" and parked["parked_until"]

    # Recreated on the same node with a new container ID: the same address.
    assert add(daemons["node-0"], "c2") == first
    code, _, err = cni("CHECK", {**conf(daemons["node-0"]), "prevResult": {
        "cniVersion": "1.1.0", "ips": [{"address": f"{first}/24"}]}},
        container="c2", args=pod_args("web-0"))
    assert code == 0, err
    delete(daemons["node-0"], "c2")

    # On node-1 of the same rack: borrowed from node-0's block, still the same.
    assert add(daemons["node-1"], "c3") == first
    row = held(ctl_env, first)
    assert row is not None and row["node"] == "node-1" and row["state"] == "live"
    # Per rack the address is inside the rack's aggregate; per node it is node-1's /32.
    done = ctl(ctl_env, "check", "routes", "--by", "host", "-o", "json")
    assert done.returncode == 1, done.stderr  # a borrowed /32 breaks per-node aggregation
    routes = json.loads(done.stdout)
    node_1 = next(d for d in routes["domains"] if d["value"] == "node-1")
    assert f"{first}/32" in json.dumps(node_1["exceptions"]), routes
    explained = run(ctl_env, "explain", "identity", identity)
    assert "node-0" in explained and "node-1" in explained and "node-2" not in explained
    delete(daemons["node-1"], "c3")

    # In the other rack: a new address from that rack, and the parked one freed.
    moved = add(daemons["node-2"], "c4")
    assert in_rack(moved, "1")
    assert held(ctl_env, first) is None
    assert "OK" in run(ctl_env, "ipam", "check")
    delete(daemons["node-2"], "c4")
    run(ctl_env, "ipam", "release", "--identity", identity)
    assert held(ctl_env, moved) is None
    assert "OK" in run(ctl_env, "ipam", "check")


def test_hold_expiry_frees_the_address(daemons: dict[str, DaemonProcess],
                                       ctl_env: dict[str, str]) -> None:
    run(ctl_env, "ipam", "configure", "--sticky-hold-seconds", "2")
    time.sleep(1.0)  # the daemons' caches pick the config up
    address = add(daemons["node-0"], "c1", pod="db-0")
    delete(daemons["node-0"], "c1", pod="db-0")
    row = held(ctl_env, address)
    assert row is not None and row["state"] == "parked"
    wait_for("the hold to expire", lambda: held(ctl_env, address) is None)
    assert "OK" in run(ctl_env, "ipam", "check")
    # The identity is gone: its next ADD starts afresh, at the front of the free list.
    assert add(daemons["node-0"], "c2", pod="db-0") != address


def test_concurrent_live_adds_on_two_nodes_exactly_one_succeeds(
        daemons: dict[str, DaemonProcess], ctl_env: dict[str, str]) -> None:
    for round_ in range(3):
        pod = f"racer-{round_}"
        results: dict[str, tuple[int, dict[str, Any] | None, str]] = {}

        def attempt(node: str, pod: str = pod,
                    results: dict[str, Any] = results) -> None:
            results[node] = cni("ADD", conf(daemons[node]), container=f"{node}-{pod}",
                                args=pod_args(pod))

        threads = [threading.Thread(target=attempt, args=(n,)) for n in ("node-0", "node-1")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = sorted(code for code, _, _ in results.values())
        assert codes == [0, 1], results
        loser = next(r for code, r, _ in results.values() if code == 1)
        assert loser is not None and loser["code"] == 112, loser
        message = loser["msg"]
        assert "node-0-" in message and "node-1-" in message, message
        rows = [r for r in allocations(ctl_env) if r.get("pod") == pod]
        assert len(rows) == 1, rows
    assert "OK" in run(ctl_env, "ipam", "check")


def test_sticky_add_without_an_identity_is_a_config_error(
        daemons: dict[str, DaemonProcess]) -> None:
    code, result, _ = cni("ADD", conf(daemons["node-0"]), container="c1")
    assert code == 1 and result is not None and result["code"] == 7, result
    assert "identity" in result["msg"]


def test_explicit_identity_follows_a_vm_whose_pod_changes_name(
        daemons: dict[str, DaemonProcess], ctl_env: dict[str, str]) -> None:
    vm = conf(daemons["node-0"], identity="vms/default/vm-a")
    code, result, err = cni("ADD", vm, container="launcher-1", args=pod_args("virt-1"))
    assert code == 0 and result is not None, err
    address = result["ips"][0]["address"]
    assert cni("DEL", vm, container="launcher-1", args=pod_args("virt-1"))[0] == 0
    vm = conf(daemons["node-1"], identity="vms/default/vm-a")
    code, result, err = cni("ADD", vm, container="launcher-2", args=pod_args("virt-2"))
    assert code == 0 and result is not None, err
    assert result["ips"][0]["address"] == address


def test_gc_parks_a_sticky_attachment_and_never_frees_a_parked_one(
        daemons: dict[str, DaemonProcess], ctl_env: dict[str, str]) -> None:
    daemon = daemons["node-0"]
    address = add(daemon, "c1", pod="gc-0")
    config = {**conf(daemon), "cni.dev/valid-attachments": []}
    code, result, err = cni("GC", config)
    assert code == 0, (result, err)
    row = held(ctl_env, address)
    assert row is not None and row["state"] == "parked"
    assert cni("GC", config)[0] == 0
    row = held(ctl_env, address)
    assert row is not None and row["state"] == "parked"
    assert add(daemon, "c2", pod="gc-0") == address


def test_ipam_release_of_a_parked_address_forgets_it_for_its_identity(
        daemons: dict[str, DaemonProcess], ctl_env: dict[str, str]) -> None:
    daemon = daemons["node-0"]
    address = add(daemon, "c1", pod="web-9")
    delete(daemon, "c1", pod="web-9")
    done = ctl(ctl_env, "ipam", "release", "--identity", f"{NETWORK}/default/nope/eth0")
    assert done.returncode == 0 and "holds no parked address" in done.stdout, done
    run(ctl_env, "ipam", "release", "--ip", address)
    assert held(ctl_env, address) is None
    assert "OK" in run(ctl_env, "ipam", "check")
    explained = ctl(ctl_env, "explain", "identity", f"{NETWORK}/default/web-9/eth0")
    assert explained.returncode != 0 and "does not exist" in explained.stderr, explained


def test_ipam_release_refuses_a_live_identity_and_check_finds_a_broken_one(
        daemons: dict[str, DaemonProcess], ctl_env: dict[str, str], etcd: EtcdServer,
        prefix: str) -> None:
    daemon = daemons["node-0"]
    add(daemon, "c1", pod="web-8")
    identity = f"{NETWORK}/default/web-8/eth0"
    done = ctl(ctl_env, "ipam", "release", "--identity", identity)
    assert done.returncode != 0 and "live under attachment" in done.stderr, done
    table = run(ctl_env, "get", "allocations")
    assert "IDENTITY" in table and identity in table and "live" in table
    # An identity record left pointing at a handle that is gone is a problem.
    cluster_key = f"{prefix}/handles/{NETWORK}/c1/eth0"
    subprocess.run([etcdctl_binary(), "--endpoints", etcd.endpoint, "del", cluster_key],
                   check=True, capture_output=True)
    check = ctl(ctl_env, "ipam", "check")
    assert check.returncode != 0 and f"sticky identity {identity}" in check.stdout, check


def test_park_of_a_live_identity_needs_its_node_lost_or_force(
        daemons: dict[str, DaemonProcess], ctl_env: dict[str, str]) -> None:
    address = add(daemons["node-0"], "c1", pod="web-7")
    identity = f"{NETWORK}/default/web-7/eth0"
    explained = run(ctl_env, "explain", "identity", identity)
    assert "node-0's topoipamd is alive" in explained and "--park --force" in explained
    for args, fragment in ((["--park"], "--identity ID"), (["--identity", identity, "--force"],
                                                            "--force only with --park")):
        done = ctl(ctl_env, "ipam", "release", *args)
        assert done.returncode != 0 and fragment in done.stderr, done
    done = ctl(ctl_env, "ipam", "release", "--identity", identity, "--park")
    assert done.returncode != 0 and "node-0's topoipamd is alive" in done.stderr, done
    row = held(ctl_env, address)
    assert row is not None and row["state"] == "live", row
    parked = run(ctl_env, "ipam", "release", "--identity", identity, "--park", "--force")
    assert f"parked {address}" in parked, parked
    row = held(ctl_env, address)
    assert row is not None and row["state"] == "parked", row
    assert add(daemons["node-1"], "c2", pod="web-7") == address
    assert "OK" in run(ctl_env, "ipam", "check")
    # The old pod's DEL, should its node come back, finds nothing to free.
    delete(daemons["node-0"], "c1", pod="web-7")
    row = held(ctl_env, address)
    assert row is not None and row["node"] == "node-1", row
