"""``topoipam``: the CNI IPAM plugin (network config ``"ipam": {"type": "topoipam"}``).

The runtime execs this once per pod attachment, so its start-up is part of pod
start-up. It therefore imports only ``posix``, ``sys``, ``time``, the C ``_socket``
module and :mod:`topoipam.proto.cjson` (``json`` through the C ``_json``, without
``re``), never grpc, protobuf, asyncio or anything of the daemon, and makes
exactly one request to the daemon's fast CNI socket ``<socket>.cni`` (framing
in :mod:`topoipam.proto.cniwire`). Like host-local's ``main.go`` it is wiring
only: parse env and stdin, one call, print. ``topoipamctl install-cni`` writes
this module, wire and cjson as one file that runs under ``python -I -S``
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
error 7). DEL parks the address for the identity's next ADD (see the README).

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

# _socket, not socket: socket.py pulls in selectors and builds IntEnums at
# import, ~4 ms of a plugin whose whole start-up budget is a few tens of ms.
# posix, not os: os imports _collections_abc, ~1 ms; the plugin needs only the
# environment, which posix holds as the bytes the runtime passed.
import _socket
import posix
import sys
import time

from topoipam.proto import cjson
from topoipam.proto import cniwire as wire

# typing costs ~2 ms to import and is only needed by the type checker (which
# treats any TYPE_CHECKING as true); annotations are strings at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    Json = dict[str, Any]

# 0.3.0 has 0.3.1's result format (0.3.1 only fixed the spec's text); runtimes and
# Debian's host-local accept it.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
# Results before 1.0.0 carry ips[].version.
_LEGACY_VERSIONS = ("0.3.0", "0.3.1", "0.4.0")

# ipam.gateway: each address with its own pool's gateway (the default), or none.
GATEWAY_POOL = "pool"
GATEWAY_NONE = "none"
# Long enough for a daemon retrying etcd conflicts, well inside the runtime's
# own CNI timeout, so a stuck daemon surfaces as a retriable error.
DEFAULT_TIMEOUT = 20.0

ERR_INCOMPATIBLE_VERSION = wire.CNI_INCOMPATIBLE_VERSION
ERR_UNSUPPORTED_FIELD = wire.CNI_UNSUPPORTED_FIELD
ERR_INVALID_ENV = wire.CNI_INVALID_ENV
ERR_IO = wire.CNI_IO_ERROR
ERR_DECODE = wire.CNI_DECODE_ERROR
ERR_INVALID_CONFIG = wire.CNI_INVALID_CONFIG
ERR_TRY_AGAIN = wire.CNI_TRY_AGAIN
ERR_NOT_AVAILABLE = wire.CNI_NOT_AVAILABLE
ERR_CHECK_FAILED = wire.CNI_CHECK_FAILED
ERR_INTERNAL = wire.CNI_INTERNAL_ERROR

_IPAM_KEYS = frozenset({
    "type", "socket", "timeout", "assign_ipv4", "assign_ipv6", "ipv4_pools", "ipv6_pools",
    "prefix", "gateway", "routes", "dns", "sticky",
})
_PREFIX_MODES = ("pool", "block", "host")
# CNI spec 1.1 route fields with integer values, and the largest each can take
# (the kernel's u32 route attributes; rtm_scope is a u8).
_ROUTE_INTEGERS = {"mtu": 2**32 - 1, "advmss": 2**32 - 1, "priority": 2**32 - 1,
                   "table": 2**32 - 1, "scope": 255}
_ROUTE_KEYS = frozenset({"dst", "gw", *_ROUTE_INTEGERS})
_DNS_KEYS = frozenset({"nameservers", "domain", "search", "options"})
# The first 12 bytes of an IPv4-mapped IPv6 address (::ffff:a.b.c.d).
_V4_MAPPED = bytes(10) + b"\xff\xff"
# Linux IFNAMSIZ (16) less the terminating NUL.
_IFNAME_BYTES = 15
_ID_LENGTH = 255
_K8S_ATTRIBUTES = {
    "K8S_POD_NAMESPACE": "namespace",
    "K8S_POD_NAME": "pod",
    "K8S_POD_INFRA_CONTAINER_ID": "pod_infra_container_id",
    "K8S_POD_UID": "pod_uid",
}
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ID_CHARS = _ALNUM | frozenset("_.-")


class CniError(Exception):
    """A failure reported to the runtime as CNI error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


