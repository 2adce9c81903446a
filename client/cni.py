"""``topoipam``: the CNI IPAM plugin (network config ``"ipam": {"type": "topoipam"}``).

The runtime execs this once per pod attachment, so its start-up is part of pod
start-up. It therefore imports only ``posix``, ``sys``, ``time``, the C ``_socket``
module and :mod:`topoipam.proto.cjson` (``json`` through the C ``_json``, without
``re``), never grpc, protobuf, asyncio or anything of the daemon, and makes
exactly one request to the daemon's fast CNI socket ``<socket>.cni`` (framing
in :mod:`topoipam.proto.cniwire`). Like host-local's ``main.go`` it is wiring
only: parse env and stdin, one call, print. This module holds the verbs;
the environment is read in :mod:`~topoipam.client.cni_env`, the configuration in
:mod:`~topoipam.client.cni_config`, addresses in :mod:`~topoipam.client.cni_addresses`,
the daemon call in :mod:`~topoipam.client.cni_call`, errors in
:mod:`~topoipam.client.cni_errors`. ``topoipamctl install-cni`` writes these
modules, wire and cjson as one file that runs under ``python -I -S``
(:mod:`topoipam.client.cni_bundle`).

Verbs: ADD (Allocate), DEL (Release; an unknown attachment is success), CHECK
(Get; cniVersion >= 0.4.0), STATUS and GC (Status, GarbageCollect; cniVersion
>= 1.1.0) and VERSION. Supported cniVersions: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0; the
result is printed in the version of the config (``ips[].version`` only before
1.0.0, and never ``ips[].interface``: IPAM plugins know no interfaces).

Only ADD checks the whole IPAM configuration; DEL, CHECK, STATUS and GC read
just ``socket`` and ``timeout``, so a config edited into something ADD rejects
never strands addresses. GC refuses a config without
``cni.dev/valid-attachments`` (``null`` means none are valid) rather than
release every address of the network on the node. CNI_NETNS and CNI_PATH are
not required: an IPAM plugin uses neither.

IPAM configuration; only ``type`` is required and unknown keys are an error
(CNI 2, "unsupported field", with the key and its value)::

    "ipam": {
      "type": "topoipam",
      "socket": "/run/topoipam/topoipamd.sock",  # the daemon's gRPC socket
      "timeout": 20,                # seconds for the whole daemon call
      "assign_ipv4": true,          # booleans; "true"/"false" strings are
      "assign_ipv6": false,         #   accepted too, as Calico configs use them
      "ipv4_pools": ["rack-0"],     # pool names or CIDRs; default: every
      "ipv6_pools": [],             #   enabled pool that selects this node
      "prefix": "pool",             # prefix length reported per address
      "gateway": "pool",            # or "none", an address, or a list (one per family)
      "routes": [{"dst": "0.0.0.0/0"}],                 # checked, then copied into
      "dns": {"nameservers": ["10.96.0.10"]}            #   the result
    }

``routes`` and ``dns`` are checked against CNI spec 1.1 and printed with their
addresses in canonical form: a route needs a ``dst`` CIDR, ``gw`` is an
address, ``mtu``, ``advmss``, ``priority`` and ``table`` are integers 0 to
2^32-1 and ``scope`` 0 to 255 (what the kernel's route attributes hold), and a
``null`` leaves a field unset, as Go's JSON decoding does; ``dns.nameservers``
are addresses, ``domain`` a string, ``search`` and ``options`` lists of
strings. Any other route or dns key is CNI 2 like an unknown ipam key.

``prefix`` decides the prefix length printed with each address: ``"pool"``
(default) the pool's CIDR, e.g. ``192.168.0.5/24`` — the on-link subnet a
bridge needs; ``"block"`` the block's CIDR (e.g. /26, for routed setups that
aggregate per-node blocks); ``"host"`` /32 or /128. If the daemon does not know
an address's pool (a handle of 0.1 whose pool was deleted), ``"pool"`` falls
back to the block.

``gateway`` decides the gateway printed with each address. ``"pool"``
(default): the address's own pool's gateway, as the daemon reports it — every
pool has one (its first usable address, or the IPPool's ``gateway``) unless it
opts out, and the daemon never hands it to a pod, so ``bridge`` with
``isGateway`` and ``ptp`` work on a fresh pool, with per-rack pools too.
``"none"``: no gateway in the result. An address or a list (at most one per
family): that gateway for every address of its family; the daemon never gives
those addresses to this network either. A repeated ADD prints what the first
did: the handle records pool, subnet and gateway per address.

Specific addresses (one per family at most) come from ``IP=a.b.c.d[,x::y]`` in
CNI_ARGS, ``runtimeConfig.ips`` (the ``ips`` capability) and ``args.cni.ips``;
a ``/prefix`` must be a valid length (0-32, 0-128; config error 7 naming the
source otherwise) and is then ignored: the pool decides the prefix printed, as
host-local's range does. CNI_ARGS ``K8S_POD_NAMESPACE``, ``K8S_POD_NAME``,
``K8S_POD_INFRA_CONTAINER_ID`` and ``K8S_POD_UID`` are stored with the
allocation as the attributes ``namespace``, ``pod``,
``pod_infra_container_id`` and ``pod_uid``.

``"sticky": true`` keys the allocation by its owner, not the container: the
identity is ``args.cni.identity`` if given, else
``<network>/<K8S_POD_NAMESPACE>/<K8S_POD_NAME>/<ifname>`` (neither: config
error 7). DEL parks the address for the identity's next ADD
(docs/design.md#sticky-addresses).

An IPv4-mapped IPv6 address (``::ffff:10.77.0.78``) is read as the IPv4
address wherever the plugin reads one (requested addresses, ``gateway``, route
``dst`` and ``gw``, nameservers, prevResult): Go's ``net.ParseIP(...).To4()``
does the same, so host-local and the plugins that read our result already
treat it as IPv4. A mapped CIDR is the IPv4 one (``::ffff:10.0.0.0/104`` is
``10.0.0.0/8``), so its prefix must be 96-128.

CHECK passes when every address the daemon holds for the attachment is in
prevResult (by address; the prefix printed is a presentation choice). The
prevResult may hold more: a later plugin in the chain may have added
addresses, and the spec says CHECK must allow for that.

The environment: CNI_CONTAINERID (and the network name) is a letter or digit,
then letters, digits, ``_ . -``, at most 255 characters; CNI_IFNAME is at most
15 *bytes* (Linux IFNAMSIZ less the NUL), not ``.`` or ``..``, without ``/``,
``:`` or whitespace; CNI_CONTAINERID, CNI_IFNAME and CNI_ARGS must be UTF-8.

Where we are stricter or more lenient than host-local on purpose:

* Unknown ipam, route and dns keys are refused (CNI 2); host-local, through
  Go's JSON decoding, ignores them. A misspelt key (``ipv4Pools``, a route's
  ``gateway``) would otherwise silently change what a pod gets, and a route or
  dns key we passed on would be dropped by the next Go plugin anyway.
* Routes and dns are validated; host-local copies them. A bad value (``"mtu":
  "x"``, nameserver ``"not-an-ip"``) otherwise fails later and further from
  its cause, in the main plugin or in the pod's resolv.conf. Nameservers with
  a zone (``fe80::1%eth0``) are refused, as Go's ``net.ParseIP`` refuses them.
* Environment bytes that are not UTF-8 are refused (4); Go passes bytes
  through. The daemon's API carries text (JSON and protobuf strings are
  UTF-8), so such a name could not be stored faithfully. DEL and CHECK do not
  read CNI_ARGS, so they never fail on it.
* Container IDs longer than 255 characters are refused; the spec sets no
  limit, the daemon's handle ids do. Interface names follow the kernel's
  rules, except that any Unicode whitespace (not only ASCII) is refused.
* DEL releases an ifname of at most 15 characters even when it is more than
  15 bytes: earlier versions counted characters and may hold an address for
  one. DEL of an attachment we never saw is success, as for host-local.
* CHECK also compares the held addresses with prevResult; host-local only
  checks that it holds an address for the container and interface.

Errors are CNI error JSON on stdout with exit status 1, never a traceback:

====  =================================================================
1     unsupported cniVersion (or a verb the config's cniVersion lacks)
2     unsupported field: an unknown ipam, route or dns key (key = value)
4     bad environment: CNI_COMMAND, CNI_CONTAINERID, CNI_IFNAME, CNI_ARGS
      (unset, invalid with the reason, or not UTF-8)
5     stdin could not be read
6     stdin is not a JSON object
7     invalid network or IPAM configuration
11    daemon unreachable or timed out, or etcd down: try again later
50    STATUS: the daemon is unreachable, not in sync, or etcd is down
1xx   the daemon's own codes (110 no pool selects the node, 111 pools
      exhausted, 112 requested address unavailable, ...)
113   CHECK: the attachment holds no address, or one prevResult lacks
999   anything unexpected (the message says what)
====  =================================================================
"""

