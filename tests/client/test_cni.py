"""The ``topoipam`` CNI plugin's verbs, exec'd the way runtimes exec it.

Success paths talk to an in-test fake daemon (tests/client/plugin_exec.py): the
real CniSocketServer with a dispatch that records requests and answers canned
responses. (End-to-end runs against a real daemon and etcd live in
tests/integration and tests/e2e; the one here is a GC too large for the old frame
limit.) What the plugin refuses before it calls the daemon, and a daemon it cannot
reach, are in test_cni_errors.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.client.plugin_exec import ATTACHMENT, V4, V6, FakeDaemon, Json, run_plugin
from topoipam.client import cni
from topoipam.proto import cniwire as wire

# --- VERSION ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdin", "expected"),
    [('{"cniVersion": "0.4.0"}', "0.4.0"), ('{"cniVersion": "1.0.0"}', "1.0.0"),
     ('{"cniVersion": "0.3.0"}', "0.3.0"),
     ('{"cniVersion": "0.2.0"}', "1.1.0"), ("", "1.1.0"), ("garbage", "1.1.0")],
)
def test_version(stdin: str, expected: str) -> None:
    outcome = run_plugin("VERSION", stdin, container_id=None, ifname=None)
    assert outcome.status == 0
    assert outcome.result == {"cniVersion": expected,
                              "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0",
                                                    "1.1.0"]}


# --- ADD --------------------------------------------------------------------


# 0.3.0 has 0.3.1's result format (Debian's host-local accepts it too).
@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_result_in_each_version(daemon: FakeDaemon, version: str) -> None:
    outcome = run_plugin("ADD", daemon.conf(version))
    assert outcome.status == 0, outcome
    ip: Json = {"address": "192.168.0.5/24"}
    if version in ("0.3.0", "0.3.1", "0.4.0"):
        ip = {"version": "4", **ip}
    assert outcome.result == {"cniVersion": version, "ips": [ip], "dns": {}}


def test_add_request_carries_attachment_pools_and_pod_attributes(daemon: FakeDaemon) -> None:
    conf = daemon.conf(ipv4_pools=["rack-0", "192.168.0.0/24"], ipv6_pools=["fd00::/48"],
                       assign_ipv6=True)
    cni_args = ("IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=frontend-7d9;"
                "K8S_POD_INFRA_CONTAINER_ID=ctr1;K8S_POD_UID=1234-abcd")
    assert run_plugin("ADD", conf, cni_args=cni_args).status == 0
    assert daemon.only_request("Allocate") == {
        "attachment": ATTACHMENT,
        "assign_ipv4": True,
        "assign_ipv6": True,
        "ipv4_pools": ["rack-0", "192.168.0.0/24"],
        "ipv6_pools": ["fd00::/48"],
        "ips": [],
        "attributes": {"namespace": "web", "pod": "frontend-7d9",
                       "pod_infra_container_id": "ctr1", "pod_uid": "1234-abcd"},
        "gateways": [],
    }


def test_add_defaults_to_ipv4_only(daemon: FakeDaemon) -> None:
    assert run_plugin("ADD", daemon.conf()).status == 0
    request = daemon.only_request("Allocate")
    assert (request["assign_ipv4"], request["assign_ipv6"]) == (True, False)
    assert request["attributes"] == {}


def test_add_accepts_calico_style_string_flags(daemon: FakeDaemon) -> None:
    assert run_plugin("ADD", daemon.conf(assign_ipv4="false", assign_ipv6="true")).status == 0
    request = daemon.only_request("Allocate")
    assert (request["assign_ipv4"], request["assign_ipv6"]) == (False, True)


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [(None, ["192.168.0.5/24", "fd00::5/48"]),
     ("pool", ["192.168.0.5/24", "fd00::5/48"]),
     ("block", ["192.168.0.5/26", "fd00::5/122"]),
     ("host", ["192.168.0.5/32", "fd00::5/128"])],
)
def test_add_prefix_modes(daemon: FakeDaemon, prefix: str | None, expected: list[str]) -> None:
    daemon.answers["Allocate"] = wire.ok_response({"addresses": [V4, V6]})
    conf = daemon.conf() if prefix is None else daemon.conf(prefix=prefix)
    outcome = run_plugin("ADD", conf)
    assert [ip["address"] for ip in outcome.result["ips"]] == expected


def test_add_pool_prefix_falls_back_to_block_without_pool(daemon: FakeDaemon) -> None:
    orphan = {**V4, "pool": "", "pool_cidr": ""}
    daemon.answers["Allocate"] = wire.ok_response({"addresses": [orphan]})
    assert run_plugin("ADD", daemon.conf()).result["ips"] == [{"address": "192.168.0.5/26"}]


@pytest.mark.parametrize("gateway", ["192.168.0.1", ["fd00::1", "192.168.0.1"]])
def test_add_gateway_goes_to_its_family(daemon: FakeDaemon, gateway: str | list[str]) -> None:
    daemon.answers["Allocate"] = wire.ok_response({"addresses": [V4, V6]})
    ips = run_plugin("ADD", daemon.conf("0.3.1", gateway=gateway)).result["ips"]
    assert ips[0] == {"version": "4", "address": "192.168.0.5/24", "gateway": "192.168.0.1"}
    if isinstance(gateway, list):
        assert ips[1] == {"version": "6", "address": "fd00::5/48", "gateway": "fd00::1"}
    else:
        assert ips[1] == {"version": "6", "address": "fd00::5/48"}


def test_add_copies_routes_and_dns(daemon: FakeDaemon) -> None:
    routes = [{"dst": "0.0.0.0/0"}, {"dst": "10.96.0.0/12", "gw": "192.168.0.1", "mtu": 1400},
              {"dst": "fd00:96::/108", "gw": "fd00::1", "mtu": 1400, "advmss": 1360,
               "priority": 100, "table": 254, "scope": 0}]
    dns = {"nameservers": ["10.96.0.10"], "domain": "cluster.local",
           "search": ["default.svc.cluster.local"], "options": ["ndots:5"]}
    result = run_plugin("ADD", daemon.conf(routes=routes, dns=dns)).result
    assert result["routes"] == routes
    assert result["dns"] == dns


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"runtimeConfig": {"ips": ["192.168.0.50/24"]}}, ["192.168.0.50"]),
        ({"args": {"cni": {"ips": ["fd00::0050"]}}}, ["fd00::50"]),
        ({"cni_args": "IP=192.168.0.50,fd00::50/64"}, ["192.168.0.50", "fd00::50"]),
        ({"cni_args": "IP=192.168.0.50", "runtimeConfig": {"ips": ["192.168.0.50/24"]}},
         ["192.168.0.50"]),
    ],
    ids=["runtimeConfig", "args.cni", "CNI_ARGS", "same-address-twice"],
)
def test_add_specific_addresses(daemon: FakeDaemon, where: Json, expected: list[str]) -> None:
    conf = daemon.conf()
    cni_args = where.pop("cni_args", None)
    conf.update(where)
    assert run_plugin("ADD", conf, cni_args=cni_args).status == 0
    assert daemon.only_request("Allocate")["ips"] == expected


def test_add_treats_ipv4_mapped_addresses_as_ipv4(daemon: FakeDaemon) -> None:
    # As Go's net.ParseIP(...).To4() does, and so host-local and the plugins after us.
    conf = daemon.conf(
        "0.4.0", gateway="::ffff:192.168.0.1",
        routes=[{"dst": "::ffff:10.96.0.0/108", "gw": "::ffff:c0a8:1"}],
        dns={"nameservers": ["::ffff:10.96.0.10", "fd00::10"]},
    )
    conf["runtimeConfig"] = {"ips": ["::ffff:192.168.0.5/120"]}
    result = run_plugin("ADD", conf).result
    assert daemon.only_request("Allocate")["ips"] == ["192.168.0.5"]
    assert result["ips"] == [{"version": "4", "address": "192.168.0.5/24",
                              "gateway": "192.168.0.1"}]
    assert result["routes"] == [{"dst": "10.96.0.0/12", "gw": "192.168.0.1"}]
    assert result["dns"] == {"nameservers": ["10.96.0.10", "fd00::10"]}


def test_ipv4_mapped_and_plain_ipv4_request_are_one_address(daemon: FakeDaemon) -> None:
    conf = daemon.conf()
    conf["runtimeConfig"] = {"ips": ["::ffff:192.168.0.50"]}
    assert run_plugin("ADD", conf, cni_args="IP=192.168.0.50").status == 0
    assert daemon.only_request("Allocate")["ips"] == ["192.168.0.50"]


def test_add_daemon_error_keeps_its_code_and_message(daemon: FakeDaemon) -> None:
    message = ("no free IPv4 address for node node-0 (labels {rack=0}) in pools rack-0")
    daemon.answers["Allocate"] = wire.error_response("RESOURCE_EXHAUSTED", message, 111)
    error = run_plugin("ADD", daemon.conf("0.4.0")).error(111)
    assert error["msg"] == message
    assert error["cniVersion"] == "0.4.0"


def test_add_transient_daemon_error_is_11(daemon: FakeDaemon) -> None:
    daemon.answers["Allocate"] = wire.error_response("UNAVAILABLE", "cache not in sync", 11)
    assert run_plugin("ADD", daemon.conf()).error(11)["msg"] == "cache not in sync"


@pytest.mark.parametrize(
    "answer",
    [{"code": "OK", "response": {"addresses": "x"}},
     {"code": "OK", "response": {"addresses": [{"ip": "not-an-ip"}]}},
     {"code": "OK", "response": {"addresses": []}},
     {"code": "OK", "response": []}],
)
def test_add_malformed_daemon_answer_is_999(daemon: FakeDaemon, answer: Json) -> None:
    daemon.answers["Allocate"] = answer
    run_plugin("ADD", daemon.conf()).error(999)


# --- DEL --------------------------------------------------------------------


def test_del_releases_and_prints_nothing(daemon: FakeDaemon) -> None:
    outcome = run_plugin("DEL", daemon.conf())
    assert (outcome.status, outcome.stdout) == (0, "")
    assert daemon.only_request("Release") == {"attachment": ATTACHMENT}


def test_del_of_unknown_attachment_succeeds(daemon: FakeDaemon) -> None:
    daemon.answers["Release"] = wire.error_response("NOT_FOUND", "no such handle", 102)
    outcome = run_plugin("DEL", daemon.conf())
    assert (outcome.status, outcome.stdout) == (0, "")


def test_del_ignores_add_only_config_mistakes(daemon: FakeDaemon) -> None:
    # A config edited into something ADD rejects must not strand addresses.
    outcome = run_plugin("DEL", daemon.conf(prefix="bogus", surplus=1))
    assert (outcome.status, outcome.stdout) == (0, "")


def test_del_daemon_error_fails(daemon: FakeDaemon) -> None:
    daemon.answers["Release"] = wire.error_response("UNAVAILABLE", "etcd unreachable", 11)
    run_plugin("DEL", daemon.conf()).error(11)


# --- CHECK ------------------------------------------------------------------


def prev_result(*addresses: str) -> Json:
    return {"cniVersion": "1.1.0", "ips": [{"address": a} for a in addresses]}


def test_check_passes_when_prev_result_matches(daemon: FakeDaemon) -> None:
    daemon.answers["Get"] = wire.ok_response({"addresses": [V4, V6]})
    conf = daemon.conf()
    conf["prevResult"] = prev_result("192.168.0.5/24", "fd00:0::5/48")
    outcome = run_plugin("CHECK", conf)
    assert (outcome.status, outcome.stdout) == (0, "")
    assert daemon.only_request("Get") == {"attachment": ATTACHMENT}


def test_check_without_prev_result_needs_an_address(daemon: FakeDaemon) -> None:
    assert run_plugin("CHECK", daemon.conf()).status == 0


def test_check_mismatch_is_113(daemon: FakeDaemon) -> None:
    conf = daemon.conf()
    conf["prevResult"] = prev_result("192.168.0.6/24")
    error = run_plugin("CHECK", conf).error(113)
    assert "prevResult" in error["msg"]
    assert "192.168.0.6" in error["details"] and "192.168.0.5" in error["details"]


def test_check_allows_addresses_a_later_plugin_added(daemon: FakeDaemon) -> None:
    # CNI spec: CHECK must allow for a later chained plugin having changed the result.
    conf = daemon.conf()
    conf["prevResult"] = prev_result("192.168.0.5/24", "fd00::9/64", "10.1.0.7/32")
    outcome = run_plugin("CHECK", conf)
    assert (outcome.status, outcome.stdout) == (0, ""), outcome


def test_check_held_address_missing_from_prev_result_is_113(daemon: FakeDaemon) -> None:
    daemon.answers["Get"] = wire.ok_response({"addresses": [V4, V6]})
    conf = daemon.conf()
    conf["prevResult"] = prev_result("192.168.0.5/24", "10.1.0.7/32")
    error = run_plugin("CHECK", conf).error(113)
    assert "fd00::5" in error["msg"] + error["details"], error


def test_check_matches_ipv4_mapped_prev_result(daemon: FakeDaemon) -> None:
    conf = daemon.conf()
    conf["prevResult"] = prev_result("::ffff:192.168.0.5/120")
    assert run_plugin("CHECK", conf).status == 0


@pytest.mark.parametrize(
    "answer",
    [wire.error_response("NOT_FOUND", "handle podnet/ctr1/eth0 holds no address", 102),
     wire.ok_response({"handle": "podnet/ctr1/eth0"})],
)
def test_check_without_allocation_is_113(daemon: FakeDaemon, answer: Json) -> None:
    daemon.answers["Get"] = answer
    error = run_plugin("CHECK", daemon.conf()).error(113)
    assert "podnet/ctr1/eth0" in error["msg"]


def test_check_malformed_prev_result_is_7(daemon: FakeDaemon) -> None:
    conf = daemon.conf()
    conf["prevResult"] = {"ips": [{"address": "192.168.0.5"}]}  # no prefix
    run_plugin("CHECK", conf).error(7)


# --- STATUS -----------------------------------------------------------------


def test_status_ready(daemon: FakeDaemon) -> None:
    outcome = run_plugin("STATUS", daemon.conf(), container_id=None, ifname=None)
    assert (outcome.status, outcome.stdout) == (0, "")
    # It asks about what an ADD of this network would ask for.
    assert daemon.only_request("Status") == {"assign_ipv4": True, "assign_ipv6": False,
                                             "ipv4_pools": [], "ipv6_pools": []}


@pytest.mark.parametrize(
    ("status", "fragments"),
    [
        ({"node": "node-0", "etcd_reachable": True}, ["node-0", "not in sync"]),
        ({"node": "node-0", "in_sync": True, "etcd_error": "connection refused"},
         ["etcd unreachable: connection refused"]),
        ({}, ["not in sync", "etcd unreachable"]),
    ],
)
def test_status_not_ready_is_50(daemon: FakeDaemon, status: Json, fragments: list[str]) -> None:
    daemon.answers["Status"] = wire.ok_response(status)
    error = run_plugin("STATUS", daemon.conf(), container_id=None, ifname=None).error(50)
    for fragment in fragments:
        assert fragment in error["msg"]


def test_status_daemon_error_is_50(daemon: FakeDaemon) -> None:
    daemon.answers["Status"] = wire.error_response("UNAVAILABLE", "shutting down", 11)
    assert run_plugin("STATUS", daemon.conf(), container_id=None, ifname=None).error(50)[
        "msg"] == "shutting down"


# --- GC ---------------------------------------------------------------------


def test_gc_maps_valid_attachments(daemon: FakeDaemon) -> None:
    conf = daemon.conf()
    conf["cni.dev/valid-attachments"] = [
        {"containerID": "ctr1", "ifname": "eth0"},
        {"containerID": "ctr2", "ifname": "net1"},
        {"containerID": "bad id!", "ifname": "eth0"},  # could never own an address
    ]
    outcome = run_plugin("GC", conf, container_id=None, ifname=None)
    assert (outcome.status, outcome.stdout) == (0, "")
    assert daemon.only_request("GarbageCollect") == {
        "network": "podnet",
        "valid_attachments": [
            ATTACHMENT,
            {"network": "podnet", "container_id": "ctr2", "ifname": "net1"},
        ],
    }


def test_gc_leaves_out_ifnames_over_15_bytes(daemon: FakeDaemon) -> None:
    conf = daemon.conf()
    conf["cni.dev/valid-attachments"] = [{"containerID": "ctr1", "ifname": "é" * 8},
                                         {"containerID": "ctr1", "ifname": "eth0"}]
    assert run_plugin("GC", conf, container_id=None, ifname=None).status == 0
    assert daemon.only_request("GarbageCollect")["valid_attachments"] == [ATTACHMENT]


@pytest.mark.parametrize(
    ("key", "value"), [("cni.dev/attachments", [{"containerID": "ctr1", "ifname": "eth0"}]),
                       ("cni.dev/valid-attachments", None)],
)
def test_gc_accepts_legacy_key_and_null(daemon: FakeDaemon, key: str, value: Any) -> None:
    conf = daemon.conf()
    conf[key] = value
    assert run_plugin("GC", conf, container_id=None, ifname=None).status == 0
    expected = [ATTACHMENT] if value else []
    assert daemon.only_request("GarbageCollect")["valid_attachments"] == expected


@pytest.mark.parametrize("value", ["missing", "ctr1", [{"containerID": "ctr1"}]])
def test_gc_without_a_usable_list_is_7_and_releases_nothing(
    daemon: FakeDaemon, value: Any
) -> None:
    conf = daemon.conf()
    if value != "missing":
        conf["cni.dev/valid-attachments"] = value
    run_plugin("GC", conf, container_id=None, ifname=None).error(7)
    assert daemon.requests == []


# --- in-process: the catch-all and the wire framing --------------------------


class ExplodingEnviron(dict[str, str]):
    def get(self, key: str, default: Any = None) -> Any:
        raise RuntimeError("environment exploded")


def test_unexpected_exception_becomes_999_json() -> None:
    status, output = cni.run(ExplodingEnviron(), b"{}")
    assert status == 1
    assert json.loads(output) == {"cniVersion": "1.1.0", "code": 999,
                                  "msg": "RuntimeError: environment exploded"}


def test_wire_frame_round_trip() -> None:
    message = {"method": "Allocate", "request": {"attributes": {"pod": "ünï"}}}
    frame = wire.encode_frame(message)
    assert wire.frame_length(frame[:4]) == len(frame) - 4
    assert wire.decode_payload(frame[4:]) == message


@pytest.mark.parametrize("header", [b"\x00\x00\x00\x00", (wire.MAX_FRAME + 1).to_bytes(4, "big"),
                                    b"\xff\xff\xff\xff", b"\x00\x00\x01"])
def test_wire_rejects_bad_lengths(header: bytes) -> None:
    with pytest.raises(wire.FrameError):
        wire.frame_length(header)


def test_wire_carries_a_gc_of_twenty_thousand_attachments() -> None:
    # ~9,000 attachments with 64-character container IDs filled the old 1 MiB frame.
    keep = [{"network": "k8s-pod-network", "container_id": f"{n:064x}", "ifname": "eth0"}
            for n in range(20_000)]
    frame = wire.encode_frame({"method": "GarbageCollect",
                               "request": {"network": "k8s-pod-network",
                                           "valid_attachments": keep}})
    assert wire.frame_length(frame[:4]) == len(frame) - 4 > 1 << 21


def test_wire_rejects_oversized_messages() -> None:
    with pytest.raises(wire.FrameError):
        wire.encode_frame({"pad": "x" * wire.MAX_FRAME})




def test_cni_socket_path() -> None:
    assert wire.cni_socket_path("/run/topoipam/topoipamd.sock") == \
        "/run/topoipam/topoipamd.sock.cni"


# --- start-up cost ----------------------------------------------------------


def test_plugin_imports_nothing_heavy() -> None:
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import topoipam.client.cni"],
                          capture_output=True, text=True, check=True)
    imported = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "topoipam.client.cni" in imported
    forbidden = ("grpc", "google.protobuf", "asyncio", "yaml", "netaddr", "topoipam.daemon",
                 "topoipam.proto")
    # The wire contract (and its JSON) is all of topoipam.proto the plugin may import.
    allowed = ("topoipam.proto", "topoipam.proto.cniwire", "topoipam.proto.cjson")
    heavy = sorted(m for m in imported if m not in allowed
                   and any(m == f or m.startswith(f + ".") for f in forbidden))
    assert heavy == []
