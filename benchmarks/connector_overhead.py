"""Where kvtier's overhead on traffic without reuse goes: time inside the connector's calls.

`kvtier bench lowreuse` compares TTFT with and without kvtier; on this 2-core machine its runs
differ by a few percent from one repeat to the next, so an overhead near the 2% floor cannot be
told from noise that way. This measures it directly: one vLLM-CPU engine (offline ``LLM``,
scheduler and worker in this process) with kvtier's memory tier (or memory and disk), every
method of ``KVTierConnector`` wrapped with a timer, serving unique prompts only (no prefix is
ever repeated). It reports the share of the engine's wall time spent inside kvtier's calls, per
method, per step, and what the admission rule declined. Work kvtier causes outside its own calls
(vLLM's bookkeeping for a connector) is not in the share: the lowreuse TTFT comparison covers it.

    PYTHONPATH=src .venv/bin/python benchmarks/connector_overhead.py --model models/smollm2-135m-instruct
Writes ``connector_overhead_<date>.{json,md}`` into ``--out-dir`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def timed_methods(cls: type, totals: dict[str, float], counts: dict[str, int]) -> None:
    """Wrap every public method defined on ``cls`` (not inherited) with a wall-clock timer."""
    for name, member in list(vars(cls).items()):
        if name.startswith("_") or not callable(member) or isinstance(member, (staticmethod, classmethod)):
            continue

        def wrap(method: Callable[..., Any], key: str) -> Callable[..., Any]:
            @functools.wraps(method)
            def timed(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    totals[key] += time.perf_counter() - started
                    counts[key] += 1
            return timed

        setattr(cls, name, wrap(member, name))


def prompts(count: int, length: int, seed: int, vocab: tuple[int, int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*vocab) for _ in range(length)] for _ in range(count)]


def run(model: str, with_disk: bool, rounds: int, batch: int, length: int, max_tokens: int) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # scheduler and worker in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (the e2e tests' size)
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams

    from kvtier.integrations.vllm.connector import KVTierConnector

    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    timed_methods(KVTierConnector, totals, counts)
    disk = tempfile.mkdtemp(prefix="kvtier-overhead-") if with_disk else None
    extra: dict[str, Any] = {"memory": {"capacity": "1GiB"}, "metrics": {"port": 0}}
    if disk:
        extra["disk"] = {"path": disk, "capacity": "4GiB"}
    llm = LLM(model=model, max_model_len=4096, enforce_eager=True, block_size=128, enable_prefix_caching=True,
              seed=0, kv_transfer_config={"kv_connector": "KVTierConnector", "kv_role": "kv_both",
                                          "kv_connector_extra_config": extra})
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts(batch, length, 1, (1000, 40000))], params,
                 use_tqdm=False)  # warm-up, not counted
    totals.clear()
    counts.clear()
    wall = 0.0
    for r in range(rounds):
        batch_prompts = prompts(batch, length, 100 + r, (1000, 40000))
        started = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in batch_prompts], params, use_tqdm=False)
        wall += time.perf_counter() - started
        print(f"round {r + 1}/{rounds}: {wall:.1f} s so far, kvtier {sum(totals.values()):.3f} s", flush=True)
    inside = sum(totals.values())
    steps = counts.get("build_connector_meta", 0)
    return {
        "tiers": "memory+disk" if with_disk else "memory", "rounds": rounds, "batch": batch,
        "prompt_tokens": length, "max_tokens": max_tokens, "engine_wall_s": round(wall, 3),
        "kvtier_s": round(inside, 4), "kvtier_share": round(inside / wall, 5), "steps": steps,
        "kvtier_ms_per_step": round(1000 * inside / max(steps, 1), 4),
        "per_method_ms": {k: round(1000 * v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
        "calls": dict(counts),
    }


def markdown(results: list[dict[str, Any]], machine: str) -> str:
    lines = [f"# Time inside kvtier's connector calls on traffic without reuse ({datetime.date.today()})", "",
             f"Machine: {machine}. vLLM-CPU, SmolLM2-135M, unique prompts only (`benchmarks/connector_overhead.py`).", "",
             "| tiers | engine wall time | inside kvtier | share | steps | kvtier per step | largest calls |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        top = ", ".join(f"{k} {v:.1f} ms" for k, v in list(r["per_method_ms"].items())[:3])
        lines.append(f"| {r['tiers']} | {r['engine_wall_s']:.1f} s | {1000 * r['kvtier_s']:.0f} ms | "
                     f"{100 * r['kvtier_share']:.2f}% | {r['steps']} | {r['kvtier_ms_per_step']:.2f} ms | {top} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--tiers", choices=("memory", "memory+disk"), help="one run (default: both, in subprocesses)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.tiers:
        result = run(args.model, args.tiers == "memory+disk", args.rounds, args.batch, args.prompt_tokens,
                     args.max_tokens)
        print("RESULT " + json.dumps(result))
        return
    import subprocess
    import sys

    results = []
    for tiers in ("memory", "memory+disk"):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--tiers", tiers, "--rounds",
                              str(args.rounds), "--batch", str(args.batch), "--prompt-tokens", str(args.prompt_tokens),
                              "--max-tokens", str(args.max_tokens)], capture_output=True, text=True, check=False)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            raise SystemExit(f"the {tiers} run failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    machine = f"{os.cpu_count()} cores, {platform.machine()}, load average {os.getloadavg()[0]:.1f} at the end"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"connector_overhead_{datetime.date.today()}.json"
    target.write_text(json.dumps({"machine": machine, "runs": results}, indent=1))
    target.with_suffix(".md").write_text(markdown(results, machine))
    print(markdown(results, machine))


if __name__ == "__main__":
    main()