from __future__ import annotations

# posix, not os: os imports _collections_abc, ~1 ms; main() needs only posix._exit.
import posix
import sys

from topoipam.client import cni_addresses, cni_call, cni_config, cni_env, cni_errors
from topoipam.proto import cjson
from topoipam.proto import cniwire as wire

# typing costs ~2 ms to import and is only needed by the type checker (which
# treats any TYPE_CHECKING as true); annotations are strings at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    Json = dict[str, Any]


def main() -> None:
    """Console-script entry: run one CNI invocation and exit with its status."""
    try:
        try:
            stdin = sys.stdin.buffer.read() if sys.stdin is not None else b""
        except OSError as exc:
            status, output = 1, cni_errors.error_json(
                cni_config.LATEST_VERSION, wire.CNI_IO_ERROR, "cannot read stdin", str(exc))
        else:
            status, output = run(cni_env.process_environ(), stdin)
    except BaseException as exc:  # e.g. interrupted while reading stdin
        status, output = 1, cni_errors.unexpected_error(cni_config.LATEST_VERSION, exc)
    if output:
        try:
            sys.stdout.write(output + "\n")
            sys.stdout.flush()
        except OSError:
            status = 1  # nobody reads the answer; the exit status still tells
    try:
        sys.stderr.flush()
    except (AttributeError, OSError):
        pass
    # Everything the runtime reads is written and flushed, the daemon's socket
    # closed: the process ends here. The interpreter's own teardown (freeing
    # every module and object) would cost a pod ~1 ms, a sixth of a bare
    # interpreter's whole run, for nothing anyone can see.
    posix._exit(status)


