"""topoipamd as a real process on a real socket, against the real etcd."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.conftest import EtcdServer
from tests.daemons import TOPOIPAMD, DaemonProcess, NodeDaemons, ctl
from topoipam.daemon.local_etcd import free_port
from topoipam.proto import ipam_pb2


def attachment(container: str, network: str = "net") -> ipam_pb2.Attachment:
    return ipam_pb2.Attachment(network=network, container_id=container, ifname="eth0")


def test_socket_modes_health_and_status(
        node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> None:
    assert ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.10.0.0/24").returncode == 0
    daemon = node_daemons.start("node-a",
                  ["--labels", "rack=0,zone=z1"])
    sock = Path(daemon.socket)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o750
    assert daemon.health() == "SERVING"
    with daemon.stub() as stub:
        status = stub.Status(ipam_pb2.StatusRequest(), timeout=5)
    assert status.node == "node-a" and status.in_sync and status.etcd_reachable
    assert dict(status.labels) == {"rack": "0", "zone": "z1"}
    assert [(p.name, p.selected) for p in status.pools] == [("p", True)]
    # Labels from the config are used only on first registration.
    daemon.stop()
    assert ctl(ctl_env, "label", "nodes", "node-a", "rack=1", "--overwrite").returncode == 0
    daemon = node_daemons.start("node-a",
                  ["--labels", "rack=0,zone=z1"])
    with daemon.stub() as stub:
        assert stub.Status(ipam_pb2.StatusRequest(), timeout=5).labels["rack"] == "1"


def test_refuses_world_writable_socket_dir(etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    done = subprocess.run(
        [TOPOIPAMD, "--etcd-endpoints", etcd.endpoint, "--node", "n", "--prefix", prefix,
         "--socket", str(shared / "s.sock"), "--metrics-address", "off"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "world-writable" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_reflection_client_calls_allocate_without_stubs(
        node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> None:
    """What grpcurl does: list services, fetch descriptors, build the request dynamically."""
    assert ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.11.0.0/24").returncode == 0
    daemon = node_daemons.start("node-r")
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "topoipam.v1.Ipam" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("topoipam.v1.Ipam")
        method = service.methods_by_name["Allocate"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = request_class()
        request.attachment.network = "net"
        request.attachment.container_id = "reflected"
        request.attachment.ifname = "eth0"
        request.assign_ipv4 = True
        call = channel.unary_unary(
            "/topoipam.v1.Ipam/Allocate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        reply = call(request, timeout=10)
    assert reply.handle == "net/reflected/eth0"
    assert reply.addresses[0].ip.startswith("10.11.0.")


def test_label_change_governs_next_allocation_within_a_second(
        node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> None:
    for args in (["create", "ippool", "rack-0", "--cidr", "10.20.0.0/24", "--node-selector",
                  'rack == "0"'],
                 ["create", "ippool", "rack-1", "--cidr", "10.20.1.0/24", "--node-selector",
                  'rack == "1"'],
                 ["label", "nodes", "node-x", "rack=0", "--create"]):
        assert ctl(ctl_env, *args).returncode == 0
    daemon = node_daemons.start("node-x")
    with daemon.stub() as stub:
        first = stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment("a"),
                                                       assign_ipv4=True), timeout=10)
        assert first.addresses[0].pool == "rack-0"
        assert ctl(ctl_env, "label", "nodes", "node-x", "rack=1", "--overwrite").returncode == 0
        changed = time.monotonic()
        second = stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment("b"),
                                                        assign_ipv4=True), timeout=10)
        deadline = changed + 1.0
        while second.addresses[0].pool != "rack-1" and time.monotonic() < deadline:
            stub.Release(ipam_pb2.ReleaseRequest(attachment=attachment("b")), timeout=10)
            second = stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment("b"),
                                                            assign_ipv4=True), timeout=10)
        assert second.addresses[0].pool == "rack-1"
        # The earlier address stays where it is.
        held = stub.Get(ipam_pb2.GetRequest(attachment=attachment("a")), timeout=10)
        assert held.addresses[0].ip == first.addresses[0].ip
    placement = ctl(ctl_env, "check", "placement")
    assert first.addresses[0].ip in placement.stdout


def test_sigkill_and_restart_loses_nothing(
        node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> None:
    assert ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.30.0.0/24").returncode == 0
    daemon = node_daemons.start("node-k")
    acknowledged: dict[str, str] = {}
    with daemon.stub() as stub:
        for i in range(20):
            reply = stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment(f"c{i}"),
                                                           assign_ipv4=True), timeout=10)
            acknowledged[reply.handle] = reply.addresses[0].ip
    daemon.kill()
    daemon.start()
    with daemon.stub() as stub:
        for i in range(20, 40):
            reply = stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment(f"c{i}"),
                                                           assign_ipv4=True), timeout=10)
            acknowledged[reply.handle] = reply.addresses[0].ip
        for handle, ip in list(acknowledged.items())[:20]:
            container = handle.split("/")[1]
            held = stub.Get(ipam_pb2.GetRequest(attachment=attachment(container)), timeout=10)
            assert held.addresses[0].ip == ip
    assert len(set(acknowledged.values())) == 40
    check = ctl(ctl_env, "ipam", "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_metrics_endpoint(node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> None:
    assert ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.40.0.0/24").returncode == 0
    port = free_port()
    daemon = node_daemons.start("node-m")
    daemon.stop()
    daemon.extra = ["--metrics-address", f"127.0.0.1:{port}"]
    daemon.start()
    with daemon.stub() as stub:
        stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment("m"), assign_ipv4=True),
                      timeout=10)
        stub.Release(ipam_pb2.ReleaseRequest(attachment=attachment("m")), timeout=10)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'topoipam_requests_total{method="Allocate",outcome="ok"} 1.0' in text
    assert 'topoipam_request_duration_seconds_bucket{le="0.064",method="Allocate"}' in text
    assert 'topoipam_request_duration_seconds_count{method="Release"} 1.0' in text
    assert "topoipam_cache_in_sync 1.0" in text
    assert 'topoipam_affine_blocks{pool="p"} 1.0' in text


def test_invalid_requests_are_invalid_argument(node_daemons: NodeDaemons) -> None:
    daemon = node_daemons.start("node-i")
    with daemon.stub() as stub:
        for request in (
            ipam_pb2.AllocateRequest(assign_ipv4=True),
            ipam_pb2.AllocateRequest(attachment=attachment("a/b"), assign_ipv4=True),
            ipam_pb2.AllocateRequest(attachment=attachment("ok"), ips=["not-an-ip"]),
            ipam_pb2.AllocateRequest(attachment=attachment("ok")),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.Allocate(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.Get(ipam_pb2.GetRequest(attachment=attachment("never")), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_dev_mode_starts_etcd_and_seeds_default_pool(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPOIPAM_")}
    process = subprocess.Popen(
        [TOPOIPAMD, "--dev", "--state-dir", str(state), "--node", "dev-node",
         "--metrics-address", "off"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        assert process.stdout is not None
        banner = ""
        deadline = time.monotonic() + 30
        while "grpcurl" not in banner and time.monotonic() < deadline:
            banner += process.stdout.readline()
        assert "etcd at http://127.0.0.1:" in banner, banner
        endpoint = banner.split("etcd at ")[1].split()[0]
        daemon = DaemonProcess("dev-node", str(state / "topoipamd.sock"), endpoint,
                               "/topoipam/v1", str(tmp_path / "unused.log"))
        daemon.process = process  # type: ignore[assignment]
        deadline = time.monotonic() + 20
        while daemon.health() != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        with daemon.stub() as stub:
            reply = stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment("d"),
                                                           assign_ipv4=True), timeout=10)
        assert reply.addresses[0].pool == "default-ipv4-ippool"
        pools = ctl({**env, "TOPOIPAM_ETCD_ENDPOINTS": endpoint}, "get", "ippool", "-o", "wide")
        assert "default-ipv4-ippool" in pools.stdout and "192.168.0.0/16" in pools.stdout
    finally:
        process.terminate()
        process.wait(30)
        if process.stdout is not None:
            process.stdout.close()
    # Its etcd stops with it.
    port = int(endpoint.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_dev_etcd_keeps_its_port_across_restarts_while_it_is_free(tmp_path: Path) -> None:
    """The endpoint a reader exported after the first start still works after a restart,
    even when the well-known port was busy then and is free now."""
    from topoipam.daemon.main import DevEtcd

    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as etcd binds
        try:
            busy.bind(("127.0.0.1", 2379))  # else something else holds it: the same case
            busy.listen()
        except OSError:
            pass
        first = DevEtcd(str(tmp_path / "state"))
        endpoint = first.start()
        first.stop()
    assert endpoint != "http://127.0.0.1:2379"
    again = DevEtcd(str(tmp_path / "state"))
    try:
        assert again.start() == endpoint
    finally:
        again.stop()


def test_generated_protobuf_modules_are_fresh() -> None:
    done = subprocess.run([sys.executable, "-m", "topoipam.proto.generate", "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_sigterm_drains_in_flight_calls(
        node_daemons: NodeDaemons, etcd: EtcdServer, prefix: str, ctl_env: dict[str, str]) -> None:
    """Calls in flight when SIGTERM arrives finish; nothing acknowledged is lost."""
    import asyncio
    import signal

    from topoipam.daemon.store import EtcdOptions, EtcdStore
    from topoipam.proto import ipam_pb2_grpc

    assert ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.45.0.0/22").returncode == 0
    daemon = node_daemons.start("node-t")

    async def storm() -> tuple[list[object], int]:
        async with grpc.aio.insecure_channel(f"unix:{daemon.socket}") as channel:
            stub = ipam_pb2_grpc.IpamStub(channel)
            calls = [asyncio.ensure_future(stub.Allocate(ipam_pb2.AllocateRequest(
                attachment=attachment(f"t{i}"), assign_ipv4=True), timeout=20))
                for i in range(200)]
            await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*calls, return_exceptions=True)
        assert daemon.process is not None
        try:
            code = await asyncio.to_thread(daemon.process.wait, 30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 30 s after SIGTERM; log:\n{daemon.log()}") from None
        return results, code

    results, code = asyncio.run(storm())
    assert code == 0, daemon.log()
    succeeded = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    assert succeeded
    for error in failed:
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), error

    async def held() -> set[str]:
        async with EtcdStore(EtcdOptions((etcd.endpoint,)), prefix) as store:
            return {str(a.ip) for h in await store.list_handles() for a in h.value.addresses}

    in_etcd = asyncio.run(held())
    for reply in succeeded:
        assert reply.addresses[0].ip in in_etcd  # type: ignore[attr-defined]
    assert "Traceback" not in daemon.log()


def test_example_config_file_is_valid() -> None:
    from topoipam.daemon.config import load_config

    root = Path(__file__).resolve().parents[2]
    config = load_config({}, str(root / "systemd" / "topoipamd.toml.example"), environ={})
    assert config.etcd_endpoints[0].startswith("https://") and config.labels["rack"] == "0"


def test_no_watch_event_is_lost_while_blocks_come_and_go(
        node_daemons: NodeDaemons, etcd: EtcdServer, prefix: str, ctl_env: dict[str, str]) -> None:
    """Claims add block watchers while labels and pools change: every change arrives.

    (A cache that restarted its watch on each claim from the last revision it
    had seen lost the events that other watchers had not delivered yet.)
    """
    import asyncio

    from topoipam.daemon.core.model import IPPool, Node
    from topoipam.daemon.core.writes import PutObject
    from topoipam.daemon.store import EtcdOptions, EtcdStore
    from topoipam.proto import ipam_pb2_grpc

    assert ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.46.0.0/23", "--block-size",
               "30").returncode == 0
    daemon = node_daemons.start("node-w")

    async def churn() -> None:
        async with EtcdStore(EtcdOptions((etcd.endpoint,)), prefix) as store, \
                grpc.aio.insecure_channel(f"unix:{daemon.socket}") as channel:
            stub = ipam_pb2_grpc.IpamStub(channel)
            for i in range(40):
                # A claim (new block watcher) and a label and a pool change, all at once.
                await asyncio.gather(
                    *(stub.Allocate(ipam_pb2.AllocateRequest(
                        attachment=attachment(f"w{i}-{j}"), assign_ipv4=True), timeout=10)
                      for j in range(3)),
                    store.commit([PutObject(Node("node-w", {"round": str(i)}))]),
                    store.commit([PutObject(IPPool.from_dict(
                        f"extra-{i}", {"cidr": f"10.48.{i}.0/24"}))]),
                )
                deadline = time.monotonic() + 1.0
                while True:
                    status = await stub.Status(ipam_pb2.StatusRequest(), timeout=5)
                    seen = (status.labels.get("round"),
                            f"extra-{i}" in {p.name for p in status.pools})
                    if seen == (str(i), True):
                        break
                    assert time.monotonic() < deadline, f"change {i} not seen: {seen}"
                    await asyncio.sleep(0.01)

    asyncio.run(churn())


def test_blocks_unselected_while_the_daemon_was_down_are_released(
        node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> None:
    assert ctl(ctl_env, "create", "ippool", "rack-0", "--cidr", "10.49.0.0/24",
               "--node-selector", 'rack == "0"').returncode == 0
    assert ctl(ctl_env, "label", "nodes", "node-u", "rack=0", "--create").returncode == 0
    daemon = node_daemons.start("node-u")
    with daemon.stub() as stub:
        stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment("u"), assign_ipv4=True),
                      timeout=10)
        stub.Release(ipam_pb2.ReleaseRequest(attachment=attachment("u")), timeout=10)
    assert "node-u" in ctl(ctl_env, "ipam", "show", "--show-blocks").stdout
    daemon.stop()
    assert ctl(ctl_env, "label", "nodes", "node-u", "rack=1", "--overwrite").returncode == 0
    daemon.start()
    deadline = time.monotonic() + 2
    while "node-u" in ctl(ctl_env, "ipam", "show", "--show-blocks").stdout:
        assert time.monotonic() < deadline, "the empty, unselected block is still claimed"
        time.sleep(0.05)


def test_delete_node_refuses_while_its_daemon_runs_unless_forced(
        node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> None:
    daemon = node_daemons.start("node-live", ["--labels", "rack=0"])
    refused = ctl(ctl_env, "delete", "node", "node-live")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: node node-live is served by a running topoipamd")
    assert refused.stderr.count("\n") == 1
    assert "node-live" in ctl(ctl_env, "get", "nodes").stdout
    forced = ctl(ctl_env, "delete", "node", "node-live", "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr.startswith("warning: node node-live is served by a running topoipamd")
    # A clean stop gives up the daemon's liveness key at once.
    daemon.stop()
    daemon.start()
    assert ctl(ctl_env, "delete", "node", "node-live").returncode == 1
    daemon.stop()
    done = ctl(ctl_env, "delete", "node", "node-live")
    assert done.returncode == 0, done.stderr


def test_record_allocations_false_keeps_no_record(
        node_daemons: NodeDaemons, tmp_path: Path, ctl_env: dict[str, str]) -> None:
    # What bench/record_cost.py compares against: the same daemon without its record.
    assert ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.31.0.0/24").returncode == 0
    state = tmp_path / "norecord.state"
    daemon = node_daemons.start("node-nr",
                  ["--record-allocations", "false", "--state-dir", str(state)])
    with daemon.stub() as stub:
        stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment("nr"), assign_ipv4=True),
                      timeout=10)
    assert daemon.stop() == 0
    assert not [p for p in state.iterdir() if p.name.endswith(".allocations")
                and p.stat().st_size > 0]