class DaemonError(CniError):
    """The daemon answered with an error; ``status`` is its gRPC status name."""

    def __init__(self, status: str, code: int, msg: str, details: str) -> None:
        super().__init__(code, msg, details)
        self.status = status


# --- entry points -----------------------------------------------------------


def main() -> None:
    """Console-script entry: run one CNI invocation and exit with its status."""
    try:
        try:
            stdin = sys.stdin.buffer.read() if sys.stdin is not None else b""
        except OSError as exc:
            status, output = 1, _error_json(LATEST_VERSION, ERR_IO, "cannot read stdin", str(exc))
        else:
            status, output = run(_environ(), stdin)
    except BaseException as exc:  # e.g. interrupted while reading stdin
        status, output = 1, _unexpected(LATEST_VERSION, exc)
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
    version = LATEST_VERSION  # what error JSON says until the config tells us better
    try:
        command = environ.get("CNI_COMMAND", "")
        if command == "VERSION":
            return 0, _version_info(stdin)
        verb = _VERBS.get(command)
        if verb is None:
            raise CniError(
                ERR_INVALID_ENV,
                f"unknown CNI_COMMAND {command!r}" if command else "CNI_COMMAND is not set",
                "expected one of ADD, DEL, CHECK, STATUS, GC, VERSION",
            )
        config = _decode_config(stdin)
        if isinstance(config.get("cniVersion"), str) and config["cniVersion"]:
            version = config["cniVersion"]
        _check_version(config, command)
        return 0, verb(environ, config, version)
    except CniError as err:
        return 1, _error_json(version, err.code, err.msg, err.details)
    except BaseException as exc:  # the last line of defence: JSON, never a traceback
        return 1, _unexpected(version, exc)


# --- verbs ------------------------------------------------------------------


def _cmd_add(environ: Mapping[str, str], config: Json, version: str) -> str:
    attachment = _attachment(environ, config)
    ipam = _ipam(config)
    _refuse_unknown_keys(ipam, _IPAM_KEYS, "ipam")
    socket_path, timeout = _connection(ipam)
    prefix = ipam.get("prefix", "pool")
    if prefix not in _PREFIX_MODES:
        raise _config_error(
            f"ipam.prefix must be one of {', '.join(_PREFIX_MODES)}, not {prefix!r}"
        )
    gateways = _gateways(ipam.get("gateway", GATEWAY_POOL))
    routes = _routes(ipam.get("routes"))
    dns = _dns(ipam.get("dns"))
    cni_args = _cni_args(environ)
    request: Json = {
        "attachment": attachment,
        "assign_ipv4": _flag(ipam, "assign_ipv4", True),
        "assign_ipv6": _flag(ipam, "assign_ipv6", False),
        "ipv4_pools": _strings(ipam.get("ipv4_pools"), "ipam.ipv4_pools"),
        "ipv6_pools": _strings(ipam.get("ipv6_pools"), "ipam.ipv6_pools"),
        "ips": _requested_ips(cni_args, config),
        "attributes": {
            attribute: cni_args[key] for key, attribute in _K8S_ATTRIBUTES.items()
            if cni_args.get(key)
        },
        # Configured gateways are never handed out to this network.
        "gateways": list(gateways.values()) if gateways else [],
    }
    if _flag(ipam, "sticky", False):
        request["identity"] = _identity(attachment, cni_args, config)
    response = _call(socket_path, timeout, "Allocate", request)
    ips = [_result_ip(address, prefix, gateways, version) for address in _addresses(response)]
    if not ips:
        raise CniError(ERR_INTERNAL, "the daemon allocated no address", cjson.dumps(response))
    result: Json = {"cniVersion": version, "ips": ips}
    if routes:
        result["routes"] = routes
    result["dns"] = dns
    return cjson.dumps(result)


def _cmd_del(environ: Mapping[str, str], config: Json, version: str) -> str:
    attachment = _attachment(environ, config, releasing=True)
    socket_path, timeout = _connection(_ipam(config))
    try:
        _call(socket_path, timeout, "Release", {"attachment": attachment})
    except DaemonError as err:
        # Releasing an unknown attachment is success (DEL must be idempotent).
        if err.status != "NOT_FOUND":
            raise
    return ""


