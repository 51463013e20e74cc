"""Disaggregated prefill over HTTP: a prefill server (kv_producer), a decode server (kv_consumer),
a real Redis between them (or nothing: peer to peer) and ``kvtier proxy`` in front; a client talks
to the proxy only.

The decode server must load every chunk of the prompt that the prefill server computed (its
remote hits and handoff counter say so) and answer exactly as a single server with the prompt in
its own prefix cache does (the oracle).
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from kvtier.bench.configs import engine_args
from kvtier.bench.server import ServerProcess, ServerSpec, free_ports
from kvtier.proxy import Proxy, Upstream, serve
from kvtier.serve import connector_config_json
from tests.e2e.engines import metric
from tests.e2e.test_vllm_connector import CHUNK, P, S2
from tests.servers import fresh_redis, port_of  # noqa: F401  (fixtures)
from tests.servers import ServerProcess as RedisProcess

pytestmark = pytest.mark.e2e
ENGINE_KV_BYTES = 64 << 20


def server(model: str, role: str, port: int, metrics_port: int, redis_url: str | None, logs: Path,
           sharing: dict[str, object] | None = None) -> ServerProcess:
    """A server sharing through ``redis_url``, or through ``sharing`` (p2p keys) when it is None."""
    config = {"memory.capacity": "64MiB", "metrics.port": metrics_port, "chunk_tokens": CHUNK,
              **({"remote.url": redis_url} if redis_url is not None else sharing or {})}
    transfer = connector_config_json(None, config, role)
    spec = ServerSpec(name=role, model=model, port=port, engine_args=(*engine_args(ENGINE_KV_BYTES),
                                                                       "--kv-transfer-config", transfer),
                      env=(("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),), unset_env=("VLLM_CPU_KVCACHE_SPACE",),
                      log_path=str(logs / f"{role}.log"))
    return ServerProcess(spec, {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")})


def complete(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_proxy_prefills_on_one_server_and_decodes_on_the_other(tiny_model: str, fresh_redis: RedisProcess,
                                                               tmp_path: Path) -> None:
    redis_url = f"redis://127.0.0.1:{port_of(fresh_redis)}/0"
    check_disaggregated(tiny_model, tmp_path, redis_url, None, None)


def test_proxy_disaggregates_peer_to_peer_without_redis(tiny_model: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill server serves its chunks to peers (``p2p.listen``, its disk tier); the decode
    server fetches them from it (``p2p.peers``). No Redis anywhere."""
    monkeypatch.setenv("P2P_TEST_SECRET", "ef" * 32)  # both servers inherit it
    peer = f"127.0.0.1:{free_ports(1)[0]}"
    check_disaggregated(tiny_model, tmp_path, None,
                        {"p2p.listen": peer, "disk.path": str(tmp_path / "disk"), "p2p.key_env": "P2P_TEST_SECRET"},
                        {"p2p.peers": peer, "p2p.key_env": "P2P_TEST_SECRET"})


def check_disaggregated(tiny_model: str, tmp_path: Path, redis_url: str | None,
                        prefill_p2p: dict[str, object] | None, decode_p2p: dict[str, object] | None) -> None:
    prefill_port, decode_port, prefill_metrics, decode_metrics = free_ports(4)
    with server(tiny_model, "producer", prefill_port, prefill_metrics, redis_url, tmp_path, prefill_p2p) as prefill, \
            server(tiny_model, "consumer", decode_port, decode_metrics, redis_url, tmp_path, decode_p2p) as decode:
        for process in (prefill, decode):
            process.wait_ready(600, lambda line: None)
        proxy = serve(Proxy([Upstream.parse(prefill.spec.base_url)], [Upstream.parse(decode.spec.base_url)], 300),
                      "127.0.0.1", 0)
        try:
            body = {"model": tiny_model, "prompt": P + S2, "max_tokens": 8, "temperature": 0.0, "logprobs": 1}
            answer = complete(f"http://127.0.0.1:{proxy.server_address[1]}", body)
        finally:
            proxy.shutdown()
        oracle = complete(prefill.spec.base_url, body)  # the prompt is in the prefill server's own cache
        decode_text, prefill_text = metrics_text(decode_metrics), metrics_text(prefill_metrics)
    assert answer["choices"][0]["text"] == oracle["choices"][0]["text"]
    ours, theirs = (r["choices"][0]["logprobs"]["token_logprobs"] for r in (answer, oracle))
    assert all(abs(a - b) < 1e-3 for a, b in zip(ours, theirs))
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 4 * CHUNK
    assert metric(decode_text, "kvtier_hits_total", "remote") == 4  # the prompt's chunks came from the prefill
    assert 'kvtier_handoffs_total{outcome="complete"} 1.0' in decode_text.splitlines()
    assert metric(prefill_text, "kvtier_hits_total", "remote") == 0
