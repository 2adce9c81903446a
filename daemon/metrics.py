"""Prometheus metrics of one daemon, on its own registry (several daemons may share a process).

The alert rules in ``deploy/prometheus/topoipam-rules.yaml`` are written
against these names; ``tests/integration/test_metrics.py`` checks that a real
daemon exports every series they use.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .core import allocator
from .core.errors import NoPoolForNode
from .core.view import ClusterState

#: Outcomes whose series exist from the start (at 0), so that ``increase()`` sees their
#: first occurrence: a counter series that appears at 1 looks unchanged to Prometheus.
ALERTED_OUTCOMES = ("ok", "Conflict", "PoolExhausted", "NoPoolForNode", "DatastoreUnavailable",
                    "NotReady", "timeout")
ALERTED_METHODS = ("Allocate", "Release")

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
        self.sticky_takeovers = Counter(
            "topoipam_sticky_takeovers", "Sticky identities this node's ADDs took over from a "
            "node that had no live daemon for stickyTakeoverSeconds", registry=self.registry,
        )
        self.claims = Counter(
            "topoipam_block_claims", "Blocks this node claimed, by path: on a pod's request, "
            "in the background (the warm reserve), or reclaimed empty from another node",
            ["path"], registry=self.registry,
        )
        self.relists = Gauge(
            "topoipam_cache_relists", "Full relists of the cache (start, compaction, reconnect)",
            registry=self.registry,
        )
        self.borrowed = Counter(
            "topoipam_allocations_borrowed",
            "Addresses handed out from another node's block: this node had no free address "
            "in its own blocks and could claim no new block",
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "topoipam_pool_fallbacks",
            "Addresses served by a lower-priority pool because the node's top-priority pools "
            "could not give one", ["from_pool", "to_pool"], registry=self.registry,
        )
        for method in ALERTED_METHODS:
            for outcome in ALERTED_OUTCOMES:
                self.results.labels(method, outcome)

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

    def add_topology_collector(self, node: str,
                               state: Callable[[], ClusterState | None]) -> None:
        """Pool capacities, the pools that select this node, and its labels, at scrape time.

        ``state`` returns the cached state, or None while the cache is out of
        sync (then these series are absent: ``topoipam_cache_in_sync`` says why).
        """
        self.registry.register(_TopologyCollector(node, state))


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


_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")


def label_metric_name(key: str) -> str:
    """A node label key as a Prometheus label name, the way kube-state-metrics spells it."""
    return "label_" + _LABEL_NAME.sub("_", key)


class _TopologyCollector(Collector):
    def __init__(self, node: str, state: Callable[[], ClusterState | None]) -> None:
        self._node = node
        self._state = state

    def collect(self) -> Iterator[Metric]:
        capacity = GaugeMetricFamily(
            "topoipam_pool_capacity_addresses",
            "Addresses an enabled pool can hand out (less network, broadcast, gateway and "
            "reserved addresses)", labels=["pool", "family"])
        selected = GaugeMetricFamily(
            "topoipam_node_pool_selected",
            "1 for each enabled Automatic pool whose selector matches this node's labels",
            labels=["node", "pool", "family"])
        counts = GaugeMetricFamily(
            "topoipam_node_selected_pools",
            "Enabled Automatic pools that select this node, per family that has an enabled "
            "pool (0: pods on this node get no address of that family)",
            labels=["node", "family"])
        labels = Metric("topoipam_node_labels", "This node's labels (label_<key>), value 1",
                        "gauge")
        state = self._state()
        if state is not None:
            node_labels = {label_metric_name(k): v for k, v in sorted(state.labels.items())}
            labels.add_sample("topoipam_node_labels", {"node": self._node, **node_labels}, 1)
            for family in sorted({p.family for p in state.pools if not p.disabled}):
                try:
                    pools = allocator.pools_for_node(state.pools, self._node, state.labels,
                                                     family)
                except NoPoolForNode:
                    pools = []
                counts.add_metric([self._node, str(family)], len(pools))
                for pool in pools:
                    selected.add_metric([self._node, pool.name, str(family)], 1)
            for pool in state.pools:
                if not pool.disabled:
                    capacity.add_metric([pool.name, str(pool.family)],
                                        allocator.usable_capacity(pool, state.reservations))
        yield capacity
        yield selected
        yield counts
        yield labels
