"""Churn on a priority pair of topology pools while daemons are killed and restarted.

Four ``topoipamd`` (two per rack) under strictAffinity; a small shared pool
``racks`` (priority 10, ``topologyKey: rack``, ranges of two blocks) that the
racks outgrow, and a fallback ``zone`` pool (priority 0, ``topologyKey: rack``
too). One thread per node execs the real plugin (ADD, DEL, a repeated ADD now
and then) while the main thread SIGKILLs and restarts daemons. Only CNI code
11 (try again) may fail a call; a failed ADD is retried until answered, a DEL
until done.

Invariants, checked on every acknowledged ADD and at the end against etcd:
no address held twice; an address from ``racks`` while the node's rack still
had room there, from ``zone`` only after; every block of either pool inside a
range held by its node's rack (reclaims move blocks only within a rack's
ranges); nothing given twice a range; ``ipam check`` clean; after the DELs no
address stays allocated and every range went back to its pool.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import signal
import threading
import time
from collections import Counter

import pytest

from tests.conftest import EtcdServer
from tests.daemons import DaemonProcess, NodeDaemons, cni, ctl
from topoipam.daemon.core.holdings import Block, TopologyRange
from topoipam.daemon.store import EtcdOptions, EtcdStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RACK = {"t-0": "0", "t-1": "0", "t-2": "1", "t-3": "1"}
RACKS_POOL = ipaddress.ip_network("10.80.0.0/27")  # two ranges of two /29 blocks: one a rack
ZONE_POOL = ipaddress.ip_network("10.81.0.0/25")  # four ranges of four /29 blocks
RANGE = {RACKS_POOL: 28, ZONE_POOL: 27}
CAPACITY = 14  # addresses a node holds at most: more than the racks pool gives a rack
CHURN_SECONDS = 25
TRY_AGAIN = 11
MANIFEST = f"""\
apiVersion: topoipam/v1
kind: IPPool
metadata: {{name: racks}}
spec: {{cidr: {RACKS_POOL}, blockSize: 29, topologyKey: rack, topologyBlockSize: 28,
        priority: 10}}
