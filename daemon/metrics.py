"""Prometheus metrics of one daemon, on its own registry (several daemons may share a process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
                    0.512, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "topoipam_request_duration_seconds", "Latency of daemon API calls",
            ["method"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.results = Counter(
            "topoipam_requests", "Daemon API calls by outcome", ["method", "outcome"],
            registry=self.registry,
        )
        self.etcd_conflicts = Counter(
            "topoipam_etcd_conflicts", "Transactions that lost a compare-and-swap race",
            registry=self.registry,
        )
        self.etcd_errors = Counter(
            "topoipam_etcd_errors", "etcd calls that failed (unreachable, timeout, refused)",
            registry=self.registry,
        )
        self.cache_in_sync = Gauge(
            "topoipam_cache_in_sync", "1 when the daemon's cache is in sync with etcd",
            registry=self.registry,
        )
        self.claims = Counter(
            "topoipam_block_claims", "Blocks this node claimed, by path: on a pod's request "
            "or in the background (the warm reserve)", ["path"], registry=self.registry,
        )
        self.relists = Gauge(
            "topoipam_cache_relists", "Full relists of the cache (start, compaction, reconnect)",
            registry=self.registry,
        )

    def observe_call(self, method: str, outcome: str, seconds: float) -> None:
        # labels() costs a lock and a dict lookup per call: keep the children.
        child = self._children.get((method, outcome))
        if child is None:
            child = self._children[(method, outcome)] = (
                self.latency.labels(method), self.results.labels(method, outcome))
        child[0].observe(seconds)
        child[1].inc()

    def add_pool_collector(self, collect: Callable[[], list[tuple[str, int, int, int]]]) -> None:
        """Pool utilization and affine blocks, computed from the cache at scrape time.

        ``collect`` returns (pool, affine blocks, addresses in use, free addresses).
        """
        self.registry.register(_PoolCollector(collect))


class _PoolCollector(Collector):
    def __init__(self, collect: Callable[[], list[tuple[str, int, int, int]]]) -> None:
        self._collect = collect

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        blocks = GaugeMetricFamily("topoipam_affine_blocks", "Blocks affine to this node",
                                   labels=["pool"])
        in_use = GaugeMetricFamily("topoipam_pool_addresses_in_use",
                                   "Addresses in use in this node's affine blocks",
                                   labels=["pool"])
        free = GaugeMetricFamily("topoipam_pool_addresses_free",
                                 "Free addresses in this node's affine blocks", labels=["pool"])
        for pool, count, used, available in self._collect():
            blocks.add_metric([pool], count)
            in_use.add_metric([pool], used)
            free.add_metric([pool], available)
        yield blocks
        yield in_use
        yield free
