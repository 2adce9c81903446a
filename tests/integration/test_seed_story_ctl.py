"""The seed's story (README.md#the-seeds-story-with-topoipamctl, steps 1-4 and 8, plus 5
and 7) through the real `topoipamctl`.

Every operator step is a subprocess of the installed executable; the
workloads are allocated through the library, the way the daemon does it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemons import rack_pools_manifest
from topoipam.daemon.core.holdings import Attachment
from topoipam.daemon.engine import AllocationEngine, AllocationRequest
from topoipam.daemon.store import EtcdStore

TOPOIPAMCTL = str(Path(sys.executable).parent / "topoipamctl")

RACK_POOLS = rack_pools_manifest("rack-{rack}")


@pytest.mark.asyncio
async def test_seed_story_with_topoipamctl(
    store: EtcdStore, ctl_env: dict[str, str], tmp_path: Path
) -> None:
    async def topoipamctl(*args: str, expect: int = 0) -> str:
        result = await asyncio.to_thread(
            subprocess.run, [TOPOIPAMCTL, *args], capture_output=True, text=True,
            env=ctl_env, timeout=60, check=False,
        )
        assert result.returncode == expect, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result.stdout

    def wide_rows(output: str) -> dict[str, list[str]]:
        lines = output.splitlines()
        assert lines[0].split() == ["NAME", "CIDR", "BLOCKSIZE", "SELECTOR", "PRIORITY",
                                    "DISABLED", "ASSIGNMENTMODE", "GATEWAY", "IN-USE", "TOTAL"]
        return {line.split()[0]: line.split() for line in lines[1:]}

    # 1. The default pool, listed by `get ippool -o wide`.
    await topoipamctl("create", "ippool", "default-ipv4-ippool", "--cidr", "192.168.0.0/16")
    assert wide_rows(await topoipamctl("get", "ippool", "-o", "wide")) == {
        "default-ipv4-ippool": ["default-ipv4-ippool", "192.168.0.0/16", "26", "all()",
                                "0", "false", "Automatic", "192.168.0.1", "0", "65533"],
    }

    # 2. The operator deletes it.
    assert await topoipamctl("delete", "ippool", "default-ipv4-ippool") == (
        "ippool/default-ipv4-ippool deleted\n")
    assert wide_rows(await topoipamctl("get", "ippool", "-o", "wide")) == {}

    # 3. Label the nodes by rack.
    for i, rack in enumerate(["0", "0", "1", "1"]):
        assert await topoipamctl("label", "nodes", f"node-{i}", f"rack={rack}", "--create") == (
            f"node/node-{i} labeled\n")

    # 4. One pool per rack from a manifest.
    manifest = tmp_path / "racks.yaml"
    manifest.write_text(RACK_POOLS)
    assert await topoipamctl("apply", "-f", str(manifest)) == (
        "ippool/rack-0 created\nippool/rack-1 created\n")
    assert wide_rows(await topoipamctl("get", "ippool", "-o", "wide")) == {
        "rack-0": ["rack-0", "192.168.0.0/24", "26", "rack", "==", '"0"', "0", "false", "Automatic",
                   "192.168.0.1", "0", "253"],
        "rack-1": ["rack-1", "192.168.1.0/24", "26", "rack", "==", '"1"', "0", "false", "Automatic",
                   "192.168.1.1", "0", "253"],
    }
    assert "check coverage: OK (4 nodes, 2 pools)" in await topoipamctl("check", "coverage")

    # 5. Five workloads across both racks land in their rack's /24.
    racks = {f"node-{i}": ipaddress.ip_network(f"192.168.{i // 2}.0/24") for i in range(4)}
    placed: dict[str, tuple[str, str]] = {}
    for i, node in enumerate(["node-0", "node-1", "node-2", "node-3", "node-0"]):
        allocation = await AllocationEngine(store, node).allocate(AllocationRequest(
            Attachment("k8s-pod-network", f"c{i}", "eth0"),
            attributes={"namespace": "default", "pod": f"nginx-{i}"},
        ))
        [address] = allocation.addresses
        assert address.ip in racks[node], (node, address.ip)
        placed[str(address.ip)] = (node, f"nginx-{i}")
    allocations = json.loads(await topoipamctl("get", "allocations", "-o", "json"))
    assert {a["ip"]: (a["node"], a["pod"]) for a in allocations} == placed
    assert {a["namespace"] for a in allocations} == {"default"}
    in_use = wide_rows(await topoipamctl("get", "ippool", "-o", "wide"))
    assert (in_use["rack-0"][-2], in_use["rack-1"][-2]) == ("3", "2")

    # 8. A fifth node in a rack without a pool: coverage names it.
    await topoipamctl("label", "nodes", "node-4", "rack=2", "--create")
    coverage = await topoipamctl("check", "coverage", expect=1)
    assert coverage.splitlines() == [
        "uncovered node: no enabled IPv4 pool selects node node-4 (labels {rack=2}; pools "
        "considered: rack-0, rack-1)",
        "check coverage: 1 problem(s) found (1 of 5 node(s) not selected by any enabled "
        "Automatic pool; 2 pools)",
    ]

    # 7. node-0 moves to rack 1: its earlier addresses stay, and placement lists them.
    await topoipamctl("label", "nodes", "node-0", "rack=1", expect=1)
    await topoipamctl("label", "nodes", "node-0", "rack=1", "--overwrite")
    placement = await topoipamctl("check", "placement")
    node_0_addresses = sorted(ip for ip, (node, _) in placed.items() if node == "node-0")
    listed = [line.split() for line in placement.splitlines()[1:-1]]
    assert [(row[0], row[1], row[2]) for row in listed] == [
        (ip, "node-0", "rack-0") for ip in node_0_addresses]
    assert all(f"default/{placed[row[0]][1]}" == row[4] for row in listed)
    assert placement.splitlines()[-1] == (
        "check placement: 2 of 5 allocation(s) outside their node's pools")
    await topoipamctl("check", "placement", "--fail-on-found", expect=1)
    assert "ipam check: OK (4 blocks, 5 handles, 5 addresses)" in await topoipamctl(
        "ipam", "check")
