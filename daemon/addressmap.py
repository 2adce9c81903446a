"""The address map: one self-contained HTML page of the cluster's address space.

:func:`render` draws, from one snapshot, per pool and per value of a node
label (a rack): every block as a tile (its node, how full it is), borrowed
addresses and prefixes that break aggregation marked; a capacity bar per
domain (counted as ``check capacity`` counts); and the findings of ``ipam
check``. Inline CSS and SVG only: no script, no external URL, no server; the
file opens anywhere. Every name, label, selector and finding is escaped.

The page stays small whatever the cluster: a pool with more than
:data:`MAX_TILES` claimed blocks draws its blocks that lend addresses or break
aggregation first, then the rest in address order up to that many, and counts
the others per domain; unclaimed blocks are drawn only for pools of at most
:data:`ALL_SLOTS` blocks. Each block is looked at a bounded number of times,
so a big cluster takes seconds, not minutes.
"""

from __future__ import annotations

import bisect
import html
import zlib
from collections.abc import Sequence

from .audit import Snapshot, find_inconsistencies, find_warnings, network_order, show
from .capacity import FAMILIES, capacity_report
from .core.holdings import Block
from .core.model import IPNetwork, IPPool
from .reports import route_report

#: A pool with more block slots than this shows its claimed blocks only.
ALL_SLOTS = 1024

#: Block tiles drawn per pool at most (the others are counted per domain).
MAX_TILES = 2048

