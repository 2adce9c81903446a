"""The benchmarks are not run in CI (they print ratios, they do not assert), but
each must still start: a refactor that breaks one's imports fails here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")
                                          if p.name not in ("common.py", "clients.py",
                                                            "helper_servers.py")))
def test_benchmark_starts(script: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_scale_data_set_keeps_every_block_in_the_pool_of_its_node(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """More nodes than 5 racks of /14 hold get more racks, not blocks beyond their
    pools (which would overlap other racks' pools and overwrite their blocks)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import scale

    from topoipam.daemon.core.keys import KeySchema

    racks = scale.racks_for(6000, 4, 10)
    assert racks == 6 and scale.racks_for(5000, 4, 10) == 5
    data = scale.DataSet("/t/v1", 6000, 4, 1, racks)
    keys = KeySchema("/t/v1")
    pools = {p.name: p for p in data.pools()}
    blocks: list[tuple[bytes, bytes]] = []
    racks_of: dict[str, str] = {}
    for key, value in data.items():
        if key.startswith(keys.blocks()):
            blocks.append((key, value))
        elif key.startswith(keys.nodes()):
            racks_of[key[len(keys.nodes()):].decode()] = json.loads(value)["labels"]["rack"]
    cidrs = [keys.block_cidr(key) for key, _ in blocks]
    assert len(cidrs) == len(set(cidrs)) == 6000 * 4
    for cidr, (_, value) in zip(cidrs, blocks, strict=True):
        pool = pools[f"rack-{racks_of[json.loads(value)['affinity']]}"]
        assert cidr.subnet_of(pool.cidr), (cidr, pool)  # type: ignore[arg-type]

    refused = subprocess.run([sys.executable, str(BENCH / "scale.py"), "--nodes", "300000"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "at most 65344 nodes" in refused.stderr, (
        refused.stderr)
