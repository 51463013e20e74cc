"""`kvtier bench chat` with the tiny model: every configuration on real vLLM servers, a few requests.

About 2 minutes on 2 cores: three servers start (about 25 s each) and answer 6 requests each; a
fourth, given a Redis URL kvtier refuses, fails at start and is reported, and the others go on.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CONFIGURATIONS = {"vllm", "kvtier-memory", "kvtier-memory+disk"}
FINITE = ("ttft_mean_s", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "itl_p50_s", "request_throughput_per_s",
          "output_tokens_per_s", "total_tokens_per_s", "cpu_s_per_request", "prompt_cached_fraction")


def test_bench_compares_every_configuration(tiny_model: str, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    # 3 users x ~2,000 tokens do not fit vLLM's 4,352-token cache: round 2 needs what it evicted.
    proc = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "chat", "--model", tiny_model,
                           "--users", "3", "--rounds", "2", "--system-tokens", "200", "--context-tokens", "1800",
                           "--max-tokens", "4", "--qps", "0", "--max-concurrency", "1", "--repeats", "1",
                           "--redis-url", "redis://127.0.0.1:6379/not-a-database", "--out-dir", str(out_dir)],
                          capture_output=True, text=True, timeout=600, env=env)
    # a failed configuration: reported, the others measured, exit code 1 after writing everything
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "kvtier-memory+redis" in proc.stderr.splitlines()[-2] and "remote.url" in proc.stderr
    results = json.loads((out_dir / "bench_chat.json").read_text())
    for name in ("bench_chat.md", "bench_chat_ttft_cdf.png", "bench_chat_ttft_per_round.png"):
        assert (out_dir / name).stat().st_size > 0, name
    configurations = results["configurations"]
    assert set(configurations) == CONFIGURATIONS | {"kvtier-memory+redis"}
    failed = configurations.pop("kvtier-memory+redis")
    assert "remote.url" in failed["error"] and failed["requests"] == []
    assert "## Failures" in proc.stdout
    for name, run in configurations.items():
        assert run["error"] is None, name
        assert len(run["requests"]) == 3 * 2, name
        assert math.isfinite(run["startup_s"]) and math.isfinite(run["warmup_requests_s"]), name
        for metric in FINITE:
            assert math.isfinite(run["metrics"][metric]["median"]), (name, metric)
        assert run["metrics"]["ttft_mean_s"]["median"] > 0, name
    for name in CONFIGURATIONS - {"vllm"}:
        metrics = configurations[name]["metrics"]
        assert metrics["hit_rate_all"]["median"] > 0, name  # kvtier brought back what vLLM evicted
        assert metrics["hit_rate_memory"]["median"] > 0, name
        assert metrics["written_bytes_memory"]["median"] > 0, name
        assert name in results["comparisons"]
        # one repeat gives no measure of the noise: no cost view, and the report says why
        assert name not in results["cost_per_million_requests"] and name in results["cost_withheld_within_noise"]
    assert configurations["kvtier-memory+disk"]["metrics"]["written_bytes_disk"]["median"] > 0
    assert results["statements"] and "## Verdict" in proc.stdout