def _cmd_check(environ: Mapping[str, str], config: Json, version: str) -> str:
    attachment = _attachment(environ, config)
    socket_path, timeout = _connection(_ipam(config))
    handle = f"{attachment['network']}/{attachment['container_id']}/{attachment['ifname']}"
    try:
        response = _call(socket_path, timeout, "Get", {"attachment": attachment})
    except DaemonError as err:
        if err.status != "NOT_FOUND":
            raise
        response = {}
    held = {address["ip"] for address in _addresses(response)}
    if not held:
        raise CniError(ERR_CHECK_FAILED, f"no address is allocated to {handle}")
    previous = config.get("prevResult")
    if previous is not None:
        # Addresses only: the prefix length printed is a presentation choice
        # (ipam.prefix) that may differ from the one in force at ADD. And only
        # ours: a later plugin in the chain may have added addresses of its
        # own, which the spec says CHECK must allow for.
        listed = _previous_ips(previous)
        missing = held - listed
        if missing:
            raise CniError(
                ERR_CHECK_FAILED,
                f"prevResult lacks {', '.join(sorted(missing))}, held by {handle}",
                f"prevResult has {', '.join(sorted(listed)) or 'none'}; "
                f"the daemon holds {', '.join(sorted(held))}",
            )
    return ""


def _cmd_status(environ: Mapping[str, str], config: Json, version: str) -> str:
    ipam = _ipam(config)
    socket_path, timeout = _connection(ipam)
    # What an ADD of this network would ask for, so the daemon can say whether
    # one can succeed (a config ADD would refuse is not ready either).
    try:
        request = {
            "assign_ipv4": _flag(ipam, "assign_ipv4", True),
            "assign_ipv6": _flag(ipam, "assign_ipv6", False),
            "ipv4_pools": _strings(ipam.get("ipv4_pools"), "ipam.ipv4_pools"),
            "ipv6_pools": _strings(ipam.get("ipv6_pools"), "ipam.ipv6_pools"),
        }
        status = _call(socket_path, timeout, "Status", request)
    except CniError as err:
        raise CniError(ERR_NOT_AVAILABLE, err.msg, err.details) from None
    problems = []
    if not status.get("in_sync"):
        problems.append("its cache is not in sync with etcd")
    if not status.get("etcd_reachable"):
        problems.append(f"etcd unreachable: {status.get('etcd_error') or 'no reason given'}")
    if not problems and not status.get("ready"):
        problems.append(str(status.get("not_ready_reason") or "no reason given"))
    if problems:
        node = status.get("node") or "?"
        raise CniError(
            ERR_NOT_AVAILABLE, f"topoipam daemon on node {node} is not ready: {'; '.join(problems)}"
        )
    return ""


def _cmd_gc(environ: Mapping[str, str], config: Json, version: str) -> str:
    network = _network(config)
    socket_path, timeout = _connection(_ipam(config))
    # libcni sends the list under both names (the spec once used the second).
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        if key in config:
            listed = config[key]
            break
    else:
        # Refuse rather than read "no valid attachments": that would release
        # every address of this network on the node.
        raise _config_error("GC config has no cni.dev/valid-attachments")
    if listed is None:
        listed = []  # a Go nil slice: really no valid attachments
    if not isinstance(listed, list):
        raise _config_error("cni.dev/valid-attachments must be a list")
    keep = []
    for entry in listed:
        if not isinstance(entry, dict) or not isinstance(entry.get("containerID"), str) or \
                not isinstance(entry.get("ifname"), str):
            raise _config_error(
                "each cni.dev/valid-attachments entry needs string containerID and ifname",
                cjson.dumps(entry),
            )
        # An ID or ifname that ADD would refuse can own no addresses, so it
        # can safely be left out instead of failing the whole GC.
        container_id, ifname = entry["containerID"], entry["ifname"]
        if _valid_container_id(container_id) and _valid_ifname(ifname):
            keep.append({"network": network, "container_id": container_id, "ifname": ifname})
    _call(socket_path, timeout, "GarbageCollect", {"network": network, "valid_attachments": keep})
    return ""


