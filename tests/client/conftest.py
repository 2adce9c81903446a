"""Fixtures of the plugin's tests: a fake daemon on a real CNI socket (no etcd)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.plugin_exec import FakeDaemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(str(tmp_path / "d.sock"))
    fake.start()
    yield fake
    fake.stop()