#: Findings listed per kind (problems, warnings) at most; `ipam check` lists them all.
MAX_FINDINGS = 100

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d232a;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 6px}
h3{font-size:14px;margin:14px 0 4px;color:#444}
.meta{color:#666;margin-bottom:16px}
.tiles{display:flex;flex-wrap:wrap;gap:3px;max-width:1100px}
.tile{width:96px;height:54px;border:1px solid #9aa;border-radius:3px;position:relative;
background:#fff;font-size:10px;overflow:hidden;box-sizing:border-box;padding:2px 3px 8px}
.tile .fill{position:absolute;left:0;bottom:0;height:6px;background:#2f6fb1}
.tile.free{background:#eceff1;border-style:dotted;color:#999}
.tile.borrowed{border:2px solid #c62828}
.tile.breaking{outline:2px dashed #ef6c00;outline-offset:1px}
.legend span{display:inline-block;margin-right:14px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 10px;text-align:left;
border-bottom:1px solid #ddd}
.problem{color:#b71c1c}.warning{color:#8d5a00}.ok{color:#1b5e20}
.more{color:#666;margin:4px 0}
"""


def _hue(value: str | None) -> int:
    return zlib.crc32((value or "").encode()) % 360


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def render(snap: Snapshot, label: str, title: str = "topoipam address map") -> str:
    """The page for ``snap``, domains by node label ``label``."""
    value_of = {name: node.labels.get(label) for name, node in snap.nodes.items()}
    borrowed: dict[IPNetwork, int] = {}
    for row in snap.allocations():
        if row.handle is not None and row.node != row.block.affinity:
            borrowed[row.block.cidr] = borrowed.get(row.block.cidr, 0) + 1
    breaking = _breaking_blocks(snap, label)
    by_pool = _blocks_by_pool(snap)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{_esc(title)}</h1>",
             f"<div class='meta'>etcd revision {snap.revision} · {len(snap.pools)} pool(s) · "
             f"{len(snap.nodes)} node(s) · {len(snap.blocks)} block(s) · domains by "
             f"<b>{_esc(label)}</b></div>",
             "<div class='legend'><span>▭ block: node, addresses in use/size</span>"
             "<span style='color:#c62828'>▭ holds borrowed addresses</span>"
             "<span style='color:#ef6c00'>⬚ breaks aggregation</span>"
             "<span style='color:#999'>⋯ unclaimed</span></div>"]
    parts += _capacity(snap, label)
    for pool in snap.pools:
        parts += _pool(pool, by_pool.get(pool.name, []), value_of, borrowed, breaking, label)
    parts += _findings(snap)
    parts.append("</body></html>")
    return "\n".join(parts)


def _blocks_by_pool(snap: Snapshot) -> dict[str, list[Block]]:
    """Each pool's blocks (inside its CIDR), found by bisection: pools do not overlap."""
    spans = sorted(((p.cidr.version, int(p.cidr.network_address)), int(p.cidr.broadcast_address),
                    p.name) for p in snap.pools)
    starts = [span[0] for span in spans]
    found: dict[str, list[Block]] = {}
    for block in snap.blocks.values():
        at = bisect.bisect_right(starts, (block.cidr.version, block.first)) - 1
        if at >= 0 and spans[at][0][0] == block.cidr.version and block.last <= spans[at][1]:
            found.setdefault(spans[at][2], []).append(block)
    return found


def _breaking_blocks(snap: Snapshot, label: str) -> set[IPNetwork]:
    """The blocks that are, or hold, a prefix breaking aggregation by ``label``."""
    sizes = {cidr.prefixlen for cidr in snap.blocks}
    marked = set()
    for exception in route_report(snap, label).breaking:
        prefix = exception.prefix
        for size in sizes:
            if size <= prefix.prefixlen:
                candidate = prefix.supernet(new_prefix=size)
                if candidate in snap.blocks:
                    marked.add(candidate)
    return marked


def _capacity(snap: Snapshot, label: str) -> list[str]:
    rows = []
    for domain in capacity_report(snap, label):
        cells = [f"<td class='domain'>{_esc(label)}={_esc(show(domain.value))}</td>",
                 f"<td>{_esc(', '.join(domain.nodes))}</td>"]
        for family in FAMILIES:
            counts = domain.families[family]
            if not domain.pools.get(family):
                cells.append("<td>-</td>")
                continue
            share = counts.in_use / counts.capacity if counts.capacity else 1.0
            colour = "#c62828" if share > 0.95 else "#ef6c00" if share > 0.8 else "#2f6fb1"
            cells.append(
                f"<td><svg width='220' height='16' role='img' aria-label='IPv{family} "
                f"{counts.in_use} of {counts.capacity} in use'><rect width='220' height='16' "
                f"fill='#e0e0e0'/><rect width='{220 * min(share, 1.0):.1f}' height='16' "
                f"fill='{colour}'/></svg> {counts.in_use}/{counts.capacity}</td>")
        cells.append(f"<td>{domain.pods}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ["<h2 id='capacity'>Capacity by " + _esc(label) + "</h2>",
            "<table><tr><th>domain</th><th>nodes</th><th>IPv4</th><th>IPv6</th>"
            "<th>pods that can start</th></tr>", *rows, "</table>"]


def _pool(pool: IPPool, blocks: Sequence[Block], value_of: dict[str, str | None],
          borrowed: dict[IPNetwork, int], breaking: set[IPNetwork], label: str) -> list[str]:
    slots = 1 << (pool.block_size - pool.cidr.prefixlen)
    drawn = _drawn(blocks, borrowed, breaking)
    head = (f"<h2 class='pool' id='pool-{_esc(pool.name)}'>pool {_esc(pool.name)} "
            f"<small>{_esc(pool.cidr)} · /{pool.block_size} blocks · {len(blocks)} of "
            f"{slots} claimed · selector {_esc(pool.node_selector)}"
            + (f" · priority {pool.priority}" if pool.priority else "")
            + (f" · topologyKey {_esc(pool.topology_key)} (/{pool.topology_prefix} ranges)"
               if pool.topology_key else "")
            + (f" · {len(drawn)} blocks drawn: those that lend or break aggregation first"
               if len(drawn) < len(blocks) else "") + "</small></h2>")
    groups: dict[str | None, list[Block]] = {}
    for block in blocks:
        groups.setdefault(value_of.get(block.affinity or ""), []).append(block)
    out = [head]
    for value in sorted(groups, key=lambda v: (v is None, v or "")):
        shown = [b for b in groups[value] if b.cidr in drawn]
        out.append(f"<h3 class='domain'>{_esc(label)}={_esc(show(value))}</h3>")
        out.append("<div class='tiles'>" + "".join(
            _tile(b, value, borrowed, breaking)
            for b in sorted(shown, key=lambda b: network_order(b.cidr))) + "</div>")
        hidden = [b for b in groups[value] if b.cidr not in drawn]
        if hidden:
            out.append(f"<p class='more'>{len(hidden)} more block(s) of {_esc(label)}="
                       f"{_esc(show(value))} not drawn: {sum(b.in_use for b in hidden)} of "
                       f"{sum(b.size for b in hidden)} addresses in use</p>")
    if slots <= ALL_SLOTS and len(blocks) < slots:
        claimed = {b.cidr for b in blocks}
        other_sizes = [c for c in claimed if c.prefixlen != pool.block_size]
        free = [c for c in pool.block_cidrs() if c not in claimed and not any(
            c.overlaps(o) for o in other_sizes)]
        out.append("<h3>unclaimed</h3><div class='tiles'>" + "".join(
            f"<div class='tile free' title='{_esc(c)} unclaimed'>{_esc(c)}</div>"
            for c in free) + "</div>")
    return out


def _drawn(blocks: Sequence[Block], borrowed: dict[IPNetwork, int],
           breaking: set[IPNetwork]) -> set[IPNetwork]:
    """The blocks whose tiles are drawn: all, or MAX_TILES of them, those that lend or
    break aggregation first, then in address order."""
    if len(blocks) <= MAX_TILES:
        return {b.cidr for b in blocks}
    ranked = sorted(blocks, key=lambda b: (b.cidr not in borrowed and b.cidr not in breaking,
                                           network_order(b.cidr)))
    return {b.cidr for b in ranked[:MAX_TILES]}


def _tile(block: Block, value: str | None, borrowed: dict[IPNetwork, int],
          breaking: set[IPNetwork]) -> str:
    classes = ["tile"]
    notes = []
    if block.cidr in borrowed:
        classes.append("borrowed")
        notes.append(f"{borrowed[block.cidr]} borrowed")
    if block.cidr in breaking:
        classes.append("breaking")
        notes.append("breaks aggregation")
    share = block.in_use / block.size
    detail = (f"{block.cidr} node {show(block.affinity)} {block.in_use}/{block.size}"
              + (f" ({', '.join(notes)})" if notes else ""))
    return (f"<div class='{' '.join(classes)}' title='{_esc(detail)}' "
            f"style='background:hsl({_hue(value)},60%,92%)'>{_esc(block.cidr)}<br>"
            f"{_esc(show(block.affinity))}<br>{block.in_use}/{block.size}"
            f"<div class='fill' style='width:{100 * share:.0f}%'></div></div>")


def _findings(snap: Snapshot) -> list[str]:
    problems, warnings = find_inconsistencies(snap), find_warnings(snap)
    out = ["<h2 id='findings'>ipam check</h2>"]
    if not problems and not warnings:
        out.append("<p class='ok'>OK: no problem, no warning</p>")
    out += _items("problem", problems) + _items("warning", warnings)
    return out


def _items(kind: str, lines: Sequence[str]) -> list[str]:
    listed = [f"<li class='{kind}'>{kind}: {_esc(line)}</li>" for line in lines[:MAX_FINDINGS]]
    if len(lines) > MAX_FINDINGS:
        listed.append(f"<li class='{kind}'>and {len(lines) - MAX_FINDINGS} more "
                      f"{kind}(s): `topoipamctl ipam check` lists them all</li>")
    return ["<ul>", *listed, "</ul>"] if listed else []