_VERBS = {"ADD": _cmd_add, "DEL": _cmd_del, "CHECK": _cmd_check, "STATUS": _cmd_status,
          "GC": _cmd_gc}
# The first cniVersion whose spec has the verb (skel refuses older configs too).
_VERB_SINCE = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}


def _version_info(stdin: bytes) -> str:
    # VERSION must answer whatever stdin holds: runtimes call it to learn what
    # we support, possibly with a version we do not.
    requested = LATEST_VERSION
    try:
        config = cjson.loads(stdin or b"{}")
        if isinstance(config, dict) and config.get("cniVersion") in SUPPORTED_VERSIONS:
            requested = config["cniVersion"]
    except (ValueError, RecursionError):
        pass
    return cjson.dumps({"cniVersion": requested, "supportedVersions": list(SUPPORTED_VERSIONS)})


# --- the daemon call --------------------------------------------------------


def _connect(sock: _socket.socket, path: str, deadline: float) -> None:
    """Connect, waiting while the daemon's listen queue is full (EAGAIN on unix sockets)."""
    pause = 0.001
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _call(socket_path: str, timeout: float, method: str, request: Json) -> Json:
    """One request on ``<socket_path>.cni``; the response message or a CniError.

    Unreachable, timed out or cut off mid-answer are all CNI 11: every verb is
    safe to retry (ADD is idempotent per attachment, DEL of a released one is
    success).
    """
    path = wire.cni_socket_path(socket_path)
    try:
        frame = wire.encode_frame({"method": method, "request": request})
    except wire.FrameError as exc:
        raise _config_error(f"cannot send the {method} request", str(exc)) from None
    deadline = time.monotonic() + timeout
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sock.settimeout(timeout)
            _connect(sock, path, deadline)
        except OSError as exc:
            raise CniError(
                ERR_TRY_AGAIN, f"topoipam daemon unreachable at {path}",
                f"{exc.strerror or exc}; is topoipamd running?",
            ) from None
        try:
            sock.sendall(frame)
            header = _receive(sock, wire.HEADER_SIZE, deadline)
            answer = wire.decode_payload(_receive(sock, wire.frame_length(header), deadline))
        except TimeoutError:
            raise CniError(
                ERR_TRY_AGAIN,
                f"topoipam daemon at {path} did not answer {method} within {timeout:g}s",
            ) from None
        except OSError as exc:
            raise CniError(
                ERR_TRY_AGAIN, f"topoipam daemon at {path} dropped the {method} call",
                str(exc.strerror or exc),
            ) from None
        except wire.FrameError as exc:
            raise CniError(ERR_INTERNAL, f"malformed answer from topoipam daemon at {path}",
                           str(exc)) from None
    finally:
        sock.close()
    status = answer.get("code")
    if status == "OK":
        response = answer.get("response", {})
        if not isinstance(response, dict):
            raise CniError(ERR_INTERNAL, f"malformed {method} answer from topoipam daemon",
                           cjson.dumps(answer))
        return response
    cni_code = answer.get("cni_code")
    if not isinstance(cni_code, int) or isinstance(cni_code, bool):
        cni_code = ERR_TRY_AGAIN if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED") else ERR_INTERNAL
    message = answer.get("message") or f"{method} failed"
    raise DaemonError(str(status), cni_code, str(message), f"{method}: {status}")


def _receive(sock: _socket.socket, size: int, deadline: float) -> bytes:
    chunks = []
    while size > 0:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(min(size, 65536))
        if not chunk:
            raise ConnectionResetError(0, "connection closed before the answer was complete")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _addresses(response: Json) -> list[Json]:
    """The response's addresses, each with its ``ip`` made canonical."""
    addresses = response.get("addresses", [])
    try:
        if not isinstance(addresses, list) or not all(isinstance(a, dict) for a in addresses):
            raise TypeError
        return [{**a, "ip": _canonical_ip(a.get("ip"))[1]} for a in addresses]
    except (TypeError, CniError):
        raise CniError(ERR_INTERNAL, "malformed address list from topoipam daemon",
                       cjson.dumps(response)) from None


# --- result -----------------------------------------------------------------


