"""``kvtier advise TRACE``: does kvtier pay for this traffic, and at what size? Offline, in seconds.

Reads the trace (``workload``), runs the engine's own prefix cache once (``engine``), replays the
trace through kvtier's books for each capacity of the swept tier and once unlimited
(``simulate``), prices each replay (``timing``) and prints a table and one sentence of advice
(``report``), or with ``--json`` one JSON object: ``infinite`` and ``capacities`` (a list), each
with ``capacity_tokens`` (null for infinite), ``hit_ratio_tokens``, ``hit_ratio_mean_per_request``
and the rest of the row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from dataclasses import replace

from kvtier.advisor.engine import engine_hits
from kvtier.advisor.report import CapacityRow, advice, capacity_row, format_size, knee, plot, table
from kvtier.advisor.simulate import UNBOUNDED, KvtierSettings, TierSizes, num_distinct_chunks
from kvtier.advisor.sweep import default_jobs, replay_sizes
from kvtier.advisor.timing import PROFILES, calibrate, profile_named
from kvtier.argtypes import positive_int
from kvtier.advisor.workload import read_workload, tokenizer_encode
from kvtier.bench.cost import load_prices
from kvtier.bench.trace import TRACE_BLOCK_TOKENS
from kvtier.errors import ConfigError

DEFAULT_CHUNK_TOKENS = 256
NUM_DEFAULT_CAPACITIES = 8


def _capacities(text: str) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {text!r}")
    return sorted(set(numbers))


def _remote_tokens(text: str) -> int:
    return UNBOUNDED if text == "unbounded" else positive_int(text)


def add_advise_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "advise", help="offline: kvtier's hit ratio, TTFT and GPU time saved on a trace, per capacity",
        description="Replay a trace through kvtier's own books (policies, keys, tiers) and a model of the "
                    "engine's prefix cache, for a list of capacities of one tier; report the prefix hit ratio, "
                    "bytes per tier, TTFT and engine time saved, the knee of the curve and one sentence of advice.",
        epilog="example: kvtier advise trace.jsonl --capacity-tokens 100000,1000000,10000000 --plot advise.png")
    p.add_argument("trace", metavar="TRACE", help="Mooncake JSONL (hash_ids) or prompts JSONL (token_ids)")
    p.add_argument("--block-tokens", type=positive_int, default=TRACE_BLOCK_TOKENS,
                   help=f"tokens per hash id; lengths scale with it (default: {TRACE_BLOCK_TOKENS})")
    p.add_argument("--capacity-tokens", type=_capacities, metavar="A,B,...",
                   help=f"capacities of the swept tier, in tokens (default: {NUM_DEFAULT_CAPACITIES} sizes up to "
                        "what the whole trace needs)")
    p.add_argument("--tier", choices=("memory", "disk", "remote"), default="memory",
                   help="the tier swept; the others are fixed by --memory-tokens, --disk-tokens, --remote-tokens")
    p.add_argument("--memory-tokens", type=positive_int, help="memory tier when sweeping disk or remote (default: "
                                                                "2 GiB of KV, kvtier's default memory.capacity)")
    p.add_argument("--disk-tokens", type=positive_int, help="disk tier when sweeping memory or remote (default: "
                                                              "no disk tier)")
    p.add_argument("--remote-tokens", type=_remote_tokens, metavar="N|unbounded",
                   help="remote tier (Redis with allkeys-lru: least recently used evicted; 'unbounded': S3 within "
                        "its TTL) when sweeping memory or disk (default: no remote tier)")
    p.add_argument("--profile", choices=tuple(PROFILES), default="h200-llama8b",
                   help="device and model timing defaults (default: h200-llama8b)")
    p.add_argument("--calibration", metavar="BENCH.json", help="a `kvtier bench` results file: fit overhead and "
                                                               "prefill speed to its vllm requests")
    p.add_argument("--kv-bytes-per-token", type=positive_int, help="K and V of all layers (default: the profile's)")
    p.add_argument("--engine-cache-tokens", type=int, help="the engine's own prefix cache, usable tokens; 0: none "
                                                           "(default: the profile's)")
    p.add_argument("--engine-block-tokens", type=positive_int, help="the engine's block size (default: the profile's)")
    p.add_argument("--chunk-tokens", type=positive_int, default=DEFAULT_CHUNK_TOKENS,
                   help=f"kvtier's chunk_tokens (default: {DEFAULT_CHUNK_TOKENS})")
    p.add_argument("--policy", choices=("s3fifo", "lru"), default="s3fifo", help="memory.policy (default: s3fifo)")
    p.add_argument("--disk-write-policy", choices=("write_through", "spill"), default="write_through")
    p.add_argument("--admission", choices=("adaptive", "always", "second_sight"), default="adaptive",
                   help="admission.policy: which computed chunks kvtier stores (default: adaptive, kvtier's "
                   "default; always: every chunk at first sight)")
    p.add_argument("--gpu-hour", type=float, help="price of an engine-hour (default: bench's example price)")
    p.add_argument("--max-requests", type=positive_int, help="only the first N requests")
    p.add_argument("--max-output-tokens", type=positive_int, help="cap output lengths (as `kvtier bench "
                                                                   "--max-tokens` does); they take engine blocks")
    p.add_argument("--tokenizer", metavar="DIR", help="a folder with tokenizer.json, for prompts given as text")
    p.add_argument("--jobs", type=positive_int, help="replays run at once, one process each (default: the CPUs "
                                                    "this process may use; the results do not depend on it)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="FILE.png", help="hit ratio and TTFT saved against capacity (matplotlib)")


def default_capacities(num_chunks: int, chunk_tokens: int) -> list[int]:
    """Sizes from 1/128 of what the whole trace needs up to all of it, doubling."""
    top = max(num_chunks, 1) * chunk_tokens
    return sorted({max(chunk_tokens, top >> shift) for shift in range(NUM_DEFAULT_CAPACITIES - 1, -1, -1)})


def run_advise(args: argparse.Namespace) -> dict[str, object]:
    """The whole command; prints the table (or JSON) and returns the JSON object. Raises ConfigError."""
    started_s = time.monotonic()
    profile = profile_named(args.profile)
    if args.calibration:
        profile = calibrate(profile, args.calibration, args.kv_bytes_per_token)
    kv_bytes = args.kv_bytes_per_token or profile.kv_bytes_per_token
    block = args.engine_block_tokens or profile.engine_block_tokens
    engine_tokens = profile.engine_cache_tokens if args.engine_cache_tokens is None else args.engine_cache_tokens
    if engine_tokens < 0:
        raise ConfigError("--engine-cache-tokens", f"expected 0 or more, got {engine_tokens}")
    encode = None if args.tokenizer is None else tokenizer_encode(args.tokenizer)
    workload = read_workload(args.trace, args.block_tokens, args.chunk_tokens, block, args.max_requests, encode)
    if args.max_output_tokens:
        workload = replace(workload, requests=tuple(
            replace(r, num_output_tokens=min(r.num_output_tokens, args.max_output_tokens)) for r in workload.requests))
    hits = engine_hits(workload.requests, engine_tokens, block, workload.segment_tokens)
    settings = KvtierSettings(args.chunk_tokens, block, kv_bytes, args.policy, args.disk_write_policy, args.admission)
    num_chunks = num_distinct_chunks(workload)
    capacities = args.capacity_tokens or default_capacities(num_chunks, args.chunk_tokens)
    memory_tokens = args.memory_tokens or (2 << 30) // kv_bytes
    prices = load_prices(None, {} if args.gpu_hour is None else {"gpu_hour": args.gpu_hour})
    unlimited = (num_chunks + 1) * args.chunk_tokens

    def sizes(capacity: int) -> TierSizes:
        if args.tier == "memory":
            return TierSizes(capacity, args.disk_tokens, args.remote_tokens)
        if args.tier == "disk":
            return TierSizes(memory_tokens, capacity, args.remote_tokens)
        return TierSizes(memory_tokens, args.disk_tokens, capacity)

    engine_only = sum(hits) / max(workload.num_tokens, 1)
    engine_only_per_request = sum(h / r.num_tokens for h, r in zip(hits, workload.requests)) / len(hits)
    jobs = args.jobs or default_jobs()
    results = replay_sizes(workload, hits, settings, [sizes(c) for c in [*capacities, unlimited]], jobs)
    rows = [capacity_row(result, c, profile, prices) for result, c in zip(results, capacities)]
    infinite = capacity_row(results[-1], None, profile, prices)

    def size(tokens: int) -> str:
        return f"{format_size(tokens * kv_bytes)} ({tokens:,} tokens)"

    sentence = advice(args.tier, rows, infinite, engine_only, size)
    at_knee = knee(rows, infinite, engine_only)
    result = _result_json(args, workload.format, len(workload.requests), workload.num_tokens, engine_only, rows,
                          infinite, kv_bytes, sentence, at_knee, started_s)
    result |= {"profile": {"name": profile.name, "source": profile.source, "engine_cache_tokens": engine_tokens,
                           "engine_block_tokens": block, "kv_bytes_per_token": kv_bytes},
               "memory_tokens": memory_tokens if args.tier != "memory" else None,
               "disk_tokens": args.disk_tokens if args.tier != "disk" else None,
               "remote_tokens": None if args.tier == "remote" or args.remote_tokens is None
               else "unbounded" if args.remote_tokens == UNBOUNDED else args.remote_tokens,
               "hit_ratio_engine_only_mean_per_request": engine_only_per_request, "jobs": jobs,
               "cpu_s": _cpu_s(), "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if args.plot:
        plot(rows, infinite, engine_only, args.tier, f"kvtier advise: {os.path.basename(args.trace)}, "
             f"{profile.name}, engine cache {engine_tokens:,} tokens", kv_bytes, args.plot)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.trace}: {len(workload.requests):,} requests, {workload.num_tokens:,} prompt tokens, "
              f"{num_chunks:,} distinct chunks of {args.chunk_tokens} tokens; engine cache {engine_tokens:,} tokens "
              f"({engine_only * 100:.1f}% hit alone); timing {profile.name}; {result['elapsed_s']:.1f} s\n")
        print(table(rows, infinite, size))
        print(f"\n{sentence}")
    return result


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its finished worker processes so far."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def _result_json(args: argparse.Namespace, trace_format: str, num_requests: int, num_tokens: int,
                 engine_only: float, rows: list[CapacityRow], infinite: CapacityRow, kv_bytes: int, sentence: str,
                 at_knee: CapacityRow | None, started_s: float) -> dict[str, object]:
    return {"trace": args.trace, "format": trace_format, "block_tokens": args.block_tokens,
            "chunk_tokens": args.chunk_tokens, "tier": args.tier, "policy": args.policy,
            "num_requests": num_requests, "num_prompt_tokens": num_tokens, "hit_ratio_engine_only": engine_only,
            "infinite": infinite.as_dict(kv_bytes), "capacities": [row.as_dict(kv_bytes) for row in rows],
            "knee_capacity_tokens": None if at_knee is None else at_knee.capacity_tokens, "advice": sentence,
            "elapsed_s": time.monotonic() - started_s}
