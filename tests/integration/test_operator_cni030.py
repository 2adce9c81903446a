"""Hostile checks of cniVersion 0.3.0: the installed plugin, a real daemon."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.daemons import DaemonProcess, NodeDaemons, cni, ctl, rack_pools_manifest


@pytest.fixture
def n1(node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> DaemonProcess:
    assert ctl(ctl_env, "apply", "-f", "-", input=rack_pools_manifest()).returncode == 0
    return node_daemons.start("n1", ["--labels", "rack=0"])


def conf(daemon: DaemonProcess, version: str) -> dict[str, Any]:
    return {"cniVersion": version, "name": "net",
            "ipam": {"type": "topoipam", "socket": daemon.socket, "assign_ipv6": False}}


def test_cni_030_add_del_version(n1: DaemonProcess, ctl_env: dict[str, str]) -> None:
    code, out, err = cni("VERSION", {"cniVersion": "0.3.0"})
    assert code == 0 and out is not None and "0.3.0" in out["supportedVersions"], (out, err)
    code, out, err = cni("ADD", conf(n1, "0.3.0"), container="c0")
    assert code == 0 and out is not None, (out, err)
    assert out["cniVersion"] == "0.3.0", out
    # 0.3.x result: ips carry "version" ("4"/"6").
    assert out["ips"][0].get("version") == "4", out
    # CHECK does not exist before 0.4.0: a one-line error, not a traceback or a pass.
    code, out2, err2 = cni("CHECK", conf(n1, "0.3.0") | {"prevResult": out}, container="c0")
    assert code != 0 and out2 is not None and "Traceback" not in err2, (out2, err2)
    code, out, err = cni("DEL", conf(n1, "0.3.0"), container="c0")
    assert code == 0, (out, err)
    code, out, err = cni("ADD", conf(n1, "0.2.0"), container="c1")
    assert code != 0 and out is not None and "Traceback" not in err, (out, err)
    print(json.dumps(out))