def _result_ip(address: Json, prefix: str, gateways: dict[int, str] | None,
               version: str) -> Json:
    family, ip = _canonical_ip(address["ip"])
    length: int | None = None
    if prefix == "pool":
        length = _prefix_length(address.get("pool_cidr"))
    if prefix in ("pool", "block") and length is None:
        length = _prefix_length(address.get("block"))
    if length is None:
        length = 32 if family == 4 else 128
    entry: Json = {"version": str(family)} if version in _LEGACY_VERSIONS else {}
    entry["address"] = f"{ip}/{length}"
    gateway = address.get("gateway") if gateways is None else gateways.get(family)
    if gateway and isinstance(gateway, str):
        entry["gateway"] = _canonical_ip(gateway, "the daemon's gateway")[1]
    return entry


def _prefix_length(cidr: object) -> int | None:
    if not isinstance(cidr, str) or "/" not in cidr:
        return None
    text = cidr.rpartition("/")[2]
    return int(text) if text.isdigit() else None


# --- config and environment -------------------------------------------------


def _decode_config(stdin: bytes) -> Json:
    try:
        config = cjson.loads(stdin)
    except (ValueError, RecursionError) as exc:
        raise CniError(ERR_DECODE, "network config on stdin is not valid JSON", str(exc)) from None
    if not isinstance(config, dict):
        raise CniError(ERR_DECODE, "network config on stdin must be a JSON object")
    return config


def _check_version(config: Json, command: str) -> None:
    version = config.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        shown = f"cniVersion {version!r}" if version else "no cniVersion"
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI version: config has {shown}",
            f"topoipam supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    since = _VERB_SINCE.get(command)
    if since and SUPPORTED_VERSIONS.index(version) < SUPPORTED_VERSIONS.index(since):
        raise CniError(
            ERR_INCOMPATIBLE_VERSION, f"config version {version} does not allow {command}",
            f"{command} needs cniVersion {since} or later",
        )


def _network(config: Json) -> str:
    name = config.get("name")
    if isinstance(name, str):
        problem = _id_problem(name)
        if not problem:
            return name
    else:
        problem = "it is not a string"
    raise _config_error(f"invalid network name {_shown(name)}: {problem}",
                        "name must start with a letter or digit, then letters, digits, _ . -")


def _attachment(environ: Mapping[str, str], config: Json, releasing: bool = False) -> Json:
    """The attachment of CNI_CONTAINERID / CNI_IFNAME on the config's network.

    ``releasing`` (DEL) lets through an ifname of up to 15 characters but more
    than 15 bytes: earlier versions of this plugin counted characters, and with
    ptp (which allocates before the kernel sees the name) may have allocated for one.
    """
    container_id = _env(environ, "CNI_CONTAINERID")
    if not container_id:
        raise CniError(ERR_INVALID_ENV, "CNI_CONTAINERID is not set")
    problem = _id_problem(container_id)
    if problem:
        raise CniError(ERR_INVALID_ENV,
                       f"invalid CNI_CONTAINERID {_shown(container_id)}: {problem}",
                       f"1-{_ID_LENGTH} characters: a letter or digit, then letters, digits, _ . -")
    ifname = _env(environ, "CNI_IFNAME")
    if not ifname:
        raise CniError(ERR_INVALID_ENV, "CNI_IFNAME is not set")
    problem = _ifname_problem(ifname, releasing)
    if problem:
        raise CniError(ERR_INVALID_ENV, f"invalid CNI_IFNAME {_shown(ifname)}: {problem}",
                       f"1-{_IFNAME_BYTES} bytes, not . or .., without / : or whitespace")
    return {"network": _network(config), "container_id": container_id, "ifname": ifname}


def _environ() -> dict[str, str]:
    """``os.environ`` as a dict: decoded as os decodes it (surrogateescape)."""
    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    return {key.decode(encoding, errors): value.decode(encoding, errors)
            for key, value in posix.environ.items()}


