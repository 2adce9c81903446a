"""The address map page, rendered in a real headless browser (Debian's chromium-headless-shell).

On the seed's cluster with a borrowed address: ``topoipamctl report --html``
writes one self-contained page (no external URL); the browser's rendered DOM
lists every pool and every rack, and its screenshot is not blank.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.daemons import ctl
from tests.integration.test_engine import request, seed
from tests.integration.test_foresight import seed_cluster
from topoipam.daemon.core.model import IPAMConfig, IPPool, Node
from topoipam.daemon.engine import AllocationEngine
from topoipam.daemon.store import EtcdStore

BROWSER = shutil.which("chromium-headless-shell") or "/usr/lib/chromium/chromium-headless-shell"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def browse(page: Path, tmp: Path, *what: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *what,
                           page.as_uri()], capture_output=True, timeout=120, cwd=tmp)


def pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """A non-interlaced 8-bit RGB(A) PNG's size and rows (filters undone)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks, header = 8, [], b""
    while offset < len(png):
        length, kind = struct.unpack(">I4s", png[offset:offset + 8])
        data = png[offset + 8:offset + 8 + length]
        if kind == b"IHDR":
            header = data
        elif kind == b"IDAT":
            chunks.append(data)
        offset += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    step = 3 if colour == 2 else 4
    raw, rows, previous = zlib.decompress(b"".join(chunks)), [], bytearray(width * step)
    stride = width * step + 1
    for y in range(height):
        kind, line = raw[y * stride], bytearray(raw[y * stride + 1:(y + 1) * stride])
        for x in range(len(line)):
            a = line[x - step] if x >= step else 0
            b, c = previous[x], previous[x - step] if x >= step else 0
            if kind == 1:
                line[x] = (line[x] + a) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + b) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                near = min((abs(p - a), a), (abs(p - b), b), (abs(p - c), c))[1]
                line[x] = (line[x] + near) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, rows


@pytest.mark.asyncio
async def test_the_address_map_renders_every_pool_and_rack_in_a_real_browser(
        store: EtcdStore, ctl_env: dict[str, str], tmp_path: Path) -> None:
    await seed_cluster(store, ctl_env)
    # A third pool shared by both racks with a topologyKey, and a borrow in it.
    await seed(store, IPPool("shared", ipaddress.ip_network("10.90.0.0/27"), 28,
                             "has(rack)", topology_key="rack", topology_block_size=28),
               IPAMConfig(max_blocks_per_host=2), Node("node-4", {"rack": "1"}))
    for node in ("node-0", "node-4", "node-1"):  # node-1 finds rack 0's only block node-0's
        engine = AllocationEngine(store, node)
        allocation = await engine.allocate(request(f"{node}-s", ipv4_pools=("shared",)))
        await engine.close()
    assert str(allocation.addresses[0].ip).startswith("10.90.0.")  # node-1's is borrowed
    page = tmp_path / "map.html"
    done = await asyncio.to_thread(ctl, ctl_env, "report", "--html", str(page))
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert not re.search(r"(?i)(src|href)\s*=|https?://|@import|url\(", text), "not self-contained"

    dom = await asyncio.to_thread(browse, page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    rendered = dom.stdout.decode()
    for pool in ("rack-0", "rack-1", "shared"):
        assert f"id=\"pool-{pool}\"" in rendered, pool
    for rack in ("rack=0", "rack=1"):
        assert f"<h3 class=\"domain\">{rack}</h3>" in rendered, rack
        assert f"<td class=\"domain\">{rack}</td>" in rendered, rack
    assert "class=\"tile borrowed\"" in rendered  # node-0's shared block lends to node-1
    assert "<h2 id=\"findings\">ipam check</h2>" in rendered

    shot = await asyncio.to_thread(browse, page, tmp_path, "--window-size=1200,1400",
                                   f"--screenshot={tmp_path / 'map.png'}")
    assert shot.returncode == 0, shot.stderr.decode()[-2000:]
    width, height, rows = pixels((tmp_path / "map.png").read_bytes())
    assert (width, height) == (1200, 1400)
    sampled = {row[x:x + 3] for row in rows[::7] for x in range(0, len(row), 21)}
    inked = sum(1 for row in rows[::7] for x in range(0, len(row), 21)
                if row[x:x + 3] != row[0:3])
    assert len(sampled) > 20 and inked > 200, (len(sampled), inked)  # not a blank page


def test_an_unwritable_report_path_is_one_line(ctl_env: dict[str, str]) -> None:
    done = ctl(ctl_env, "report", "--html", "/nonexistent-dir/map.html")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("error: cannot write --html /nonexistent-dir/map.html: "
                                   "No such file or directory"), done.stderr
