"""The chaos test's machinery (test_chaos.py): the scenario (racks, pools, capacities, the
sticky network), the runtime's ledger of what was acknowledged, etcd read and checked
against it, and the churn: one worker thread per node execing the plugin, paused at
quiet points by a gate."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.daemons import DaemonProcess, cni
from tests.etcd_cluster import EtcdCluster
from topoipam.client.rpc import scrape

NETWORK = "chaos-net"
# Free addresses each daemon keeps ready in its own blocks (issue 13's warm reserve).
WARM_ADDRESSES = 4
TRY_AGAIN = 11
RACK = {"node-0": "0", "node-1": "0", "node-2": "1", "node-3": "1"}
POOLS = {"0": ipaddress.ip_network("10.77.0.0/26"), "1": ipaddress.ip_network("10.77.1.0/26")}
BLOCK_SIZE = 29
MAX_BLOCKS_PER_HOST = 2
# Addresses a node may hold at once (live + in doubt). Per rack 4 blocks of 8
# can be claimed (maxBlocksPerHost 2), minus the pool's network address: 31.
# The small nodes claim both their blocks before the churn (see pre_claim), so
# the big node owns 16 addresses and borrows the rest of its 20 from them.
CAPACITY = {"node-0": 20, "node-1": 8, "node-2": 20, "node-3": 8}
# A bound on churn operations, all workers together. High enough that every
# fault phase still has churn: the installed plugin runs ~40 ADD/DEL a second.
MAX_OPERATIONS = 12_000
CNI_TIMEOUT = 8  # seconds the plugin waits for its daemon (ipam "timeout")
SEED = int(os.environ.get("TOPOIPAM_CHAOS_SEED", "0")) or random.SystemRandom().randrange(1 << 30)


# The sticky network: one identity (pod name) per rack; holds of a few seconds.
STICKY_NETWORK = "chaos-sticky"
STICKY_PODS = {"0": "sts-r0", "1": "sts-r1"}
STICKY_HOLD = 3
STICKY_SHARE = 0.15  # of the churn's steps that start the rack's sticky pod


def is_sticky(container: str) -> bool:
    return container.startswith("sticky-")


def net_config(daemon: DaemonProcess, version: str = "1.0.0", container: str = "",
               network: str = "") -> dict[str, Any]:
    sticky = network == STICKY_NETWORK or is_sticky(container)
    return {"cniVersion": version, "name": STICKY_NETWORK if sticky else NETWORK,
            "ipam": {"type": "topoipam", "socket": daemon.socket, "timeout": CNI_TIMEOUT,
                     **({"sticky": True} if sticky else {})}}


def pod_of(container: str, node: str) -> str:
    return STICKY_PODS[RACK[node]] if is_sticky(container) else container


def cni_args(container: str, node: str) -> str:
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE=chaos;K8S_POD_NAME={pod_of(container, node)}"


def handle_id(container: str) -> str:
    return f"{STICKY_NETWORK if is_sticky(container) else NETWORK}/{container}/eth0"


# ---------------------------------------------------------------------------- bookkeeping


@dataclass
class Ledger:
    """What the runtime side knows: acknowledged allocations and deletions, and what is in doubt.

    ``holders`` maps an address to the live container that holds it by an
    acknowledged ADD with no DEL started since: no other container may be
    given that address while it is there.
    """

    lock: threading.Lock = field(default_factory=threading.Lock)
    live: dict[str, tuple[str, str]] = field(default_factory=dict)  # container -> (node, ip)
    pending_add: dict[str, str] = field(default_factory=dict)  # ADD answered 11 -> node
    pending_del: dict[str, tuple[str, str]] = field(default_factory=dict)  # DEL answered 11
    deleted: dict[str, str] = field(default_factory=dict)  # DEL acknowledged -> node
    abandoned: dict[str, str] = field(default_factory=dict)  # left for GC -> node
    holders: dict[str, str] = field(default_factory=dict)  # ip -> live container
    ops: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    next_id: int = 0
    # Sticky pod -> its container that is live or in doubt (at most one at a time).
    sticky_busy: dict[str, str] = field(default_factory=dict)
    # Sticky pod -> (address, start of the first DEL attempt) of its last container
    # whose ADD and DEL were both acknowledged.
    sticky_last: dict[str, tuple[str, float]] = field(default_factory=dict)
    sticky_del_started: dict[str, float] = field(default_factory=dict)  # container -> time

    def new_container(self, node: str, sticky: bool = False) -> str:
        with self.lock:
            self.next_id += 1
            return f"{'sticky' if sticky else 'chaos'}-{node}-{self.next_id:05d}"

    def new_sticky_container(self, node: str) -> str | None:
        """A container for the rack's sticky pod, unless one is live or in doubt."""
        pod = STICKY_PODS[RACK[node]]
        with self.lock:
            if pod in self.sticky_busy:
                return None
            self.next_id += 1
            container = self.sticky_busy[pod] = f"sticky-{node}-{self.next_id:05d}"
            return container

    def sticky_deleted(self, container: str, node: str, ip: str) -> None:
        """A sticky container's DEL was acknowledged (``ip``: its acknowledged address)."""
        pod = pod_of(container, node)
        started = self.sticky_del_started.pop(container, time.time())
        if self.sticky_busy.get(pod) == container:
            del self.sticky_busy[pod]
        if ip:
            self.sticky_last[pod] = (ip, started)

    def held_by(self, node: str) -> int:
        """Containers of ``node`` that may hold an address (live or in doubt)."""
        return (sum(1 for n, _ in self.live.values() if n == node)
                + sum(1 for n in self.pending_add.values() if n == node)
                + sum(1 for n, _ in self.pending_del.values() if n == node))

    def acknowledge_add(self, container: str, node: str, ip: str) -> None:
        with self.lock:
            self.ops["add_acknowledged"] += 1
            self.checks["ack_address_in_rack_pool"] += 1
            if ipaddress.ip_address(ip) not in POOLS[RACK[node]]:
                self.violations.append(f"{container} on {node} got {ip}, outside its rack pool")
            self.checks["ack_address_not_held_by_another"] += 1
            holder = self.holders.get(ip)
            if holder is not None and holder != container:
                self.violations.append(
                    f"double allocation: {ip} acknowledged to {container} ({node}) while "
                    f"{holder} ({self.live[holder][0]}) holds it")
            if container in self.live:
                self.checks["readd_same_address"] += 1
                if self.live[container][1] != ip:
                    self.violations.append(f"repeated ADD of {container} returned {ip}, "
                                           f"not {self.live[container][1]}")
                return
            if is_sticky(container):
                self.check_sticky_address(container, node, ip)
            self.pending_add.pop(container, None)
            self.live[container] = (node, ip)
            self.holders[ip] = container

    def check_sticky_address(self, container: str, node: str, ip: str) -> None:
        """Within the hold of its last DEL, a sticky pod gets its address back (its rack's
        pool contains it and borrowing is on, whichever node of the rack it is on)."""
        pod = pod_of(container, node)
        if self.sticky_busy.get(pod) != container:
            self.violations.append(f"sticky {container} acknowledged while {pod} is "
                                   f"{self.sticky_busy.get(pod)}'s")
        last = self.sticky_last.get(pod)
        if last is not None and time.time() < last[1] + STICKY_HOLD - 0.05:
            self.checks["sticky_address_kept_within_hold"] += 1
            if ip != last[0]:
                self.violations.append(f"sticky pod {pod} ({container} on {node}) got {ip} "
                                       f"within the hold of its address {last[0]}")
        self.checks["sticky_adds_acknowledged"] += 1

    def start_del(self, container: str) -> tuple[str, str] | None:
        """Take a live container out of ``holders``: its address may be reused from now on."""
        with self.lock:
            entry = self.live.pop(container, None)
            if entry is not None and self.holders.get(entry[1]) == container:
                del self.holders[entry[1]]
            return entry


