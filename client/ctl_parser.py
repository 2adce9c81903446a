"""topoipamctl's command line: the verbs, their flags and what argparse cannot check.

:func:`build_parser` maps every verb to its handler (in ``ctl_resources``,
``ctl_ipam``, ``ctl_reports``, and ``install-cni`` in ``cni_bundle``);
:func:`usage_problem` refuses flag combinations before etcd is contacted.
The etcd connection options are accepted before and after the verb.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from topoipam.client import cni_bundle
from topoipam.client.ctl_foresight import cmd_check_capacity, cmd_report
from topoipam.client.ctl_ipam import (
    CONFIG_FLAGS,
    cmd_ipam_check,
    cmd_ipam_configure,
    cmd_ipam_conflicts,
    cmd_ipam_release,
    cmd_ipam_repair_index,
    cmd_ipam_resolve_conflict,
    cmd_ipam_show,
)
from topoipam.client.ctl_reports import (
    cmd_check_coverage,
    cmd_check_placement,
    cmd_check_routes,
    cmd_explain,
)
from topoipam.client.ctl_resources import (
    GET_KINDS,
    NODE_NAMES,
    POOL_NAMES,
    RESERVATION_NAMES,
    cmd_apply,
    cmd_create,
    cmd_delete,
    cmd_get,
    cmd_label,
    cmd_patch,
)
from topoipam.daemon.core.keys import DEFAULT_PREFIX
from topoipam.daemon.core.model import ASSIGNMENT_MODES, PRIORITY_RANGE
from topoipam.daemon.etcd_access import DEFAULT_ETCD_ENDPOINT
from topoipam.daemon.reports import DEFAULT_ROUTE_LABEL
from topoipam.daemon.resolve import KEEP_SIDES
from topoipam.daemon.store import EtcdStore

#: The verbs that take --dry-run.
DRY_RUN_VERBS = ("apply", "create", "delete", "patch", "label")

# Short: an operator at a terminal wants "etcd is down" in seconds, not a hang.
DEFAULT_TIMEOUT = 3.0


Handler: TypeAlias = Callable[[EtcdStore, argparse.Namespace], Awaitable[int]]


def priority_flag(text: str) -> int:
    """``--priority``: a whole number in PRIORITY_RANGE (the pool checks the bound too)."""
    low, high = PRIORITY_RANGE
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, "
                                         f"not {text!r}")
    return value


def prefix_flag(text: str) -> int:
    """``--topology-block-size``: a prefix length (the pool checks it against its own)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a prefix length (a number from the pool's prefix length to its "
            f"blockSize), not {text!r}") from None


def bool_flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def add_global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """The connection options, accepted before and after the verb.

    On sub-commands the defaults are SUPPRESS so that an option given before
    the verb is not reset by the sub-parser.
    """
    def default(env: str, fallback: str | None = None) -> str | None:
        return os.environ.get(env, fallback) if top else argparse.SUPPRESS

    group = parser.add_argument_group("etcd connection")
    group.add_argument("--etcd-endpoints", metavar="URLS",
                       default=default("TOPOIPAM_ETCD_ENDPOINTS", DEFAULT_ETCD_ENDPOINT),
                       help="comma-separated etcd endpoints (env TOPOIPAM_ETCD_ENDPOINTS)")
    group.add_argument("--prefix", default=default("TOPOIPAM_PREFIX", DEFAULT_PREFIX),
                       help="etcd key prefix (env TOPOIPAM_PREFIX)")
    group.add_argument("--etcd-ca", metavar="FILE", default=default("TOPOIPAM_ETCD_CA"),
                       help="CA certificate for etcd TLS (env TOPOIPAM_ETCD_CA)")
    group.add_argument("--etcd-cert", metavar="FILE", default=default("TOPOIPAM_ETCD_CERT"),
                       help="client certificate for etcd TLS (env TOPOIPAM_ETCD_CERT)")
    group.add_argument("--etcd-key", metavar="FILE", default=default("TOPOIPAM_ETCD_KEY"),
                       help="client key for etcd TLS (env TOPOIPAM_ETCD_KEY)")
    group.add_argument("--etcd-user", default=default("TOPOIPAM_ETCD_USER"),
                       help="etcd user name (env TOPOIPAM_ETCD_USER)")
    group.add_argument("--etcd-password-file", metavar="FILE",
                       default=default("TOPOIPAM_ETCD_PASSWORD_FILE"),
                       help="file holding the etcd password (env TOPOIPAM_ETCD_PASSWORD_FILE)")
    group.add_argument("--etcd-timeout", metavar="SECONDS", type=float,
                       default=default("TOPOIPAM_ETCD_TIMEOUT", str(DEFAULT_TIMEOUT)),
                       help=f"per-request etcd timeout (default {DEFAULT_TIMEOUT})")


