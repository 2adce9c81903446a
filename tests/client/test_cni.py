"""The ``topoipam`` CNI plugin, exec'd the way runtimes exec it.

Success paths talk to an in-test fake daemon: the real CniSocketServer with a
dispatch that records requests and answers canned responses. (End-to-end runs
against a real daemon and etcd live in tests/integration and tests/e2e; the
one here is a GC too large for the old frame limit.)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.installed_plugin import PLUGIN
from topoipam.client import cni
from topoipam.daemon.cni_socket import CniSocketServer
from topoipam.proto import cniwire as wire

Json = dict[str, Any]

ATTACHMENT = {"network": "podnet", "container_id": "ctr1", "ifname": "eth0"}
V4 = {"ip": "192.168.0.5", "pool": "rack-0", "pool_cidr": "192.168.0.0/24",
      "block": "192.168.0.0/26", "family": 4}
V6 = {"ip": "fd00::5", "pool": "rack-0-v6", "pool_cidr": "fd00::/48",
      "block": "fd00::/122", "family": 6}


# --- running the plugin -----------------------------------------------------


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str

    @property
    def result(self) -> Json:
        parsed = json.loads(self.stdout)
        assert isinstance(parsed, dict)
        return parsed

    def error(self, code: int) -> Json:
        """The CNI error JSON, after checking it carries ``code`` and exit 1."""
        assert self.status == 1, self
        error = self.result
        assert error["code"] == code, error
        assert isinstance(error["msg"], str) and error["msg"]
        assert set(error) <= {"cniVersion", "code", "msg", "details"}
        return error


def run_plugin(
    command: str | None,
    stdin: Json | str | bytes,
    *,
    container_id: str | bytes | None = "ctr1",
    ifname: str | bytes | None = "eth0",
    cni_args: str | bytes | None = None,
    timeout: float = 20,
) -> Outcome:
    # Bytes, as the kernel hands them over: a runtime may pass any non-NUL bytes.
    env = {k: v for k, v in os.environb.items() if not k.startswith(b"CNI_")}
    for key, value in ((b"CNI_COMMAND", command), (b"CNI_CONTAINERID", container_id),
                       (b"CNI_IFNAME", ifname), (b"CNI_ARGS", cni_args)):
        if value is not None:
            env[key] = value if isinstance(value, bytes) else os.fsencode(value)
    env[b"CNI_NETNS"] = b"/var/run/netns/test"
    env[b"CNI_PATH"] = b"/opt/cni/bin"
    if isinstance(stdin, dict):
        stdin = json.dumps(stdin)
    if isinstance(stdin, str):
        stdin = stdin.encode()
    done = subprocess.run([str(PLUGIN)], input=stdin, env=env, capture_output=True,
                          timeout=timeout, check=False)
    outcome = Outcome(done.returncode, done.stdout.decode(), done.stderr.decode())
    # Whatever happened: no traceback, and stdout is empty or one JSON object.
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome
    if outcome.stdout.strip():
        assert isinstance(json.loads(outcome.stdout), dict), outcome
    return outcome


def netconf(version: str = "1.1.0", socket_path: str = "/nonexistent/topoipamd.sock",
            **ipam: Any) -> Json:
    return {"cniVersion": version, "name": "podnet", "type": "bridge",
            "ipam": {"type": "topoipam", "socket": socket_path, **ipam}}


# --- the fake daemon --------------------------------------------------------


class FakeDaemon:
    """CniSocketServer on its own loop thread, answering canned payloads."""

    def __init__(self, grpc_socket: str) -> None:
        self.socket = grpc_socket
        self.requests: list[tuple[str, Json]] = []
        self.answers: dict[str, Json] = {
            "Allocate": wire.ok_response({"handle": "podnet/ctr1/eth0", "addresses": [V4]}),
            "Release": wire.ok_response({"released": ["192.168.0.5"]}),
            "Get": wire.ok_response({"handle": "podnet/ctr1/eth0", "addresses": [V4]}),
            "GarbageCollect": wire.ok_response({"released_handles": []}),
            "Status": wire.ok_response({"node": "node-0", "in_sync": True,
                                        "etcd_reachable": True, "ready": True}),
        }
        self.hang = threading.Event()
        self._loop = asyncio.new_event_loop()
        # asyncio only logs what reaches the loop's exception handler; collect it.
        self.loop_errors: list[dict[str, Any]] = []
        self._loop.set_exception_handler(lambda _, context: self.loop_errors.append(context))
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = CniSocketServer(wire.cni_socket_path(grpc_socket), self._dispatch,
                                       drain_timeout=0.5)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result(10)

    def stop(self) -> None:
        self.hang.clear()
        self._loop.call_soon_threadsafe(self._server.close)
        asyncio.run_coroutine_threadsafe(self._server.wait_closed(), self._loop).result(10)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.01), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        assert self.loop_errors == []

    async def _dispatch(self, method: str, request: Json) -> Json:
        self.requests.append((method, request))
        while self.hang.is_set():
            await asyncio.sleep(0.02)
        return self.answers[method]

    def conf(self, version: str = "1.1.0", **ipam: Any) -> Json:
        return netconf(version, self.socket, **ipam)

    def only_request(self, method: str) -> Json:
        assert [m for m, _ in self.requests] == [method], self.requests
        return self.requests[0][1]


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


# --- errors before any daemon call ------------------------------------------


@pytest.mark.parametrize(
    ("command", "env", "fragment"),
    [
        (None, {}, "CNI_COMMAND is not set"),
        ("FROB", {}, "unknown CNI_COMMAND"),
        ("ADD", {"container_id": None}, "CNI_CONTAINERID"),
        ("DEL", {"container_id": None}, "CNI_CONTAINERID"),
        ("CHECK", {"container_id": None}, "CNI_CONTAINERID"),
        ("ADD", {"container_id": "-bad id"}, "CNI_CONTAINERID"),
        ("ADD", {"ifname": None}, "CNI_IFNAME"),
        ("DEL", {"ifname": None}, "CNI_IFNAME"),
        ("ADD", {"ifname": "a-very-long-ifname"}, "CNI_IFNAME"),
        ("ADD", {"ifname": "eth/0"}, "CNI_IFNAME"),
        ("ADD", {"cni_args": "K8S_POD_NAME=p;garbage"}, "CNI_ARGS"),
    ],
)
def test_bad_environment_is_4(command: str | None, env: dict[str, Any], fragment: str) -> None:
    error = run_plugin(command, netconf(), **env).error(4)
    assert fragment in error["msg"]


@pytest.mark.parametrize("stdin", ["{not json", "[1, 2]", "", '"text"', "[" * 100_000])
def test_undecodable_config_is_6(stdin: str) -> None:
    error = run_plugin("ADD", stdin).error(6)
    assert error["cniVersion"] == "1.1.0"


@pytest.mark.parametrize(
    ("command", "version"),
    [("ADD", "0.2.0"), ("ADD", "2.0.0"), ("DEL", None), ("CHECK", "0.3.1"), ("CHECK", "0.3.0"),
     ("GC", "1.0.0"), ("STATUS", "0.4.0")],
)
def test_unsupported_version_is_1(command: str, version: str | None) -> None:
    conf = netconf()
    if version is None:
        del conf["cniVersion"]
    else:
        conf["cniVersion"] = version
    error = run_plugin(command, conf).error(1)
    if version is not None:
        assert error["cniVersion"] == version  # the error echoes the config's version


@pytest.mark.parametrize(
    ("conf_change", "fragment"),
    [
        ({"name": None}, "network name"),
        ({"name": "bad name"}, "network name"),
        ({"ipam": None}, "no ipam"),
        ({"ipam": {"type": "topoipam", "prefix": "subnet"}}, "ipam.prefix"),
        ({"ipam": {"type": "topoipam", "timeout": "5"}}, "ipam.timeout"),
        ({"ipam": {"type": "topoipam", "timeout": 0}}, "ipam.timeout"),
        ({"ipam": {"type": "topoipam", "socket": ""}}, "ipam.socket"),
        ({"ipam": {"type": "topoipam", "assign_ipv4": "yes"}}, "ipam.assign_ipv4"),
        ({"ipam": {"type": "topoipam", "ipv4_pools": "rack-0"}}, "ipam.ipv4_pools"),
        ({"ipam": {"type": "topoipam", "ipv6_pools": [1]}}, "ipam.ipv6_pools"),
        ({"ipam": {"type": "topoipam", "gateway": "192.168.0.300"}}, "ipam.gateway"),
        ({"ipam": {"type": "topoipam", "gateway": ["10.0.0.1", "10.0.0.2"]}}, "two IPv4"),
        ({"ipam": {"type": "topoipam", "routes": [{"gw": "10.0.0.1"}]}}, "dst"),
        ({"ipam": {"type": "topoipam", "routes": [{"dst": "10.0.0.0/33"}]}}, "CIDR"),
        ({"ipam": {"type": "topoipam", "dns": {"nameservers": "10.96.0.10"}}}, "nameservers"),
        ({"runtimeConfig": {"ips": ["10.0.0.300/24"]}}, "runtimeConfig.ips"),
        ({"runtimeConfig": {"ips": "10.0.0.5"}}, "runtimeConfig.ips"),
        ({"args": {"cni": {"ips": ["nonsense"]}}}, "args.cni.ips"),
        ({"runtimeConfig": {"ips": ["10.0.0.5", "10.0.0.6"]}}, "more than one IPv4"),
    ],
)
def test_bad_config_is_7(conf_change: Json, fragment: str) -> None:
    conf = netconf()
    for key, value in conf_change.items():
        if value is None:
            del conf[key]
        else:
            conf[key] = value
    error = run_plugin("ADD", conf).error(7)
    assert fragment in error["msg"]


def test_bad_ip_in_cni_args_is_7() -> None:
    error = run_plugin("ADD", netconf(), cni_args="IgnoreUnknown=1;IP=10.0.0.1.2").error(7)
    assert "CNI_ARGS IP" in error["msg"]


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        ({"subnet": "10.0.0.0/24"}, ['ipam.subnet', '"10.0.0.0/24"']),
        ({"rangeStart": 5, "Routes": []}, ["ipam.rangeStart", "5", "ipam.Routes", "[]"]),
    ],
)
def test_unknown_ipam_key_is_2_with_key_and_value(extra: Json, fragments: list[str]) -> None:
    # CNI spec: 2 "unsupported field in network configuration", key and value in the message.
    error = run_plugin("ADD", netconf(**extra)).error(2)
    for fragment in fragments:
        assert fragment in error["msg"], error


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
@pytest.mark.parametrize(
    ("variable", "value"),
    [("CNI_IFNAME", b"eth\xff"), ("CNI_CONTAINERID", b"ctr\xc3"),
     ("CNI_ARGS", b"K8S_POD_NAME=caf\xe9")],
)
def test_non_utf8_environment_is_4(daemon: FakeDaemon, command: str, variable: str,
                                   value: bytes) -> None:
    overrides: dict[str, Any] = {
        "CNI_IFNAME": {"ifname": value}, "CNI_CONTAINERID": {"container_id": value},
        "CNI_ARGS": {"cni_args": value},
    }[variable]
    if variable == "CNI_ARGS" and command != "ADD":
        # Only ADD reads CNI_ARGS: DEL and CHECK must not fail on what they never use.
        assert run_plugin(command, daemon.conf(), **overrides).status == 0
        return
    error = run_plugin(command, daemon.conf(), **overrides).error(4)
    assert variable in error["msg"] and "UTF-8" in error["msg"], error
    assert daemon.requests == []


def test_non_utf8_bytes_in_an_ignored_cni_arg_are_still_4(daemon: FakeDaemon) -> None:
    error = run_plugin("ADD", daemon.conf(), cni_args=b"IgnoreUnknown=1;FOO=\xff").error(4)
    assert "CNI_ARGS" in error["msg"]
    assert daemon.requests == []


@pytest.mark.parametrize(("ifname", "ok"), [("é" * 7, True), ("é" * 8, False),
                                             ("eth0" + "ü" * 6, False), ("x" * 15, True)])
def test_ifname_is_measured_in_bytes(daemon: FakeDaemon, ifname: str, ok: bool) -> None:
    # Linux IFNAMSIZ is 16 bytes with the NUL: at most 15 bytes of name.
    outcome = run_plugin("ADD", daemon.conf(), ifname=ifname)
    if ok:
        assert outcome.status == 0, outcome
        return
    error = outcome.error(4)
    assert "CNI_IFNAME" in error["msg"]
    assert f"{len(ifname.encode())} bytes" in error["msg"] + error.get("details", "")
    assert "15 bytes" in error["msg"] + error.get("details", "")
    assert daemon.requests == []


def test_del_still_releases_an_ifname_earlier_versions_accepted(daemon: FakeDaemon) -> None:
    # Versions that counted characters may hold an address for this one (ptp
    # allocates before the kernel sees the name): DEL must not strand it.
    outcome = run_plugin("DEL", daemon.conf(), ifname="é" * 8)
    assert (outcome.status, outcome.stdout) == (0, ""), outcome
    assert daemon.only_request("Release")["attachment"]["ifname"] == "é" * 8
    run_plugin("DEL", daemon.conf(), ifname="é" * 16).error(4)


def test_long_container_id_says_why(daemon: FakeDaemon) -> None:
    assert run_plugin("ADD", daemon.conf(), container_id="c" * 255).status == 0
    error = run_plugin("ADD", daemon.conf(), container_id="c" * 256).error(4)
    assert "CNI_CONTAINERID" in error["msg"]
    assert "256" in error["msg"] and "255" in error["msg"], error


def test_bad_character_in_container_id_is_named() -> None:
    error = run_plugin("ADD", netconf(), container_id="abc def").error(4)
    assert "' '" in error["msg"] + error.get("details", ""), error


@pytest.mark.parametrize(
    ("where", "what"),
    [
        ({"runtimeConfig": {"ips": ["10.77.0.74/33"]}}, "runtimeConfig.ips"),
        ({"runtimeConfig": {"ips": ["fd00::74/129"]}}, "runtimeConfig.ips"),
        ({"args": {"cni": {"ips": ["10.77.0.74/"]}}}, "args.cni.ips"),
        ({"args": {"cni": {"ips": ["10.77.0.74/-1"]}}}, "args.cni.ips"),
        ({"cni_args": "IP=10.77.0.74/x"}, "CNI_ARGS IP"),
        ({"cni_args": "IP=10.77.0.74/²"}, "CNI_ARGS IP"),
        ({"cni_args": "IP=10.77.0.74/" + "1" * 5000}, "CNI_ARGS IP"),
        ({"runtimeConfig": {"ips": ["::ffff:10.77.0.74/95"]}}, "runtimeConfig.ips"),
    ],
)
def test_requested_ip_with_bad_prefix_is_7(where: Json, what: str) -> None:
    conf = netconf()
    cni_args = where.pop("cni_args", None)
    conf.update(where)
    error = run_plugin("ADD", conf, cni_args=cni_args).error(7)
    assert what in error["msg"], error
    assert "prefix" in error["msg"] + error.get("details", ""), error


@pytest.mark.parametrize(
    ("route", "fragments"),
    [
        ({"dst": "10.0.0.0/8", "mtu": "x"}, ["ipam.routes[0].mtu", '"x"']),
        ({"dst": "10.0.0.0/8", "mtu": -1}, ["ipam.routes[0].mtu", "-1"]),
        ({"dst": "10.0.0.0/8", "mtu": 1400.5}, ["ipam.routes[0].mtu", "1400.5"]),
        ({"dst": "10.0.0.0/8", "mtu": True}, ["ipam.routes[0].mtu", "true"]),
        ({"dst": "10.0.0.0/8", "advmss": "1360"}, ["ipam.routes[0].advmss", '"1360"']),
        ({"dst": "10.0.0.0/8", "priority": [1]}, ["ipam.routes[0].priority", "[1]"]),
        ({"dst": "10.0.0.0/8", "table": "main"}, ["ipam.routes[0].table", '"main"']),
        ({"dst": "10.0.0.0/8", "table": 2**32}, ["ipam.routes[0].table", str(2**32)]),
        ({"dst": "10.0.0.0/8", "scope": 256}, ["ipam.routes[0].scope", "256"]),
        ({"dst": "10.0.0.0/8", "gw": "not-an-ip"}, ["ipam.routes[0].gw", "not-an-ip"]),
        ({"dst": 10}, ["ipam.routes[0].dst", "10"]),
        ({"dst": "10.0.0.0/²"}, ["ipam.routes[0].dst", "10.0.0.0/"]),
        ({"dst": "10.0.0.0/" + "1" * 5000}, ["ipam.routes[0].dst"]),
        ("0.0.0.0/0", ["ipam.routes[0]", "0.0.0.0/0"]),
    ],
)
def test_bad_route_is_7_naming_field_and_value(route: Any, fragments: list[str]) -> None:
    error = run_plugin("ADD", netconf(routes=[route])).error(7)
    for fragment in fragments:
        assert fragment in error["msg"], error


@pytest.mark.parametrize(
    ("dns", "fragments"),
    [
        ({"nameservers": ["not-an-ip"]}, ["ipam.dns.nameservers", "not-an-ip"]),
        ({"nameservers": ["10.96.0.10", 5]}, ["ipam.dns.nameservers"]),
        ({"domain": 5}, ["ipam.dns.domain", "5"]),
        ({"search": "cluster.local"}, ["ipam.dns.search", "cluster.local"]),
        ({"options": [1]}, ["ipam.dns.options", "[1]"]),
        ([], ["ipam.dns", "[]"]),
    ],
)
def test_bad_dns_is_7_naming_field_and_value(dns: Any, fragments: list[str]) -> None:
    error = run_plugin("ADD", netconf(dns=dns)).error(7)
    for fragment in fragments:
        assert fragment in error["msg"], error


@pytest.mark.parametrize(
    ("ipam", "fragments"),
    [
        ({"routes": [{"dst": "0.0.0.0/0", "gateway": "10.0.0.1"}]},
         ["ipam.routes[0].gateway", '"10.0.0.1"']),
        ({"dns": {"nameserver": ["10.96.0.10"]}}, ["ipam.dns.nameserver", '["10.96.0.10"]']),
    ],
)
def test_unknown_route_or_dns_key_is_2(ipam: Json, fragments: list[str]) -> None:
    error = run_plugin("ADD", netconf(**ipam)).error(2)
    for fragment in fragments:
        assert fragment in error["msg"], error


# --- daemon unreachable -----------------------------------------------------


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC"])
def test_missing_daemon_socket_is_11(command: str, tmp_path: Path) -> None:
    conf = netconf(socket_path=str(tmp_path / "absent.sock"))
    conf["cni.dev/valid-attachments"] = []
    error = run_plugin(command, conf).error(11)
    assert str(tmp_path / "absent.sock.cni") in error["msg"]
    assert error["cniVersion"] == "1.1.0"


def test_refused_connection_is_11(tmp_path: Path) -> None:
    grpc_socket = str(tmp_path / "d.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(wire.cni_socket_path(grpc_socket))  # a socket file nobody listens on
    try:
        error = run_plugin("ADD", netconf(socket_path=grpc_socket)).error(11)
    finally:
        dead.close()
    assert "unreachable" in error["msg"]


def test_daemon_not_answering_in_time_is_11(daemon: FakeDaemon) -> None:
    daemon.hang.set()
    error = run_plugin("ADD", daemon.conf(timeout=0.3)).error(11)
    assert "did not answer Allocate within 0.3s" in error["msg"]


def test_status_with_daemon_unreachable_is_50(tmp_path: Path) -> None:
    error = run_plugin("STATUS", netconf(socket_path=str(tmp_path / "absent.sock")),
                       container_id=None, ifname=None).error(50)
    assert "unreachable" in error["msg"] and "absent.sock.cni" in error["msg"]


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
