"""The gateway is never a pod's address: real `bridge` and `ptp` in network namespaces.

The configs are docs/cni.md's, read from it (only the socket path points at the
test's daemon). Pools are fresh and carry no IPReservation: what keeps the
gateway from the pods is the pool's gateway, nothing the page does not show.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EtcdServer
from tests.daemons import DaemonProcess, ctl
from tests.e2e.netns import (
    Json,
    addresses,
    default_route,
    documented_config,
    exec_plugin,
    in_ns,
    namespaces,
    require_root_and_plugins,
    run_chain,
)

pytestmark = pytest.mark.e2e

PODS = 10


def start_daemon(tmp_path: Path, node: str, etcd: EtcdServer, prefix: str) -> DaemonProcess:
    run_dir = tmp_path / node
    run_dir.mkdir(mode=0o750)
    return DaemonProcess(node, str(run_dir / "topoipamd.sock"), etcd.endpoint, prefix,
                         str(tmp_path / f"{node}.log")).start()


def create_pool(ctl_env: dict[str, str], name: str, cidr: str, *extra: str) -> None:
    done = ctl(ctl_env, "create", "ippool", name, "--cidr", cidr, *extra)
    assert done.returncode == 0, done.stderr


def allocations(ctl_env: dict[str, str]) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(
        ctl(ctl_env, "get", "allocations", "-o", "json").stdout)
    return listed


def test_readme_bridge_config_chained_never_gives_a_pod_the_bridge_address(
        etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]) -> None:
    require_root_and_plugins("bridge", "portmap")
    create_pool(ctl_env, "e2e-v4", "10.251.0.0/24")
    daemon = start_daemon(tmp_path, "e2e-node", etcd, prefix)
    conflist = documented_config("bridge", daemon.socket)
    try:
        with namespaces(1, "h") as [host], namespaces(PODS, "c") as pods:
            results = {}
            for i, pod in enumerate(pods):
                result = run_chain(conflist, "ADD", host, pod, f"pod{i}")
                assert result is not None
                results[pod] = result
            bridge_addresses = addresses(host, 4, "cni0")
            assert bridge_addresses == ["10.251.0.1/24"]
            held = set()
            for pod, result in results.items():
                [ip] = result["ips"]
                assert ip["gateway"] == "10.251.0.1"
                assert ip["address"] != "10.251.0.1/24"
                assert addresses(pod, 4, "eth0") == [ip["address"]]
                assert "via 10.251.0.1 dev eth0" in default_route(pod, 4)
                held.add(ip["address"])
            assert len(held) == PODS
            assert "10.251.0.1" not in {a["ip"] for a in allocations(ctl_env)}
            for i, pod in enumerate(pods):
                run_chain(conflist, "CHECK", host, pod, f"pod{i}", results[pod])
            for i, pod in enumerate(pods):
                run_chain(conflist, "DEL", host, pod, f"pod{i}", results[pod])
        assert allocations(ctl_env) == []
        check = ctl(ctl_env, "ipam", "check")
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        daemon.stop()


@pytest.mark.parametrize("chained", [False, True], ids=["raw-exec", "chained"])
@pytest.mark.parametrize("families", [(4,), (6,), (4, 6)], ids=["ipv4", "ipv6", "dual-stack"])
def test_bridge_is_gateway_without_gateway_on_a_fresh_pool(
        families: tuple[int, ...], chained: bool, etcd: EtcdServer, prefix: str,
        tmp_path: Path, ctl_env: dict[str, str]) -> None:
    require_root_and_plugins("bridge", "portmap")
    gateways = {4: "10.252.0.1", 6: "fd00:252::1"}
    create_pool(ctl_env, "e2e-v4", "10.252.0.0/24")
    create_pool(ctl_env, "e2e-v6", "fd00:252::/120")
    daemon = start_daemon(tmp_path, "e2e-node", etcd, prefix)
    bridge = {
        "type": "bridge", "bridge": "tpibr6", "isGateway": True,
        "ipam": {"type": "topoipam", "socket": daemon.socket, "assign_ipv4": 4 in families,
                 "assign_ipv6": 6 in families,
                 "routes": [{"dst": "0.0.0.0/0" if family == 4 else "::/0"}
                            for family in families]},
    }
    conflist = {"cniVersion": "1.0.0", "name": "e2e-dual",
                "plugins": [bridge, {"type": "portmap", "capabilities": {"portMappings": True}}]}

    def cni(command: str, pod: str, i: int, result: Json | None = None) -> Json | None:
        if chained:  # the way libcni runs a conflist: in order, prevResult passed on
            return run_chain(conflist, command, host, pod, f"pod{i}", result)
        config = {"cniVersion": "1.0.0", "name": "e2e-dual", **bridge}
        if result is not None:
            config["prevResult"] = result
        code, out, err = exec_plugin("bridge", command, config, host, pod, f"pod{i}")
        assert code == 0, f"{out} {err}\n{daemon.log()}"
        return out

    try:
        with namespaces(1, "h") as [host], namespaces(PODS, "c") as pods:
            held: set[str] = set()
            results = {}
            for i, pod in enumerate(pods):
                result = cni("ADD", pod, i)
                assert result is not None
                results[pod] = result
                by_family = {ipaddress.ip_interface(ip["address"]).version: ip
                             for ip in result["ips"]}
                assert sorted(by_family) == list(families)
                for family, ip in by_family.items():
                    assert ip["gateway"] == gateways[family]
                    assert ipaddress.ip_interface(ip["address"]).ip != ipaddress.ip_address(
                        gateways[family])
                    assert addresses(pod, family, "eth0") == [ip["address"]]
                    assert f"via {gateways[family]} dev eth0" in default_route(pod, family)
                    held.add(ip["address"])
            assert len(held) == PODS * len(families)
            for family in families:
                plen = 24 if family == 4 else 120
                assert addresses(host, family, "tpibr6") == [f"{gateways[family]}/{plen}"]
            for i, pod in enumerate(pods):
                cni("CHECK", pod, i, results[pod])
                cni("DEL", pod, i, results[pod])
        assert allocations(ctl_env) == []
    finally:
        daemon.stop()


def test_readme_ptp_config_per_rack_pools_get_their_racks_address_and_gateway(
        etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]) -> None:
    require_root_and_plugins("ptp")
    create_pool(ctl_env, "rack-0", "10.253.0.0/24", "--node-selector", 'rack == "0"')
    create_pool(ctl_env, "rack-1", "10.253.1.0/24", "--node-selector", 'rack == "1"')
    racks = {"node-0": "0", "node-2": "1"}
    for node, rack in racks.items():
        done = ctl(ctl_env, "label", "nodes", node, f"rack={rack}", "--create")
        assert done.returncode == 0, done.stderr
    daemons = {node: start_daemon(tmp_path, node, etcd, prefix) for node in racks}
    try:
        with namespaces(len(racks), "h") as hosts, namespaces(4, "c") as pods:
            for n, (node, rack) in enumerate(racks.items()):
                conflist = documented_config("ptp", daemons[node].socket)
                pool = ipaddress.ip_network(f"10.253.{rack}.0/24")
                gateway = f"10.253.{rack}.1"
                for pod in pods[2 * n: 2 * n + 2]:
                    result = run_chain(conflist, "ADD", hosts[n], pod, pod)
                    assert result is not None
                    [ip] = result["ips"]
                    address = ipaddress.ip_interface(ip["address"])
                    assert address.ip in pool and str(address.ip) != gateway, (node, ip)
                    assert ip["gateway"] == gateway
                    # The host side of the pod's veth took the gateway; the pod reaches it.
                    assert f"{gateway}/32" in in_ns(hosts[n], "ip", "-4", "-o", "addr",
                                                    "show").stdout
                    ping = in_ns(pod, "ping", "-c", "1", "-W", "2", gateway, check=False)
                    assert ping.returncode == 0, ping.stdout + ping.stderr
                    run_chain(conflist, "CHECK", hosts[n], pod, pod, result)
                for pod in pods[2 * n: 2 * n + 2]:
                    run_chain(conflist, "DEL", hosts[n], pod, pod)
        assert allocations(ctl_env) == []
    finally:
        for daemon in daemons.values():
            daemon.stop()
