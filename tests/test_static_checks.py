"""Lint and types are part of the suite: ruff clean, mypy --strict clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff_clean() -> None:
    done = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_clean(tmp_path: Path) -> None:
    # The folders are mapped to topoipam.* only by the installer; give mypy the same view.
    package = tmp_path / "topoipam"
    package.mkdir()
    (package / "__init__.py").write_text((ROOT / "topoipam_pkg" / "__init__.py").read_text())
    for name in ("daemon", "client", "proto"):
        (package / name).symlink_to(ROOT / name)
    done = subprocess.run(
        [str(BIN / "mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
         str(tmp_path / ".mypy_cache"), "-p", "topoipam"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
