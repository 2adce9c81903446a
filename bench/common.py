"""Shared machinery of the benchmarks: etcd, daemons, floors, statistics, tables, verdicts.

Every benchmark starts its own etcd (free loopback port, temp dir) and its own
``topoipamd`` processes inside a :class:`Workspace`, which cleans everything up
on exit, even on Ctrl-C. Only loopback TCP (etcd) and unix sockets are used.

Run as a script, this module is the empty-gRPC floor server
(``python bench/common.py echo-server SOCKET``): a grpc.aio server with one
generic unary handler that answers an empty request with an empty reply. It
runs in its own process, like the daemon, so the floor pays the same
cross-process hand-off the daemon's calls pay. ``minimal-server SOCKET
ENDPOINT`` is a reference point: the ``topoipam.v1.Ipam`` service whose
Allocate does nothing but one raw etcd CAS transaction (what any Python
grpc.aio daemon must at least do per call).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topoipam.client.rpc import health_check, scrape
from topoipam.daemon.local_etcd import LocalEtcd, free_port, start_local_etcd

BIN = Path(sys.executable).parent
TOPOIPAMD = str(BIN / "topoipamd")
TOPOIPAM = str(BIN / "topoipam")  # the console script; install_plugin() gives the real file
TOPOIPAMCTL = str(BIN / "topoipamctl")
HOST_LOCAL = "/usr/lib/cni/host-local"
BENCH_DIR = Path(__file__).resolve().parent

ECHO_METHOD = "/bench.Echo/Empty"

# Daemon has a field named ``socket``: annotate with an alias of the class.
Socket = socket.socket

ns = time.perf_counter_ns


# ---------------------------------------------------------------------------- statistics


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


@dataclass(frozen=True)
class Stats:
    """Summary of latency samples, in milliseconds."""

    n: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of_ns(cls, samples_ns: Sequence[int]) -> Stats:
        ms = [s / 1e6 for s in samples_ns]
        if not ms:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(len(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99),
                   max(ms), statistics.fmean(ms))

    def row(self, name: str) -> list[str]:
        return [name, str(self.n), fmt(self.p50), fmt(self.p90), fmt(self.p99), fmt(self.max),
                fmt(self.mean)]


STATS_HEADERS = ["what", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms"]


def fmt(value: float, digits: int = 3) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


# ---------------------------------------------------------------------------- tables


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    text_rows = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        )

    print(f"\n== {title}")
    print(line(list(headers)))
    print("  ".join("-" * w for w in widths))
    for row in text_rows:
        print(line(row))
    sys.stdout.flush()


@dataclass
class Verdict:
    """One target: measured / floor compared with a limit on the ratio (or an absolute limit)."""

    name: str
    measured: float
    floor: float | None
    limit: float
    unit: str = "ms"
    higher_is_better: bool = False
    gate: bool = True  # False: printed for information, never fails the run

    @property
    def ratio(self) -> float | None:
        if self.floor is None:
            return None
        if self.floor == 0:
            return math.inf
        return self.measured / self.floor

    @property
    def passed(self) -> bool:
        value = self.measured if self.ratio is None else self.ratio
        if math.isnan(value):
            return False
        return value >= self.limit if self.higher_is_better else value <= self.limit

    @property
    def limit_text(self) -> str:
        if math.isinf(self.limit):
            return "-"
        cmp = ">=" if self.higher_is_better else "<="
        if self.floor is None:
            return f"{cmp} {fmt(self.limit)} {self.unit}".rstrip()
        return f"{cmp} {self.limit:g}x"

    @property
    def verdict(self) -> str:
        if self.gate:
            return "PASS" if self.passed else "FAIL"
        return "info" if self.passed else "info (miss)"


@dataclass
class Report:
    """Collects verdicts, prints them as one table, and sets the exit status."""

    benchmark: str
    verdicts: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, measured: float, floor: float | None, limit: float,
              unit: str = "ms", higher_is_better: bool = False, gate: bool = True) -> Verdict:
        verdict = Verdict(name, measured, floor, limit, unit, higher_is_better, gate)
        self.verdicts.append(verdict)
        return verdict

    def failed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.gate and not v.passed]

    def print(self) -> None:
        rows = [[v.name, f"{fmt(v.measured)} {v.unit}",
                 "-" if v.floor is None else fmt(v.floor),
                 "-" if v.ratio is None else f"{v.ratio:.2f}x", v.limit_text, v.verdict]
                for v in self.verdicts]
        print_table(f"{self.benchmark}: targets",
                    ["target", "measured", "floor", "ratio", "limit", "result"], rows)
        for note in self.notes:
            print(f"  note: {note}")
        failed = self.failed()
        print(f"\n{self.benchmark}: {'FAIL' if failed else 'PASS'}"
              + (f" ({', '.join(v.name for v in failed)})" if failed else ""))
        # One machine-readable line for run_all.py.
        print("BENCH-RESULT " + json.dumps({
            "benchmark": self.benchmark,
            "passed": not failed,
            "targets": [{"name": v.name, "measured": v.measured, "floor": v.floor,
                         "ratio": v.ratio, "limit": v.limit, "limit_text": v.limit_text,
                         "unit": v.unit, "passed": v.passed, "gate": v.gate,
                         "verdict": v.verdict} for v in self.verdicts],
        }))
        sys.stdout.flush()

    def exit_code(self) -> int:
        return 1 if self.failed() else 0


# ---------------------------------------------------------------------------- processes


def _stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (all threads) so far; None = this process."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Etcd(LocalEtcd):
    """The benchmark's etcd: the one local launcher's, plus its metrics."""

    def metrics(self) -> dict[str, float]:
        return scrape(f"{self.endpoint}/metrics")


def start_etcd(workdir: str, extra: Sequence[str] = ()) -> Etcd:
    server = start_local_etcd(workdir, name="bench", extra=extra)
    return Etcd(**vars(server))


@dataclass
class Daemon:
    """A real ``topoipamd`` process on a unix socket."""

    node: str
    socket: str
    prefix: str
    process: subprocess.Popen[bytes]
    log_path: str
    started_ns: int
    notify: Socket
    metrics_url: str | None = None
    ready_ns: int = 0  # when it sent READY=1 (sd_notify)
    serving_ns: int = 0  # when a health check first answered SERVING

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ready_seconds(self) -> float:
        return (self.ready_ns - self.started_ns) / 1e9

    @property
    def serving_seconds(self) -> float:
        return (self.serving_ns - self.started_ns) / 1e9

    def rss_mib(self) -> float:
        return rss_kib(self.pid) / 1024

    def metrics(self) -> dict[str, float]:
        if self.metrics_url is None:
            raise RuntimeError(f"topoipamd {self.node} was started without metrics")
        return scrape(self.metrics_url)

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()[-4000:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for READY=1 on the notify socket, then for health SERVING on the gRPC socket."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"topoipamd {self.node} exited {self.process.returncode}:\n"
                                   f"{self.log()}")
            self.notify.settimeout(0.05)
            try:
                message = self.notify.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in message.split(b"\n"):
                self.ready_ns = ns()
                break
        else:
            raise RuntimeError(f"topoipamd {self.node} not ready after {timeout}s:\n{self.log()}")
        while time.monotonic() < deadline:
            if health_check(self.socket) == "SERVING":
                self.serving_ns = ns()
                return
            time.sleep(0.002)
        raise RuntimeError(f"topoipamd {self.node} not SERVING after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        _stop_process(self.process, 20.0)
        self.notify.close()


class Workspace(contextlib.ExitStack):
    """A temp dir with its own etcd and daemons; everything is stopped and removed on exit."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix=f"topoipam-bench-{name}-")
        self.callback(shutil.rmtree, self.dir, True)
        self._etcd: Etcd | None = None
        self._daemons = 0

    @property
    def etcd(self) -> Etcd:
        if self._etcd is None:
            self._etcd = start_etcd(self.dir)
            self.callback(self._etcd.stop)
        return self._etcd

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    async def seed(self, prefix: str, objects: Iterable[Any]) -> None:
        """Write pools, nodes, config under ``prefix`` of this workspace's etcd."""
        store = await open_store(self.etcd.endpoint, prefix)
        try:
            await put_objects(store, objects)
        finally:
            await store.close()

    def daemon(self, node: str, prefix: str, labels: dict[str, str] | None = None,
               extra: Sequence[str] = (), wait: bool = True, timeout: float = 30.0,
               metrics: bool = False, wrapper: Sequence[str] = ()) -> Daemon:
        """Start ``topoipamd`` for ``node`` (``wrapper`` is prepended, e.g. a profiler)."""
        self._daemons += 1
        tag = f"{node}-{self._daemons}"  # one node may run several times, in several prefixes
        sock_dir = self.path(f"run-{tag}")
        os.makedirs(sock_dir, mode=0o750, exist_ok=True)
        notify_path = self.path(f"notify-{tag}.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOPOIPAM_")}
        env["NOTIFY_SOCKET"] = notify_path
        metrics_address = f"127.0.0.1:{free_port()}" if metrics else "off"
        args = [TOPOIPAMD, "--etcd-endpoints", self.etcd.endpoint, "--node", node,
                "--socket", os.path.join(sock_dir, "topoipamd.sock"), "--prefix", prefix,
                "--metrics-address", metrics_address, "--log-level", "warning",
                # its node-local record in the workspace, not in a state dir shared
                # with earlier runs (it would re-assert their allocations)
                "--state-dir", self.path(f"state-{tag}")]
        if labels:
            args += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
        log_path = self.path(f"topoipamd-{tag}.log")
        with open(log_path, "ab") as log:
            started = ns()
            process = subprocess.Popen([*wrapper, *args, *extra], stdout=log,
                                       stderr=subprocess.STDOUT, env=env)
        daemon = Daemon(node, args[args.index("--socket") + 1], prefix, process, log_path,
                        started, notify,
                        f"http://{metrics_address}/metrics" if metrics else None)
        self.callback(daemon.stop)
        if wait:
            daemon.wait_ready(timeout)
        return daemon

    def spawn(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(list(args), **kwargs)
        self.callback(_stop_process, process)
        return process

    def echo_server(self) -> EchoServer:
        """Start the empty-gRPC floor server in its own process."""
        return self._helper_server("echo-server")

    def minimal_server(self) -> EchoServer:
        """Start the one-raw-transaction-per-Allocate reference server in its own process."""
        return self._helper_server("minimal-server", self.etcd.endpoint)

    def _helper_server(self, kind: str, *extra: str) -> EchoServer:
        sock = self.path(f"{kind}.sock")
        log = self.enter_context(open(self.path(f"{kind}.log"), "ab"))
        process = self.spawn(
            [sys.executable, str(BENCH_DIR / "helper_servers.py"), kind, sock, *extra],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start")
            time.sleep(0.01)
        return EchoServer(sock, process.pid)


def install_plugin(workspace: Workspace) -> str:
    """``topoipamctl install-cni`` into the workspace: the plugin file a runtime execs."""
    dest = workspace.path("cni-bin")
    os.makedirs(dest, exist_ok=True)
    subprocess.run([TOPOIPAMCTL, "install-cni", "--dest", dest], check=True,
                   stdout=subprocess.DEVNULL)
    return os.path.join(dest, "topoipam")


@dataclass(frozen=True)
class EchoServer:
    socket: str
    pid: int


def run_main(body: Callable[[argparse.Namespace], Awaitable[Report] | Report],
             parser: argparse.ArgumentParser, profile_during: str = "") -> None:
    """Parse flags, run the benchmark, print its report, exit non-zero on a missed target.

    With ``profile_during``, the benchmark takes ``--profile FILE``: py-spy on the
    daemon during that phase.
    """
    if profile_during:
        parser.add_argument("--profile", metavar="FILE",
                            help=f"py-spy the daemon during {profile_during} (collapsed stacks)")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        outcome = body(args)
        report = asyncio.run(outcome) if asyncio.iscoroutine(outcome) else outcome
    except KeyboardInterrupt:
        sys.exit(130)
    assert isinstance(report, Report)
    report.print()
    print(f"({report.benchmark} took {time.monotonic() - started:.1f}s)")
    sys.exit(report.exit_code())


# ---------------------------------------------------------------------------- etcd and gRPC


async def open_store(endpoint: str, prefix: str) -> Any:
    """The project's own EtcdStore, connected (for seeding pools and nodes)."""
    from topoipam.daemon.store import EtcdOptions, EtcdStore

    store = EtcdStore(EtcdOptions(endpoints=(endpoint,)), prefix)
    await store.connect()
    return store


async def put_objects(store: Any, objects: Iterable[Any]) -> None:
    """Unconditionally write pools, nodes, config (one transaction per object).

    A pool gets its room index entries as ``topoipamctl create ippool`` writes
    them, so claims in the benchmarks take the path they take for an operator.
    """
    from topoipam.daemon.admin import write_room_marks
    from topoipam.daemon.core.model import IPPool
    from topoipam.daemon.core.writes import PutObject

    for obj in objects:
        result = await store.commit([PutObject(obj)])
        if not result.succeeded:
            raise RuntimeError(f"could not write {obj!r}")
        if isinstance(obj, IPPool):
            await write_room_marks(store, obj)


def pool(name: str, cidr: str, selector: str = "all()", block_size: int = 26) -> Any:
    import ipaddress

    from topoipam.daemon.core.model import IPPool

    return IPPool(name, ipaddress.ip_network(cidr), block_size, selector)


def etcd_channel(endpoint: str) -> Any:
    import grpc.aio

    return grpc.aio.insecure_channel(endpoint.removeprefix("http://"))


class EtcdTxnFloor:
    """One raw etcd transaction as the daemon makes it: compare mod_revision, put, failure get.

    Uses aetcd's generated stubs on a grpc.aio channel, like the daemon's store.
    The value is a block-sized JSON value so the floor moves the same bytes.
    """

    def __init__(self, endpoint: str, key: bytes, value: bytes) -> None:
        from aetcd import rpc

        self.rpc = rpc
        self.channel = etcd_channel(endpoint)
        self.kv = rpc.KVStub(self.channel)
        self.key = key
        self.value = value
        self.revision = 0

    async def setup(self) -> None:
        rpc = self.rpc
        response = await self.kv.Put(rpc.PutRequest(key=self.key, value=self.value))
        self.revision = int(response.header.revision)

    async def once(self) -> int:
        rpc = self.rpc
        started = ns()
        response = await self.kv.Txn(rpc.TxnRequest(
            compare=[rpc.Compare(key=self.key, result=rpc.Compare.EQUAL,
                                 target=rpc.Compare.MOD, mod_revision=self.revision)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=self.key, value=self.value))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=self.key))],
        ))
        elapsed = ns() - started
        if not response.succeeded:
            raise RuntimeError("floor transaction lost its compare")
        self.revision = int(response.responses[0].response_put.header.revision)
        return elapsed

    async def close(self) -> None:
        await self.channel.close()


