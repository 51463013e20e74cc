"""Read Prometheus text exposition (``prometheus_client``'s parser): samples, and kvtier's series
grouped by metric and tier. kvtier's series are read from either place they are served: kvtier's
own port (``kvtier_*``) or vLLM's ``/metrics`` (``vllm:kvtier_*``, per engine: summed here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

NO_TIER = "-"
VLLM_PREFIX = "vllm:"  # kvtier's series on vLLM's /metrics carry it (kvtier.integrations.vllm.stats)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)


def parse_samples(text: str) -> list[Sample]:
    """Every sample of an exposition. A malformed exposition is read line by line, and the lines
    the parser refuses are skipped (a partial view of a server's counters beats none)."""
    try:
        return _samples(text)
    except ValueError:
        return [sample for line in text.splitlines() if line.strip() and not line.startswith("#")
                for sample in _line_samples(line)]


def _samples(text: str) -> list[Sample]:
    return [Sample(sample.name, tuple(sorted(sample.labels.items())), float(sample.value))
            for family in text_string_to_metric_families(text) for sample in family.samples]


def _line_samples(line: str) -> list[Sample]:
    try:
        return _samples(line + "\n")
    except ValueError:
        return []


def by_tier(samples: list[Sample], prefix: str = "kvtier_") -> dict[str, dict[str, float]]:
    """metric name -> tier label (``-`` when there is none) -> value, for the samples named
    ``prefix*`` (or ``vllm:prefix*``, named without ``vllm:``). Histogram buckets and ``_created``
    timestamps are left out; samples that differ in other labels (vLLM's ``engine``) are summed."""
    table: dict[str, dict[str, float]] = {}
    for sample in samples:
        name = sample.name.removeprefix(VLLM_PREFIX)
        if not name.startswith(prefix) or name.endswith(("_bucket", "_created")):
            continue
        row = table.setdefault(name, {})
        tier = sample.label("tier") or NO_TIER
        row[tier] = row.get(tier, 0.0) + sample.value
    return table


def value(table: dict[str, dict[str, float]], name: str, tier: str) -> float | None:
    return table.get(name, {}).get(tier)


def hit_rate(table: dict[str, dict[str, float]], tier: str) -> float | None:
    """hits / (hits + misses) for one tier, or None when the counters are absent or zero."""
    hits = value(table, "kvtier_hits_total", tier)
    misses = value(table, "kvtier_misses_total", tier)
    if hits is None or misses is None or hits + misses == 0 or math.isnan(hits + misses):
        return None
    return hits / (hits + misses)
