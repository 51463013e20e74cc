"""kvtier's counters and gauges on vLLM's own ``/metrics``, through the connector-stats hooks of
vLLM's KV connector API (the same in vLLM 0.26 to 0.34; ``compat.py`` notes the one difference).

The path of one update:
1. EngineCore process, after every step: vLLM asks the scheduler-side connector for its stats
   (``get_kv_connector_stats``). ``StatsSource.take`` answers with a ``KVTierStats`` holding a
   snapshot of kvtier's counters (cumulative) and gauges (``Metrics.snapshot``), or None when the
   snapshot has not changed or the last one is younger than ``STATS_INTERVAL_S`` while requests
   are running (more steps follow; once none runs, every step sends what changed, so the last
   counts of a burst are never held back).
2. vLLM sends the stats' ``data`` to the API server process with its scheduler stats (only when
   its stats are on: not with ``--disable-log-stats``).
3. API server process: vLLM's Prometheus logger hands ``data`` to ``KVTierPromMetrics.observe``
   with the engine's index. Each family of ``kvtier.metrics.FAMILIES`` is there as
   ``vllm:<name>`` with vLLM's labels (``model_name``, ``engine``) and the family's own: counters
   advance by the difference to the engine's last snapshot, gauges are set. vLLM's periodic log
   line ("KV Transfer metrics: ...") comes from ``KVTierStats.reduce``.
The histograms (``kvtier_*_seconds``) stay on kvtier's own metrics port.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from kvtier.metrics import FAMILIES, TIERS, Family, Snapshot
from kvtier.plans import WorkerReport

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from kvtier.integrations.vllm.scheduler import SchedulerSide

NAME_PREFIX = "vllm:"  # vLLM's own series carry it (and vLLM unregisters them when it builds its logger again)
STATS_INTERVAL_S = 0.1  # at most one snapshot per this while requests run (a snapshot costs about 0.1 ms)
SNAPSHOT_KEY = "kvtier"  # the snapshot's key in the stats' data
_FAMILIES_BY_NAME = {family.name: family for family in FAMILIES}


@dataclass
class KVTierStats(KVConnectorStats):
    """The stats kvtier sends to vLLM's API server: ``data = {"kvtier": Snapshot}``. Every snapshot
    holds every series, so the newer of two replaces the older (``aggregate``)."""

    def snapshot(self) -> Snapshot:
        value = self.data.get(SNAPSHOT_KEY)
        return value if isinstance(value, dict) else {}

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        return self if other.is_empty() else other

    def reduce(self) -> dict[str, int | float]:
        """The summary vLLM logs every few seconds: chunks served per tier and tokens loaded."""
        snapshot = self.snapshot()
        summary: dict[str, int | float] = {f"kvtier_hits_{tier}": int(snapshot.get("kvtier_hits", {}).get(tier, 0))
                                           for tier in TIERS}
        summary["kvtier_loaded_tokens"] = int(snapshot.get("kvtier_loaded_tokens", {}).get("", 0))
        summary["kvtier_errors"] = int(sum(snapshot.get("kvtier_errors", {}).values()))
        return summary

    def is_empty(self) -> bool:
        return not self.snapshot()


class StatsSource:
    """Scheduler side: keeps the gauges of ``scheduler``'s metrics (bytes and entries per tier,
    queue depths, remote health) and decides when a snapshot goes to vLLM."""

    def __init__(self, scheduler: "SchedulerSide", interval_s: float = STATS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._scheduler = scheduler
        self._metrics = scheduler.metrics
        self._interval_s = interval_s
        self._clock = clock
        self._next_s = 0.0
        self._last: Snapshot | None = None
        setup, metrics = scheduler.setup, scheduler.metrics
        disk_entries = setup.disk_capacity_entries if setup.disk_dir is not None else 0
        metrics.capacity_bytes.labels(tier="memory").set(setup.num_slots * setup.chunk_bytes)
        metrics.capacity_bytes.labels(tier="disk").set(disk_entries * setup.chunk_bytes)
        queues = (("disk_writes", setup.disk_dir is not None, setup.config.disk.queue_depth),
                  ("uploads", scheduler.remote is not None, setup.config.remote.queue_depth))
        for queue, present, depth in queues:
            metrics.queue_capacity.labels(queue=queue).set(depth * setup.world_size if present else 0)

    def record(self, report: WorkerReport | None) -> None:
        """Follow the queue depths through a step's worker report (changes since the last one)."""
        if report is not None:
            self._metrics.queue_depth.labels(queue="disk_writes").inc(report.disk_queue_delta)
            self._metrics.queue_depth.labels(queue="uploads").inc(report.upload_queue_delta)

    def take(self) -> KVTierStats | None:
        """A snapshot for vLLM's stats, or None: nothing changed, or too soon while requests run."""
        now = self._clock()
        scheduler = self._scheduler
        with scheduler.lock:
            if scheduler.requests and now < self._next_s:
                return None
            self._next_s = now + self._interval_s
            chunk_bytes = scheduler.setup.chunk_bytes
            for tier, num_entries in (("memory", scheduler.store.num_memory_entries),
                                      ("disk", scheduler.store.num_disk_entries)):
                self._metrics.entries.labels(tier=tier).set(num_entries)
                self._metrics.used_bytes.labels(tier=tier).set(num_entries * chunk_bytes)
            self._metrics.remote_unhealthy.set(0 if scheduler.remote is None or scheduler.remote.healthy else 1)
        snapshot = self._metrics.snapshot()
        if snapshot == self._last:
            return None
        self._last = snapshot
        return KVTierStats(data={SNAPSHOT_KEY: snapshot})


