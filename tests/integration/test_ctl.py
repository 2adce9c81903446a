"""`topoipamctl` verbs against a real etcd, mostly in-process through ``ctl.run``.

Every refused command must leave etcd exactly as it was: those tests compare
the whole key prefix before and after.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EtcdServer
from topoipam.client import ctl
from topoipam.daemon.core.holdings import Attachment
from topoipam.daemon.core.writes import (
    DeleteHandle,
    PutAffinity,
    PutBlock,
)
from topoipam.daemon.engine import AllocationEngine, AllocationRequest
from topoipam.daemon.local_etcd import free_port
from topoipam.daemon.store import EtcdStore

TOPOIPAMCTL = str(Path(sys.executable).parent / "topoipamctl")


@dataclass
class Result:
    code: int
    out: str
    err: str


Ctl = Callable[..., Awaitable[Result]]


@pytest.fixture
def run_ctl(
    etcd: EtcdServer, prefix: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Ctl:
    """Run topoipamctl in-process against this test's prefix; returns code, stdout, stderr."""

    async def invoke(*args: str, stdin: str | None = None) -> Result:
        capsys.readouterr()
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = await ctl.run(["--etcd-endpoints", etcd.endpoint, "--prefix", prefix, *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


async def dump(store: EtcdStore, prefix: str) -> dict[bytes, tuple[bytes, int]]:
    kvs, _ = await store.prefix_raw(prefix.encode())
    return {kv.key: (kv.value, kv.mod_revision) for kv in kvs}


async def allocate(store: EtcdStore, node: str, container: str, pod: str) -> str:
    allocation = await AllocationEngine(store, node).allocate(AllocationRequest(
        Attachment("k8s-pod-network", container, "eth0"),
        attributes={"namespace": "default", "pod": pod},
    ))
    return str(allocation.addresses[0].ip)


async def delete_handle(store: EtcdStore, handle_id: str) -> None:
    """Corrupt the state the way a buggy writer would: the handle goes, the block keeps it."""
    handle = await store.get_handle(handle_id)
    assert handle is not None
    assert (await store.commit([DeleteHandle(handle_id, handle.mod_revision)])).succeeded


RACK_POOLS = """\
apiVersion: topoipam/v1
kind: IPPool
metadata: {name: rack-0}
spec: {cidr: 192.168.0.0/24, nodeSelector: rack == "0"}
---
apiVersion: topoipam/v1
kind: IPPool
metadata: {name: rack-1}
spec: {cidr: 192.168.1.0/24, nodeSelector: rack == "1"}
"""


async def racks(run_ctl: Ctl, tmp_path: Path) -> None:
    """Two rack pools and node-0..node-3 in racks 0, 0, 1, 1."""
    path = tmp_path / "racks.yaml"
    path.write_text(RACK_POOLS)
    assert (await run_ctl("apply", "-f", str(path))).code == 0
    for i in range(4):
        assert (await run_ctl("label", "nodes", f"node-{i}", f"rack={i // 2}",
                              "--create")).code == 0


# ---------------------------------------------------------------------------- create, apply, get


@pytest.mark.asyncio
async def test_create_ippool_with_flags_and_get_wide(run_ctl: Ctl) -> None:
    result = await run_ctl("create", "ippool", "default-ipv4-ippool", "--cidr", "192.168.0.0/16")
    assert (result.code, result.out, result.err) == (
        0, "ippool/default-ipv4-ippool created\n", "")
    result = await run_ctl("create", "ippool", "manual", "--cidr", "10.0.0.0/24",
                           "--block-size", "28", "--node-selector", "rack=='0'", "--disabled",
                           "--assignment-mode", "Manual")
    assert result.code == 0

    result = await run_ctl("get", "ippool", "-o", "wide")
    lines = [line.split() for line in result.out.splitlines()]
    assert lines == [
        ["NAME", "CIDR", "BLOCKSIZE", "SELECTOR", "PRIORITY", "DISABLED", "ASSIGNMENTMODE",
         "GATEWAY", "IN-USE", "TOTAL"],
        ["default-ipv4-ippool", "192.168.0.0/16", "26", "all()", "0", "false", "Automatic",
         "192.168.0.1", "0", "65533"],
        ["manual", "10.0.0.0/24", "28", "rack", "==", '"0"', "0", "true", "Manual",
         "10.0.0.1", "0", "253"],
    ]
    result = await run_ctl("get", "ippools")
    assert result.out.split("\n")[0].split() == ["NAME", "CIDR", "SELECTOR"]


@pytest.mark.asyncio
async def test_apply_creates_then_reports_unchanged_and_configured(
    run_ctl: Ctl, tmp_path: Path
) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(RACK_POOLS)
    result = await run_ctl("apply", "-f", str(path))
    assert (result.code, result.out) == (0, "ippool/rack-0 created\nippool/rack-1 created\n")
    result = await run_ctl("apply", "-f", str(path))
    assert result.out == "ippool/rack-0 unchanged\nippool/rack-1 unchanged\n"
    path.write_text(RACK_POOLS.replace('rack == "1"', """'rack in {"1", "2"}'"""))
    result = await run_ctl("apply", "-f", str(path))
    assert result.out == "ippool/rack-0 unchanged\nippool/rack-1 configured\n"
    result = await run_ctl("get", "ippool", "rack-1")
    assert 'rack in {"1", "2"}' in result.out


@pytest.mark.asyncio
async def test_apply_from_stdin_and_get_yaml_json_round_trip(run_ctl: Ctl) -> None:
    manifest = textwrap.dedent("""\
        apiVersion: topoipam/v1
        kind: IPPool
        metadata: {name: v6}
        spec: {cidr: "fd00:1::/64", blockSize: 120, nodeSelector: has(zone)}
        ---
        apiVersion: topoipam/v1
        kind: Node
        metadata: {name: node-0, labels: {zone: a}}
        ---
        apiVersion: topoipam/v1
        kind: IPAMConfig
        spec: {strictAffinity: true, ipCooldownSeconds: 30, stickyHoldSeconds: 120}
        ---
        apiVersion: topoipam/v1
        kind: IPReservation
        metadata: {name: gateways}
        spec: {cidrs: ["fd00:1::1/128"]}
        """)
    result = await run_ctl("create", "-f", "-", stdin=manifest)
    assert result.out.splitlines() == [
        "ippool/v6 created", "node/node-0 created", "ipamconfig/default created",
        "ipreservation/gateways created",
    ]
    for kind in ("ippool", "node", "ipamconfig", "ipreservation"):
        for output in ("yaml", "json"):
            listed = await run_ctl("get", kind, "-o", output)
            assert listed.code == 0
            again = await run_ctl("apply", "-f", "-", stdin=listed.out)
            assert again.code == 0, again.err
            assert again.out.endswith(" unchanged\n"), (kind, output, again.out)
    single = await run_ctl("get", "node", "node-0", "-o", "json")
    assert json.loads(single.out) == {
        "apiVersion": "topoipam/v1", "kind": "Node", "metadata": {"name": "node-0"},
        "spec": {"labels": {"zone": "a"}},
    }
    config = await run_ctl("get", "ipamconfig")
    assert config.out.splitlines()[1].split() == ["default", "true", "0", "true", "30", "0"]
    wide = await run_ctl("get", "ipamconfig", "-o", "wide")
    header, row = wide.out.splitlines()
    assert dict(zip(header.split(), row.split(), strict=True)) == {
        "NAME": "default", "STRICTAFFINITY": "true", "MAXBLOCKSPERHOST": "0",
        "AUTOALLOCATEBLOCKS": "true", "IPCOOLDOWNSECONDS": "30", "WARMADDRESSES": "0",
        "STICKYHOLDSECONDS": "120", "STICKYTAKEOVERSECONDS": "300"}


@pytest.mark.asyncio
async def test_calico_manifest_prints_one_warning_per_ignored_field(
    run_ctl: Ctl, tmp_path: Path
) -> None:
    path = tmp_path / "calico.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: projectcalico.org/v3
        kind: IPPool
        metadata: {name: rack-0}
        spec:
          cidr: 192.168.0.0/24
          nodeSelector: rack == "0"
          natOutgoing: true
          ipipMode: Always
        """))
    result = await run_ctl("apply", "-f", str(path))
    assert result.code == 0
    assert result.out == "ippool/rack-0 created\n"
    assert result.err.splitlines() == [
        "warning: IPPool rack-0: field spec.natOutgoing is not used by topoipam (ignored)",
        "warning: IPPool rack-0: field spec.ipipMode is not used by topoipam (ignored)",
    ]


@pytest.mark.asyncio
async def test_get_missing_object_is_an_error(run_ctl: Ctl) -> None:
    result = await run_ctl("get", "ippool", "nope")
    assert (result.code, result.err) == (1, "error: ippool nope not found\n")


@pytest.mark.asyncio
async def test_connection_options_work_after_the_verb_and_from_env(
    run_ctl: Ctl, etcd: EtcdServer, prefix: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await run_ctl("create", "ippool", "p", "--cidr", "10.0.0.0/24")
    capsys.readouterr()
    assert await ctl.run(["--prefix", "/elsewhere/v1", "--etcd-endpoints", etcd.endpoint,
                          "get", "ippool", "p", "--prefix", prefix]) == 0
    assert "10.0.0.0/24" in capsys.readouterr().out
    monkeypatch.setenv("TOPOIPAM_ETCD_ENDPOINTS", etcd.endpoint)
    monkeypatch.setenv("TOPOIPAM_PREFIX", prefix)
    assert await ctl.run(["get", "ippool", "p"]) == 0
    assert "10.0.0.0/24" in capsys.readouterr().out


# ---------------------------------------------------------------------------- refused writes

REFUSED = [
    pytest.param(["create", "ippool", "wide", "--cidr", "192.168.0.0/23"], None,
                 ["pool wide (192.168.0.0/23) overlaps pool rack-0 (192.168.0.0/24)"],
                 id="overlaps-existing-pool"),
    pytest.param(
        ["apply", "-f", "{file}"],
        RACK_POOLS.replace("rack-0", "a").replace("rack-1", "b").replace("192.168.0.", "10.0.0.")
        .replace("192.168.1.0/24", "10.0.0.128/25"),
        ["document 2: pool b (10.0.0.128/25) overlaps pool a (10.0.0.0/24)"],
        id="overlap-within-the-file"),
    pytest.param(["create", "ippool", "x", "--cidr", "10.0.0.1/24"], None,
                 ["'10.0.0.1/24' has host bits set (did you mean 10.0.0.0/24?)"],
                 id="cidr-host-bits"),
    pytest.param(["create", "ippool", "x", "--cidr", "10.0.0.0/16", "--block-size", "40"], None,
                 ["block size 40 is out of range for IPv4 (allowed 20-32)"],
                 id="bad-block-size"),
    pytest.param(["create", "ippool", "x", "--cidr", "10.0.0.0/16", "--node-selector",
                  "rack == 0"], None, ["invalid selector 'rack == 0' at column 9"],
                 id="bad-selector-names-column"),
    pytest.param(["apply", "-f", "{file}"],
                 "apiVersion: topoipam/v1\nkind: Subnet\nmetadata: {name: x}\n",
                 ["unknown kind 'Subnet'"], id="unknown-kind"),
    pytest.param(["create", "ippool", "rack-0", "--cidr", "10.0.0.0/24"], None,
                 ["ippool rack-0 already exists"], id="create-existing-pool"),
    pytest.param(
        ["create", "-f", "{file}"],
        "apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: fresh}\n"
        "spec: {cidr: 10.1.0.0/24}\n---\n" + RACK_POOLS.split("---\n")[0],
        ["document 2: ippool rack-0 already exists"],
        id="create-file-is-all-or-nothing"),
    pytest.param(
        ["apply", "-f", "{file}"],
        "apiVersion: topoipam/v1\nkind: Node\nmetadata: {name: fine}\n---\n"
        "apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: y}\n"
        "spec: {cidr: 10.1.0.0/24, nodeSelector: 'a ==' }\n",
        ["document 2: pool y: invalid selector 'a ==' at column 5"],
        id="apply-file-is-all-or-nothing"),
    pytest.param(
        ["apply", "-f", "{file}"],
        RACK_POOLS.split("---\n")[0].replace("192.168.0.0/24", "192.168.0.0/25"),
        ["ippool rack-0: cidr and blockSize cannot change"], id="pool-cidr-is-immutable"),
    pytest.param(
        ["apply", "-f", "{file}"],
        "apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: z}\n"
        "spec: {cidr: 10.2.0.0/24, natOutgoing: true}\n",
        ["IPPool z: unknown field spec.natOutgoing"], id="unknown-field-in-topoipam-manifest"),
    pytest.param(
        ["apply", "-f", "{file}"],
        "apiVersion: topoipam/v1\nkind: Node\nmetadata: {name: n}\n---\n"
        "apiVersion: topoipam/v1\nkind: Node\nmetadata: {name: n}\n",
        ["document 2: node n appears twice (also in"], id="duplicate-in-file"),
    pytest.param(["apply", "-f", "{missing}"], None, ["cannot read", "No such file"],
                 id="missing-file"),
    pytest.param(["apply", "-f", "{file}"], "kind: IPPool\n  metadata: x\n",
                 ["invalid YAML at line 2"], id="yaml-syntax-error"),
    pytest.param(["delete", "ippool", "nope"], None, ["ippool nope does not exist"],
                 id="delete-missing-pool"),
    pytest.param(["label", "nodes", "node-0", "rack=1"], None,
                 ["node node-0 already has label rack=0; use --overwrite"],
                 id="label-needs-overwrite"),
    pytest.param(["label", "nodes", "node-0", "bad key=1"], None, ["invalid label key 'bad key'"],
                 id="bad-label-key"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("argv", "manifest", "fragments"), REFUSED)
async def test_refused_commands_write_nothing(
    run_ctl: Ctl, store: EtcdStore, prefix: str, tmp_path: Path,
    argv: list[str], manifest: str | None, fragments: list[str],
) -> None:
    await racks(run_ctl, tmp_path)
    path = tmp_path / "manifest.yaml"
    if manifest is not None:
        path.write_text(manifest)
    argv = [a.format(file=path, missing=tmp_path / "missing.yaml") for a in argv]
    before = await dump(store, prefix)

    result = await run_ctl(*argv)

    assert result.code == 1
    assert result.out == ""
    assert result.err.count("\n") == 1 and result.err.startswith("error: "), result.err
    for fragment in fragments:
        assert fragment in result.err
    assert await dump(store, prefix) == before


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["create"], ["get", "ippool", "-o", "xml"], ["ipam", "configure"],
                 ["ipam", "configure", "--strictaffinity", "maybe"], ["delete", "ippool"]):
        with pytest.raises(SystemExit) as info:
            ctl.main(["--etcd-endpoints", "http://127.0.0.1:1", *argv])
        assert info.value.code == 2, argv
    assert "usage:" in capsys.readouterr().err


# ---------------------------------------------------------------------------- delete


@pytest.mark.asyncio
async def test_delete_pool_refuses_while_allocated_unless_forced(
    run_ctl: Ctl, store: EtcdStore, prefix: str, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
    ip = await allocate(store, "node-2", "c1", "web-1")
    await allocate(store, "node-3", "c2", "web-2")
    before = await dump(store, prefix)

    result = await run_ctl("delete", "ippool", "rack-1")
    assert result.code == 1
    assert result.err == ("error: pool rack-1 still has 2 allocated address(es); release them "
                          "first or use --force\n")
    assert await dump(store, prefix) == before

    result = await run_ctl("delete", "ippool", "rack-1", "--force")
    assert (result.code, result.out) == (0, "ippool/rack-1 deleted\n")
    assert "2 allocated address(es) stay allocated" in result.err
    # Deleting the pool never touches the allocations themselves.
    allocations = json.loads((await run_ctl("get", "allocations", "-o", "json")).out)
    assert [(a["ip"], a["pool"], a["pod"]) for a in allocations] == [
        (ip, None, "web-1"), ("192.168.1.64", None, "web-2")]
    placement = await run_ctl("check", "placement")
    assert placement.code == 0
    assert placement.out.count("its pool was deleted") == 2


@pytest.mark.asyncio
async def test_delete_pool_drops_its_empty_blocks(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
    await allocate(store, "node-0", "c1", "web-1")
    await AllocationEngine(store, "node-0").release("k8s-pod-network/c1/eth0")
    assert len(await store.list_blocks()) == 1

    result = await run_ctl("delete", "-f", "-", stdin=RACK_POOLS)
    assert result.code == 0
    assert result.out.splitlines() == [
        "ippool/rack-0 deleted", "ippool/rack-1 deleted",
        "dropped 1 empty block(s) of deleted pools"]
    assert await store.list_blocks() == []
    assert await store.list_affinities() == []
    assert (await run_ctl("ipam", "check")).code == 0


@pytest.mark.asyncio
async def test_new_pool_over_differently_sized_leftover_block_is_refused(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
    await allocate(store, "node-0", "c1", "web-1")
    assert (await run_ctl("delete", "ippool", "rack-0", "--force")).code == 0
    result = await run_ctl("create", "ippool", "big", "--cidr", "192.168.0.0/24",
                           "--block-size", "28")
    assert result.code == 1
    assert "block 192.168.0.0/26 of a deleted pool overlaps 192.168.0.0/24" in result.err
    # Same block size: the new pool adopts the leftover block.
    result = await run_ctl("create", "ippool", "same", "--cidr", "192.168.0.0/24")
    assert result.code == 0
    assert (await run_ctl("ipam", "check")).code == 0


# ---------------------------------------------------------------------------- label


@pytest.mark.asyncio
async def test_label_nodes_set_overwrite_remove(run_ctl: Ctl, store: EtcdStore) -> None:
    result = await run_ctl("label", "nodes", "node-0", "rack=0", "zone=a", "--create")
    assert (result.code, result.out) == (0, "node/node-0 labeled\n")
    node = await store.get_node("node-0")
    assert node is not None and node.value.labels == {"rack": "0", "zone": "a"}

    result = await run_ctl("label", "nodes", "node-0", "rack=0")
    assert result.out == "node/node-0 not labeled\n"
    result = await run_ctl("label", "node", "node-0", "rack=1", "--overwrite")
    assert result.out == "node/node-0 labeled\n"
    result = await run_ctl("label", "nodes", "node-0", "zone-", "missing-")
    assert (result.code, result.out) == (0, "node/node-0 labeled\n")
    assert result.err == "warning: node node-0 has no label missing\n"
    node = await store.get_node("node-0")
    assert node is not None and node.value.labels == {"rack": "1"}

    result = await run_ctl("label", "nodes", "node-0", "rack")
    assert result.code == 1 and "use KEY=VALUE or KEY-" in result.err
    result = await run_ctl("label", "nodes", "ghost", "rack-")
    assert (result.code, result.err) == (
        1, "error: node ghost does not exist; use --create to create it\n")
    result = await run_ctl("label", "nodes", "ghost", "rack-", "--create")
    assert (result.code, result.out) == (0, "node/ghost not labeled\n")
    assert await store.get_node("ghost") is None


# ---------------------------------------------------------------------------- allocations, ipam


ALLOCATION_KEYS = {"ip", "node", "pool", "block", "handle", "namespace", "pod", "container_id",
                   "ifname"}


@pytest.mark.asyncio
async def test_get_allocations_json_shape_and_node_filter(
    run_ctl: Ctl, store: EtcdStore, prefix: str, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
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


@pytest.mark.asyncio
async def test_ipam_show_summary_blocks_borrowed_and_ip(
    run_ctl: Ctl, store: EtcdStore
) -> None:
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


@pytest.mark.asyncio
async def test_ipam_check_reports_leaked_address_and_release_repairs_it(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
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


@pytest.mark.asyncio
async def test_ipam_check_reports_orphaned_handle_and_release_repairs_it(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
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


@pytest.mark.asyncio
async def test_ipam_check_reports_affinities_and_blocks_of_deleted_pools(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
    await allocate(store, "node-0", "c0", "nginx-0")
    assert (await run_ctl("delete", "ippool", "rack-0", "--force")).code == 0
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


@pytest.mark.asyncio
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


# ---------------------------------------------------------------------------- explain, check


@pytest.mark.asyncio
async def test_explain_node_shows_every_pool_and_the_order(
    run_ctl: Ctl, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
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


@pytest.mark.asyncio
async def test_explain_node_says_when_no_block_is_left_to_claim(
        run_ctl: Ctl, store: EtcdStore) -> None:
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


@pytest.mark.asyncio
async def test_check_coverage_per_family(run_ctl: Ctl, tmp_path: Path) -> None:
    await racks(run_ctl, tmp_path)
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


@pytest.mark.asyncio
async def test_check_placement_lists_disabled_and_unselected(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
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


# ---------------------------------------------------------------------------- real executable


def run_executable(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOPOIPAMCTL, *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def test_unreachable_etcd_fails_fast_with_one_line(ctl_env: dict[str, str]) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_executable("--etcd-endpoints", endpoint, "get", "ippool", env=ctl_env)
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: etcd unreachable")
    assert endpoint in result.stderr


def test_executable_reports_bad_input_without_traceback(
    ctl_env: dict[str, str], tmp_path: Path
) -> None:
    result = run_executable("apply", "-f", str(tmp_path / "nope.yaml"), env=ctl_env)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"error: cannot read {tmp_path / 'nope.yaml'}: No such file or directory\n")

    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: p}\n"
                   "spec: {cidr: 10.0.0.0/8, blockSize: 26, nodeSelector: 'rack == \"0'}\n")
    result = run_executable("create", "-f", str(bad), env=ctl_env)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "column" in result.stderr and "Traceback" not in result.stderr

    result = run_executable("create", "ippool", env=ctl_env)
    assert result.returncode == 2
    assert "usage:" in result.stderr


@pytest.mark.asyncio
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


# ---------------------------------------------------------------------------- issue 10


async def refused_without_writes(run_ctl: Ctl, store: EtcdStore, prefix: str, *argv: str
                                 ) -> Result:
    """Run a command that must be refused: one error line, nothing written."""
    before = await dump(store, prefix)
    result = await run_ctl(*argv)
    assert result.code == 1, result
    assert result.err.count("\n") == 1 and result.err.startswith("error: "), result.err
    assert await dump(store, prefix) == before
    return result


@pytest.mark.asyncio
async def test_release_refuses_an_address_a_live_attachment_holds_unless_forced(
    run_ctl: Ctl, store: EtcdStore, prefix: str, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
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


def every_action(parser: Any) -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {where}", a) for where, a in every_action(sub))
            for choice in action._choices_actions:
                yield choice.dest, choice
        else:
            yield "", action


def test_every_verb_and_flag_has_help_text() -> None:
    missing = [f"{where} {action.dest}" for where, action in every_action(ctl.build_parser())
               if not action.help]
    assert missing == []


@pytest.mark.asyncio
async def test_reservation_over_live_allocations_is_reported_everywhere(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
    ip = await allocate(store, "node-0", "c0", "nginx-0")
    manifest = textwrap.dedent(f"""\
        apiVersion: topoipam/v1
        kind: IPReservation
        metadata: {{name: gw}}
        spec: {{cidrs: ["{ip}/32", "172.31.0.0/30"]}}
        """)
    result = await run_ctl("apply", "-f", "-", stdin=manifest)
    assert (result.code, result.out) == (0, "ipreservation/gw created\n")
    assert result.err.splitlines() == [
        f"warning: ipreservation gw: {ip} is allocated to default/nginx-0 (handle "
        "k8s-pod-network/c0/eth0, node node-0); the reservation keeps it only once it is "
        "released",
        "warning: ipreservation gw: 172.31.0.0/30 is outside every pool (it reserves nothing)",
    ]
    check = await run_ctl("ipam", "check")
    assert check.code == 0
    assert check.out.splitlines() == [
        f"warning: reserved address {ip} (ipreservation gw) is allocated to handle "
        "k8s-pod-network/c0/eth0 (node node-0)",
        "warning: ipreservation gw: 172.31.0.0/30 is outside every pool",
        "ipam check: OK, 2 warning(s) (1 blocks, 1 handles, 1 addresses)",
    ]
    shown = await run_ctl("ipam", "show", "--ip", ip)
    assert shown.out.strip().endswith("; it is also reserved by ipreservation gw")
    placement = await run_ctl("check", "placement")
    assert "reserved by ipreservation gw" in placement.out


@pytest.mark.asyncio
async def test_calico_tunnel_pool_never_serves_pods(
    run_ctl: Ctl, store: EtcdStore
) -> None:
    manifest = ("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: tunnel}\n"
                "spec: {cidr: 10.5.0.0/24, allowedUses: [Tunnel]}\n")
    result = await run_ctl("apply", "-f", "-", stdin=manifest)
    assert result.code == 0 and "imported as assignmentMode Manual" in result.err
    pool = await store.get_pool("tunnel")
    assert pool is not None and not pool.value.automatic
    with pytest.raises(ctl.NoPoolForNode):
        await allocate(store, "node-0", "c0", "nginx-0")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        pytest.param(["label", "nodes", "node-0", "k" * 70 + "=v"],
                     "name part longer than 63", id="long-key"),
        pytest.param(["label", "nodes", "node-0", "a/b/c=v"], "invalid label key 'a/b/c'",
                     id="two-slashes"),
        pytest.param(["label", "nodes", "node-0", "/x=v"], "invalid label key '/x'",
                     id="empty-prefix"),
        pytest.param(["label", "nodes", "node-0", "example.com/=v"],
                     "invalid label key 'example.com/'", id="empty-name"),
        pytest.param(["label", "nodes", "node-0", "k=a b"], "invalid value 'a b' for label k",
                     id="value-space"),
        pytest.param(["label", "nodes", "node-0", "k=" + "v" * 100], "longer than 63",
                     id="long-value"),
        pytest.param(["label", "nodes", "node-0", 'k=a"b'], "invalid value 'a\"b'",
                     id="value-quote"),
        pytest.param(["label", "nodes", "node-9", "rack=0"],
                     "node node-9 does not exist; use --create to create it", id="unknown-node"),
        pytest.param(["create", "ippool", "Rack-2", "--cidr", "10.3.0.0/24"],
                     "DNS-1123 label", id="pool-name-uppercase"),
        pytest.param(["create", "ippool", "ll", "--cidr", "169.254.0.0/16"],
                     "169.254.0.0/16 is link-local", id="link-local-v4"),
        pytest.param(["create", "ippool", "ll6", "--cidr", "fe80::/64"], "link-local",
                     id="link-local-v6"),
        pytest.param(["create", "ippool", "mc", "--cidr", "224.0.0.0/24"], "multicast",
                     id="multicast-v4"),
        pytest.param(["create", "ippool", "mc6", "--cidr", "ff02::/120"], "multicast",
                     id="multicast-v6"),
        pytest.param(["create", "ippool", "lo", "--cidr", "127.0.0.0/24"], "loopback",
                     id="loopback-v4"),
        pytest.param(["create", "ippool", "lo6", "--cidr", "::/120"], "unspecified",
                     id="unspecified-v6"),
        pytest.param(["create", "ippool", "all", "--cidr", "0.0.0.0/0"],
                     "0.0.0.0/0 covers every address", id="wildcard-v4"),
        pytest.param(["create", "ippool", "all6", "--cidr", "::/0"],
                     "::/0 covers every address", id="wildcard-v6"),
        pytest.param(["create", "ippool", "mapped", "--cidr", "::ffff:192.168.0.0/120"],
                     "IPv4-mapped", id="ipv4-mapped"),
    ],
)
async def test_refused_labels_names_and_cidrs(
    run_ctl: Ctl, store: EtcdStore, prefix: str, tmp_path: Path, argv: list[str], fragment: str
) -> None:
    await racks(run_ctl, tmp_path)
    result = await refused_without_writes(run_ctl, store, prefix, *argv)
    assert fragment in result.err


@pytest.mark.asyncio
async def test_label_creates_an_unknown_node_only_with_create(
    run_ctl: Ctl, store: EtcdStore
) -> None:
    result = await run_ctl("label", "nodes", "node-new", "rack=0", "--create")
    assert (result.code, result.out) == (0, "node/node-new labeled\n")
    node = await store.get_node("node-new")
    assert node is not None and node.value.labels == {"rack": "0"}


@pytest.mark.asyncio
async def test_overlap_with_a_live_pool_of_another_block_size_names_that_pool(
    run_ctl: Ctl, store: EtcdStore, prefix: str, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
    await allocate(store, "node-0", "c0", "nginx-0")
    result = await refused_without_writes(run_ctl, store, prefix, "create", "ippool", "big",
                                          "--cidr", "192.168.0.0/23", "--block-size", "28")
    assert "overlaps pool rack-0 (192.168.0.0/24)" in result.err
    assert "deleted pool" not in result.err


@pytest.mark.asyncio
async def test_leftover_blocks_of_a_forced_pool_deletion_are_warnings_until_released(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
    ip = await allocate(store, "node-0", "c0", "nginx-0")
    assert (await run_ctl("delete", "ippool", "rack-0", "--force")).code == 0
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


def test_output_into_a_closed_pipe_ends_quietly(ctl_env: dict[str, str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([TOPOIPAMCTL, "get", "ippool"], env=ctl_env, stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")


@pytest.mark.asyncio
async def test_explain_node_orders_affine_blocks_first(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
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


@pytest.mark.asyncio
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


@pytest.mark.asyncio
async def test_patch_ippool_disabled_and_merge_patch(
    run_ctl: Ctl, store: EtcdStore, prefix: str, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
    result = await run_ctl("patch", "ipp", "rack-0", "--disabled", "true")
    assert (result.code, result.out) == (0, "ippool/rack-0 configured\n")
    pool = await store.get_pool("rack-0")
    assert pool is not None and pool.value.disabled
    result = await run_ctl("patch", "ippool", "rack-0", "-p",
                           '{"spec": {"disabled": false, "nodeSelector": "rack in {\\"0\\"}"}}')
    assert (result.code, result.out) == (0, "ippool/rack-0 configured\n")
    pool = await store.get_pool("rack-0")
    assert pool is not None and not pool.value.disabled
    assert pool.value.node_selector == 'rack in {"0"}'
    result = await run_ctl("patch", "ippool", "rack-0", "--disabled", "false")
    assert result.out == "ippool/rack-0 unchanged\n"
    for argv, fragment in (
        (["-p", '{"spec": {"cidr": "10.9.0.0/24"}}'], "cidr and blockSize cannot change"),
        (["-p", '{"spec": '], "-p is not valid JSON"),
        (["-p", '{"metadata": {"name": "other"}}'], "metadata.name cannot change"),
        (["-p", '{"spec": {"natOutgoing": true}}'], "unknown field spec.natOutgoing"),
    ):
        result = await refused_without_writes(run_ctl, store, prefix, "patch", "ippool",
                                              "rack-0", *argv)
        assert fragment in result.err, result.err
    result = await refused_without_writes(run_ctl, store, prefix, "patch", "ippool", "nope",
                                          "--disabled", "true")
    assert "ippool nope does not exist" in result.err


@pytest.mark.asyncio
async def test_get_allocations_yaml_and_short_names(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
    await allocate(store, "node-0", "c0", "nginx-0")
    result = await run_ctl("get", "allocations", "-o", "yaml")
    assert result.code == 0
    as_json = json.loads((await run_ctl("get", "allocations", "-o", "json")).out)
    assert yaml.safe_load(result.out) == as_json
    assert (await run_ctl("get", "ipp", "-o", "json")).out == (
        await run_ctl("get", "ippool", "-o", "json")).out
    assert "node-0" in (await run_ctl("get", "no")).out
    assert (await run_ctl("label", "no", "node-0", "zone=a")).code == 0


@pytest.mark.asyncio
async def test_check_verbs_share_exit_codes(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
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


@pytest.mark.asyncio
async def test_check_routes_aggregates_each_racks_blocks(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
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


@pytest.mark.asyncio
async def test_check_routes_relabelled_nodes_block_breaks_aggregation(
    run_ctl: Ctl, store: EtcdStore, tmp_path: Path
) -> None:
    await racks(run_ctl, tmp_path)
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


@pytest.mark.asyncio
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
