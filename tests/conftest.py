"""Shared fixtures: a real etcd per test session, a fresh key prefix per test.

If etcd cannot start, every test that needs it errors loudly: a skipped
etcd test proves nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
import pytest_asyncio

from topoipam.daemon.core.errors import TopoipamError
from topoipam.daemon.local_etcd import LocalEtcd, start_local_etcd
from topoipam.daemon.store import EtcdOptions, EtcdStore

EtcdServer = LocalEtcd

# The helper modules that assert on their tests' behalf: their failed asserts are explained
# like a test's own.
pytest.register_assert_rewrite("tests.client.plugin_exec", "tests.integration.chaos",
                               "tests.integration.inprocess_ctl", "tests.integration.restores")


def start_etcd(data_dir: str, extra: list[str] | None = None, scheme: str = "http",
               client_port: int | None = None, peer_port: int | None = None) -> EtcdServer:
    """A real etcd for the tests (loudly an error if it cannot start: never a skip)."""
    try:
        return start_local_etcd(data_dir, name="test", client_port=client_port,
                                peer_port=peer_port, scheme=scheme, extra=extra or ())
    except TopoipamError as exc:
        raise RuntimeError(str(exc)) from None


@contextmanager
def temporary_etcd(tag: str = "") -> Iterator[EtcdServer]:
    """A real etcd in a fresh temp dir, stopped and removed afterwards."""
    data_dir = tempfile.mkdtemp(prefix=f"topoipam-etcd-{tag}")
    server = start_etcd(data_dir)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    with temporary_etcd() as server:
        yield server


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
