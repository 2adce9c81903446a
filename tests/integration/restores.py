"""What the restore tests share: node n1's record kept across datastores, the conflict
scene (an address two pods hold after a restore), and the calls that read and write
through real daemons."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from tests.conftest import EtcdServer
from tests.daemons import DaemonProcess, ctl
from tests.etcd_cluster import etcdctl
from tests.integration.test_faults import allocate, attachment
from tests.integration.test_reliability import handles, new_daemon, restore, wait_for
from topoipam.daemon.core.holdings import Handle
from topoipam.proto import ipam_pb2


def env_of(server: EtcdServer, prefix: str) -> dict[str, str]:
    return {**os.environ, "TOPOIPAM_ETCD_ENDPOINTS": server.endpoint, "TOPOIPAM_PREFIX": prefix}


def allocate_ip(daemon: DaemonProcess, container: str, ip: str) -> str:
    with daemon.stub() as stub:
        reply = stub.Allocate(ipam_pb2.AllocateRequest(attachment=attachment(container),
                                                       assign_ipv4=True, ips=[ip]), timeout=20)
    return str(reply.addresses[0].ip)


def release(daemon: DaemonProcess, container: str) -> None:
    with daemon.stub() as stub:
        stub.Release(ipam_pb2.ReleaseRequest(attachment=attachment(container)), timeout=20)


def holder_of(found: dict[str, Handle], ip: str) -> list[str]:
    return sorted(h for h, v in found.items() if ip in {str(a.ip) for a in v.addresses})


def n1_with_record(tmp_path: Path, name: str, endpoint: str, prefix: str, state: Path
                   ) -> DaemonProcess:
    """A daemon ``name`` of node n1 on ``endpoint``, its node's record kept in ``state``."""
    return new_daemon(tmp_path, name, "n1", endpoint, prefix, "--state-dir", str(state))


def serve_pods(daemon: DaemonProcess, count: int, settle: float) -> list[str]:
    """The addresses of pods pod-0, pod-1, … (``count``) from the started ``daemon``, which
    stops ``settle`` seconds later: its record is written off the critical path."""
    try:
        acked = [allocate(daemon, f"pod-{i}") for i in range(count)]
        time.sleep(settle)
    finally:
        daemon.stop()
    return acked


# ---------------------------------------------------------------------- a conflict after a restore
class Scene:
    """Snapshot; p1 on m1 gets X; etcd restored; p2 on m2 asks for X and gets it; m1 back."""

    def __init__(self, server: EtcdServer, prefix: str, tmp_path: Path) -> None:
        self.server, self.prefix, self.tmp_path = server, prefix, tmp_path
        self.env = env_of(server, prefix)
        assert ctl(self.env, "create", "ippool", "p", "--cidr", "10.65.0.0/24",
                   "--block-size", "28").returncode == 0
        self.m1 = new_daemon(tmp_path, "m1", "m1", server.endpoint, prefix).start()
        self.m2 = new_daemon(tmp_path, "m2", "m2", server.endpoint, prefix)
        allocate(self.m1, "warm")
        snapshot = str(tmp_path / "backup.db")
        etcdctl(server.endpoint, "snapshot", "save", snapshot)
        self.x = allocate(self.m1, "p1")
        time.sleep(0.1)
        self.m1.stop()
        restore(server, snapshot)
        self.m2.start()
        assert allocate_ip(self.m2, "p2", self.x) == self.x
        self.m1.start()
        wait_for(lambda: "re-asserted the record" in self.m1.log(), 20, "no re-assertion")

    def check(self) -> subprocess.CompletedProcess[str]:
        return ctl(self.env, "ipam", "check")

    def handles(self) -> dict[str, Handle]:
        return handles(self.server.endpoint, self.prefix)

    def third_pod_is_refused(self) -> None:
        with pytest.raises(grpc.RpcError):
            allocate_ip(self.m2, "p3", self.x)

    def restart_m1(self) -> None:
        self.m1.stop()
        self.m1.start()
        time.sleep(1.0)  # its record check runs once it serves

    def close(self) -> None:
        self.m1.stop()
        self.m2.stop()


# ---------------------------------------------------------------------- a pool the snapshot lacked
def no_pool_conflict(server: EtcdServer, prefix: str, m1: DaemonProcess, tmp_path: Path,
                     *pool_flags: str) -> str:
    """Snapshot; pool ``late`` (``pool_flags``) created; p1 on m1 gets X; m1 stopped; etcd
    restored (no ``late``); m1 back and its record checked (X in no pool). Returns X."""
    snapshot = str(tmp_path / "backup.db")
    etcdctl(server.endpoint, "snapshot", "save", snapshot)
    assert ctl(env_of(server, prefix), "create", "ippool", "late",
               *pool_flags).returncode == 0
    time.sleep(0.5)
    x = allocate(m1, "p1")
    time.sleep(0.2)  # the record is written off the critical path
    m1.stop()
    restore(server, snapshot)
    m1.start()
    wait_for(lambda: "re-asserted the record" in m1.log(), 20, "no re-assertion")
    return x
