"""After a restore, no address twice; a node's record belongs to one datastore.

Real etcd processes (a real ``etcdutl snapshot restore``), real daemons, the
real CLI. Each scenario is one an operator met: a daemon moved to another
datastore (new etcd, other prefix, a wiped ``--dev`` data directory) must not
write its old allocations there; after a restore of its own datastore, an
address the node's record holds and etcd gave to another pod stays with one
of the two pods whichever is deleted, and a conflict that ended needs no
manual step.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import EtcdServer, temporary_etcd
from tests.daemons import TOPOIPAMD, DaemonProcess, ctl
from tests.integration.restores import (
    Scene,
    allocate_ip,
    env_of,
    holder_of,
    n1_with_record,
    no_pool_conflict,
    release,
    serve_pods,
)
from tests.integration.test_faults import allocate
from tests.integration.test_reliability import handles, new_daemon, wait_for
from topoipam.daemon.store import EtcdOptions, EtcdStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def revision(server: EtcdServer) -> int:
    async def read() -> int:
        async with EtcdStore(EtcdOptions(endpoints=(server.endpoint,))) as store:
            return await store.ping()
    return asyncio.run(read())


def aside_records(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir() if ".aside" in p.name)


# ---------------------------------------------------------------------- another datastore
def test_daemon_moved_to_a_new_etcd_writes_none_of_its_old_allocations(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with temporary_etcd("other-") as other:
        for server in (private_etcd, other):
            assert ctl(env_of(server, prefix), "create", "ippool", "p", "--cidr",
                       "10.64.0.0/24").returncode == 0
        acked = serve_pods(n1_with_record(tmp_path, "a", private_etcd.endpoint, prefix,
                                          state).start(), 5, 0.1)
        moved = n1_with_record(tmp_path, "b", other.endpoint, prefix, state).start()
        try:
            wait_for(lambda: "starting clean" in moved.log(), 20, "no line about the move")
            assert handles(other.endpoint, prefix) == {}, "old allocations written to etcd B"
            line = next(x for x in moved.log().splitlines() if "starting clean" in x)
            assert line.count("datastore ") >= 2, line  # both identities named
            assert aside_records(state), "the old record was not kept aside"
            # It serves its new datastore normally, from its first address.
            assert allocate(moved, "new") == acked[0]
        finally:
            moved.stop()
    # Etcd A still has its five; a daemon back on A finds them (its record is B's now).
    assert len(handles(private_etcd.endpoint, prefix)) == 5


def test_second_prefix_sharing_a_state_dir_gets_no_allocations(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    second = prefix + "-second"
    for each in (prefix, second):
        assert ctl(env_of(private_etcd, each), "create", "ippool", "p", "--cidr",
                   "10.66.0.0/24").returncode == 0
    serve_pods(n1_with_record(tmp_path, "a", private_etcd.endpoint, prefix, state).start(),
               5, 0.1)
    other = n1_with_record(tmp_path, "b", private_etcd.endpoint, second, state).start()
    try:
        allocate(other, "x")
        time.sleep(0.5)
        assert set(handles(private_etcd.endpoint, second)) == {"net/x/eth0"}
    finally:
        other.stop()
    # The first prefix's daemon, back, still finds its own record intact.
    back = n1_with_record(tmp_path, "c", private_etcd.endpoint, prefix, state).start()
    try:
        assert len(handles(private_etcd.endpoint, prefix)) == 5
        assert "starting clean" not in back.log()
    finally:
        back.stop()


def start_dev(state: Path, log: Path) -> tuple[subprocess.Popen[bytes], DaemonProcess]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPOIPAM_")}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [TOPOIPAMD, "--dev", "--state-dir", str(state), "--node", "dev-node",
             "--metrics-address", "off"], stdout=out, stderr=subprocess.STDOUT, env=env)
    wait_for(lambda: "etcd at http://" in log.read_text(), 30, "dev etcd not started")
    endpoint = log.read_text().rsplit("etcd at ", 1)[1].split()[0]
    daemon = DaemonProcess("dev-node", str(state / "topoipamd.sock"), endpoint,
                           "/topoipam/v1", str(log))
    daemon.process = process
    wait_for(lambda: daemon.health() == "SERVING", 30, "dev daemon not serving")
    return process, daemon


def test_dev_daemon_after_its_etcd_data_was_wiped_starts_clean(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "dev.log"
    process, daemon = start_dev(state, log)
    serve_pods(daemon, 3, 0.1)
    shutil.rmtree(state / "etcd")
    log.write_text("")
    process, daemon = start_dev(state, log)
    try:
        assert handles(daemon.endpoints, "/topoipam/v1") == {}, log.read_text()
        assert "starting clean" in log.read_text()
    finally:
        daemon.stop()


# ---------------------------------------------------------------------- a conflict after a restore
def test_a_holding_conflict_is_reported_with_what_is_really_there(scene: Scene) -> None:
    check = scene.check()
    assert check.returncode == 1, check.stdout
    line = next(x for x in check.stdout.splitlines() if scene.x in x and "conflict" in x)
    assert "net/p1/eth0" in line and "net/p2/eth0" in line and "m1" in line and "m2" in line
    assert "etcdctl" not in check.stdout and "resolve-conflict" in line
    shown = ctl(scene.env, "ipam", "show", "--ip", scene.x)
    assert "contested" in shown.stdout and "net/p1/eth0" in shown.stdout, shown.stdout


@pytest.mark.parametrize("deleted", ["p2", "p1"])
def test_deleting_either_pod_leaves_the_address_with_the_other(scene: Scene,
                                                                 deleted: str) -> None:
    kept = "p1" if deleted == "p2" else "p2"
    release(scene.m2 if deleted == "p2" else scene.m1, deleted)
    assert holder_of(scene.handles(), scene.x) == [f"net/{kept}/eth0"]
    check = scene.check()
    assert check.returncode == 0, check.stdout  # the conflict ended, nothing to do by hand
    scene.third_pod_is_refused()
    scene.restart_m1()
    assert holder_of(scene.handles(), scene.x) == [f"net/{kept}/eth0"]
    check = scene.check()
    assert check.returncode == 0, check.stdout + scene.m1.log()
    scene.third_pod_is_refused()


def conflicts_json(scene: Scene) -> list[dict[str, Any]]:
    listed = ctl(scene.env, "ipam", "conflicts", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))


@pytest.mark.parametrize("keep", ["record", "datastore"])
def test_resolve_conflict_keeps_one_side(scene: Scene, keep: str) -> None:
    listed = ctl(scene.env, "ipam", "conflicts")
    assert listed.returncode == 0 and scene.x in listed.stdout, listed.stdout + listed.stderr
    [entry] = conflicts_json(scene)
    assert entry["address"] == scene.x and entry["node"] == "m1" and entry["holds"]
    refused = ctl(scene.env, "ipam", "resolve-conflict", "m1", scene.x)
    assert refused.returncode == 1 and "--keep" in refused.stderr, refused.stderr
    done = ctl(scene.env, "ipam", "resolve-conflict", "m1", scene.x, "--keep", keep)
    assert done.returncode == 0, done.stderr
    winner = "net/p1/eth0" if keep == "record" else "net/p2/eth0"
    assert holder_of(scene.handles(), scene.x) == [winner]
    assert scene.check().returncode == 0
    assert conflicts_json(scene) == []
    scene.restart_m1()
    assert holder_of(scene.handles(), scene.x) == [winner]
    assert scene.check().returncode == 0, scene.check().stdout
    scene.third_pod_is_refused()


def test_resolve_conflict_bad_input_writes_nothing(scene: Scene) -> None:
    before = revision(scene.server)
    for args, named in ((["nosuchnode", scene.x, "--keep", "record"], "nosuchnode"),
                        (["m1", "10.65.0.200", "--keep", "record"], "10.65.0.200"),
                        (["m1", "10.65.0.999", "--keep", "record"], "10.65.0.999"),
                        (["m1", scene.x, "--keep", "both"], "both")):
        done = ctl(scene.env, "ipam", "resolve-conflict", *args)
        assert done.returncode == 1, (args, done.stderr)
        assert named in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr
    assert revision(scene.server) == before


# ---------------------------------------------------------------------- a pool the snapshot lacked
def test_conflict_of_a_pool_the_snapshot_lacked_ends_when_the_pool_is_back(
        private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    env = env_of(private_etcd, prefix)
    m1 = new_daemon(tmp_path, "m1", "m1", private_etcd.endpoint, prefix).start()
    try:
        x = no_pool_conflict(private_etcd, prefix, m1, tmp_path, "--cidr", "10.67.0.0/24")
        check = ctl(env, "ipam", "check")
        assert check.returncode == 1 and x in check.stdout, check.stdout
        line = next(x_ for x_ in check.stdout.splitlines() if x in x_)
        assert "two pods" not in line and "no pool" in line, line
        assert ctl(env, "create", "ippool", "late", "--cidr", "10.67.0.0/24").returncode == 0
        wait_for(lambda: holder_of(handles(private_etcd.endpoint, prefix), x)
                 == ["net/p1/eth0"], 20, "the daemon did not put p1 back")
        check = ctl(env, "ipam", "check")
        assert check.returncode == 0, check.stdout
        with pytest.raises(grpc.RpcError):
            allocate_ip(m1, "p3", x)
        m1.stop()
        m1.start()
        time.sleep(1.0)
        assert ctl(env, "ipam", "check").returncode == 0
    finally:
        m1.stop()


def test_forced_release_of_a_contested_address_says_where_it_went(scene: Scene) -> None:
    done = ctl(scene.env, "ipam", "release", "--ip", scene.x, "--force")
    assert done.returncode == 0, done.stderr
    assert "now belongs to net/p1/eth0 (node m1)" in done.stdout, done.stdout
    assert "duplicate" not in done.stderr, done.stderr
    assert holder_of(scene.handles(), scene.x) == ["net/p1/eth0"]
    assert scene.check().returncode == 0, scene.check().stdout
