"""The metrics the shipped alert rules use, scraped from real daemons.

Every ``topoipam_*`` series that ``deploy/prometheus/topoipam-rules.yaml``
names must be exported by a daemon (tests/test_deploy.py runs promtool on the
rules themselves); the values here come from a real allocation path: a node
that claims the only block of a shared pool, a node in the other rack that
must borrow from it, and a node that no pool selects.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import EtcdServer
from tests.daemons import DaemonProcess, ctl
from topoipam.daemon.local_etcd import free_port
from topoipam.proto import ipam_pb2

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "topoipam-rules.yaml"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def rule_metrics() -> set[str]:
    """The raw metric names the rules' expressions use (not the recorded ``topoipam:`` ones)."""
    names = set()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            names |= set(re.findall(r"\btopoipam_[a-z_]+", rule["expr"]))
    return names


@pytest.fixture
def daemons(etcd: EtcdServer, prefix: str, tmp_path: Path) -> Iterator[dict[str, DaemonProcess]]:
    started: dict[str, DaemonProcess] = {}
    yield started
    for daemon in started.values():
        daemon.stop()


def start(daemons: dict[str, DaemonProcess], etcd: EtcdServer, prefix: str, tmp_path: Path,
          node: str) -> tuple[DaemonProcess, int]:
    run_dir = tmp_path / f"run-{node}"
    run_dir.mkdir(mode=0o750)
    port = free_port()
    daemon = DaemonProcess(node, str(run_dir / "topoipamd.sock"), etcd.endpoint, prefix,
                           str(tmp_path / f"{node}.log"),
                           ["--metrics-address", f"127.0.0.1:{port}"])
    daemons[node] = daemon.start()
    return daemon, port


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def allocate(daemon: DaemonProcess, container: str) -> ipam_pb2.AllocateResponse:
    with daemon.stub() as stub:
        response: ipam_pb2.AllocateResponse = stub.Allocate(ipam_pb2.AllocateRequest(
            attachment=ipam_pb2.Attachment(network="net", container_id=container,
                                           ifname="eth0"), assign_ipv4=True), timeout=10)
    return response


def test_daemons_export_every_metric_the_alert_rules_use(
        daemons: dict[str, DaemonProcess], etcd: EtcdServer, prefix: str, tmp_path: Path,
        ctl_env: dict[str, str]) -> None:
    # One /26 is one block: node-0 (rack 0) claims it, node-2 (rack 1) must borrow, once
    # its zone's priority pool (one address) is spent: a fallback.
    for args in (["create", "ippool", "shared", "--cidr", "10.60.0.0/26",
                  "--node-selector", "has(rack)"],
                 ["create", "ippool", "idle", "--cidr", "10.61.0.0/24",
                  "--node-selector", 'rack == "9"'],
                 ["create", "ippool", "zone-z1", "--cidr", "10.62.0.0/30", "--block-size",
                  "30", "--node-selector", 'topology.kubernetes.io/zone == "z1"',
                  "--priority", "10"],
                 ["label", "nodes", "node-0", "rack=0", "--create"],
                 ["label", "nodes", "node-2", "rack=1", "topology.kubernetes.io/zone=z1",
                  "--create"],
                 ["label", "nodes", "node-x", "role=spare", "--create"],
                 # A priority pair: node-f's second address falls back to "loose".
                 ["create", "ippool", "tight", "--cidr", "10.64.0.0/30", "--block-size", "30",
                  "--node-selector", 'role == "fallback"', "--priority", "5"],
                 ["create", "ippool", "loose", "--cidr", "10.65.0.0/28", "--block-size", "28",
                  "--node-selector", 'role == "fallback"'],
                 ["label", "nodes", "node-f", "role=fallback", "--create"]):
        done = ctl(ctl_env, *args)
        assert done.returncode == 0, done.stderr
    owner, owner_port = start(daemons, etcd, prefix, tmp_path, "node-0")
    borrower, borrower_port = start(daemons, etcd, prefix, tmp_path, "node-2")
    spare, spare_port = start(daemons, etcd, prefix, tmp_path, "node-x")
    fallback, fallback_port = start(daemons, etcd, prefix, tmp_path, "node-f")
    assert [allocate(fallback, f"f{i}").addresses[0].pool for i in range(2)] == ["tight",
                                                                                  "loose"]
    [own] = allocate(owner, "c0").addresses
    [zoned] = allocate(borrower, "c1").addresses
    assert zoned.block == "10.62.0.0/30"
    [borrowed] = allocate(borrower, "c2").addresses
    assert own.block == borrowed.block == "10.60.0.0/26"
    with pytest.raises(grpc.RpcError) as info:
        allocate(spare, "cx")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    scraped = {node: scrape(port) for node, port in
               (("node-0", owner_port), ("node-2", borrower_port), ("node-x", spare_port),
                    ("node-f", fallback_port))}
    exported = {name for samples in scraped.values() for name, _ in samples}
    missing = {name for name in rule_metrics() if name not in exported}
    assert not missing, f"the alert rules use metrics no daemon exports: {sorted(missing)}"

    owner_metrics, borrower_metrics, spare_metrics = (scraped[n] for n in ("node-0", "node-2",
                                                                           "node-x"))
    assert value(scraped["node-f"], "topoipam_pool_fallbacks_total", from_pool="tight",
                 to_pool="loose") == 1
    # Pool capacity (62 addresses less network, broadcast and gateway), from every daemon.
    for samples in scraped.values():
        assert value(samples, "topoipam_pool_capacity_addresses", pool="shared",
                     family="4") == 61
        assert value(samples, "topoipam_pool_capacity_addresses", pool="idle",
                     family="4") == 253
    # In use: both addresses sit in node-0's block.
    assert value(owner_metrics, "topoipam_pool_addresses_in_use", pool="shared") == 2
    # Which pools select each node, and the labels that place it in a rack.
    assert value(owner_metrics, "topoipam_node_pool_selected", node="node-0", pool="shared",
                 family="4") == 1
    assert value(owner_metrics, "topoipam_node_selected_pools", node="node-0",
                 family="4") == 1
    assert value(spare_metrics, "topoipam_node_selected_pools", node="node-x",
                 family="4") == 0
    assert value(owner_metrics, "topoipam_node_labels", node="node-0", label_rack="0") == 1
    assert value(borrower_metrics, "topoipam_node_labels", node="node-2", label_rack="1",
                 label_topology_kubernetes_io_zone="z1") == 1
    # Borrowing counts where it happened; the failed allocation by its outcome.
    assert value(borrower_metrics, "topoipam_allocations_borrowed_total") == 1
    assert value(borrower_metrics, "topoipam_pool_fallbacks_total", from_pool="zone-z1",
                 to_pool="shared") == 1
    assert value(owner_metrics, "topoipam_allocations_borrowed_total") == 0
    assert value(spare_metrics, "topoipam_requests_total", method="Allocate",
                 outcome="NoPoolForNode") == 1
    # Alerted outcomes exist from the start, so increase() sees their first occurrence.
    for outcome in ("Conflict", "PoolExhausted", "NoPoolForNode"):
        assert value(owner_metrics, "topoipam_requests_total", method="Allocate",
                     outcome=outcome) == 0
    assert value(owner_metrics, "topoipam_cache_in_sync") == 1
    assert value(owner_metrics, "topoipam_etcd_errors_total") == 0
