"""kvtier's metrics on vLLM's /metrics (``integrations/vllm/stats.py``): snapshots on the scheduler
side, mirrored into vLLM metric families on the API server side.

vLLM hands ``build_prom_metrics`` its metric classes; here they are prometheus_client's own,
registering into a registry of the test's, and the exposition is read back with
prometheus_client's parser. The whole path in a running server is tests/e2e/test_vllm_metrics.py.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.config import load_config
from kvtier.integrations.vllm.scheduler import SchedulerSide
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.integrations.vllm.stats import STATS_INTERVAL_S, KVTierPromMetrics, KVTierStats, StatsSource, \
    build_stats
from kvtier.keys import Namespace
from kvtier.layout import KVLayout
from kvtier.metrics import FAMILIES, Metrics
from kvtier.plans import WorkerReport
from tests.dict_tier import DictTier

LAYOUT = KVLayout("cpu_lbhnc", 2, 1, 8, 16, "bfloat16")
CHUNK = 256
LABELS = ["model_name", "engine"]


def prom(registry: CollectorRegistry, engines: int = 1) -> KVTierPromMetrics:
    """KVTierPromMetrics as vLLM's Prometheus logger builds it, its metrics in ``registry``."""
    config = SimpleNamespace(kv_transfer_config=None)
    types = {Counter: partial(Counter, registry=registry), Gauge: partial(Gauge, registry=registry),
             Histogram: partial(Histogram, registry=registry)}
    return KVTierPromMetrics(config, types, LABELS,
                             {index: ["tiny", str(index)] for index in range(engines)})


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(found: dict, name: str, engine: str = "0", **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": "tiny", "engine": engine, **labels}.items())))
    return found[key]


def side(remote: DictTier | None = None) -> SchedulerSide:
    config = load_config({"chunk_tokens": CHUNK, "disk.queue_depth": 8}, {}).config
    setup = EngineSetup(config, LAYOUT, Namespace("default", "m", LAYOUT.fingerprint(), 1), ("l0", "l1"), 2,
                        LAYOUT.chunk_bytes(CHUNK), 16, "/nonexistent-disk", 64, False)
    return SchedulerSide(setup, [], Metrics(), remote)


def test_every_family_is_on_vllms_metrics_from_the_start_with_vllms_labels() -> None:
    registry = CollectorRegistry()
    prom(registry, engines=2)
    found = samples(registry)
    names = {name for name, _ in found}
    for family in FAMILIES:
        expected = f"vllm:{family.name}_total" if family.kind == "counter" else f"vllm:{family.name}"
        assert expected in names, expected
    assert value(found, "vllm:kvtier_hits_total", engine="1", tier="disk") == 0
    assert value(found, "vllm:kvtier_queue_depth", queue="uploads") == 0


def test_counters_advance_by_the_difference_between_snapshots_and_gauges_are_set() -> None:
    metrics, registry = Metrics(), CollectorRegistry()
    mirror = prom(registry, engines=2)
    metrics.hits.labels(tier="memory").inc(3)
    metrics.used_bytes.labels(tier="memory").set(4096)
    mirror.observe(KVTierStats(data={"kvtier": metrics.snapshot()}).to_dict(), 0)
    mirror.observe(KVTierStats(data={"kvtier": metrics.snapshot()}).to_dict(), 0)  # the same snapshot again
    metrics.hits.labels(tier="memory").inc(2)
    metrics.handoffs.labels(outcome="timeout").inc()
    metrics.used_bytes.labels(tier="memory").set(1024)
    mirror.observe({"kvtier": metrics.snapshot()}, 0)
    found = samples(registry)
    assert value(found, "vllm:kvtier_hits_total", tier="memory") == 5
    assert value(found, "vllm:kvtier_hits_total", engine="1", tier="memory") == 0
    assert value(found, "vllm:kvtier_handoffs_total", outcome="timeout") == 1
    assert value(found, "vllm:kvtier_used_bytes", tier="memory") == 1024


def test_a_restarted_engine_counts_on_and_unknown_families_are_ignored() -> None:
    registry = CollectorRegistry()
    mirror = prom(registry)
    mirror.observe({"kvtier": {"kvtier_loaded_tokens": {"": 1000.0}}}, 0)
    mirror.observe({"kvtier": {"kvtier_loaded_tokens": {"": 256.0}, "kvtier_from_the_future": {"": 1.0}}}, 0)
    found = samples(registry)
    assert value(found, "vllm:kvtier_loaded_tokens_total") == 1256
    assert not any("future" in name for name, _ in found)


def test_stats_aggregate_to_the_newest_snapshot_and_reduce_to_a_log_line() -> None:
    older = build_stats({"kvtier": {"kvtier_hits": {"memory": 1.0}}})
    newer = build_stats({"kvtier": {"kvtier_hits": {"memory": 4.0, "disk": 2.0}, "kvtier_errors": {"disk": 1.0}}})
    assert older.aggregate(newer) is newer
    assert newer.aggregate(build_stats(None)) is newer
    assert build_stats(None).is_empty()
    summary = newer.reduce()
    assert summary["kvtier_hits_memory"] == 4 and summary["kvtier_hits_disk"] == 2 and summary["kvtier_errors"] == 1


def test_the_scheduler_side_sends_what_changed_and_keeps_the_tier_gauges() -> None:
    now = [100.0]
    remote = DictTier()
    scheduler = side(remote)
    source = StatsSource(scheduler, clock=lambda: now[0])
    first = source.take()
    assert first is not None
    snapshot = first.snapshot()
    chunk_bytes = LAYOUT.chunk_bytes(CHUNK)
    assert snapshot["kvtier_capacity_bytes"] == {"memory": 16 * chunk_bytes, "disk": 64 * chunk_bytes}
    assert snapshot["kvtier_queue_capacity"] == {"disk_writes": 16, "uploads": 2 * 64}  # per rank x 2 ranks
    assert snapshot["kvtier_remote_unhealthy"] == {"": 0}
    assert source.take() is None  # nothing changed
    source.record(WorkerReport(disk_queue_delta=5, upload_queue_delta=2))
    source.record(WorkerReport(disk_queue_delta=-3))
    scheduler.requests["r1"] = SimpleNamespace()  # a request in flight: at most one snapshot per interval
    assert source.take() is None
    now[0] += STATS_INTERVAL_S
    changed = source.take()
    assert changed is not None
    assert changed.snapshot()["kvtier_queue_depth"] == {"disk_writes": 2, "uploads": 2}
