"""topoipamctl's foresight: what a pod would get (``explain pod``), each domain's headroom
(``check capacity``) and a change's effect (``--dry-run``), from the daemon's own planner
and the audits' counting."""

from __future__ import annotations

import argparse
import errno
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from topoipam.client.ctl_output import print_findings, print_table, warn
from topoipam.daemon.addressmap import render
from topoipam.daemon.audit import load_snapshot, show
from topoipam.daemon.capacity import FAMILIES, CapacityDomain, capacity_report
from topoipam.daemon.core.calls import AllocationRequest
from topoipam.daemon.core.errors import InvalidInput
from topoipam.daemon.core.holdings import Attachment
from topoipam.daemon.core.model import check_kubernetes_label, check_name
from topoipam.daemon.core.writes import Write
from topoipam.daemon.foresight import LOOK_AHEAD_SECONDS, UNNAMED_NETWORK, Prediction, predict
from topoipam.daemon.impact import LISTED, Impact, foresee
from topoipam.daemon.reports import DEFAULT_ROUTE_LABEL
from topoipam.daemon.store import EtcdStore

#: The container ID a prediction plans for (no container exists yet).
PREDICTED_CONTAINER = "explain-pod"


def pod_request(args: argparse.Namespace) -> AllocationRequest:
    """The ADD ``explain pod`` predicts: the pod's sticky identity on ``--network`` if
    one is recorded, its families, its pools. Raises InvalidInput (one line) for a
    malformed name, node, network or interface."""
    namespace, _, name = args.name.partition("/")
    if not namespace or not name or "/" in name:
        raise InvalidInput(f"explain pod: {args.name!r} is not NAMESPACE/NAME")
    check_name("node", args.node)
    network = UNNAMED_NETWORK if args.network is None else args.network
    ifname = "eth0" if args.ifname is None else args.ifname
    attachment = Attachment(network, PREDICTED_CONTAINER, ifname)
    identity = "" if args.network is None else f"{network}/{namespace}/{name}/{ifname}"
    return AllocationRequest(
        attachment, ipv4=not args.ipv6_only, ipv6=args.ipv6 or args.ipv6_only,
        identity=identity, attributes={"namespace": namespace, "pod": name})


async def cmd_explain_pod(store: EtcdStore, args: argparse.Namespace) -> int:
    request = pod_request(args)
    if request.identity and await store.get_identity(request.identity) is None:
        request = AllocationRequest(request.attachment, request.ipv4, request.ipv6,
                                    attributes=request.attributes)  # not a sticky pod (yet)
    prediction = await predict(store, args.node, request)
    if not prediction.registered:
        warn(f"node {args.node} is not registered; explaining for a node without labels")
    print(f"pod: {args.name} on node {args.node}"
          + (f" (sticky identity {request.identity})" if request.identity else ""))
    if prediction.refused:
        # The error names the attachment planned for: a container the pod does not have yet.
        print("its next ADD fails: " + prediction.refused.replace(
            f"attachment {request.attachment.handle_id}", "a new container of this pod"))
    else:
        print_prediction(prediction)
        print("nothing was allocated; the node's next ADD (of a CNI config that names no pools, "
          "addresses or gateways) gets these if nothing changes first")
    for note in prediction_notes(args.name, prediction):
        print(f"note: {note}")
    return 1 if prediction.refused else 0


def print_prediction(prediction: Prediction) -> None:
    rows = []
    for predicted in prediction.addresses:
        a = predicted.address
        tier = (f"{predicted.tier} of {predicted.tiers}" if predicted.tiers > 1 else "-")
        rows.append([str(a.ip), a.pool or "-", tier, str(a.block), predicted.path,
                     predicted.why or "-"])
    print_table(["ADDRESS", "POOL", "TIER", "BLOCK", "PATH", "WHY"], rows)


def prediction_notes(pod: str, prediction: Prediction) -> list[str]:
    """What can part the prediction and the node's real next ADD, one line each."""
    notes = []
    node = prediction.node
    if not prediction.daemon_alive:
        notes.append(f"no topoipamd runs on node {node}: its pods get no address until one "
                     "does")
    if prediction.until is not None:
        when, why, later = prediction.until
        then = (f"fails: {later.refused}" if later.refused else "gets " + ", ".join(
            f"{a.address.ip} ({a.path})" for a in later.addresses))
        notes.append(f"this holds until {why} at {timestamp(when)}; then the ADD {then}")
    for pool in prediction.looked_ahead:
        notes.append(
            f"node {node}'s daemon may have found its next claim of pool {pool} ahead (up to "
            f"{LOOK_AHEAD_SECONDS:g} s ago, when its blocks ran low): a block freed since then "
            "is claimed only after that one")
    for handle in prediction.held:
        addresses = ", ".join(str(a.ip) for a in handle.addresses) or "no address"
        notes.append(f"pod {pod} holds {addresses} on node {handle.node} (attachment "
                     f"{handle.id}): a repeated ADD of that container gets it back; this "
                     "prediction is for a new container")
    for identity in prediction.other_identities:
        network = identity.id.split("/")[0]
        addresses = ", ".join(str(a.ip) for a in identity.addresses) or "no address"
        if not identity.parked:
            state, outcome = (f"live under attachment {identity.handle} on node "
                              f"{identity.node}", "a new container's ADD is refused while "
                              "that attachment lives")
        elif (identity.parked_until or 0.0) > time.time():
            state = f"parked until {timestamp(identity.parked_until or 0.0)}"
            outcome = "its ADD takes it back"
        else:
            state, outcome = "parked, its hold over", "its ADD frees it and gets a new address"
        notes.append(f"pod {pod} has sticky identity {identity.id} ({state}, {addresses}): "
                     f"on network {network} {outcome} (--network {network})")
    return notes


def timestamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def domain_label(args: argparse.Namespace) -> str:
    """``--by``, checked: a node label key, or a one-line error that names it."""
    label = DEFAULT_ROUTE_LABEL if args.by is None else args.by
    check_kubernetes_label(label, "", "--by")
    return str(label)


async def cmd_check_capacity(store: EtcdStore, args: argparse.Namespace) -> int:
    domains = capacity_report(await load_snapshot(store), domain_label(args))
    exhausted = [d for d in domains if d.exhausted]
    if args.output == "json":
        print(json.dumps({"label": args.by, "domains": [d.to_json() for d in domains]},
                         indent=2))
        return 1 if exhausted else 0
    rows = []
    for domain in domains:
        cells = [show(domain.value), ",".join(domain.nodes)]
        for family in FAMILIES:
            counts = domain.families[family]
            cells += ([str(counts.capacity), str(counts.in_use), str(counts.free)]
                      if domain.pools.get(family) else ["-", "-", "-"])
        rows.append([*cells, str(domain.pods)])
    print_table([args.by.upper(), "NODES", "V4-CAPACITY", "V4-IN-USE", "V4-FREE",
                 "V6-CAPACITY", "V6-IN-USE", "V6-FREE", "PODS"], rows)
    print()
    problems = [f"no room: {args.by}={show(d.value)} (nodes {', '.join(d.nodes)}) has no free "
                "address in the pools that serve it" if any(d.pools.values()) else
                f"no pool: {args.by}={show(d.value)} (nodes {', '.join(d.nodes)}): no enabled "
                "Automatic pool selects its nodes" for d in exhausted]
    return print_findings("check capacity", problems, [],
                          f"{len(domains)} {args.by} value(s)", args.fail_on_warnings)


async def show_impact(store: EtcdStore, writes: Sequence[Write], lines: Sequence[str],
                      args: argparse.Namespace) -> int:
    """``--dry-run``: what the validated change would do, written nowhere."""
    impact = await foresee(store, writes, domain_label(args))
    if args.output == "json":
        print(json.dumps({"dry_run": True, "changes": list(lines), **impact.to_json()},
                         indent=2))
    else:
        print_impact(impact, lines)
    return 1 if args.fail_on_impact and impact.harmful else 0


def print_impact(impact: Impact, lines: Sequence[str]) -> None:
    print("dry run: nothing was written")
    for line in lines:
        print(f"  would be: {line}")
    lost = sorted({f"{c.node} (IPv{c.family})" for c in impact.nodes if c.loses_every_pool})
    print(f"nodes left without a pool: {', '.join(lost) or 'none'}")
    if impact.nodes:
        print("pools per node, before -> after:")
        print_table(["NODE", "FAMILY", "BEFORE", "AFTER"], [
            [c.node, f"IPv{c.family}", ",".join(c.before) or "<none>",
             ",".join(c.after) or "<none>"] for c in impact.nodes])
    print(f"allocations that would fall outside their node's pools: {len(impact.outside)}")
    if impact.outside:
        print_table(["IP", "NODE", "POD", "REASON"],
                    [list(row) for row in impact.outside[:LISTED]])
    print(f"prefixes that would break aggregation by {impact.label}: "
          f"{len(impact.breaking) or 'none'}")
    for line in impact.breaking:
        print(f"  {line}")
    print(f"capacity by {impact.label}, before -> after (free addresses of capacity):")
    rows = []
    for before, after in impact.capacity:
        value = (before or after).value  # type: ignore[union-attr]
        cells = [show(value)]
        for family in FAMILIES:
            cells.append(f"{_free(before, family)} -> {_free(after, family)}")
        rows.append(cells)
    print_table([impact.label.upper(), "IPV4", "IPV6"], rows)


def _free(domain: CapacityDomain | None, family: int) -> str:
    if domain is None or not domain.pools.get(family):
        return "-"
    counts = domain.families[family]
    return f"{counts.free}/{counts.capacity}"


async def cmd_report(store: EtcdStore, args: argparse.Namespace) -> int:
    """Write the address map (one self-contained HTML page) to ``--html FILE``."""
    if not args.html:
        raise InvalidInput("--html needs a file name")
    page = render(await load_snapshot(store), domain_label(args))
    try:
        write_page(Path(args.html), page)
    except OSError as exc:
        raise InvalidInput(f"cannot write --html {args.html}: {exc.strerror or exc}") from exc
    print(f"address map written to {args.html} ({len(page) // 1024} KiB)")
    return 0


def write_page(target: Path, page: str) -> None:
    """``page`` into ``target``: a regular file (or a link to one) is replaced at once, by
    a new temporary file beside it (created exclusively: nothing planted there is
    followed); a FIFO or a device (``/dev/stdout``) is written into, never replaced."""
    resolved = target.resolve()
    if resolved.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    if resolved.exists() and not resolved.is_file():
        with open(target, "w", encoding="utf-8") as stream:
            stream.write(page)
        return
    mode = (resolved.stat().st_mode & 0o777 if resolved.exists()
            else 0o666 & ~_umask())
    descriptor, temporary = tempfile.mkstemp(prefix=f".{resolved.name}.", suffix=".tmp",
                                             dir=resolved.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(page)
        os.chmod(temporary, mode)
        os.replace(temporary, resolved)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0o22)
    os.umask(current)
    return current
