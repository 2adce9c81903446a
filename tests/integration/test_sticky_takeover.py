"""A sticky pod whose node died starts elsewhere: real daemons, the installed plugin, real etcd.

n1's daemon is killed (SIGKILL: no DEL will ever come); once n1 has had no live
daemon for ``stickyTakeoverSeconds``, web-0's ADD on n2 takes its address over.
Before that, the refusal says how long n1's daemon has been gone and names the
command that parks the identity at once, which works.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import DaemonProcess, NodeDaemons, cni, ctl, rack_pools_manifest

NETWORK = "takeover-net"
# The fence vanishes 2/3 to 3/3 of the lease after the kill (keep-alives every third).
LEASE_SECONDS = 10  # the default
TAKEOVER_SECONDS = 5


@pytest.fixture
def daemons(node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> dict[str, DaemonProcess]:
    run(ctl_env, "apply", "-f", "-", input=rack_pools_manifest())
    flags = ["--labels", "rack=0", "--node-lease-seconds", str(LEASE_SECONDS)]
    return node_daemons.start_all({"n1": flags, "n2": flags})


def run(ctl_env: dict[str, str], *args: str, input: str | None = None) -> str:
    done = ctl(ctl_env, *args, input=input)
    assert done.returncode == 0, f"topoipamctl {' '.join(args)}: {done.stderr}"
    return done.stdout


def add(daemon: DaemonProcess, container: str, identity: str
        ) -> tuple[int, dict[str, Any] | None, str]:
    config = {"cniVersion": "1.1.0", "name": NETWORK, "args": {"cni": {"identity": identity}},
              "ipam": {"type": "topoipam", "socket": daemon.socket, "sticky": True}}
    return cni("ADD", config, container=container)


def address_of(result: tuple[int, dict[str, Any] | None, str]) -> str:
    code, out, err = result
    assert code == 0 and out is not None, (out, err)
    return str(out["ips"][0]["address"]).split("/")[0]


def refusal(result: tuple[int, dict[str, Any] | None, str]) -> str:
    code, out, err = result
    assert code == 1 and out is not None and out["code"] == 112, (out, err)
    return str(out["msg"])


def test_a_sticky_pod_of_a_dead_node_takes_its_address_over_on_another(
        daemons: dict[str, DaemonProcess], ctl_env: dict[str, str]) -> None:
    assert "configured" in run(ctl_env, "ipam", "configure", "--sticky-takeover-seconds",
                               str(TAKEOVER_SECONDS))
    assert "5" in run(ctl_env, "get", "ipamconfig", "-o", "wide").split()
    time.sleep(1.0)  # the daemons' caches pick the config up
    n1, n2 = daemons["n1"], daemons["n2"]
    web0 = address_of(add(n1, "n1-web-0", "db/web-0"))
    web1 = address_of(add(n1, "n1-web-1", "db/web-1"))

    # n1's daemon is alive: the ADD on n2 is refused, and so is parking without --force.
    message = refusal(add(n2, "n2-web-0", "db/web-0"))
    assert "delete the other pod first" in message and "alive" in message, message
    done = ctl(ctl_env, "ipam", "release", "--identity", "db/web-1", "--park")
    assert done.returncode != 0 and "alive" in done.stderr and "--force" in done.stderr, done

    n1.kill()
    killed = time.monotonic()
    # Until the takeover time, the refusal says how long n1's daemon has been gone and
    # names the command that parks the identity now.
    while True:
        message = refusal(add(n2, "n2-web-1", "db/web-1"))
        if "no live topoipamd" in message:
            break
        assert time.monotonic() - killed < LEASE_SECONDS + 3, message
        time.sleep(0.3)
    assert re.search(r"for \d+ ?s", message), message
    command = "topoipamctl ipam release --identity db/web-1 --park"
    assert command in message, message
    explained = run(ctl_env, "explain", "identity", "db/web-1")
    assert command in explained and "no live topoipamd" in explained, explained
    parked = run(ctl_env, *command.split()[1:])
    assert web1 in parked, parked
    assert address_of(add(n2, "n2-web-1", "db/web-1")) == web1

    # web-0 is taken over by its own ADD, stickyTakeoverSeconds after n1's daemon vanished.
    while True:
        result = add(n2, "n2-web-0", "db/web-0")
        elapsed = time.monotonic() - killed
        if result[0] == 0:
            break
        message = refusal(result)
        assert "topoipamctl ipam release --identity db/web-0 --park" in message, message
        assert elapsed < 20, message
        time.sleep(0.5)
    assert address_of(result) == web0
    assert 10 <= elapsed <= 20, elapsed
    assert "took it over from node n1" in Path(n2.log_path).read_text()
    rows = run(ctl_env, "get", "allocations", "-o", "wide")
    assert "n2-web-0" in rows and "n1-web-0" not in rows, rows
    assert "OK" in run(ctl_env, "ipam", "check")

    # n1 comes back (same state directory): its record of web-0 is dropped, not
    # re-asserted against n2 (no conflict); the old pod's DEL then frees nothing.
    n1.start()
    assert "conflict" not in n1.log().lower(), n1.log()
    config = {"cniVersion": "1.1.0", "name": NETWORK, "args": {"cni": {"identity": "db/web-0"}},
              "ipam": {"type": "topoipam", "socket": n1.socket, "sticky": True}}
    assert cni("DEL", config, container="n1-web-0")[0] == 0
    rows = run(ctl_env, "get", "allocations", "-o", "wide")
    assert "n2-web-0" in rows and "n2-web-1" in rows, rows
    assert "OK" in run(ctl_env, "ipam", "check")
