"""Property tests: arbitrary input to the plugin and the CLI gives one clear error."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.installed_plugin import PLUGIN
from topoipam.client import manifests
from topoipam.daemon.core.errors import TopoipamError

TOPOIPAM = str(PLUGIN)

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(
    max_size=20)
_json = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
# Configs that look like CNI network configs, with arbitrary values where it hurts.
_ipam = st.fixed_dictionaries({"type": st.just("topoipam")}, optional={
    "socket": st.text(max_size=30) | _json_scalars,
    "ipv4_pools": _json, "assign_ipv4": _json_scalars, "assign_ipv6": _json_scalars,
    "prefix": _json_scalars, "gateway": _json, "routes": _json, "dns": _json,
    "timeout": _json_scalars, "ips": _json,
})
_config = st.fixed_dictionaries(
    {"cniVersion": st.sampled_from(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "9.9.9", ""]),
     "name": st.text(max_size=12)},
    optional={"ipam": _ipam | _json, "runtimeConfig": _json, "args": _json,
              "prevResult": _json, "cni.dev/valid-attachments": _json},
)
_env_value = st.text(alphabet=st.characters(blacklist_characters="\x00",
                                            blacklist_categories=("Cs",)), max_size=30)


def run_plugin(stdin: bytes, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    return subprocess.run([TOPOIPAM], input=stdin, env={**base, **env}, capture_output=True,
                          timeout=30)


def assert_cni_error_or_success(done: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in done.stdout + done.stderr
    if done.returncode == 0:
        return
    assert done.returncode == 1
    error: Any = json.loads(done.stdout)
    assert isinstance(error, dict)
    assert isinstance(error["code"], int) and isinstance(error["msg"], str) and error["msg"]
    assert "\n" not in error["msg"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=_config, command=st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS",
                                                "VERSION", "BOGUS", ""]),
       container=_env_value, ifname=_env_value, args=_env_value)
def test_arbitrary_config_and_env_give_cni_errors(
    config: dict[str, Any], command: str, container: str, ifname: str, args: str
) -> None:
    # The socket never exists: every path ends in a CNI error (or VERSION's answer).
    if isinstance(config.get("ipam"), dict) and "socket" not in config["ipam"]:
        config["ipam"]["socket"] = "/nonexistent/topoipam/topoipamd.sock"
    done = run_plugin(json.dumps(config).encode(), {
        "CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_IFNAME": ifname,
        "CNI_ARGS": args, "CNI_NETNS": "/var/run/netns/none", "CNI_PATH": "/opt/cni/bin",
    })
    assert_cni_error_or_success(done)
    if command != "VERSION":
        assert done.returncode == 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stdin=st.binary(max_size=200))
def test_arbitrary_stdin_bytes_give_cni_errors(stdin: bytes) -> None:
    done = run_plugin(stdin, {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0",
                              "CNI_NETNS": "/var/run/netns/none", "CNI_PATH": "/opt/cni/bin"})
    assert_cni_error_or_success(done)
    assert done.returncode == 1


_manifest_docs = st.fixed_dictionaries(
    {"apiVersion": st.sampled_from(["topoipam/v1", "projectcalico.org/v3", "v9", ""]),
     "kind": st.sampled_from(["IPPool", "Node", "IPAMConfig", "IPReservation", "Pod", ""])},
    optional={"metadata": _json | st.fixed_dictionaries({"name": _json_scalars}),
              "spec": _json | st.fixed_dictionaries({}, optional={
                  "cidr": _json_scalars, "blockSize": _json_scalars,
                  "nodeSelector": _json_scalars, "labels": _json, "cidrs": _json})},
)


@settings(max_examples=200, deadline=None)
@given(documents=st.lists(_manifest_docs | _json, min_size=1, max_size=3),
       as_yaml=st.booleans())
def test_arbitrary_manifests_parse_or_give_one_clear_line(documents: list[Any],
                                                          as_yaml: bool) -> None:
    text = (yaml.safe_dump_all(documents) if as_yaml else json.dumps(documents))
    try:
        manifests.load(text, "fuzz.yaml")
    except TopoipamError as exc:
        message = str(exc)
        assert message and "\n" not in message


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_arbitrary_manifest_text_parses_or_gives_one_clear_line(text: str) -> None:
    try:
        manifests.load(text, "fuzz.yaml")
    except TopoipamError as exc:
        assert str(exc) and "\n" not in str(exc)


# Any bytes but NUL, as a runtime may put them in the environment.
_env_bytes = st.binary(max_size=30).map(lambda b: b.replace(b"\x00", b""))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=st.sampled_from([b"ADD", b"DEL", b"CHECK"]), container=_env_bytes,
       ifname=_env_bytes, args=_env_bytes)
def test_arbitrary_environment_bytes_give_cni_errors_not_999(
    command: bytes, container: bytes, ifname: bytes, args: bytes
) -> None:
    config = {"cniVersion": "1.1.0", "name": "net",
              "ipam": {"type": "topoipam", "socket": "/nonexistent/topoipam/topoipamd.sock"}}
    base = {k: v for k, v in os.environb.items() if not k.startswith(b"CNI_")}
    done = subprocess.run([TOPOIPAM], input=json.dumps(config).encode(), capture_output=True,
                          timeout=30, env={**base, b"CNI_COMMAND": command,
                                           b"CNI_CONTAINERID": container, b"CNI_IFNAME": ifname,
                                           b"CNI_ARGS": args, b"CNI_NETNS": b"/var/run/netns/x",
                                           b"CNI_PATH": b"/opt/cni/bin"})
    assert_cni_error_or_success(done)
    assert done.returncode == 1
    # Bad environment is 4; a good one reaches the (absent) daemon: 11.
    assert json.loads(done.stdout)["code"] in (4, 11), done.stdout
