"""The benchmark's report: plain statements of what helped and what did not, tables, cost view.

``statements`` come first in every output and are never suppressed: for each kvtier configuration
the TTFT change against ``vllm`` with a verdict, and when kvtier found nothing to reuse, its
overhead as numbers. ``markdown`` renders the whole report; ``results_json`` is the same content as
data (every number finite or null).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from kvtier.bench.configs import BASELINE
from kvtier.bench.cost import CostView, Prices, cost_view
from kvtier.bench.runner import ConfigRun
from kvtier.bench.stats import TIERS, Comparison, ConfigSummary, Spread, change, compare, verdict
from kvtier.bench.summary import format_bytes, format_ratio, format_seconds

_CPU_NOTE = ("Engine compute is the CPU seconds (user + system) of the server's process tree during the "
             "timed requests; on this CPU machine it stands in for GPU seconds in the cost view.")


@dataclass(frozen=True)
class Report:
    title: str
    context: tuple[tuple[str, str], ...]  # what ran where, for the header
    summaries: tuple[ConfigSummary, ...]
    comparisons: tuple[Comparison, ...]
    costs: tuple[tuple[str, CostView], ...]  # only where engine compute separates from the baseline
    prices: Prices
    has_rounds: bool
    uncosted: tuple[str, ...] = ()  # measured, but engine compute within the noise of the repeats


_SEPARATE = ("helped", "did not help")


def build_report(title: str, context: list[tuple[str, str]], summaries: list[ConfigSummary], prices: Prices,
                 has_rounds: bool) -> Report:
    base = next((s for s in summaries if s.name == BASELINE and s.error is None and s.metrics), None)
    others = [s for s in summaries if s.name != BASELINE and s.metrics]
    comparisons = tuple(compare(base, other) for other in others) if base else ()
    separate = {c.name for c in comparisons if c.cpu_verdict in _SEPARATE}
    views = [(other.name, view) for other in others if base and (view := config_cost(base, other, prices))]
    costs = tuple((name, view) for name, view in views if name in separate)
    uncosted = tuple(name for name, _ in views if name not in separate)
    return Report(title, tuple(context), tuple(summaries), comparisons, costs, prices, has_rounds, uncosted)


def config_cost(base: ConfigSummary, other: ConfigSummary, prices: Prices) -> CostView | None:
    """The cost view of ``other`` against ``base`` from medians; None without CPU measurements."""
    base_s, other_s = base.median("cpu_s_per_request"), other.median("cpu_s_per_request")
    num_requests = other.median("num_requests")
    if base_s is None or other_s is None or not num_requests:
        return None

    def per_request(*names: str) -> float:
        return sum(other.median(name) or 0.0 for name in names) / num_requests

    # remote values count as stored (compressed and/or sealed): what the store keeps and the wire carries
    return cost_view(base_s, other_s, per_request("written_bytes_disk", "wire_written_bytes_remote"),
                     per_request("wire_read_bytes_remote", "wire_written_bytes_remote"), prices)


def _pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction * 100:+.0f}%"


_VERDICT_WORDS = {"helped": "helped", "did not help": "did NOT help (slower)",
                  "no clear difference": "made no clear difference (ranges over repeats overlap, or one repeat)"}
_NO_COST = ("No cost view for **{name}**: its engine compute per request is within the noise of the repeats "
            "(ranges overlap with `vllm`'s, or one repeat), so no saving or loss per million requests is claimed.")


def _changes(c: Comparison) -> str:
    compute = None if c.cpu_saved is None else -c.cpu_saved
    return (f"mean TTFT {_pct(c.ttft_mean_change)}, p95 TTFT {_pct(c.ttft_p95_change)}, output throughput "
            f"{_pct(c.throughput_change)}, engine compute {_pct(compute)} vs `vllm`")


def statements(report: Report) -> list[str]:
    """One sentence per kvtier configuration, and one per cost view; the baseline's absence is said too.
    A configuration that found nothing to reuse is reported as overhead, with its numbers."""
    if not report.comparisons:
        return ["No comparison: the `vllm` baseline did not run or measured nothing (see the failures below)."]
    lines = []
    repeats = min((s.metrics["ttft_mean_s"].count for s in report.summaries if "ttft_mean_s" in s.metrics), default=0)
    if repeats < 2:
        lines.append("Only one repeat: the spread, and so the noise, is unknown, so no verdict and no cost is "
                     "given below. Use --repeats 3 or more.")
    for c in report.comparisons:
        hits = format_ratio(next(s for s in report.summaries if s.name == c.name).median("hit_rate_all"))
        if c.no_reuse:
            lines.append(f"**{c.name}** found nothing to reuse (served {hits} of the chunks vLLM lacked), so "
                         f"this is its overhead on this traffic: {_changes(c)} "
                         f"(TTFT verdict: {_VERDICT_WORDS.get(c.verdict, c.verdict)}).")
        else:
            lines.append(f"**{c.name}** {_VERDICT_WORDS.get(c.verdict, c.verdict)}: {_changes(c)}; kvtier served "
                         f"{hits} of the chunks vLLM lacked.")
    if report.has_rounds:
        lines += round_statements(report)
    for name, view in report.costs:
        verb = "saves" if view.net_saving_per_million >= 0 else "COSTS"
        lines.append(f"At the prices below, **{name}** {verb} {abs(view.net_saving_per_million):,.2f} per million "
                     f"requests of this traffic (engine compute priced as GPU time).")
    lines += [_NO_COST.format(name=name) for name in report.uncosted]
    return lines


def _later_rounds_s(summary: ConfigSummary) -> float | None:
    later = [spread.median for r, spread in summary.ttft_by_round.items() if r >= 2]
    return sum(later) / len(later) if later else None


def round_statements(report: Report) -> list[str]:
    """Where kvtier pays and where it costs, for workloads with rounds: round 1 (nothing stored yet)
    and the later rounds (mean of the per-round medians), each against ``vllm``."""
    base = next(s for s in report.summaries if s.name == BASELINE)
    first_base = base.ttft_by_round.get(1)
    lines = []
    for c in report.comparisons:
        other = next(s for s in report.summaries if s.name == c.name)
        first = other.ttft_by_round.get(1)
        round_1 = change(None if first_base is None else first_base.median, None if first is None else first.median)
        later = change(_later_rounds_s(base), _later_rounds_s(other))
        lines.append(f"**{c.name}** by round: round 1 (nothing stored yet) mean TTFT {_pct(round_1)} "
                     f"({verdict(first_base, first)}); rounds 2 and later {_pct(later)} "
                     f"({_later_verdict(base, other)}) vs `vllm`.")
    return lines


def _later_verdict(base: ConfigSummary, other: ConfigSummary) -> str:
    """The rounds after the first: a verdict only when every one of them gets the same one."""
    found = {verdict(base.ttft_by_round.get(r), other.ttft_by_round.get(r)) for r in other.ttft_by_round if r >= 2}
    return found.pop() if len(found) == 1 else "no clear difference"


def _cell(spread: Spread | None, kind: str) -> str:
    if spread is None:
        return "n/a"
    fmt = {"s": format_seconds, "bytes": format_bytes, "ratio": format_ratio,
           "rate": lambda v: f"{v:.2f}", "count": lambda v: f"{v:,.0f}", "cpu": lambda v: f"{v:.2f} s"}[kind]
    if spread.count < 2 or math.isclose(spread.low, spread.high):
        return fmt(spread.median)
    return f"{fmt(spread.median)} ({fmt(spread.low)}-{fmt(spread.high)})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


_MAIN_COLUMNS = (("TTFT mean", "ttft_mean_s", "s"), ("TTFT p50", "ttft_p50_s", "s"), ("TTFT p95", "ttft_p95_s", "s"),
                 ("TTFT p99", "ttft_p99_s", "s"), ("lag mean", "lag_mean_s", "s"), ("lag max", "lag_max_s", "s"),
                 ("ITL p50", "itl_p50_s", "s"), ("ITL p95", "itl_p95_s", "s"),
                 ("req/s", "request_throughput_per_s", "rate"), ("out tok/s", "output_tokens_per_s", "rate"),
                 ("tok/s (in+out)", "total_tokens_per_s", "rate"), ("prompt cached", "prompt_cached_fraction", "ratio"),
                 ("engine CPU s/req", "cpu_s_per_request", "cpu"))


def main_table(report: Report) -> list[str]:
    saved = {c.name: c.cpu_saved for c in report.comparisons}
    rows = []
    for s in report.summaries:
        warmup = None if s.startup_s is None else s.startup_s + (s.warmup_requests_s or 0.0)
        rows.append([s.name, "ok" if s.error is None else "FAILED",
                     *(_cell(s.metrics.get(key), kind) for _, key, kind in _MAIN_COLUMNS),
                     "baseline" if s.name == BASELINE else _pct(saved.get(s.name)),
                     format_seconds(warmup)])
    return _table(["configuration", "status", *(title for title, _, _ in _MAIN_COLUMNS), "compute saved",
                   "warm-up"], rows)


def tier_table(report: Report) -> list[str]:
    rows = []
    for s in report.summaries:
        for tier in TIERS:
            cells = [s.metrics.get(f"{name}_{tier}") for name in ("hit_rate", "read_bytes", "written_bytes")]
            if cells[0] is not None or any(c is not None and c.median > 0 for c in cells[1:]):
                wire = [s.metrics.get(f"wire_{name}_{tier}") for name in ("read_bytes", "written_bytes")]
                loaded = s.metrics.get(f"loaded_tokens_{tier}")
                rows.append([s.name, tier, _cell(loaded, "count"),
                             _cell(s.metrics.get(f"loaded_share_{tier}"), "ratio"), _cell(cells[0], "ratio"),
                             _cell(cells[1], "bytes"), _cell(cells[2], "bytes"),
                             "-" if wire[0] is None else f"{_cell(wire[0], 'bytes')} / {_cell(wire[1], 'bytes')}"])
    if not rows:
        return ["No kvtier counters were read."]
    return _table(["configuration", "tier", "tokens that reached the engine", "share of prompt tokens",
                   "hit rate (lookups)", "read", "written", "as stored: read / written"], rows)


def round_table(report: Report) -> list[str]:
    live = [s for s in report.summaries if s.ttft_by_round]
    rounds = sorted({r for s in live for r in s.ttft_by_round})
    rows = [[str(r), *(_cell(s.ttft_by_round.get(r), "s") for s in live)] for r in rounds]
    return _table(["round", *(s.name for s in live)], rows)


def cost_table(report: Report) -> list[str]:
    uncosted = [_NO_COST.format(name=name) for name in report.uncosted]
    if not report.costs:
        return uncosted or ["No cost view: engine CPU seconds were not measured for the baseline and a kvtier "
                            "configuration."]
    rows = [[name, f"{v.compute_saved_s_per_request * 1000:+.1f} ms", format_bytes(v.stored_bytes_per_request),
             format_bytes(v.network_bytes_per_request), f"{v.compute_saving_per_million:,.2f}",
             f"{v.storage_cost_per_million:,.2f}", f"{v.transfer_cost_per_million:,.2f}",
             f"**{v.net_saving_per_million:,.2f}**"] for name, v in report.costs]
    p = report.prices
    return [f"Prices ({p.source}): {p.gpu_hour} per GPU-hour, {p.storage_gb_month} per GB-month stored "
            f"(kept {p.retention_hours:g} h), {p.transfer_gb} per GB transferred.", "",
            *_table(["configuration", "compute saved/req", "stored/req", "network/req", "compute saved /1M req",
                     "storage /1M req", "transfer /1M req", "net saving /1M req"], rows),
            *(["", *uncosted] if uncosted else [])]


def markdown(report: Report) -> str:
    lines = [f"# {report.title}", "", *(f"- {key}: {value}" for key, value in report.context), "",
             "## Verdict", "", *(f"- {line}" for line in statements(report)), "",
             "## Results (median over repeats, min-max in brackets)", "", *main_table(report), "",
             "## kvtier tiers", "", *tier_table(report), ""]
    if report.has_rounds:
        lines += ["## Mean TTFT per round", "", *round_table(report), ""]
    lines += ["## Cost view (per million requests)", "", *cost_table(report), "", "## How this was measured", "",
              f"- {_CPU_NOTE}", "- TTFT: from a request's arrival (a trace's timestamp; for a later turn, the end of "
              "the turn before, if later) to its first content chunk; lag: how long after its arrival a request "
              "was sent (waiting for a free slot, or the bench falling behind the arrivals), mean and max per "
              "repeat; ITL: gaps between streamed chunks; throughput over each repeat's wall time.",
              "- Every configuration: same engine settings, own server, the same warm-up; each repeat uses "
              "its own `cache_salt`, so vLLM's and kvtier's caches start cold for it.",
              "- Tokens that reached the engine: what each tier delivered into vLLM's blocks, counted once "
              "every rank settled the load (a load that failed or was cut short counts only its loaded prefix); "
              "share of prompt tokens: those over all prompt tokens of the repeat.",
              "- Hit rate of a tier: hits / (hits + misses) of the chunks looked up in it (planned loads, before "
              "they reach the engine); `all`: share of the chunks vLLM's own cache lacked that kvtier planned."]
    failures = [s for s in report.summaries if s.error is not None]
    if failures:
        lines += ["", "## Failures", "", *(f"- **{s.name}**: {s.error}" for s in failures)]
    return "\n".join(lines) + "\n"


def _request_rows(run: ConfigRun) -> list[dict[str, object]]:
    rows = []
    for measure in run.repeats:
        for r in measure.outcome.results:
            row = asdict(r)
            row["repeat"] = measure.repeat
            row["itl_s"] = list(r.itl_s)
            rows.append(row)
    return rows


def results_json(report: Report, runs: list[ConfigRun], extra: dict[str, object]) -> dict[str, object]:
    """Everything of the report as JSON-ready data (NaN never appears: missing numbers are null)."""
    configurations: dict[str, object] = {}
    for summary, run in zip(report.summaries, runs):
        configurations[summary.name] = {
            "error": summary.error, "uses_kvtier": summary.uses_kvtier, "log": run.log_path,
            "startup_s": summary.startup_s, "warmup_requests_s": summary.warmup_requests_s,
            "metrics": {name: spread.as_dict() for name, spread in summary.metrics.items()},
            "ttft_mean_s_by_round": {str(r): s.as_dict() for r, s in summary.ttft_by_round.items()},
            "failures": [asdict(f) for m in run.repeats for f in m.outcome.failures],
            "requests": _request_rows(run)}
    return {**extra, "statements": statements(report), "prices": report.prices.as_dict(),
            "comparisons": {c.name: asdict(c) for c in report.comparisons},
            "cost_per_million_requests": {name: view.as_dict() for name, view in report.costs},
            "cost_withheld_within_noise": list(report.uncosted),
            "configurations": configurations}
