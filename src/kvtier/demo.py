"""``kvtier demo``: the same multi-user chat workload against vLLM without and with kvtier.

Each configuration gets a real OpenAI-compatible vLLM server whose KV cache is deliberately small
(a little more than one max-length request), so vLLM's own prefix cache evicts a user's context
before that user's next turn. Without kvtier those turns recompute the whole prompt; with kvtier
(memory + disk tiers) they load it. Time to first token (TTFT) is measured per request after one
warm-up request, kvtier's hit rates come from its metrics endpoint, and the results go to
``OUT_DIR/results.json`` and ``OUT_DIR/ttft_per_round.png``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import yaml

from kvtier.bench.client import ChatResult, fetch_text, stream_chat
from kvtier.bench.scrape import by_tier, hit_rate, parse_samples, value
from kvtier.bench.server import ServerProcess, ServerSpec, free_port
from kvtier.bench.summary import format_bytes, format_ratio, format_seconds, format_table, summarize
from kvtier.bench.workload import WorkloadSpec, make_conversations, turn_order, warmup_messages
from kvtier.errors import ServerError
from kvtier.models import SMOLLM2_MODEL, TINY_MODEL, make_tiny_model, prepare_smollm2
from kvtier.serve import connector_config_json

MAX_MODEL_LEN_TOKENS = 4096
BLOCK_TOKENS = 128
KV_CACHE_BLOCKS = 34  # one is vLLM's null block: 33 x 128 = 4,224 usable tokens, just over max_model_len
DOCUMENT_TOKENS = 2000
MAX_ANSWER_TOKENS = 16
TIERS = ("memory", "disk")
CONFIGURATIONS = ("baseline", "kvtier")
_REQUEST_TIMEOUT_S = 300.0
_TOKENS_PER_ROUND = 80  # a question, an answer and the chat template's markers, generously

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DemoOptions:
    models_dir: str
    out_dir: str
    num_users: int
    num_rounds: int
    tiny: bool
    port: int | None  # the server's port; None = any free port
    startup_timeout_s: float


@dataclass(frozen=True)
class RequestRecord:
    user: int
    round: int
    ttft_s: float
    total_s: float
    num_prompt_tokens: int
    num_cached_tokens: int | None
    question: str
    answer: str


@dataclass
class ConfigurationRun:
    name: str
    startup_s: float = math.nan
    warmup_ttft_s: float = math.nan
    requests: list[RequestRecord] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] | None = None  # kvtier_* metric -> tier -> value
    error: str | None = None


def max_rounds(document_tokens: int) -> int:
    return (MAX_MODEL_LEN_TOKENS - document_tokens - 200) // _TOKENS_PER_ROUND


def kv_bytes_per_token(model_dir: str) -> int:
    """KV cache bytes one token takes in bf16, from the model's config.json (K and V, all layers)."""
    with open(os.path.join(model_dir, "config.json")) as file:
        config = json.load(file)
    num_kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * num_kv_heads * head_dim * 2 * 2


