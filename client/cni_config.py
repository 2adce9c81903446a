"""The CNI plugin's network configuration: cniVersion, the ``ipam`` keys, routes,
dns, requested addresses, the sticky identity and prevResult, each checked and
written canonically (the keys and rules are listed in :mod:`topoipam.client.cni`).
Part of the plugin (inlined into its file).
"""

from __future__ import annotations

from topoipam.client import cni_addresses, cni_env, cni_errors
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
LEGACY_VERSIONS = ("0.3.0", "0.3.1", "0.4.0")


# ipam.gateway: each address with its own pool's gateway (the default), or none.
GATEWAY_POOL = "pool"


GATEWAY_NONE = "none"


# Long enough for a daemon retrying etcd conflicts, well inside the runtime's
# own CNI timeout, so a stuck daemon surfaces as a retriable error.
DEFAULT_TIMEOUT = 20.0


IPAM_KEYS = frozenset({
    "type", "socket", "timeout", "assign_ipv4", "assign_ipv6", "ipv4_pools", "ipv6_pools",
    "prefix", "gateway", "routes", "dns", "sticky",
})


PREFIX_MODES = ("pool", "block", "host")


# CNI spec 1.1 route fields with integer values, and the largest each can take
# (the kernel's u32 route attributes; rtm_scope is a u8).
_ROUTE_INTEGERS = {"mtu": 2**32 - 1, "advmss": 2**32 - 1, "priority": 2**32 - 1,
                   "table": 2**32 - 1, "scope": 255}


_ROUTE_KEYS = frozenset({"dst", "gw", *_ROUTE_INTEGERS})


_DNS_KEYS = frozenset({"nameservers", "domain", "search", "options"})


# The first cniVersion whose spec has the verb (skel refuses older configs too).
_VERB_SINCE = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}


def decode_config(stdin: bytes) -> Json:
    try:
        config = cjson.loads(stdin)
    except (ValueError, RecursionError) as exc:
        raise cni_errors.CniError(wire.CNI_DECODE_ERROR,
                                  "network config on stdin is not valid JSON", str(exc)) from None
    if not isinstance(config, dict):
        raise cni_errors.CniError(wire.CNI_DECODE_ERROR,
                                  "network config on stdin must be a JSON object")
    return config


def check_version(config: Json, command: str) -> None:
    version = config.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        shown = f"cniVersion {version!r}" if version else "no cniVersion"
        raise cni_errors.CniError(
            wire.CNI_INCOMPATIBLE_VERSION,
            f"incompatible CNI version: config has {shown}",
            f"topoipam supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    since = _VERB_SINCE.get(command)
    if since and SUPPORTED_VERSIONS.index(version) < SUPPORTED_VERSIONS.index(since):
        raise cni_errors.CniError(
            wire.CNI_INCOMPATIBLE_VERSION, f"config version {version} does not allow {command}",
            f"{command} needs cniVersion {since} or later",
        )


def ipam_section(config: Json) -> Json:
    ipam = config.get("ipam")
    if not isinstance(ipam, dict):
        raise cni_errors.config_error("network config has no ipam object")
    return ipam


def connection(ipam: Json) -> tuple[str, float]:
    socket_path = ipam.get("socket", wire.DEFAULT_SOCKET)
    if not isinstance(socket_path, str) or not socket_path:
        raise cni_errors.config_error(f"ipam.socket must be a non-empty path, not {socket_path!r}")
    timeout = ipam.get("timeout", DEFAULT_TIMEOUT)
    # `not 0 < timeout < inf` also rejects NaN.
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or \
            not 0 < timeout < float("inf"):
        raise cni_errors.config_error(
            f"ipam.timeout must be a positive number of seconds, not {timeout!r}")
    return socket_path, float(timeout)


def flag(ipam: Json, key: str, default: bool) -> bool:
    value = ipam.get(key, default)
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return bool(value == "true")
    raise cni_errors.config_error(f"ipam.{key} must be true or false, not {value!r}")


def strings(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v and cni_env.is_utf8(v)
                                              for v in value):
        raise cni_errors.config_error(f"{what} must be a list of non-empty strings, "
                                      f"not {cni_errors.shown_value(value)}")
    return value


def parse_gateways(value: object) -> dict[int, str] | None:
    """ipam.gateway: None for "pool" (each address with its pool's), else per family.

    "none" reports no gateway at all (a routed setup that configures its own).
    """
    if value == GATEWAY_POOL:
        return None
    if value == GATEWAY_NONE:
        return {}
    listed = [value] if isinstance(value, str) else strings(value, "ipam.gateway")
    gateways: dict[int, str] = {}
    for text in listed:
        family, ip = cni_addresses.canonical_ip(text, "ipam.gateway")
        if family in gateways:
            raise cni_errors.config_error(f"ipam.gateway has two IPv{family} gateways",
                                          f"{gateways[family]} and {ip}")
        gateways[family] = ip
    return gateways


def checked_routes(value: object) -> list[Json]:
    """ipam.routes checked against CNI spec 1.1, addresses written canonically."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise cni_errors.config_error(
            f"ipam.routes must be a list, not {cni_errors.shown_value(value)}")
    routes = []
    for index, route in enumerate(value):
        where = f"ipam.routes[{index}]"
        if not isinstance(route, dict):
            raise cni_errors.config_error(f"{where} must be an object with a dst CIDR, "
                                          f"not {cni_errors.shown_value(route)}")
        refuse_unknown_keys(route, _ROUTE_KEYS, where)
        if not isinstance(route.get("dst"), str):
            shown = cni_errors.shown_value(route["dst"]) if "dst" in route else "missing"
            raise cni_errors.config_error(f"{where}.dst must be a CIDR string, not {shown}")
        checked: Json = {}
        for key, item in route.items():
            if key == "dst":
                _, ip, length = cni_addresses.canonical_cidr(item, f"{where}.dst")
                checked[key] = f"{ip}/{length}"
            elif item is None:
                continue  # as Go's json does: null leaves an optional field unset
            elif key == "gw":
                checked[key] = cni_addresses.canonical_ip(item, f"{where}.gw")[1]
            elif isinstance(item, bool) or not isinstance(item, int) or \
                    not 0 <= item <= _ROUTE_INTEGERS[key]:
                raise cni_errors.config_error(
                    f"{where}.{key} must be an integer from 0 to {_ROUTE_INTEGERS[key]}, "
                    f"not {cni_errors.shown_value(item)}")
            else:
                checked[key] = item
        routes.append(checked)
    return routes


def checked_dns(value: object) -> Json:
    """ipam.dns checked against CNI spec 1.1, nameservers written canonically."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise cni_errors.config_error(
            f"ipam.dns must be an object, not {cni_errors.shown_value(value)}")
    refuse_unknown_keys(value, _DNS_KEYS, "ipam.dns")
    dns: Json = {}
    for key, item in value.items():
        if item is None:
            continue
        if key == "domain":
            if not isinstance(item, str) or not cni_env.is_utf8(item):
                raise cni_errors.config_error(
                    f"ipam.dns.domain must be a string, not {cni_errors.shown_value(item)}")
            dns[key] = item
        elif key == "nameservers":
            dns[key] = [cni_addresses.canonical_ip(text, "ipam.dns.nameservers")[1]
                        for text in strings(item, "ipam.dns.nameservers")]
        else:
            dns[key] = strings(item, f"ipam.dns.{key}")
    return dns


