"""The installed plugin file: what it imports, that it is current, how it is installed.

The CNI behaviour tests (test_cni.py, test_cni_errors.py, test_bad_input_properties.py, the
integration and e2e tests) already exec the installed file; these check the
file itself.
"""

from __future__ import annotations

import ast
import json
import marshal
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.client.plugin_exec import FakeDaemon, netconf
from tests.installed_plugin import PLUGIN, PLUGIN_DIR
from topoipam.client import cni_bundle

BIN = Path(sys.executable).parent
TOPOIPAMCTL = str(BIN / "topoipamctl")

# Runs the plugin file in this same bare interpreter, then reports every
# module in sys.modules with what kind it is. Imports nothing itself (_imp and
# posix are loaded at start-up).
_REPORT_MODULES = r"""
import sys, _imp, posix
path = sys.argv[1]


def _exit(status):
    # The plugin ends with posix._exit once its answer is flushed; here the
    # report must still run.
    raise SystemExit(status)


posix._exit = _exit
sys.argv[:] = [path]
with open(path, "rb") as handle:
    code = compile(handle.read(), path, "exec")
status = 0
try:
    exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
except SystemExit as exit:
    status = exit.code
sys.stdout.flush()
kinds = {}
for name, module in sorted(sys.modules.items()):
    origin = getattr(getattr(module, "__spec__", None), "origin", None) or \
        getattr(module, "__file__", None)
    if name in sys.builtin_module_names:
        kinds[name] = "builtin"
    elif _imp.is_frozen(name):
        kinds[name] = "frozen"
    elif isinstance(origin, str) and origin.endswith(".so"):
        kinds[name] = "extension"
    elif isinstance(origin, str):
        kinds[name] = "python " + origin
    else:
        kinds[name] = "no origin"
sys.stderr.write("\nMODULES " + repr(kinds) + "\n")
sys.exit(status)
"""


def _start_up_modules() -> set[str]:
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import sys; print(list(sys.modules))"],
        capture_output=True, text=True, check=True)
    return set(ast.literal_eval(done.stdout))


def _run_reporting_modules(command: str, stdin: bytes, env: dict[str, str]
                           ) -> tuple[subprocess.CompletedProcess[bytes], dict[str, str]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", _REPORT_MODULES, str(PLUGIN)],
                          input=stdin, capture_output=True, timeout=30,
                          env={**base, "CNI_COMMAND": command, "CNI_NETNS": "/var/run/netns/x",
                               "CNI_PATH": str(PLUGIN_DIR), **env})
    report = done.stderr.decode().rpartition("\nMODULES ")[2]
    return done, ast.literal_eval(report)


ATTACHMENT_ENV = {"CNI_CONTAINERID": "ctr1", "CNI_IFNAME": "eth0"}
GC_CONF: dict[str, Any] = {"cni.dev/valid-attachments": [{"containerID": "c", "ifname": "eth0"}]}


