"""The deployment examples in deploy/ carry configs kvtier accepts.

Each example's ``--kv-transfer-config`` is read as vLLM would (JSON), its file mount is mapped back
to the repository's file, its environment is the container's (plus, on Kubernetes, the
service-link variables Kubernetes injects for the Service ``kvtier-redis``), and the whole goes
through kvtier's own config loader: what start-up would refuse, the test refuses.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kvtier.config import LoadedConfig, load_config
from kvtier.integrations.vllm.plugin import CONNECTOR_NAME

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CONFIG_MOUNT = "/etc/kvtier/kvtier.yaml"


def transfer_config(args: list[str]) -> dict:
    """vLLM's ``--kv-transfer-config`` among ``args``, parsed."""
    value = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert value["kv_connector"] == CONNECTOR_NAME and "kv_connector_module_path" not in value
    assert value["kv_role"] == "kv_both"
    return value


def load(transfer: dict, environ: dict[str, str]) -> LoadedConfig:
    """kvtier's config as the connector loads it, the mounted file mapped to deploy/kvtier.yaml."""
    inline = dict(transfer["kv_connector_extra_config"])
    assert inline.pop("config") == CONFIG_MOUNT
    return load_config({**inline, "config": str(DEPLOY / "kvtier.yaml")}, environ)


def test_docker_compose() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"vllm", "redis", "prometheus", "grafana"} <= set(services)
    vllm = services["vllm"]
    assert f"./kvtier.yaml:{CONFIG_MOUNT}:ro" in vllm["volumes"]
    args = [arg.replace("${MODEL:-Qwen/Qwen2.5-7B-Instruct}", "Qwen/Qwen2.5-7B-Instruct") for arg in vllm["command"]]
    loaded = load(transfer_config(args), {k: str(v) for k, v in vllm["environment"].items()})
    assert not loaded.warnings
    assert loaded.config.remote.url == "redis://redis:6379/0" and loaded.sources["remote.url"] == "env:KVTIER_REMOTE_URL"
    assert loaded.config.admin.port == 0
    block_size = int(args[args.index("--block-size") + 1])
    assert loaded.config.chunk_tokens % block_size == 0
    assert loaded.config.disk.path in {volume.split(":")[1] for volume in vllm["volumes"]}
    # Prometheus scrapes vLLM's port; Grafana is provisioned with the dashboard this repository holds
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["vllm:8000"]
    assert "./grafana/kvtier.json:/var/lib/grafana/dashboards/kvtier.json:ro" in services["grafana"]["volumes"]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "kvtier.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_kubernetes_manifests() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "kvtier-vllm.yaml").read_text()))
    by_kind_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    config_map = by_kind_name[("ConfigMap", "kvtier-config")]
    assert config_map["data"]["kvtier.yaml"] == (DEPLOY / "kvtier.yaml").read_text()
    assert ("Service", "kvtier-redis") in by_kind_name
    pod = by_kind_name[("Deployment", "vllm")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["kvtier-config"] + "/kvtier.yaml" == CONFIG_MOUNT
    environ = {item["name"]: item["value"] for item in container["env"]}
    # what Kubernetes adds for the Service kvtier-redis: ignored by kvtier, not a failed start
    environ |= {"KVTIER_REDIS_SERVICE_HOST": "10.0.0.7", "KVTIER_REDIS_SERVICE_PORT": "6379",
                "KVTIER_REDIS_PORT": "tcp://10.0.0.7:6379", "KVTIER_REDIS_PORT_6379_TCP": "tcp://10.0.0.7:6379",
                "KVTIER_REDIS_PORT_6379_TCP_ADDR": "10.0.0.7"}
    loaded = load(transfer_config(container["args"]), environ)
    config = loaded.config
    assert config.remote.url == "redis://kvtier-redis:6379/0"
    assert config.memory.capacity_bytes == 32 << 30 and loaded.sources["memory.capacity"] == "env:KVTIER_MEMORY_CAPACITY"
    assert config.disk.path == mounts["kvtier-disk"]
    assert config.admin.tokens_file == f"{mounts['kvtier-admin-tokens']}/admin-tokens"
    secret = by_kind_name[("Secret", "kvtier-admin-tokens")]
    assert "admin-tokens" in secret["stringData"]
    # probes: vLLM's /health on its port, kvtier's token-free /livez on the admin port
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["kvtier-admin"] == config.admin.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "kvtier-admin"}
    assert config.admin.host == "0.0.0.0"  # the kubelet probes the pod's address


def test_production_stack_helm_values() -> None:
    values = yaml.safe_load((DEPLOY / "helm" / "values-production-stack.yaml").read_text())
    engine = values["servingEngineSpec"]
    model = engine["modelSpec"][0]
    assert model["lmcacheConfig"]["enabled"] is False  # the chart adds no connector of its own
    args = model["vllmConfig"]["extraArgs"]
    mounts = {mount["name"]: mount["mountPath"] for mount in model["extraVolumeMounts"]}
    assert mounts["kvtier-config"] + "/kvtier.yaml" == CONFIG_MOUNT
    assert {volume["name"] for volume in model["extraVolumes"]} == set(mounts)
    loaded = load(transfer_config(args), {item["name"]: item["value"] for item in model["env"]})
    config = loaded.config
    assert config.chunk_tokens % int(args[args.index("--block-size") + 1]) == 0
    assert config.memory.capacity_bytes == 32 << 30
    assert config.disk.path == mounts["kvtier-disk"]
    assert config.admin.tokens_file == f"{mounts['kvtier-admin-tokens']}/admin-tokens"
    assert engine["livenessProbe"]["httpGet"] == {"path": "/livez", "port": config.admin.port}
    assert engine["readinessProbe"]["httpGet"] == {"path": "/health", "port": engine["containerPort"]}
