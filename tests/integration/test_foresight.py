"""Foresight on the seed's cluster: dry runs, explain pod, check capacity.

Four nodes in two racks, the seed's two rack pools, pods running (real etcd;
the pods' addresses allocated by the daemon's own engine, and by a real
daemon for ``explain pod``). A dry run validates like the real command,
reports what would change and writes nothing (the etcd revision does not
move); ``explain pod`` predicts the next ADD's address exactly;
``check capacity`` counts what ``ipam show`` counts.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from tests.daemons import NodeDaemons, cni, ctl, rack_pools_manifest
from tests.integration.test_engine import request, seed
from topoipam.daemon.core.model import Node
from topoipam.daemon.engine import AllocationEngine
from topoipam.daemon.store import EtcdStore

RACK = {"node-0": "0", "node-1": "0", "node-2": "1", "node-3": "1"}
MOVED = rack_pools_manifest("rack-{rack}").replace('rack == "1"', 'rack == "2"')


async def seed_cluster(store: EtcdStore, ctl_env: dict[str, str]) -> None:
    """The seed's cluster: rack pools, four labelled nodes, 2 pods on rack 0, 6 on rack 1."""
    await seed(store, *(Node(n, {"rack": r}) for n, r in RACK.items()))
    done = await asyncio.to_thread(ctl, ctl_env, "apply", "-f", "-",
                                   input=rack_pools_manifest("rack-{rack}"))
    assert done.returncode == 0, done.stderr
    for node, pods in (("node-0", 1), ("node-1", 1), ("node-2", 3), ("node-3", 3)):
        engine = AllocationEngine(store, node)
        try:
            for i in range(pods):
                await engine.allocate(request(f"{node}-{i}", attributes={
                    "namespace": "default", "pod": f"web-{node}-{i}"}))
        finally:
            await engine.close()


async def revision(store: EtcdStore) -> int:
    _, rev = await store.prefix_raw(store.keys.prefix.encode() + b"/", keys_only=True)
    return rev