@pytest.mark.parametrize(
    ("command", "conf", "env", "status", "code"),
    [
        ("VERSION", {"cniVersion": "1.0.0"}, {}, 0, None),
        ("ADD", {"ipam": {"routes": [{"dst": "0.0.0.0/0"}],
                          "dns": {"nameservers": ["10.96.0.10"]}}},
         {**ATTACHMENT_ENV, "CNI_ARGS": "K8S_POD_NAME=p;IP=192.168.0.5"}, 0, None),
        ("DEL", {}, ATTACHMENT_ENV, 0, None),
        ("CHECK", {}, ATTACHMENT_ENV, 0, None),
        ("STATUS", {}, {}, 0, None),
        ("GC", GC_CONF, {}, 0, None),
        ("ADD", "{not json", ATTACHMENT_ENV, 1, 6),
        ("ADD", "[" * 100_000, ATTACHMENT_ENV, 1, 6),
        ("ADD", {"ipam": {"routes": [{"dst": "nope"}]}}, ATTACHMENT_ENV, 1, 7),
        ("ADD", {"ipam": {"bogus": 1}}, ATTACHMENT_ENV, 1, 2),
        ("ADD", {}, {"CNI_CONTAINERID": "-bad", "CNI_IFNAME": "eth0"}, 1, 4),
        ("ADD", {"unreachable": True}, ATTACHMENT_ENV, 1, 11),
        ("ADD", {"cniVersion": "0.1.0"}, ATTACHMENT_ENV, 1, 1),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 12 else None,
)
def test_plugin_imports_only_builtin_and_c_modules(
    daemon: FakeDaemon, command: str, conf: dict[str, Any] | str, env: dict[str, str],
    status: int, code: int | None,
) -> None:
    if isinstance(conf, dict):
        config = daemon.conf()
        if conf.pop("unreachable", False):
            config = netconf()
        config.update({k: v for k, v in conf.items() if k != "ipam"})
        config["ipam"].update(conf.get("ipam", {}))
        stdin = json.dumps(config).encode()
    else:
        stdin = conf.encode()
    done, kinds = _run_reporting_modules(command, stdin, env)
    assert done.returncode == status, done
    if code is not None:
        assert json.loads(done.stdout)["code"] == code
    start_up = _start_up_modules()
    inlined = set(cni_bundle.INLINED_MODULES) | set(cni_bundle._packages())
    outside = {name: kind for name, kind in kinds.items()
               if name not in start_up and name not in inlined
               and kind not in ("builtin", "extension")}
    assert outside == {}
    for heavy in ("re", "json", "typing", "collections", "enum", "functools", "os", "socket",
                  "__future__", "encodings.idna"):
        assert heavy not in kinds


def test_the_report_runs_the_file_as_the_runtime_does(daemon: FakeDaemon) -> None:
    stdin = json.dumps(daemon.conf()).encode()
    env = {**os.environ, "CNI_COMMAND": "ADD", **ATTACHMENT_ENV}
    direct = subprocess.run([str(PLUGIN)], input=stdin, env=env, capture_output=True, timeout=30)
    reported, _ = _run_reporting_modules("ADD", stdin, ATTACHMENT_ENV)
    assert (direct.returncode, direct.stdout) == (reported.returncode, reported.stdout)
    assert json.loads(direct.stdout)["ips"] == [{"address": "192.168.0.5/24"}]


def test_importtime_lists_only_c_modules() -> None:
    # What `python -X importtime` shows for the installed file (VERSION needs no daemon).
    done = subprocess.run([sys.executable, "-X", "importtime", "-I", "-S", str(PLUGIN)],
                          input=b"{}", env={"CNI_COMMAND": "VERSION"}, capture_output=True,
                          timeout=30)
    assert done.returncode == 0, done
    start_up = subprocess.run([sys.executable, "-X", "importtime", "-I", "-S", "-c", "pass"],
                              capture_output=True, text=True, check=True).stderr

    def imported(stderr: str) -> set[str]:
        return {line.rpartition("|")[2].strip() for line in stderr.splitlines()
                if line.startswith("import time:") and "|" in line} - {"package"}

    assert imported(done.stderr.decode()) - imported(start_up) == {"_json", "_socket"}


# --- the file is what the generator makes from the current source ---------


def _interpreter(plugin: Path) -> str:
    """The interpreter named by a plugin file's #! line (the installer's sys.executable)."""
    first = plugin.read_text().partition("\n")[0]
    assert first.startswith("#!") and first.endswith(" -IS"), first
    return first[2:-4]


def test_installed_file_is_what_the_generator_makes_from_the_current_source() -> None:
    # topoipamctl names this environment's interpreter as its console script does.
    interpreter = _interpreter(PLUGIN)
    assert Path(interpreter).parent == BIN
    assert os.path.realpath(interpreter) == os.path.realpath(sys.executable)
    assert PLUGIN.read_bytes() == cni_bundle.plugin_file(interpreter)
    done = subprocess.run([TOPOIPAMCTL, "install-cni", "--check", "--dest", str(PLUGIN_DIR)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done
    assert done.stdout == f"current {PLUGIN}\n"


def test_the_bytecode_is_the_inlined_modules_compiled_from_their_source() -> None:
    modules = marshal.loads(cni_bundle.payload(PLUGIN.read_bytes()))
    assert [name for name, _ in modules] == list(cni_bundle.INLINED_MODULES)
    for name, code in modules:
        source = cni_bundle.module_source(name)
        on_disk = Path(__import__(name, fromlist=["_"]).__file__ or "").read_bytes()
        assert source == on_disk
        # Compiled as the generator compiles: without column ranges.
        done = subprocess.run(
            [sys.executable, "-I", "-X", "no_debug_ranges", "-c",
             "import marshal, sys; from topoipam.client.cni_bundle import compile_module; "
             "sys.stdout.buffer.write(marshal.dumps(compile_module(sys.argv[1], "
             "sys.stdin.buffer.read())))", name],
            input=source, capture_output=True, check=True, timeout=60)
        assert code == marshal.loads(done.stdout)
        assert all(position[2:] == (None, None) for position in code.co_positions())
    assert "from __future__" not in repr([c.co_names for _, c in modules])


def test_a_changed_source_changes_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    original = cni_bundle.module_source
    before = cni_bundle.plugin_file()
    assert cni_bundle.plugin_file() == before  # the same source, the same bytes
    monkeypatch.setattr(cni_bundle, "module_source",
                        lambda name: original(name) + b"\nCHANGED = 1\n"
                        if name.endswith(".cniwire") else original(name))
    after = cni_bundle.plugin_file()
    assert after != before
    assert after.split(b"(source sha256 ")[1][:16] != before.split(b"(source sha256 ")[1][:16]


def test_inlined_modules_import_only_each_other() -> None:
    # Each inlined module may import the ones before it, and otherwise only
    # built-in and C modules (sys.builtin_module_names or a .so): what the
    # stub packages and the sys.modules check rely on.
    allowed_stdlib = {"_socket", "_json", "posix", "sys", "time", "__future__"}
    for index, name in enumerate(cni_bundle.INLINED_MODULES):
        tree = ast.parse(cni_bundle.module_source(name))
        for node in tree.body:
            if isinstance(node, ast.Import):
                assert {alias.name for alias in node.names} <= allowed_stdlib, (name, node)
            elif isinstance(node, ast.ImportFrom):
                if node.module == "__future__":
                    continue
                imported = {f"{node.module}.{alias.name}" for alias in node.names}
                assert imported <= set(cni_bundle.INLINED_MODULES[:index]), (name, imported)


# --- install-cni --------------------------------------------------------------


def _install(*dests: Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    args = [TOPOIPAMCTL, "install-cni", *(["--check"] if check else [])]
    for dest in dests:
        args += ["--dest", str(dest)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_install_writes_an_executable_file_and_is_idempotent(tmp_path: Path) -> None:
    first = _install(tmp_path)
    assert first.returncode == 0, first
    path = tmp_path / "topoipam"
    assert first.stdout.startswith(f"installed {path} (topoipam ")
    assert f"runs {_interpreter(path)} -I -S)" in first.stdout
    assert path.stat().st_mode & 0o7777 == 0o755
    assert os.listdir(tmp_path) == ["topoipam"]  # no temporary file left behind
    inode = path.stat().st_ino
    again = _install(tmp_path)
    assert again.returncode == 0 and again.stdout.startswith(f"unchanged {path} ")
    assert path.stat().st_ino == inode
    assert path.read_bytes() == cni_bundle.plugin_file(_interpreter(path))


def test_install_replaces_a_stale_file_by_rename(tmp_path: Path) -> None:
    path = tmp_path / "topoipam"
    path.write_text("#!/bin/sh\necho old\n")
    path.chmod(0o644)
    old_inode = path.stat().st_ino
    assert _install(tmp_path, check=True).returncode == 1
    done = _install(tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("installed ")
    assert path.stat().st_ino != old_inode  # a new file renamed over, never rewritten in place
    assert path.stat().st_mode & 0o7777 == 0o755
    assert _install(tmp_path, check=True).returncode == 0
    # A file with the right content but the wrong mode is not current either.
    path.chmod(0o700)
    assert _install(tmp_path, check=True).returncode == 1
    assert _install(tmp_path).stdout.startswith("installed ")
    assert path.stat().st_mode & 0o7777 == 0o755


def test_install_mode_ignores_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        installed = cni_bundle.install(str(tmp_path), b"#!/bin/sh\n")
    finally:
        os.umask(old)
    assert installed.changed
    assert (tmp_path / "topoipam").stat().st_mode & 0o7777 == 0o755


def test_install_to_two_destinations(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    done = _install(one, two, one)
    assert done.returncode == 0, done
    assert [line.split()[:2] for line in done.stdout.splitlines()] == [
        ["installed", str(one / "topoipam")], ["installed", str(two / "topoipam")]]
    assert (one / "topoipam").read_bytes() == (two / "topoipam").read_bytes()


def test_install_refuses_a_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    done = _install(missing)
    assert done.returncode == 1
    assert done.stderr == f"error: cannot install {missing / 'topoipam'}: {missing} is not a " \
                          "directory\n"
    assert not missing.exists()


def test_a_failed_install_leaves_the_old_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "topoipam"
    path.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(cni_bundle.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        cni_bundle.install(str(tmp_path), b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["topoipam"]


def test_the_console_script_runs_the_same_source(daemon: FakeDaemon) -> None:
    stdin = json.dumps(daemon.conf()).encode()
    env = {**os.environ, "CNI_COMMAND": "ADD", **ATTACHMENT_ENV}
    outputs = [subprocess.run([plugin], input=stdin, env=env, capture_output=True, timeout=30)
               for plugin in (str(PLUGIN), str(BIN / "topoipam"))]
    assert [(o.returncode, o.stdout) for o in outputs] == \
        [(0, outputs[0].stdout), (0, outputs[0].stdout)]
    assert json.loads(outputs[0].stdout)["ips"] == [{"address": "192.168.0.5/24"}]


def test_bytecode_for_another_python_is_refused_with_a_cni_error(tmp_path: Path) -> None:
    text = PLUGIN.read_text()
    magic = repr(__import__("importlib.util").util.MAGIC_NUMBER)
    assert f"if MAGIC_NUMBER != {magic}:" in text
    other = tmp_path / "topoipam"
    other.write_text(text.replace(f"if MAGIC_NUMBER != {magic}:",
                                  "if MAGIC_NUMBER != b'\\x00\\x00\\r\\n':"))
    other.chmod(0o755)
    done = subprocess.run([str(other)], input=b"{}", env={"CNI_COMMAND": "VERSION"},
                          capture_output=True, timeout=30)
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["code"] == 999 and "topoipamctl install-cni" in error["msg"]
