"""The advisor's answer: one row per capacity, the knee, a sentence of advice, JSON, table, plot.

The knee is the smallest capacity that reaches ``KNEE_SHARE`` of the hit ratio kvtier can add at
all (infinite capacity, against the engine's own cache alone); capacities beyond it that add less
than one point of hit ratio are named as not worth it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvtier.advisor.simulate import ReplayResult
from kvtier.advisor.timing import TimingProfile
from kvtier.bench.cost import Prices
from kvtier.bench.summary import format_bytes, format_table

KNEE_SHARE = 0.95
FLAT_POINTS = 0.01  # a larger capacity adding less hit ratio than this is "not worth it"


@dataclass(frozen=True)
class CapacityRow:
    capacity_tokens: int | None  # None: infinite
    hit_ratio_tokens: float
    hit_ratio_mean_per_request: float
    ttft_mean_s: float
    ttft_saved_mean_s: float  # against the engine's own cache alone
    engine_s_saved_per_request: float
    saving_per_million: float  # engine seconds saved, priced at gpu_hour
    read_bytes: dict[str, int]
    written_bytes: dict[str, int]
    evictions: dict[str, int]

    def as_dict(self, kv_bytes_per_token: int) -> dict[str, object]:
        return {"capacity_tokens": self.capacity_tokens,
                "capacity_bytes": None if self.capacity_tokens is None else self.capacity_tokens * kv_bytes_per_token,
                "hit_ratio_tokens": self.hit_ratio_tokens,
                "hit_ratio_mean_per_request": self.hit_ratio_mean_per_request,
                "ttft_mean_s": self.ttft_mean_s, "ttft_saved_mean_s": self.ttft_saved_mean_s,
                "engine_s_saved_per_request": self.engine_s_saved_per_request,
                "saving_per_million_requests": self.saving_per_million,
                "read_bytes": self.read_bytes, "written_bytes": self.written_bytes, "evictions": self.evictions}


def capacity_row(result: ReplayResult, capacity_tokens: int | None, profile: TimingProfile,
                 prices: Prices) -> CapacityRow:
    """Price one replay with ``profile`` (see ``timing``)."""
    outcomes = result.outcomes
    ttft = [profile.ttft_s(o.num_tokens, o.hit_tokens, o.memory_tokens, o.disk_tokens, o.remote_tokens)
            for o in outcomes]
    baseline = [profile.ttft_s(o.num_tokens, o.engine_hit_tokens, 0, 0) for o in outcomes]
    saved_s = [profile.prefill_s(o.engine_hit_tokens, o.num_tokens) - profile.prefill_s(o.hit_tokens, o.num_tokens)
               for o in outcomes]
    num = max(len(outcomes), 1)
    engine_saved = sum(saved_s) / num
    return CapacityRow(capacity_tokens, result.hit_ratio_tokens, result.hit_ratio_mean_per_request, sum(ttft) / num,
                       (sum(baseline) - sum(ttft)) / num, engine_saved, engine_saved * 1e6 / 3600 * prices.gpu_hour,
                       dict(result.read_bytes), dict(result.written_bytes), dict(result.evictions))


def knee(rows: list[CapacityRow], infinite: CapacityRow, engine_only: float) -> CapacityRow | None:
    """The smallest capacity reaching KNEE_SHARE of the hit ratio kvtier can add; None if none does."""
    possible = infinite.hit_ratio_tokens - engine_only
    for row in sorted(rows, key=lambda r: r.capacity_tokens or 0):
        if possible <= 0 or row.hit_ratio_tokens - engine_only >= KNEE_SHARE * possible:
            return row
    return None


def advice(tier: str, rows: list[CapacityRow], infinite: CapacityRow, engine_only: float,
           size: Callable[[int], str]) -> str:
    """One sentence: the capacity at the knee, and where more stops paying."""
    possible = infinite.hit_ratio_tokens - engine_only
    if possible < FLAT_POINTS:
        return (f"kvtier cannot help this trace: even unlimited {tier} raises the prefix hit ratio by "
                f"{possible * 100:.1f} points over the engine's own cache ({engine_only * 100:.1f}%).")
    at_knee = knee(rows, infinite, engine_only)
    if at_knee is None:
        largest = max(rows, key=lambda r: r.capacity_tokens or 0)
        return (f"None of the sizes tried is enough: {size(largest.capacity_tokens or 0)} of {tier} reaches "
                f"{largest.hit_ratio_tokens * 100:.1f}% of the prompt tokens against "
                f"{infinite.hit_ratio_tokens * 100:.1f}% with unlimited {tier}; try larger capacities.")
    assert at_knee.capacity_tokens is not None
    share = (at_knee.hit_ratio_tokens - engine_only) / possible
    sentence = (f"{size(at_knee.capacity_tokens)} of {tier} gives {share * 100:.0f}% of the possible hit ratio "
                f"({at_knee.hit_ratio_tokens * 100:.1f}% of prompt tokens, unlimited: "
                f"{infinite.hit_ratio_tokens * 100:.1f}%, engine cache alone: {engine_only * 100:.1f}%) and "
                + (f"saves {at_knee.ttft_saved_mean_s * 1000:.0f} ms of mean TTFT" if at_knee.ttft_saved_mean_s >= 0
                   else f"ADDS {-at_knee.ttft_saved_mean_s * 1000:.0f} ms of mean TTFT: its loads are slower than "
                        f"recomputing at the profile's bandwidth (kvtier's remote.cost_gate would skip them)"))
    gain = infinite.hit_ratio_tokens - at_knee.hit_ratio_tokens
    if gain < FLAT_POINTS:
        sentence += f"; {tier} beyond {size(at_knee.capacity_tokens)} adds less than 1%"
    return sentence + "."


def format_size(num_bytes: int) -> str:
    """Bytes in binary units up to TiB (``format_bytes`` of the bench stops at GiB)."""
    if num_bytes >= 1 << 40:
        return f"{num_bytes / (1 << 40):.1f} TiB"
    return format_bytes(num_bytes)


def table(rows: list[CapacityRow], infinite: CapacityRow, size: Callable[[int], str]) -> str:
    with_remote = any(row.read_bytes["remote"] or row.written_bytes["remote"] for row in [*rows, infinite])
    header = ["capacity", "hit ratio (tokens)", "mean per request", "mean TTFT", "TTFT saved", "engine s saved/req",
              "saving /1M req", "read mem", "read disk", "written disk",
              *(["read remote", "written remote"] if with_remote else [])]
    body = []
    for row in [*rows, infinite]:
        name = "infinite" if row.capacity_tokens is None else size(row.capacity_tokens)
        remote = [format_size(row.read_bytes["remote"]), format_size(row.written_bytes["remote"])]
        body.append([name, f"{row.hit_ratio_tokens * 100:.2f}%", f"{row.hit_ratio_mean_per_request * 100:.2f}%",
                     f"{row.ttft_mean_s * 1000:.1f} ms", f"{row.ttft_saved_mean_s * 1000:.1f} ms",
                     f"{row.engine_s_saved_per_request * 1000:.2f} ms", f"{row.saving_per_million:,.2f}",
                     format_size(row.read_bytes["memory"]), format_size(row.read_bytes["disk"]),
                     format_size(row.written_bytes["disk"]), *(remote if with_remote else [])])
    return format_table(header, body)


def plot(rows: list[CapacityRow], infinite: CapacityRow, engine_only: float, tier: str, title: str,
         kv_bytes_per_token: int, path: str) -> None:
    """Hit ratio and TTFT saved against capacity (bytes, log scale), the knee marked. Raises
    ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ordered = sorted(rows, key=lambda r: r.capacity_tokens or 0)
    gib = [(r.capacity_tokens or 0) * kv_bytes_per_token / 2**30 for r in ordered]
    fig, left = plt.subplots(figsize=(7, 4.2))
    left.plot(gib, [r.hit_ratio_tokens * 100 for r in ordered], "o-", color="tab:blue", label="hit ratio (tokens)")
    left.axhline(infinite.hit_ratio_tokens * 100, color="tab:blue", linestyle=":", label="unlimited")
    left.axhline(engine_only * 100, color="grey", linestyle="--", label="engine cache alone")
    left.set_xscale("log")
    left.set_xlabel(f"kvtier {tier} capacity (GiB)")
    left.set_ylabel("prefix hit ratio (% of prompt tokens)")
    right = left.twinx()
    right.plot(gib, [r.ttft_saved_mean_s * 1000 for r in ordered], "s-", color="tab:orange", label="TTFT saved")
    right.set_ylabel("mean TTFT saved (ms)")
    saved_ms = [r.ttft_saved_mean_s * 1000 for r in ordered]
    right.set_ylim(min(0.0, *saved_ms) * 1.1, max(0.0, *saved_ms) * 1.1 or 1.0)  # from zero; a loss shows below it
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xticks(gib, [f"{g:,.0f}" if g >= 10 else f"{g:.3g}" for g in gib], rotation=45, fontsize=8)
    at_knee = knee(ordered, infinite, engine_only)
    if at_knee is not None and at_knee.capacity_tokens:
        x = at_knee.capacity_tokens * kv_bytes_per_token / 2**30
        left.axvline(x, color="tab:red", alpha=0.6)
        left.annotate(f"knee: {format_size(at_knee.capacity_tokens * kv_bytes_per_token)}", (x, 0.5),
                      xycoords=left.get_xaxis_transform(), color="tab:red", rotation=90, ha="right", va="center")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    left.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