def _fsencode(text: str) -> bytes:
    """``os.fsencode``: the bytes the environment held."""
    return text.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def _env(environ: Mapping[str, str], name: str) -> str:
    """A CNI_* variable ('' if unset); CNI error 4 if its bytes are not UTF-8.

    Python decodes the environment with surrogateescape, so bytes that are not
    UTF-8 arrive as lone surrogates; _fsencode gives the original bytes back.
    """
    value = environ.get(name, "")
    try:
        _fsencode(value).decode("utf-8")
        return value
    except UnicodeError:
        pass
    try:
        shown = str(_fsencode(value))[2:-1]  # the runtime's bytes: eth\xff
    except UnicodeError:  # not from a real environment: other surrogates
        shown = value.encode("utf-8", "backslashreplace").decode()
    raise CniError(ERR_INVALID_ENV, f"{name} is not valid UTF-8", f"{name}={shown[:100]}")


def _id_problem(text: str) -> str:
    """Why ``text`` is no valid container ID or network name; '' if it is one."""
    if not text:
        return "it is empty"
    if len(text) > _ID_LENGTH:
        return f"it is {len(text)} characters long, more than the {_ID_LENGTH} allowed"
    if text[0] not in _ALNUM:
        return f"it starts with {text[0]!r}, not a letter or digit"
    bad = next((c for c in text if c not in _ID_CHARS), "")
    return f"{bad!r} is not allowed, only letters, digits, _ . -" if bad else ""


def _ifname_problem(text: str, releasing: bool = False) -> str:
    """Why ``text`` is no valid Linux interface name; '' if it is one."""
    if not text:
        return "it is empty"
    if not _is_utf8(text):
        return "it is not valid UTF-8"
    # The kernel counts bytes (IFNAMSIZ), not characters.
    size = len(text.encode())
    if size > _IFNAME_BYTES and not (releasing and len(text) <= _IFNAME_BYTES):
        return f"it is {size} bytes long, more than the {_IFNAME_BYTES} bytes Linux allows"
    if text in (".", ".."):
        return f"{text!r} is not allowed"
    bad = next((c for c in text if c in "/:" or c.isspace()), "")
    return f"{bad!r} is not allowed in an interface name" if bad else ""


def _valid_container_id(text: str) -> bool:
    return not _id_problem(text)


def _valid_ifname(text: str) -> bool:
    return not _ifname_problem(text)


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeError:  # a lone surrogate, e.g. "\udcff" escaped in JSON
        return False


def _ipam(config: Json) -> Json:
    ipam = config.get("ipam")
    if not isinstance(ipam, dict):
        raise _config_error("network config has no ipam object")
    return ipam


def _connection(ipam: Json) -> tuple[str, float]:
    socket_path = ipam.get("socket", wire.DEFAULT_SOCKET)
    if not isinstance(socket_path, str) or not socket_path:
        raise _config_error(f"ipam.socket must be a non-empty path, not {socket_path!r}")
    timeout = ipam.get("timeout", DEFAULT_TIMEOUT)
    # `not 0 < timeout < inf` also rejects NaN.
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or \
            not 0 < timeout < float("inf"):
        raise _config_error(f"ipam.timeout must be a positive number of seconds, not {timeout!r}")
    return socket_path, float(timeout)


def _flag(ipam: Json, key: str, default: bool) -> bool:
    value = ipam.get(key, default)
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return bool(value == "true")
    raise _config_error(f"ipam.{key} must be true or false, not {value!r}")


def _strings(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v and _is_utf8(v)
                                              for v in value):
        raise _config_error(f"{what} must be a list of non-empty strings, not {_shown(value)}")
    return value


def _gateways(value: object) -> dict[int, str] | None:
    """ipam.gateway: None for "pool" (each address with its pool's), else per family.

    "none" reports no gateway at all (a routed setup that configures its own).
    """
    if value == GATEWAY_POOL:
        return None
    if value == GATEWAY_NONE:
        return {}
    listed = [value] if isinstance(value, str) else _strings(value, "ipam.gateway")
    gateways: dict[int, str] = {}
    for text in listed:
        family, ip = _canonical_ip(text, "ipam.gateway")
        if family in gateways:
            raise _config_error(f"ipam.gateway has two IPv{family} gateways",
                                f"{gateways[family]} and {ip}")
        gateways[family] = ip
    return gateways


