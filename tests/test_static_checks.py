"""Lint, types and layout are part of the suite: ruff and mypy --strict clean, imports one way."""

from __future__ import annotations

import ast
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


# Imports run one way: client -> daemon -> proto (and the plugin's contract,
# proto/cniwire.py, imports nothing of topoipam at all).
LAYERS = {"daemon": ("topoipam.client",), "proto": ("topoipam.client", "topoipam.daemon")}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_imports_flow_one_way() -> None:
    wrong = []
    for folder, forbidden in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in imported_modules(path):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []


def test_the_wire_contract_is_standard_library_only() -> None:
    # The plugin's file inlines both: they may import only C modules and each other.
    for module in ("cniwire", "cjson"):
        imported = imported_modules(ROOT / "proto" / f"{module}.py")
        assert imported <= {"__future__", "typing", "_json", "topoipam.proto.cjson",
                            "topoipam.proto"}, (module, imported)


#: What the pure core may not import: I/O, concurrency, the process, the daemon's other rooms.
CORE_FORBIDDEN = ("asyncio", "aetcd", "grpc", "socket", "subprocess", "threading", "fcntl",
                  "prometheus_client", "topoipam.client")


def test_the_core_is_pure() -> None:
    wrong = []
    for path in sorted((ROOT / "daemon" / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                wrong.append(f"{path.name} imports from outside daemon/core/")
        for name in imported_modules(path):
            outside = name.startswith("topoipam.daemon") and not name.startswith(
                "topoipam.daemon.core")
            if outside or any(name == f or name.startswith(f + ".") for f in CORE_FORBIDDEN):
                wrong.append(f"{path.name} imports {name}")
    assert wrong == []


#: The daemon's process: what only topoipamd runs. The CLI and the plugin use the
#: library (core, the etcd adapter, planning, admin, audit), never these.
PROCESS_MODULES = ("engine", "committer", "upkeep", "server", "service", "cache", "fence",
                   "main", "cni_socket", "metrics", "record", "local_etcd")


def test_the_client_uses_the_library_not_the_process() -> None:
    wrong = [f"{path.name} imports {name}"
             for path in sorted((ROOT / "client").glob("*.py"))
             for name in imported_modules(path)
             if any(name == f"topoipam.daemon.{m}" or name.startswith(f"topoipam.daemon.{m}.")
                    for m in PROCESS_MODULES)]
    assert wrong == []


#: A module that does one job reads in one sitting; past this, split it by job.
MAX_MODULE_LINES = 700


def test_no_hand_written_module_is_over_the_limit() -> None:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    long = {name: lines for name in tracked if "_pb2" not in name
            and (lines := len((ROOT / name).read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}
