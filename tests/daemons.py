"""Real ``topoipamd`` processes on real unix sockets, for integration and e2e tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tests.installed_plugin import PLUGIN, PLUGIN_DIR
from topoipam.client.rpc import health_check
from topoipam.proto import ipam_pb2_grpc

BIN = Path(sys.executable).parent
TOPOIPAMD = str(BIN / "topoipamd")
TOPOIPAMCTL = str(BIN / "topoipamctl")
# The installed single-file plugin (tests/installed_plugin.py), not the console script.
TOPOIPAM = str(PLUGIN)


@dataclass
class DaemonProcess:
    node: str
    socket: str
    endpoints: str
    prefix: str
    log_path: str
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, timeout: float = 20.0) -> DaemonProcess:
        log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOPOIPAM_")}
        env.update(self.env)
        # Each daemon keeps its node-local state beside its log, so a restart finds it.
        state = [] if "--state-dir" in self.extra else [
            "--state-dir", str(Path(self.log_path).with_suffix(".state"))]
        self.process = subprocess.Popen(
            [TOPOIPAMD, "--etcd-endpoints", self.endpoints, "--node", self.node,
             "--socket", self.socket, "--prefix", self.prefix, "--metrics-address", "off",
             *state, *self.extra],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        log.close()
        if wait:
            self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"topoipamd {self.node} exited {self.process.returncode}:\n"
                                   f"{self.log()}")
            if self.health() == "SERVING":
                return
            time.sleep(0.05)
        raise RuntimeError(f"topoipamd {self.node} not SERVING after {timeout}s:\n{self.log()}")

    def health(self) -> str:
        return health_check(self.socket, timeout=1)

    @contextmanager
    def stub(self) -> Iterator[Any]:
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            yield ipam_pb2_grpc.IpamStub(channel)

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


class NodeDaemons:
    """Real daemons on one etcd prefix, one per node, all stopped by :meth:`stop_all` (or
    at the end of a ``with`` block).

    Each node's socket is in a run directory of its own under ``base`` and its log
    beside it; starting a node again (a restart) reuses both.
    """

    def __init__(self, endpoints: str, prefix: str, base: Path) -> None:
        self.endpoints, self.prefix, self.base = endpoints, prefix, base
        self.started: list[DaemonProcess] = []

    def start(self, node: str, extra: list[str] | None = None, wait: bool = True
              ) -> DaemonProcess:
        run_dir = self.base / f"run-{node}"
        run_dir.mkdir(mode=0o750, exist_ok=True)
        daemon = DaemonProcess(node, str(run_dir / "topoipamd.sock"), self.endpoints,
                               self.prefix, str(self.base / f"{node}.log"), extra or [])
        self.started.append(daemon)
        return daemon.start(wait=wait)

    def start_all(self, flags: dict[str, list[str]]) -> dict[str, DaemonProcess]:
        """A daemon for each node with its flags, started together; once every one serves."""
        started = {node: self.start(node, extra, wait=False) for node, extra in flags.items()}
        for daemon in started.values():
            daemon.wait_serving(30)
        return started

    def stop_all(self) -> None:
        for daemon in self.started:
            daemon.stop()

    def __enter__(self) -> NodeDaemons:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def cni(command: str, config: dict[str, Any], container: str = "", ifname: str = "eth0",
        netns: str = "", args: str = "", extra_env: dict[str, str] | None = None,
        timeout: float = 60) -> tuple[int, dict[str, Any] | None, str]:
    """Exec the `topoipam` plugin the way a runtime does; returns (exit, stdout JSON, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update({
        "CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_IFNAME": ifname,
        "CNI_NETNS": netns, "CNI_ARGS": args, "CNI_PATH": str(PLUGIN_DIR),
    })
    env.update(extra_env or {})
    done = subprocess.run([TOPOIPAM], input=json.dumps(config).encode(), env=env,
                          capture_output=True, timeout=timeout)
    out = done.stdout.decode().strip()
    return done.returncode, json.loads(out) if out else None, done.stderr.decode()


def ctl(env: dict[str, str], *args: str, input: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOPOIPAMCTL, *args], env=env, capture_output=True, text=True,
                          timeout=60, input=input)


def rack_pools_manifest(name: str = "rack-{rack}-ippool") -> str:
    """The seed's two rack pools (192.168.R.0/24 selecting rack == "R") as a YAML manifest."""
    return "---\n".join(
        f"apiVersion: topoipam/v1\nkind: IPPool\nmetadata:\n  name: {name.format(rack=rack)}\n"
        f"spec:\n  cidr: 192.168.{rack}.0/24\n  nodeSelector: rack == \"{rack}\"\n"
        for rack in (0, 1))
