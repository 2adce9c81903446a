"""Daemon configuration: a frozen dataclass validated on construction.

Sources, lowest precedence first: built-in defaults, the TOML file named by
``--config``, ``TOPOIPAM_*`` environment variables, command-line flags.
Unknown keys are an error wherever they come from.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from topoipam.proto.cniwire import DEFAULT_SOCKET

from .core.errors import InvalidInput
from .core.keys import DEFAULT_PREFIX, KeySchema
from .core.model import check_kubernetes_label, check_name
from .etcd_access import DEFAULT_ETCD_ENDPOINT, read_password_file
from .store import EtcdOptions

DEFAULT_METRICS = "127.0.0.1:9092"
#: The node ``--dev`` serves unless told otherwise: README's walkthrough labels it.
DEV_NODE = "node-0"


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                              "state")
    return os.path.join(base, "topoipam")


@dataclass(frozen=True)
class DaemonConfig:
    etcd_endpoints: tuple[str, ...] = (DEFAULT_ETCD_ENDPOINT,)
    node: str = field(default_factory=socket.gethostname)
    socket: str = DEFAULT_SOCKET
    prefix: str = DEFAULT_PREFIX
    metrics_address: str = DEFAULT_METRICS
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    etcd_password_file: str | None = None
    etcd_timeout: float = 5.0
    log_format: str = "text"
    log_level: str = "info"
    dev: bool = False
    state_dir: str = field(default_factory=default_state_dir)
    # Labels written only when the node registers itself for the first time.
    labels: Mapping[str, str] = field(default_factory=dict)
    # Optional TCP listener for the gRPC API; loopback only unless allowed.
    tcp_address: str | None = None
    allow_remote_tcp: bool = False
    drain_seconds: float = 10.0
    request_timeout: float = 20.0
    #: TTL of the etcd lease that fences the node identity (daemons/<node>).
    node_lease_seconds: int = 10
    #: Keep the node-local record of live allocations in the state dir, to re-assert
    #: them should etcd be restored from an older snapshot. Off only to measure it,
    #: or where losing those addresses' records to a restore is acceptable.
    record_allocations: bool = True

    def __post_init__(self) -> None:
        check_name("node", self.node)
        KeySchema(self.prefix)
        if self.log_format not in ("text", "json"):
            raise InvalidInput(f"log-format must be text or json, not {self.log_format!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise InvalidInput(f"log-level must be debug, info, warning or error, "
                               f"not {self.log_level!r}")
        if self.metrics_address != "off":
            parse_host_port(self.metrics_address, "metrics-address")
        if self.tcp_address is not None:
            host, _ = parse_host_port(self.tcp_address, "tcp-address")
            if not self.allow_remote_tcp and not _is_loopback(host):
                raise InvalidInput(
                    f"tcp-address {self.tcp_address} is not a loopback address; "
                    "set allow-remote-tcp to listen beyond this host"
                )
        for key, value in self.labels.items():
            check_kubernetes_label(key, value, "labels")
        if not self.socket.startswith("/"):
            raise InvalidInput(f"socket must be an absolute path, not {self.socket!r}")
        for name in ("etcd_timeout", "drain_seconds", "request_timeout"):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"{name.replace('_', '-')} must be positive")
        if not 2 <= self.node_lease_seconds <= 300:
            raise InvalidInput("node-lease-seconds must be between 2 and 300")
        self.etcd_options()  # validates endpoints and TLS/auth pairing

    def etcd_password(self) -> str | None:
        if self.etcd_password_file is None:
            return None
        return read_password_file(self.etcd_password_file)

    def etcd_options(self) -> EtcdOptions:
        return EtcdOptions(
            endpoints=self.etcd_endpoints,
            ca_file=self.etcd_ca,
            cert_file=self.etcd_cert,
            key_file=self.etcd_key,
            user=self.etcd_user,
            password=self.etcd_password() if self.etcd_user is not None else None,
            timeout=self.etcd_timeout,
        )


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidInput(f"{what} {value!r} must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_FIELDS = {f.name: f for f in fields(DaemonConfig)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a TOML, env or flag value into the field's type, or raise InvalidInput."""
    default = _FIELDS[name].default
    if name == "etcd_endpoints":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidInput(f"{source}: etcd-endpoints must be a list of URLs")
        return tuple(value)
    if name == "labels":
        if isinstance(value, str):
            pairs = [p.strip() for p in value.split(",") if p.strip()]
            parsed = {}
            for pair in pairs:
                key, sep, val = pair.partition("=")
                if not sep:
                    raise InvalidInput(f"{source}: labels must be k=v[,k=v...], got {pair!r}")
                parsed[key.strip()] = val.strip()
            return parsed
        if not isinstance(value, Mapping):
            raise InvalidInput(f"{source}: labels must be a table of strings")
        return dict(value)
    if isinstance(default, bool):
        if isinstance(value, str):
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
        if not isinstance(value, bool):
            raise InvalidInput(f"{source}: {name.replace('_', '-')} must be true or false")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise InvalidInput(
                f"{source}: {name.replace('_', '-')} must be a whole number, got {value!r}"
            ) from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InvalidInput(
                f"{source}: {name.replace('_', '-')} must be a number, got {value!r}"
            ) from None
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"{source}: {name.replace('_', '-')} must be a string")
    return value


def load_config(
    flags: Mapping[str, Any], config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> DaemonConfig:
    """Merge file, environment and flags (None-valued flags are "not given")."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as handle:
                data = tomllib.load(handle)
        except OSError as exc:
            raise InvalidInput(f"cannot read config file {config_file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(f"config file {config_file}: {exc}") from exc
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise InvalidInput(f"config file {config_file}: unknown key {key!r}")
            values[name] = _coerce(name, value, f"config file {config_file}")
    for key, value in environ.items():
        if not key.startswith("TOPOIPAM_") or key == "TOPOIPAM_CONFIG":
            continue
        name = key[len("TOPOIPAM_"):].lower()
        if name not in _FIELDS:
            raise InvalidInput(f"unknown environment variable {key}")
        values[name] = _coerce(name, value, f"environment variable {key}")
    for name, value in flags.items():
        if value is not None:
            values[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
    if values.get("dev") and "socket" not in values:
        state_dir = values.get("state_dir") or default_state_dir()
        values["socket"] = os.path.join(state_dir, "topoipamd.sock")
    if values.get("dev") and "node" not in values:
        # The dev cluster is the walkthrough's, not this host's: its first node is node-0.
        values["node"] = DEV_NODE
    return DaemonConfig(**values)
