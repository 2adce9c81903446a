"""README's step-by-step, run as printed against a real ``topoipamd --dev``.

The commands come from README.md itself, so this test fails when the
walkthrough stops working. The only thing the test supplies is what README
tells the reader to supply: the etcd endpoint ``topoipamd --dev`` printed.
The dev daemon runs in a temporary HOME (its state, etcd and socket under
``~/.local/state/topoipam``) with its metrics listener off, so it shares no
port with other tests; nothing else is added.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from tests.daemons import BIN, TOPOIPAMD
from tests.shell import shell_commands

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def walkthrough_commands(readme: str) -> list[str]:
    """The shell commands of README's step-by-step block, one entry per command.

    A command is a line, joined with the next while it ends in ``\\``, and with
    its here-document up to the terminator; blank and comment lines are dropped.
    """
    after = readme.split("\nStep by step,", 1)[1]
    block = after.split("```sh\n", 1)[1].split("\n```", 1)[0]
    return ["\n".join(command + body) for command, body in shell_commands(block)]


def run_commands(commands: list[str], env: dict[str, str], cwd: Path
                 ) -> list[tuple[str, int, str]]:
    """Run the commands in one bash, as a reader pastes them; (command, exit, output) each."""
    script = []
    for command in commands:
        script += [command, 'echo "@@exit $?"']
    done = subprocess.run(["bash", "-c", "\n".join(script)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=240)
    outputs = re.split(r"^@@exit (\d+)\n", done.stdout, flags=re.M)
    assert len(outputs) == 2 * len(commands) + 1, done.stdout + done.stderr
    return [(command, int(outputs[2 * i + 1]), outputs[2 * i])
            for i, command in enumerate(commands)]


def test_readme_step_by_step_works_as_printed(short_tmp: Path) -> None:
    short_home = short_tmp  # the dev daemon's sockets live under HOME
    commands = walkthrough_commands(README.read_text())
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TOPOIPAM_", "CNI_", "XDG_"))}
    env["HOME"] = str(short_home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `.venv/bin` on your PATH
    daemon_env = {**env, "TOPOIPAM_METRICS_ADDRESS": "off"}
    log_path = short_home / "topoipamd.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([TOPOIPAMD, "--dev"], stdout=log, stderr=subprocess.STDOUT,
                                  env=daemon_env, cwd=short_home)
    try:
        deadline = time.monotonic() + 30
        while "grpcurl" not in log_path.read_text() and time.monotonic() < deadline:
            assert daemon.poll() is None, log_path.read_text()
            time.sleep(0.05)
        endpoint = log_path.read_text().split("etcd at ")[1].split()[0]
        socket_path = short_home / ".local/state/topoipam/topoipamd.sock"
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # The one value README asks the reader to copy: the endpoint --dev printed.
        [export] = [c for c in commands if c.startswith("export TOPOIPAM_ETCD_ENDPOINTS=")]
        assert "what topoipamd --dev printed" in export
        commands[commands.index(export)] = f"export TOPOIPAM_ETCD_ENDPOINTS={endpoint}"
        results = run_commands(commands, env, short_home)
    finally:
        daemon.terminate()
        daemon.wait(30)
    log_text = log_path.read_text()
    by_verb = {command.split("#")[0].strip(): (code, out) for command, code, out in results}
    # Every step succeeds but the last `check routes`, which README says finds a problem.
    for command, code, out in results[:-1]:
        assert code == 0, f"{command!r} exited {code}:\n{out}\ndaemon log:\n{log_text}"
    last_command, last_code, last_out = results[-1]
    assert last_command.startswith("topoipamctl check routes")
    assert last_code == 1, last_out
    assert "breaks aggregation: 192.168.0.0/26 routed to rack=1 (node node-0)" in last_out

    assert by_verb["topoipamctl check coverage"][1].strip() == (
        "check coverage: OK (4 nodes, 2 pools)")
    [pod] = by_verb["topoipamctl get allocations -o wide"][1].splitlines()[1:]
    assert pod.split()[1:4] == ["node-0", "rack-0-ippool", "default/nginx-0"], pod
    assert pod.startswith("192.168.0."), pod
    placement = by_verb["topoipamctl check placement"][1]
    assert "1 of 1 allocation(s) outside their node's pools" in placement, placement
