"""kvtier inside CUDA vLLM against vLLM's own prefix cache and its OffloadingConnector (issue 13).

One device call, four engines, each in its own subprocess (so GPU memory is freed between them),
scheduler and worker in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), CUDA graphs on:
- ``vllm``: vLLM alone with its prefix cache: TTFT cold and on a GPU prefix-cache hit at each
  length, greedy outputs of the hits (the oracle), decode time while a 32K prompt prefills, and
  200 distinct 2K prompts (no reuse: TTFT and throughput).
- ``offload``: vLLM's ``OffloadingConnector`` (its CPU tier): TTFT of a CPU hit after
  ``reset_prefix_cache``.
- ``kvtier``: kvtier with host memory and disk: TTFT of a memory hit and of a disk hit (the memory
  tier emptied by filler prompts first), engine-thread time per load (kvtier's load histogram), hit
  counts per tier, outputs against the oracle, the same decode and no-reuse runs as ``vllm``.
- ``kvtier_int8``: kvtier with host memory only, ``memory.kv_format: int8`` (slots quantised on the
  GPU, half the bytes over PCIe): TTFT of a memory hit (``kvtier_memory_int8_hit``) and, against the
  ``kvtier`` run, how far its outputs move: 16 greedy tokens after a memory hit (equal?, share of
  positions that differ) and the top-5 logprobs of the first token (largest difference). Lean: no
  disk, no decode or no-reuse runs; ``--skip-int8`` leaves it out.
The model is the Llama-3.1-8B shape with dummy weights (``load_format="dummy"``, the same weights
in every engine), prompts are token ids. TTFT is the wall time of ``generate`` with
``max_tokens=1``; medians of ``--repeats``.

Writes ``vllm_cuda_<date>_<gpu>.json`` into ``--out-dir`` (default benchmarks/results).
Usage (on the GPU machine, vLLM staged with ../shared/recipes/cuda-vllm):
    PYTHONPATH=/tmp/site:src VLLM_USE_FLASHINFER_SAMPLER=0 python3 benchmarks/vllm_cuda.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = Path("/tmp/kvtier-bench-llama31-8b-dummy")
DISK_DIR = Path("/tmp/kvtier-bench-disk")
METRICS_PORT = 9477
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
MEMORY_CAPACITY = "5GiB"  # holds one 32K-token prompt (4 GiB); FILLER tokens push everything out
FILLER_TOKENS = (24576, 24576)
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
}
CONNECTORS: dict[str, dict[str, Any] | None] = {
    "vllm": None,
    "offload": {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"cpu_bytes_to_use": 12 << 30}},
    "kvtier": {"kv_connector": "KVTierConnector", "kv_role": "kv_both",
               "kv_connector_module_path": "kvtier.integrations.vllm.connector",
               "kv_connector_extra_config": {"memory": {"capacity": MEMORY_CAPACITY},
                                             "disk": {"path": str(DISK_DIR), "capacity": "40GiB"},
                                             "admission": {"policy": "always"},  # hits need first-sight stores
                                             "metrics": {"port": METRICS_PORT}}},
    # kvtier as configured by default (admission.policy adaptive): only the no-reuse traffic
    "kvtier_noreuse": {"kv_connector": "KVTierConnector", "kv_role": "kv_both",
                       "kv_connector_module_path": "kvtier.integrations.vllm.connector",
                       "kv_connector_extra_config": {"memory": {"capacity": MEMORY_CAPACITY},
                                                     "disk": {"path": str(DISK_DIR) + "-noreuse",
                                                              "capacity": "40GiB"},
                                                     "metrics": {"port": METRICS_PORT}}},
    "kvtier_int8": {"kv_connector": "KVTierConnector", "kv_role": "kv_both",
                    "kv_connector_module_path": "kvtier.integrations.vllm.connector",
                    "kv_connector_extra_config": {"memory": {"capacity": MEMORY_CAPACITY, "kv_format": "int8"},
                                                  "admission": {"policy": "always"},  # store at first sight
                                                  "metrics": {"port": METRICS_PORT}}},
}
TOP_LOGPROBS = 5


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 120000) for _ in range(n)]


class Engine:
    def __init__(self, connector: dict[str, Any] | None) -> None:
        from vllm import LLM

        kwargs: dict[str, Any] = dict(model=str(MODEL_DIR), load_format="dummy", skip_tokenizer_init=True,
                                      dtype="bfloat16", max_model_len=40960, gpu_memory_utilization=0.8,
                                      enable_prefix_caching=True, seed=0,
                                      compilation_config={"cudagraph_capture_sizes": CAPTURE_SIZES})
        if connector is not None:
            kwargs["kv_transfer_config"] = connector
        started = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.start_s = time.perf_counter() - started
        config = self.llm.llm_engine.vllm_config
        self.cuda_graphs = str(config.compilation_config.cudagraph_mode)

    def run(self, prompts: list[list[int]], max_tokens: int = 1) -> tuple[float, list[Any]]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        started = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - started, outs

    def ttft(self, prompt: list[int], max_tokens: int = 1) -> tuple[float, int, list[int]]:
        seconds, outs = self.run([prompt], max_tokens)
        return seconds, outs[0].num_cached_tokens or 0, list(outs[0].outputs[0].token_ids)

    def first_token(self, prompt: list[int]) -> dict[str, Any]:
        """The first greedy token and its top-``TOP_LOGPROBS`` logprobs (token id -> logprob)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False,
                                logprobs=TOP_LOGPROBS)
        out = self.llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        completion = out.outputs[0]
        top = completion.logprobs[0] if completion.logprobs else {}
        return {"token": completion.token_ids[0], "cached_tokens": out.num_cached_tokens or 0,
                "top_logprobs": {str(t): round(float(lp.logprob), 6) for t, lp in top.items()}}

    def drop_gpu_cache(self) -> bool:
        """Empty vLLM's own prefix cache (retried while stores still hold blocks)."""
        for attempt in range(100):
            if self.llm.reset_prefix_cache():
                return True
            self.run([tokens(16, 70000 + attempt)])
        return False


