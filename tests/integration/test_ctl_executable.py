"""`topoipamctl` as a command line: the installed executable's exit codes and one-line
errors, usage errors, help text for every verb and flag, and where the connection
options may stand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EtcdServer
from tests.daemons import TOPOIPAMCTL
from tests.integration.inprocess_ctl import Ctl
from topoipam.client import ctl
from topoipam.daemon.local_etcd import free_port


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["create"], ["get", "ippool", "-o", "xml"], ["ipam", "configure"],
                 ["ipam", "configure", "--strictaffinity", "maybe"], ["delete", "ippool"]):
        with pytest.raises(SystemExit) as info:
            ctl.main(["--etcd-endpoints", "http://127.0.0.1:1", *argv])
        assert info.value.code == 2, argv
    assert "usage:" in capsys.readouterr().err


def every_action(parser: Any) -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {where}", a) for where, a in every_action(sub))
            for choice in action._choices_actions:
                yield choice.dest, choice
        else:
            yield "", action


def test_every_verb_and_flag_has_help_text() -> None:
    missing = [f"{where} {action.dest}" for where, action in every_action(ctl.build_parser())
               if not action.help]
    assert missing == []


@pytest.mark.asyncio
async def test_connection_options_work_after_the_verb_and_from_env(
    run_ctl: Ctl, etcd: EtcdServer, prefix: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await run_ctl("create", "ippool", "p", "--cidr", "10.0.0.0/24")
    capsys.readouterr()
    assert await ctl.run(["--prefix", "/elsewhere/v1", "--etcd-endpoints", etcd.endpoint,
                          "get", "ippool", "p", "--prefix", prefix]) == 0
    assert "10.0.0.0/24" in capsys.readouterr().out
    monkeypatch.setenv("TOPOIPAM_ETCD_ENDPOINTS", etcd.endpoint)
    monkeypatch.setenv("TOPOIPAM_PREFIX", prefix)
    assert await ctl.run(["get", "ippool", "p"]) == 0
    assert "10.0.0.0/24" in capsys.readouterr().out


# ---------------------------------------------------------------------------- real executable


def run_executable(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOPOIPAMCTL, *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def test_unreachable_etcd_fails_fast_with_one_line(ctl_env: dict[str, str]) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_executable("--etcd-endpoints", endpoint, "get", "ippool", env=ctl_env)
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: etcd unreachable")
    assert endpoint in result.stderr


def test_executable_reports_bad_input_without_traceback(
    ctl_env: dict[str, str], tmp_path: Path
) -> None:
    result = run_executable("apply", "-f", str(tmp_path / "nope.yaml"), env=ctl_env)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"error: cannot read {tmp_path / 'nope.yaml'}: No such file or directory\n")

    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: p}\n"
                   "spec: {cidr: 10.0.0.0/8, blockSize: 26, nodeSelector: 'rack == \"0'}\n")
    result = run_executable("create", "-f", str(bad), env=ctl_env)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "column" in result.stderr and "Traceback" not in result.stderr

    result = run_executable("create", "ippool", env=ctl_env)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_output_into_a_closed_pipe_ends_quietly(ctl_env: dict[str, str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([TOPOIPAMCTL, "get", "ippool"], env=ctl_env, stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")
