"""podman end to end: real containers on a bridge and a routed (ptp) network, IPAM topoipam.

The networks are docs/cni.md's bridge, ptp and dual-stack configs, read from it
(only the daemon's socket is the test's), handed to Debian 12's podman 4.3 on its CNI
backend with the plugin ``topoipamctl install-cni`` installed. Each test
runs its own daemon for a rack-labelled node, and busybox containers get
their addresses through ``podman run``; podman itself runs in a network
namespace of the test's (tests/e2e/podman.py says what that keeps off the
machine). Nothing here sends traffic beyond that namespace and the
containers' own.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EtcdServer
from tests.daemons import DaemonProcess, ctl
from tests.e2e.netns import documented_config, in_ns, namespaces, require_root_and_plugins, sh
from tests.e2e.podman import IMAGE, Podman, require_podman
from topoipam.proto import ipam_pb2

pytestmark = pytest.mark.e2e

RACK_POOLS = {"0": "10.254.0.0/24", "1": "10.254.1.0/24"}
GATEWAYS = {"0": "10.254.0.1", "1": "10.254.1.1"}
NODE = "podman-node"
CONCURRENT = 6


def ip_forward() -> str:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()


@pytest.fixture
def host_ip_forward() -> Iterator[None]:
    """The machine's own ip_forward is what it was: the bridge's isGateway and ptp turn
    forwarding on, but only in the test's host namespace (and it is put back regardless)."""
    before = ip_forward()
    yield
    after = ip_forward()
    Path("/proc/sys/net/ipv4/ip_forward").write_text(before + "\n")
    assert after == before, "podman's networks changed the machine's net.ipv4.ip_forward"


@pytest.fixture
def podman(host_ip_forward: None) -> Iterator[Podman]:
    require_root_and_plugins("bridge", "ptp", "portmap")
    require_podman()
    # podman refuses a runroot longer than 50 characters: not under pytest's tmp_path.
    base = Path(tempfile.mkdtemp(prefix="tpi-podman-"))
    try:
        with namespaces(1, "pm") as [host]:
            engine = Podman(base, host)
            engine.import_busybox()
            try:
                yield engine
            finally:
                engine.remove_all()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def rack_node(etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]
              ) -> Iterator[DaemonProcess]:
    """One pool per rack, a node in rack 0, and that node's daemon."""
    for rack, cidr in RACK_POOLS.items():
        done = ctl(ctl_env, "create", "ippool", f"rack-{rack}", "--cidr", cidr,
                   "--node-selector", f'rack == "{rack}"')
        assert done.returncode == 0, done.stderr
    done = ctl(ctl_env, "label", "nodes", NODE, "rack=0", "--create")
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o750)
    daemon = DaemonProcess(NODE, str(run_dir / "topoipamd.sock"), etcd.endpoint, prefix,
                           str(tmp_path / "topoipamd.log")).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def allocations(ctl_env: dict[str, str]) -> list[dict[str, Any]]:
    done = ctl(ctl_env, "get", "allocations", "-o", "json")
    assert done.returncode == 0, done.stderr
    listed: list[dict[str, Any]] = json.loads(done.stdout)
    return listed


def held_by_container(ctl_env: dict[str, str]) -> dict[str, str]:
    """container ID → address, from etcd."""
    return {str(a["container_id"]): str(a["ip"]) for a in allocations(ctl_env)}


def assert_rack_address(address: str, rack: str) -> ipaddress.IPv4Interface:
    interface = ipaddress.IPv4Interface(address)
    assert interface.network == ipaddress.ip_network(RACK_POOLS[rack]), address
    assert str(interface.ip) != GATEWAYS[rack], f"{address} is the pool's gateway"
    return interface


def run_concurrently(podman: Podman, network: str, names: list[str]) -> dict[str, str]:
    """``podman run -d`` of every name at once; name → container ID."""
    started = {name: podman.start("run", "-d", "--name", name, "--network", network, IMAGE,
                                  "sleep", "600") for name in names}
    ids = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"podman run {name} failed: {out}{err}"
        ids[name] = out.strip()
    return ids


