"""Conflicts after a restore that could end wrongly, come back, or hide a duplicate.

Real etcd, real ``etcdutl snapshot restore``, real daemons, the real CLI. Each
test is one hostile operator's sequence; each assertion states what should
hold (the test fails while the defect is there).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from tests.conftest import EtcdServer
from tests.daemons import ctl
from tests.etcd_cluster import etcdctl
from tests.integration.restores import (
    Scene,
    allocate_ip,
    env_of,
    holder_of,
    no_pool_conflict,
    release,
)
from tests.integration.test_faults import allocate, attachment
from tests.integration.test_reliability import handles, new_daemon, restore, wait_for
from topoipam.proto import ipam_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def conflicts_text(env: dict[str, str]) -> str:
    listed = ctl(env, "ipam", "conflicts")
    assert listed.returncode == 0, listed.stderr
    return listed.stdout


def reassertions(log: str) -> int:
    return log.count("re-assert") + log.count("conflict after etcd went back")


# ---------------------------------------------------------------------- dual stack, one family lost
def test_dual_stack_whose_v6_pool_the_snapshot_lacked_keeps_its_v4_address(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """p1 (IPv4 X + IPv6 Y) re-asserted after a restore of a snapshot without the v6
    pool: the handle is not put back at all, so X is free in etcd while p1 uses it, and
    the next pod that asks gets X; ipam check names only Y."""
    env = env_of(private_etcd, prefix)
    assert ctl(env, "create", "ippool", "p4", "--cidr", "10.70.0.0/24",
               "--block-size", "28").returncode == 0
    m1 = new_daemon(tmp_path, "m1", "m1", private_etcd.endpoint, prefix).start()
    try:
        allocate(m1, "warm")  # the v4 block exists in the snapshot
        snapshot = str(tmp_path / "backup.db")
        etcdctl(private_etcd.endpoint, "snapshot", "save", snapshot)
        assert ctl(env, "create", "ippool", "p6", "--cidr", "fd00:70::/120",
                   "--block-size", "124").returncode == 0
        time.sleep(0.5)
        with m1.stub() as stub:
            reply = stub.Allocate(ipam_pb2.AllocateRequest(
                attachment=attachment("p1"), assign_ipv4=True, assign_ipv6=True), timeout=20)
        x = next(a.ip for a in reply.addresses if a.family == 4)
        y = next(a.ip for a in reply.addresses if a.family == 6)
        time.sleep(0.2)
        m1.stop()
        restore(private_etcd, snapshot)
        m1.start()
        wait_for(lambda: "in no pool" in m1.log(), 20, "no conflict for the v6 address")
        time.sleep(0.5)
        check = ctl(env, "ipam", "check")
        assert y in check.stdout, check.stdout
        # p1 still uses X: a new pod asking for X must be refused (or check must say so).
        try:
            got = allocate_ip(m1, "p4", x)
        except grpc.RpcError:
            got = ""
        check = ctl(env, "ipam", "check")
        assert got != x or x in check.stdout, (
            f"{x} handed to p4 while p1 (recorded on m1) uses it; ipam check:\n{check.stdout}"
            f"\nhandles: {sorted(handles(private_etcd.endpoint, prefix))}")
    finally:
        m1.stop()


# ---------------------------------------------------------------------- three claimants
def test_third_claimant_after_two_restores_is_not_forgotten(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """Snapshot S; p1 on m1 gets X; restore S; p3 on m3 gets X; restore S; p2 on m2 gets
    X; m1 and m3 come back: three pods use X. Deleting p2 hands X to p1, and m3's
    conflict is then taken for over ("let go of it"), though p3 still uses X."""
    env = env_of(private_etcd, prefix)
    assert ctl(env, "create", "ippool", "p", "--cidr", "10.71.0.0/24",
               "--block-size", "28").returncode == 0
    m1 = new_daemon(tmp_path, "m1", "m1", private_etcd.endpoint, prefix).start()
    m2 = new_daemon(tmp_path, "m2", "m2", private_etcd.endpoint, prefix)
    m3 = new_daemon(tmp_path, "m3", "m3", private_etcd.endpoint, prefix)
    try:
        allocate(m1, "warm")
        snapshot = str(tmp_path / "backup.db")
        etcdctl(private_etcd.endpoint, "snapshot", "save", snapshot)
        x = allocate(m1, "p1")
        time.sleep(0.2)
        m1.stop()
        restore(private_etcd, snapshot)
        m3.start()
        assert allocate_ip(m3, "p3", x) == x
        time.sleep(0.2)
        m3.stop()
        restore(private_etcd, snapshot)
        m2.start()
        assert allocate_ip(m2, "p2", x) == x
        m1.start()
        wait_for(lambda: "re-asserted the record" in m1.log(), 20, "m1 did not re-assert")
        before = m3.log().count("conflict after etcd went back")
        m3.start()
        wait_for(lambda: m3.log().count("conflict after etcd went back") > before, 20,
                 "m3 recorded no conflict")
        first = ctl(env, "ipam", "check")
        assert first.returncode == 1, first.stdout
        m3.stop()  # its node reboots; p3 keeps running with X
        release(m2, "p2")  # X goes to p1; p3 (m3) still uses it
        time.sleep(1)
        check = ctl(env, "ipam", "check")
        listed = conflicts_text(env)
        # The operator follows the tool: nothing listed, so the leftover record is removed.
        removed = ctl(env, "ipam", "resolve-conflict", "m3", x)
        m3.start()
        time.sleep(7)  # m3 checks its record, then re-checks open conflicts
        after = ctl(env, "ipam", "check")
        assert check.returncode == 1 and x in check.stdout and after.returncode == 1, (
            f"p1 (m1) and p3 (m3) both use {x}, but with m3 down ipam check said:\n"
            f"{check.stdout}\nipam conflicts:\n{listed}\nresolve-conflict m3 {x}: "
            f"{removed.stdout}{removed.stderr}\nafter m3 is back, ipam check: {after.stdout}"
            f"\nbefore p2 was deleted it said:\n{first.stdout}")
    finally:
        for daemon in (m1, m2, m3):
            daemon.stop()


# ---------------------------------------------------------------------- delete node --force
def test_delete_node_force_with_open_conflict_while_its_daemon_runs(scene: Scene) -> None:
    """`delete node m1 --force` releases p1 (the recorded side): X stays with p2 and the
    conflict is over. The running m1 daemon must not put p1 back and re-open it."""
    done = ctl(scene.env, "delete", "node", "m1", "--force")
    assert done.returncode == 0, done.stderr
    assert holder_of(scene.handles(), scene.x) == ["net/p2/eth0"]
    time.sleep(8)  # m1 re-checks open conflicts every 5 hold-expiry ticks
    assert holder_of(scene.handles(), scene.x) == ["net/p2/eth0"], scene.m1.log()
    listed = conflicts_text(scene.env)
    assert scene.x not in listed, f"the conflict came back:\n{listed}"


def test_delete_node_force_with_open_conflict_then_daemon_restarts(scene: Scene) -> None:
    """m1 stopped; `delete node m1 --force` (p1 released, X with p2); m1 restarts with its
    record: p1 must not be put back as a conflict again."""
    scene.m1.stop()
    done = ctl(scene.env, "delete", "node", "m1", "--force")
    assert done.returncode == 0, done.stderr
    assert holder_of(scene.handles(), scene.x) == ["net/p2/eth0"]
    assert scene.check().returncode == 0, scene.check().stdout
    scene.m1.start()
    time.sleep(2)
    assert holder_of(scene.handles(), scene.x) == ["net/p2/eth0"], scene.m1.log()
    check = scene.check()
    assert check.returncode == 0, f"the conflict came back:\n{check.stdout}"


# ---------------------------------------------------------------------- resolve twice
def test_resolve_keep_datastore_twice_while_the_daemon_is_stopped(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """A no-pool conflict; m1 stopped; `resolve-conflict m1 X --keep datastore` (the pod is
    gone), and again (says "conflict over: its record removed"); m1 starts: the conflict
    the operator resolved must not come back."""
    env = env_of(private_etcd, prefix)
    m1 = new_daemon(tmp_path, "m1", "m1", private_etcd.endpoint, prefix).start()
    try:
        x = no_pool_conflict(private_etcd, prefix, m1, tmp_path, "--cidr", "10.72.0.0/24")
        assert x in conflicts_text(env)
        m1.stop()
        first = ctl(env, "ipam", "resolve-conflict", "m1", x, "--keep", "datastore")
        assert first.returncode == 0, first.stderr
        second = ctl(env, "ipam", "resolve-conflict", "m1", x, "--keep", "datastore")
        assert second.returncode in (0, 1), second.stderr
        m1.start()
        time.sleep(2)
        listed = conflicts_text(env)
        check = ctl(env, "ipam", "check")
        assert x not in listed and check.returncode == 0, (
            f"resolved twice ({first.stdout.strip()!r}, {second.stdout.strip()!r}), "
            f"back after m1 started:\n{listed}\n{check.stdout}")
    finally:
        m1.stop()


# ---------------------------------------------------------------------- --record-allocations false
def test_record_allocations_false_does_not_delete_a_conflict_that_holds(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """A no-pool conflict (p1 on m1 uses X, no pool contains it); m1 restarted with
    `--record-allocations false` (its record file untouched): the conflict still holds
    (p1 runs), so it must stay listed, and re-creating the pool must not hand X out."""
    env = env_of(private_etcd, prefix)
    m1 = new_daemon(tmp_path, "m1", "m1", private_etcd.endpoint, prefix).start()
    plain = new_daemon(tmp_path, "m1", "m1", private_etcd.endpoint, prefix,
                       "--record-allocations", "false")
    try:
        x = no_pool_conflict(private_etcd, prefix, m1, tmp_path, "--cidr", "10.81.0.0/24")
        assert x in conflicts_text(env)
        m1.stop()
        plain.start()
        time.sleep(2)
        listed = conflicts_text(env)
        assert ctl(env, "create", "ippool", "late", "--cidr", "10.81.0.0/24").returncode == 0
        time.sleep(0.5)
        try:
            got = allocate_ip(plain, "p2", x)
        except grpc.RpcError:
            got = ""
        check = ctl(env, "ipam", "check")
        assert x in listed and (got != x or check.returncode == 1), (
            f"conflicts after the restart without a record:\n{listed}\n{x} handed to p2: "
            f"{got == x}; ipam check: {check.stdout}\n{plain.log()[-1500:]}")
    finally:
        plain.stop()
        m1.stop()


# ---------------------------------------------------------------------- an old-format conflict
def test_resolve_keep_record_of_a_conflict_recorded_before_the_upgrade(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """A conflict record as the previous version wrote it (address, node, handle, holder; the
    recorded handle was not put back), resolved with --keep record while m1 is down: the
    recorded attachment must end up holding X in its block *and* listing it in its handle."""
    env = env_of(private_etcd, prefix)
    assert ctl(env, "create", "ippool", "p", "--cidr", "10.82.0.0/24",
               "--block-size", "28").returncode == 0
    m2 = new_daemon(tmp_path, "m2", "m2", private_etcd.endpoint, prefix).start()
    try:
        x = allocate(m2, "p2")
        etcdctl(private_etcd.endpoint, "put", f"{prefix}/conflicts/m1/{x}", json.dumps({
            "address": x, "node": "m1", "handle": "net/p1/eth0", "holder": "net/p2/eth0",
            "container_id": "p1", "detected": time.time()}))
        assert x in conflicts_text(env)
        done = ctl(env, "ipam", "resolve-conflict", "m1", x, "--keep", "record")
        found = handles(private_etcd.endpoint, prefix)
        check = ctl(env, "ipam", "check")
        assert done.returncode == 1 or (holder_of(found, x) == ["net/p1/eth0"]
                                        and check.returncode == 0), (
            f"resolve: {done.stdout}{done.stderr}\nhandles: "
            f"{ {h: [str(a.ip) for a in v.addresses] for h, v in found.items()} }\n"
            f"ipam check: {check.stdout}")
    finally:
        m2.stop()


# ---------------------------------------------------------------------- the old advice followed
def test_conflict_whose_record_was_deleted_by_hand_can_still_be_resolved(scene: Scene) -> None:
    """The operator follows the previous version's advice (`etcdctl del conflicts/m1/X`)
    while both pods run: ipam check still reports the contested address and names
    `resolve-conflict m1 X`, so `ipam conflicts` must list it and that command must work."""
    etcdctl(scene.server.endpoint, "del", f"{scene.prefix}/conflicts/m1/{scene.x}")
    time.sleep(6)  # m1 re-checks its open conflicts meanwhile
    check = scene.check()
    assert check.returncode == 1 and "resolve-conflict m1" in check.stdout, check.stdout
    listed = conflicts_text(scene.env)
    done = ctl(scene.env, "ipam", "resolve-conflict", "m1", scene.x, "--keep", "record")
    after = scene.check()
    assert scene.x in listed and done.returncode == 0 and after.returncode == 0, (
        f"ipam check: {check.stdout}\nipam conflicts: {listed}\nresolve-conflict: "
        f"{done.stdout}{done.stderr}\nipam check after: {after.stdout}")


# ---------------------------------------------------------------------- pool back, other block size
def test_pool_recreated_with_another_block_size_gets_no_overlapping_block(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """A no-pool conflict (the pool, block size 28, is newer than the snapshot); the operator
    re-creates the pool as told, with the default block size; m2 takes X meanwhile (m1 is
    down); m1 comes back and must not write a /28 block inside m2's block that gives X to p1
    too: one address in two blocks, two pods."""
    env = env_of(private_etcd, prefix)
    m1 = new_daemon(tmp_path, "m1", "m1", private_etcd.endpoint, prefix).start()
    m2 = new_daemon(tmp_path, "m2", "m2", private_etcd.endpoint, prefix)
    try:
        x = no_pool_conflict(private_etcd, prefix, m1, tmp_path, "--cidr", "10.90.0.0/24",
                             "--block-size", "28")
        m1.stop()
        assert ctl(env, "create", "ippool", "late", "--cidr", "10.90.0.0/24").returncode == 0
        m2.start()
        got = allocate_ip(m2, "p2", x)
        m1.start()
        time.sleep(2)
        check = ctl(env, "ipam", "check")
        blocks = etcdctl(private_etcd.endpoint, "get", "--prefix", "--keys-only",
                         f"{prefix}/blocks/").stdout.split()
        found = handles(private_etcd.endpoint, prefix)
        assert len(holder_of(found, x)) <= 1 or x in check.stdout, (
            f"p2 got {got}; holders of {x}: {holder_of(found, x)}; blocks: {blocks}\n"
            f"ipam check: {check.stdout}")
        assert len(blocks) == 1, f"overlapping blocks: {blocks}\nipam check: {check.stdout}"
    finally:
        m1.stop()
        m2.stop()


def test_no_pool_conflict_is_not_over_when_another_pod_takes_the_address(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """A no-pool conflict; m1 is down (p1 keeps running with X); the operator re-creates the
    pool as told; a pod on m2 asks for X and gets it: two pods use X, and ipam check (and
    ipam conflicts) must say so, not take the conflict for over ("let go of it")."""
    env = env_of(private_etcd, prefix)
    m1 = new_daemon(tmp_path, "m1", "m1", private_etcd.endpoint, prefix).start()
    m2 = new_daemon(tmp_path, "m2", "m2", private_etcd.endpoint, prefix)
    try:
        x = no_pool_conflict(private_etcd, prefix, m1, tmp_path, "--cidr", "10.92.0.0/24")
        m1.stop()
        assert ctl(env, "create", "ippool", "late", "--cidr", "10.92.0.0/24").returncode == 0
        m2.start()
        assert allocate_ip(m2, "p2", x) == x
        check = ctl(env, "ipam", "check")
        listed = conflicts_text(env)
        assert check.returncode == 1 and x in check.stdout and x in listed, (
            f"p1 (m1's record) and p2 both use {x}; ipam check: {check.stdout}\n"
            f"ipam conflicts: {listed}")
    finally:
        m1.stop()
        m2.stop()


# ---------------------------------------------------------------------- a corrupt conflict record
def test_corrupt_conflict_record_reported_by_check_is_removable_with_topoipamctl(
        private_etcd: EtcdServer, prefix: str) -> None:
    """A conflict record whose value is unreadable (a torn write, a hand edit): ipam check
    reports it as a problem, so topoipamctl must be able to remove it (resolve-conflict of
    that node and address), with one line on stderr, and nothing else spammed."""
    env = env_of(private_etcd, prefix)
    assert ctl(env, "create", "ippool", "p", "--cidr", "10.93.0.0/24").returncode == 0
    assert ctl(env, "label", "nodes", "m1", "rack=1", "--create").returncode == 0
    for ip in ("10.93.0.5", "10.93.0.6"):
        etcdctl(private_etcd.endpoint, "put", f"{prefix}/conflicts/m1/{ip}", "junk")
    check = ctl(env, "ipam", "check")
    assert check.returncode == 1 and "10.93.0.5" in check.stdout, check.stdout
    done = ctl(env, "ipam", "resolve-conflict", "m1", "10.93.0.5", "--keep", "datastore")
    after = ctl(env, "ipam", "check")
    assert done.returncode == 0 and "10.93.0.5" not in after.stdout, (
        f"ipam check: {check.stdout}\nresolve-conflict m1 10.93.0.5 -> {done.returncode}: "
        f"{done.stdout}{done.stderr}\nipam check after: {after.stdout}")
    assert len(done.stderr.strip().splitlines()) <= 1, done.stderr
