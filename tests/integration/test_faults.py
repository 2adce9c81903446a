"""Faults the daemon must ride out: etcd gone and back, compaction, corrupt values, bad input."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import EtcdServer, start_etcd
from tests.daemons import DaemonProcess, cni, ctl
from topoipam.daemon.store import EtcdOptions, EtcdStore
from topoipam.proto import ipam_pb2


def restart(server: EtcdServer) -> EtcdServer:
    server.stop()
    return start_etcd(server.data_dir, client_port=server.client_port,
                      peer_port=server.peer_port)


def attachment(container: str) -> ipam_pb2.Attachment:
    return ipam_pb2.Attachment(network="net", container_id=container, ifname="eth0")


def allocate(daemon: DaemonProcess, container: str, timeout: float = 30) -> str:
    with daemon.stub() as stub:
        reply = stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment(container),
                                                       assign_ipv4=True), timeout=timeout)
    return str(reply.addresses[0].ip)


def start_daemon(tmp_path: Path, node: str, endpoint: str, prefix: str) -> DaemonProcess:
    run = tmp_path / "run"
    run.mkdir(mode=0o750)
    return DaemonProcess(node, str(run / "d.sock"), endpoint, prefix,
                         str(tmp_path / "d.log")).start()


def env_for(server: EtcdServer, prefix: str) -> dict[str, str]:
    import os

    return {**os.environ, "TOPOIPAM_ETCD_ENDPOINTS": server.endpoint, "TOPOIPAM_PREFIX": prefix}


def test_etcd_down_then_back(private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    env = env_for(private_etcd, prefix)
    assert ctl(env, "create", "ippool", "p", "--cidr", "10.60.0.0/24").returncode == 0
    daemon = start_daemon(tmp_path, "node-f", private_etcd.endpoint, prefix)
    try:
        before = allocate(daemon, "before")
        private_etcd.stop()
        # Allocate fails within its deadline, as UNAVAILABLE (CNI: 11, try again).
        started = time.monotonic()
        with daemon.stub() as stub, pytest.raises(grpc.RpcError) as info:
            stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment("during"),
                                                   assign_ipv4=True), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 25
        code, error, _ = cni("ADD", {"cniVersion": "1.0.0", "name": "net", "ipam": {
            "type": "topoipam", "socket": daemon.socket}}, container="during-cni")
        assert code == 1 and error is not None and error["code"] == 11
        # Health and Status say why.
        deadline = time.monotonic() + 10
        while daemon.health() != "NOT_SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.health() == "NOT_SERVING"
        with daemon.stub() as stub:
            status = stub.Status(ipam_pb2.StatusRequest(), timeout=10)
        assert not status.etcd_reachable and not status.in_sync and status.etcd_error
        # The reason says "etcd unreachable" once, in Status and in CNI STATUS alike.
        assert status.not_ready_reason.count("etcd unreachable") == 1, status.not_ready_reason
        code, error, _ = cni("STATUS", {"cniVersion": "1.1.0", "name": "net", "ipam": {
            "type": "topoipam", "socket": daemon.socket}})
        assert code == 1 and error is not None and error["code"] == 50
        assert error["msg"].count("etcd unreachable") == 1, error["msg"]
        # etcd returns: the daemon recovers by itself within 2 s and resumes its watches.
        server = restart(private_etcd)
        back = time.monotonic()
        while daemon.health() != "SERVING":
            assert time.monotonic() - back < 2.0, "daemon did not recover within 2 s"
            time.sleep(0.02)
        after = allocate(daemon, "after")
        assert after != before
        assert ctl(env, "label", "nodes", "node-f", "fresh=yes").returncode == 0
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            with daemon.stub() as stub:
                labels = stub.Status(ipam_pb2.StatusRequest(), timeout=5).labels
            if labels.get("fresh") == "yes":
                break
            time.sleep(0.02)
        assert labels.get("fresh") == "yes", "watch not resumed"
        private_etcd.process = server.process
    finally:
        daemon.stop()


def test_compaction_while_disconnected_relists(private_etcd: EtcdServer, prefix: str,
                                               tmp_path: Path) -> None:
    env = env_for(private_etcd, prefix)
    assert ctl(env, "create", "ippool", "a", "--cidr", "10.61.0.0/24").returncode == 0
    daemon = start_daemon(tmp_path, "node-c", private_etcd.endpoint, prefix)
    try:
        allocate(daemon, "one")
        assert daemon.process is not None
        import signal

        daemon.process.send_signal(signal.SIGSTOP)
        try:
            assert ctl(env, "create", "ippool", "b", "--cidr", "10.62.0.0/24",
                       "--node-selector", "never == 'x'").returncode == 0
            assert ctl(env, "delete", "ippool", "a", "--force").returncode == 0

            async def compact() -> None:
                async with EtcdStore(EtcdOptions((private_etcd.endpoint,)), prefix) as store:
                    await store.compact(await store.ping())

            asyncio.run(compact())
        finally:
            daemon.process.send_signal(signal.SIGCONT)
        # The daemon must notice the compaction, relist, and follow the new pools.
        deadline = time.monotonic() + 10
        while True:
            with daemon.stub() as stub:
                status = stub.Status(ipam_pb2.StatusRequest(), timeout=10)
            if status.in_sync and [p.name for p in status.pools] == ["b"]:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        with daemon.stub() as stub, pytest.raises(grpc.RpcError) as info:
            stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment("two"),
                                                   assign_ipv4=True), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "node-c" in (info.value.details() or "")
    finally:
        daemon.stop()


def test_corrupt_values_are_skipped_and_the_daemon_keeps_serving(
    etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]
) -> None:
    assert ctl(ctl_env, "create", "ippool", "good", "--cidr", "10.63.0.0/24").returncode == 0

    async def corrupt() -> None:
        async with EtcdStore(EtcdOptions((etcd.endpoint,)), prefix) as store:
            from aetcd import rpc

            for key, value in ((b"/pools/bad", b"{not json"),
                               (b"/pools/evil", json.dumps({"cidr": "10.0.0.0/8",
                                                            "blockSize": 99}).encode()),
                               (b"/reservations/broken", b"[]"),
                               (b"/unknown/thing", b"???")):
                await store._call("Put", rpc.PutRequest(key=prefix.encode() + key, value=value))

    asyncio.run(corrupt())
    daemon = start_daemon(tmp_path, "node-z", etcd.endpoint, prefix)
    try:
        assert allocate(daemon, "x").startswith("10.63.0.")
        log = daemon.log()
        assert "skipping corrupt pool bad" in log and "skipping corrupt pool evil" in log
        assert "Traceback" not in log
        # A corrupt config while running: logged, defaults used, still serving.
        async def corrupt_config() -> None:
            async with EtcdStore(EtcdOptions((etcd.endpoint,)), prefix) as store:
                from aetcd import rpc

                await store._call("Put", rpc.PutRequest(key=store.keys.config(),
                                                        value=b'{"strictAffinity": "maybe"}'))

        asyncio.run(corrupt_config())
        time.sleep(0.2)
        assert allocate(daemon, "y").startswith("10.63.0.")
        assert "ignoring corrupt ipamconfig" in daemon.log()
    finally:
        daemon.stop()


def test_cooldown_survives_restart(etcd: EtcdServer, prefix: str, tmp_path: Path,
                                   ctl_env: dict[str, str]) -> None:
    assert ctl(ctl_env, "create", "ippool", "tiny", "--cidr", "10.64.0.0/29", "--block-size",
               "29").returncode == 0
    assert ctl(ctl_env, "ipam", "configure", "--ip-cooldown-seconds", "3").returncode == 0
    daemon = start_daemon(tmp_path, "node-cd", etcd.endpoint, prefix)
    try:
        # /29 = 5 usable addresses (not the network, broadcast or gateway address);
        # take them all, free one, restart, ask again.
        held = [allocate(daemon, f"c{i}") for i in range(5)]
        released_at = time.monotonic()
        with daemon.stub() as stub:
            stub.Release(ipam_pb2.ReleaseRequest(attachment=attachment("c0")), timeout=10)
        daemon.stop()
        daemon.start()
        with daemon.stub() as stub, pytest.raises(grpc.RpcError) as info:
            stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment("early"),
                                                   assign_ipv4=True), timeout=10)
        assert time.monotonic() - released_at < 3
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        time.sleep(max(0.0, 3.2 - (time.monotonic() - released_at)))
        assert allocate(daemon, "late") == held[0]
    finally:
        daemon.stop()


_text = st.text(max_size=40)
_attachment = st.builds(ipam_pb2.Attachment, network=_text, container_id=_text, ifname=_text)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=st.builds(
    ipam_pb2.AllocateRequest, attachment=_attachment, assign_ipv4=st.booleans(),
    assign_ipv6=st.booleans(), ipv4_pools=st.lists(_text, max_size=2),
    ips=st.lists(_text, max_size=2),
    attributes=st.dictionaries(_text, _text, max_size=2)))
def test_arbitrary_grpc_requests_are_refused_cleanly(
    request: ipam_pb2.AllocateRequest, grpc_daemon: DaemonProcess, etcd_snapshot: object
) -> None:
    """Anything invalid is INVALID_ARGUMENT (or a clean domain error) and writes nothing."""
    before = etcd_snapshot()  # type: ignore[operator]
    with grpc_daemon.stub() as stub:
        try:
            stub.Allocate(request, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED), exc
            assert "Traceback" not in (exc.details() or "")
            assert etcd_snapshot() == before  # type: ignore[operator]
            return
    # It was valid after all: release it again so the pool never fills.
    with grpc_daemon.stub() as stub:
        stub.Release(ipam_pb2.ReleaseRequest(attachment=request.attachment), timeout=10)


@pytest.fixture(scope="module")
def grpc_daemon(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        DaemonProcess]:
    import os

    prefix = "/topoipam-test/fuzz/v1"
    env = {**os.environ, "TOPOIPAM_ETCD_ENDPOINTS": etcd.endpoint, "TOPOIPAM_PREFIX": prefix}
    assert ctl(env, "create", "ippool", "fuzz", "--cidr", "10.65.0.0/16").returncode == 0
    run = tmp_path_factory.mktemp("fuzz")
    os.chmod(run, 0o750)
    daemon = DaemonProcess("node-fuzz", str(run / "d.sock"), etcd.endpoint, prefix,
                           str(run / "d.log")).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def etcd_snapshot(etcd: EtcdServer) -> object:
    def snapshot() -> list[tuple[bytes, bytes]]:
        async def read() -> list[tuple[bytes, bytes]]:
            async with EtcdStore(EtcdOptions((etcd.endpoint,)), "/topoipam-test/fuzz/v1") as s:
                kvs, _ = await s.prefix_raw(b"/topoipam-test/fuzz/v1/")
                return [(kv.key, kv.value) for kv in kvs]

        return asyncio.run(read())

    return snapshot
