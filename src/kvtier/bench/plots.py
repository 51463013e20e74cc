"""PNG plots of a benchmark: the TTFT CDF per configuration, the hit ratio per kvtier tier, and
mean TTFT per round.

matplotlib is optional (``pip install 'kvtier[demo]'``): without it no plot is written and the
caller is told so. Plots use the non-interactive Agg backend.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

from kvtier.bench.stats import TIERS, ConfigSummary

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Progress = Callable[[str], None]


def _pyplot(progress: Progress) -> ModuleType | None:
    """matplotlib.pyplot on the Agg backend, or None (and a progress line) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed (pip install 'kvtier[demo]'): no plots")
        return None
    return plt


def plot_ttft_cdf(summaries: list[ConfigSummary], title: str, path: str, progress: Progress) -> bool:
    """Empirical CDF of TTFT over every request of every repeat, one line per configuration.
    Returns False (and writes nothing) without matplotlib or data."""
    plt = _pyplot(progress)
    live = [s for s in summaries if s.ttfts_s]
    if plt is None or not live:
        return False
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for summary in live:
        ttfts = sorted(summary.ttfts_s)
        fractions = [(i + 1) / len(ttfts) for i in range(len(ttfts))]
        axes.step(ttfts, fractions, where="post", label=f"{summary.name} (n={len(ttfts)})")
    axes.set_xlabel("time to first token (s)")
    axes.set_ylabel("fraction of requests")
    axes.set_xlim(left=0)
    axes.set_ylim(0, 1.02)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    _save(plt, figure, path)
    return True


def tier_shares(summary: ConfigSummary) -> dict[str, float]:
    """Median share of prompt tokens each kvtier tier delivered to the engine (tiers never read: absent)."""
    shares = {tier: summary.median(f"loaded_share_{tier}") for tier in TIERS}
    return {tier: share for tier, share in shares.items() if share is not None}


def plot_tier_hits(summaries: list[ConfigSummary], title: str, path: str, progress: Progress) -> bool:
    """Hit ratio per tier: for each configuration, the share of prompt tokens that each kvtier tier
    delivered to the engine (stacked, medians over repeats), beside the share of prompt tokens vLLM
    reported as cached (a marker). Returns False (writes nothing) without matplotlib or data."""
    plt = _pyplot(progress)
    live = [s for s in summaries if s.error is None and s.metrics]
    if plt is None or not live or not any(tier_shares(s) for s in live):
        return False
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    positions = range(len(live))
    bottoms = [0.0] * len(live)
    for tier, color in zip(TIERS, ("tab:blue", "tab:orange", "tab:green")):
        heights = [tier_shares(s).get(tier, 0.0) for s in live]
        if any(heights):
            axes.bar(positions, heights, bottom=bottoms, color=color, label=f"kvtier {tier}")
            bottoms = [b + h for b, h in zip(bottoms, heights)]
    cached = [s.median("prompt_cached_fraction") for s in live]
    axes.scatter([p for p, c in zip(positions, cached) if c is not None], [c for c in cached if c is not None],
                 marker="_", s=400, color="black", label="cached, as vLLM reports it", zorder=3)
    axes.set_xticks(list(positions), [s.name for s in live], rotation=15, fontsize=8)
    axes.set_ylabel("share of prompt tokens")
    axes.set_ylim(0, 1.02)
    axes.set_title(title)
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=8)
    _save(plt, figure, path)
    return True


def plot_ttft_per_round(summaries: list[ConfigSummary], title: str, path: str, progress: Progress) -> bool:
    """Mean TTFT per round: the median over repeats as a line, the min-max as error bars."""
    plt = _pyplot(progress)
    live = [s for s in summaries if s.ttft_by_round]
    if plt is None or not live:
        return False
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for summary in live:
        rounds = sorted(summary.ttft_by_round)
        spreads = [summary.ttft_by_round[r] for r in rounds]
        medians = [s.median for s in spreads]
        errors = [[m - s.low for m, s in zip(medians, spreads)], [s.high - m for m, s in zip(medians, spreads)]]
        axes.errorbar(rounds, medians, yerr=errors, marker="o", capsize=3, label=summary.name)
    axes.set_xlabel("round")
    axes.set_ylabel("mean time to first token (s)")
    axes.set_xticks(sorted({r for s in live for r in s.ttft_by_round}))
    axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    _save(plt, figure, path)
    return True


def _save(plt: ModuleType, figure: Figure, path: str) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