def scrape() -> dict[str, float]:
    """kvtier's counters from its metrics port (series name with labels -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(kvtier_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def decode_while_prefilling(engine: Engine, repeats: int) -> dict[str, Any]:
    """Wall time of 8 streams decoding 256 tokens each while a new 32K prompt arrives with them."""
    times = []
    for i in range(repeats):
        streams = [tokens(1024, 50000 + 100 * i + j) for j in range(8)]
        seconds, _ = engine.run(streams + [tokens(32768, 60000 + i)], max_tokens=256)
        times.append(seconds)
    return {"wall_s": [round(t, 4) for t in times], "median_s": median(times)}


def no_reuse(engine: Engine) -> dict[str, Any]:
    """200 distinct 2K prompts: 40 one at a time (TTFT), then 200 at once (throughput)."""
    singles = [engine.ttft(tokens(2048, 80000 + i))[0] for i in range(40)]
    prompts = [tokens(2048, 90000 + i) for i in range(200)]
    seconds, _ = engine.run(prompts, max_tokens=16)
    return {"ttft_mean_s": round(statistics.mean(singles), 5), "ttft_median_s": median(singles),
            "batch_wall_s": round(seconds, 3), "batch_tokens_per_s": round(200 * (2048 + 16) / seconds, 1)}


def phase_vllm(engine: Engine, lengths: list[int], repeats: int) -> dict[str, Any]:
    result: dict[str, Any] = {"ttft_s": {}, "outputs": {}}
    for n in lengths:
        colds = [engine.ttft(tokens(n, 1000 + 10 * n + i))[0] for i in range(repeats)]
        prompt = tokens(n, 7 * n)
        engine.ttft(prompt)
        hits = [engine.ttft(prompt) for _ in range(repeats)]
        _, cached, out = engine.ttft(prompt, max_tokens=16)
        result["ttft_s"][str(n)] = {"cold": median(colds), "vllm_hit": median([h[0] for h in hits])}
        result["outputs"][str(n)] = {"cached_tokens": cached, "tokens": out}
        print(f"vllm {n}: {result['ttft_s'][str(n)]}", flush=True)
    result["decode_while_prefilling"] = decode_while_prefilling(engine, repeats)
    result["no_reuse"] = no_reuse(engine)
    return result


def phase_offload(engine: Engine, lengths: list[int], repeats: int) -> dict[str, Any]:
    result: dict[str, Any] = {"ttft_s": {}}
    for n in lengths:
        prompt = tokens(n, 7 * n)
        engine.ttft(prompt)
        hits, cached = [], []
        for _ in range(repeats):
            engine.drop_gpu_cache()
            seconds, num_cached, _ = engine.ttft(prompt)
            hits.append(seconds)
            cached.append(num_cached)
        result["ttft_s"][str(n)] = {"vllm_offload_hit": median(hits), "cached_tokens": cached}
        print(f"offload {n}: {result['ttft_s'][str(n)]}", flush=True)
    return result


def settle(timeout_s: float = 60.0) -> None:
    """Wait until kvtier's background disk writes and uploads are done (its queue-depth gauges at 0,
    then a second for the write in hand), so that a timed hit does not share the host's memory
    bandwidth and cores with the write-through of the prompt just stored."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        values = scrape()
        if all(values.get(f'kvtier_queue_depth{{queue="{queue}"}}', 0.0) <= 0 for queue in ("disk_writes", "uploads")):
            break
        time.sleep(0.25)
    time.sleep(1.0)


