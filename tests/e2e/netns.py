"""Network namespaces, the documented configs and a libcni-like chain runner for the e2e tests.

Everything happens inside network namespaces the tests create: "host"
namespaces where the main plugin (bridge, ptp) runs, and "container"
namespaces that get eth0. No address is added outside them, and the only
traffic sent (ping) stays between namespaces of one test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.daemons import PLUGIN_DIR

CNI_BIN = Path("/usr/lib/cni")
#: The page whose conflists the e2e tests run exactly as written.
CNI_DOC = Path(__file__).resolve().parents[2] / "docs" / "cni.md"
DOC_SOCKET = "/run/topoipam/topoipamd.sock"

Json = dict[str, Any]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=check)


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def require_root_and_plugins(*plugins: str) -> None:
    if os.geteuid() != 0:
        raise RuntimeError("the e2e tests need root for ip netns (CI runs as root)")
    for plugin in plugins:
        if not os.access(CNI_BIN / plugin, os.X_OK):
            raise RuntimeError(f"{CNI_BIN / plugin} missing: "
                               "apt-get install containernetworking-plugins")


@contextmanager
def namespaces(count: int, kind: str) -> Iterator[list[str]]:
    """``count`` fresh network namespaces with lo up and IPv6 DAD off, deleted afterwards."""
    tag = uuid.uuid4().hex[:6]
    names = [f"tpi-{kind}{i}-{tag}" for i in range(count)]
    try:
        for name in names:
            sh("ip", "netns", "add", name)
            in_ns(name, "ip", "link", "set", "lo", "up")
            # Addresses usable at once: no duplicate address detection delay.
            for scope in ("all", "default"):
                in_ns(name, "sysctl", "-qw", f"net.ipv6.conf.{scope}.accept_dad=0")
        yield names
    finally:
        for name in names:
            sh("ip", "netns", "del", name, check=False)


def documented_config(name: str, socket: str) -> Json:
    """The conflist docs/cni.md shows under ``<!-- tested-config: NAME -->``, as written.

    Only the daemon's socket path is pointed at the test's daemon.
    """
    text = CNI_DOC.read_text()
    match = re.search(rf"<!-- tested-config: {re.escape(name)} -->\s*```json\n(.*?)```", text,
                      re.S)
    if match is None:
        raise AssertionError(f"docs/cni.md has no config block {name!r}")
    config: Json = json.loads(match.group(1))
    for plugin in config["plugins"]:
        ipam = plugin.get("ipam")
        if ipam is not None:
            assert ipam.get("socket") == DOC_SOCKET, ipam
            ipam["socket"] = socket
    return config


def exec_plugin(plugin: str, command: str, config: Json, host: str, container: str,
                container_id: str, ifname: str = "eth0", cni_args: str = ""
                ) -> tuple[int, Json | None, str]:
    """Exec a CNI plugin in ``host`` for ``container``, as a runtime does."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": f"/var/run/netns/{container}",
        "CNI_IFNAME": ifname,
        "CNI_ARGS": cni_args or "IgnoreUnknown=1;K8S_POD_NAMESPACE=e2e;K8S_POD_NAME=" +
                    container_id,
        # The main plugin finds its IPAM plugin by name on CNI_PATH.
        "CNI_PATH": f"{CNI_BIN}:{PLUGIN_DIR}",
    }
    done = subprocess.run(["ip", "netns", "exec", host, str(CNI_BIN / plugin)],
                          input=json.dumps(config), env=env, capture_output=True, text=True,
                          timeout=60)
    out = done.stdout.strip()
    return done.returncode, json.loads(out) if out else None, done.stderr


def run_chain(conflist: Json, command: str, host: str, container: str, container_id: str,
              result: Json | None = None) -> Json | None:
    """Run a conflist the way libcni does: ADD and CHECK in order, each given the
    previous plugin's result as prevResult; DEL in reverse order. Raises on failure."""
    plugins = conflist["plugins"]
    order = list(reversed(plugins)) if command == "DEL" else plugins
    previous = result
    for plugin in order:
        config = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
        if previous is not None:
            config["prevResult"] = previous
        code, out, err = exec_plugin(plugin["type"], command, config, host, container,
                                     container_id)
        if code != 0:
            raise AssertionError(f"{plugin['type']} {command} failed ({code}): {out} {err}")
        if command == "ADD":
            previous = out
    return previous


def addresses(ns: str, family: int, dev: str) -> list[str]:
    shown = in_ns(ns, "ip", f"-{family}", "-o", "addr", "show", "dev", dev, "scope", "global")
    return [line.split()[3] for line in shown.stdout.splitlines()]


def default_route(ns: str, family: int) -> str:
    return in_ns(ns, "ip", f"-{family}", "route", "show", "default").stdout.strip()