def check_network(podman: Podman, network: str, ctl_env: dict[str, str]) -> None:
    """Concurrent runs get distinct rack-0 addresses (never the gateway), which etcd
    records for their container IDs; stop+rm and run --rm release them."""
    names = [f"{network}-{i}" for i in range(CONCURRENT)]
    ids = run_concurrently(podman, network, names)
    shown: dict[str, str] = {}
    for name in names:
        [address] = podman.ipv4(name)
        assert_rack_address(address, "0")
        shown[ids[name]] = str(ipaddress.IPv4Interface(address).ip)
        ping = podman("exec", name, "ping", "-c", "1", "-W", "2", GATEWAYS["0"], check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    assert len(set(shown.values())) == CONCURRENT
    assert held_by_container(ctl_env) == shown

    podman("stop", "--time", "0", names[0])
    assert ids[names[0]] not in held_by_container(ctl_env), "stop released nothing"
    podman("rm", names[0])
    for name in names[1:]:
        podman("rm", "--force", "--time", "0", name)
    assert allocations(ctl_env) == []

    once = podman("run", "--rm", "--network", network, IMAGE,
                  "ip", "-4", "-o", "addr", "show", "dev", "eth0", "scope", "global")
    [line] = once.stdout.splitlines()
    assert_rack_address(line.split()[3], "0")
    assert allocations(ctl_env) == [], "run --rm kept its address"
    check = ctl(ctl_env, "ipam", "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_bridge_network_gets_rack_addresses_and_releases_them(
        podman: Podman, rack_node: DaemonProcess, ctl_env: dict[str, str]) -> None:
    network = podman.add_network(documented_config("bridge", rack_node.socket))
    check_network(podman, network, ctl_env)
    # The bridge took the pool's gateway, in the test's host namespace only.
    bridge = in_ns(podman.host_ns, "ip", "-4", "-o", "addr", "show", "dev", "cni0").stdout
    assert f"{GATEWAYS['0']}/24" in bridge
    assert sh("ip", "link", "show", "cni0", check=False).returncode != 0


def test_routed_network_gets_rack_addresses_and_releases_them(
        podman: Podman, rack_node: DaemonProcess, ctl_env: dict[str, str]) -> None:
    network = podman.add_network(documented_config("ptp", rack_node.socket))
    check_network(podman, network, ctl_env)


def wait_for_labels(daemon: DaemonProcess, labels: dict[str, str]) -> None:
    """Until the daemon's watch has seen the node's new labels (a wait, not a timing claim)."""
    deadline = time.monotonic() + 30
    while True:
        with daemon.stub() as stub:
            status = stub.Status(ipam_pb2.StatusRequest(), timeout=5)
        if dict(status.labels) == labels:
            return
        assert time.monotonic() < deadline, f"labels still {dict(status.labels)}"
        time.sleep(0.05)


def test_relabelled_node_next_routed_container_follows_the_new_pool(
        podman: Podman, rack_node: DaemonProcess, ctl_env: dict[str, str]) -> None:
    network = podman.add_network(documented_config("ptp", rack_node.socket))
    podman("run", "-d", "--name", "before", "--network", network, IMAGE, "sleep", "600")
    [before] = podman.ipv4("before")
    assert_rack_address(before, "0")

    done = ctl(ctl_env, "label", "nodes", NODE, "rack=1", "--overwrite")
    assert done.returncode == 0, done.stderr
    wait_for_labels(rack_node, {"rack": "1"})

    podman("run", "-d", "--name", "after", "--network", network, IMAGE, "sleep", "600")
    [after] = podman.ipv4("after")
    assert_rack_address(after, "1")
    ping = podman("exec", "after", "ping", "-c", "1", "-W", "2", GATEWAYS["1"], check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # The running container keeps its address; check placement names it.
    assert podman.ipv4("before") == [before]
    placement = ctl(ctl_env, "check", "placement")
    assert str(ipaddress.IPv4Interface(before).ip) in placement.stdout, placement.stdout
    assert str(ipaddress.IPv4Interface(after).ip) not in placement.stdout, placement.stdout
    podman("rm", "--force", "--time", "0", "before", "after")
    assert allocations(ctl_env) == []


def test_dual_stack_routed_container(
        podman: Podman, rack_node: DaemonProcess, ctl_env: dict[str, str]) -> None:
    done = ctl(ctl_env, "create", "ippool", "rack-0-v6", "--cidr", "fd00:254::/120",
               "--node-selector", 'rack == "0"')
    assert done.returncode == 0, done.stderr
    network = podman.add_network(documented_config("ptp-dual-stack", rack_node.socket))
    podman("run", "-d", "--name", "dual", "--network", network, IMAGE, "sleep", "600")
    [v4] = podman.addresses("dual", 4)
    [v6] = podman.addresses("dual", 6)
    assert_rack_address(v4, "0")
    interface = ipaddress.IPv6Interface(v6)
    assert interface.network == ipaddress.ip_network("fd00:254::/120"), v6
    assert str(interface.ip) != "fd00:254::1", "the IPv6 pool's gateway was handed out"
    routes = podman("exec", "dual", "ip", "-6", "route", "show", "default").stdout
    assert "via fd00:254::1" in routes, routes
    held = sorted(str(a["ip"]) for a in allocations(ctl_env))
    assert held == sorted([str(ipaddress.IPv4Interface(v4).ip), str(interface.ip)])
    podman("stop", "--time", "0", "dual")
    assert allocations(ctl_env) == []
    podman("rm", "dual")
