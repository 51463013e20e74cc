"""Round-robin vs cache-aware routing (``kvtier proxy --events``) over a Mooncake-format trace.

Starts ``--instances`` vLLM-CPU servers with kvtier (memory tier) publishing KV events, then
replays the trace's first ``--requests`` records through ``kvtier proxy`` twice: round-robin, then
cache-aware. Each policy gets its own tokens (hash ids offset), so the second run finds nothing the
first one cached. Requests go one after the other (the trace's order, not its timing), streamed;
TTFT is the time to the first streamed chunk. Hit rate: ``cached_tokens`` over prompt tokens, from
the servers' own usage reports.

Usage: python benchmarks/fleet_routing_cpu.py [--model DIR] [--trace FILE | --sample 40] [--instances 2]
           [--requests 60] [--block-tokens 64] [--max-input-tokens 2048] [--engine-kv-mib 256]
           [--memory-mib 256]
Writes benchmarks/results/fleet_<date>.json (``routing``: ``round_robin`` and ``cache_aware``, each
with ``hit_rate``, ``ttft_mean_s``, ``ttft_p95_s``; ``p2p``: not built yet, nulls) and a plot beside
it (with matplotlib). ``--plot FILE`` only redraws the plot of a results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from kvtier.bench.configs import engine_args
from kvtier.bench.server import ServerProcess, ServerSpec, free_ports
from kvtier.bench.trace import TraceRecord, make_sample_trace, prompt_token_ids, read_trace
from kvtier.proxy import Proxy, Upstream, serve
from kvtier.proxy.cacheaware import CacheAwareRouter
from kvtier.serve import connector_config_json

RESULTS = Path(__file__).with_name("results")
ID_RANGE = (10, 2000)
HASH_OFFSET = {"round_robin": 0, "cache_aware": 10_000_000}


def start(model: str, name: str, port: int, events_port: int, logs: Path, args: argparse.Namespace) -> ServerProcess:
    transfer = connector_config_json(None, {"memory.capacity": f"{args.memory_mib}MiB", "chunk_tokens": 256}, "both")
    events = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}"})
    spec = ServerSpec(name=name, model=model, port=port,
                      engine_args=(*engine_args(args.engine_kv_mib << 20), "--kv-transfer-config", transfer,
                                   "--kv-events-config", events),
                      env=(("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),), unset_env=("VLLM_CPU_KVCACHE_SPACE",),
                      log_path=str(logs / f"{name}.log"))
    return ServerProcess(spec, {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")})


def stream(url: str, prompt: list[int], max_tokens: int) -> tuple[float, int, int]:
    """TTFT (s), prompt tokens and cached tokens of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    started, ttft, usage = time.perf_counter(), None, None
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - started
            usage = chunk.get("usage") or usage
    assert ttft is not None and usage is not None, "no streamed answer"
    return ttft, usage["prompt_tokens"], (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def replay(proxy_url: str, records: list[TraceRecord], policy: str, args: argparse.Namespace) -> dict[str, float]:
    ttfts: list[float] = []
    prompt_tokens = cached_tokens = 0
    for record in records:
        shifted = replace(record, hash_ids=tuple(h + HASH_OFFSET[policy] for h in record.hash_ids))
        prompt = list(prompt_token_ids(shifted, args.block_tokens, args.max_input_tokens, ID_RANGE))
        ttft, num_prompt, num_cached = stream(proxy_url, prompt, min(record.output_length, args.max_tokens))
        ttfts.append(ttft)
        prompt_tokens += num_prompt
        cached_tokens += num_cached
    ttfts.sort()
    return {"hit_rate": round(cached_tokens / prompt_tokens, 4), "ttft_mean_s": round(statistics.mean(ttfts), 4),
            "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))], 4),
            "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens, "num_requests": len(ttfts)}


def wait_for_events(router: CacheAwareRouter, upstreams: list[Upstream]) -> None:
    """ZMQ delivers only once a subscription is in: short prompts until every server is heard."""
    deadline, attempt = time.monotonic() + 120, 0
    while router.feed.heard_from() != {u.url for u in upstreams}:
        if time.monotonic() > deadline:
            raise SystemExit("no KV events from the servers")
        for upstream in upstreams:
            stream(upstream.url, list(range(100 + attempt, 236 + attempt)), 1)
        attempt += 1
        time.sleep(0.5)


def plot(results_path: Path) -> None:
    """Hit rate and TTFT (mean, p95) per routing policy, beside the results file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results_path.read_text())
    policies = ["round_robin", "cache_aware"]
    figure, (hits, ttft) = plt.subplots(1, 2, figsize=(9, 3.5))
    hits.bar(policies, [data["routing"][p]["hit_rate"] for p in policies], color=["#999999", "#2a7ab0"])
    hits.set_ylabel("prefix hit rate (cached / prompt tokens)")
    hits.set_ylim(0, 1)
    positions = range(len(policies))
    for offset, key, label in ((-0.2, "ttft_mean_s", "mean"), (0.2, "ttft_p95_s", "p95")):
        ttft.bar([x + offset for x in positions], [data["routing"][p][key] for p in policies], width=0.4, label=label)
    ttft.set_xticks(list(positions), policies)
    ttft.set_ylabel("TTFT (s)")
    ttft.legend()
    figure.suptitle(f"{data['instances']} vLLM-CPU instances, {data['requests']} requests, {data['model'].split('/')[-1]}")
    figure.tight_layout()
    figure.savefig(results_path.with_suffix(".png"), dpi=100)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--trace", default=None, help="a Mooncake-format JSONL trace")
    parser.add_argument("--sample", type=int, default=40, metavar="N",
                        help="without --trace: a synthetic trace of N requests in the Mooncake format (a few "
                             "conversations extending a shared system prompt, plus one-off requests)")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--block-tokens", type=int, default=64, help="tokens per trace hash id (512 in the trace)")
    parser.add_argument("--max-input-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--engine-kv-mib", type=int, default=256, help="vLLM's own KV cache per instance")
    parser.add_argument("--memory-mib", type=int, default=256, help="kvtier's memory tier per instance")
    parser.add_argument("--plot", metavar="FILE", help="only redraw the plot of this results file")
    args = parser.parse_args()
    if args.plot:
        plot(Path(args.plot))
        return 0
    logs = Path(tempfile.mkdtemp(prefix="fleet-"))
    if args.trace is None:
        args.trace = str(logs / "sample_trace.jsonl")
        Path(args.trace).write_text("".join(json.dumps(line) + "\n" for line in make_sample_trace(args.sample, 0)))
    records = read_trace(args.trace, args.requests)
    ports = free_ports(2 * args.instances)
    results: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        servers = [stack.enter_context(start(args.model, f"i{n}", ports[2 * n], ports[2 * n + 1], logs, args))
                   for n in range(args.instances)]
        for server in servers:
            server.wait_ready(900, lambda line: None)
        upstreams = [Upstream.parse(server.spec.base_url) for server in servers]
        events = [f"tcp://127.0.0.1:{ports[2 * n + 1]}" for n in range(args.instances)]
        for policy in ("round_robin", "cache_aware"):
            router = CacheAwareRouter(upstreams, events) if policy == "cache_aware" else None
            proxy = serve(Proxy([], upstreams, 600.0, router=router), "127.0.0.1", 0)
            try:
                if router is not None:
                    wait_for_events(router, upstreams)
                results[policy] = replay(f"http://127.0.0.1:{proxy.server_address[1]}", records, policy, args)
            finally:
                proxy.shutdown()
            print(policy, results[policy], flush=True)
    date = datetime.date.today().isoformat()
    out = {"date": date, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)", "model": args.model,
           "trace": args.trace if "sample_trace" not in args.trace else f"make_sample_trace({args.sample}, seed 0)",
           "instances": args.instances, "requests": len(records),
           "block_tokens": args.block_tokens, "max_input_tokens": args.max_input_tokens,
           "engine_kv_mib": args.engine_kv_mib, "kvtier_memory_mib": args.memory_mib,
           "routing": results,
           "hit_rate_ratio": round(results["cache_aware"]["hit_rate"] / max(results["round_robin"]["hit_rate"], 1e-9), 2),
           "p2p": {"bytes_moved": None, "ttft_mean_s": None, "note": "peer-to-peer transfer is not built yet"}}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fleet_{date}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    plot(path)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
