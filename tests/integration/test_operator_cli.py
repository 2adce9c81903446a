"""Hostile input to the new sticky-takeover flags: one-line errors, exit codes,
nothing half-written; real etcd, a real daemon."""

from __future__ import annotations

import pytest

from tests.daemons import DaemonProcess, NodeDaemons, cni, ctl, rack_pools_manifest


@pytest.fixture
def n1(node_daemons: NodeDaemons, ctl_env: dict[str, str]) -> DaemonProcess:
    assert ctl(ctl_env, "apply", "-f", "-", input=rack_pools_manifest()).returncode == 0
    return node_daemons.start("n1", ["--labels", "rack=0"])


BAD = [
    ("ipam", "release", "--park"),
    ("ipam", "release", "--identity", "db/none", "--park"),
    ("ipam", "release", "--identity", "", "--park"),
    ("ipam", "release", "--ip", "192.168.0.2", "--park"),
    ("ipam", "release", "--identity", "db/web-0", "--ip", "192.168.0.2", "--park"),
    ("ipam", "release", "--identity", "db/web-0", "--park"),  # n1 alive
    ("ipam", "configure", "--sticky-takeover-seconds", "-1"),
    ("ipam", "configure", "--sticky-takeover-seconds", "abc"),
    ("ipam", "configure", "--sticky-takeover-seconds", "1.5"),
    # Beyond the absence record's 30-day lease a takeover can never happen.
    ("ipam", "configure", "--sticky-takeover-seconds", "99999999999999999999999"),
    ("ipam", "configure", "--sticky-takeover-seconds", str(31 * 24 * 3600)),
    ("explain", "identity", "db/none"),
    ("explain", "identity", ""),
]


def test_bad_input_to_the_takeover_flags_is_one_line(
        n1: DaemonProcess, ctl_env: dict[str, str]) -> None:
    config = {"cniVersion": "1.1.0", "name": "net", "args": {"cni": {"identity": "db/web-0"}},
              "ipam": {"type": "topoipam", "socket": n1.socket, "sticky": True}}
    assert cni("ADD", config, container="c0")[0] == 0
    before = ctl(ctl_env, "get", "ipamconfig", "-o", "yaml").stdout
    failures = []
    for args in BAD:
        done = ctl(ctl_env, *args)
        err = done.stderr.strip()
        last = err.splitlines()[-1:]
        usage = done.returncode == 2 and last != [] and "error:" in last[0]
        if done.returncode == 0 or "Traceback" in err or (len(err.splitlines()) != 1
                                                          and not usage):
            failures.append(f"{args}: exit {done.returncode}: {err!r} {done.stdout!r}")
    after = ctl(ctl_env, "get", "ipamconfig", "-o", "yaml").stdout
    check = ctl(ctl_env, "ipam", "check")
    assert not failures, "\n".join(failures)
    assert after == before
    assert check.returncode == 0, check.stdout + check.stderr