@dataclass
class MemoryHits:
    """``memory_hits_of``'s measurements of one prompt."""

    ttft_s: list[float]
    load_cpu_ms: list[float]  # the engine thread's CPU time per load step (kvtier_load_cpu_seconds)
    load_wall_ms: list[float]  # wall time of the same (kvtier_load_seconds)
    cached_tokens: int
    tokens: list[int]  # 16 greedy tokens after a hit
    memory_chunks: float  # memory-tier chunk hits counted over all of it


def memory_hits_of(engine: Engine, prompt: list[int], repeats: int) -> MemoryHits:
    """Store ``prompt`` (a cold run), let the store settle, then time ``repeats`` hits from kvtier's
    memory with vLLM's own cache emptied before each, then 16 greedy tokens after a hit."""
    engine.ttft(prompt)  # cold: kvtier stores it
    settle()
    memory, cpu_ms, wall_ms = [], [], []
    before_all = scrape()
    for _ in range(repeats):
        engine.drop_gpu_cache()
        before = scrape()
        memory.append(engine.ttft(prompt)[0])
        after = scrape()
        steps = max(delta(before, after, "kvtier_load_seconds_count"), 1)
        wall_ms.append(1000 * delta(before, after, "kvtier_load_seconds_sum") / steps)
        cpu_ms.append(1000 * delta(before, after, "kvtier_load_cpu_seconds_sum") / steps)
    engine.drop_gpu_cache()
    _, cached, out = engine.ttft(prompt, max_tokens=16)
    return MemoryHits(memory, cpu_ms, wall_ms, cached, out,
                      delta(before_all, scrape(), 'kvtier_hits_total{tier="memory"}'))