def run(environ: Mapping[str, str], stdin: bytes) -> tuple[int, str]:
    """Execute one invocation; returns (exit status, stdout). Never raises."""
    version = cni_config.LATEST_VERSION  # what error JSON says until the config tells us better
    try:
        command = environ.get("CNI_COMMAND", "")
        if command == "VERSION":
            return 0, _version_info(stdin)
        verb = _VERBS.get(command)
        if verb is None:
            raise cni_errors.CniError(
                wire.CNI_INVALID_ENV,
                f"unknown CNI_COMMAND {command!r}" if command else "CNI_COMMAND is not set",
                "expected one of ADD, DEL, CHECK, STATUS, GC, VERSION",
            )
        config = cni_config.decode_config(stdin)
        if isinstance(config.get("cniVersion"), str) and config["cniVersion"]:
            version = config["cniVersion"]
        cni_config.check_version(config, command)
        return 0, verb(environ, config, version)
    except cni_errors.CniError as err:
        return 1, cni_errors.error_json(version, err.code, err.msg, err.details)
    except BaseException as exc:  # the last line of defence: JSON, never a traceback
        return 1, cni_errors.unexpected_error(version, exc)


def _cmd_add(environ: Mapping[str, str], config: Json, version: str) -> str:
    attachment = cni_env.attachment_of(environ, config)
    ipam = cni_config.ipam_section(config)
    cni_config.refuse_unknown_keys(ipam, cni_config.IPAM_KEYS, "ipam")
    socket_path, timeout = cni_config.connection(ipam)
    prefix = ipam.get("prefix", "pool")
    if prefix not in cni_config.PREFIX_MODES:
        raise cni_errors.config_error(
            f"ipam.prefix must be one of {', '.join(cni_config.PREFIX_MODES)}, not {prefix!r}"
        )
    gateways = cni_config.parse_gateways(ipam.get("gateway", cni_config.GATEWAY_POOL))
    routes = cni_config.checked_routes(ipam.get("routes"))
    dns = cni_config.checked_dns(ipam.get("dns"))
    cni_args = cni_env.parse_cni_args(environ)
    request: Json = {
        "attachment": attachment,
        "assign_ipv4": cni_config.flag(ipam, "assign_ipv4", True),
        "assign_ipv6": cni_config.flag(ipam, "assign_ipv6", False),
        "ipv4_pools": cni_config.strings(ipam.get("ipv4_pools"), "ipam.ipv4_pools"),
        "ipv6_pools": cni_config.strings(ipam.get("ipv6_pools"), "ipam.ipv6_pools"),
        "ips": cni_config.requested_ips(cni_args, config),
        "attributes": {
            attribute: cni_args[key] for key, attribute in cni_env.K8S_ATTRIBUTES.items()
            if cni_args.get(key)
        },
        # Configured gateways are never handed out to this network.
        "gateways": list(gateways.values()) if gateways else [],
    }
    if cni_config.flag(ipam, "sticky", False):
        request["identity"] = cni_config.owner_identity(attachment, cni_args, config)
    response = cni_call.call(socket_path, timeout, "Allocate", request)
    ips = [_result_ip(address, prefix, gateways, version)
           for address in cni_call.canonical_addresses(response)]
    if not ips:
        raise cni_errors.CniError(wire.CNI_INTERNAL_ERROR, "the daemon allocated no address",
                                  cjson.dumps(response))
    result: Json = {"cniVersion": version, "ips": ips}
    if routes:
        result["routes"] = routes
    result["dns"] = dns
    return cjson.dumps(result)


