"""The datastore identity, attacked as a hostile operator would.

Real etcd processes, real ``etcdutl snapshot restore``, real daemons, the real
CLI. A datastore "from before identities" is made the way an upgrade meets
one: objects under the prefix, no ``<prefix>/datastore`` key (deleted with
etcdctl after the CLI wrote it).
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from tests.conftest import EtcdServer, temporary_etcd
from tests.daemons import ctl
from tests.etcd_cluster import etcdctl
from tests.integration.restores import allocate_ip, env_of, n1_with_record, serve_pods
from tests.integration.test_faults import allocate
from tests.integration.test_reliability import handles, new_daemon, restore
from topoipam.daemon.fence import state_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def drop_identity(server: EtcdServer, prefix: str) -> None:
    """Make the datastore look like one written before identities existed."""
    etcdctl(server.endpoint, "del", f"{prefix}/datastore")


# ---------------------------------------------------------------------- upgrade + restore
def test_restore_of_a_pre_identity_snapshot_then_a_ctl_write_loses_the_record(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """The snapshot was taken before the upgrade (no identity key). After the upgrade m1
    adopts identity U and p1 gets X. etcd is restored from that snapshot; the operator
    runs any topoipamctl write before m1 is back (here: create a second pool): the CLI
    gives the restored datastore a fresh identity V, m1 then takes its own datastore for
    another one, sets its record aside, and X goes to the next pod that asks."""
    env = env_of(private_etcd, prefix)
    assert ctl(env, "create", "ippool", "p", "--cidr", "10.73.0.0/24",
               "--block-size", "28").returncode == 0
    drop_identity(private_etcd, prefix)
    snapshot = str(tmp_path / "backup.db")
    etcdctl(private_etcd.endpoint, "snapshot", "save", snapshot)
    m1 = new_daemon(tmp_path, "m1", "m1", private_etcd.endpoint, prefix).start()
    m2 = new_daemon(tmp_path, "m2", "m2", private_etcd.endpoint, prefix)
    try:
        allocate(m1, "warm")
        x = allocate(m1, "p1")
        time.sleep(0.2)
        m1.stop()
        restore(private_etcd, snapshot)
        assert ctl(env, "create", "ippool", "q", "--cidr", "10.74.0.0/24").returncode == 0
        m1.start()
        time.sleep(1.0)
        m2.start()
        try:
            got = allocate_ip(m2, "p2", x)
        except grpc.RpcError:
            got = ""
        check = ctl(env, "ipam", "check")
        assert got != x or check.returncode == 1, (
            f"{x} handed to p2 while p1 (m1's record) uses it; ipam check: {check.stdout}\n"
            f"m1: {[line for line in m1.log().splitlines() if 'datastore' in line]}")
    finally:
        m1.stop()
        m2.stop()


def test_pre_identity_record_moved_to_a_new_etcd_writes_nothing_there(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """A record written before identities (no datastore line) and a brand-new, empty etcd
    B (say, the upgrade and an etcd re-provisioning in the same maintenance): none of
    the record's allocations may appear in B (an empty prefix is not the record's)."""
    state = tmp_path / "state"
    with temporary_etcd("hostile-b-") as other:
        assert ctl(env_of(private_etcd, prefix), "create", "ippool", "p", "--cidr",
                   "10.75.0.0/24").returncode == 0
        serve_pods(n1_with_record(tmp_path, "a", private_etcd.endpoint, prefix, state).start(),
                   3, 0.2)
        path = Path(state_file(str(state), "n1", prefix, "allocations"))
        lines = [x for x in path.read_text().splitlines() if '"datastore"' not in x]
        path.write_text("\n".join(lines) + "\n")  # as written before identities
        assert ctl(env_of(other, prefix), "create", "ippool", "p", "--cidr",
                   "10.75.0.0/24").returncode == 0
        moved = n1_with_record(tmp_path, "b", other.endpoint, prefix, state).start()
        try:
            time.sleep(1.5)
            found = handles(other.endpoint, prefix)
            assert found == {}, f"phantoms written into etcd B: {sorted(found)}\n{moved.log()}"
        finally:
            moved.stop()


def test_moved_to_another_pre_identity_etcd_gives_it_this_record_identity(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """Two clusters not yet upgraded (objects, no identity key). n1, upgraded, serves three
    pods on A (A gets identity U, n1's record says U), then is moved to B: B adopts U (the
    record's identity) and n1 writes its three allocations of A into B."""
    state = tmp_path / "state"
    with temporary_etcd("hostile-b-") as other:
        for server in (private_etcd, other):
            assert ctl(env_of(server, prefix), "create", "ippool", "p", "--cidr",
                       "10.88.0.0/24").returncode == 0
            drop_identity(server, prefix)
        serve_pods(n1_with_record(tmp_path, "a", private_etcd.endpoint, prefix, state).start(),
                   3, 0.2)
        moved = n1_with_record(tmp_path, "b", other.endpoint, prefix, state).start()
        try:
            time.sleep(1.5)
            found = handles(other.endpoint, prefix)
            identities = [etcdctl(s.endpoint, "get", "--print-value-only",
                                  f"{prefix}/datastore").stdout.strip()
                          for s in (private_etcd, other)]
            assert found == {}, (f"phantoms written into etcd B: {sorted(found)}; "
                                 f"identities A, B: {identities}")
        finally:
            moved.stop()


# ---------------------------------------------------------------------- a corrupt identity
def test_corrupt_identity_key_daemon_and_cli(private_etcd: EtcdServer, prefix: str,
                                             tmp_path: Path) -> None:
    """`etcdctl put <prefix>/datastore junk`: ipam check names it; the CLI gives one line;
    a daemon does not hang NOT_SERVING with a traceback."""
    env = env_of(private_etcd, prefix)
    assert ctl(env, "create", "ippool", "p", "--cidr", "10.78.0.0/24").returncode == 0
    etcdctl(private_etcd.endpoint, "put", f"{prefix}/datastore", "junk")
    check = ctl(env, "ipam", "check")
    made = ctl(env, "create", "ippool", "q", "--cidr", "10.79.0.0/24")
    assert made.returncode in (0, 1) and len(made.stderr.strip().splitlines()) <= 1, made.stderr
    assert "Traceback" not in made.stderr
    m1 = new_daemon(tmp_path, "m1", "m1", private_etcd.endpoint, prefix)
    try:
        m1.start(wait=False)
        time.sleep(8)
        log = m1.log()
        exited = m1.process is not None and m1.process.poll() is not None
        assert "Traceback" not in log, log
        assert exited or m1.health() == "SERVING", f"neither serving nor exited:\n{log}"
        assert check.returncode == 1 and "datastore" in check.stdout, check.stdout
    finally:
        m1.stop()