def addresses_in_etcd(cluster: EtcdCluster, prefix: str
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Blocks (cidr -> JSON) and handles (id -> JSON) as etcd has them now."""
    blocks = {}
    for _, value in cluster.range_prefix(f"{prefix}/blocks/"):
        block = json.loads(value)
        blocks[block["cidr"]] = block
    handles = {key[len(f"{prefix}/handles/"):]: json.loads(value)
               for key, value in cluster.range_prefix(f"{prefix}/handles/")}
    return blocks, handles


def check_etcd(cluster: EtcdCluster, prefix: str, ledger: Ledger) -> int:
    """Compare etcd with the ledger while no CNI call is in flight; returns borrowed addresses."""
    blocks, handles = addresses_in_etcd(cluster, prefix)
    problems = []
    given: dict[str, str] = {}  # ip -> handle, from the blocks
    affinity_of: dict[str, str | None] = {}
    for cidr, block in blocks.items():
        network = ipaddress.ip_network(cidr)
        for ordinal, holder in block["allocations"].items():
            ip = str(network.network_address + int(ordinal))
            affinity_of[ip] = block["affinity"]
            if ip in given:
                problems.append(f"{ip} allocated twice: to {given[ip]} and {holder}")
            given[ip] = holder
    listed: dict[str, str] = {}
    for hid, handle in handles.items():
        for entry in handle["addresses"]:
            if entry["ip"] in listed:
                problems.append(f"{entry['ip']} listed by handles {listed[entry['ip']]} and {hid}")
            listed[entry["ip"]] = hid
    borrowed = 0
    with ledger.lock:
        for container, (node, ip) in ledger.live.items():
            stored = handles.get(handle_id(container))
            ips = [a["ip"] for a in stored["addresses"]] if stored else None
            if stored is None or stored["node"] != node or ips != [ip]:
                problems.append(f"acknowledged {container} ({node}, {ip}) is in etcd as {stored}")
            elif given.get(ip) != handle_id(container):
                problems.append(f"acknowledged {container} ({ip}): its block gives {ip} to "
                                f"{given.get(ip)}")
            elif affinity_of[ip] != node:
                borrowed += 1
        for container, (_, ip) in ledger.pending_del.items():
            in_doubt = handles.get(handle_id(container))
            if in_doubt is not None and [a["ip"] for a in in_doubt["addresses"]] != [ip]:
                problems.append(f"{container} (DEL in doubt) held {ip}, etcd has {in_doubt}")
        for container in ledger.deleted:
            if handle_id(container) in handles or handle_id(container) in given.values():
                problems.append(f"{container} was deleted (DEL acknowledged) but etcd still "
                                "holds an address for it")
        known = set(ledger.live) | set(ledger.pending_add) | set(ledger.pending_del) | set(
            ledger.abandoned)
        for hid, handle in handles.items():
            if hid.startswith((f"{NETWORK}/", f"{STICKY_NETWORK}/")) and (
                    hid.split("/")[1] not in known):
                problems.append(f"handle {hid} belongs to no container the runtime knows")
            node = handle["node"]
            for entry in handle["addresses"]:
                if ipaddress.ip_address(entry["ip"]) not in POOLS[RACK[node]]:
                    problems.append(f"handle {hid} of {node} holds {entry['ip']} outside its "
                                    "rack pool")
        ledger.checks["quiesced_etcd_comparisons"] += 1
        ledger.checks["acknowledged_allocations_verified"] += len(ledger.live)
        ledger.checks["deleted_allocations_verified_gone"] += len(ledger.deleted)
        ledger.checks["blocks_scanned_for_double_allocation"] += len(blocks)
        ledger.violations += problems
    assert not problems, "\n".join(problems)
    return borrowed


# ---------------------------------------------------------------------------- the churn


class Gate:
    """Lets the main thread pause every worker between two CNI calls."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.condition = threading.Condition()
        self.paused = False
        self.idle = 0

    def checkpoint(self, stop: threading.Event) -> None:
        with self.condition:
            if not self.paused:
                return
            self.idle += 1
            self.condition.notify_all()
            while self.paused and not stop.is_set():
                self.condition.wait(0.2)
            self.idle -= 1

    def pause(self, timeout: float = 60) -> None:
        with self.condition:
            self.paused = True
            if not self.condition.wait_for(lambda: self.idle == self.workers, timeout):
                raise AssertionError("workers did not pause (a CNI call hangs?)")

    def resume(self) -> None:
        with self.condition:
            self.paused = False
            self.condition.notify_all()


class Worker(threading.Thread):
    """One node's runtime: ADDs up to its capacity, DELs, retries what answered 11."""

    def __init__(self, node: str, daemon: DaemonProcess, ledger: Ledger, gate: Gate,
                 stop: threading.Event, seed: int) -> None:
        super().__init__(name=f"churn-{node}", daemon=True)
        self.node = node
        self.daemon_process = daemon
        self.ledger = ledger
        self.gate = gate
        self.stop = stop
        self.rng = random.Random(seed)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.gate.checkpoint(self.stop)
                if self.stop.is_set():
                    break
                with self.ledger.lock:
                    if self.ledger.ops["attempted"] >= MAX_OPERATIONS:
                        break
                self.step()
                time.sleep(self.rng.uniform(0, 0.03))
        except BaseException as exc:  # noqa: BLE001 - reported by the test, never lost
            with self.ledger.lock:
                self.ledger.violations.append(f"worker {self.node} crashed: {exc!r}")
            self.stop.set()
        finally:
            with self.gate.condition:  # a finished worker never blocks a pause
                self.gate.idle += 1
                self.gate.condition.notify_all()

    def step(self) -> None:
        ledger, rng = self.ledger, self.rng
        with ledger.lock:
            mine = sorted(c for c, (n, _) in ledger.live.items() if n == self.node)
            doubt_del = sorted(c for c, (n, _) in ledger.pending_del.items() if n == self.node)
            doubt_add = sorted(c for c, n in ledger.pending_add.items() if n == self.node)
            room = CAPACITY[self.node] - ledger.held_by(self.node)
        if doubt_del and rng.random() < 0.5:
            self.delete(rng.choice(doubt_del), retry=True)
        elif doubt_add and rng.random() < 0.5:
            container = rng.choice(doubt_add)
            if rng.random() < 0.7:
                self.add(container, retry=True)
            else:  # the runtime gives up on the pod
                self.delete(container, retry=True)
        elif mine and rng.random() < 0.05:
            self.add(rng.choice(mine), retry=False)  # ADD is idempotent
        elif room > 0 and rng.random() < STICKY_SHARE and (
                sticky := ledger.new_sticky_container(self.node)) is not None:
            self.add(sticky, retry=False)  # the rack's sticky pod, on this node
        elif room > 0 and (rng.random() < 0.6 or len(mine) < 2):
            self.add(ledger.new_container(self.node), retry=False)
        elif mine:
            self.delete(rng.choice(mine), retry=False)

    def call(self, command: str, container: str) -> tuple[int, dict[str, Any] | None]:
        with self.ledger.lock:
            self.ledger.ops["attempted"] += 1
            self.ledger.ops[f"{command.lower()}_attempted"] += 1
        code, out, err = cni(command, net_config(self.daemon_process, container=container),
                             container=container, args=cni_args(container, self.node))
        if code == 0:
            return 0, out
        if code == 1 and out is not None and out.get("code") == TRY_AGAIN \
                and "Traceback" not in err:
            with self.ledger.lock:
                self.ledger.ops["answered_try_again"] += 1
            return TRY_AGAIN, out
        with self.ledger.lock:
            self.ledger.violations.append(
                f"{command} {container} on {self.node}: exit {code}, {out}, stderr {err[-500:]!r}")
        self.stop.set()
        return -1, out

    def add(self, container: str, retry: bool) -> None:
        if retry:
            with self.ledger.lock:
                self.ledger.ops["retried"] += 1
        code, out = self.call("ADD", container)
        if code == 0:
            assert out is not None
            address = str(out["ips"][0]["address"])
            with self.ledger.lock:
                self.ledger.checks["ack_prefix_is_pool"] += 1
                if not address.endswith(f"/{POOLS[RACK[self.node]].prefixlen}"):
                    self.ledger.violations.append(f"ADD {container} answered {address}")
            self.ledger.acknowledge_add(container, self.node, address.split("/")[0])
        elif code == TRY_AGAIN:
            with self.ledger.lock:
                if container not in self.ledger.live:
                    self.ledger.pending_add[container] = self.node

    def delete(self, container: str, retry: bool) -> None:
        ledger = self.ledger
        with ledger.lock:
            if retry:
                ledger.ops["retried"] += 1
            ip = (ledger.pending_del.get(container) or (self.node, ""))[1]
        started = ledger.start_del(container)
        if started is not None:
            ip = started[1]
        if is_sticky(container):
            with ledger.lock:
                ledger.sticky_del_started.setdefault(container, time.time())
        code, _ = self.call("DEL", container)
        with ledger.lock:
            if code == 0:
                ledger.ops["del_acknowledged"] += 1
                ledger.pending_del.pop(container, None)
                ledger.pending_add.pop(container, None)
                ledger.deleted[container] = self.node
                if is_sticky(container):
                    ledger.sticky_deleted(container, self.node, ip)
            elif code == TRY_AGAIN:
                if container in ledger.pending_add:
                    return  # still in doubt as an ADD: nothing was acknowledged
                ledger.pending_del[container] = (self.node, ip)


# ---------------------------------------------------------------------------- waiting, retrying


def metric(daemon: DaemonProcess, port: int, name: str) -> float:
    values = scrape(f"http://127.0.0.1:{port}/metrics")
    if name not in values:
        raise AssertionError(f"{name} not in the metrics of {daemon.node}")
    return values[name]


def wait_for(what: str, condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def retry_until_done(ledger: Ledger, command: str, daemon: DaemonProcess, container: str,
                     config: dict[str, Any] | None = None, attempts: int = 40
                     ) -> dict[str, Any] | None:
    """One CNI call, repeated while it answers 11 (everything is up again: it must succeed)."""
    for attempt in range(attempts):
        with ledger.lock:
            ledger.ops["attempted"] += 1
            ledger.ops[f"{command.lower()}_attempted"] += 1
            if attempt:
                ledger.ops["retried"] += 1
        code, out, err = cni(command, config or net_config(daemon, container=container),
                             container=container, args=cni_args(container, daemon.node))
        if code == 0:
            return out
        assert code == 1 and out is not None and out.get("code") == TRY_AGAIN, (
            f"{command} {container} on {daemon.node}: {code} {out} {err[-500:]}")
        with ledger.lock:
            ledger.ops["answered_try_again"] += 1
        time.sleep(0.25)
    raise AssertionError(f"{command} {container} on {daemon.node} still answers 11")
