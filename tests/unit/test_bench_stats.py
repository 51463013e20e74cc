"""Statistics, verdicts and the report of ``kvtier bench``, on hand-made measurements."""

from __future__ import annotations

import json
import math

import pytest

from kvtier.bench.cost import load_prices
from kvtier.bench.dispatch import DispatchOutcome, RequestFailure, RequestResult
from kvtier.bench.report import build_report, markdown, results_json, statements
from kvtier.bench.runner import ConfigRun, RepeatMeasure, metrics_increase
from kvtier.bench.stats import Spread, change, compare, repeat_metrics, spread, summarize_run, tier_metrics, verdict


def result(index: int, ttft_s: float, round_: int = 1, cached: int | None = 0) -> RequestResult:
    return RequestResult(index=index, round=round_, sent_s=float(index), ttft_s=ttft_s, total_s=ttft_s + 0.3,
                         itl_s=(0.1, 0.1, 0.1), num_prompt_tokens=1000, num_cached_tokens=cached,
                         num_completion_tokens=4)


def measure(repeat: int, ttfts: list[float], cpu_s: float | None = 10.0, wall_s: float = 10.0,
            metrics: dict[str, dict[str, float]] | None = None) -> RepeatMeasure:
    results = tuple(result(i, t, round_=1 + i % 2) for i, t in enumerate(ttfts))
    return RepeatMeasure(repeat, DispatchOutcome(results, (), wall_s), cpu_s, metrics)


def run(name: str, ttft_sets: list[list[float]], cpu_s: float = 10.0, kvtier: bool = False,
        metrics: dict[str, dict[str, float]] | None = None) -> ConfigRun:
    return ConfigRun(name, kvtier, None, 20.0, 0.5,
                     [measure(i + 1, ttfts, cpu_s, metrics=metrics) for i, ttfts in enumerate(ttft_sets)])


KVTIER_COUNTERS = {"kvtier_hits_total": {"memory": 6.0, "disk": 2.0, "remote": 0.0},
                   "kvtier_misses_total": {"memory": 4.0, "disk": 2.0, "remote": 0.0},
                   "kvtier_read_bytes_total": {"memory": 6e6, "disk": 2e6},
                   "kvtier_written_bytes_total": {"memory": 1e7, "disk": 1e7},
                   "kvtier_lookup_chunks_total": {"-": 10.0}, "kvtier_loaded_tokens_total": {"-": 2048.0},
                   "kvtier_loaded_tier_tokens_total": {"memory": 1536.0, "disk": 512.0, "remote": 0.0}}


