"""kvtier's Prometheus metrics: one registry per process, names prefixed ``kvtier_``.

Only the scheduler-side process exposes metrics (workers report counts back in ``WorkerReport``),
so an engine has one scrape target, served on ``metrics.host:metrics.port`` when the port is set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

TIERS = ("memory", "disk", "remote")
_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Counters and histograms of one kvtier instance. Labels: ``tier``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.lookups = Counter("kvtier_lookup_chunks", "Chunks looked up beyond the engine's own hit",
                               registry=reg)
        self.hits = Counter("kvtier_hits", "Chunks served by a tier", ["tier"], registry=reg)
        self.misses = Counter("kvtier_misses", "Chunks looked up that a tier did not hold", ["tier"],
                              registry=reg)
        self.read_bytes = Counter("kvtier_read_bytes", "Bytes read from a tier", ["tier"], registry=reg)
        self.written_bytes = Counter("kvtier_written_bytes", "Bytes written to a tier", ["tier"],
                                     registry=reg)
        self.wire_read_bytes = Counter("kvtier_wire_read_bytes", "Bytes of entries as stored (header and "
                                       "payload, compressed and/or sealed) read from a tier", ["tier"],
                                       registry=reg)
        self.wire_written_bytes = Counter("kvtier_wire_written_bytes", "Bytes of entries as stored written "
                                          "to a tier", ["tier"], registry=reg)
        self.evictions = Counter("kvtier_evictions", "Entries evicted from a tier", ["tier"], registry=reg)
        self.expired = Counter("kvtier_expired", "Entries removed for being older than their namespace's TTL",
                               ["tier"], registry=reg)
        self.invalidated = Counter("kvtier_invalidated", "Entries removed by an admin invalidation", ["tier"],
                                   registry=reg)
        self.errors = Counter("kvtier_errors", "I/O errors and corrupt entries (each one a miss)", ["tier"],
                              registry=reg)
        self.dropped_stores = Counter("kvtier_dropped_stores", "Stores dropped (queue full or no room)",
                                      ["tier"], registry=reg)
        self.skipped_loads = Counter("kvtier_skipped_loads", "Chunks held by a tier but not loaded because "
                                     "loading was expected to be slower than recomputing", ["tier"],
                                     registry=reg)
        self.handoffs = Counter("kvtier_handoffs", "Requests handed off by a prefill instance (expect_tokens): "
                                "complete (every chunk found, after waiting if needed) or timeout", ["outcome"],
                                registry=reg)
        self.loaded_tokens = Counter("kvtier_loaded_tokens", "Tokens copied into the engine instead of computed",
                                     registry=reg)
        self.failed_load_tokens = Counter("kvtier_failed_load_tokens", "Tokens planned to load that the engine "
                                          "recomputed: their chunk failed to read, was corrupt or came too late",
                                          registry=reg)
        self.entries = Gauge("kvtier_entries", "Entries a tier holds now", ["tier"], registry=reg)
        self.capacity_entries = Gauge("kvtier_capacity_entries", "Entries a tier can hold", ["tier"],
                                      registry=reg)
        self.lease_owners = Gauge("kvtier_lease_owners", "Requests holding leases on entries", registry=reg)
        self.lookup_seconds = Histogram("kvtier_lookup_seconds", "Scheduler-side lookup latency",
                                        buckets=_LATENCY_BUCKETS_S, registry=reg)
        self.load_seconds = Histogram("kvtier_load_seconds", "Worker-side load latency per step",
                                      buckets=_LATENCY_BUCKETS_S, registry=reg)
        self.store_seconds = Histogram("kvtier_store_seconds", "Worker-side store latency per step",
                                       buckets=_LATENCY_BUCKETS_S, registry=reg)
        for tier in TIERS:  # make every series visible from the start
            for family in (self.hits, self.misses, self.read_bytes, self.written_bytes, self.evictions,
                           self.errors, self.dropped_stores):
                family.labels(tier=tier)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` over HTTP from a daemon thread. Raises OSError if the port is taken."""
        start_http_server(port, addr=host, registry=self.registry)
