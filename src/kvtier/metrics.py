"""kvtier's Prometheus metrics: one registry per process, names prefixed ``kvtier_``.

Only the scheduler-side process keeps metrics (workers report counts back in ``WorkerReport``).
They are seen in two places: on ``metrics.host:metrics.port`` when the port is set (this module's
registry), and on vLLM's own ``/metrics`` as ``vllm:kvtier_*`` with vLLM's ``model_name`` and
``engine`` labels (``integrations/vllm/stats.py`` mirrors every counter and gauge of ``FAMILIES``
there from ``Metrics.snapshot``; the histograms stay on the separate port).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

TIERS = ("memory", "disk", "remote")
QUEUES = ("disk_writes", "uploads")  # the workers' bounded background queues
_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class Family:
    """A counter or gauge family: its name (a counter's without ``_total``), help text, and its one
    label (None: unlabelled) with the label values shown from the start (others appear when used),
    so that every series a dashboard queries exists before anything happened."""

    name: str
    kind: str  # "counter" | "gauge"
    documentation: str
    label: str | None = None
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        assert (self.label is None) == (not self.values), f"{self.name}: a label comes with its values"


def _counter_family(name: str, documentation: str, label: str | None = None,
                    values: tuple[str, ...] = ()) -> Family:
    return Family(name, "counter", documentation, label, values)


def _gauge_family(name: str, documentation: str, label: str | None = None,
                  values: tuple[str, ...] = ()) -> Family:
    return Family(name, "gauge", documentation, label, values)


FAMILIES = (
    _counter_family("kvtier_lookup_chunks", "Chunks looked up beyond the engine's own hit"),
    _counter_family("kvtier_hits", "Chunks served by a tier", "tier", TIERS),
    _counter_family("kvtier_misses", "Chunks looked up that a tier did not hold", "tier", TIERS),
    _counter_family("kvtier_read_bytes", "Bytes read from a tier", "tier", TIERS),
    _counter_family("kvtier_written_bytes", "Bytes written to a tier", "tier", TIERS),
    _counter_family("kvtier_wire_read_bytes", "Bytes of entries as stored (header and payload, compressed "
                    "and/or sealed) read from a tier", "tier", ("remote",)),
    _counter_family("kvtier_wire_written_bytes", "Bytes of entries as stored written to a tier", "tier",
                    ("remote",)),
    _counter_family("kvtier_evictions", "Entries evicted from a tier", "tier", TIERS),
    _counter_family("kvtier_expired", "Entries removed for being older than their namespace's TTL", "tier",
                    TIERS[:2]),
    _counter_family("kvtier_invalidated", "Entries removed by an admin invalidation", "tier", TIERS[:2]),
    _counter_family("kvtier_errors", "I/O errors and corrupt entries (each one a miss)", "tier", TIERS),
    _counter_family("kvtier_dropped_stores", "Stores dropped (queue full or no room)", "tier", TIERS),
    _counter_family("kvtier_unadmitted_stores", "Chunks computed by the engine and not stored because "
                    "measured reuse was low and the chunk had not been seen before (admission)"),
    _counter_family("kvtier_skipped_loads", "Chunks held by a tier but not loaded because loading was "
                    "expected to be slower than recomputing", "tier", ("remote",)),
    _counter_family("kvtier_handoffs", "Requests handed off by a prefill instance (expect_tokens): complete "
                    "(every chunk found, after waiting if needed) or timeout", "outcome",
                    ("complete", "timeout")),
    _counter_family("kvtier_loaded_tokens", "Tokens copied into the engine instead of computed"),
    _counter_family("kvtier_loaded_tier_tokens", "Tokens copied into the engine, by the tier their chunk was "
                    "planned from (what reached the engine: counted once every rank settled the load)", "tier",
                    TIERS),
    _counter_family("kvtier_failed_load_tokens", "Tokens planned to load that the engine recomputed: their "
                    "chunk failed to read, was corrupt or came too late"),
    _gauge_family("kvtier_entries", "Entries a tier holds now", "tier", TIERS[:2]),
    _gauge_family("kvtier_capacity_entries", "Entries a tier can hold", "tier", TIERS[:2]),
    _gauge_family("kvtier_used_bytes", "Bytes of KV a tier holds now (entry payloads, per tensor-parallel "
                  "rank)", "tier", TIERS[:2]),
    _gauge_family("kvtier_capacity_bytes", "Bytes of KV a tier can hold (entry payloads, per tensor-parallel "
                  "rank)", "tier", TIERS[:2]),
    _gauge_family("kvtier_queue_depth", "Operations waiting on the workers' background queues, all ranks "
                  "(disk_writes: memory -> disk; uploads: memory -> remote)", "queue", QUEUES),
    _gauge_family("kvtier_queue_capacity", "Length of each worker's background queue (a full queue drops "
                  "the store: kvtier_dropped_stores_total)", "queue", QUEUES),
    _gauge_family("kvtier_remote_unhealthy", "1 while the remote tier is marked unhealthy (its calls are "
                  "misses until a probe succeeds), else 0 (also without a remote tier)"),
    _gauge_family("kvtier_lease_owners", "Requests holding leases on entries"),
    _gauge_family("kvtier_reuse_ratio", "Share of the last admission.window chunks looked up that an earlier "
                  "request had looked up too (0 before any lookup)"),
)
_FAMILIES_BY_NAME = {family.name: family for family in FAMILIES}

# One snapshot of every family of FAMILIES: name -> label value ("" when unlabelled) -> value.
# Counters are cumulative (since the engine started), gauges the current value.
Snapshot = dict[str, dict[str, float]]


class _Counter(Counter):
    """A Counter whose labelled children are looked up once: the store asks for one on every store
    and eviction, and prometheus_client's ``labels`` checks and locks on every call. kvtier never
    removes a labelled series, so a child, once made, stays valid."""

    def labels(self, *labelvalues: object, **labelkwargs: object) -> "_Counter":
        key = (labelvalues, tuple(labelkwargs.items()))
        children: dict[object, _Counter] = self.__dict__.setdefault("_kvtier_children", {})
        child = children.get(key)
        if child is None:
            child = children[key] = super().labels(*labelvalues, **labelkwargs)
        return child


class _Gauge(Gauge):
    """A Gauge whose labelled children are looked up once (see ``_Counter``)."""

    def labels(self, *labelvalues: object, **labelkwargs: object) -> "_Gauge":
        key = (labelvalues, tuple(labelkwargs.items()))
        children: dict[object, _Gauge] = self.__dict__.setdefault("_kvtier_children", {})
        child = children.get(key)
        if child is None:
            child = children[key] = super().labels(*labelvalues, **labelkwargs)
        return child


class Metrics:
    """Counters, gauges and histograms of one kvtier instance (``FAMILIES`` describes the counters
    and gauges)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._families: dict[str, Counter | Gauge] = {}
        self.lookups = self._counter("kvtier_lookup_chunks")
        self.hits = self._counter("kvtier_hits")
        self.misses = self._counter("kvtier_misses")
        self.read_bytes = self._counter("kvtier_read_bytes")
        self.written_bytes = self._counter("kvtier_written_bytes")
        self.wire_read_bytes = self._counter("kvtier_wire_read_bytes")
        self.wire_written_bytes = self._counter("kvtier_wire_written_bytes")
        self.evictions = self._counter("kvtier_evictions")
        self.expired = self._counter("kvtier_expired")
        self.invalidated = self._counter("kvtier_invalidated")
        self.errors = self._counter("kvtier_errors")
        self.dropped_stores = self._counter("kvtier_dropped_stores")
        self.skipped_loads = self._counter("kvtier_skipped_loads")
        self.unadmitted_stores = self._counter("kvtier_unadmitted_stores")
        self.handoffs = self._counter("kvtier_handoffs")
        self.loaded_tokens = self._counter("kvtier_loaded_tokens")
        self.loaded_tier_tokens = self._counter("kvtier_loaded_tier_tokens")
        self.failed_load_tokens = self._counter("kvtier_failed_load_tokens")
        self.entries = self._gauge("kvtier_entries")
        self.capacity_entries = self._gauge("kvtier_capacity_entries")
        self.used_bytes = self._gauge("kvtier_used_bytes")
        self.capacity_bytes = self._gauge("kvtier_capacity_bytes")
        self.queue_depth = self._gauge("kvtier_queue_depth")
        self.queue_capacity = self._gauge("kvtier_queue_capacity")
        self.remote_unhealthy = self._gauge("kvtier_remote_unhealthy")
        self.lease_owners = self._gauge("kvtier_lease_owners")
        self.reuse_ratio = self._gauge("kvtier_reuse_ratio")
        reg = self.registry
        self.lookup_seconds = Histogram("kvtier_lookup_seconds", "Scheduler-side lookup latency",
                                        buckets=_LATENCY_BUCKETS_S, registry=reg)
        self.load_seconds = Histogram("kvtier_load_seconds", "Worker-side load latency per step",
                                      buckets=_LATENCY_BUCKETS_S, registry=reg)
        self.load_cpu_seconds = Histogram("kvtier_load_cpu_seconds", "Engine-thread CPU time of the worker's "
                                          "load per step (queuing the copies)", buckets=_LATENCY_BUCKETS_S,
                                          registry=reg)
        self.store_seconds = Histogram("kvtier_store_seconds", "Worker-side store latency per step",
                                       buckets=_LATENCY_BUCKETS_S, registry=reg)

    def _counter(self, name: str) -> Counter:
        family = _FAMILIES_BY_NAME[name]
        assert family.kind == "counter"
        counter = _Counter(name, family.documentation, [family.label] if family.label else [],
                           registry=self.registry)
        for value in family.values:  # make these series visible from the start
            counter.labels(value)
        self._families[name] = counter
        return counter

    def _gauge(self, name: str) -> Gauge:
        family = _FAMILIES_BY_NAME[name]
        assert family.kind == "gauge"
        gauge = _Gauge(name, family.documentation, [family.label] if family.label else [], registry=self.registry)
        for value in family.values:
            gauge.labels(value)
        self._families[name] = gauge
        return gauge

    def snapshot(self) -> Snapshot:
        """The current value of every series of ``FAMILIES`` (counters: their ``_total``)."""
        snapshot: Snapshot = {}
        for name, collector in self._families.items():
            label = _FAMILIES_BY_NAME[name].label
            series = snapshot[name] = {}
            for metric in collector.collect():
                for sample in metric.samples:
                    if sample.name in (name, name + "_total"):
                        series[sample.labels.get(label, "") if label else ""] = sample.value
        return snapshot

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` over HTTP from a daemon thread. Raises OSError if the port is taken."""
        start_http_server(port, addr=host, registry=self.registry)
