"""``topoipamd``: flags, logging, signals and ``--dev`` around :class:`Daemon`."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import resource
import signal
import sys
import time

from topoipam.proto.cniwire import DEFAULT_SOCKET

from .config import DaemonConfig, load_config
from .core.errors import TopoipamError
from .core.model import IPPool
from .core.writes import PutObject
from .etcd_access import DEFAULT_ETCD_ENDPOINT
from .local_etcd import LocalEtcd, free_port, start_local_etcd
from .store import EtcdOptions, EtcdStore

log = logging.getLogger("topoipamd")

DEFAULT_POOL = IPPool("default-ipv4-ippool", ipaddress.ip_network("192.168.0.0/16"), 26)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topoipamd",
        description="Node-local topology-aware IPAM daemon. Every flag can also be set in the "
                    "TOML file given by --config (key = flag name) or as TOPOIPAM_<NAME>.",
    )
    add = parser.add_argument
    add("--config", help="TOML config file")
    add("--etcd-endpoints",
        help=f"comma-separated etcd URLs (default {DEFAULT_ETCD_ENDPOINT})")
    add("--node", help="this node's name (default: the host name; node-0 with --dev)")
    add("--socket", help=f"gRPC unix socket (default {DEFAULT_SOCKET})")
    add("--prefix", help="etcd key prefix (default /topoipam/v1)")
    add("--metrics-address", help="HOST:PORT for Prometheus metrics, or off "
                                  "(default 127.0.0.1:9092)")
    add("--etcd-ca", help="CA bundle to verify etcd's certificate")
    add("--etcd-cert", help="client certificate for etcd")
    add("--etcd-key", help="client key for etcd")
    add("--etcd-user", help="etcd user name")
    add("--etcd-password-file", help="file holding the etcd password")
    add("--log-format", choices=("text", "json"), help="log format (default text)")
    add("--log-level", help="debug, info, warning or error (default info)")
    add("--labels", help="labels set when this node registers for the first time: k=v,k2=v2")
    add("--tcp-address", help="also serve gRPC on HOST:PORT (loopback unless allowed)")
    add("--allow-remote-tcp", action="store_true", default=None,
        help="allow a non-loopback --tcp-address")
    add("--dev", action="store_true", default=None,
        help="start a private single-member etcd under --state-dir and seed a default pool")
    add("--state-dir", help="node-local state: the identity that fences this node, the record "
                            "of its allocations (re-asserted if etcd is restored from a "
                            "backup), and --dev's etcd (default ~/.local/state/topoipam)")
    add("--node-lease-seconds", help="TTL of the etcd lease that fences the node identity "
                                     "(default 10)")
    add("--record-allocations", help="keep the node-local record of allocations in "
                                     "--state-dir: true (default) or false")
    return parser


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: DaemonConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


class DevEtcd:
    """A private single-member etcd for ``--dev``, under the state directory."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.server: LocalEtcd | None = None
        self.endpoint = ""

    def start(self) -> str:
        os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        # The ports of the last start when they are free, so the endpoint a reader
        # exported keeps working across restarts; else the well-known ones when free,
        # so `topoipamctl` finds it by default.
        client, peer = self._last_ports()
        self.server = start_local_etcd(
            self.state_dir, store_dir=os.path.join(self.state_dir, "etcd"), name="topoipam-dev",
            client_port=free_port(client), peer_port=free_port(peer), own_session=True,
            timeout=15)
        with open(self._ports_path(), "w") as handle:
            json.dump({"client": self.server.client_port, "peer": self.server.peer_port}, handle)
        self.endpoint = self.server.endpoint
        return self.endpoint

    def _ports_path(self) -> str:
        return os.path.join(self.state_dir, "etcd-ports.json")

    def _last_ports(self) -> tuple[int, int]:
        try:
            with open(self._ports_path()) as handle:
                ports = json.load(handle)
            return int(ports["client"]), int(ports["peer"])
        except (OSError, ValueError, KeyError, TypeError):
            return 2379, 2380  # first start, or a file no start of ours wrote

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


async def seed_default_pool(options: EtcdOptions, prefix: str) -> None:
    async with EtcdStore(options, prefix) as store:
        deadline = time.monotonic() + 10
        while True:
            try:
                if await store.list_pools():
                    return
                await store.commit([PutObject(DEFAULT_POOL, expect_revision=0)])
                log.info("seeded pool %s %s", DEFAULT_POOL.name, DEFAULT_POOL.cidr)
                return
            except TopoipamError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


def raise_open_files_limit() -> None:
    """Let the CNI socket hold its ``max_connections`` (the soft limit is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def serve(config: DaemonConfig) -> None:
    from .server import Daemon

    loop = asyncio.get_running_loop()
    daemon = Daemon(config)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await daemon.start()
    try:
        await stop.wait()
        log.info("shutting down: draining in-flight calls (at most %gs)", config.drain_seconds)
    finally:
        await daemon.close()


def _stop_before_serving(signum: int, frame: object) -> None:
    raise SystemExit(0)  # the finally below still stops --dev's etcd


def main(argv: list[str] | None = None) -> None:
    # A SIGTERM before serve() installs its handlers (while --dev starts etcd and prints
    # its banner) stops cleanly too, instead of killing us with etcd left running.
    signal.signal(signal.SIGTERM, _stop_before_serving)
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config") or os.environ.get("TOPOIPAM_CONFIG")
    dev_etcd: DevEtcd | None = None
    try:
        config = load_config(args, config_file)
        setup_logging(config)
        if config.dev:
            dev_etcd = DevEtcd(config.state_dir)
            endpoint = dev_etcd.start()
            config = load_config({**args, "etcd_endpoints": endpoint}, config_file)
            asyncio.run(seed_default_pool(config.etcd_options(), config.prefix))
            print(
                f"topoipamd --dev: etcd at {endpoint} (data in {config.state_dir}/etcd)\n"
                f"  node: {config.node}\n"
                f"  gRPC socket: {config.socket}\n"
                f"  try: TOPOIPAM_ETCD_ENDPOINTS={endpoint} topoipamctl get ippool -o wide\n"
                f"       grpcurl -plaintext -unix {config.socket} list",
                flush=True,
            )
        raise_open_files_limit()
        asyncio.run(serve(config))
    except TopoipamError as exc:
        print(f"topoipamd: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        if dev_etcd is not None:
            dev_etcd.stop()