def _cmd_del(environ: Mapping[str, str], config: Json, version: str) -> str:
    attachment = cni_env.attachment_of(environ, config, releasing=True)
    socket_path, timeout = cni_config.connection(cni_config.ipam_section(config))
    try:
        cni_call.call(socket_path, timeout, "Release", {"attachment": attachment})
    except cni_errors.DaemonError as err:
        # Releasing an unknown attachment is success (DEL must be idempotent).
        if err.status != "NOT_FOUND":
            raise
    return ""


def _cmd_check(environ: Mapping[str, str], config: Json, version: str) -> str:
    attachment = cni_env.attachment_of(environ, config)
    socket_path, timeout = cni_config.connection(cni_config.ipam_section(config))
    handle = f"{attachment['network']}/{attachment['container_id']}/{attachment['ifname']}"
    try:
        response = cni_call.call(socket_path, timeout, "Get", {"attachment": attachment})
    except cni_errors.DaemonError as err:
        if err.status != "NOT_FOUND":
            raise
        response = {}
    held = {address["ip"] for address in cni_call.canonical_addresses(response)}
    if not held:
        raise cni_errors.CniError(wire.CNI_CHECK_FAILED, f"no address is allocated to {handle}")
    previous = config.get("prevResult")
    if previous is not None:
        # Addresses only: the prefix length printed is a presentation choice
        # (ipam.prefix) that may differ from the one in force at ADD. And only
        # ours: a later plugin in the chain may have added addresses of its
        # own, which the spec says CHECK must allow for.
        listed = cni_config.previous_ips(previous)
        missing = held - listed
        if missing:
            raise cni_errors.CniError(
                wire.CNI_CHECK_FAILED,
                f"prevResult lacks {', '.join(sorted(missing))}, held by {handle}",
                f"prevResult has {', '.join(sorted(listed)) or 'none'}; "
                f"the daemon holds {', '.join(sorted(held))}",
            )
    return ""