def _routes(value: object) -> list[Json]:
    """ipam.routes checked against CNI spec 1.1, addresses written canonically."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _config_error(f"ipam.routes must be a list, not {_shown(value)}")
    routes = []
    for index, route in enumerate(value):
        where = f"ipam.routes[{index}]"
        if not isinstance(route, dict):
            raise _config_error(f"{where} must be an object with a dst CIDR, not {_shown(route)}")
        _refuse_unknown_keys(route, _ROUTE_KEYS, where)
        if not isinstance(route.get("dst"), str):
            raise _config_error(f"{where}.dst must be a CIDR string, not "
                                f"{_shown(route['dst']) if 'dst' in route else 'missing'}")
        checked: Json = {}
        for key, item in route.items():
            if key == "dst":
                _, ip, length = _canonical_cidr(item, f"{where}.dst")
                checked[key] = f"{ip}/{length}"
            elif item is None:
                continue  # as Go's json does: null leaves an optional field unset
            elif key == "gw":
                checked[key] = _canonical_ip(item, f"{where}.gw")[1]
            elif isinstance(item, bool) or not isinstance(item, int) or \
                    not 0 <= item <= _ROUTE_INTEGERS[key]:
                raise _config_error(f"{where}.{key} must be an integer from 0 to "
                                    f"{_ROUTE_INTEGERS[key]}, not {_shown(item)}")
            else:
                checked[key] = item
        routes.append(checked)
    return routes


def _dns(value: object) -> Json:
    """ipam.dns checked against CNI spec 1.1, nameservers written canonically."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _config_error(f"ipam.dns must be an object, not {_shown(value)}")
    _refuse_unknown_keys(value, _DNS_KEYS, "ipam.dns")
    dns: Json = {}
    for key, item in value.items():
        if item is None:
            continue
        if key == "domain":
            if not isinstance(item, str) or not _is_utf8(item):
                raise _config_error(f"ipam.dns.domain must be a string, not {_shown(item)}")
            dns[key] = item
        elif key == "nameservers":
            dns[key] = [_canonical_ip(text, "ipam.dns.nameservers")[1]
                        for text in _strings(item, "ipam.dns.nameservers")]
        else:
            dns[key] = _strings(item, f"ipam.dns.{key}")
    return dns


def _refuse_unknown_keys(value: Json, known: frozenset[str], where: str) -> None:
    """CNI error 2, naming each unknown key with its value, as the spec asks."""
    unknown = sorted(key for key in value if key not in known)
    if unknown:
        raise CniError(
            ERR_UNSUPPORTED_FIELD,
            "unsupported field in network configuration: "
            + ", ".join(f"{where}.{key} = {_shown(value[key])}" for key in unknown),
            f"known {where} keys: {', '.join(sorted(known))}",
        )


def _cni_args(environ: Mapping[str, str]) -> dict[str, str]:
    """CNI_ARGS ``K=V;K2=V2`` as a dict."""
    parsed = {}
    for pair in _env(environ, "CNI_ARGS").split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, f"invalid CNI_ARGS pair {pair!r}", "expected K=V;K2=V2")
        parsed[key] = value
    return parsed


def _identity(attachment: Json, cni_args: Mapping[str, str], config: Json) -> str:
    """A sticky network's owner: ``args.cni.identity``, else namespace/pod/ifname."""
    args = config.get("args")
    cni = args.get("cni") if isinstance(args, dict) else None
    if isinstance(cni, dict) and "identity" in cni:
        identity = cni["identity"]
        if not isinstance(identity, str) or not identity:
            raise _config_error("args.cni.identity must be a non-empty string",
                                f"got {_shown(identity)}")
        return identity
    namespace, pod = cni_args.get("K8S_POD_NAMESPACE"), cni_args.get("K8S_POD_NAME")
    if not namespace or not pod:
        raise _config_error(
            "ipam.sticky is on, but the ADD names no owner identity",
            "a sticky network needs CNI_ARGS K8S_POD_NAMESPACE and K8S_POD_NAME, "
            "or args.cni.identity")
    return f"{attachment['network']}/{namespace}/{pod}/{attachment['ifname']}"


