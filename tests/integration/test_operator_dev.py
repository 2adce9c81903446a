"""Hostile checks of `topoipamd --dev`: its etcd keeps its port across a
restart, and the endpoint the reader exported keeps working."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemons import BIN, TOPOIPAMCTL, TOPOIPAMD


@pytest.fixture
def short_home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tpi-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_dev(home: Path, env: dict[str, str], name: str) -> tuple[subprocess.Popen[bytes], str]:
    log_path = home / name
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([TOPOIPAMD, "--dev"], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, cwd=home)
    deadline = time.monotonic() + 30
    while "grpcurl" not in log_path.read_text() and time.monotonic() < deadline:
        assert daemon.poll() is None, log_path.read_text()
        time.sleep(0.05)
    return daemon, log_path.read_text().split("etcd at ")[1].split()[0]


def orphans(home: Path) -> list[int]:
    """Processes still running out of ``home`` (the dev etcd, by its data directory)."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines()
            if str(home) in line and "ps -eo" not in line]


def test_dev_restart_keeps_the_etcd_endpoint(short_home: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TOPOIPAM_", "CNI_", "XDG_"))}
    env["HOME"] = str(short_home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TOPOIPAM_METRICS_ADDRESS"] = "off"
    first, endpoint = start_dev(short_home, env, "one.log")
    # SIGTERM once --dev printed where it is (as a supervisor or `kill` does).
    first.terminate()
    code = first.wait(30)
    time.sleep(0.5)
    left = orphans(short_home)
    for pid in left:  # the orphaned dev etcd this test's daemon started
        os.kill(pid, 9)
    assert code == 0 and not left, (code, left, (short_home / "one.log").read_text())
    second, again = start_dev(short_home, env, "two.log")
    try:
        assert again == endpoint, (short_home / "two.log").read_text()
        ctl_env = {**env, "TOPOIPAM_ETCD_ENDPOINTS": endpoint}
        done = subprocess.run([TOPOIPAMCTL, "get", "nodes"], env=ctl_env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and "node-0" in done.stdout, done.stdout + done.stderr
    finally:
        second.terminate()
        second.wait(30)
