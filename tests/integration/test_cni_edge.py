"""Correct at the pod's edge: the `topoipam` plugin exec'd against a real daemon and etcd.

One test per defect found by running the plugin as a runtime would: gateways
handed to pods, dotted names sharing a handle, a repeated ADD after its pool
changed, and a STATUS that said ready when no ADD could succeed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EtcdServer
from tests.daemons import DaemonProcess, cni, ctl
from topoipam.daemon.core.holdings import (
    Attachment,
    Block,
    Handle,
    HandleAddress,
)
from topoipam.daemon.core.writes import (
    DeleteHandle,
    PutBlock,
    PutHandle,
)
from topoipam.daemon.store import EtcdOptions, EtcdStore


@pytest.fixture
def daemon(etcd: EtcdServer, prefix: str, tmp_path: Path) -> Iterator[DaemonProcess]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o750)
    started = DaemonProcess("edge-node", str(run_dir / "topoipamd.sock"), etcd.endpoint, prefix,
                            str(tmp_path / "daemon.log")).start()
    try:
        yield started
    finally:
        started.stop()


def run(ctl_env: dict[str, str], *args: str, input: str | None = None) -> str:
    done = ctl(ctl_env, *args, input=input)
    assert done.returncode == 0, f"topoipamctl {' '.join(args)}: {done.stderr}"
    return done.stdout


def conf(daemon: DaemonProcess, name: str = "edge", **ipam: Any) -> dict[str, Any]:
    return {"cniVersion": "1.1.0", "name": name,
            "ipam": {"type": "topoipam", "socket": daemon.socket, **ipam}}


def add(daemon: DaemonProcess, container: str, name: str = "edge", args: str = "",
        **ipam: Any) -> dict[str, Any]:
    code, result, err = cni("ADD", conf(daemon, name, **ipam), container=container, args=args)
    assert code == 0, f"{result} {err}\n{daemon.log()}"
    assert result is not None
    return result


def error(command: str, config: dict[str, Any], container: str = "c", args: str = ""
          ) -> dict[str, Any]:
    code, result, err = cni(command, config, container=container, args=args)
    assert code == 1 and result is not None, (code, result, err)
    assert "Traceback" not in err
    return result


# ---------------------------------------------------------------------------- gateways


def test_first_pod_of_a_fresh_pool_does_not_get_the_gateway(
        daemon: DaemonProcess, ctl_env: dict[str, str]) -> None:
    run(ctl_env, "create", "ippool", "fresh", "--cidr", "192.168.0.0/24")
    [ip] = add(daemon, "first")["ips"]
    assert ip == {"address": "192.168.0.2/24", "gateway": "192.168.0.1"}
    # Asking for it by address is refused too, and says why.
    result = error("ADD", conf(daemon), container="wants-gw", args="IP=192.168.0.1")
    assert result["code"] == 112 and "gateway of pool fresh" in result["msg"]


def test_configured_gateways_are_never_handed_out(
        daemon: DaemonProcess, ctl_env: dict[str, str]) -> None:
    run(ctl_env, "create", "ippool", "v4", "--cidr", "10.251.0.0/29", "--block-size", "29",
        "--gateway", "none")
    run(ctl_env, "create", "ippool", "v6", "--cidr", "fd00:251::/125", "--block-size", "125",
        "--gateway", "none")
    gateways = ["10.251.0.1", "fd00:251::1"]
    given = set()
    for i in range(5):  # every usable address of the /29 but the configured gateway
        result = add(daemon, f"c{i}", gateway=gateways, assign_ipv6=True)
        for ip in result["ips"]:
            assert ip["gateway"] in gateways
            given.add(ip["address"].split("/")[0])
    assert not given & set(gateways)
    assert error("ADD", conf(daemon, gateway=gateways), container="c9")["code"] == 111


def test_routed_pool_without_gateway_reports_none(
        daemon: DaemonProcess, ctl_env: dict[str, str]) -> None:
    run(ctl_env, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "topoipam/v1", "kind": "IPPool", "metadata": {"name": "routed"},
        "spec": {"cidr": "10.60.0.0/24", "gateway": "none"}}))
    [ip] = add(daemon, "r1", prefix="host")["ips"]
    assert ip == {"address": "10.60.0.1/32"}
    assert "GATEWAY" in run(ctl_env, "get", "ippool", "-o", "wide")


def test_ipam_check_reports_an_allocation_that_holds_its_pools_gateway(
        daemon: DaemonProcess, ctl_env: dict[str, str]) -> None:
    run(ctl_env, "create", "ippool", "old", "--cidr", "10.62.0.0/24", "--gateway", "none")
    assert add(daemon, "legacy-gw")["ips"][0]["address"] == "10.62.0.1/24"
    # The pool gets its default gateway back: the address a pod already holds.
    run(ctl_env, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "topoipam/v1", "kind": "IPPool", "metadata": {"name": "old"},
        "spec": {"cidr": "10.62.0.0/24"}}))
    done = ctl(ctl_env, "ipam", "check")
    assert done.returncode == 1
    assert "gateway allocated: 10.62.0.1 is the gateway of pool old" in done.stdout


# ---------------------------------------------------------------------------- attachments


def test_dotted_names_never_share_a_handle(daemon: DaemonProcess, ctl_env: dict[str, str]
                                           ) -> None:
    run(ctl_env, "create", "ippool", "dots", "--cidr", "10.77.0.0/24")
    first = add(daemon, "b.c", name="a")["ips"][0]["address"]
    second = add(daemon, "c", name="a.b")["ips"][0]["address"]
    assert first != second
    code, _, err = cni("DEL", conf(daemon, "a.b"), container="c")
    assert code == 0, err
    code, result, err = cni("CHECK", {**conf(daemon, "a"), "prevResult": {
        "cniVersion": "1.1.0", "ips": [{"address": first}]}}, container="b.c")
    assert code == 0, (result, err)


@pytest.mark.asyncio
async def test_handles_written_with_dotted_ids_are_still_found(
        daemon: DaemonProcess, etcd: EtcdServer, prefix: str, ctl_env: dict[str, str]) -> None:
    run(ctl_env, "create", "ippool", "legacy", "--cidr", "10.78.0.0/24")
    address = add(daemon, "seed")["ips"][0]["address"].split("/")[0]
    # Rewrite that allocation the way 0.1 stored it: a dotted handle id.
    async with EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,)), prefix) as store:
        new_id = Attachment("edge", "seed", "eth0").handle_id
        current = await store.get_handle(new_id)
        assert current is not None
        [block] = [b for b in await store.list_blocks() if b.value.allocations]
        legacy_id = "edge.old-pod.eth0"
        moved: Block = block.value.copy()
        moved.allocations = {o: legacy_id for o in moved.allocations}
        legacy = Handle(legacy_id, "edge-node", (HandleAddress(
            current.value.addresses[0].ip, current.value.addresses[0].block),),
            {"network": "edge", "container_id": "old-pod", "ifname": "eth0"})
        assert (await store.commit([PutBlock(moved, block.mod_revision), PutHandle(legacy, 0),
                                    DeleteHandle(new_id, current.mod_revision)])).succeeded
    check = {**conf(daemon), "prevResult": {"cniVersion": "1.1.0",
                                            "ips": [{"address": f"{address}/24"}]}}
    code, result, err = cni("CHECK", check, container="old-pod")
    assert code == 0, (result, err)
    # GC keeps it while it is valid, and DEL releases it.
    gc = {**conf(daemon), "cni.dev/valid-attachments": [
        {"containerID": "old-pod", "ifname": "eth0"}]}
    assert cni("GC", gc)[0] == 0
    assert [a["ip"] for a in json.loads(run(ctl_env, "get", "allocations", "-o", "json"))] == [
        address]
    assert cni("DEL", conf(daemon), container="old-pod")[0] == 0
    assert json.loads(run(ctl_env, "get", "allocations", "-o", "json")) == []
    assert "ipam check: OK" in run(ctl_env, "ipam", "check")


# ---------------------------------------------------------------------------- repeated ADD


@pytest.mark.parametrize("change", ["disable", "delete"])
def test_repeated_add_returns_what_the_attachment_holds_whatever_happened_to_its_pool(
        change: str, daemon: DaemonProcess, ctl_env: dict[str, str]) -> None:
    run(ctl_env, "create", "ippool", "idem", "--cidr", "10.61.0.0/24", "--block-size", "28")
    first = add(daemon, "held", ipv4_pools=["idem"])
    assert first["ips"] == [{"address": "10.61.0.2/24", "gateway": "10.61.0.1"}]
    if change == "disable":
        run(ctl_env, "apply", "-f", "-", input=json.dumps({
            "apiVersion": "topoipam/v1", "kind": "IPPool", "metadata": {"name": "idem"},
            "spec": {"cidr": "10.61.0.0/24", "blockSize": 28, "disabled": True}}))
    else:
        run(ctl_env, "delete", "ippool", "idem", "--force")
    # The same prefix (/24, not the /28 block) and gateway as the first ADD reported.
    assert add(daemon, "held", ipv4_pools=["idem"]) == first
    assert add(daemon, "held") == first  # without the named pools: the same prefix too


def test_repeated_add_asking_for_another_address_is_an_error(
        daemon: DaemonProcess, ctl_env: dict[str, str]) -> None:
    run(ctl_env, "create", "ippool", "spec", "--cidr", "10.63.0.0/24")
    assert add(daemon, "pinned", args="IP=10.63.0.74")["ips"][0]["address"] == "10.63.0.74/24"
    assert add(daemon, "pinned", args="IP=10.63.0.74")["ips"][0]["address"] == "10.63.0.74/24"
    result = error("ADD", conf(daemon), container="pinned", args="IP=10.63.0.75")
    assert result["code"] == 112
    assert "already holds 10.63.0.74" in result["msg"] and "10.63.0.75" in result["msg"]
    allocated = json.loads(run(ctl_env, "get", "allocations", "-o", "json"))
    assert [a["ip"] for a in allocated] == ["10.63.0.74"]


# ---------------------------------------------------------------------------- STATUS


def status(daemon: DaemonProcess, **ipam: Any) -> tuple[int, dict[str, Any] | None]:
    code, result, err = cni("STATUS", conf(daemon, **ipam), container="")
    assert "Traceback" not in err
    return code, result


def test_status_fails_when_no_add_can_succeed_and_recovers(
        daemon: DaemonProcess, ctl_env: dict[str, str]) -> None:
    code, result = status(daemon)
    assert code == 1 and result is not None and result["code"] == 50
    assert "no enabled IPv4 pool" in result["msg"] or "no IP pool" in result["msg"]

    run(ctl_env, "create", "ippool", "only", "--cidr", "10.64.0.0/30", "--block-size", "30")
    assert status(daemon) == (0, None)

    # Only pool disabled.
    run(ctl_env, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "topoipam/v1", "kind": "IPPool", "metadata": {"name": "only"},
        "spec": {"cidr": "10.64.0.0/30", "blockSize": 30, "disabled": True}}))
    wait_status(daemon, 1, "no enabled IPv4 pool selects node edge-node")
    named = status(daemon, ipv4_pools=["only"])[1]
    assert named is not None and "only is disabled" in named["msg"]

    # No pool selects the node. A Manual pool is no candidate, and is named as such.
    run(ctl_env, "create", "ippool", "hand", "--cidr", "10.65.0.0/24", "--assignment-mode",
        "Manual")
    run(ctl_env, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "topoipam/v1", "kind": "IPPool", "metadata": {"name": "only"},
        "spec": {"cidr": "10.64.0.0/30", "blockSize": 30, "nodeSelector": "rack == '9'"}}))
    wait_status(daemon, 1, "pools considered: only; Manual pools, used only when named: hand)")
    run(ctl_env, "label", "nodes", "edge-node", "rack=9")
    wait_status(daemon, 0)

    # Exhausted: the /30 has one usable address.
    add(daemon, "the-one")
    wait_status(daemon, 1, "no free IPv4 address")
    assert error("ADD", conf(daemon), container="another")["code"] == 111
    assert cni("DEL", conf(daemon), container="the-one")[0] == 0
    wait_status(daemon, 0)


def wait_status(daemon: DaemonProcess, expected: int, fragment: str = "") -> None:
    """STATUS follows a pool or label change within a second (the daemon's watches)."""
    deadline = time.monotonic() + 2
    while True:
        code, result = status(daemon)
        if code == expected and (not fragment or (result and fragment in result["msg"])):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"STATUS {code} {result}, expected {expected} {fragment!r}")
        time.sleep(0.05)


@pytest.mark.slow
def test_gc_of_twenty_thousand_attachments_on_a_real_daemon(
        daemon: DaemonProcess, ctl_env: dict[str, str]) -> None:
    # ~9,000 valid attachments used to overflow the 1 MiB frame (the runtime
    # lists every live container of the node, with 64-character IDs).
    run(ctl_env, "create", "ippool", "gc", "--cidr", "10.88.0.0/24")
    live, gone = f"{1:064x}", f"{20_001:064x}"
    for container in (live, gone):
        add(daemon, container)
    gc_conf = {**conf(daemon), "cni.dev/valid-attachments": [
        {"containerID": f"{n:064x}", "ifname": "eth0"} for n in range(20_000)]}
    assert len(json.dumps(gc_conf)) > 1 << 20  # the old frame limit
    code, result, err = cni("GC", gc_conf, timeout=60)
    assert (code, result) == (0, None), (result, err, daemon.log())
    held = {a["container_id"] for a in json.loads(run(ctl_env, "get", "allocations", "-o",
                                                      "json"))}
    assert held == {live}
