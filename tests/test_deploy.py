"""What ships beside the code is checked by the tools that consume it.

The Prometheus rules with ``promtool check rules`` and their unit tests with
``promtool test rules`` (Debian's ``prometheus`` package); the systemd unit
with ``systemd-analyze verify`` and ``systemd-analyze security --offline``
(Debian's ``systemd``). tests/run installs both. Which metrics the rules use
is checked against real daemons in tests/integration/test_metrics.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus"
UNIT = ROOT / "systemd" / "topoipamd.service"
#: The exposure of the unit when issue 15 was filed; it must not get worse.
MAX_EXPOSURE = 3.6
#: The documented install: `python3 -m venv /opt/topoipam && /opt/topoipam/bin/pip install ...`.
INSTALL_PREFIX = "/opt/topoipam"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is missing: run tests/run, which installs it")
    return found


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules() -> None:
    done = run(tool("promtool"), "check", "rules", "topoipam-rules.yaml", cwd=RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_of_the_rules() -> None:
    done = run(tool("promtool"), "test", "rules", "topoipam-rules.test.yaml", cwd=RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test() -> None:
    rules = (RULES / "topoipam-rules.yaml").read_text()
    tests = (RULES / "topoipam-rules.test.yaml").read_text()
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", rules, re.M))
    tested = set(re.findall(r"alertname: (\w+)$", tests, re.M))
    assert len(alerts) >= 9
    assert alerts == tested


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this venv's daemon
    # (the one line changed), and at nothing else of this machine.
    shipped = UNIT.read_text()
    daemon = Path(sys.executable).parent / "topoipamd"
    assert f"ExecStart={INSTALL_PREFIX}/bin/topoipamd " in shipped
    unit = tmp_path / "topoipamd.service"
    unit.write_text(shipped.replace(f"ExecStart={INSTALL_PREFIX}/bin/topoipamd ",
                                    f"ExecStart={daemon} "))
    done = run(tool("systemd-analyze"), "verify", str(unit))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""


def test_systemd_security_exposure_does_not_grow() -> None:
    done = run(tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(UNIT))
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"Overall exposure level for topoipamd\.service: ([\d.]+) (\w+)",
                      done.stdout)
    assert match is not None, done.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout
    assert match.group(2) == "OK"


def test_unit_keeps_state_in_its_state_directory() -> None:
    lines = UNIT.read_text().splitlines()
    assert "ProtectSystem=strict" in lines
    assert "StateDirectory=topoipam" in lines
    [exec_start] = [line for line in lines if line.startswith("ExecStart=")]
    assert "--state-dir ${STATE_DIRECTORY}" in exec_start


def test_documentation_is_the_readme_the_install_puts_there(tmp_path: Path) -> None:
    [documentation] = [line for line in UNIT.read_text().splitlines()
                       if line.startswith("Documentation=")]
    path = documentation.removeprefix("Documentation=file:")
    assert path.startswith(f"{INSTALL_PREFIX}/"), documentation
    done = run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
               "--no-build-isolation", "--wheel-dir", str(tmp_path), str(ROOT))
    assert done.returncode == 0, done.stdout + done.stderr
    [wheel] = tmp_path.glob("topoipam-*.whl")
    data = "/".join((wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".data",
                     "data", path.removeprefix(f"{INSTALL_PREFIX}/")))
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(data).decode() == (ROOT / "README.md").read_text()
        # The pages README links to sit beside it, so its links work where it is installed.
        pages = sorted((ROOT / "docs").glob("*.md"))
        assert pages
        for page in pages:
            installed = data.rsplit("/", 1)[0] + f"/docs/{page.name}"
            assert archive.read(installed).decode() == page.read_text(), installed
