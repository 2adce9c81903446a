"""`topoipamctl get allocations`, `ipam …` and `delete node` against a real etcd,
in-process through ``ctl.run``: what is allocated where, the audit and its repairs
(``ipam check``, ``ipam release``), the IPAM config, and a node's retirement.
"""

from __future__ import annotations

import ipaddress
import json

import pytest
import yaml

from tests.integration.inprocess_ctl import (
    Ctl,
    allocate,
    delete_handle,
    dump,
    refused_without_writes,
)
from topoipam.daemon.core.writes import PutAffinity, PutBlock
from topoipam.daemon.engine import AllocationEngine
from topoipam.daemon.store import EtcdStore

pytestmark = pytest.mark.asyncio


# ---------------------------------------------------------------------------- allocations


ALLOCATION_KEYS = {"ip", "node", "pool", "block", "handle", "namespace", "pod", "container_id",
                   "ifname"}


@pytest.mark.usefixtures("racks")
async def test_get_allocations_json_shape_and_node_filter(
    run_ctl: Ctl, store: EtcdStore, prefix: str
) -> None:
    await allocate(store, "node-0", "c0", "nginx-0")
    await allocate(store, "node-2", "c2", "nginx-2")

    result = await run_ctl("get", "allocations", "-o", "json")
    rows = json.loads(result.out)
    assert all(set(row) == ALLOCATION_KEYS for row in rows)
    assert rows == [
        {"ip": "192.168.0.2", "node": "node-0", "pool": "rack-0", "block": "192.168.0.0/26",
         "handle": "k8s-pod-network/c0/eth0", "namespace": "default", "pod": "nginx-0",
         "container_id": "c0", "ifname": "eth0"},
        {"ip": "192.168.1.2", "node": "node-2", "pool": "rack-1", "block": "192.168.1.0/26",
         "handle": "k8s-pod-network/c2/eth0", "namespace": "default", "pod": "nginx-2",
         "container_id": "c2", "ifname": "eth0"},
    ]
    result = await run_ctl("get", "allocations", "--node", "node-2", "-o", "json")
    assert [r["ip"] for r in json.loads(result.out)] == ["192.168.1.2"]
    result = await run_ctl("get", "allocations", "--node", "node-2")
    assert result.out.splitlines()[1].split() == [
        "192.168.1.2", "node-2", "rack-1", "default/nginx-2"]
    result = await run_ctl("get", "allocations", "-o", "wide")
    assert result.out.splitlines()[0].split() == [
        "IP", "NODE", "POOL", "POD", "BLOCK", "HANDLE", "CONTAINER-ID", "IFNAME"]

    # An address whose handle is gone is still listed, with what is unknown as null.
    await delete_handle(store, "k8s-pod-network/c0/eth0")
    rows = json.loads((await run_ctl("get", "allocations", "-o", "json")).out)
    assert rows[0] == {
        "ip": "192.168.0.2", "node": None, "pool": "rack-0", "block": "192.168.0.0/26",
        "handle": "k8s-pod-network/c0/eth0", "namespace": None, "pod": None,
        "container_id": None, "ifname": None}


@pytest.mark.usefixtures("racks")
async def test_get_allocations_yaml_and_short_names(run_ctl: Ctl, store: EtcdStore) -> None:
    await allocate(store, "node-0", "c0", "nginx-0")
    result = await run_ctl("get", "allocations", "-o", "yaml")
    assert result.code == 0
    as_json = json.loads((await run_ctl("get", "allocations", "-o", "json")).out)
    assert yaml.safe_load(result.out) == as_json
    assert (await run_ctl("get", "ipp", "-o", "json")).out == (
        await run_ctl("get", "ippool", "-o", "json")).out
    assert "node-0" in (await run_ctl("get", "no")).out
    assert (await run_ctl("label", "no", "node-0", "zone=a")).code == 0


# ---------------------------------------------------------------------------- ipam show