class EchoFloor:
    """One empty unary gRPC call (grpc.aio client) to the echo server on a unix socket."""

    def __init__(self, socket_path: str) -> None:
        import grpc.aio

        self.channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
        self.call = self.channel.unary_unary(ECHO_METHOD)

    async def once(self) -> int:
        started = ns()
        await self.call(b"", timeout=10)
        return ns() - started

    async def close(self) -> None:
        await self.channel.close()


async def sample(fn: Callable[[], Awaitable[int]], n: int) -> list[int]:
    return [await fn() for _ in range(n)]


def chunks(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` nearly equal positive sizes."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def block_value(cidr: str, affinity: str | None = "bench") -> bytes:
    import ipaddress

    from topoipam.daemon.core.holdings import Block
    from topoipam.daemon.core.model import encode

    return encode(Block.empty(ipaddress.ip_network(cidr), affinity).to_dict())


@contextlib.contextmanager
def timer() -> Iterator[Callable[[], float]]:
    """``with timer() as elapsed: ...; elapsed()`` in seconds."""
    started = ns()
    end: list[int] = []
    yield lambda: ((end[0] if end else ns()) - started) / 1e9
    end.append(ns())


# ---------------------------------------------------------------------------- profiling


@contextlib.contextmanager
def py_spy(pid: int | None, out_path: str, rate: int = 500) -> Iterator[None]:
    """Sample ``pid`` with py-spy (collapsed stacks in ``out_path``) while the block runs.

    ``pid`` None: do nothing (profiling off). py-spy must be installed in the venv
    (``pip install py-spy``); it runs non-blocking so the target is barely slowed.
    """
    if pid is None:
        yield
        return
    exe = BIN / "py-spy"
    if not exe.exists():
        raise RuntimeError("--profile needs py-spy: pip install py-spy into the venv")
    process = subprocess.Popen(
        [str(exe), "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking",
         "--format", "raw", "--output", out_path],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # attach before the measured work starts
    started = time.monotonic()
    try:
        yield
    finally:
        duration = time.monotonic() - started
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        if process.returncode not in (0, -signal.SIGINT):
            print(f"py-spy failed: {stderr.decode()[-500:]}")
        else:
            summarize_profile(out_path, duration + 0.5, rate)


def summarize_profile(path: str, seconds: float, rate: int, top: int = 25) -> None:
    """Print self and inclusive time per function from py-spy's collapsed stacks."""
    self_samples: dict[str, int] = {}
    incl_samples: dict[str, int] = {}
    total = 0
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        print(f"no profile at {path}")
        return
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        leaf = _frame_name(frames[-1])
        self_samples[leaf] = self_samples.get(leaf, 0) + count
        for name in {_frame_name(f) for f in frames}:
            incl_samples[name] = incl_samples.get(name, 0) + count
    if not total:
        print("profile is empty")
        return
    possible = seconds * rate
    print(f"\nprofile {path}: {total} busy samples over {seconds:.1f}s at {rate} Hz "
          f"(~{100 * total / possible:.0f}% of one core busy in Python-visible code)")
    rows = [[name, f"{100 * n / total:.1f}%", f"{n * 1000 / rate:.0f}"]
            for name, n in sorted(self_samples.items(), key=lambda kv: -kv[1])[:top]]
    print_table("py-spy: self time (leaf functions)", ["function", "% busy", "ms"], rows)
    rows = [[name, f"{100 * n / total:.1f}%", f"{n * 1000 / rate:.0f}"]
            for name, n in sorted(incl_samples.items(), key=lambda kv: -kv[1])[:top]]
    print_table("py-spy: inclusive time", ["function", "% busy", "ms"], rows)


def _frame_name(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    parts = file.split("/")
    short = "/".join(parts[-2:]) if len(parts) >= 2 else file
    return f"{name} ({short})"


# ---------------------------------------------------------------------------- echo server