---
apiVersion: topoipam/v1
kind: IPPool
metadata: {{name: zone}}
spec: {{cidr: {ZONE_POOL}, blockSize: 29, topologyKey: rack, topologyBlockSize: 27}}
---
apiVersion: topoipam/v1
kind: IPAMConfig
metadata: {{name: default}}
spec: {{strictAffinity: true, maxBlocksPerHost: 8, warmAddresses: 2, ipCooldownSeconds: 0}}
"""


class Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[str, tuple[str, str]] = {}  # container -> (node, address)
        self.holders: dict[str, str] = {}  # address -> container
        self.violations: list[str] = []
        self.ops: Counter[str] = Counter()

    def acknowledged(self, container: str, node: str, address: str) -> None:
        with self.lock:
            self.ops["add"] += 1
            ip = ipaddress.ip_address(address)
            if ip not in RACKS_POOL and ip not in ZONE_POOL:
                self.violations.append(f"{container} on {node} got {address}, in no pool")
            if ip in ZONE_POOL:
                self.ops["add_from_zone"] += 1
            holder = self.holders.get(address)
            if holder is not None and holder != container:
                self.violations.append(f"{address} given to {container} while {holder} holds it")
            if container in self.live and self.live[container][1] != address:
                self.violations.append(f"repeated ADD of {container} gave {address}, "
                                       f"first {self.live[container][1]}")
            self.live[container] = (node, address)
            self.holders[address] = container

    def deleted(self, container: str) -> None:
        with self.lock:
            self.ops["del"] += 1
            _, address = self.live.pop(container)
            del self.holders[address]


def call(daemon: DaemonProcess, command: str, container: str) -> tuple[int, str]:
    config = {"cniVersion": "1.0.0", "name": "chaos-topology",
              "ipam": {"type": "topoipam", "socket": daemon.socket, "timeout": 8}}
    code, out, err = cni(command, config, container=container)
    if code != 0 and out is not None:  # the CNI error's code (11: try again)
        code = int(out.get("code", code))
    if code == 0 and command == "ADD":
        assert out is not None
        return 0, str(out["ips"][0]["address"]).split("/")[0]
    if code not in (0, TRY_AGAIN):
        raise AssertionError(f"{command} {container} on {daemon.node}: code {code}: {out} {err}")
    return code, ""


def until_done(daemon: DaemonProcess, command: str, container: str, ledger: Ledger) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        code, address = call(daemon, command, container)
        if code == 0:
            return address
        with ledger.lock:
            ledger.ops["try_again"] += 1
        time.sleep(0.2)
    raise AssertionError(f"{command} {container} on {daemon.node} still answers 11")


def churn(node: str, daemons: dict[str, DaemonProcess], ledger: Ledger, stop: threading.Event,
          seed: int) -> None:
    rng = random.Random(seed)
    mine: list[str] = []
    serial = 0
    while not stop.is_set():
        daemon = daemons[node]
        if mine and (len(mine) >= CAPACITY or rng.random() < 0.35):
            container = mine.pop(rng.randrange(len(mine)))
            until_done(daemon, "DEL", container, ledger)
            ledger.deleted(container)
        elif mine and rng.random() < 0.1:  # a runtime repeating an ADD
            container = rng.choice(mine)
            ledger.acknowledged(container, node, until_done(daemon, "ADD", container, ledger))
        else:
            container = f"{node}-{serial}"
            serial += 1
            mine.append(container)
            ledger.acknowledged(container, node, until_done(daemon, "ADD", container, ledger))


async def read_etcd(endpoint: str, prefix: str) -> tuple[list[Block], list[TopologyRange]]:
    store = EtcdStore(EtcdOptions(endpoints=(endpoint,)), prefix)
    await store.connect()
    try:
        return ([b.value for b in await store.list_blocks()],
                [r.value for r in await store.list_ranges()])
    finally:
        await store.close()


def test_churn_on_a_priority_pair_of_topology_pools(
        etcd: EtcdServer, prefix: str, node_daemons: NodeDaemons,
        ctl_env: dict[str, str]) -> None:
    assert ctl(ctl_env, "apply", "-f", "-", input=MANIFEST).returncode == 0
    daemons = node_daemons.start_all({node: ["--labels", f"rack={rack}"]
                                      for node, rack in RACK.items()})
    ledger = Ledger()
    stop = threading.Event()
    seed = random.SystemRandom().randrange(1 << 30)
    threads = [threading.Thread(target=churn, args=(node, daemons, ledger, stop, seed + i),
                                daemon=True) for i, node in enumerate(RACK)]
    errors: list[BaseException] = []

    def guarded(thread: threading.Thread) -> None:
        try:
            thread.run()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    runners = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in threads]
    try:
        for runner in runners:
            runner.start()
        rng = random.Random(seed)
        deadline = time.monotonic() + CHURN_SECONDS
        kills = 0
        while time.monotonic() < deadline and not errors:
            time.sleep(rng.uniform(2, 5))
            victim = daemons[rng.choice(sorted(RACK))]
            assert victim.process is not None
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            kills += 1
            time.sleep(rng.uniform(0.2, 1.0))
            victim.start()
        stop.set()
        for runner in runners:
            runner.join(120)
        assert not errors, errors
        assert not ledger.violations, (seed, ledger.violations)
        assert ledger.ops["add_from_zone"] > 0, ("the racks pool never ran out", ledger.ops)

        blocks, ranges = asyncio.run(read_etcd(etcd.endpoint, prefix))
        held = {r.cidr: r.value for r in ranges}
        for block in blocks:
            pool = RACKS_POOL if block.cidr.subnet_of(RACKS_POOL) else ZONE_POOL  # type: ignore[arg-type]
            span = block.cidr.supernet(new_prefix=RANGE[pool])
            assert block.affinity is not None
            assert held.get(span) == RACK[block.affinity], (
                f"block {block.cidr} of {block.affinity} in range {span} held by "
                f"{held.get(span)!r} (seed {seed})")
        check = ctl(ctl_env, "ipam", "check")
        assert check.returncode == 0, (seed, check.stdout)

        for container, (node, _) in sorted(ledger.live.items()):
            until_done(daemons[node], "DEL", container, ledger)
        shown = json.loads(ctl(ctl_env, "get", "allocations", "-o", "json").stdout)
        assert shown == [], shown
        print(f"\nchaos-topology seed {seed}: {dict(ledger.ops)}, {kills} daemon kills")
    finally:
        stop.set()
