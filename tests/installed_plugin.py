"""The CNI plugin exactly as ``topoipamctl install-cni`` installs it.

Every test that execs the plugin (directly, or through ``bridge``/``ptp`` on
CNI_PATH) runs this file, so what is tested is what a runtime runs: the
generated single file under ``python -I -S``, not the ``topoipam`` console
script. It is installed once per test process, by the real CLI, into a
temporary directory that only holds it.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PLUGIN_DIR = Path(tempfile.mkdtemp(prefix="topoipam-cni-bin-"))
atexit.register(shutil.rmtree, PLUGIN_DIR, ignore_errors=True)
PLUGIN = PLUGIN_DIR / "topoipam"

_done = subprocess.run(
    [str(Path(sys.executable).parent / "topoipamctl"), "install-cni", "--dest", str(PLUGIN_DIR)],
    capture_output=True, text=True, timeout=60)
if _done.returncode != 0 or not PLUGIN.is_file():
    raise RuntimeError(f"topoipamctl install-cni failed ({_done.returncode}): {_done.stderr}")