def _cmd_status(environ: Mapping[str, str], config: Json, version: str) -> str:
    ipam = cni_config.ipam_section(config)
    socket_path, timeout = cni_config.connection(ipam)
    # What an ADD of this network would ask for, so the daemon can say whether
    # one can succeed (a config ADD would refuse is not ready either).
    try:
        request = {
            "assign_ipv4": cni_config.flag(ipam, "assign_ipv4", True),
            "assign_ipv6": cni_config.flag(ipam, "assign_ipv6", False),
            "ipv4_pools": cni_config.strings(ipam.get("ipv4_pools"), "ipam.ipv4_pools"),
            "ipv6_pools": cni_config.strings(ipam.get("ipv6_pools"), "ipam.ipv6_pools"),
        }
        status = cni_call.call(socket_path, timeout, "Status", request)
    except cni_errors.CniError as err:
        raise cni_errors.CniError(wire.CNI_NOT_AVAILABLE, err.msg, err.details) from None
    problems = []
    if not status.get("in_sync"):
        problems.append("its cache is not in sync with etcd")
    if not status.get("etcd_reachable"):
        problems.append(f"etcd unreachable: {status.get('etcd_error') or 'no reason given'}")
    if not problems and not status.get("ready"):
        problems.append(str(status.get("not_ready_reason") or "no reason given"))
    if problems:
        node = status.get("node") or "?"
        raise cni_errors.CniError(
            wire.CNI_NOT_AVAILABLE,
            f"topoipam daemon on node {node} is not ready: {'; '.join(problems)}",
        )
    return ""


def _cmd_gc(environ: Mapping[str, str], config: Json, version: str) -> str:
    network = cni_env.network_name(config)
    socket_path, timeout = cni_config.connection(cni_config.ipam_section(config))
    # libcni sends the list under both names (the spec once used the second).
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        if key in config:
            listed = config[key]
            break
    else:
        # Refuse rather than read "no valid attachments": that would release
        # every address of this network on the node.
        raise cni_errors.config_error("GC config has no cni.dev/valid-attachments")
    if listed is None:
        listed = []  # a Go nil slice: really no valid attachments
    if not isinstance(listed, list):
        raise cni_errors.config_error("cni.dev/valid-attachments must be a list")
    keep = []
    for entry in listed:
        if not isinstance(entry, dict) or not isinstance(entry.get("containerID"), str) or \
                not isinstance(entry.get("ifname"), str):
            raise cni_errors.config_error(
                "each cni.dev/valid-attachments entry needs string containerID and ifname",
                cjson.dumps(entry),
            )
        # An ID or ifname that ADD would refuse can own no addresses, so it
        # can safely be left out instead of failing the whole GC.
        container_id, ifname = entry["containerID"], entry["ifname"]
        if cni_env.valid_container_id(container_id) and cni_env.valid_ifname(ifname):
            keep.append({"network": network, "container_id": container_id, "ifname": ifname})
    cni_call.call(socket_path, timeout, "GarbageCollect",
                  {"network": network, "valid_attachments": keep})
    return ""


_VERBS = {"ADD": _cmd_add, "DEL": _cmd_del, "CHECK": _cmd_check, "STATUS": _cmd_status,
          "GC": _cmd_gc}


def _version_info(stdin: bytes) -> str:
    # VERSION must answer whatever stdin holds: runtimes call it to learn what
    # we support, possibly with a version we do not.
    requested = cni_config.LATEST_VERSION
    try:
        config = cjson.loads(stdin or b"{}")
        if isinstance(config, dict) and config.get("cniVersion") in cni_config.SUPPORTED_VERSIONS:
            requested = config["cniVersion"]
    except (ValueError, RecursionError):
        pass
    return cjson.dumps({"cniVersion": requested,
                        "supportedVersions": list(cni_config.SUPPORTED_VERSIONS)})


def _result_ip(address: Json, prefix: str, gateways: dict[int, str] | None,
               version: str) -> Json:
    family, ip = cni_addresses.canonical_ip(address["ip"])
    length: int | None = None
    if prefix == "pool":
        length = _prefix_length(address.get("pool_cidr"))
    if prefix in ("pool", "block") and length is None:
        length = _prefix_length(address.get("block"))
    if length is None:
        length = 32 if family == 4 else 128
    entry: Json = {"version": str(family)} if version in cni_config.LEGACY_VERSIONS else {}
    entry["address"] = f"{ip}/{length}"
    gateway = address.get("gateway") if gateways is None else gateways.get(family)
    if gateway and isinstance(gateway, str):
        entry["gateway"] = cni_addresses.canonical_ip(gateway, "the daemon's gateway")[1]
    return entry


def _prefix_length(cidr: object) -> int | None:
    if not isinstance(cidr, str) or "/" not in cidr:
        return None
    text = cidr.rpartition("/")[2]
    return int(text) if text.isdigit() else None
