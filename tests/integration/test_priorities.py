"""Pool priorities with real daemons: a rack pool serves until spent, then the zone pool.

Real etcd, a real ``topoipamd``, the installed plugin exec'd as a runtime
does, and ``topoipamctl`` for the pools, the report and the audit.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.daemons import NodeDaemons, cni, ctl
from topoipam.client.rpc import scrape
from topoipam.daemon.local_etcd import free_port

TIERS = """\
apiVersion: topoipam/v1
kind: IPPool
metadata: {name: rack-0}
spec: {cidr: 10.60.0.0/28, blockSize: 28, nodeSelector: rack == "0", priority: 10}
---
apiVersion: topoipam/v1
kind: IPPool
metadata: {name: zone-a}
spec: {cidr: 10.61.0.0/24, blockSize: 28, nodeSelector: zone == "a"}
---
apiVersion: topoipam/v1
kind: IPAMConfig
metadata: {name: default}
spec: {strictAffinity: true}
"""


def test_a_rack_pool_serves_until_spent_then_the_zone_pool(
        node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> None:
    assert ctl(ctl_env, "apply", "-f", "-", input=TIERS).returncode == 0
    assert ctl(ctl_env, "label", "nodes", "n0", "rack=0", "zone=a", "--create").returncode == 0
    port = free_port()
    daemon = node_daemons.start("n0", ["--metrics-address", f"127.0.0.1:{port}"])
    config = {"cniVersion": "1.0.0", "name": "tiers",
              "ipam": {"type": "topoipam", "socket": daemon.socket}}
    pools = []
    for i in range(20):
        code, result, err = cni("ADD", config, container=f"pod-{i}")
        assert code == 0, (i, result, err, daemon.log())
        assert result is not None
        address = result["ips"][0]["address"].split("/")[0]
        pools.append("rack-0" if address.startswith("10.60.") else "zone-a")
    # 10.60.0.0/28 holds 13 pod addresses (network, gateway and broadcast aside).
    assert pools == ["rack-0"] * 13 + ["zone-a"] * 7
    metrics = scrape(f"http://127.0.0.1:{port}/metrics")
    assert metrics['topoipam_pool_fallbacks_total{from_pool="rack-0",to_pool="zone-a"}'] == 7

    # A rack address freed: the next pod is served by the rack pool again.
    assert cni("DEL", config, container="pod-3")[0] == 0
    code, result, _ = cni("ADD", config, container="pod-20")
    assert code == 0 and result is not None
    assert result["ips"][0]["address"].startswith("10.60.0.")

    explain = ctl(ctl_env, "explain", "node", "n0")
    assert explain.returncode == 0, explain.stderr
    assert "IPv4 allocation order, 2 priority tiers" in explain.stdout
    assert "tier 1, priority 10: rack-0" in explain.stdout
    assert "tier 2, priority 0: zone-a" in explain.stdout
    wide = ctl(ctl_env, "get", "ippool", "-o", "wide").stdout.splitlines()
    column = wide[0].split().index("PRIORITY")
    assert {line.split()[0]: line.split()[column + 2] for line in wide[1:]} == {
        "rack-0": "10", "zone-a": "0"}  # the selector takes three columns
    check = ctl(ctl_env, "ipam", "check")
    assert check.returncode == 0, check.stdout


def test_a_bad_priority_is_one_line_and_nothing_is_written(
        ctl_env: dict[str, str], tmp_path: Path) -> None:
    for value, bound in (('"high"', "not the text 'high'"), ("2000", "from -1000 to 1000"),
                         ("1.5", "must be an integer")):
        manifest = tmp_path / "bad.yaml"
        manifest.write_text(TIERS.replace("priority: 10", f"priority: {value}"))
        done = ctl(ctl_env, "apply", "-f", str(manifest))
        assert done.returncode != 0 and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "priority" in done.stderr and bound in done.stderr, done.stderr
        listed = json.loads(ctl(ctl_env, "get", "ippool", "-o", "json").stdout)
        assert listed["items"] == [], "nothing written"
    done = ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.0.0.0/24", "--priority", "x")
    assert done.returncode != 0 and "--priority" in done.stderr
