"""Command-line surface of ``kvtier bench``: one sub-command per workload, shared flags after it.

``add_bench_parser`` adds ``bench`` to the ``kvtier`` parser; ``bench_options`` turns the parsed
arguments into a frozen ``BenchOptions`` (the model folder is resolved by the caller, the CLI,
which may build one). Pure argparse: nothing here starts a server.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.bench.configs import DEFAULT_ENGINE_KV_TOKENS, RemoteOptions, check_extra_engine_args
from kvtier.bench.runner import ExternalServer, RunSettings
from kvtier.bench.scenarios import ChatParams, DocQAParams, LowReuseParams, RagParams
from kvtier.bench.trace import TRACE_BLOCK_TOKENS, TraceParams
from kvtier.errors import ConfigError

WorkloadParams = ChatParams | DocQAParams | RagParams | LowReuseParams | TraceParams
WORKLOADS = ("chat", "docqa", "lowreuse", "rag", "trace")
DEFAULT_QPS = 1.0
DEFAULT_SEED = 0
_PRICE_FLAGS = ("gpu_hour", "storage_gb_month", "transfer_gb", "retention_hours")


@dataclass(frozen=True)
class BenchOptions:
    params: WorkloadParams
    workload: str
    settings: RunSettings
    stem: str  # output files: STEM.json, STEM.md, STEM_ttft_cdf.png, STEM_ttft_per_round.png
    config_names: tuple[str, ...] | None  # None = every configuration this run can compare
    memory_capacity: str
    remote: RemoteOptions
    external: ExternalServer | None
    prices_path: str | None
    price_overrides: tuple[tuple[str, float], ...]


def _positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


def _non_negative_float(text: str) -> float:
    number = float(text)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {number}")
    return number


def _common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("requests")
    g.add_argument("--max-tokens", type=_positive_int, default=32, help="answer tokens per request, exact "
                   "(ignore_eos) so every configuration decodes the same volume (default: 32)")
    g.add_argument("--qps", type=_non_negative_float,
                   help=f"mean arrival rate, Poisson (default: {DEFAULT_QPS}; 0 = all at once; not for trace)")
    g.add_argument("--max-concurrency", type=_positive_int, default=4, help="requests in flight (default: 4)")
    g.add_argument("--seed", type=int, help=f"seed of prompts and arrivals (default: {DEFAULT_SEED}; not for trace)")
    g = common.add_argument_group("engine and configurations")
    g.add_argument("--model", metavar="DIR|ID", help="model folder, or a Hugging Face model id such as "
                                                      "Qwen/Qwen2.5-7B-Instruct (vLLM downloads it; the bench reads "
                                                      "its config and tokenizer) (default: SmolLM2-135M-Instruct, "
                                                      "prepared in --models-dir)")
    g.add_argument("--models-dir", default="models", metavar="DIR",
                   help="where models are prepared (default: ./models)")
    g.add_argument("--tiny", action="store_true", help="a tiny random model (for CI; answers are noise)")
    g.add_argument("--configs", metavar="A,B", help="only these configurations (default: vllm, kvtier-memory, "
                                                     "kvtier-memory+disk, and +redis/+s3 if given; "
                                                     "kvtier-memory+redis+cachegen only when named)")
    g.add_argument("--redis-url", metavar="URL", help="adds kvtier-memory+redis (kvtier key remote.url) and, "
                                                       "when named in --configs, kvtier-memory+redis+cachegen")
    g.add_argument("--s3-url", metavar="s3://BUCKET/PREFIX", help="adds kvtier-memory+s3 (remote.url)")
    g.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint (remote.s3_endpoint); "
                                                         "credentials from the usual AWS variables")
    g.add_argument("--memory-capacity", default="1GiB", help="kvtier memory tier (default: 1GiB)")
    g.add_argument("--engine-kv-tokens", type=_positive_int, default=DEFAULT_ENGINE_KV_TOKENS,
                   help=f"vLLM's own KV cache, in tokens; small so it must evict, as in the demo "
                        f"(default: {DEFAULT_ENGINE_KV_TOKENS})")
    g.add_argument("--url", help="measure a running OpenAI-compatible server instead (one configuration)")
    g.add_argument("--metrics-url", help="with --url: its kvtier metrics, e.g. http://127.0.0.1:9464/metrics")
    g.add_argument("--server-pid", type=_positive_int, help="with --url: its process id, for engine CPU seconds")
    g.add_argument("--name", default="server", help="with --url: the configuration's name (default: server)")
    g = common.add_argument_group("repeats and output")
    g.add_argument("--repeats", type=_positive_int, default=3, help="passes per configuration; medians and "
                                                                     "min-max are reported (default: 3)")
    g.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved",
                   help="interleaved: all servers up, repeats take turns (default); sequential: one server at a time")
    g.add_argument("--warmup-tokens", type=_positive_int, default=2048,
                   help="tokens of the first warm-up request; a burst of --max-concurrency (at least 2) "
                        "requests of a quarter of it follows (default: 2048)")
    g.add_argument("--startup-timeout", type=_positive_int, default=300, metavar="SECONDS")
    g.add_argument("--request-timeout", type=_positive_int, default=300, metavar="SECONDS")
    g.add_argument("--out-dir", metavar="DIR", help="default: out/bench/WORKLOAD")
    g.add_argument("--stem", help="output file names STEM.json, STEM.md, STEM_*.png (default: bench_WORKLOAD)")
    g.add_argument("--log-dir", metavar="DIR", help="server logs (default: OUT_DIR/logs)")
    g = common.add_argument_group("cost view")
    g.add_argument("--prices", metavar="FILE", help="YAML or JSON: gpu_hour, storage_gb_month, transfer_gb, "
                                                     "retention_hours")
    for key in _PRICE_FLAGS:
        g.add_argument(f"--{key.replace('_', '-')}", type=_non_negative_float, dest=f"price_{key}")
    return common


def _add_workloads(workloads: argparse._SubParsersAction[argparse.ArgumentParser],
                   common: argparse.ArgumentParser) -> None:
    chat = workloads.add_parser("chat", parents=[common], help="multi-user, multi-round chat")
    chat.add_argument("--users", type=_positive_int, default=ChatParams.num_users)
    chat.add_argument("--rounds", type=_positive_int, default=ChatParams.num_rounds)
    chat.add_argument("--system-tokens", type=_positive_int, default=ChatParams.system_tokens,
                      help="shared system prompt")
    chat.add_argument("--context-tokens", type=_positive_int, default=ChatParams.context_tokens,
                      help="each user's own document, in the first turn")
    docqa = workloads.add_parser("docqa", parents=[common], help="questions about long documents, interleaved")
    docqa.add_argument("--documents", type=_positive_int, default=DocQAParams.num_documents)
    docqa.add_argument("--document-tokens", type=_positive_int, default=DocQAParams.document_tokens)
    docqa.add_argument("--questions", type=_positive_int, default=DocQAParams.questions_per_document,
                       help="per document")
    low = workloads.add_parser("lowreuse", parents=[common], help="short unique prompts: kvtier's overhead")
    low.add_argument("--requests", type=_positive_int, default=LowReuseParams.num_requests)
    low.add_argument("--prompt-tokens", type=_positive_int, default=LowReuseParams.prompt_tokens)
    rag = workloads.add_parser("rag", parents=[common], help="k passages from a Zipf-popular pool")
    rag.add_argument("--requests", type=_positive_int, default=RagParams.num_requests)
    rag.add_argument("--pool", type=_positive_int, default=RagParams.pool_size, help="passages in the pool")
    rag.add_argument("--passage-tokens", type=_positive_int, default=RagParams.passage_tokens)
    rag.add_argument("--passages", type=_positive_int, default=RagParams.passages_per_prompt, help="k per prompt")
    rag.add_argument("--zipf", type=_non_negative_float, default=RagParams.zipf_exponent, help="popularity exponent")
    trace = workloads.add_parser("trace", parents=[common], help="replay a Mooncake-format JSONL trace")
    trace.add_argument("trace", metavar="TRACE.jsonl")
    trace.add_argument("--speed", type=float, default=1.0, help="timestamps are divided by this (default: 1)")
    trace.add_argument("--block-tokens", type=_positive_int, default=TRACE_BLOCK_TOKENS,
                       help=f"tokens per hash id; lengths scale with it (default: {TRACE_BLOCK_TOKENS})")
    trace.add_argument("--max-input-tokens", type=_positive_int, help="drop trailing blocks beyond this")
    trace.add_argument("--max-requests", type=_positive_int, help="replay only the first N lines")


def add_bench_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench", help="benchmark vLLM alone vs vLLM + kvtier tiers on a workload",
        description="Start one vLLM server per configuration (same settings; or measure --url), run the "
                    "workload --repeats times on each, and report TTFT, ITL, throughput, kvtier hit rates "
                    "and bytes per tier, warm-up, engine CPU seconds and a cost view. Writes JSON, Markdown "
                    "and PNG plots to --out-dir. Flags go after the workload name; vLLM arguments after `--` "
                    "go to every server started (they win over the bench's defaults).",
        epilog="example: kvtier bench chat --users 4 --rounds 3 --repeats 3 -- --gpu-memory-utilization 0.85")
    workloads = bench.add_subparsers(dest="workload", metavar="WORKLOAD", required=True)
    _add_workloads(workloads, _common_flags())


def workload_params(args: argparse.Namespace) -> WorkloadParams:
    """The workload's parameters. Raises ConfigError for a flag the workload would ignore (a trace
    has its own arrivals and prompts: --qps and --seed)."""
    if args.workload == "trace":
        for flag, value in (("--qps", args.qps), ("--seed", args.seed)):
            if value is not None:
                raise ConfigError(flag, "a trace replays its own timestamps and prompts, so it does not apply "
                                        "(--speed scales the timestamps)")
        return TraceParams(args.trace, args.speed, args.block_tokens, args.max_input_tokens, args.max_tokens,
                           args.max_requests)
    qps = DEFAULT_QPS if args.qps is None else args.qps
    seed = DEFAULT_SEED if args.seed is None else args.seed
    if args.workload == "chat":
        return ChatParams(args.users, args.rounds, args.system_tokens, args.context_tokens, args.max_tokens, qps, seed)
    if args.workload == "docqa":
        return DocQAParams(args.documents, args.document_tokens, args.questions, args.max_tokens, qps, seed)
    if args.workload == "rag":
        return RagParams(args.requests, args.pool, args.passage_tokens, args.passages, args.zipf, args.max_tokens,
                         qps, seed)
    return LowReuseParams(args.requests, args.prompt_tokens, args.max_tokens, qps, seed)


def bench_options(args: argparse.Namespace, engine_extra_args: Sequence[str] = ()) -> BenchOptions:
    """The options of one ``kvtier bench`` run; ``engine_extra_args``: vLLM arguments given after
    ``--`` (``ConfigError`` for one the bench sets itself)."""
    out_dir = args.out_dir or os.path.join("out", "bench", args.workload)
    settings = RunSettings(out_dir=out_dir, log_dir=args.log_dir or os.path.join(out_dir, "logs"),
                           repeats=args.repeats, order=args.order, max_concurrency=args.max_concurrency,
                           request_timeout_s=float(args.request_timeout), startup_timeout_s=float(args.startup_timeout),
                           engine_kv_tokens=args.engine_kv_tokens, warmup_tokens=args.warmup_tokens,
                           engine_extra_args=check_extra_engine_args(engine_extra_args))
    external = None if args.url is None else ExternalServer(args.name, args.url, args.metrics_url, args.server_pid)
    overrides = tuple((key, getattr(args, f"price_{key}")) for key in _PRICE_FLAGS
                      if getattr(args, f"price_{key}") is not None)
    names = None if args.configs is None else tuple(n.strip() for n in args.configs.split(",") if n.strip())
    return BenchOptions(params=workload_params(args), workload=args.workload, settings=settings,
                        stem=args.stem or f"bench_{args.workload}", config_names=names,
                        memory_capacity=args.memory_capacity,
                        remote=RemoteOptions(args.redis_url, args.s3_url, args.s3_endpoint), external=external,
                        prices_path=args.prices, price_overrides=overrides)
