"""Round-robin vs cache-aware routing (``kvtier proxy --events``) over a Mooncake-format trace.

Starts ``--instances`` vLLM-CPU servers with kvtier (memory tier) publishing KV events, then
replays the trace's first ``--requests`` records through ``kvtier proxy`` twice: round-robin, then
cache-aware. Each policy gets its own tokens (hash ids offset), so the second run finds nothing the
first one cached. Requests go one after the other (the trace's order, not its timing), streamed;
TTFT is the time to the first streamed chunk. Hit rate: ``cached_tokens`` over prompt tokens, from
the servers' own usage reports.

With ``--sharing``, instead: the same replay, round-robin (so a conversation's turns land on
different instances and must share), once on a fleet sharing through Redis (``remote.url``) and
once on a fleet sharing peer to peer (``p2p.listen`` + ``p2p.peers``, no Redis), each fleet
started fresh with a memory and a disk tier per instance; bytes moved: the entry bytes that
crossed the network, as the instances count them (``kvtier_wire_read_bytes_total`` +
``kvtier_wire_written_bytes_total`` of the remote tier: uploads to and reads from Redis; reads
from peers).

Usage: python benchmarks/fleet_routing_cpu.py [--model DIR] [--trace FILE | --sample 40] [--instances 2]
           [--requests 60] [--block-tokens 64] [--max-input-tokens 2048] [--engine-kv-mib 256]
           [--memory-mib 256] [--sharing]
Writes benchmarks/results/fleet_<date>.json (``routing``: ``round_robin`` and ``cache_aware``, each
with ``hit_rate``, ``ttft_mean_s``, ``ttft_p95_s``; with ``--sharing``: ``redis_sharing`` and
``p2p``, each with ``bytes_moved``, ``ttft_mean_s``, ``ttft_p95_s``, ``hit_rate``; a run keeps
what an earlier run of the same day wrote under the other keys) and a plot beside it (with
matplotlib). ``--plot FILE`` only redraws the plot of a results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
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


SECRET_ENV = "FLEET_BENCH_P2P_SECRET"


def start(model: str, name: str, port: int, events_port: int, logs: Path, args: argparse.Namespace,
          sharing: dict[str, object] | None = None) -> ServerProcess:
    """One server; ``sharing``: extra kvtier keys (a remote tier or peers), else KV events on ``events_port``."""
    config = {"memory.capacity": f"{args.memory_mib}MiB", "chunk_tokens": 256, **(sharing or {})}
    transfer = connector_config_json(None, config, "both")
    events = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}"})
    extra = ("--kv-events-config", events) if sharing is None else ()
    spec = ServerSpec(name=name, model=model, port=port,
                      engine_args=(*engine_args(args.engine_kv_mib << 20), "--kv-transfer-config", transfer, *extra),
                      env=(("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),), unset_env=("VLLM_CPU_KVCACHE_SPACE",),
                      log_path=str(logs / f"{name}.log"))
    return ServerProcess(spec, {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")})


def remote_counter(metrics_port: int, name: str) -> float:
    """One ``{tier="remote"}`` sample of an instance's kvtier metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f'{name}{{tier="remote"}} '):
                return float(line.split()[-1])
    return 0.0


def sharing_configs(mode: str, ports: list[int], redis_port: int, logs: Path) -> list[dict[str, object]]:
    """Per instance, the kvtier keys of ``mode``: its metrics port, its disk, and Redis or peers."""
    configs: list[dict[str, object]] = []
    for n, (metrics_port, peer_port) in enumerate(zip(ports[0::2], ports[1::2])):
        config: dict[str, object] = {"metrics.port": metrics_port, "disk.path": str(logs / f"{mode}-disk{n}")}
        if mode == "redis":
            config["remote.url"] = f"redis://127.0.0.1:{redis_port}/0"
        else:
            others = [f"127.0.0.1:{port}" for port in ports[1::2] if port != peer_port]
            config.update({"p2p.listen": f"127.0.0.1:{peer_port}", "p2p.peers": ",".join(others),
                           "p2p.key_env": SECRET_ENV})
        configs.append(config)
    return configs