def phase_kvtier(engine: Engine, lengths: list[int], repeats: int) -> dict[str, Any]:
    result: dict[str, Any] = {"ttft_s": {}, "outputs": {}, "load_engine_ms": {}, "hits": {}, "first_token": {}}
    for n in lengths:
        prompt = tokens(n, 7 * n)
        hits = memory_hits_of(engine, prompt, repeats)
        disk = []
        before_disk = scrape()
        for r in range(max(1, repeats - 1)):
            for j, filler in enumerate(FILLER_TOKENS):  # newer chunks push the prompt out of memory
                engine.ttft(tokens(filler, 40000 + 1000 * n + 10 * r + j))
                time.sleep(2)  # memory slots are reused once their write-through is on disk
            engine.drop_gpu_cache()
            disk.append(engine.ttft(prompt)[0])
        disk_hits = delta(before_disk, scrape(), 'kvtier_hits_total{tier="disk"}')
        result["ttft_s"][str(n)] = {"kvtier_memory_hit": median(hits.ttft_s), "kvtier_disk_hit": median(disk),
                                    "memory_all": [round(t, 4) for t in hits.ttft_s],
                                    "disk_all": [round(t, 4) for t in disk]}
        record_load_times(result, n, hits)
        result["outputs"][str(n)] = {"cached_tokens": hits.cached_tokens, "tokens": hits.tokens}
        result["hits"][str(n)] = {"memory_chunks": hits.memory_chunks, "disk_chunks": disk_hits,
                                  "chunks_per_hit": -(-((n - 1) // 16 * 16) // 256)}
        result["first_token"][str(n)] = first_token_after_load(engine, prompt)
        print(f"kvtier {n}: {result['ttft_s'][str(n)]} load {result['load_engine_ms'][str(n)]} ms "
              f"hits {result['hits'][str(n)]}", flush=True)
    result["decode_while_prefilling"] = decode_while_prefilling(engine, repeats)
    result["no_reuse"] = no_reuse(engine)
    result["metrics_at_end"] = {k: v for k, v in scrape().items() if "_bucket" not in k}
    return result


def record_load_times(result: dict[str, Any], n: int, hits: MemoryHits) -> None:
    """Engine-thread CPU ms per load step (``load_engine_ms``, the issue's measure) and its wall ms."""
    result["load_engine_ms"][str(n)] = round(statistics.median(hits.load_cpu_ms), 3)
    result.setdefault("load_engine_wall_ms", {})[str(n)] = round(statistics.median(hits.load_wall_ms), 3)


def first_token_after_load(engine: Engine, prompt: list[int]) -> dict[str, Any]:
    """``Engine.first_token`` of ``prompt`` loaded from kvtier (vLLM's own cache emptied first);
    an error is recorded, not raised, so that the rest of the run still reports."""
    try:
        engine.drop_gpu_cache()
        return engine.first_token(prompt)
    except Exception as exc:  # noqa: BLE001 - one measurement of many; the lead gets one run
        return {"error": repr(exc)}


def phase_kvtier_int8(engine: Engine, lengths: list[int], repeats: int) -> dict[str, Any]:
    """Memory hits from int8 slots, and the outputs to compare with the ``kvtier`` phase's."""
    result: dict[str, Any] = {"ttft_s": {}, "outputs": {}, "load_engine_ms": {}, "hits": {}, "first_token": {}}
    for n in lengths:
        prompt = tokens(n, 7 * n)
        hits = memory_hits_of(engine, prompt, repeats)
        result["hits"][str(n)] = {"memory_chunks": hits.memory_chunks}
        result["ttft_s"][str(n)] = {"kvtier_memory_int8_hit": median(hits.ttft_s),
                                    "memory_int8_all": [round(t, 4) for t in hits.ttft_s]}
        record_load_times(result, n, hits)
        result["outputs"][str(n)] = {"cached_tokens": hits.cached_tokens, "tokens": hits.tokens}
        result["first_token"][str(n)] = first_token_after_load(engine, prompt)
        print(f"kvtier_int8 {n}: {result['ttft_s'][str(n)]} load {result['load_engine_ms'][str(n)]} ms "
              f"hits {result['hits'][str(n)]}", flush=True)
    result["metrics_at_end"] = {k: v for k, v in scrape().items() if "_bucket" not in k}
    return result


def phase_kvtier_noreuse(engine: Engine, lengths: list[int], repeats: int) -> dict[str, Any]:
    """The no-reuse traffic with kvtier's default admission rule, after it has learned: 16
    distinct 2K prompts first (128 chunks, past its learning window), not timed."""
    engine.run([tokens(2048, 70000 + i) for i in range(16)], max_tokens=1)
    before = scrape()
    result: dict[str, Any] = {"no_reuse": no_reuse(engine)}
    result["unadmitted_chunks"] = delta(before, scrape(), "kvtier_unadmitted_stores_total")
    result["metrics_at_end"] = {k: v for k, v in scrape().items() if "_bucket" not in k}
    return result


def compare_int8(exact: dict[str, Any], int8: dict[str, Any], lengths: list[int]) -> dict[str, Any]:
    """Per length: the int8 run's 16 greedy tokens against the exact kvtier run's (both after a
    memory hit), and the first token's top logprobs (largest difference over the tokens both list)."""
    report: dict[str, Any] = {}
    for n in map(str, lengths):
        a = (exact.get("outputs") or {}).get(n, {}).get("tokens")
        b = (int8.get("outputs") or {}).get(n, {}).get("tokens")
        if a is None or b is None:
            continue
        differ = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
        first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        row: dict[str, Any] = {"outputs_equal": a == b, "token_mismatch_share": round(differ / max(len(a), 1), 4),
                               "first_differing_position": first_diff,
                               "cached_tokens": {"int8": int8["outputs"][n]["cached_tokens"],
                                                 "exact": exact["outputs"][n]["cached_tokens"]}}
        fa = (exact.get("first_token") or {}).get(n, {})
        fb = (int8.get("first_token") or {}).get(n, {})
        la, lb = fa.get("top_logprobs") or {}, fb.get("top_logprobs") or {}
        common = sorted(set(la) & set(lb))
        if la and lb:
            row["first_token_equal"] = fa.get("token") == fb.get("token")
            row["first_token_logprob_max_abs_diff"] = (round(max(abs(la[t] - lb[t]) for t in common), 6)
                                                       if common else None)
            row["top_logprobs_shared"] = f"{len(common)}/{len(la)}"
        else:
            row["first_token_error"] = fa.get("error") or fb.get("error")
        report[n] = row
    return report


PHASES = {"vllm": phase_vllm, "offload": phase_offload, "kvtier": phase_kvtier, "kvtier_int8": phase_kvtier_int8,
          "kvtier_noreuse": phase_kvtier_noreuse}


def run_phase(name: str, lengths: list[int], repeats: int, out: Path) -> None:
    engine = Engine(CONNECTORS[name])
    import vllm

    result = {"engine_start_s": round(engine.start_s, 1), "cudagraph_mode": engine.cuda_graphs,
              "vllm_version": vllm.__version__}
    engine.run([tokens(512, 1)])  # warm-up
    engine.run([tokens(4096, 2)])
    result.update(PHASES[name](engine, lengths, repeats))
    out.write_text(json.dumps(result, indent=1))


def summarize(phases: dict[str, Any], lengths: list[int]) -> dict[str, Any]:
    import torch

    plain, offload, kv = phases.get("vllm") or {}, phases.get("offload") or {}, phases.get("kvtier") or {}
    int8 = phases.get("kvtier_int8") or {}
    summary: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "vllm_version": plain.get("vllm_version"),
                               "cuda_graphs": "NONE" not in str(kv.get("cudagraph_mode", "NONE")),
                               "cudagraph_mode": kv.get("cudagraph_mode"),
                               "model": "Llama-3.1-8B shape, dummy weights, bf16, block 16, chunk 256",
                               "ttft_s": {}, "load_engine_cpu_ms": kv.get("load_engine_ms"),
                               "load_engine_wall_ms": kv.get("load_engine_wall_ms")}
    equal = True
    for n in map(str, lengths):
        row = {**plain.get("ttft_s", {}).get(n, {}), **{k: v for k, v in offload.get("ttft_s", {}).get(n, {}).items()
                                                        if k == "vllm_offload_hit"},
               **{k: v for k, v in kv.get("ttft_s", {}).get(n, {}).items() if not k.endswith("_all")},
               **{k: v for k, v in int8.get("ttft_s", {}).get(n, {}).items() if not k.endswith("_all")}}
        if row.get("cold") and row.get("kvtier_memory_hit"):
            row["kvtier_memory_speedup_vs_cold"] = round(row["cold"] / row["kvtier_memory_hit"], 1)
        summary["ttft_s"][n] = row
        oracle, ours = plain.get("outputs", {}).get(n), kv.get("outputs", {}).get(n)
        equal = equal and oracle is not None and ours is not None and oracle == ours
    summary["outputs_equal_vllm_prefix_cache"] = equal
    if int8:
        summary["load_engine_cpu_ms_int8"] = int8.get("load_engine_ms")
        summary["int8"] = compare_int8(kv, int8, lengths)
        rows = summary["int8"].values()
        summary["int8_outputs_equal"] = bool(rows) and all(row["outputs_equal"] for row in rows)
    if plain.get("decode_while_prefilling") and kv.get("decode_while_prefilling"):
        summary["decode_slowdown_while_storing"] = round(
            kv["decode_while_prefilling"]["median_s"] / plain["decode_while_prefilling"]["median_s"] - 1, 4)
    def overhead(ours: dict[str, Any]) -> dict[str, float]:
        a, b = plain["no_reuse"], ours["no_reuse"]
        return {"ttft": round(b["ttft_mean_s"] / a["ttft_mean_s"] - 1, 4),
                "throughput": round(1 - b["batch_tokens_per_s"] / a["batch_tokens_per_s"], 4)}

    noreuse = phases.get("kvtier_noreuse") or {}
    if plain.get("no_reuse") and noreuse.get("no_reuse"):  # kvtier's default: adaptive admission
        summary["zero_reuse_overhead"] = overhead(noreuse)
        summary["zero_reuse_unadmitted_chunks"] = noreuse.get("unadmitted_chunks")
    if plain.get("no_reuse") and kv.get("no_reuse"):  # every chunk stored at first sight
        summary["zero_reuse_overhead_store_always" if "zero_reuse_overhead" in summary
                else "zero_reuse_overhead"] = overhead(kv)
    summary["hits"] = kv.get("hits")
    summary["phases"] = phases
    return summary


def markdown(summary: dict[str, Any]) -> str:
    """A table of the summary, for the README and the results folder."""
    lines = [f"# kvtier in CUDA vLLM {summary.get('vllm_version')} on {summary.get('gpu')}", "",
             f"{summary.get('model')}; CUDA graphs {summary.get('cudagraph_mode')}; TTFT = wall time of one "
             "`generate` with `max_tokens=1`, median of 3 (disk: of 2).", "",
             "| tokens | cold | vLLM prefix-cache hit | vLLM OffloadingConnector (CPU) | kvtier memory | kvtier disk "
             "| kvtier memory, int8 slots | kvtier memory vs cold | kvtier load, engine-thread CPU ms (wall ms) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, row in summary["ttft_s"].items():
        ms = [f"{1000 * row[k]:.1f} ms" if k in row else "-" for k in
              ("cold", "vllm_hit", "vllm_offload_hit", "kvtier_memory_hit", "kvtier_disk_hit",
               "kvtier_memory_int8_hit")]
        load = (summary.get("load_engine_cpu_ms") or {}).get(n, "-")
        wall = (summary.get("load_engine_wall_ms") or {}).get(n)
        load = f"{load} ({wall})" if wall is not None else load
        lines.append(f"| {n} | {' | '.join(ms)} | {row.get('kvtier_memory_speedup_vs_cold', '-')}x | {load} |")
    overhead = summary.get("zero_reuse_overhead") or {}
    lines += ["", f"- Outputs equal to vLLM's own prefix cache (16 greedy tokens at the same cached length): "
              f"{summary.get('outputs_equal_vllm_prefix_cache')}.",
              f"- Decode of 8 streams while a 32K prompt is prefilled and stored: "
              f"{100 * summary.get('decode_slowdown_while_storing', 0):+.2f}% wall time against vLLM alone.",
              f"- No reuse (200 distinct 2K prompts), kvtier's default admission: TTFT "
              f"{100 * overhead.get('ttft', 0):+.2f}%, throughput {-100 * overhead.get('throughput', 0):+.2f}% "
              f"against vLLM alone; storing every chunk (`admission.policy: always`): "
              f"{json.dumps(summary.get('zero_reuse_overhead_store_always'))}.",
              f"- Chunks served per tier: {json.dumps(summary.get('hits'))} (a disk hit that finds some chunks "
              "still in memory takes those from memory)."]
    if "int8" in summary:
        lines += [f"- int8 slots (`memory.kv_format: int8`) against exact slots, after a memory hit: outputs equal "
                  f"{summary.get('int8_outputs_equal')}; per length {json.dumps(summary['int8'])}; engine-thread "
                  f"ms per load {json.dumps(summary.get('load_engine_cpu_ms_int8'))}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--phases", default="vllm,offload,kvtier,kvtier_int8,kvtier_noreuse")
    parser.add_argument("--with-earlier", action="store_true",
                        help="also report the phases an earlier call ran on this machine (their files in /tmp)")
    parser.add_argument("--skip-int8", action="store_true", help="leave out the kvtier_int8 phase")
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--markdown", metavar="JSON", help="only write the Markdown table of a results file")
    args = parser.parse_args()
    if args.markdown:
        path = Path(args.markdown)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return
    lengths = [int(n) for n in args.lengths.split(",")]
    tmp = Path("/tmp")
    if args.phase:
        run_phase(args.phase, lengths, args.repeats, tmp / f"vllm_cuda_{args.phase}.json")
        return
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    (MODEL_DIR / "config.json").write_text(json.dumps(LLAMA31_8B))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    phases: dict[str, Any] = {}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [name for name in args.phases.split(",") if not (args.skip_int8 and name == "kvtier_int8")]
    unknown = sorted(set(names) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {sorted(PHASES)}")
    if args.with_earlier:
        for name in sorted(set(PHASES) - set(names)):
            earlier = tmp / f"vllm_cuda_{name}.json"
            if earlier.exists():
                phases[name] = json.loads(earlier.read_text())
    for name in names:
        started = time.perf_counter()
        code = subprocess.call([sys.executable, __file__, "--phase", name, "--lengths", args.lengths,
                                "--repeats", str(args.repeats)], env=env)
        path = tmp / f"vllm_cuda_{name}.json"
        phases[name] = json.loads(path.read_text()) if code == 0 and path.exists() else {"failed": code}
        phases[name]["wall_s"] = round(time.perf_counter() - started, 1)
        summary = summarize(phases, lengths)
        gpu = re.sub(r"[^a-z0-9]+", "-", summary["gpu"].lower()).strip("-")
        target = out_dir / f"vllm_cuda_{datetime.date.today()}_{gpu}.json"
        target.write_text(json.dumps(summary, indent=1))
        target.with_suffix(".md").write_text(markdown(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "phases"}, indent=1))


if __name__ == "__main__":
    main()
