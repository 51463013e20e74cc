"""Cost view math and price parsing; configurations and CPU-time reading of ``kvtier bench``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvtier.bench.configs import (BenchConfig, RemoteOptions, all_configs, kvtier_inline_keys, select_configs,
                                  server_spec)
from kvtier.bench.cost import DEFAULT_PRICES, Prices, cost_view, load_prices, parse_prices
from kvtier.bench.cputime import _proc_tree_cpu_s, parse_proc_stat, process_tree_cpu_s
from kvtier.config import is_namespace
from kvtier.errors import ConfigError

PRICES = Prices(gpu_hour=3.6, storage_gb_month=0.73, transfer_gb=0.02, retention_hours=10.0, source="test")


def test_cost_view_per_million_requests() -> None:
    # 0.5 s saved per request; 2 MB stored and 1 MB moved per request
    view = cost_view(1.5, 1.0, stored_bytes_per_request=2e6, network_bytes_per_request=1e6, prices=PRICES)
    assert view.compute_saving_per_million == pytest.approx(0.5 * 1e6 / 3600 * 3.6)  # 500.0
    # 2e6 B x 1e6 requests = 2,000 GB kept 10 h of a 730 h month at 0.73 per GB-month
    assert view.storage_cost_per_million == pytest.approx(2000 * 0.73 * 10 / 730)  # 20.0
    assert view.transfer_cost_per_million == pytest.approx(1000 * 0.02)  # 20.0
    assert view.net_saving_per_million == pytest.approx(460.0)


def test_cost_view_shows_a_loss() -> None:
    view = cost_view(1.0, 1.1, stored_bytes_per_request=0.0, network_bytes_per_request=0.0, prices=PRICES)
    assert view.net_saving_per_million == pytest.approx(-100.0)


def test_prices_from_yaml_json_and_flags(tmp_path: Path) -> None:
    assert parse_prices("gpu_hour: 4\ntransfer_gb: 0", "f") == {"gpu_hour": 4.0, "transfer_gb": 0.0}
    assert parse_prices('{"storage_gb_month": 0.1}', "f") == {"storage_gb_month": 0.1}
    path = tmp_path / "prices.yaml"
    path.write_text("gpu_hour: 4\nstorage_gb_month: 0.05\n")
    prices = load_prices(str(path), {"gpu_hour": 5.0})
    assert (prices.gpu_hour, prices.storage_gb_month, prices.transfer_gb) == (5.0, 0.05, DEFAULT_PRICES["transfer_gb"])
    assert str(path) in prices.source and "--gpu-hour" in prices.source
    assert "example defaults" in load_prices(None, {}).source


@pytest.mark.parametrize("text, match", [("gpu_hours: 1", "unknown price"), ("gpu_hour: -1", ">= 0"),
                                         ("gpu_hour: cheap", ">= 0"), ("- 1", "mapping"), ("a: [", "not YAML")])
def test_bad_prices_name_the_key(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_prices(text, "prices.yaml")


def test_missing_price_file() -> None:
    with pytest.raises(ConfigError, match="--prices"):
        load_prices("/nonexistent/prices.yaml", {})


def test_configurations() -> None:
    names = [c.name for c in all_configs("1GiB", RemoteOptions(None, None, None))]
    assert names == ["vllm", "kvtier-memory", "kvtier-memory+disk"]
    configs = all_configs("1GiB", RemoteOptions("redis://h:1/0", "s3://b/p", "http://h:2"))
    s3 = configs[-1]
    assert [c.name for c in configs][3:] == ["kvtier-memory+redis", "kvtier-memory+redis+cachegen", "kvtier-memory+s3"]
    assert ("remote.compression", "cachegen") in (configs[4].kvtier_keys or ())
    assert [c.name for c in select_configs(configs, None)][3:] == ["kvtier-memory+redis", "kvtier-memory+s3"]  # lossy: named only
    assert [c.name for c in select_configs(configs, ["kvtier-memory+redis+cachegen"])] == ["kvtier-memory+redis+cachegen"]
    assert s3.kvtier_keys is not None and ("remote.s3_endpoint", "http://h:2") in s3.kvtier_keys
    assert [c.name for c in select_configs(configs, ["kvtier-memory", "vllm"])] == ["vllm", "kvtier-memory"]
    with pytest.raises(ConfigError, match="kvtier-memory\\+redis"):
        select_configs(configs[:3], ["kvtier-memory+redis"])


def test_inline_keys_and_server_environment() -> None:
    memory, disk = all_configs("2GiB", RemoteOptions(None, None, None))[1:3]
    assert kvtier_inline_keys(memory, 9000, "/d", "ns") == {"memory.capacity": "2GiB", "metrics.port": 9000,
                                                             "namespace": "ns-kvtier-memory"}
    # configurations sharing a remote store never read each other's KV; the name is a valid namespace
    redis, cachegen = all_configs("2GiB", RemoteOptions("redis://h:1/0", None, None))[3:5]
    names = {kvtier_inline_keys(c, 9000, "/d", "bench-1a2b")["namespace"] for c in (redis, cachegen)}
    assert names == {"bench-1a2b-kvtier-memory.redis", "bench-1a2b-kvtier-memory.redis.cachegen"}
    assert all(is_namespace(name) for name in names)
    assert kvtier_inline_keys(disk, 9000, "/d", "ns")["disk.path"] == "/d"
    environ = {"KVTIER_MEMORY_CAPACITY": "8GiB", "KVTIER_REMOTE_PASSWORD": "p", "HOME": "/h"}
    spec = server_spec(BenchConfig("vllm", None), "/m", 8000, 1 << 20, None, "/l.log", environ)
    assert "KVTIER_MEMORY_CAPACITY" in spec.unset_env and "VLLM_CPU_KVCACHE_SPACE" in spec.unset_env
    assert "KVTIER_REMOTE_PASSWORD" not in spec.unset_env  # credentials may live in the environment
    assert "--kv-transfer-config" not in spec.engine_args and str(1 << 20) in spec.engine_args


def test_proc_stat_parsing_and_cpu_of_this_process() -> None:
    line = "42 (a (weird) name) S 7 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 0 0"
    assert parse_proc_stat(line) == (7, 300)
    assert parse_proc_stat("garbage") is None
    sum(range(2_000_000))  # spend a little CPU
    assert (process_tree_cpu_s(os.getpid()) or 0) > 0
    assert (_proc_tree_cpu_s(os.getpid()) or 0) > 0
    assert process_tree_cpu_s(2**22 + 12345) is None  # no such process
