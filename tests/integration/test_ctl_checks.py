"""`topoipamctl explain node` and the reports `check coverage`, `check placement` and
`check routes` against a real etcd, in-process through ``ctl.run``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.inprocess_ctl import RACK_POOLS, Ctl, allocate, delete_handle
from topoipam.daemon.core.holdings import Attachment
from topoipam.daemon.engine import AllocationEngine, AllocationRequest
from topoipam.daemon.store import EtcdStore

pytestmark = pytest.mark.asyncio


# ---------------------------------------------------------------------------- explain


@pytest.mark.usefixtures("racks")
async def test_explain_node_shows_every_pool_and_the_order(run_ctl: Ctl) -> None:
    assert (await run_ctl("create", "ippool", "manual", "--cidr", "10.9.0.0/24",
                          "--assignment-mode", "Manual")).code == 0
    assert (await run_ctl("create", "ippool", "off", "--cidr", "10.8.0.0/24",
                          "--disabled")).code == 0
    assert (await run_ctl("create", "ippool", "v6", "--cidr", "fd00::/64",
                          "--node-selector", 'rack == "1"')).code == 0
    assert (await run_ctl("create", "ippool", "v6-manual", "--cidr", "fd00:1::/64",
                          "--assignment-mode", "Manual")).code == 0

    result = await run_ctl("explain", "node", "node-0")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[:2] == ["node: node-0", "labels: rack=0"]
    table = {line.split()[0]: line for line in lines[3:10]}
    assert "MATCH" in table["POOL"]
    assert table["rack-0"].split()[2:5] == ["IPv4", "enabled", "Automatic"]
    assert table["rack-0"].endswith('yes     selector rack == "0" matches')
    assert 'no      selector rack == "1" does not match: rack is "0", not "1"' in table["rack-1"]
    assert "assignmentMode is Manual" in table["manual"]
    assert "pool is disabled" in table["off"]
    assert lines[-5:] == [
        "IPv4 allocation order:",
        "  1. node-0's blocks with free addresses: none",
        "  2. claim a new block in: rack-0",
        "  3. borrow a free address from other nodes' blocks in: rack-0",
        "IPv6 allocation order: none: no enabled IPv6 pool selects node node-0 (labels "
        "{rack=0}; pools considered: v6; Manual pools, used only when named: v6-manual)",
    ]
    result = await run_ctl("explain", "node", "ghost")
    assert result.code == 0 and "node ghost is not registered" in result.err


async def test_explain_node_says_when_no_block_is_left_to_claim(
    run_ctl: Ctl, store: EtcdStore
) -> None:
    assert (await run_ctl("create", "ippool", "tiny", "--cidr", "10.77.0.0/30", "--block-size",
                          "30")).code == 0
    for node in ("a", "b"):
        assert (await run_ctl("label", "nodes", node, "x=y", "--create")).code == 0
    await allocate(store, "a", "c1", "p1")  # node a claims tiny's only block
    steps = (await run_ctl("explain", "node", "b")).out.splitlines()
    assert "  2. no new blocks: no unclaimed block left in: tiny" in steps, steps
    assert (await run_ctl("create", "ippool", "roomy", "--cidr", "10.78.0.0/24")).code == 0
    steps = (await run_ctl("explain", "node", "b")).out.splitlines()
    assert "  2. claim a new block in: roomy (no unclaimed block left in: tiny)" in steps, steps


@pytest.mark.usefixtures("racks")
async def test_explain_node_orders_affine_blocks_first(run_ctl: Ctl, store: EtcdStore) -> None:
    assert (await run_ctl("create", "ippool", "rack-0-extra", "--cidr", "10.7.0.0/24",
                          "--node-selector", 'rack == "0"')).code == 0
    await allocate(store, "node-0", "c0", "nginx-0")
    result = await run_ctl("explain", "node", "node-0")
    assert result.out.splitlines()[-4:] == [
        "IPv4 allocation order:",
        "  1. node-0's blocks with free addresses: 192.168.0.0/26 (pool rack-0, 61 free)",
        "  2. claim a new block in: rack-0, rack-0-extra",
        "  3. borrow a free address from other nodes' blocks in: rack-0, rack-0-extra",
    ]
    assert (await run_ctl("ipam", "configure", "--strictaffinity", "true")).code == 0
    result = await run_ctl("explain", "node", "node-0")
    assert result.out.splitlines()[-1] == "  3. no borrowing: strictAffinity is on"


# ------------------------------------------------------------------ check coverage, check placement


@pytest.mark.usefixtures("racks")
async def test_check_coverage_per_family(run_ctl: Ctl) -> None:
    result = await run_ctl("check", "coverage")
    assert (result.code, result.out) == (0, "check coverage: OK (4 nodes, 2 pools)\n")
    assert (await run_ctl("create", "ippool", "v6", "--cidr", "fd00::/64",
                          "--node-selector", 'rack == "1"')).code == 0
    result = await run_ctl("check", "coverage")
    assert result.code == 1
    assert result.out.splitlines() == [
        "uncovered node: no enabled IPv6 pool selects node node-0 (labels {rack=0}; pools "
        "considered: v6)",
        "uncovered node: no enabled IPv6 pool selects node node-1 (labels {rack=0}; pools "
        "considered: v6)",
        "check coverage: 2 problem(s) found (2 of 4 node(s) not selected by any enabled "
        "Automatic pool; 3 pools)",
    ]


@pytest.mark.usefixtures("racks")
async def test_check_placement_lists_disabled_and_unselected(
    run_ctl: Ctl, store: EtcdStore
) -> None:
    ip0 = await allocate(store, "node-0", "c0", "nginx-0")
    ip2 = await allocate(store, "node-2", "c2", "nginx-2")
    result = await run_ctl("check", "placement", "--fail-on-found")
    assert (result.code, result.out) == (0, "check placement: OK (2 allocations)\n")

    assert (await run_ctl("label", "nodes", "node-0", "rack=1", "--overwrite")).code == 0
    disabled = RACK_POOLS.split("---\n")[1].replace('"1"}', '"1", disabled: true}')
    assert (await run_ctl("apply", "-f", "-", stdin=disabled)).code == 0
    result = await run_ctl("check", "placement")
    assert result.code == 0
    rows = [line.split()[:5] for line in result.out.splitlines()[1:-1]]
    assert rows == [
        [ip0, "node-0", "rack-0", "k8s-pod-network/c0/eth0", "default/nginx-0"],
        [ip2, "node-2", "rack-1", "k8s-pod-network/c2/eth0", "default/nginx-2"],
    ]
    assert "pool rack-1 is disabled" in result.out
    assert result.out.endswith("check placement: 2 of 2 allocation(s) outside their node's "
                               "pools\n")
    assert (await run_ctl("check", "placement", "--fail-on-found")).code == 1


@pytest.mark.usefixtures("racks")
async def test_check_verbs_share_exit_codes(run_ctl: Ctl, store: EtcdStore) -> None:
    await allocate(store, "node-0", "c0", "nginx-0")
    for verb in (["ipam", "check"], ["check", "coverage"], ["check", "placement"]):
        assert (await run_ctl(*verb)).code == 0, verb
        assert (await run_ctl(*verb, "--fail-on-warnings")).code == 0, verb
    # Warnings only: exit 0, unless --fail-on-warnings.
    assert (await run_ctl("label", "nodes", "node-0", "rack=1", "--overwrite")).code == 0
    placement = await run_ctl("check", "placement")
    assert placement.code == 0
    assert (await run_ctl("check", "placement", "--fail-on-warnings")).code == 1
    # Problems: exit 1.
    assert (await run_ctl("label", "nodes", "node-1", "rack=9", "--overwrite")).code == 0
    assert (await run_ctl("check", "coverage")).code == 1
    await delete_handle(store, "k8s-pod-network/c0/eth0")
    assert (await run_ctl("ipam", "check")).code == 1


# ---------------------------------------------------------------------------- check routes


@pytest.mark.usefixtures("racks")
async def test_check_routes_aggregates_each_racks_blocks(run_ctl: Ctl, store: EtcdStore) -> None:
    for i in range(4):
        await allocate(store, f"node-{i}", f"c{i}", f"nginx-{i}")
    result = await run_ctl("check", "routes")
    assert result.code == 0, result.out + result.err
    lines = result.out.splitlines()
    assert [line.split() for line in lines[:3]] == [
        ["RACK", "NODES", "POOLS", "PREFIXES", "AGGREGATE", "BREAKING"],
        ["0", "node-0,node-1", "rack-0", "1", "192.168.0.0/25", "-"],
        ["1", "node-2,node-3", "rack-1", "1", "192.168.1.0/25", "-"],
    ]
    assert lines[-1] == ("check routes: OK (2 rack value(s), 2 prefix(es) to route, "
                         "0 breaking aggregation)")
    # Another label names other domains: one per node here.
    by_node = await run_ctl("check", "routes", "--by", "zone")
    assert by_node.code == 0
    assert "warning: 4 node(s) have no label zone: node-0, node-1, node-2, node-3" in by_node.out
    assert (await run_ctl("check", "routes", "--by", "zone", "--fail-on-warnings")).code == 1


@pytest.mark.usefixtures("racks")
async def test_check_routes_relabelled_nodes_block_breaks_aggregation(
    run_ctl: Ctl, store: EtcdStore
) -> None:
    for i in range(4):
        await allocate(store, f"node-{i}", f"c{i}", f"nginx-{i}")
    assert (await run_ctl("label", "nodes", "node-0", "rack=1", "--overwrite")).code == 0
    result = await run_ctl("check", "routes")
    assert result.code == 1
    lines = result.out.splitlines()
    assert [line.split() for line in lines[1:3]] == [
        ["0", "node-1", "rack-0", "1", "192.168.0.64/26", "-"],
        ["1", "node-0,node-2,node-3", "rack-0,rack-1", "2", "192.168.1.0/25",
         "192.168.0.0/26"],
    ]
    assert lines[-2] == (
        'breaks aggregation: 192.168.0.0/26 routed to rack=1 (node node-0): block of node '
        'node-0 outside its node\'s pools: pool rack-0 does not select node node-0 (rack is '
        '"1", not "0")')
    assert lines[-1] == ("check routes: 1 problem(s) found (2 rack value(s), 3 prefix(es) to "
                         "route, 1 breaking aggregation)")


async def test_check_routes_borrowed_address_from_another_rack_is_a_host_route(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    for i in range(4):
        assert (await run_ctl("label", "nodes", f"node-{i}", f"rack={i // 2}",
                              "--create")).code == 0
    # One /26 pool for both racks is a single block: node-0 claims it, node-2 borrows.
    assert (await run_ctl("create", "ippool", "shared", "--cidr", "10.0.0.0/26")).code == 0
    assert (await run_ctl("create", "ippool", "shared-v6", "--cidr", "fd00:9::/122")).code == 0
    own = await allocate(store, "node-0", "c0", "a")
    same_rack = await allocate(store, "node-1", "c1", "b")
    borrowed = await allocate(store, "node-2", "c2", "c")
    assert len({own, same_rack, borrowed}) == 3

    result = await run_ctl("check", "routes", "-o", "json")
    assert result.code == 1
    report = json.loads(result.out)
    assert report["label"] == "rack" and report["prefixes"] == 2 and report["breaking"] == 1
    rack0, rack1 = report["domains"]
    assert rack0 == {"value": "0", "nodes": ["node-0", "node-1"], "pools": ["shared"],
                     "aggregate": ["10.0.0.0/26"], "exceptions": [], "prefixes": 1}
    assert rack1["value"] == "1" and rack1["aggregate"] == [] and rack1["pools"] == []
    assert rack1["exceptions"] == [{
        "prefix": f"{borrowed}/32", "kind": "address", "node": "node-2", "pool": "shared",
        "reason": "address of node node-2 in block 10.0.0.0/26 of node node-0 (rack=0)"}]

    explained = await run_ctl("explain", "node", "node-2")
    assert explained.code == 0
    assert explained.out.splitlines()[-2:] == [
        "borrowed: node-2 holds 1 address(es) in blocks it does not own (routes that may "
        "break aggregation: see `topoipamctl check routes`):",
        f"  {borrowed} in block 10.0.0.0/26 of node node-0 (pod default/c)"]
    assert "borrowed" not in (await run_ctl("explain", "node", "node-0")).out

    # An IPv6 address borrowed across racks is a /128.
    v6 = await AllocationEngine(store, "node-0").allocate(AllocationRequest(
        Attachment("k8s-pod-network", "v6-0", "eth0"), ipv4=False, ipv6=True))
    v6_borrowed = await AllocationEngine(store, "node-3").allocate(AllocationRequest(
        Attachment("k8s-pod-network", "v6-3", "eth0"), ipv4=False, ipv6=True))
    assert v6.addresses and v6_borrowed.addresses
    result = await run_ctl("check", "routes")
    assert result.code == 1
    assert (f"breaks aggregation: {v6_borrowed.addresses[0].ip}/128 routed to rack=1 "
            "(node node-3)") in result.out