async def run(ctl_env: dict[str, str], *args: str, stdin: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(ctl, ctl_env, *args, input=stdin)


@pytest.mark.asyncio
async def test_a_dry_run_moving_a_racks_pool_names_the_nodes_and_writes_nothing(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    await seed_cluster(store, ctl_env)
    before = await revision(store)
    done = await run(ctl_env, "apply", "-f", "-", "--dry-run", stdin=MOVED)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "dry run: nothing was written" in out
    assert "nodes left without a pool: node-2 (IPv4), node-3 (IPv4)" in out, out
    assert "allocations that would fall outside their node's pools: 6" in out, out
    assert await revision(store) == before  # nothing written
    shown = json.loads((await run(ctl_env, "apply", "-f", "-", "--dry-run", "-o", "json",
                                  stdin=MOVED)).stdout)
    assert shown["nodes_left_without_pool"] == ["node-2", "node-3"]
    assert shown["outside"]["count"] == 6 and len(shown["outside"]["first"]) == 6
    assert {d["value"]: d["after"]["ipv4"]["capacity"] for d in shown["capacity"]} == {
        "0": 253, "1": 0}
    impact = await run(ctl_env, "apply", "-f", "-", "--dry-run", "--fail-on-impact",
                       stdin=MOVED)
    assert impact.returncode == 1
    assert await revision(store) == before


@pytest.mark.asyncio
async def test_a_label_dry_run_names_the_pool_the_node_would_move_to(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    await seed_cluster(store, ctl_env)
    before = await revision(store)
    done = await run(ctl_env, "label", "nodes", "node-0", "rack=1", "--overwrite", "--dry-run")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert ["node-0", "IPv4", "rack-0", "rack-1"] in rows, done.stdout
    assert "allocations that would fall outside their node's pools: 1" in done.stdout
    assert await revision(store) == before
    labels = (await store.get_node("node-0"))
    assert labels is not None and labels.value.labels == {"rack": "0"}


@pytest.mark.asyncio
@pytest.mark.parametrize("args", [
    ("label", "nodes", "node-0", "rack=1", "--dry-run"),  # needs --overwrite
    ("create", "ippool", "bad", "--cidr", "192.168.0.0/25", "--dry-run"),  # overlaps rack-0
])
async def test_an_invalid_change_fails_its_dry_run_as_it_fails_without(
        store: EtcdStore, ctl_env: dict[str, str], args: tuple[str, ...]) -> None:
    await seed_cluster(store, ctl_env)
    before = await revision(store)
    dry = await run(ctl_env, *args)
    real = await run(ctl_env, *(a for a in args if a != "--dry-run"))
    assert dry.returncode == real.returncode == 1
    assert dry.stderr == real.stderr and len(dry.stderr.strip().splitlines()) == 1, dry.stderr
    assert await revision(store) == before


@pytest.mark.asyncio
async def test_check_capacity_counts_what_ipam_show_counts(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    await seed_cluster(store, ctl_env)
    done = await run(ctl_env, "check", "capacity", "--by", "rack", "-o", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["label"] == "rack"
    shown = {row.split()[0]: row.split() for row in
             (await run(ctl_env, "ipam", "show")).stdout.splitlines()[1:] if row.strip()}
    for domain in report["domains"]:
        pool = shown[f"rack-{domain['value']}"]
        assert domain["ipv4"] == {"capacity": int(pool[3]), "in_use": int(pool[2]),
                                  "free": int(pool[3]) - int(pool[2]), "pools": [pool[0]]}
        assert domain["pods"] == domain["ipv4"]["free"]
    assert [d["nodes"] for d in report["domains"]] == [["node-0", "node-1"],
                                                       ["node-2", "node-3"]]
    text = await run(ctl_env, "check", "capacity")
    assert "check capacity: OK" in text.stdout, text.stdout


@pytest.mark.asyncio
async def test_explain_pod_predicts_the_next_adds_address(
        store: EtcdStore, ctl_env: dict[str, str], node_daemons: NodeDaemons) -> None:
    await seed_cluster(store, ctl_env)
    await seed(store, Node("node-9", {"rack": "0"}))
    daemon = await asyncio.to_thread(node_daemons.start, "node-9")
    config = {"cniVersion": "1.0.0", "name": "net",
              "ipam": {"type": "topoipam", "socket": daemon.socket}}
    for i, path in enumerate(("claim", "own block", "own block")):
        explained = await run(ctl_env, "explain", "pod", f"default/web-{i}", "--node", "node-9")
        assert explained.returncode == 0, explained.stderr
        [row] = [line.split() for line in explained.stdout.splitlines()
                 if line.startswith("192.168.")]
        assert row[1] == "rack-0" and " ".join(row[4:4 + len(path.split())]) == path, row
        code, result, err = await asyncio.to_thread(
            cni, "ADD", config, f"c{i}", "eth0", "", f"K8S_POD_NAMESPACE=default;"
            f"K8S_POD_NAME=web-{i}")
        assert code == 0, err
        assert result is not None and result["ips"][0]["address"].split("/")[0] == row[0]
    missing = await run(ctl_env, "explain", "pod", "default/web-0")
    assert missing.returncode == 2 and "--node" in missing.stderr


@pytest.mark.asyncio
async def test_deleting_a_pool_dry_run_counts_its_allocations_and_a_bad_label_is_one_line(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    await seed_cluster(store, ctl_env)
    before = await revision(store)
    gone = await run(ctl_env, "delete", "ippool", "rack-1", "--force", "--dry-run", "-o",
                     "json")
    assert gone.returncode == 0, gone.stderr
    shown = json.loads(gone.stdout)
    assert shown["outside"]["count"] == 6
    assert {row["reason"] for row in shown["outside"]["first"]} == {"its pool was deleted"}
    for args in (("check", "capacity", "--by", "bad key!"),
                 ("label", "nodes", "node-0", "x=y", "--dry-run", "--by", "bad key!"),
                 ("report", "--html", "/tmp/never.html", "--by", "bad key!")):
        done = await run(ctl_env, *args)
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "--by: invalid label key 'bad key!'" in done.stderr
    assert await revision(store) == before
