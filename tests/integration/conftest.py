"""Fixtures that several integration test modules share: daemons on this test's prefix,
a private etcd (for tests that restore or replace it), the conflict scene after a
restore, topoipamctl run in-process (and the states its tests start from: the seed's
racks, a pool's leftover block), and a short temporary directory."""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.conftest import EtcdServer, temporary_etcd
from tests.daemons import NodeDaemons
from tests.integration.inprocess_ctl import RACK_POOLS, Ctl, Result, allocate
from tests.integration.restores import Scene
from topoipam.client import ctl
from topoipam.daemon.store import EtcdStore


@pytest.fixture
def node_daemons(etcd: EtcdServer, prefix: str, tmp_path: Path) -> Iterator[NodeDaemons]:
    """Start daemons on this test's etcd prefix; every one is stopped when the test ends."""
    with NodeDaemons(etcd.endpoint, prefix, tmp_path) as daemons:
        yield daemons


@pytest.fixture
def private_etcd() -> Iterator[EtcdServer]:
    """An etcd of this test's own, which it may restore from a snapshot, wipe or stop."""
    with temporary_etcd("private-") as server:
        yield server


@pytest.fixture
def scene(private_etcd: EtcdServer, prefix: str, tmp_path: Path) -> Iterator[Scene]:
    """An address two pods hold after a restore (see :class:`Scene`); its daemons stop
    when the test ends."""
    made = Scene(private_etcd, prefix, tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: unix socket paths under it stay below 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tpi-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def run_ctl(
    etcd: EtcdServer, prefix: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Ctl:
    """Run topoipamctl in-process against this test's prefix; returns code, stdout, stderr."""

    async def invoke(*args: str, stdin: str | None = None) -> Result:
        capsys.readouterr()
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = await ctl.run(["--etcd-endpoints", etcd.endpoint, "--prefix", prefix, *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


@pytest_asyncio.fixture
async def racks(run_ctl: Ctl, tmp_path: Path) -> None:
    """Two rack pools and node-0..node-3 in racks 0, 0, 1, 1."""
    path = tmp_path / "racks.yaml"
    path.write_text(RACK_POOLS)
    assert (await run_ctl("apply", "-f", str(path))).code == 0
    for i in range(4):
        assert (await run_ctl("label", "nodes", f"node-{i}", f"rack={i // 2}",
                              "--create")).code == 0


@pytest_asyncio.fixture
async def leftover_block(racks: None, run_ctl: Ctl, store: EtcdStore) -> str:
    """The racks, with pool rack-0 deleted (``--force``) while node-0's pod nginx-0 holds an
    address of its block 192.168.0.0/26, which is left over; that address."""
    ip = await allocate(store, "node-0", "c0", "nginx-0")
    assert (await run_ctl("delete", "ippool", "rack-0", "--force")).code == 0
    return ip