def test_spread_and_change() -> None:
    assert spread([3.0, None, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0, 3)
    assert spread([None, math.nan]) is None
    assert change(2.0, 1.0) == -0.5
    assert change(0.0, 1.0) is None and change(None, 1.0) is None


def test_verdict_needs_ranges_apart() -> None:
    base = Spread(1.0, 0.9, 1.1, 3)
    assert verdict(base, Spread(0.5, 0.4, 0.6, 3)) == "helped"
    assert verdict(base, Spread(1.5, 1.4, 1.6, 3)) == "did not help"
    assert verdict(base, Spread(0.95, 0.85, 1.0, 3)) == "no clear difference"
    assert verdict(None, base) == "not measured"
    # one repeat on either side: no range, so no verdict however large the difference
    assert verdict(Spread(1.0, 1.0, 1.0, 1), Spread(0.1, 0.1, 0.1, 1)) == "no clear difference"
    assert verdict(base, Spread(0.1, 0.1, 0.1, 1)) == "no clear difference"


def test_repeat_metrics() -> None:
    metrics = repeat_metrics(measure(1, [0.1, 0.2, 0.3, 0.4], cpu_s=8.0, wall_s=2.0, metrics=KVTIER_COUNTERS))
    assert metrics["ttft_mean_s"] == pytest.approx(0.25)
    assert metrics["ttft_p50_s"] == pytest.approx(0.25)
    assert metrics["itl_p95_s"] == pytest.approx(0.1)
    assert metrics["request_throughput_per_s"] == 2.0
    assert metrics["output_tokens_per_s"] == 8.0
    assert metrics["total_tokens_per_s"] == (4 * 1004) / 2.0
    assert metrics["cpu_s_per_request"] == 2.0
    assert metrics["prompt_cached_fraction"] == 0.0
    assert metrics["hit_rate_memory"] == 0.6 and metrics["hit_rate_disk"] == 0.5
    assert metrics["hit_rate_remote"] is None  # nothing reached it
    assert metrics["hit_rate_all"] == 0.8
    assert metrics["read_bytes_disk"] == 2e6
    # what reached the engine, per tier, and as a share of the repeat's 4 x 1000 prompt tokens
    assert (metrics["loaded_tokens_memory"], metrics["loaded_tokens_disk"]) == (1536.0, 512.0)
    assert metrics["loaded_share_disk"] == 512 / 4000 and metrics["loaded_share_remote"] == 0.0


def test_tier_metrics_without_counters() -> None:
    assert tier_metrics(None) == {}


def test_metrics_increase_keeps_counters_only() -> None:
    before = {"kvtier_hits_total": {"memory": 2.0}, "kvtier_entries": {"memory": 5.0}}
    after = {"kvtier_hits_total": {"memory": 5.0, "disk": 1.0}, "kvtier_entries": {"memory": 9.0}}
    assert metrics_increase(before, after) == {"kvtier_hits_total": {"memory": 3.0, "disk": 1.0}}
    assert metrics_increase(None, after) is None


def test_summary_takes_medians_per_round() -> None:
    summary = summarize_run(run("x", [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert summary.metrics["ttft_mean_s"] == Spread(3.5, 1.5, 5.5, 3)
    assert summary.ttft_by_round[1] == Spread(3.0, 1.0, 5.0, 3)
    assert summary.ttft_by_round[2] == Spread(4.0, 2.0, 6.0, 3)
    assert len(summary.ttfts_s) == 6


def test_compare_and_honest_statements() -> None:
    base = summarize_run(run("vllm", [[1.0, 1.0]] * 3, cpu_s=10.0))
    faster = summarize_run(run("kvtier-memory", [[0.2, 0.2]] * 3, cpu_s=5.0, kvtier=True, metrics=KVTIER_COUNTERS))
    zero = dict(KVTIER_COUNTERS, kvtier_hits_total={"memory": 0.0, "disk": 0.0, "remote": 0.0})
    slower = summarize_run(run("kvtier-memory+disk", [[1.1, 1.1]] * 3, cpu_s=11.0, kvtier=True, metrics=zero))
    comparison = compare(base, faster)
    assert comparison.ttft_mean_change == pytest.approx(-0.8)
    assert comparison.cpu_saved == pytest.approx(0.5)
    assert comparison.verdict == "helped" and comparison.cpu_verdict == "helped" and not comparison.no_reuse
    overhead = compare(base, slower)
    assert overhead.verdict == "did not help" and overhead.no_reuse
    report = build_report("t", [("k", "v")], [base, faster, slower], load_prices(None, {}), has_rounds=True)
    lines = statements(report)
    assert "**kvtier-memory** helped: mean TTFT -80%" in lines[0]
    assert "found nothing to reuse" in lines[1] and "mean TTFT +10%" in lines[1] and "did NOT help" in lines[1]
    assert any("kvtier-memory+disk** COSTS" in line for line in lines)  # 10% more compute: a loss
    assert ("**kvtier-memory** by round: round 1 (nothing stored yet) mean TTFT -80% (helped); rounds 2 and later "
            "-80% (helped) vs `vllm`.") in lines
    text = markdown(report)
    assert "| kvtier-memory | disk | 512 | 26% |" in text  # reached the engine: 512 of 2 x 1000 prompt tokens
    for name in ("vllm", "kvtier-memory", "kvtier-memory+disk", "Mean TTFT per round", "Cost view"):
        assert name in text


def test_a_saving_within_noise_is_called_so() -> None:
    base = run("vllm", [[1.0]] * 3, cpu_s=10.0)
    base.repeats[0].cpu_s = 9.0  # a noisy baseline: its range (9-10 s) covers the other
    other = run("kvtier-memory", [[1.0]] * 3, cpu_s=9.5, kvtier=True)
    report = build_report("t", [], [summarize_run(base), summarize_run(other)], load_prices(None, {}), False)
    assert report.comparisons[0].cpu_verdict == "no clear difference"
    lines = statements(report)
    # no saving per million is claimed: the cost view is withheld, in the statements, the table and the JSON
    assert not report.costs and report.uncosted == ("kvtier-memory",)
    assert not any("saves" in line or "COSTS" in line for line in lines)
    assert any(line.startswith("No cost view for **kvtier-memory**") for line in lines)
    text = markdown(report)
    assert "net saving /1M req" not in text and "No cost view for **kvtier-memory**" in text
    data = results_json(report, [base, other], {})
    assert data["cost_per_million_requests"] == {} and data["cost_withheld_within_noise"] == ["kvtier-memory"]


def test_overlapping_rounds_get_no_verdict() -> None:
    base = summarize_run(run("vllm", [[1.0, 1.0], [2.0, 2.0], [1.5, 1.5]]))
    other = summarize_run(run("kvtier-memory", [[0.9, 1.4], [1.8, 1.2], [1.3, 1.9]], kvtier=True,
                              metrics=KVTIER_COUNTERS))
    lines = statements(build_report("t", [], [base, other], load_prices(None, {}), has_rounds=True))
    by_round = next(line for line in lines if "by round" in line)
    assert "(no clear difference)" in by_round and "helped" not in by_round and "did not" not in by_round


def test_failures_are_reported_and_json_is_finite() -> None:
    base = run("vllm", [[1.0, 2.0]])
    failed = ConfigRun("kvtier-memory+redis", True, "logs/x.log", error="server exited: ConfigError: remote.url")
    broken = run("kvtier-memory", [[0.5]], kvtier=True)
    broken.repeats[0].outcome = DispatchOutcome((), (RequestFailure(0, "HTTP 500"),), 1.0)
    runs = [base, failed, broken]
    summaries = [summarize_run(r) for r in runs]
    report = build_report("t", [], summaries, load_prices(None, {}), has_rounds=False)
    text = markdown(report)
    assert "## Failures" in text and "remote.url" in text and "FAILED" in text
    data = results_json(report, runs, {"workload": "chat"})
    json.dumps(data, allow_nan=False)  # every number finite or null
    assert data["configurations"]["kvtier-memory+redis"]["error"].endswith("remote.url")
    assert data["configurations"]["kvtier-memory"]["failures"] == [{"index": 0, "error": "HTTP 500"}]


def test_no_baseline_says_so() -> None:
    report = build_report("t", [], [summarize_run(run("kvtier-memory", [[1.0]], kvtier=True))],
                          load_prices(None, {}), has_rounds=False)
    assert statements(report)[0].startswith("No comparison")


def test_one_repeat_is_flagged() -> None:
    summaries = [summarize_run(run("vllm", [[1.0]])), summarize_run(run("kvtier-memory", [[0.5]], kvtier=True))]
    report = build_report("t", [], summaries, load_prices(None, {}), has_rounds=False)
    lines = statements(report)
    # the case: one repeat with a TTFT twice as fast, yet no verdict and no saving is claimed
    assert lines[0].startswith("Only one repeat") and "no verdict and no cost" in lines[0]
    assert "made no clear difference" in lines[1] and "helped" not in lines[1]
    assert not report.costs and not any("per million requests of this traffic" in line for line in lines)


def test_hit_ratio_per_tier_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from kvtier.bench.plots import plot_tier_hits, tier_shares

    base = summarize_run(run("vllm", [[1.0, 1.0]] * 3))
    memory = summarize_run(run("kvtier-memory", [[0.2, 0.2]] * 3, kvtier=True, metrics=KVTIER_COUNTERS))
    assert tier_shares(base) == {}
    assert tier_shares(memory) == {"memory": 1536 / 2000, "disk": 512 / 2000, "remote": 0.0}
    path = tmp_path / "tiers.png"
    assert plot_tier_hits([base, memory], "t", str(path), print)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_tier_hits([base], "t", str(tmp_path / "none.png"), print)  # no kvtier counters: no plot
    assert not (tmp_path / "none.png").exists()