def refuse_unknown_keys(value: Json, known: frozenset[str], where: str) -> None:
    """CNI error 2, naming each unknown key with its value, as the spec asks."""
    unknown = sorted(key for key in value if key not in known)
    if unknown:
        raise cni_errors.CniError(
            wire.CNI_UNSUPPORTED_FIELD,
            "unsupported field in network configuration: "
            + ", ".join(f"{where}.{key} = {cni_errors.shown_value(value[key])}" for key in unknown),
            f"known {where} keys: {', '.join(sorted(known))}",
        )


def owner_identity(attachment: Json, cni_args: Mapping[str, str], config: Json) -> str:
    """A sticky network's owner: ``args.cni.identity``, else namespace/pod/ifname."""
    args = config.get("args")
    cni = args.get("cni") if isinstance(args, dict) else None
    if isinstance(cni, dict) and "identity" in cni:
        identity = cni["identity"]
        if not isinstance(identity, str) or not identity:
            raise cni_errors.config_error("args.cni.identity must be a non-empty string",
                                          f"got {cni_errors.shown_value(identity)}")
        return identity
    namespace, pod = cni_args.get("K8S_POD_NAMESPACE"), cni_args.get("K8S_POD_NAME")
    if not namespace or not pod:
        raise cni_errors.config_error(
            "ipam.sticky is on, but the ADD names no owner identity",
            "a sticky network needs CNI_ARGS K8S_POD_NAMESPACE and K8S_POD_NAME, "
            "or args.cni.identity")
    return f"{attachment['network']}/{namespace}/{pod}/{attachment['ifname']}"


def requested_ips(cni_args: Mapping[str, str], config: Json) -> list[str]:
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
        for text in strings(listed, what):
            text = text.strip()
            # Any /prefix is checked, then ignored: the pool decides the prefix.
            if "/" in text:
                family, ip, _ = cni_addresses.canonical_cidr(text, what)
            else:
                family, ip = cni_addresses.canonical_ip(text, what)
            if by_family.get(family, ip) != ip:
                raise cni_errors.config_error(
                    f"more than one IPv{family} address requested",
                    f"{by_family[family]} and {ip}; at most one per family",
                )
            by_family[family] = ip
    return [by_family[family] for family in sorted(by_family)]


def previous_ips(previous: object) -> set[str]:
    ips = previous.get("ips", []) if isinstance(previous, dict) else None
    if not isinstance(ips, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("address"), str) for entry in ips
    ):
        raise cni_errors.config_error("prevResult.ips must be a list of {address: CIDR}")
    return {cni_addresses.canonical_cidr(entry["address"], "prevResult address")[1]
            for entry in ips}