async def test_ipam_show_summary_blocks_borrowed_and_ip(run_ctl: Ctl, store: EtcdStore) -> None:
    # One /26 pool is a single block: node-0 claims it, node-1 must borrow from it.
    assert (await run_ctl("create", "ippool", "tiny", "--cidr", "10.0.0.0/26")).code == 0
    await allocate(store, "node-0", "c0", "a")
    borrowed = await allocate(store, "node-1", "c1", "b")

    result = await run_ctl("ipam", "show", "--show-blocks", "--show-borrowed")
    sections = [s.splitlines() for s in result.out.split("\n\n")]
    assert [line.split() for line in sections[0]] == [
        ["POOL", "CIDR", "IN-USE", "CAPACITY", "USED"],
        ["tiny", "10.0.0.0/26", "2", "61", "3.3%"]]
    assert [line.split() for line in sections[1]] == [
        ["BLOCK", "POOL", "AFFINITY", "IN-USE", "FREE"],
        ["10.0.0.0/26", "tiny", "node-0", "2", "59"]]
    assert [line.split() for line in sections[2]] == [
        ["IP", "BLOCK", "AFFINITY", "NODE", "HANDLE", "POD"],
        [borrowed, "10.0.0.0/26", "node-0", "node-1", "k8s-pod-network/c1/eth0", "default/b"]]

    async def who(ip: str) -> str:
        return (await run_ctl("ipam", "show", "--ip", ip)).out.strip()

    assert await who(borrowed) == (f"{borrowed} is allocated to handle k8s-pod-network/c1/eth0 "
                                   "on node node-1 (pod default/b) in block 10.0.0.0/26 of pool "
                                   "tiny")
    assert await who("10.0.0.9") == (
        "10.0.0.9 is free (pool tiny, block 10.0.0.0/26, affinity node-0)")
    assert await who("10.0.0.0") == ("10.0.0.0 is the network or broadcast address of pool tiny "
                                     "(never used)")
    assert await who("10.0.0.1") == "10.0.0.1 is the gateway of pool tiny (never handed out)"
    assert await who("172.16.0.1") == "172.16.0.1 is not in any pool"
    result = await run_ctl("ipam", "show", "--ip", "10.0.0.300")
    assert result.code == 1 and "not a valid IP address" in result.err


async def test_ipam_show_free_and_capacity_are_what_can_be_handed_out(
    run_ctl: Ctl, store: EtcdStore
) -> None:
    assert (await run_ctl("create", "ippool", "tiny", "--cidr", "10.0.0.0/26")).code == 0
    assert (await run_ctl("create", "ippool", "gone", "--cidr", "10.1.0.0/26")).code == 0
    reservation = ("apiVersion: topoipam/v1\nkind: IPReservation\nmetadata: {name: gw}\n"
                   "spec: {cidrs: [10.0.0.1/32, 10.0.0.0/32, 10.0.0.60/30]}\n")
    assert (await run_ctl("apply", "-f", "-", stdin=reservation)).code == 0
    await allocate(store, "node-0", "c0", "a")  # from "gone", first in name order
    assert (await run_ctl("delete", "ippool", "gone", "--force")).code == 0
    await allocate(store, "node-0", "c1", "b")
    result = await run_ctl("ipam", "show", "--show-blocks")
    sections = [[line.split() for line in s.splitlines()] for s in result.out.split("\n\n")]
    # 64 addresses - network - broadcast - 10.0.0.1 - 10.0.0.60..62 (63 is the broadcast).
    assert sections[0] == [["POOL", "CIDR", "IN-USE", "CAPACITY", "USED"],
                           ["tiny", "10.0.0.0/26", "1", "58", "1.7%"],
                           ["(no", "pool)", "-", "1", "-", "-"]]
    assert sections[1] == [["BLOCK", "POOL", "AFFINITY", "IN-USE", "FREE"],
                           ["10.0.0.0/26", "tiny", "node-0", "1", "57"],
                           ["10.1.0.0/26", "(no", "pool)", "node-0", "1", "0"]]
    wide = await run_ctl("get", "ippool", "-o", "wide")
    assert wide.out.splitlines()[1].split()[-1] == "58"


# ------------------------------------------------------------------------- ipam check, ipam release


