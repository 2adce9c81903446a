"""`topoipamctl` verbs on the operator's objects (pools, nodes, the IPAM config,
reservations): create, apply, get, patch, label, delete, against a real etcd,
in-process through ``ctl.run``.

Every refused command must leave etcd exactly as it was: those tests compare
the whole key prefix before and after.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.integration.inprocess_ctl import RACK_POOLS, Ctl, allocate, dump, refused_without_writes
from topoipam.client import ctl
from topoipam.daemon.engine import AllocationEngine
from topoipam.daemon.store import EtcdStore

pytestmark = pytest.mark.asyncio


# ---------------------------------------------------------------------------- create, apply, get


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
        ["manual", "10.0.0.0/24", "28", "rack", "==", '"0"', "0", "true", "Manual", "10.0.0.1",
         "0", "253"],
    ]
    result = await run_ctl("get", "ippools")
    assert result.out.split("\n")[0].split() == ["NAME", "CIDR", "SELECTOR"]


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


async def test_calico_tunnel_pool_never_serves_pods(run_ctl: Ctl, store: EtcdStore) -> None:
    manifest = ("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: tunnel}\n"
                "spec: {cidr: 10.5.0.0/24, allowedUses: [Tunnel]}\n")
    result = await run_ctl("apply", "-f", "-", stdin=manifest)
    assert result.code == 0 and "imported as assignmentMode Manual" in result.err
    pool = await store.get_pool("tunnel")
    assert pool is not None and not pool.value.automatic
    with pytest.raises(ctl.NoPoolForNode):
        await allocate(store, "node-0", "c0", "nginx-0")


async def test_get_missing_object_is_an_error(run_ctl: Ctl) -> None:
    result = await run_ctl("get", "ippool", "nope")
    assert (result.code, result.err) == (1, "error: ippool nope not found\n")


@pytest.mark.usefixtures("racks")
async def test_reservation_over_live_allocations_is_reported_everywhere(
    run_ctl: Ctl, store: EtcdStore
) -> None:
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


@pytest.mark.usefixtures("racks")
async def test_patch_ippool_disabled_and_merge_patch(
    run_ctl: Ctl, store: EtcdStore, prefix: str
) -> None:
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


@pytest.mark.parametrize(("argv", "manifest", "fragments"), REFUSED)
@pytest.mark.usefixtures("racks")
async def test_refused_commands_write_nothing(
    run_ctl: Ctl, store: EtcdStore, prefix: str, tmp_path: Path, argv: list[str],
    manifest: str | None, fragments: list[str],
) -> None:
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
@pytest.mark.usefixtures("racks")
async def test_refused_labels_names_and_cidrs(
    run_ctl: Ctl, store: EtcdStore, prefix: str, argv: list[str], fragment: str
) -> None:
    result = await refused_without_writes(run_ctl, store, prefix, *argv)
    assert fragment in result.err


@pytest.mark.usefixtures("racks")
async def test_overlap_with_a_live_pool_of_another_block_size_names_that_pool(
    run_ctl: Ctl, store: EtcdStore, prefix: str
) -> None:
    await allocate(store, "node-0", "c0", "nginx-0")
    result = await refused_without_writes(run_ctl, store, prefix, "create", "ippool", "big",
                                          "--cidr", "192.168.0.0/23", "--block-size", "28")
    assert "overlaps pool rack-0 (192.168.0.0/24)" in result.err
    assert "deleted pool" not in result.err


# ---------------------------------------------------------------------------- delete


@pytest.mark.usefixtures("racks")
async def test_delete_pool_refuses_while_allocated_unless_forced(
    run_ctl: Ctl, store: EtcdStore, prefix: str
) -> None:
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


@pytest.mark.usefixtures("racks")
async def test_delete_pool_drops_its_empty_blocks(run_ctl: Ctl, store: EtcdStore) -> None:
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


@pytest.mark.usefixtures("leftover_block")
async def test_new_pool_over_differently_sized_leftover_block_is_refused(run_ctl: Ctl) -> None:
    result = await run_ctl("create", "ippool", "big", "--cidr", "192.168.0.0/24",
                           "--block-size", "28")
    assert result.code == 1
    assert "block 192.168.0.0/26 of a deleted pool overlaps 192.168.0.0/24" in result.err
    # Same block size: the new pool adopts the leftover block.
    result = await run_ctl("create", "ippool", "same", "--cidr", "192.168.0.0/24")
    assert result.code == 0
    assert (await run_ctl("ipam", "check")).code == 0


# ---------------------------------------------------------------------------- label


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


async def test_label_creates_an_unknown_node_only_with_create(
    run_ctl: Ctl, store: EtcdStore
) -> None:
    result = await run_ctl("label", "nodes", "node-new", "rack=0", "--create")
    assert (result.code, result.out) == (0, "node/node-new labeled\n")
    node = await store.get_node("node-new")
    assert node is not None and node.value.labels == {"rack": "0"}
