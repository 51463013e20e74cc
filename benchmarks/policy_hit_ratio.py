"""Hit ratio of the eviction policies on a synthetic prefix-caching trace.

The trace is a stream of requests, each a sequence of chunk keys:
- a popular request reuses one of ``num_docs`` shared prefixes (system prompt + document), picked
  with Zipf popularity, followed by a few chunks of its own (the question; never reused);
- a scan request (``scan_fraction`` of them) is a long one-off document never seen again (batch
  summarisation, evaluation sweeps).

The cache behaves like kvtier's store with no leases: the longest cached prefix of a request is a
hit (those keys are touched), every other chunk is stored (evicting when full). The hit ratio is
hit chunks / all chunks. Only public APIs (``kvtier.policy``) are used.

Usage: ``python benchmarks/policy_hit_ratio.py [--requests N] [--seed S] [--out PATH]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
from dataclasses import asdict, dataclass

from kvtier.policy import POLICY_NAMES, make_policy

CACHE_SIZES_CHUNKS = (1_000, 2_000, 4_000, 8_000, 16_000)


@dataclass(frozen=True)
class TraceSpec:
    name: str
    num_requests: int
    num_docs: int = 2_000
    zipf_s: float = 1.0
    doc_chunks: tuple[int, int] = (4, 32)
    suffix_chunks: tuple[int, int] = (1, 4)
    scan_fraction: float = 0.3
    scan_chunks: tuple[int, int] = (32, 128)


def make_trace(spec: TraceSpec, seed: int) -> list[list[int]]:
    """Requests as lists of chunk ids; ids are unique per (prefix, position) and per one-off chunk."""
    rng = random.Random(seed)
    fresh = itertools.count(10**9)
    docs = [[next(fresh) for _ in range(rng.randint(*spec.doc_chunks))] for _ in range(spec.num_docs)]
    rng.shuffle(docs)
    cum_weights = list(itertools.accumulate(1 / (rank + 1) ** spec.zipf_s for rank in range(spec.num_docs)))
    trace = []
    for _ in range(spec.num_requests):
        if rng.random() < spec.scan_fraction:
            trace.append([next(fresh) for _ in range(rng.randint(*spec.scan_chunks))])
        else:
            doc = rng.choices(docs, cum_weights=cum_weights)[0]
            trace.append(doc + [next(fresh) for _ in range(rng.randint(*spec.suffix_chunks))])
    return trace


def replay(policy_name: str, capacity_chunks: int, trace: list[list[int]]) -> tuple[int, int]:
    """(hit chunks, all chunks) of ``trace`` through a cache of ``capacity_chunks``."""
    policy = make_policy(policy_name, capacity_chunks)
    num_hits = num_chunks = 0
    for request in trace:
        num_prefix = next((i for i, key in enumerate(request) if key not in policy), len(request))
        for key in request[:num_prefix]:
            policy.touch(key)
        for key in request[num_prefix:]:
            if key in policy:  # held beyond the first miss: the store rewrites nothing, just touches
                policy.touch(key)
                continue
            if len(policy) >= capacity_chunks:
                policy.choose_victim(lambda _: True)
            policy.insert(key)
        num_hits += num_prefix
        num_chunks += len(request)
    return num_hits, num_chunks


def run(specs: list[TraceSpec], seed: int) -> list[dict]:
    rows = []
    for spec in specs:
        trace = make_trace(spec, seed)
        for capacity, name in itertools.product(CACHE_SIZES_CHUNKS, POLICY_NAMES):
            started = time.perf_counter()
            num_hits, num_chunks = replay(name, capacity, trace)
            elapsed_s = time.perf_counter() - started
            rows.append({"trace": spec.name, "capacity_chunks": capacity, "policy": name,
                         "hit_ratio": num_hits / num_chunks, "num_chunks": num_chunks,
                         "ns_per_chunk": 1e9 * elapsed_s / num_chunks})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'trace':<12} {'capacity':>9} " + " ".join(f"{name + ' hit':>11}" for name in POLICY_NAMES)
          + f" {'delta':>7} " + " ".join(f"{name + ' ns/chk':>13}" for name in POLICY_NAMES))
    by_cell: dict[tuple[str, int], dict[str, dict]] = {}
    for row in rows:
        by_cell.setdefault((row["trace"], row["capacity_chunks"]), {})[row["policy"]] = row
    for (trace, capacity), cell in by_cell.items():
        ratios = [cell[name]["hit_ratio"] for name in POLICY_NAMES]
        print(f"{trace:<12} {capacity:>9} " + " ".join(f"{ratio:>11.3f}" for ratio in ratios)
              + f" {ratios[-1] - ratios[0]:>+7.3f} "
              + " ".join(f"{cell[name]['ns_per_chunk']:>13.0f}" for name in POLICY_NAMES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "policy_hit_ratio.json"))
    args = parser.parse_args()
    specs = [TraceSpec("zipf+scans", args.requests), TraceSpec("zipf-only", args.requests, scan_fraction=0.0)]
    rows = run(specs, args.seed)
    print_table(rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"seed": args.seed, "cache_sizes_chunks": CACHE_SIZES_CHUNKS,
                   "traces": [asdict(spec) for spec in specs], "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