@pytest.mark.usefixtures("racks")
async def test_ipam_check_reports_leaked_address_and_release_repairs_it(
    run_ctl: Ctl, store: EtcdStore
) -> None:
    leaked = await allocate(store, "node-0", "c0", "nginx-0")
    await allocate(store, "node-2", "c2", "nginx-2")
    result = await run_ctl("ipam", "check")
    assert (result.code, result.out) == (0, "ipam check: OK (2 blocks, 2 handles, 2 addresses)\n")

    await delete_handle(store, "k8s-pod-network/c0/eth0")
    result = await run_ctl("ipam", "check")
    assert result.code == 1
    assert result.out.splitlines() == [
        f"leaked address: {leaked} in block 192.168.0.0/26: handle k8s-pod-network/c0/eth0 "
        f"does not exist (free it: topoipamctl ipam release --ip {leaked})",
        "ipam check: 1 problem(s) found (2 blocks, 1 handles, 2 addresses)",
    ]

    result = await run_ctl("ipam", "release", "--ip", leaked)
    assert (result.code, result.out) == (0, f"released {leaked} (handle k8s-pod-network/c0/eth0)\n")
    result = await run_ctl("ipam", "check")
    assert (result.code, result.out) == (0, "ipam check: OK (2 blocks, 1 handles, 1 addresses)\n")

    result = await run_ctl("ipam", "release", "--ip", leaked)
    assert (result.code, result.err) == (1, f"error: {leaked} is not allocated\n")


@pytest.mark.usefixtures("racks")
async def test_ipam_check_reports_orphaned_handle_and_release_repairs_it(
    run_ctl: Ctl, store: EtcdStore
) -> None:
    ip = await allocate(store, "node-0", "c0", "nginx-0")
    # Corrupt by hand: the block forgets the address, the handle still lists it.
    [current] = await store.list_blocks()
    block = current.value.copy()
    block.allocations.clear()
    block.unallocated = list(range(block.size))
    assert (await store.commit([PutBlock(block, current.mod_revision)])).succeeded

    result = await run_ctl("ipam", "check")
    assert result.code == 1
    assert (f"mismatch: handle k8s-pod-network/c0/eth0 (node node-0) lists {ip}, but block "
            "192.168.0.0/26 has it free") in result.out

    result = await run_ctl("ipam", "release", "--ip", ip)
    assert result.code == 0
    assert result.out == (f"removed {ip} from handle k8s-pod-network/c0/eth0, which listed it "
                          "without holding it\n")
    assert await store.get_handle("k8s-pod-network/c0/eth0") is None
    assert (await run_ctl("ipam", "check")).code == 0


@pytest.mark.usefixtures("leftover_block")
async def test_ipam_check_reports_affinities_and_blocks_of_deleted_pools(
    run_ctl: Ctl, store: EtcdStore
) -> None:
    stray = PutAffinity("node-9", ipaddress.ip_network("192.168.1.64/26"))
    assert (await store.commit([stray])).succeeded

    result = await run_ctl("ipam", "check")
    assert result.code == 1
    assert result.out.splitlines() == [
        "affinity mismatch: node node-9 has an affinity for block 192.168.1.64/26, which does "
        "not exist",
        "warning: block 192.168.0.0/26 is not inside any pool (block of a deleted pool; "
        "1 address(es) in use)",
        "ipam check: 1 problem(s), 1 warning(s) found (1 blocks, 1 handles, 1 addresses)",
    ]


async def test_leftover_blocks_of_a_forced_pool_deletion_are_warnings_until_released(
    run_ctl: Ctl, store: EtcdStore, leftover_block: str
) -> None:
    ip = leftover_block
    check = await run_ctl("ipam", "check")
    assert (check.code, check.out.splitlines()) == (0, [
        "warning: block 192.168.0.0/26 is not inside any pool (block of a deleted pool; "
        "1 address(es) in use)",
        "ipam check: OK, 1 warning(s) (1 blocks, 1 handles, 1 addresses)",
    ])
    assert (await run_ctl("ipam", "check", "--fail-on-warnings")).code == 1
    await AllocationEngine(store, "node-0").release("k8s-pod-network/c0/eth0")
    assert (await run_ctl("ipam", "release", "--ip", ip)).code == 1  # already free
    check = await run_ctl("ipam", "check")
    assert (check.code, check.out) == (0, "ipam check: OK (0 blocks, 0 handles, 0 addresses)\n")