def build_stats(data: Mapping[str, object] | None) -> KVTierStats:
    """``KVTierStats`` of a payload vLLM received (the API server rebuilds stats from ``data``)."""
    return KVTierStats(data=dict(data or {}))


class KVTierPromMetrics(KVConnectorPromMetrics):
    """API server side: kvtier's families as vLLM metrics (vLLM's metric classes: prometheus_client's,
    or Ray's wrappers under Ray), one child per engine and label value."""

    def __init__(self, vllm_config: "VllmConfig", metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._families: dict[str, Counter | Gauge] = {}
        self._last_counts: dict[tuple[int, str, str], float] = {}  # (engine, family, label value) -> count
        for family in FAMILIES:
            metric = self._make(family, labelnames)
            self._families[family.name] = metric
            for engine_labels in per_engine_labelvalues.values():  # visible from the start, as vLLM's are
                for value in family.values if family.label else ("",):
                    _child(metric, family, engine_labels, value)

    def _make(self, family: Family, labelnames: list[str]) -> Counter | Gauge:
        labels = [*labelnames, *([family.label] if family.label else [])]
        name = NAME_PREFIX + family.name
        if family.kind == "counter":
            return self._counter_cls(name=name, documentation=family.documentation, labelnames=labels)
        return self._gauge_cls(name=name, documentation=family.documentation, labelnames=labels,
                               multiprocess_mode="mostrecent")

    def observe(self, transfer_stats_data: Mapping[str, object], engine_idx: int = 0) -> None:
        snapshot = build_stats(transfer_stats_data).snapshot()
        engine_labels = self.per_engine_labelvalues[engine_idx]
        for name, series in snapshot.items():
            family = _FAMILIES_BY_NAME.get(name)
            if family is None or not isinstance(series, dict):  # a family of another kvtier version
                continue
            metric = self._families[name]
            for value_label, value in series.items():
                child = _child(metric, family, engine_labels, value_label)
                if family.kind == "gauge":
                    child.set(value)
                    continue
                last = self._last_counts.get((engine_idx, name, value_label), 0.0)
                increase = value - last if value >= last else value  # smaller: the engine restarted
                if increase > 0:
                    child.inc(increase)
                self._last_counts[(engine_idx, name, value_label)] = value


def _child(metric: Counter | Gauge, family: Family, engine_labels: list[object], value: str) -> Counter | Gauge:
    return metric.labels(*engine_labels, *([value] if family.label else []))