EXIT_CODES = """\
exit status: 0 success (reports: no problems; warnings allowed); 1 an error, or a report
found problems; 2 usage error; 141 stdout closed early (e.g. `| head`), quietly."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topoipamctl", description="Administer topoipam pools, nodes and allocations.",
        epilog=EXIT_CODES)
    add_global_options(parser, top=True)
    connection = argparse.ArgumentParser(add_help=False)
    add_global_options(connection, top=False)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB",
                                  help="what to do (VERB --help for its options)")

    def verb(parent: Any, name: str, handler: Handler, help: str,
             **extra: Any) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name, help=help, description=help, parents=[connection], **extra)
        sub.set_defaults(handler=handler, usage_parser=sub)
        return sub

    def report_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--fail-on-warnings", action="store_true",
                         help="exit 1 on warnings too (problems always exit 1)")
        sub.epilog = EXIT_CODES

    apply = verb(verbs, "apply", cmd_apply, "create or update resources from a manifest")
    apply.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")

    create = verb(verbs, "create", cmd_create, "create resources (fails if they exist)")
    create.add_argument("kind", nargs="?", choices=["ippool"], help="ippool (with flags)")
    create.add_argument("name", nargs="?",
                        help="pool name: a DNS-1123 label (lowercase, digits, '-')")
    create.add_argument("-f", "--filename", help="manifest file, or - for stdin")
    create.add_argument("--cidr", help="the pool's CIDR, e.g. 192.168.0.0/24")
    create.add_argument("--block-size", type=int,
                        help="prefix length of the pool's blocks (default 26 / 122)")
    create.add_argument("--node-selector", default="all()",
                        help="which nodes the pool serves (default all())")
    create.add_argument("--disabled", action="store_true",
                        help="create the pool disabled (no new allocations)")
    create.add_argument("--priority", type=priority_flag, default=0,
                        help="pools that select a node serve it highest priority first; a "
                        f"lower priority only when every higher one cannot ({PRIORITY_RANGE[0]}"
                        f" to {PRIORITY_RANGE[1]}, default 0)")
    create.add_argument("--topology-key", default="", metavar="LABEL",
                        help="a node label key: the nodes with one value of it claim their "
                        "blocks in aligned ranges of the pool that value holds (default: none)")
    create.add_argument("--topology-block-size", type=prefix_flag, metavar="PREFIXLEN",
                        help="prefix length of those ranges, from the pool's to its blockSize "
                        "(default: blockSize - 4, within the pool; needs --topology-key)")
    create.add_argument("--assignment-mode", choices=ASSIGNMENT_MODES, default="Automatic",
                        help="Manual pools serve only CNI configs that name them")
    create.add_argument("--gateway", help="the pool's gateway address, never handed out "
                        "(default: its first usable address; 'none' for a routed pool)")

    delete = verb(verbs, "delete", cmd_delete, "delete resources")
    delete.add_argument("kind", nargs="?", choices=[*POOL_NAMES, *RESERVATION_NAMES,
                                                    *NODE_NAMES],
                        help="ippool (ipp), ipreservation (ipr) or node (no)")
    delete.add_argument("name", nargs="?", help="name of the object to delete")
    delete.add_argument("-f", "--filename", help="manifest file, or - for stdin")
    delete.add_argument("--force", action="store_true",
                        help="delete pools even while addresses in them are allocated; "
                             "delete a node while its daemon runs, and release the addresses "
                             "it holds")

    patch = verb(verbs, "patch", cmd_patch, "change fields of an IP pool in place")
    patch.add_argument("kind", choices=POOL_NAMES, help="ippool (ipp)")
    patch.add_argument("name", help="the pool to change")
    patch.add_argument("--disabled", type=bool_flag, metavar="true|false",
                       help="disable (true) or enable (false) the pool")
    patch.add_argument("-p", "--patch", metavar="JSON",
                       help="JSON merge patch (RFC 7386) of the pool's manifest, e.g. "
                            "'{\"spec\": {\"nodeSelector\": \"rack == \\\"0\\\"\"}}'")

    get = verb(verbs, "get", cmd_get, "list resources or allocations")
    get.add_argument("kind", choices=sorted(GET_KINDS),
                     help="ippool (ipp), node (no), ipamconfig, ipreservation (ipr), "
                          "allocations")
    get.add_argument("name", nargs="?", help="only this object")
    get.add_argument("-o", "--output", choices=["wide", "yaml", "json"],
                     help="wide table, or a yaml/json document")
    get.add_argument("--node", help="only allocations held by this node")

    label = verb(verbs, "label", cmd_label,
                 "set (k=v) or remove (k-) node labels (Kubernetes label syntax)")
    label.add_argument("resource", choices=NODE_NAMES, help="nodes (no)")
    label.add_argument("name", help="the node")
    label.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-",
                       help="labels to set or remove")
    label.add_argument("--overwrite", action="store_true",
                       help="allow changing the value of an existing label")
    label.add_argument("--create", action="store_true",
                       help="create the node if it does not exist (daemons register their "
                            "own node; without this a mistyped name is refused)")

    ipam = verbs.add_parser("ipam", help="inspect and repair address allocations",
                            description="inspect and repair address allocations")
    ipam_verbs = ipam.add_subparsers(dest="ipam_verb", required=True, metavar="ACTION",
                                     help="show, check, release, conflicts, resolve-conflict, "
                                          "repair-index or configure")
    ipam_show = verb(ipam_verbs, "show", cmd_ipam_show,
                     "utilisation per pool (CAPACITY: addresses that can be handed out)")
    ipam_show.add_argument("--show-blocks", action="store_true",
                           help="also list every block with its affinity and free addresses")
    ipam_show.add_argument("--show-borrowed", action="store_true",
                           help="also list addresses held by a node other than the block's")
    ipam_show.add_argument("--ip", help="who holds this address (or why it is not used)")
    ipam_check = verb(ipam_verbs, "check", cmd_ipam_check,
                      "find leaks, orphans and mismatches (problems) and leftovers (warnings)")
    report_flags(ipam_check)
    ipam_release = verb(
        ipam_verbs, "release", cmd_ipam_release,
        "free leaked addresses (whose attachment is gone); refuses an address a live "
        "attachment holds unless --force")
    ipam_release.add_argument("--ip", action="append",
                              help="address to free (repeat for several; all or nothing)")
    ipam_release.add_argument("--identity", metavar="ID",
                              help="free the addresses parked for this sticky identity now "
                                   "(refused while it is live)")
    ipam_release.add_argument("--park", action="store_true",
                              help="with --identity: park a live identity whose node is lost "
                                   "(its pod never sends DEL), for its next ADD on any node; "
                                   "refused while that node's topoipamd is alive, unless --force")
    ipam_release.add_argument(
        "--force", action="store_true",
        help="also free addresses whose attachment still exists: the pod keeps using it and "
             "the next allocation may hand it out again (a duplicate); with --park: park "
             "although the identity's node has a live topoipamd")
    ipam_conflicts = verb(ipam_verbs, "conflicts", cmd_ipam_conflicts,
                          "addresses a node's record holds that etcd gave another pod, or "
                          "no pool contains (after a restore), while that holds")
    ipam_conflicts.add_argument("-o", "--output", choices=["json"], help="a JSON list")
    ipam_resolve = verb(ipam_verbs, "resolve-conflict", cmd_ipam_resolve_conflict,
                        "settle one conflict: which side keeps the address (a conflict that "
                        "ended needs no side: its record is removed)")
    ipam_resolve.add_argument("node", help="the node that recorded the conflict")
    ipam_resolve.add_argument("ip", help="the address in conflict")
    ipam_resolve.add_argument("--keep", metavar="|".join(KEEP_SIDES),
                              help="record: the attachment the node's record names keeps it "
                                   "(the other pod must go); datastore: the pod etcd gave it "
                                   "to keeps it (the recorded one must go)")
    verb(ipam_verbs, "repair-index", cmd_ipam_repair_index,
         "rebuild the free-block index (borrowers' hints) from the blocks")
    ipam_configure = verb(ipam_verbs, "configure", cmd_ipam_configure, "change IPAMConfig")
    ipam_configure.add_argument("--strictaffinity", dest="strict_affinity", type=bool_flag,
                                metavar="true|false",
                                help="forbid borrowing addresses from other nodes' blocks")
    ipam_configure.add_argument("--max-blocks-per-host", type=whole_number, metavar="N",
                                help="blocks of each IP family a node may claim (0: no limit)")
    ipam_configure.add_argument("--auto-allocate-blocks", type=bool_flag, metavar="true|false",
                                help="let nodes claim new blocks")
    ipam_configure.add_argument("--ip-cooldown-seconds", type=whole_number, metavar="N",
                                help="keep released addresses out of use this long")
    ipam_configure.add_argument("--sticky-hold-seconds", type=whole_number, metavar="N",
                                help="how long DEL parks a sticky identity's address "
                                     "(default 600)")
    ipam_configure.add_argument("--sticky-takeover-seconds", type=whole_number, metavar="N",
                                help="after how long without a live topoipamd on its node a "
                                     "live sticky identity may be taken over by its ADD on "
                                     "another node (default 300; 0: never)")
    ipam_configure.add_argument("--warm-addresses", type=whole_number, metavar="N",
                                help="free addresses each node keeps ready in its own blocks, "
                                     "claiming blocks in the background (0: off)")

    explain = verb(verbs, "explain", cmd_explain,
                   "which pools select a node, why, and the order addresses come from")
    explain.add_argument("resource", choices=(*NODE_NAMES, "identity", "pod"),
                         help="node (no); identity: the nodes a sticky identity can move to "
                              "and keep its addresses; pod: the pool, block and address the "
                              "next ADD of NAMESPACE/NAME on --node would get, and why")
    explain.add_argument("name", help="the node, the sticky identity, or NAMESPACE/NAME")
    explain.add_argument("--node", help="explain pod: the node the pod would start on")
    explain.add_argument("--network", help="explain pod: the CNI network (its sticky identity "
                         "there, if one is recorded, is taken into account)")
    explain.add_argument("--ifname", help="explain pod: the interface (default eth0)")
    families = explain.add_mutually_exclusive_group()
    families.add_argument("--ipv6", action="store_true", help="explain pod: IPv6 too")
    families.add_argument("--ipv6-only", action="store_true", help="explain pod: IPv6 only")

    check = verbs.add_parser("check", help="cluster-wide reports",
                             description="cluster-wide reports", epilog=EXIT_CODES)
    check_verbs = check.add_subparsers(dest="check_verb", required=True, metavar="REPORT",
                                       help="coverage, placement or routes")
    coverage = verb(check_verbs, "coverage", cmd_check_coverage,
                    "nodes that no enabled pool selects (problems)")
    report_flags(coverage)
    placement = verb(check_verbs, "placement", cmd_check_placement,
                     "allocations outside their node's pools (warnings)")
    report_flags(placement)
    placement.add_argument("--fail-on-found", dest="fail_on_warnings", action="store_true",
                           help="the same as --fail-on-warnings (older name)")
    routes = verb(check_verbs, "routes", cmd_check_routes,
                  "per value of a node label (a rack): the prefixes a fabric must route there, "
                  "the aggregate of its nodes' blocks plus each block or address that breaks "
                  "aggregation (problems)")
    report_flags(routes)
    routes.add_argument("--by", metavar="LABEL", default=DEFAULT_ROUTE_LABEL,
                        help="the node label whose values are the routing domains "
                             f"(default {DEFAULT_ROUTE_LABEL})")
    routes.add_argument("-o", "--output", choices=["json"],
                        help="a json document instead of the table and lines")
    capacity = verb(check_verbs, "capacity", cmd_check_capacity,
                    "per value of a node label (a rack) and family: capacity, in use, free, "
                    "and the pods that can still start (problems: a domain with nothing free)")
    report_flags(capacity)
    capacity.add_argument("--by", metavar="LABEL", default=DEFAULT_ROUTE_LABEL,
                          help=f"the node label whose values are the domains "
                               f"(default {DEFAULT_ROUTE_LABEL})")
    capacity.add_argument("-o", "--output", choices=["json"],
                          help="a json document instead of the table and lines")
    for sub in (apply, create, delete, patch, label):
        dry_run_flags(sub)
    report = verb(verbs, "report", cmd_report,
                  "the address map: one self-contained HTML page (per pool and domain every "
                  "block as a tile, borrowed addresses and breaking prefixes marked, capacity "
                  "per domain, the findings of ipam check)")
    report.add_argument("--html", metavar="FILE", required=True, help="the page to write")
    report.add_argument("--by", metavar="LABEL", default=DEFAULT_ROUTE_LABEL,
                        help=f"the node label whose values are the domains "
                             f"(default {DEFAULT_ROUTE_LABEL})")
    cni_bundle.add_parser(verbs)
    return parser


def dry_run_flags(sub: argparse.ArgumentParser) -> None:
    """--dry-run and its options, on every verb that writes pools, nodes or reservations."""
    sub.add_argument("--dry-run", action="store_true",
                     help="validate, then show what the change would do (pools per node, "
                          "allocations left outside, prefixes breaking aggregation, capacity "
                          "per domain); write nothing")
    sub.add_argument("--fail-on-impact", action="store_true",
                     help="with --dry-run: exit 1 when a node would lose its pool or an "
                          "allocation fall outside its node's pools")
    sub.add_argument("--by", metavar="LABEL",
                     help=f"with --dry-run: the domains' label (default {DEFAULT_ROUTE_LABEL})")
    sub.add_argument("-o", "--output", choices=["json"], help="with --dry-run: a json document")



def usage_problem(args: argparse.Namespace) -> str | None:
    """Flag combinations argparse cannot express; checked before etcd is contacted."""
    verb = args.verb
    if verb == "create" and args.filename is not None and (args.kind or args.name or args.cidr):
        return "create takes either -f FILE or `ippool NAME --cidr CIDR`, not both"
    if verb == "create" and args.filename is None and not (args.kind and args.name and args.cidr):
        return "create needs -f FILE, or `ippool NAME --cidr CIDR`"
    if verb == "delete" and args.filename is not None and (args.kind or args.name):
        return "delete takes either -f FILE or KIND NAME, not both"
    if verb == "delete" and args.filename is None and not (args.kind and args.name):
        return "delete needs -f FILE, or KIND NAME (e.g. `delete ippool rack-0`)"
    if verb == "get" and GET_KINDS[args.kind] == "allocations" and args.name is not None:
        return "get allocations takes no NAME (use --node NODE to filter)"
    if verb == "patch" and (args.disabled is None) == (args.patch is None):
        return "patch needs exactly one of --disabled true|false and -p JSON"
    if verb == "get" and GET_KINDS[args.kind] != "allocations" and args.node is not None:
        return "--node only applies to `get allocations`"
    if verb == "explain" and args.resource == "pod" and not args.node:
        return "explain pod needs --node NODE (the node the pod would start on)"
    if verb == "explain" and args.resource != "pod" and (
            args.node is not None or args.network is not None or args.ifname is not None
            or args.ipv6 or args.ipv6_only):
        return "--node, --network, --ifname, --ipv6 and --ipv6-only only apply to `explain pod`"
    if getattr(args, "fail_on_impact", False) and not args.dry_run:
        return "--fail-on-impact only applies with --dry-run"
    if getattr(args, "output", None) == "json" and verb in DRY_RUN_VERBS and not args.dry_run:
        return f"{verb} -o json only applies with --dry-run"
    if verb in DRY_RUN_VERBS and args.by is not None and not args.dry_run:
        return "--by only applies with --dry-run"
    if verb == "delete" and getattr(args, "dry_run", False) and args.kind in NODE_NAMES:
        return "delete node has no --dry-run (it releases the node's addresses)"
    if verb == "ipam" and args.ipam_verb == "configure" and all(
        getattr(args, name) is None for name in CONFIG_FLAGS
    ):
        return "ipam configure needs at least one setting, e.g. --strictaffinity true"
    return None
