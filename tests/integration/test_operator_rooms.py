"""Hostile reproductions of the room-index cleanup on pool delete: real etcd,
topoipamctl, a real daemon."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.conftest import EtcdServer
from tests.daemons import DaemonProcess, cni, ctl
from tests.etcd_cluster import etcdctl


def rooms(etcd: EtcdServer, prefix: str) -> list[str]:
    done = etcdctl(etcd.endpoint, "get", "--prefix", "--keys-only", f"{prefix}/room/")
    return [line for line in done.stdout.splitlines() if line.strip()]


def run(ctl_env: dict[str, str], *args: str) -> str:
    done = ctl(ctl_env, *args)
    assert done.returncode == 0, f"topoipamctl {' '.join(args)}: {done.stderr}"
    return done.stdout


def test_overlapping_pools_deleting_one_keeps_the_others_rooms(
        etcd: EtcdServer, prefix: str, ctl_env: dict[str, str]) -> None:
    run(ctl_env, "create", "ippool", "wide", "--cidr", "10.0.0.0/16", "--block-size", "26")
    made = ctl(ctl_env, "create", "ippool", "narrow", "--cidr", "10.0.4.0/22",
               "--block-size", "26")
    if made.returncode != 0:  # overlapping pools are refused: nothing to test
        assert "overlap" in made.stderr, made.stderr
        return
    before = rooms(etcd, prefix)
    run(ctl_env, "delete", "ippool", "narrow")
    after = rooms(etcd, prefix)
    assert after == before or set(before) - set(after) == set(), (len(before), len(after))


def test_create_racing_delete_leaves_no_stray_room_entries(
        etcd: EtcdServer, prefix: str, ctl_env: dict[str, str]) -> None:
    for attempt in range(8):
        name = f"race{attempt}"
        made: list[int] = []

        def create(made: list[int] = made, name: str = name, attempt: int = attempt) -> None:
            made.append(ctl(ctl_env, "create", "ippool", name, "--cidr",
                            f"10.{attempt}.0.0/16", "--block-size", "30").returncode)

        thread = threading.Thread(target=create)
        thread.start()
        # Delete as soon as the pool exists (its room entries are still being written).
        while thread.is_alive():
            if ctl(ctl_env, "delete", "ippool", name).returncode == 0:
                break
        thread.join()
        ctl(ctl_env, "delete", "ippool", name)
    left = rooms(etcd, prefix)
    check = ctl(ctl_env, "ipam", "check")
    assert not left, (len(left), check.stdout)


def test_forced_delete_while_a_daemon_releases_leaves_no_strays(
        etcd: EtcdServer, prefix: str, tmp_path: Path, ctl_env: dict[str, str]) -> None:
    run(ctl_env, "create", "ippool", "p", "--cidr", "10.9.0.0/24", "--block-size", "28")
    daemon = DaemonProcess("n1", str(tmp_path / "n1.sock"), etcd.endpoint, prefix,
                           str(tmp_path / "n1.log")).start()
    try:
        conf = {"cniVersion": "1.1.0", "name": "net",
                "ipam": {"type": "topoipam", "socket": daemon.socket}}
        for i in range(20):
            assert cni("ADD", conf, container=f"c{i}")[0] == 0
        run(ctl_env, "delete", "ippool", "p", "--force")
        for i in range(20):  # the pods go: their blocks empty and are deleted
            assert cni("DEL", conf, container=f"c{i}")[0] == 0
    finally:
        daemon.stop()
    left = rooms(etcd, prefix)
    check = ctl(ctl_env, "ipam", "check")
    assert not left or "room" in check.stdout + check.stderr, (left, check.stdout)
    if left:
        run(ctl_env, "ipam", "repair-index")
        assert not rooms(etcd, prefix)
    assert ctl(ctl_env, "ipam", "check").returncode == 0
