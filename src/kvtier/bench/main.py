"""``kvtier bench``: build the workload, run every configuration, write the report.

``run_bench`` is the whole command once the model folder is known; the CLI resolves the model (it
may build one) and passes the function that turns inline kvtier keys into vLLM's
``--kv-transfer-config`` value, so this package needs neither ``kvtier.models`` nor
``kvtier.serve``. Outputs, in ``--out-dir``: ``STEM.json``, ``STEM.md``, ``STEM_ttft_cdf.png``,
``STEM_tier_hits.png`` (share of prompt tokens each kvtier tier delivered to the engine) and, for
workloads with rounds, ``STEM_ttft_per_round.png``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable

from kvtier.bench.configs import MAX_MODEL_LEN_TOKENS, KvTransferJson, all_configs, engine_args, select_configs
from kvtier.bench.cost import Prices, load_prices
from kvtier.bench.options import BenchOptions, WorkloadParams
from kvtier.bench.plots import plot_tier_hits, plot_ttft_cdf, plot_ttft_per_round
from kvtier.bench.report import Report, build_report, markdown, results_json
from kvtier.bench.runner import ConfigRun, run_configs, run_external
from kvtier.bench.scenarios import (ChatParams, DocQAParams, LowReuseParams, RagParams, chat_workload,
                                    docqa_workload, lowreuse_workload, rag_workload)
from kvtier.bench.specs import ChatPrompt, ModelInfo, Workload, read_model_info, token_counter
from kvtier.bench.stats import summarize_run
from kvtier.bench.trace import TraceParams, kvtier_chunk_tokens, trace_workload
from kvtier.errors import ServerError

Progress = Callable[[str], None]
_PROMPT_MARGIN_TOKENS = 16  # what the chat template may add beyond our estimate


def say(message: str) -> None:
    print(f"kvtier bench: {message}", file=sys.stderr, flush=True)


def build_workload(params: WorkloadParams, model: ModelInfo) -> Workload:
    """The requests of one workload for this model. Raises ConfigError if they cannot fit."""
    max_prompt_tokens = MAX_MODEL_LEN_TOKENS - params.max_tokens - _PROMPT_MARGIN_TOKENS
    if isinstance(params, LowReuseParams):
        return lowreuse_workload(params, model.token_id_range, max_prompt_tokens)
    if isinstance(params, TraceParams):
        return trace_workload(params, model.token_id_range, max_prompt_tokens)
    count_tokens = token_counter(model.path)
    if isinstance(params, ChatParams):
        return chat_workload(params, count_tokens, max_prompt_tokens)
    if isinstance(params, DocQAParams):
        return docqa_workload(params, count_tokens, max_prompt_tokens)
    assert isinstance(params, RagParams), params
    return rag_workload(params, count_tokens, max_prompt_tokens)


def describe_workload(workload: Workload) -> str:
    num_tokens = [len(r.prompt.token_ids) for r in workload.requests if not isinstance(r.prompt, ChatPrompt)]
    sizes = f", prompts {min(num_tokens):,}-{max(num_tokens):,} tokens" if num_tokens else ""
    last_arrival_s = max(r.arrival_s for r in workload.requests)
    return f"{workload.name}: {len(workload.requests)} requests{sizes}, arrivals over {last_arrival_s:.1f} s"


def _context(options: BenchOptions, model: ModelInfo, workload: Workload, prices: Prices,
             elapsed_s: float) -> list[tuple[str, str]]:
    s = options.settings
    params = ", ".join(f"{key}={value}" for key, value in workload.parameters)
    vllm_args = [*engine_args(s.engine_kv_tokens * model.kv_bytes_per_token), *s.engine_extra_args]
    target = options.external.base_url if options.external else (
        f"one vLLM server per configuration: `vllm serve MODEL {shlex.join(vllm_args)}` (engine KV cache "
        f"{s.engine_kv_tokens:,} tokens; extra arguments after `--` win over the defaults), "
        f"VLLM_CPU_NUM_OF_RESERVED_CPU=0; kvtier memory tier {options.memory_capacity}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return [("command", f"`kvtier {shlex.join(sys.argv[1:])}`"),
            ("workload", f"{describe_workload(workload)} ({params})"), ("model", model.served_name), ("servers", target),
            ("repeats", f"{s.repeats}, order {s.order}, max concurrency {s.max_concurrency}"),
            ("machine", f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
                        f"load average {load[0]:.1f} at the end (shared machines are noisy)"),
            ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
            ("elapsed", f"{elapsed_s:.0f} s"), ("prices", prices.source)]


def _write_outputs(options: BenchOptions, report: Report, runs: list[ConfigRun], extra: dict[str, object],
                   progress: Progress) -> list[str]:
    out_dir, stem = options.settings.out_dir, options.stem
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")]
    with open(paths[0], "w") as file:
        json.dump(results_json(report, runs, extra), file, indent=1, allow_nan=False)
    with open(paths[1], "w") as file:
        file.write(markdown(report))
    summaries = list(report.summaries)
    cdf = os.path.join(out_dir, f"{stem}_ttft_cdf.png")
    if plot_ttft_cdf(summaries, f"TTFT CDF, {options.workload}", cdf, progress):
        paths.append(cdf)
    tiers = os.path.join(out_dir, f"{stem}_tier_hits.png")
    if plot_tier_hits(summaries, f"Hit ratio per tier, {options.workload}", tiers, progress):
        paths.append(tiers)
    per_round = os.path.join(out_dir, f"{stem}_ttft_per_round.png")
    if report.has_rounds and plot_ttft_per_round(summaries, f"Mean TTFT per round, {options.workload}",
                                                 per_round, progress):
        paths.append(per_round)
    return paths


def _run(options: BenchOptions, workload: Workload, model: ModelInfo, kv_json: KvTransferJson,
         progress: Progress) -> list[ConfigRun]:
    params = options.params
    chunk_tokens = kvtier_chunk_tokens(params.block_tokens) if isinstance(params, TraceParams) else None
    if options.external is not None:
        if chunk_tokens is not None:
            progress(f"--block-tokens {chunk_tokens}: the server's kvtier needs chunk_tokens {chunk_tokens} for a "
                     f"shared one-block prefix to hit (the bench cannot set it on a server given by --url)")
        return run_external(options.external, workload, model, options.settings, progress)
    configs = select_configs(all_configs(options.memory_capacity, options.remote, chunk_tokens),
                             None if options.config_names is None else list(options.config_names))
    progress(f"configurations: {', '.join(c.name for c in configs)}; {options.settings.repeats} repeats each, "
             f"{options.settings.order}")
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-") as scratch_dir:
        return run_configs(configs, workload, model, options.settings, kv_json, scratch_dir, progress)


def run_bench(options: BenchOptions, model_dir: str, kv_json: KvTransferJson, progress: Progress,
              engine_model: str = "") -> dict[str, object]:
    """Run the benchmark and write its outputs; print the Markdown report to stdout. Returns the
    results (as written to STEM.json). ``model_dir`` holds the model's config.json and tokenizer.json;
    ``engine_model`` is the servers' --model when it is not ``model_dir`` (a Hugging Face id).
    Raises ConfigError for bad flags or trace (before any server starts) and ServerError, after
    writing everything, if a configuration failed."""
    started_s = time.monotonic()
    model = read_model_info(model_dir, engine_model)
    prices = load_prices(options.prices_path, dict(options.price_overrides))
    workload = build_workload(options.params, model)
    progress(describe_workload(workload))
    runs = _run(options, workload, model, kv_json, progress)
    summaries = [summarize_run(run) for run in runs]
    context = _context(options, model, workload, prices, time.monotonic() - started_s)
    report = build_report(f"kvtier bench: {workload.name}", context, summaries, prices, workload.has_rounds)
    extra: dict[str, object] = {"workload": workload.name, "parameters": dict(workload.parameters),
                                "context": dict(context), "repeats": options.settings.repeats}
    paths = _write_outputs(options, report, runs, extra, progress)
    print(markdown(report))
    progress("wrote " + ", ".join(paths))
    failed = [run for run in runs if run.error is not None]
    if failed:
        raise ServerError("; ".join(f"{run.name}: {run.error}" for run in failed))
    with open(paths[0]) as file:
        return dict(json.load(file))