def run_sharing(records: list[TraceRecord], logs: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Round-robin replays on a Redis-sharing fleet and on a P2P fleet, each started fresh."""
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        raise SystemExit("redis-server not found (scripts/bootstrap.sh --servers installs it)")
    os.environ[SECRET_ENV] = secrets.token_hex(32)  # the servers inherit it; never on a command line
    results: dict[str, dict[str, float]] = {}
    for mode in ("redis", "p2p"):
        ports = free_ports(3 * args.instances + 1)
        redis_port, server_ports, kvtier_ports = ports[0], ports[1:args.instances + 1], ports[args.instances + 1:]
        redis = subprocess.Popen([redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            configs = sharing_configs(mode, kvtier_ports, redis_port, logs)
            with ExitStack() as stack:
                servers = [stack.enter_context(start(args.model, f"{mode}{n}", server_ports[n], 0, logs, args,
                                                     configs[n])) for n in range(args.instances)]
                for server in servers:
                    server.wait_ready(900, lambda line: None)
                upstreams = [Upstream.parse(server.spec.base_url) for server in servers]
                proxy = serve(Proxy([], upstreams, 600.0), "127.0.0.1", 0)
                try:
                    result: dict[str, float] = replay(f"http://127.0.0.1:{proxy.server_address[1]}", records,
                                                      "round_robin", args)
                finally:
                    proxy.shutdown()
                time.sleep(1.0)  # the last uploads' counts reach the metrics
                metrics_ports = [int(str(config["metrics.port"])) for config in configs]
                result["bytes_moved"] = sum(remote_counter(port, name) for port in metrics_ports for name in
                                            ("kvtier_wire_read_bytes_total", "kvtier_wire_written_bytes_total"))
                result["remote_hits_chunks"] = sum(remote_counter(port, "kvtier_hits_total") for port in metrics_ports)
        finally:
            redis.terminate()
            redis.wait()
        results["redis_sharing" if mode == "redis" else "p2p"] = result
        print(mode, result, flush=True)
    return results


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
    """Hit rate and TTFT (mean, p95) per routing policy and, when measured, TTFT and bytes moved of
    Redis vs P2P sharing, beside the results file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results_path.read_text())
    sharing = [mode for mode in ("redis_sharing", "p2p") if (data.get(mode) or {}).get("ttft_mean_s") is not None]
    panels = (2 if "routing" in data else 0) + (2 if sharing else 0)
    figure, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.5), squeeze=False)
    column = iter(axes[0])
    if "routing" in data:
        policies = ["round_robin", "cache_aware"]
        hits, ttft = next(column), next(column)
        hits.bar(policies, [data["routing"][p]["hit_rate"] for p in policies], color=["#999999", "#2a7ab0"])
        hits.set_ylabel("prefix hit rate (cached / prompt tokens)")
        hits.set_ylim(0, 1)
        _ttft_bars(ttft, policies, [data["routing"][p] for p in policies])
        hits.set_title(f"routing: {data['instances']} instances, {data['requests']} requests", fontsize=9)
    if sharing:
        ttft, moved = next(column), next(column)
        _ttft_bars(ttft, sharing, [data[mode] for mode in sharing])
        moved.bar(sharing, [data[mode]["bytes_moved"] / 2**20 for mode in sharing], color=["#999999", "#2a7ab0"])
        moved.set_ylabel("KV bytes over the network (MiB)")
        setup = data.get("sharing_setup", {})
        moved.set_title(f"sharing (round-robin): {setup.get('instances')} instances", fontsize=9)
    about = data if "model" in data else data.get("sharing_setup", {})  # a --sharing run alone has no routing keys
    figure.suptitle(f"vLLM-CPU fleet, {str(about.get('model', '?')).split('/')[-1]}, {about.get('machine', '?')}")
    figure.tight_layout()
    figure.savefig(results_path.with_suffix(".png"), dpi=100)
    plt.close(figure)


def _ttft_bars(axis, names: list[str], results: list[dict]) -> None:  # type: ignore[no-untyped-def]
    positions = range(len(names))
    for offset, key, label in ((-0.2, "ttft_mean_s", "mean"), (0.2, "ttft_p95_s", "p95")):
        axis.bar([x + offset for x in positions], [result[key] for result in results], width=0.4, label=label)
    axis.set_xticks(list(positions), names)
    axis.set_ylabel("TTFT (s)")
    axis.set_ylim(0, 1.3 * max(result["ttft_p95_s"] for result in results))  # room for the legend above the bars
    axis.legend(loc="upper center", ncol=2)


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
    parser.add_argument("--sharing", action="store_true",
                        help="compare sharing through Redis with peer-to-peer sharing (round-robin) instead of "
                             "comparing routing policies")
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
    date = datetime.date.today().isoformat()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fleet_{date}.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    common = {"date": date, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)", "model": args.model,
              "trace": args.trace if "sample_trace" not in args.trace else f"make_sample_trace({args.sample}, seed 0)",
              "requests": len(records), "block_tokens": args.block_tokens, "max_input_tokens": args.max_input_tokens,
              "engine_kv_mib": args.engine_kv_mib, "kvtier_memory_mib": args.memory_mib}
    if args.sharing:
        out.update(run_sharing(records, logs, args))
        out["sharing_setup"] = {**common, "instances": args.instances, "routing": "round_robin",
                                "command": " ".join(["benchmarks/fleet_routing_cpu.py", *sys.argv[1:]])}
    else:
        out.update(common)
        out["instances"] = args.instances
        out.update(run_routing(records, logs, args))
    path.write_text(json.dumps(out, indent=2) + "\n")
    plot(path)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def run_routing(records: list[TraceRecord], logs: Path, args: argparse.Namespace) -> dict[str, object]:
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
    ratio = round(results["cache_aware"]["hit_rate"] / max(results["round_robin"]["hit_rate"], 1e-9), 2)
    return {"routing": results, "hit_rate_ratio": ratio}


if __name__ == "__main__":
    sys.exit(main())
