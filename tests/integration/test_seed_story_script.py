"""examples/seed-story.sh, the seed's story in one command, run as a newcomer runs it.

It starts its own dev etcd and four daemons, so this test checks what it
prints (every step of README's seed story) and that it leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "seed-story.sh"


def section(out: str, command: str) -> list[str]:
    """The non-blank lines a shown command printed (up to the next command or step)."""
    lines = out.split(f"$ {command}\n", 1)[1].splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith(("$ ", "### "))),
               len(lines))
    return [line for line in lines[:end] if line.strip()]


def test_seed_story_script_tells_the_whole_story_and_cleans_up(short_tmp: Path) -> None:
    tmp_path = short_tmp  # the script's sockets live under TMPDIR
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPOIPAM_")}
    env["TMPDIR"] = str(tmp_path)
    env["TOPOIPAM_PREFIX"] = "/must-be-ignored/v1"  # the script uses its own etcd, as is
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=300)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert done.stderr == "", done.stderr

    [default] = section(out, "ctl get ippool -o wide")[1:]
    assert default.split()[:2] == ["default-ipv4-ippool", "192.168.0.0/16"]
    assert "ippool/default-ipv4-ippool deleted" in out
    assert section(out, "ctl check coverage") == ["check coverage: OK (4 nodes, 2 pools)"]

    rows = [line.split() for line in section(out, "ctl get allocations -o wide")[1:]]
    assert len(rows) == 5
    racks = {"node-0": "192.168.0.", "node-1": "192.168.0.", "node-2": "192.168.1.",
             "node-3": "192.168.1."}
    for ip, node, pool, *_ in rows:
        assert ip.startswith(racks[node]), (ip, node)
        assert pool == f"rack-{racks[node][-2]}-ippool"
        assert ip not in ("192.168.0.1", "192.168.1.1"), "a gateway was handed out"
    assert sorted(row[3] for row in rows) == [f"default/nginx-{n}" for n in range(5)]
    assert len({row[0] for row in rows}) == 5

    blocks = section(out, "ctl ipam show --show-blocks")
    assert [line.split()[:3] for line in blocks[:3]] == [
        ["POOL", "CIDR", "IN-USE"], ["rack-0-ippool", "192.168.0.0/24", "3"],
        ["rack-1-ippool", "192.168.1.0/24", "2"]]
    assert any(line.split()[:3] == ["BLOCK", "POOL", "AFFINITY"] for line in blocks)

    placement = section(out, "ctl check placement")
    assert placement[-1] == "check placement: 2 of 5 allocation(s) outside their node's pools"
    assert all("node-0" in line for line in placement[1:-1])
    routes_before, routes_after = out.split("$ ctl check routes\n")[1:]
    assert ("check routes: OK (2 rack value(s), 2 prefix(es) to route, 0 breaking "
            "aggregation)") in routes_before
    assert "breaks aggregation: 192.168.0.0/26 routed to rack=1 (node node-0)" in routes_after
    new = re.search(r"a new workload on node-0 \(now rack 1\): (192\.168\.1\.\d+)/24", out)
    assert new is not None, out

    # The trap stopped everything and removed the directory.
    [line] = [line for line in out.splitlines() if line.startswith("seed-story: stopped")]
    assert line.startswith("seed-story: stopped 4 daemon(s) and etcd, removed ")
    work = line.rsplit(" ", 1)[1]
    assert work.startswith(str(tmp_path)) and not Path(work).exists()
    assert list(tmp_path.iterdir()) == []
    leftover = subprocess.run(["pgrep", "-f", work], capture_output=True, text=True)
    assert leftover.stdout == "", f"processes left running: {leftover.stdout}"
