"""The ``topoipam`` CNI plugin refusing bad input before any daemon call, and failing
cleanly when its daemon cannot be reached: each a CNI error code and one message that
names what is wrong (exec'd the way runtimes exec it)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from tests.client.plugin_exec import FakeDaemon, Json, netconf, run_plugin
from topoipam.proto import cniwire as wire

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
