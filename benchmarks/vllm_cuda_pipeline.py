"""Loads pipelined by layer in CUDA vLLM: a new turn on a cached prefix (issue 13, item 4).

A chat's next turn is a cached prefix plus new tokens: vLLM prefills the new tokens in a
PIECEWISE CUDA-graph step, where it calls the connector's per-layer hooks, so kvtier can let the
first layers compute while the later ones still cross PCIe (``memory.load_layer_groups``). (A
prompt that is all prefix ends in a 1-token step that vLLM replays as a FULL CUDA graph, without
the hooks: ``benchmarks/vllm_cuda.py`` measures that case.)

For each prefix length: prompt = prefix + ``--suffix`` new tokens (another suffix per repeat),
TTFT = wall time of ``generate`` with ``max_tokens=1``, median of ``--repeats``. Engines, each in
its own subprocess (the Llama-3.1-8B shape with dummy weights, as in ``vllm_cuda.py``):
- ``vllm``: cold (nothing cached) and vLLM's own GPU prefix-cache hit; 16 greedy tokens (the oracle);
- ``offload``: vLLM's ``OffloadingConnector``, a CPU hit after ``reset_prefix_cache``;
- ``kvtier_whole``: kvtier memory hit, the load fenced as a whole (``load_layer_groups: 1``);
- ``kvtier_layered``: kvtier memory hit pipelined in ``--groups`` layer groups.
kvtier phases count the loads that went layer by layer (``LayeredLoads.scatter`` calls) and
compare their 16 greedy tokens with the oracle's at the same cached length.

Usage (on the GPU machine, vLLM staged with ../shared/recipes/cuda-vllm):
    PYTHONPATH=/tmp/site:src VLLM_USE_FLASHINFER_SAMPLER=0 python3 benchmarks/vllm_cuda_pipeline.py
Writes ``vllm_cuda_pipeline_<date>_<gpu>.{json,md}`` into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_cuda as base  # noqa: E402  (the engine, model and prompts of the main CUDA benchmark)

PHASES = ("vllm", "offload", "kvtier_whole", "kvtier_layered")


def connector(name: str, groups: int) -> dict[str, Any] | None:
    if name in ("vllm", "offload"):
        return base.CONNECTORS[name]
    config = copy.deepcopy(base.CONNECTORS["kvtier_int8"])  # memory only, stores at first sight
    config["kv_connector_extra_config"]["memory"] = {"capacity": "12GiB",
                                                     "load_layer_groups": 1 if name == "kvtier_whole" else groups}
    return config


def prompt_of(n: int, suffix: int, repeat: int) -> list[int]:
    return base.tokens(n, 7 * n) + base.tokens(suffix, 500000 + 1000 * n + repeat)


def run_phase(name: str, lengths: list[int], suffix: int, repeats: int, groups: int) -> dict[str, Any]:
    layered_calls = [0]
    if name.startswith("kvtier"):
        from kvtier.layerload import LayeredLoads

        original = LayeredLoads.scatter

        def counted(self: LayeredLoads, ops: Any) -> None:
            layered_calls[0] += 1
            original(self, ops)

        LayeredLoads.scatter = counted  # type: ignore[method-assign]
    engine = base.Engine(connector(name, groups))
    import vllm

    result: dict[str, Any] = {"engine_start_s": round(engine.start_s, 1), "cudagraph_mode": engine.cuda_graphs,
                              "vllm_version": vllm.__version__, "ttft_s": {}, "outputs": {}}
    engine.run([base.tokens(512, 1)])  # warm-up
    engine.run([base.tokens(4096, 2)])
    for n in lengths:
        if name == "vllm":
            colds = [engine.ttft(base.tokens(n + suffix, 900000 + 10 * n + r))[0] for r in range(repeats)]
        engine.ttft(prompt_of(n, suffix, 99))  # stores / caches the prefix
        hits, cached, load_ms = [], [], []
        for r in range(repeats):
            if name != "vllm":
                engine.drop_gpu_cache()
            before = base.scrape() if name.startswith("kvtier") else {}
            seconds, num_cached, _ = engine.ttft(prompt_of(n, suffix, r))
            if name.startswith("kvtier"):
                after = base.scrape()
                steps = base.delta(before, after, "kvtier_load_seconds_count")
                load_ms.append(1000 * base.delta(before, after, "kvtier_load_seconds_sum") / max(steps, 1))
            hits.append(seconds)
            cached.append(num_cached)
        if name != "vllm":
            engine.drop_gpu_cache()
        _, out_cached, out = engine.ttft(prompt_of(n, suffix, 77), max_tokens=16)
        entry = {"hit": base.median(hits), "hits_all": [round(t, 4) for t in hits], "cached_tokens": cached}
        if load_ms:
            entry["load_engine_ms"] = round(sorted(load_ms)[len(load_ms) // 2], 3)
        if name == "vllm":
            entry["cold"] = base.median(colds)
        result["ttft_s"][str(n)] = entry
        result["outputs"][str(n)] = {"cached_tokens": out_cached, "tokens": out}
        print(f"{name} {n}: {entry}", flush=True)
    result["layered_loads"] = layered_calls[0]
    return result


def summarize(phases: dict[str, Any], lengths: list[int], suffix: int, groups: int) -> dict[str, Any]:
    import torch

    summary: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                               "date": str(datetime.date.today()), "suffix_tokens": suffix, "layer_groups": groups,
                               "ttft_s": {}, "outputs_equal_vllm_prefix_cache": {}}
    oracle = (phases.get("vllm") or {}).get("outputs", {})
    for n in map(str, lengths):
        row: dict[str, Any] = {}
        for name in PHASES:
            entry = (phases.get(name) or {}).get("ttft_s", {}).get(n)
            if entry:
                row[name + "_hit"] = entry["hit"]
                if "load_engine_ms" in entry:
                    row[name + "_load_engine_ms"] = entry["load_engine_ms"]
                if "cold" in entry:
                    row["cold"] = entry["cold"]
        if row.get("kvtier_whole_hit") and row.get("kvtier_layered_hit"):
            row["layered_vs_whole"] = round(row["kvtier_layered_hit"] / row["kvtier_whole_hit"], 3)
        if row.get("offload_hit") and row.get("kvtier_layered_hit"):
            row["layered_vs_offload"] = round(row["kvtier_layered_hit"] / row["offload_hit"], 3)
        summary["ttft_s"][n] = row
        equal = {}
        for name in ("offload", "kvtier_whole", "kvtier_layered"):
            got = (phases.get(name) or {}).get("outputs", {}).get(n)
            if got and n in oracle:
                equal[name] = got["tokens"] == oracle[n]["tokens"] and got["cached_tokens"] == oracle[n]["cached_tokens"]
        summary["outputs_equal_vllm_prefix_cache"][n] = equal
    summary["layered_loads"] = {name: (phases.get(name) or {}).get("layered_loads") for name in PHASES[2:]}
    summary["phases"] = phases
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# kvtier loads pipelined by layer in CUDA vLLM, {summary['gpu']} ({summary['date']})", "",
             f"Llama-3.1-8B shape, dummy weights, bf16; prompt = cached prefix + {summary['suffix_tokens']} new "
             f"tokens (a PIECEWISE prefill step); TTFT = wall time of one `generate` with `max_tokens=1`, "
             f"median of the repeats; layered = {summary['layer_groups']} layer groups.", "",
             "| prefix tokens | cold | vLLM GPU hit | vLLM OffloadingConnector | kvtier, load as a whole | "
             "kvtier, layered | layered / whole | layered / Offloading |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def ms(value: Any) -> str:
        return "-" if value is None else f"{1000 * value:.1f} ms"

    for n, row in summary["ttft_s"].items():
        lines.append(f"| {n} | {ms(row.get('cold'))} | {ms(row.get('vllm_hit'))} | {ms(row.get('offload_hit'))} | "
                     f"{ms(row.get('kvtier_whole_hit'))} | {ms(row.get('kvtier_layered_hit'))} | "
                     f"{row.get('layered_vs_whole', '-')} | {row.get('layered_vs_offload', '-')} |")
    lines += ["", "Engine-thread CPU per load (ms, kvtier's load histogram): " + ", ".join(
        f"{n}: whole {row.get('kvtier_whole_load_engine_ms', '-')}, layered {row.get('kvtier_layered_load_engine_ms', '-')}"
        for n, row in summary["ttft_s"].items())]
    lines += ["", f"- Outputs (16 greedy tokens, cached-token count) equal to vLLM's own prefix cache: "
                  f"{json.dumps(summary['outputs_equal_vllm_prefix_cache'])}",
              f"- Loads that went layer by layer: {json.dumps(summary['layered_loads'])}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--suffix", type=int, default=512)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default=str(base.ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    tmp = Path("/tmp")
    if args.phase:
        result = run_phase(args.phase, lengths, args.suffix, args.repeats, args.groups)
        (tmp / f"vllm_cuda_pipeline_{args.phase}.json").write_text(json.dumps(result, indent=1))
        return
    base.MODEL_DIR.mkdir(parents=True, exist_ok=True)
    (base.MODEL_DIR / "config.json").write_text(json.dumps(base.LLAMA31_8B))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(base.ROOT / "src"), env.get("PYTHONPATH")]))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    phases: dict[str, Any] = {}
    for name in args.phases.split(","):
        if name not in PHASES:
            parser.error(f"unknown phase {name!r}; choose from {', '.join(PHASES)}")
        started = time.perf_counter()
        code = subprocess.call([sys.executable, __file__, "--phase", name, "--lengths", args.lengths,
                                "--suffix", str(args.suffix), "--groups", str(args.groups),
                                "--repeats", str(args.repeats)], env=env)
        path = tmp / f"vllm_cuda_pipeline_{name}.json"
        phases[name] = json.loads(path.read_text()) if code == 0 and path.exists() else {"failed": code}
        phases[name]["wall_s"] = round(time.perf_counter() - started, 1)
        summary = summarize(phases, lengths, args.suffix, args.groups)
        gpu = re.sub(r"[^a-z0-9]+", "-", summary["gpu"].lower()).strip("-")
        target = out_dir / f"vllm_cuda_pipeline_{datetime.date.today()}_{gpu}.json"
        target.write_text(json.dumps(summary, indent=1))
        target.with_suffix(".md").write_text(markdown(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "phases"}, indent=1))


if __name__ == "__main__":
    main()
