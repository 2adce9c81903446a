"""End to end: the real Debian CNI `bridge` plugin with `topoipam` as its IPAM plugin.

Everything happens inside network namespaces this test creates: a "host"
namespace where the bridge plugin runs and creates its bridge, and a
"container" namespace that gets eth0. No address is added outside them.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import EtcdServer
from tests.daemons import PLUGIN_DIR, DaemonProcess, ctl
from topoipam.proto import ipam_pb2

BRIDGE = "/usr/lib/cni/bridge"
pytestmark = pytest.mark.e2e


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=check)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        raise RuntimeError("the e2e tests need root for ip netns (CI runs as root)")
    if not os.access(BRIDGE, os.X_OK):
        raise RuntimeError(f"{BRIDGE} missing: apt-get install containernetworking-plugins")
    tag = uuid.uuid4().hex[:6]
    host, container = f"tpi-h-{tag}", f"tpi-c-{tag}"
    sh("ip", "netns", "add", host)
    sh("ip", "netns", "add", container)
    sh("ip", "netns", "exec", host, "ip", "link", "set", "lo", "up")
    try:
        yield host, container
    finally:
        sh("ip", "netns", "del", container, check=False)
        sh("ip", "netns", "del", host, check=False)


def bridge(command: str, config: dict[str, object], host: str, container: str,
           container_id: str) -> tuple[int, dict[str, object] | None, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": f"/var/run/netns/{container}",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=e2e;K8S_POD_NAME=web-0",
        # The bridge plugin finds its IPAM plugin by name on CNI_PATH.
        "CNI_PATH": f"/usr/lib/cni:{PLUGIN_DIR}",
    }
    done = subprocess.run(["ip", "netns", "exec", host, BRIDGE], input=json.dumps(config),
                          env=env, capture_output=True, text=True, timeout=60)
    out = done.stdout.strip()
    return done.returncode, json.loads(out) if out else None, done.stderr


def test_bridge_add_check_del(namespaces: tuple[str, str], etcd: EtcdServer, prefix: str,
                              tmp_path: Path, ctl_env: dict[str, str]) -> None:
    host, container = namespaces
    for args in (["create", "ippool", "e2e-pool", "--cidr", "10.99.0.0/24"],):
        done = ctl(ctl_env, *args)
        assert done.returncode == 0, done.stderr
    # The bridge takes the first address as its gateway: keep it out of the pool's hand-outs.
    reservation = {"apiVersion": "topoipam/v1", "kind": "IPReservation",
                   "metadata": {"name": "e2e-gateway"}, "spec": {"cidrs": ["10.99.0.1/32"]}}
    done = ctl(ctl_env, "apply", "-f", "-", input=json.dumps(reservation))
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o750)
    daemon = DaemonProcess("e2e-node", str(run_dir / "topoipamd.sock"), etcd.endpoint, prefix,
                           str(tmp_path / "daemon.log")).start()
    try:
        config: dict[str, object] = {
            "cniVersion": "1.0.0",
            "name": "e2enet",
            "type": "bridge",
            "bridge": "tpibr0",
            "isGateway": True,
            "ipam": {"type": "topoipam", "socket": daemon.socket},
        }
        code, result, err = bridge("ADD", config, host, container, "e2e-c1")
        assert code == 0, f"{result} {err}\n{daemon.log()}"
        assert result is not None
        ips = result["ips"]
        assert isinstance(ips, list) and len(ips) == 1
        address = ips[0]["address"]
        assert address.startswith("10.99.0.") and address.endswith("/24")
        assert address != "10.99.0.1/24"
        shown = sh("ip", "netns", "exec", container, "ip", "-4", "-o", "addr", "show", "eth0")
        assert address in shown.stdout
        # The container can reach its gateway on the bridge (inside our namespaces only).
        route = sh("ip", "netns", "exec", container, "ip", "route", "get", "10.99.0.1")
        assert "dev eth0" in route.stdout

        with daemon.stub() as stub:
            held = stub.Get(ipam_pb2.GetRequest(attachment=ipam_pb2.Attachment(
                network="e2enet", container_id="e2e-c1", ifname="eth0")), timeout=10)
        assert held.addresses[0].ip == address.split("/")[0]
        allocations = json.loads(ctl(ctl_env, "get", "allocations", "-o", "json").stdout)
        assert [(a["ip"], a["namespace"], a["pod"]) for a in allocations] == [
            (address.split("/")[0], "e2e", "web-0")]

        code, _, err = bridge("CHECK", {**config, "prevResult": result}, host, container,
                              "e2e-c1")
        assert code == 0, err

        code, _, err = bridge("DEL", config, host, container, "e2e-c1")
        assert code == 0, err
        gone = sh("ip", "netns", "exec", container, "ip", "link", "show", "eth0", check=False)
        assert gone.returncode != 0
        with daemon.stub() as stub, pytest.raises(grpc.RpcError) as info:
            stub.Get(ipam_pb2.GetRequest(attachment=ipam_pb2.Attachment(
                network="e2enet", container_id="e2e-c1", ifname="eth0")), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # DEL again is fine (the runtime may repeat it).
        code, _, err = bridge("DEL", config, host, container, "e2e-c1")
        assert code == 0, err
    finally:
        daemon.stop()
