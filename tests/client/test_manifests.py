"""Manifest parsing: every accepted shape, and one clear line for every bad document."""

from __future__ import annotations

import ipaddress
import json
import textwrap

import pytest
import yaml

from topoipam.client import manifests
from topoipam.daemon.core.errors import InvalidInput
from topoipam.daemon.core.model import IPAMConfig, IPPool, IPReservation, Node


def load(text: str) -> manifests.Manifests:
    return manifests.load(textwrap.dedent(text), "test.yaml")


def objects(text: str) -> list[manifests.Resource]:
    return [d.obj for d in load(text).documents]


RACK_0 = IPPool("rack-0", ipaddress.ip_network("192.168.0.0/24"), 26, 'rack == "0"')
# Indented like the table's documents below: load() dedents the text a case gives.
RACK_0_DOCUMENT = """
            apiVersion: topoipam/v1
            kind: IPPool
            metadata: {name: rack-0}
            spec: {cidr: 192.168.0.0/24, nodeSelector: rack == "0"}
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(RACK_0_DOCUMENT, [RACK_0], id="ippool-defaults"),
        pytest.param(
            """
            apiVersion: topoipam/v1
            kind: IPPool
            metadata: {name: v6}
            spec: {cidr: "fd00::/64", blockSize: 120, disabled: true, assignmentMode: Manual}
            """,
            [IPPool("v6", ipaddress.ip_network("fd00::/64"), 120, "all()", True, "Manual")],
            id="ippool-v6-all-fields",
        ),
        pytest.param(
            """
            apiVersion: topoipam/v1
            kind: Node
            metadata:
              name: node-0
              labels: {rack: "0"}
            spec:
              labels: {zone: a, rack: "0"}
            """,
            [Node("node-0", {"rack": "0", "zone": "a"})],
            id="node-labels-from-metadata-and-spec",
        ),
        pytest.param(
            """
            apiVersion: topoipam/v1
            kind: IPAMConfig
            spec: {strictAffinity: true, maxBlocksPerHost: 4}
            """,
            [IPAMConfig(strict_affinity=True, max_blocks_per_host=4)],
            id="ipamconfig-without-name",
        ),
        pytest.param(
            """
            apiVersion: topoipam/v1
            kind: IPReservation
            metadata: {name: gateways}
            spec: {reservedCIDRs: [192.168.0.1, 192.168.1.0/28]}
            """,
            [IPReservation("gateways", (ipaddress.ip_network("192.168.0.1/32"),
                                        ipaddress.ip_network("192.168.1.0/28")))],
            id="ipreservation-calico-field-name",
        ),
        pytest.param(
            RACK_0_DOCUMENT + """
            ---
            ---
            apiVersion: topoipam/v1
            kind: Node
            metadata: {name: node-0}
            """,
            [RACK_0, Node("node-0", {})],
            id="multi-document-with-empty-document",
        ),
        pytest.param(
            """
            apiVersion: projectcalico.org/v3
            kind: IPPoolList
            items:
            - metadata: {name: rack-0}
              spec: {cidr: 192.168.0.0/24, nodeSelector: rack == "0"}
            """,
            [RACK_0],
            id="calicoctl-list-items-inherit-kind",
        ),
        pytest.param(
            """
            apiVersion: topoipam/v1
            kind: List
            items:
            - apiVersion: topoipam/v1
              kind: IPPool
              metadata: {name: rack-0}
              spec: {cidr: 192.168.0.0/24, nodeSelector: rack == "0"}
            """,
            [RACK_0],
            id="kind-list",
        ),
        pytest.param(
            json.dumps([
                {"apiVersion": "topoipam/v1", "kind": "IPPool", "metadata": {"name": "rack-0"},
                 "spec": {"cidr": "192.168.0.0/24", "nodeSelector": 'rack == "0"'}},
                {"apiVersion": "topoipam/v1", "kind": "Node", "metadata": {"name": "n"},
                 "spec": {"labels": {"rack": "0"}}},
            ]),
            [RACK_0, Node("n", {"rack": "0"})],
            id="json-array",
        ),
        pytest.param(
            # A tab-indented JSON document: valid JSON that PyYAML would refuse.
            '{\n\t"apiVersion": "topoipam/v1", "kind": "Node",\n\t"metadata": {"name": "n"}}',
            [Node("n", {})],
            id="json-object-with-tabs",
        ),
    ],
)
def test_accepted_documents(text: str, expected: list[manifests.Resource]) -> None:
    assert objects(text) == expected


def test_calico_ippool_maps_fields_and_warns_once_per_ignored_field() -> None:
    parsed = load(
        """
        apiVersion: projectcalico.org/v3
        kind: IPPool
        metadata:
          name: rack-0
          resourceVersion: "42"
        spec:
          cidr: 192.168.0.0/24
          blockSize: 28
          nodeSelector: rack == "0"
          disabled: true
          assignmentMode: Manual
          ipipMode: Always
          vxlanMode: Never
          natOutgoing: true
          allowedUses: [Workload, Tunnel]
          disableBGPExport: false
        """
    )
    assert [d.obj for d in parsed.documents] == [
        IPPool("rack-0", ipaddress.ip_network("192.168.0.0/24"), 28, 'rack == "0"', True,
               "Manual")
    ]
    assert parsed.warnings == [
        "IPPool rack-0: field metadata.resourceVersion is not used by topoipam (ignored)",
        "IPPool rack-0: field spec.ipipMode is not used by topoipam (ignored)",
        "IPPool rack-0: field spec.vxlanMode is not used by topoipam (ignored)",
        "IPPool rack-0: field spec.natOutgoing is not used by topoipam (ignored)",
        "IPPool rack-0: spec.allowedUses Tunnel is not served by topoipam (Workload is "
        "honoured)",
        "IPPool rack-0: field spec.disableBGPExport is not used by topoipam (ignored)",
    ]


def test_documents_know_where_they_came_from() -> None:
    parsed = load(
        """
        apiVersion: topoipam/v1
        kind: Node
        metadata: {name: a}
        ---
        apiVersion: topoipam/v1
        kind: List
        items:
        - {apiVersion: topoipam/v1, kind: Node, metadata: {name: b}}
        """
    )
    assert [(d.kind, d.name, d.where) for d in parsed.documents] == [
        ("Node", "a", "test.yaml document 1"),
        ("Node", "b", "test.yaml document 2 item 1"),
    ]


@pytest.mark.parametrize(
    "obj",
    [
        RACK_0,
        IPPool("v6", ipaddress.ip_network("fd00::/48"), 122, "has(zone) && rack in {'0', '1'}",
               True, "Manual"),
        Node("node-0", {"rack": "0", "topology.kubernetes.io/zone": "a"}),
        IPAMConfig(True, 3, False, 30),
        IPReservation("gw", (ipaddress.ip_network("192.168.0.1/32"),)),
    ],
    ids=lambda o: type(o).__name__,
)
def test_to_manifest_round_trips_through_yaml_and_json(obj: manifests.Resource) -> None:
    as_yaml = yaml.safe_dump(manifests.to_manifest(obj))
    as_json = json.dumps(manifests.to_list_manifest([obj]))
    assert [d.obj for d in manifests.load(as_yaml, "out.yaml").documents] == [obj]
    assert [d.obj for d in manifests.load(as_json, "out.json").documents] == [obj]


POOL_HEAD = "apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: rack-0}\n"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param("", ["test.yaml: no resources found"], id="empty-file"),
        pytest.param("kind: [\n", ["test.yaml: invalid YAML at line 2"], id="yaml-syntax"),
        pytest.param('{"kind": }', ["invalid JSON at line 1, column 10"], id="json-syntax"),
        pytest.param("- just\n- a list\n",
                     ["document 1 item 1: expected a resource", "got the text 'just'"],
                     id="not-a-mapping"),
        pytest.param("kind: IPPool\nmetadata: {name: x}\n", ["apiVersion is required"],
                     id="missing-api-version"),
        pytest.param("apiVersion: topoipam/v1\nmetadata: {name: x}\n", ["kind is required"],
                     id="missing-kind"),
        pytest.param("apiVersion: v1\nkind: IPPool\n", ["unsupported apiVersion 'v1'"],
                     id="wrong-api-version"),
        pytest.param("apiVersion: topoipam/v1\nkind: Pool\nmetadata: {name: x}\n",
                     ["unknown kind 'Pool'", "IPPool, Node, IPAMConfig, IPReservation"],
                     id="unknown-kind"),
        pytest.param("apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: x}\n",
                     ["kind Node of apiVersion projectcalico.org/v3 is not supported"],
                     id="calico-kind-not-supported"),
        pytest.param("apiVersion: topoipam/v1\nkind: IPPool\nspec: {cidr: 10.0.0.0/24}\n",
                     ["IPPool: metadata.name is required"], id="missing-name"),
        pytest.param("apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: Bad_}\n",
                     ["invalid ippool name 'Bad_'"], id="bad-name"),
        pytest.param(POOL_HEAD + "spec: {cidr: 10.0.0.0/24, nodeSelctor: all()}\n",
                     ["IPPool rack-0: unknown field spec.nodeSelctor"], id="unknown-spec-field"),
        pytest.param(POOL_HEAD + "status: {}\nspec: {cidr: 10.0.0.0/24}\n",
                     ["unknown field status"], id="unknown-top-level-field"),
        pytest.param(POOL_HEAD + "spec: {}\n", ["cidr is required"], id="missing-cidr"),
        pytest.param(POOL_HEAD + "spec: {cidr: 10.0.0.1/24}\n",
                     ["host bits set", "did you mean 10.0.0.0/24"], id="cidr-host-bits"),
        pytest.param(POOL_HEAD + "spec: {cidr: 10.0.0.0/24, blockSize: 19}\n",
                     ["block size 19 is out of range for IPv4 (allowed 20-32)"],
                     id="block-size-out-of-range"),
        pytest.param(POOL_HEAD + "spec: {cidr: 10.0.0.0/24, blockSize: 22}\n",
                     ["smaller than one /22 block"], id="pool-smaller-than-block"),
        pytest.param(POOL_HEAD + "spec: {cidr: 10.0.0.0/24, nodeSelector: 'rack = \"0\"'}\n",
                     ["invalid selector", "at column 6"], id="bad-selector"),
        pytest.param(POOL_HEAD + "spec: {cidr: 10.0.0.0/24, disabled: 'no'}\n",
                     ["disabled: expected true or false"], id="disabled-not-bool"),
        pytest.param(POOL_HEAD + "spec: {cidr: 10.0.0.0/24, assignmentMode: Auto}\n",
                     ["assignmentMode 'Auto' must be Automatic or Manual"], id="bad-mode"),
        pytest.param(POOL_HEAD + "spec: [cidr]\n", ["IPPool rack-0: spec must be a mapping"],
                     id="spec-not-mapping"),
        pytest.param("apiVersion: topoipam/v1\nkind: Node\nmetadata: {name: n}\n"
                     "spec: {labels: {rack: 0}}\n",
                     ["label rack has the non-string value 0", 'rack: "0"'],
                     id="label-value-not-string"),
        pytest.param("apiVersion: topoipam/v1\nkind: Node\nmetadata: {name: n, labels: {a: x}}\n"
                     "spec: {labels: {a: y}}\n",
                     ["label a is 'x' in metadata.labels but 'y' in spec.labels"],
                     id="conflicting-labels"),
        pytest.param("apiVersion: topoipam/v1\nkind: IPAMConfig\nmetadata: {name: other}\n",
                     ["metadata.name must be 'default'"], id="ipamconfig-name"),
        pytest.param("apiVersion: topoipam/v1\nkind: IPAMConfig\n"
                     "spec: {maxBlocksPerHost: -1}\n",
                     ["maxBlocksPerHost: expected a whole number >= 0"], id="ipamconfig-value"),
        pytest.param("apiVersion: topoipam/v1\nkind: IPReservation\nmetadata: {name: r}\n"
                     "spec: {cidrs: [10.0.0.0/30], reservedCIDRs: [10.0.0.4/30]}\n",
                     ["give spec.cidrs or spec.reservedCIDRs, not both"],
                     id="reservation-both-fields"),
        pytest.param("apiVersion: topoipam/v1\nkind: List\n", ["needs a list of items"],
                     id="list-without-items"),
        pytest.param(
            "apiVersion: topoipam/v1\nkind: Node\nmetadata: {name: ok}\n---\n"
            + POOL_HEAD + "spec: {cidr: 10.0.0.1/24}\n",
            ["test.yaml document 2: pool rack-0: cidr"], id="error-names-the-document"),
    ],
)
def test_rejected_documents_give_one_clear_line(text: str, fragments: list[str]) -> None:
    with pytest.raises(InvalidInput) as info:
        manifests.load(text, "test.yaml")
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# ---------------------------------------------------------------------------- issue 10


def calico_pool(extra: str) -> str:
    return ("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\n"
            f"spec: {{cidr: 10.0.0.0/24{extra}}}\n")


@pytest.mark.parametrize("uses", ["[Tunnel]", "[LoadBalancer]", "[Tunnel, LoadBalancer]"])
def test_calico_pool_without_workload_use_never_serves_pods_automatically(uses: str) -> None:
    parsed = manifests.load(calico_pool(f", allowedUses: {uses}"), "test.yaml")
    [pool] = [d.obj for d in parsed.documents]
    assert isinstance(pool, IPPool)
    assert pool.assignment_mode == "Manual"
    assert parsed.warnings == [
        f"IPPool p: spec.allowedUses {uses.strip('[]').replace(' ', '')} has no Workload: "
        "imported as assignmentMode Manual (pods get addresses from it only where a CNI "
        "config names it)"
    ]


def test_calico_pool_with_workload_use_is_honoured_and_other_uses_named() -> None:
    parsed = manifests.load(calico_pool(", allowedUses: [Workload, Tunnel]"), "test.yaml")
    [pool] = [d.obj for d in parsed.documents]
    assert isinstance(pool, IPPool) and pool.assignment_mode == "Automatic"
    assert parsed.warnings == [
        "IPPool p: spec.allowedUses Tunnel is not served by topoipam (Workload is honoured)"]


def test_calico_allowed_uses_must_be_known() -> None:
    with pytest.raises(InvalidInput) as info:
        manifests.load(calico_pool(", allowedUses: [Pods]"), "test.yaml")
    assert "allowedUses: unknown use 'Pods' (Calico knows Workload, Tunnel, LoadBalancer)" in str(
        info.value)


def test_calico_namespace_selector_is_named_with_its_consequence() -> None:
    parsed = manifests.load(calico_pool(", namespaceSelector: 'team == \"a\"'"), "test.yaml")
    assert parsed.warnings == [
        "IPPool p: field spec.namespaceSelector is not used by topoipam (ignored): the pool "
        "serves pods of every namespace on the nodes it selects"]


NODE_HEAD = "apiVersion: topoipam/v1\nkind: Node\nmetadata: {name: n}\n"


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        pytest.param("{" + "k" * 70 + ": v}", "name part longer than 63", id="key-70-chars"),
        pytest.param("{a/b/c: v}", "invalid label key 'a/b/c'", id="key-two-slashes"),
        pytest.param("{/x: v}", "invalid label key '/x'", id="key-empty-prefix"),
        pytest.param("{example.com/: v}", "invalid label key 'example.com/'",
                     id="key-empty-name"),
        pytest.param("{Example.com/x: v}", "prefix must be a lowercase DNS subdomain",
                     id="key-uppercase-prefix"),
        pytest.param("{k: 'a b'}", "invalid value 'a b' for label k", id="value-space"),
        pytest.param("{k: " + "v" * 100 + "}", "longer than 63", id="value-100-chars"),
        pytest.param("{k: 'a\"b'}", "invalid value 'a\"b' for label k", id="value-quote"),
        pytest.param("{k: -a}", "invalid value '-a' for label k", id="value-starts-dash"),
    ],
)
def test_kubernetes_label_rules(labels: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        manifests.load(NODE_HEAD + f"spec: {{labels: {labels}}}\n", "test.yaml")
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_kubernetes_label_rules_accept_valid_keys_and_values() -> None:
    [node] = objects(NODE_HEAD + "spec: {labels: {topology.kubernetes.io/zone: eu-1a, "
                     "rack: '0', empty: '', A_b.c-d: x.Y_z-9}}\n")
    assert isinstance(node, Node) and node.labels["topology.kubernetes.io/zone"] == "eu-1a"


@pytest.mark.parametrize("name", ["Rack-0", "rack.0", "rack_0", "-rack", "r" * 64])
def test_pool_names_are_dns_1123_labels(name: str) -> None:
    with pytest.raises(InvalidInput) as info:
        manifests.load(f"apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {{name: '{name}'}}\n"
                       "spec: {cidr: 10.0.0.0/24}\n", "test.yaml")
    assert "DNS-1123 label" in str(info.value)


def test_block_size_given_as_text_is_named_clearly() -> None:
    with pytest.raises(InvalidInput) as info:
        manifests.load(POOL_HEAD + "spec: {cidr: 10.0.0.0/24, blockSize: '26'}\n", "test.yaml")
    assert str(info.value) == (
        "test.yaml document 1: pool rack-0: blockSize must be a number, not the text '26' "
        "(write blockSize: 26, without quotes)")
