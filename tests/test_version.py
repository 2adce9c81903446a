"""The version is written once, in pyproject.toml; everything else reads the package metadata."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from topoipam import package_version
from topoipam.client import cni_bundle
from topoipam.daemon import service

ROOT = Path(__file__).resolve().parent.parent


def test_the_daemon_and_the_plugin_report_pyproject_s_version() -> None:
    written = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert package_version() == version("topoipam") == written
    assert service.VERSION == written  # what Status answers
    assert f"# topoipam {written}: " in cni_bundle.plugin_file().decode().splitlines()[1]