@pytest.mark.usefixtures("racks")
async def test_release_refuses_an_address_a_live_attachment_holds_unless_forced(
    run_ctl: Ctl, store: EtcdStore, prefix: str
) -> None:
    live = await allocate(store, "node-0", "c0", "nginx-0")
    leaked = await allocate(store, "node-0", "c1", "nginx-1")
    await delete_handle(store, "k8s-pod-network/c1/eth0")

    # One live address among the ones given: nothing is released, not even the leak.
    result = await refused_without_writes(run_ctl, store, prefix, "ipam", "release",
                                          "--ip", leaked, "--ip", live)
    assert result.err == (
        f"error: {live} is held by attachment default/nginx-0/c0 (handle "
        "k8s-pod-network/c0/eth0, node node-0), which still exists: releasing it would let "
        "the next pod get the same address; delete the pod, or use --force\n")

    result = await run_ctl("ipam", "release", "--ip", live, "--force")
    assert (result.code, result.out) == (0, f"released {live} (handle k8s-pod-network/c0/eth0)\n")
    assert result.err == (
        f"warning: released {live} although attachment default/nginx-0/c0 still uses it: the "
        "next allocation may hand it out again (a duplicate) until that pod is deleted\n")
    assert await store.get_handle("k8s-pod-network/c0/eth0") is None
    # A leaked address (its handle is gone) needs no --force.
    result = await run_ctl("ipam", "release", "--ip", leaked)
    assert (result.code, result.err) == (0, "")


# ---------------------------------------------------------------------- ipam configure, delete node


async def test_ipam_configure_read_modify_write(run_ctl: Ctl, store: EtcdStore) -> None:
    result = await run_ctl("ipam", "configure", "--strictaffinity", "true",
                           "--max-blocks-per-host", "4")
    assert (result.code, result.out) == (0, "ipamconfig/default configured\n")
    result = await run_ctl("ipam", "configure", "--ip-cooldown-seconds", "10",
                           "--auto-allocate-blocks", "false")
    assert result.code == 0
    config = (await store.get_config()).value
    assert (config.strict_affinity, config.max_blocks_per_host, config.auto_allocate_blocks,
            config.ip_cooldown_seconds) == (True, 4, False, 10)
    result = await run_ctl("ipam", "configure", "--strictaffinity", "true")
    assert result.out == "ipamconfig/default unchanged\n"


async def test_delete_node_refuses_while_holding_addresses_unless_forced(
    run_ctl: Ctl, store: EtcdStore, prefix: str
) -> None:
    assert (await run_ctl("create", "ippool", "p", "--cidr", "10.70.0.0/28",
                          "--block-size", "29")).code == 0
    assert (await run_ctl("ipam", "configure", "--max-blocks-per-host", "1")).code == 0
    assert (await run_ctl("label", "nodes", "gone", "rack=0", "--create")).code == 0
    assert (await run_ctl("label", "nodes", "stay", "rack=0", "--create")).code == 0
    mine = await allocate(store, "gone", "g1", "pod-g1")
    # "stay" claims the other block, fills it, then borrows from "gone"'s block.
    others = [await allocate(store, "stay", f"s{i}", f"pod-s{i}") for i in range(9)]
    borrowed = [ip for ip in others if ipaddress.ip_address(ip) in
                ipaddress.ip_network(mine).supernet(new_prefix=29)]
    assert borrowed
    before = await dump(store, prefix)
    refused = await run_ctl("delete", "node", "gone")
    assert refused.code == 1 and "node gone still holds addresses for 1" in refused.err
    assert len(refused.err.strip().splitlines()) == 1
    assert await dump(store, prefix) == before
    forced = await run_ctl("delete", "node", "gone", "--force")
    assert forced.code == 0, forced.err
    assert await store.get_node("gone") is None
    assert await store.list_affinities("gone") == []
    rows = json.loads((await run_ctl("get", "allocations", "-o", "json")).out)
    assert sorted(r["ip"] for r in rows) == sorted(others)  # borrowed addresses kept
    check = await run_ctl("ipam", "check")
    assert check.code == 0, check.out + check.err
    # A node without addresses goes without --force, and its empty blocks with it.
    for i in range(9):
        await AllocationEngine(store, "stay").release(f"k8s-pod-network/s{i}/eth0")
    assert (await run_ctl("delete", "node", "stay")).code == 0
    assert await store.list_blocks() == [] or all(
        b.value.affinity is None for b in await store.list_blocks())
    missing = await run_ctl("delete", "node", "never-existed")
    assert missing.code == 1 and "does not exist" in missing.err
