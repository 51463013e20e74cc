"""Numbers of a benchmark: per repeat, then the median over repeats with the spread (min-max).

Per repeat (``repeat_metrics``), every value is a float or None (not measured): TTFT (from each
request's arrival, see ``dispatch``), the lag behind the arrivals (mean and max of how late each
request was sent), inter-token latency (ITL, the gaps between streamed chunks) mean/p50/p95/p99, request and token
throughput over the repeat's wall time, the share of prompt tokens the server reported as cached,
the engine's CPU seconds, and per kvtier tier the hit rate (hits / (hits + misses) of the chunks
looked up in that tier), bytes read and written, and the tokens it delivered that reached the
engine (``kvtier_loaded_tier_tokens``: a load that failed or was cut short counts only its loaded
prefix), also as a share of all prompt tokens. ``compare`` sets a configuration against the
baseline and says, in words, whether it helped; overlapping ranges, or a single repeat (no range),
are called no clear difference.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from kvtier.bench.runner import ConfigRun, MetricTable, RepeatMeasure
from kvtier.bench.scrape import hit_rate, value
from kvtier.bench.summary import percentile

Metrics = dict[str, float | None]
TIERS = ("memory", "disk", "remote")
NO_REUSE_HIT_RATE = 0.01  # below this overall hit rate, kvtier found nothing to reuse


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    count: int  # repeats that measured it

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.low, "max": self.high, "repeats": self.count}


@dataclass(frozen=True)
class ConfigSummary:
    name: str
    uses_kvtier: bool
    error: str | None
    startup_s: float | None
    warmup_requests_s: float | None
    metrics: dict[str, Spread]  # name -> median and spread over repeats
    ttft_by_round: dict[int, Spread]  # round -> mean TTFT of that round, over repeats
    ttfts_s: tuple[float, ...]  # every request of every repeat, for the CDF

    def median(self, name: str) -> float | None:
        spread = self.metrics.get(name)
        return None if spread is None else spread.median


@dataclass(frozen=True)
class Comparison:
    name: str
    ttft_mean_change: float | None  # (config - baseline) / baseline; negative is faster
    ttft_p95_change: float | None
    throughput_change: float | None  # output tokens per second; positive is better
    cpu_saved: float | None  # (baseline - config) / baseline CPU seconds per request
    verdict: str  # on mean TTFT: "helped", "no clear difference", "did not help"
    cpu_verdict: str  # the same on engine CPU seconds per request
    no_reuse: bool  # kvtier's overall hit rate was (almost) zero: differences are its overhead


def _finite(number: float) -> float | None:
    return None if math.isnan(number) else number


def _distribution(prefix: str, values: list[float]) -> Metrics:
    mean = sum(values) / len(values) if values else math.nan
    return {f"{prefix}_mean_s": _finite(mean), f"{prefix}_p50_s": _finite(percentile(values, 0.50)),
            f"{prefix}_p95_s": _finite(percentile(values, 0.95)), f"{prefix}_p99_s": _finite(percentile(values, 0.99))}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def request_metrics(measure: RepeatMeasure) -> Metrics:
    """Latency, throughput and cache share of one repeat (see the module docstring)."""
    results, wall_s = measure.outcome.results, measure.outcome.wall_s
    num_out = sum(r.num_completion_tokens for r in results)
    num_prompt = sum(r.num_prompt_tokens for r in results)
    cached = [r.num_cached_tokens for r in results]
    metrics: Metrics = {"num_requests": float(len(results)), "num_failed": float(len(measure.outcome.failures))}
    metrics |= _distribution("ttft", [r.ttft_s for r in results])
    metrics |= _distribution("itl", [gap for r in results for gap in r.itl_s])
    lags = [r.lag_s for r in results]
    metrics |= {"lag_mean_s": sum(lags) / len(lags) if lags else None, "lag_max_s": max(lags, default=None)}
    metrics |= {"request_throughput_per_s": _ratio(len(results), wall_s),
                "output_tokens_per_s": _ratio(num_out, wall_s),
                "total_tokens_per_s": _ratio(num_out + num_prompt, wall_s),
                "prompt_cached_fraction": None if None in cached or not num_prompt
                else sum(c or 0 for c in cached) / num_prompt,
                "cpu_s": measure.cpu_s,
                "cpu_s_per_request": None if measure.cpu_s is None or not results else measure.cpu_s / len(results)}
    return metrics


def tier_metrics(table: MetricTable | None) -> Metrics:
    """Hit rate and bytes per tier, and the overall share of looked-up chunks kvtier served."""
    if table is None:
        return {}
    metrics: Metrics = {}
    for tier in TIERS:
        metrics[f"hit_rate_{tier}"] = hit_rate(table, tier)
        metrics[f"read_bytes_{tier}"] = value(table, "kvtier_read_bytes_total", tier)
        metrics[f"written_bytes_{tier}"] = value(table, "kvtier_written_bytes_total", tier)
        metrics[f"loaded_tokens_{tier}"] = value(table, "kvtier_loaded_tier_tokens_total", tier)
    metrics["wire_read_bytes_remote"] = value(table, "kvtier_wire_read_bytes_total", "remote")
    metrics["wire_written_bytes_remote"] = value(table, "kvtier_wire_written_bytes_total", "remote")
    lookups = value(table, "kvtier_lookup_chunks_total", "-")
    hits = sum(value(table, "kvtier_hits_total", tier) or 0.0 for tier in TIERS)
    metrics["hit_rate_all"] = hits / lookups if lookups else None
    metrics["loaded_tokens"] = value(table, "kvtier_loaded_tokens_total", "-")
    return metrics


def repeat_metrics(measure: RepeatMeasure) -> Metrics:
    """``request_metrics`` and ``tier_metrics``, and per tier the share of all prompt tokens that
    tier delivered to the engine (``loaded_share_*``, from the tokens that reached the engine)."""
    metrics = request_metrics(measure) | tier_metrics(measure.metrics)
    num_prompt = sum(r.num_prompt_tokens for r in measure.outcome.results)
    for tier in TIERS:
        loaded = metrics.get(f"loaded_tokens_{tier}")
        metrics[f"loaded_share_{tier}"] = None if loaded is None or not num_prompt else loaded / num_prompt
    return metrics


def spread(values: list[float | None]) -> Spread | None:
    """Median and range of the measured values; None if no repeat measured it."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None
    return Spread(statistics.median(present), min(present), max(present), len(present))


