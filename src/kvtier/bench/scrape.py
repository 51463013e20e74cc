"""Read Prometheus text exposition: samples, and kvtier's counters grouped by metric and tier."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
NO_TIER = "-"


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)


def parse_samples(text: str) -> list[Sample]:
    """Every sample line of an exposition; comments and malformed lines are skipped."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        labels = tuple(_LABEL.findall(match.group(2) or ""))
        samples.append(Sample(match.group(1), labels, value))
    return samples


def by_tier(samples: list[Sample], prefix: str = "kvtier_") -> dict[str, dict[str, float]]:
    """metric name -> tier label (``-`` when there is none) -> value, for the samples named
    ``prefix*``. Histogram buckets and ``_created`` timestamps are left out; samples that differ in
    other labels are summed."""
    table: dict[str, dict[str, float]] = {}
    for sample in samples:
        if not sample.name.startswith(prefix) or sample.name.endswith(("_bucket", "_created")):
            continue
        row = table.setdefault(sample.name, {})
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