def _requested_ips(cni_args: Mapping[str, str], config: Json) -> list[str]:
    """Specific addresses from CNI_ARGS IP=, runtimeConfig.ips and args.cni.ips."""
    sources: list[tuple[str, object]] = []
    if cni_args.get("IP"):
        sources.append(("CNI_ARGS IP", cni_args["IP"].split(",")))
    runtime_config = config.get("runtimeConfig")
    if isinstance(runtime_config, dict) and "ips" in runtime_config:
        sources.append(("runtimeConfig.ips", runtime_config["ips"]))
    args = config.get("args")
    cni = args.get("cni") if isinstance(args, dict) else None
    if isinstance(cni, dict) and "ips" in cni:
        sources.append(("args.cni.ips", cni["ips"]))
    by_family: dict[int, str] = {}
    for what, listed in sources:
        for text in _strings(listed, what):
            text = text.strip()
            # Any /prefix is checked, then ignored: the pool decides the prefix.
            if "/" in text:
                family, ip, _ = _canonical_cidr(text, what)
            else:
                family, ip = _canonical_ip(text, what)
            if by_family.get(family, ip) != ip:
                raise _config_error(
                    f"more than one IPv{family} address requested",
                    f"{by_family[family]} and {ip}; at most one per family",
                )
            by_family[family] = ip
    return [by_family[family] for family in sorted(by_family)]


def _previous_ips(previous: object) -> set[str]:
    ips = previous.get("ips", []) if isinstance(previous, dict) else None
    if not isinstance(ips, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("address"), str) for entry in ips
    ):
        raise _config_error("prevResult.ips must be a list of {address: CIDR}")
    return {_canonical_cidr(entry["address"], "prevResult address")[1] for entry in ips}


def _canonical_ip(text: object, what: str = "address") -> tuple[int, str]:
    """(4 or 6, canonical text) of an IP address; config error if it is none.

    An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) is that IPv4 address, as
    for Go's ``net.ParseIP(...).To4()`` and so for host-local and the plugins
    that read our result.
    """
    if isinstance(text, str):
        try:
            return 4, _socket.inet_ntop(_socket.AF_INET, _socket.inet_pton(_socket.AF_INET, text))
        except (OSError, ValueError):  # ValueError: a NUL or a lone surrogate in the text
            pass
        try:
            packed = _socket.inet_pton(_socket.AF_INET6, text)
        except (OSError, ValueError):
            pass
        else:
            if packed[:12] == _V4_MAPPED:
                return 4, _socket.inet_ntop(_socket.AF_INET, packed[12:])
            return 6, _socket.inet_ntop(_socket.AF_INET6, packed)
    raise _config_error(f"invalid IP address in {what}: {_shown(text)}")


def _canonical_cidr(text: str, what: str) -> tuple[int, str, int]:
    """(family, canonical address, prefix length) of ``ip/prefix``; config error if invalid.

    An IPv4-mapped CIDR is the IPv4 one: ``::ffff:10.0.0.0/104`` is ``10.0.0.0/8``.
    """
    address, sep, length = text.partition("/")
    family, ip = _canonical_ip(address, what)
    written = 6 if ":" in address else 4
    # ASCII digits only, at most 3: int() would take "²" or a 5,000-digit string badly.
    bits = int(length) if 0 < len(length) <= 3 and all(c in "0123456789" for c in length) else -1
    if family != written:  # IPv4-mapped
        bits = bits - 96 if bits >= 96 else -1
    if not sep or not 0 <= bits <= (32 if family == 4 else 128):
        raise _config_error(
            f"invalid CIDR in {what}: {_shown(text)}",
            "the prefix length must be 0-32 for IPv4, 0-128 for IPv6, 96-128 for IPv4-mapped IPv6",
        )
    return family, ip, bits


def _config_error(msg: str, details: str = "") -> CniError:
    return CniError(ERR_INVALID_CONFIG, msg, details)


def _shown(value: object, limit: int = 80) -> str:
    """A config value for an error message: as JSON, cut short if long."""
    text = cjson.dumps(value, ensure_ascii=False)  # the error JSON escapes what it must
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _unexpected(version: str, exc: BaseException) -> str:
    return _error_json(version, ERR_INTERNAL, f"{type(exc).__name__}: {exc}")


def _error_json(version: str, code: int, msg: str, details: str = "") -> str:
    error: Json = {"cniVersion": version, "code": code, "msg": msg}
    if details:
        error["details"] = details
    return cjson.dumps(error)
