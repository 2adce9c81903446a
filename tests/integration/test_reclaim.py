"""Empty blocks reclaimed: a new node under strictAffinity takes an empty block of another.

Real etcd and two real daemons: node a's warm reserve has claimed every
block of a small pool; node b, with none to claim and borrowing forbidden,
takes one of a's empty blocks in one guarded transaction. a sees it leave
through its watch and never allocates from it; ``ipam check`` is clean.
"""

from __future__ import annotations

import ipaddress
import time

from tests.daemons import NodeDaemons, cni, ctl
from topoipam.client.rpc import scrape
from topoipam.daemon.local_etcd import free_port


def blocks_of(ctl_env: dict[str, str]) -> dict[str, str]:
    """Each block's affinity, from ``ipam show --show-blocks``."""
    done = ctl(ctl_env, "ipam", "show", "--show-blocks")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["BLOCK"])
    return {row[0]: row[2] for row in (line.split() for line in lines[start + 1:]) if row}


def test_a_new_node_reclaims_an_empty_block_of_another_under_strict_affinity(
        node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> None:
    assert ctl(ctl_env, "create", "ippool", "small", "--cidr", "10.70.0.0/26", "--block-size",
               "28").returncode == 0
    assert ctl(ctl_env, "ipam", "configure", "--strictaffinity", "true", "--warm-addresses",
               "60", "--ip-cooldown-seconds", "0").returncode == 0
    a = node_daemons.start("a")
    deadline = time.monotonic() + 10  # a's warm reserve claims all four blocks first
    while len(blocks_of(ctl_env)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(blocks_of(ctl_env).values()) == {"a"}, a.log()
    b_port = free_port()
    b = node_daemons.start("b", ["--metrics-address", f"127.0.0.1:{b_port}"])
    config = {"cniVersion": "1.0.0", "name": "reclaim",
              "ipam": {"type": "topoipam", "socket": b.socket}}
    code, result, err = cni("ADD", config, container="pod-b")
    assert code == 0, (result, err, b.log())
    assert result is not None
    address = ipaddress.ip_interface(result["ips"][0]["address"]).ip
    owners = blocks_of(ctl_env)
    taken = [cidr for cidr, node in owners.items() if node == "b"]
    assert len(taken) == 1 and address in ipaddress.ip_network(taken[0]), owners
    assert scrape(f"http://127.0.0.1:{b_port}/metrics")[
        'topoipam_block_claims_total{path="reclaim"}'] == 1

    # a never hands out an address of the block it lost.
    config_a = {**config, "ipam": {"type": "topoipam", "socket": a.socket}}
    for i in range(12):
        code, result, err = cni("ADD", config_a, container=f"pod-a{i}")
        assert code == 0, (result, err, a.log())
        assert result is not None
        got = ipaddress.ip_interface(result["ips"][0]["address"]).ip
        assert got not in ipaddress.ip_network(taken[0])
    check = ctl(ctl_env, "ipam", "check")
    assert check.returncode == 0, check.stdout
