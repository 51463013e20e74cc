"""Summaries of timings and human-readable numbers for tables."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    count: int
    mean: float
    p50: float
    p95: float

    def as_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "p50": self.p50, "p95": self.p95}


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: list[float]) -> Summary:
    mean = sum(values) / len(values) if values else math.nan
    return Summary(len(values), mean, percentile(values, 0.50), percentile(values, 0.95))


def format_bytes(num_bytes: float | None) -> str:
    if num_bytes is None or math.isnan(num_bytes):
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{num_bytes:.0f} B"


def format_seconds(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "n/a"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None or math.isnan(ratio) else f"{ratio:.0%}"


def format_table(header: list[str], rows: list[list[str]], num_left_columns: int = 1) -> str:
    """A plain text table: the first ``num_left_columns`` columns left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i < num_left_columns else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])