def round_means(measure: RepeatMeasure) -> dict[int, float]:
    by_round: dict[int, list[float]] = {}
    for result in measure.outcome.results:
        by_round.setdefault(result.round, []).append(result.ttft_s)
    return {r: sum(ttfts) / len(ttfts) for r, ttfts in by_round.items()}


def summarize_run(run: ConfigRun) -> ConfigSummary:
    per_repeat = [repeat_metrics(measure) for measure in run.repeats]
    names = sorted({name for metrics in per_repeat for name in metrics})
    metrics = {name: s for name in names if (s := spread([m.get(name) for m in per_repeat])) is not None}
    rounds = [round_means(measure) for measure in run.repeats]
    round_ids = sorted({r for means in rounds for r in means})
    by_round = {r: s for r in round_ids if (s := spread([means.get(r) for means in rounds])) is not None}
    ttfts = tuple(r.ttft_s for measure in run.repeats for r in measure.outcome.results)
    return ConfigSummary(run.name, run.uses_kvtier, run.error, run.startup_s, run.warmup_requests_s, metrics,
                         by_round, ttfts)


def change(base: float | None, other: float | None) -> float | None:
    """(other - base) / base, or None when either is missing or the base is zero."""
    if base is None or other is None or base == 0:
        return None
    return (other - base) / base


def verdict(base: Spread | None, other: Spread | None) -> str:
    """On a lower-is-better measure: "helped" when the ranges over repeats do not overlap and the
    configuration is lower, "did not help" when they do not overlap and it is higher, else
    "no clear difference". A side measured by fewer than two repeats has no known range (its noise
    is unknown), so it never gets a verdict: "no clear difference"."""
    if base is None or other is None:
        return "not measured"
    if base.count < 2 or other.count < 2:
        return "no clear difference"
    if other.high < base.low:
        return "helped"
    if other.low > base.high:
        return "did not help"
    return "no clear difference"


def compare(base: ConfigSummary, other: ConfigSummary) -> Comparison:
    cpu_change = change(base.median("cpu_s_per_request"), other.median("cpu_s_per_request"))
    hit_all = other.median("hit_rate_all")
    return Comparison(
        name=other.name,
        ttft_mean_change=change(base.median("ttft_mean_s"), other.median("ttft_mean_s")),
        ttft_p95_change=change(base.median("ttft_p95_s"), other.median("ttft_p95_s")),
        throughput_change=change(base.median("output_tokens_per_s"), other.median("output_tokens_per_s")),
        cpu_saved=None if cpu_change is None else -cpu_change,
        verdict=verdict(base.metrics.get("ttft_mean_s"), other.metrics.get("ttft_mean_s")),
        cpu_verdict=verdict(base.metrics.get("cpu_s_per_request"), other.metrics.get("cpu_s_per_request")),
        no_reuse=other.uses_kvtier and (hit_all is None or hit_all < NO_REUSE_HIT_RATE))