def token_counter(model_dir: str) -> Callable[[str], int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    return lambda text: len(tokenizer.encode(text).ids)


def write_kvtier_config(path: str, disk_dir: str, metrics_port: int) -> None:
    config = {"memory": {"capacity": "1GiB"}, "disk": {"path": disk_dir}, "metrics": {"port": metrics_port}}
    with open(path, "w") as file:
        yaml.safe_dump(config, file, sort_keys=False)


def server_spec(name: str, model_dir: str, port: int, kv_cache_bytes: int, kv_transfer_json: str | None,
                log_path: str) -> ServerSpec:
    engine_args = ["--max-model-len", str(MAX_MODEL_LEN_TOKENS), "--enforce-eager",
                   "--block-size", str(BLOCK_TOKENS), "--dtype", "bfloat16", "--seed", "0",
                   "--kv-cache-memory-bytes", str(kv_cache_bytes), "--enable-prompt-tokens-details"]
    if kv_transfer_json is not None:
        engine_args += ["--kv-transfer-config", kv_transfer_json]
    # VLLM_CPU_KVCACHE_SPACE (whole GiB) would override --kv-cache-memory-bytes: remove it.
    return ServerSpec(name=name, model=model_dir, port=port, engine_args=tuple(engine_args),
                      env=(("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),), unset_env=("VLLM_CPU_KVCACHE_SPACE",),
                      log_path=log_path)


def run_workload(server: ServerProcess, run: ConfigurationRun, model_dir: str, workload: WorkloadSpec,
                 count_tokens: Callable[[str], int], progress: Progress) -> None:
    """Warm up once, then send every turn in order, recording each TTFT into ``run``."""
    url = server.spec.base_url
    warmup = stream_chat(url, model_dir, warmup_messages(count_tokens, workload.document_tokens),
                         MAX_ANSWER_TOKENS, _REQUEST_TIMEOUT_S)
    run.warmup_ttft_s = warmup.ttft_s
    progress(f"[{run.name}] warm-up request: TTFT {format_seconds(warmup.ttft_s)} (not counted)")
    conversations = make_conversations(workload, count_tokens)
    for round_index, user in turn_order(workload):
        conversation = conversations[user]
        messages = conversation.ask()
        server.check_alive()
        result: ChatResult = stream_chat(url, model_dir, messages, MAX_ANSWER_TOKENS, _REQUEST_TIMEOUT_S)
        conversation.answer(result.answer)
        run.requests.append(RequestRecord(user, round_index, result.ttft_s, result.total_s,
                                          result.num_prompt_tokens, result.num_cached_tokens,
                                          conversation.last_question, result.answer))
        cached = "" if result.num_cached_tokens is None else f", {result.num_cached_tokens:,} cached"
        progress(f"[{run.name}] round {round_index} user {user + 1}: TTFT {format_seconds(result.ttft_s)} "
                 f"({result.num_prompt_tokens:,} prompt tokens{cached})")


def run_configuration(name: str, options: DemoOptions, model_dir: str, workload: WorkloadSpec,
                      count_tokens: Callable[[str], int], scratch_dir: str, progress: Progress) -> ConfigurationRun:
    """Start the server for one configuration, run the workload, scrape metrics, stop the server.

    A failure is recorded in the returned run's ``error`` (the server is stopped either way)."""
    run = ConfigurationRun(name)
    kv_cache_bytes = KV_CACHE_BLOCKS * BLOCK_TOKENS * kv_bytes_per_token(model_dir)
    kv_transfer_json = None
    metrics_url = None
    if name == "kvtier":
        metrics_port = free_port()
        config_path = os.path.join(scratch_dir, "kvtier.yaml")
        write_kvtier_config(config_path, os.path.join(scratch_dir, "disk"), metrics_port)
        kv_transfer_json = connector_config_json(config_path, {})
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    port = options.port if options.port is not None else free_port()
    log_path = os.path.join(options.out_dir, "logs", f"{name}.log")
    spec = server_spec(name, model_dir, port, kv_cache_bytes, kv_transfer_json, log_path)
    progress(f"[{name}] starting vLLM on port {port}, KV cache {KV_CACHE_BLOCKS * BLOCK_TOKENS:,} tokens "
             f"({format_bytes(kv_cache_bytes)}); log: {log_path}")
    try:
        with ServerProcess(spec, os.environ) as server:
            run.startup_s = server.wait_ready(options.startup_timeout_s, lambda m: progress(f"[{name}] {m}"))
            progress(f"[{name}] ready in {run.startup_s:.1f} s")
            run_workload(server, run, model_dir, workload, count_tokens, progress)
            if metrics_url is not None:
                run.metrics = scrape_metrics(metrics_url, progress)
            progress(f"[{name}] stopping the server")
    except ServerError as exc:
        run.error = str(exc)
        progress(f"[{name}] FAILED: {exc}")
    return run


def scrape_metrics(url: str, progress: Progress) -> dict[str, dict[str, float]] | None:
    try:
        return by_tier(parse_samples(fetch_text(url, timeout_s=10)))
    except ServerError as exc:
        progress(f"kvtier metrics unavailable ({exc}): hit rates will read n/a")
        return None


def run_demo(options: DemoOptions, progress: Progress) -> dict[str, object]:
    """Run both configurations and report. Returns the results (also written to results.json).

    Raises ServerError after writing the results if a configuration failed."""
    started_s = time.monotonic()
    name = TINY_MODEL if options.tiny else SMOLLM2_MODEL
    model_path = os.path.join(options.models_dir, name)
    model_dir = make_tiny_model(model_path, progress) if options.tiny else prepare_smollm2(model_path, progress)
    count_tokens = token_counter(model_dir)
    workload = WorkloadSpec(options.num_users, options.num_rounds, DOCUMENT_TOKENS)
    os.makedirs(options.out_dir, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as scratch_dir:
        for configuration in CONFIGURATIONS:
            runs.append(run_configuration(configuration, options, model_dir, workload, count_tokens,
                                          scratch_dir, progress))
            if runs[-1].error is not None:
                break  # nothing left to compare with
    results = results_dict(options, model_dir, workload, runs, time.monotonic() - started_s)
    with open(os.path.join(options.out_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=2, allow_nan=False, default=_json_default)
    if any(run.requests for run in runs):
        print(report(runs))
        plot_path = os.path.join(options.out_dir, "ttft_per_round.png")
        if plot_ttft_per_round(runs, workload.num_rounds, plot_path, progress):
            print(f"\nresults: {os.path.join(options.out_dir, 'results.json')}  plot: {plot_path}")
    failed = [run for run in runs if run.error is not None]
    if failed:
        raise ServerError(failed[0].error or "")
    return results


def _json_default(obj: object) -> object:
    raise TypeError(f"not JSON serialisable: {obj!r}")


def _finite(number: float) -> float | None:
    return None if math.isnan(number) else number


def results_dict(options: DemoOptions, model_dir: str, workload: WorkloadSpec, runs: list[ConfigurationRun],
                 elapsed_s: float) -> dict[str, object]:
    configurations: dict[str, object] = {}
    for run in runs:
        ttfts = [record.ttft_s for record in run.requests]
        summary = summarize(ttfts).as_dict()
        configurations[run.name] = {
            "error": run.error, "startup_s": _finite(run.startup_s), "warmup_ttft_s": _finite(run.warmup_ttft_s),
            "ttft_s": {k: _finite(v) for k, v in summary.items()},
            "ttft_s_by_round": {str(r): _finite(summarize(round_ttfts(run, r)).mean)
                                for r in range(1, workload.num_rounds + 1)},
            "requests": [asdict(record) for record in run.requests],
            "kvtier_metrics": run.metrics,
        }
    return {"model": model_dir, "num_users": workload.num_users, "num_rounds": workload.num_rounds,
            "document_tokens": workload.document_tokens, "kv_cache_tokens": KV_CACHE_BLOCKS * BLOCK_TOKENS,
            "max_answer_tokens": MAX_ANSWER_TOKENS, "elapsed_s": elapsed_s,
            "speedup_mean_ttft": _finite(speedup(runs)), "configurations": configurations}


def round_ttfts(run: ConfigurationRun, round_index: int) -> list[float]:
    return [record.ttft_s for record in run.requests if record.round == round_index]


def speedup(runs: list[ConfigurationRun], first_round: int = 1) -> float:
    """Mean baseline TTFT over mean kvtier TTFT, for rounds from ``first_round`` on."""
    means = {run.name: summarize([r.ttft_s for r in run.requests if r.round >= first_round]).mean for run in runs}
    base, tiered = means.get("baseline", math.nan), means.get("kvtier", math.nan)
    return base / tiered if tiered and not math.isnan(tiered) else math.nan


def report(runs: list[ConfigurationRun]) -> str:
    """The tables printed at the end: TTFT per configuration and per round, kvtier's tiers, one answer."""
    rows = []
    for run in runs:
        overall = summarize([r.ttft_s for r in run.requests])
        later = summarize([r.ttft_s for r in run.requests if r.round >= 2])
        cached = [r.num_cached_tokens / r.num_prompt_tokens for r in run.requests
                  if r.num_cached_tokens is not None and r.num_prompt_tokens]
        rows.append([run.name, str(overall.count), format_seconds(overall.mean), format_seconds(overall.p50),
                     format_seconds(overall.p95), format_seconds(later.mean),
                     format_ratio(sum(cached) / len(cached) if cached else None),
                     "ok" if run.error is None else "FAILED"])
    lines = ["", "Time to first token", format_table(
        ["configuration", "requests", "mean", "p50", "p95", "mean round>=2", "prompt cached", "status"], rows)]
    lines.append(f"speed-up (mean TTFT, baseline / kvtier): all rounds {_times(speedup(runs))}, "
                 f"rounds >= 2 {_times(speedup(runs, first_round=2))}")
    num_rounds = max((r.round for run in runs for r in run.requests), default=0)
    lines += ["", "Mean TTFT per round", format_table(
        ["round", *(run.name for run in runs)],
        [[str(i), *(format_seconds(summarize(round_ttfts(run, i)).mean) for run in runs)]
         for i in range(1, num_rounds + 1)])]
    lines += ["", "kvtier tiers (from its metrics endpoint)", tier_table(runs)]
    lines += example(runs)
    for run in runs:
        if run.error is not None:
            lines.append(f"\n{run.name} FAILED: {run.error}")
    return "\n".join(lines)


def _times(ratio: float) -> str:
    return "n/a" if math.isnan(ratio) else f"{ratio:.1f}x"


def tier_table(runs: list[ConfigurationRun]) -> str:
    metrics = next((run.metrics for run in runs if run.name == "kvtier"), None) or {}
    rows = [[tier, format_ratio(hit_rate(metrics, tier)),
             _count(value(metrics, "kvtier_hits_total", tier)),
             format_bytes(value(metrics, "kvtier_read_bytes_total", tier)),
             format_bytes(value(metrics, "kvtier_written_bytes_total", tier)),
             _count(value(metrics, "kvtier_evictions_total", tier))] for tier in TIERS]
    return format_table(["tier", "hit rate", "hits", "read", "written", "evictions"], rows)


def _count(number: float | None) -> str:
    return "n/a" if number is None else f"{number:,.0f}"


def example(runs: list[ConfigurationRun]) -> list[str]:
    """The last question of user 1 and its answer, from the last configuration that answered it."""
    for run in reversed(runs):
        records = [r for r in run.requests if r.user == 0]
        if records:
            record = records[-1]
            return ["", f"Example ({run.name}, user 1, round {record.round}):", f"  Q: {record.question}",
                    f"  A: {record.answer.strip()}"]
    return []


def plot_ttft_per_round(runs: list[ConfigurationRun], num_rounds: int, path: str, progress: Progress) -> bool:
    """TTFT per round: every request as a dot, the mean per round as a line. False (and no file) if
    matplotlib is missing or no request was answered."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed (pip install 'kvtier[demo]'): no plot")
        return False
    if not any(run.requests for run in runs):
        return False
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    rounds = list(range(1, num_rounds + 1))
    for run, offset in zip(runs, (-0.06, 0.06)):
        if not run.requests:
            continue
        means = [summarize(round_ttfts(run, r)).mean for r in rounds]
        line, = axes.plot(rounds, means, marker="o", label=f"{run.name} (mean)")
        axes.scatter([r.round + offset for r in run.requests], [r.ttft_s for r in run.requests],
                     color=line.get_color(), alpha=0.4, s=14)
    axes.set_xlabel("round (each user's n-th question)")
    axes.set_ylabel("time to first token (s)")
    axes.set_xticks(rounds)
    axes.set_ylim(bottom=0)
    axes.set_title("TTFT per round: vLLM alone vs vLLM + kvtier")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def say(message: str) -> None:
    print(f"kvtier demo: {message}", file=sys.stderr, flush=True)
