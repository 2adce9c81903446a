"""A slow, lossy network to etcd: etcd in a network namespace behind netem (issue 14, item 3).

etcd runs inside a namespace the test creates, reached over a veth pair whose
two ends each delay packets by 20 ms (``tc qdisc ... netem``): 40 ms per
round trip. The test asserts correctness (no error, nothing lost, nothing
twice) and prints the figures; the throughput ratio is gated in
``bench/slow_network.py``, not here, so that a busy CI host cannot make the
test flaky.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tests.daemons import DaemonProcess, ctl
from tests.integration.test_reliability import Counts, attachment, handles
from tests.slow_link import DelayProxy
from topoipam.daemon.core.holdings import (
    Block,
    Handle,
    HandleAddress,
)
from topoipam.daemon.core.writes import PutBlock, PutHandle
from topoipam.daemon.local_etcd import etcd_binary
from topoipam.daemon.store import EtcdOptions, EtcdStore
from topoipam.proto import ipam_pb2, ipam_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DELAY_MS = 20


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def kernel_has_netem() -> bool:
    done = subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"],
                          capture_output=True, text=True)
    if done.returncode == 0:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
        return True
    return False


@dataclass
class SlowEtcd:
    namespace: str
    host_if: str
    endpoint: str
    process: subprocess.Popen[bytes]
    #: Set when the kernel has no sch_netem: the delay is a userspace proxy.
    proxy: DelayProxy | None = None

    @property
    def how(self) -> str:
        return "netem" if self.proxy is None else "userspace delay proxy (no sch_netem)"

    def netem(self, extra: str = "") -> None:
        """Set the delay (and e.g. ``loss 5%``) on both ends of the link."""
        if self.proxy is not None:
            self.proxy.delay = DELAY_MS / 1000
            self.proxy.loss = float(extra.split()[1].rstrip("%")) / 100 if extra else 0.0
            return
        spec = ["delay", f"{DELAY_MS}ms", *extra.split()]
        sh("tc", "qdisc", "replace", "dev", self.host_if, "root", "netem", *spec)
        sh("ip", "netns", "exec", self.namespace, "tc", "qdisc", "replace", "dev", "eth0",
           "root", "netem", *spec)


def _answers(endpoint: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{endpoint}/health", timeout=0.5) as response:
            return b'"true"' in response.read()
    except OSError:
        return False


@pytest.fixture
def slow_etcd() -> Iterator[SlowEtcd]:
    tag = uuid.uuid4().hex[:6]
    namespace, host_if = f"tpi-{tag}", f"tpi{tag}"
    subnet = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    data = tempfile.mkdtemp(prefix="topoipam-netem-")
    sh("ip", "netns", "add", namespace)
    process: subprocess.Popen[bytes] | None = None
    server: SlowEtcd | None = None
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns",
           namespace)
        sh("ip", "addr", "add", f"{subnet}.1/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{subnet}.2/30", "dev", "eth0")
        sh("ip", "netns", "exec", namespace, "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        endpoint = f"http://{subnet}.2:2379"
        with open(os.path.join(data, "etcd.log"), "ab") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", namespace, etcd_binary(), "--name", "slow",
                 "--data-dir", os.path.join(data, "data"),
                 "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
                 "--listen-peer-urls", "http://127.0.0.1:2380",
                 "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                 "--initial-cluster", "slow=http://127.0.0.1:2380", "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT)
        server = SlowEtcd(namespace, host_if, endpoint, process)
        deadline = time.monotonic() + 20
        while not _answers(endpoint):
            assert time.monotonic() < deadline, Path(data, "etcd.log").read_text()[-2000:]
            time.sleep(0.05)
        if not kernel_has_netem():
            server.proxy = DelayProxy(f"{subnet}.2", 2379, DELAY_MS / 1000)
            server.endpoint = server.proxy.endpoint
        server.netem()
        yield server
    finally:
        if server is not None and server.proxy is not None:
            server.proxy.close()
        if process is not None:
            process.terminate()
            process.wait(10)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


async def sequential_allocations(socket: str, tag: str, count: int) -> list[float]:
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub = ipam_pb2_grpc.IpamStub(channel)
        times = []
        for i in range(count):
            started = time.perf_counter()
            await stub.Allocate(ipam_pb2.AllocateRequest(
                attachment=attachment(f"{tag}-{i}"), assign_ipv4=True), timeout=30)
            times.append(time.perf_counter() - started)
        return times


async def storm(socket: str, tag: str, count: int) -> float:
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub = ipam_pb2_grpc.IpamStub(channel)
        started = time.perf_counter()
        await asyncio.gather(*(stub.Allocate(ipam_pb2.AllocateRequest(
            attachment=attachment(f"{tag}-{i}"), assign_ipv4=True), timeout=60)
            for i in range(count)))
        return time.perf_counter() - started


async def per_address_cas(endpoint: str, prefix: str, count: int) -> list[float]:
    """The baseline group commit beats: one CAS transaction (block + handle) per address."""
    async with EtcdStore(EtcdOptions(endpoints=(endpoint,)), f"{prefix}-cas") as store:
        block = Block.empty(ipaddress.ip_network("10.99.0.0/24"), "cas")
        revision = 0
        times = []
        for i in range(count):
            started = time.perf_counter()
            block = block.copy()
            block.allocations[i + 1] = f"h{i}"
            block.unallocated.remove(i + 1)
            handle = Handle(f"net/cas-{i}/eth0", "cas", (HandleAddress(
                block.address(i + 1), block.cidr),), {})
            result = await store.commit([PutBlock(block, revision), PutHandle(handle, 0)])
            assert result.succeeded
            revision = result.revision
            times.append(time.perf_counter() - started)
        return times


async def churn_under_loss(socket: str, seconds: float) -> tuple[dict[str, str], int]:
    """Four workers allocating for ``seconds``; "try again" answers are retried."""
    acked: dict[str, str] = {}
    retries = 0
    deadline = time.monotonic() + seconds

    async def worker(n: int) -> None:
        nonlocal retries
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            stub = ipam_pb2_grpc.IpamStub(channel)
            i = 0
            while time.monotonic() < deadline:
                container = f"loss-{n}-{i}"
                try:
                    reply = await stub.Allocate(ipam_pb2.AllocateRequest(
                        attachment=attachment(container), assign_ipv4=True), timeout=30)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    retries += 1
                    continue
                acked[container] = reply.addresses[0].ip
                i += 1

    await asyncio.gather(*(worker(n) for n in range(4)))
    return acked, retries


def test_slow_network(slow_etcd: SlowEtcd, tmp_path: Path) -> None:
    counts = Counts(f"slow network (20 ms each way, {slow_etcd.how})")
    prefix = f"/topoipam-test/{uuid.uuid4().hex[:12]}/v1"
    env = {**os.environ, "TOPOIPAM_ETCD_ENDPOINTS": slow_etcd.endpoint,
           "TOPOIPAM_PREFIX": prefix}
    assert ctl(env, "create", "ippool", "p", "--cidr", "10.66.0.0/20").returncode == 0
    run = tmp_path / "run"
    run.mkdir(mode=0o750)
    daemon = DaemonProcess("node-n", str(run / "d.sock"), slow_etcd.endpoint, prefix,
                           str(tmp_path / "d.log")).start()
    try:
        asyncio.run(sequential_allocations(daemon.socket, "warm", 3))
        sequential = asyncio.run(sequential_allocations(daemon.socket, "seq", 20))
        cas = asyncio.run(per_address_cas(slow_etcd.endpoint, prefix, 20))
        elapsed = asyncio.run(storm(daemon.socket, "storm", 256))
        counts.operations += 3 + 20 + 20 + 256
        seq_ms, cas_ms = statistics.median(sequential) * 1000, statistics.median(cas) * 1000
        storm_rate, cas_rate = 256 / elapsed, 1000 / cas_ms
        counts.figures.update({
            "sequential Allocate p50 (ms)": round(seq_ms, 1),
            "per-address CAS p50 (ms)": round(cas_ms, 1),
            "storm of 256 (s)": round(elapsed, 2),
            "storm/CAS throughput": f"{storm_rate / cas_rate:.1f}x",
        })
        counts.check(seq_ms >= 2 * DELAY_MS, "the link really delays (one round trip)")

        slow_etcd.netem("loss 5%")
        counts.faults.append("5% packet loss on both ends for 10 s")
        acked, retries = asyncio.run(churn_under_loss(daemon.socket, 10))
        slow_etcd.netem()
        counts.operations += len(acked) + retries
        counts.figures["under loss: acknowledged / retried"] = f"{len(acked)}/{retries}"
        found = handles(slow_etcd.endpoint, prefix)
        held = {h.split("/")[1]: str(v.addresses[0].ip) for h, v in found.items()}
        counts.check(all(held.get(k) == v for k, v in acked.items()), "nothing lost")
        counts.check(len(held) == 3 + 20 + 256 + len(acked),
                     f"exactly what was acknowledged: {len(held)} vs 279 + {len(acked)}")
        counts.check(len(set(held.values())) == len(held), "no address twice")
        check = ctl(env, "ipam", "check")
        counts.check(check.returncode == 0, f"ipam check: {check.stdout}")
    finally:
        daemon.stop()
    counts.report()
