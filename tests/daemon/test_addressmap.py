"""The address map over in-memory snapshots, no etcd: everything escaped, and a big
cluster's page stays small and quick to make."""

from __future__ import annotations

import ipaddress
import re
import time

from topoipam.daemon.addressmap import MAX_TILES, render
from topoipam.daemon.audit import Snapshot
from topoipam.daemon.core.holdings import Block, Handle, HandleAddress
from topoipam.daemon.core.model import IPPool, Node

HOSTILE = "\"'><script>alert(1)</script>&amp;"


def block_with(cidr: str, node: str, pods: int, holder: str | None = None
               ) -> tuple[Block, dict[str, Handle]]:
    """A block of ``node`` with ``pods`` addresses (from the third on) held by ``holder``'s
    attachments (default: its own node's)."""
    network = ipaddress.ip_network(cidr)
    block = Block.empty(network, node)
    handles = {}
    for i in range(pods):
        ordinal = block.unallocated.pop(2)
        handle_id = f"net/c-{network.network_address}-{i}/eth0".replace(":", "-")
        block.allocations[ordinal] = handle_id
        handles[handle_id] = Handle(handle_id, holder or node,
                                    (HandleAddress(block.address(ordinal), network),),
                                    {"namespace": "default", "pod": f"p{i}"})
    return block, handles


def snapshot(pools: list[IPPool], nodes: list[Node],
             blocks: list[tuple[Block, dict[str, Handle]]]) -> Snapshot:
    snap = Snapshot(7, pools, {n.name: n for n in nodes}, [], {}, [], {})
    for block, handles in blocks:
        snap.blocks[block.cidr] = block
        snap.affinities.append((block.affinity or "", block.cidr))
        snap.handles.update(handles)
    return snap


def test_labels_selectors_and_label_keys_are_escaped() -> None:
    pool = IPPool("rack-0", ipaddress.ip_network("10.0.0.0/24"), 26,
                  f"rack == '{HOSTILE.replace(chr(39), '')}'")
    snap = snapshot([pool], [Node("node-0", {"rack": HOSTILE.replace("'", "")}),
                             Node("node-1", {"zone": "<b>z</b>"})],
                    [block_with("10.0.0.0/26", "node-0", 3),
                     block_with("10.0.0.64/26", "node-1", 2, holder="node-0")])
    page = render(snap, "rack", title="<i>map</i>")
    assert "<script" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;amp;" in page
    assert page.count("<html") == 1 and page.rstrip().endswith("</html>")


def test_an_empty_cluster_is_a_page() -> None:
    page = render(snapshot([], [], []), "rack")
    assert "0 pool(s) · 0 node(s) · 0 block(s)" in page and "OK: no problem" in page


def test_a_big_cluster_draws_a_bounded_page_quickly() -> None:
    """A /8 pool of /26 blocks with 20,000 claimed by 2,000 nodes in 40 racks (every 50th
    block lends to another rack), and an IPv6 /48 of /122 blocks: a few seconds, and
    tiles only up to MAX_TILES per pool (the rest counted per domain)."""
    big = IPPool("big", ipaddress.ip_network("10.0.0.0/8"), 26)
    v6 = IPPool("v6", ipaddress.ip_network("fd00:1::/48"), 122)
    nodes = [Node(f"n{i}", {"rack": f"r{i % 40}"}) for i in range(2000)]
    blocks = [block_with(f"10.{b // 1024}.{(b // 4) % 256}.{(b % 4) * 64}/26", f"n{b % 2000}",
                         5, holder=None if b % 50 else f"n{(b + 1) % 2000}")
              for b in range(20_000)]
    blocks.append(block_with("fd00:1::/122", "n0", 2))
    started = time.monotonic()
    page = render(snapshot([big, v6], nodes, blocks), "rack")
    elapsed = time.monotonic() - started
    assert elapsed < 20, f"{elapsed:.1f} s"
    assert len(page) < 3_000_000, len(page)
    tiles = re.findall(r"<div class='tile[ ']", page)
    assert len(tiles) == MAX_TILES + 1, len(tiles)  # the big pool's, and v6's one block
    assert len(re.findall(r"class='tile borrowed", page)) == 400  # every lender is drawn
    assert re.search(r"\d+ more block\(s\) of rack=r\d+ not drawn", page)
    assert "id='pool-v6'" in page
    assert page.count("<li class='warning'>") <= 101  # the findings are listed up to 100
