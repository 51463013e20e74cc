"""kvtier.config: defaults, the four layers and their order, sizes, errors, sources, describe."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.config import (AdminConfig, DiskConfig, EncryptionConfig, KVTierConfig, LoadedConfig, MemoryConfig,
                           MetricsConfig, NamespaceLimits, RemoteConfig, describe, load_config,
                           parse_namespace_limits, parse_size)
from kvtier.errors import ConfigError

GIB = 2**30
ALL_KEYS = ["chunk_tokens", "namespace", "model_id", "store_decode_tokens", "memory.capacity",
            "memory.policy", "memory.kv_format", "memory.load_layer_groups", "disk.path", "disk.capacity", "disk.write_policy", "disk.queue_depth",
            "metrics.port", "metrics.host"]
REMOTE_KEYS = ["remote.url", "remote.ttl", "remote.timeout_ms", "remote.queue_depth", "remote.username",
               "remote.password", "remote.tls_ca", "remote.tls_cert", "remote.tls_key", "remote.s3_endpoint", "remote.s3_region", "remote.access_key",
               "remote.secret_key", "remote.compression", "remote.compression_bits", "remote.handoff_wait_ms",
               "remote.cost_gate"]
DEFAULT_REMOTE = RemoteConfig(url=None, ttl_s=86400, timeout_ms=2000, queue_depth=64, username=None, password=None,
                              tls_ca=None, tls_cert=None, tls_key=None, s3_endpoint=None, s3_region=None, access_key=None, secret_key=None,
                              compression="none", compression_bits=6, handoff_wait_ms=3000, cost_gate=True)
ENCRYPTION_KEYS = ["encryption.key_file", "encryption.key_env"]
DEFAULT_ENCRYPTION = EncryptionConfig(key_file=None, key_env=None)
ADMIN_KEYS = ["admin.port", "admin.host", "admin.tokens_file", "admin.audit_log"]
DEFAULT_ADMIN = AdminConfig(port=0, host="127.0.0.1", tokens_file=None, audit_log=None)
SIGNING_KEYS = ["signing.key_file", "signing.key_env", "signing.unsigned"]
ADMISSION_KEYS = ["admission.policy", "admission.min_reuse_percent", "admission.window"]
P2P_KEYS = ["p2p.listen", "p2p.advertise", "p2p.peers", "p2p.registry", "p2p.heartbeat_ttl", "p2p.key_file",
            "p2p.key_env"]
UNSET_KEYS = ["no_cache_namespaces", "namespace_limits"] + REMOTE_KEYS + ENCRYPTION_KEYS + ADMIN_KEYS + SIGNING_KEYS \
    + P2P_KEYS + ADMISSION_KEYS  # the keys the "every key" tests below leave at their defaults


def load(inline: Mapping[str, object] | None = None, env: Mapping[str, str] | None = None) -> LoadedConfig:
    return load_config(inline or {}, env or {})


def write_yaml(tmp_path: Path, text: str, name: str = "kvtier.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def config_error(inline: Mapping[str, object] | None = None,
                 env: Mapping[str, str] | None = None) -> ConfigError:
    """The ConfigError that loading raises (the test fails if it raises none)."""
    with pytest.raises(ConfigError) as info:
        load(inline, env)
    return info.value


# ---- defaults -------------------------------------------------------------------------------------

def test_defaults() -> None:
    loaded = load()
    assert loaded.config == KVTierConfig(
        chunk_tokens=256, namespace="default", model_id="", no_cache_namespaces="", store_decode_tokens=False,
        memory=MemoryConfig(capacity_bytes=2 * GIB, policy="s3fifo", kv_format="exact"),
        disk=DiskConfig(path=None, capacity_bytes=16 * GIB, write_policy="write_through", queue_depth=256),
        metrics=MetricsConfig(port=0, host="127.0.0.1"), remote=DEFAULT_REMOTE,
        encryption=DEFAULT_ENCRYPTION, admin=DEFAULT_ADMIN, namespace_limits={},
    )
    assert loaded.sources == dict.fromkeys(ALL_KEYS + UNSET_KEYS, "default")


def test_config_is_frozen() -> None:
    config = load().config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.chunk_tokens = 16  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.memory.capacity_bytes = 1  # type: ignore[misc]


# ---- the YAML file --------------------------------------------------------------------------------

FILE_TEXT = """
chunk_tokens: 512
namespace: team-a.prod_1
model_id: my-model
store_decode_tokens: true
memory:
  capacity: 1GiB
  policy: lru
  kv_format: int8
  load_layer_groups: 2
disk:
  path: /var/cache/kvtier
  capacity: 100 GB
  write_policy: write_through
  queue_depth: 8
metrics:
  port: 9400
  host: 0.0.0.0
"""


def test_file_named_inline_sets_every_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, FILE_TEXT)
    loaded = load({"config": path})
    assert loaded.config == KVTierConfig(
        chunk_tokens=512, namespace="team-a.prod_1", model_id="my-model", no_cache_namespaces="",
        store_decode_tokens=True,
        memory=MemoryConfig(capacity_bytes=GIB, policy="lru", kv_format="int8", load_layer_groups=2),
        disk=DiskConfig(path="/var/cache/kvtier", capacity_bytes=100 * 10**9, write_policy="write_through",
                        queue_depth=8),
        metrics=MetricsConfig(port=9400, host="0.0.0.0"), remote=DEFAULT_REMOTE,
        encryption=DEFAULT_ENCRYPTION, admin=DEFAULT_ADMIN, namespace_limits={},
    )
    assert loaded.sources == {**dict.fromkeys(ALL_KEYS, f"file:{path}"), **dict.fromkeys(UNSET_KEYS, "default")}


def test_file_named_by_env(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "chunk_tokens: 64\n")
    loaded = load(env={"KVTIER_CONFIG": path})
    assert loaded.config.chunk_tokens == 64
    assert loaded.sources["chunk_tokens"] == f"file:{path}"


def test_inline_file_wins_over_env_file(tmp_path: Path) -> None:
    inline_path = write_yaml(tmp_path, "chunk_tokens: 64\n", "a.yaml")
    env_path = write_yaml(tmp_path, "chunk_tokens: 32\n", "b.yaml")
    assert load({"config": inline_path}, {"KVTIER_CONFIG": env_path}).config.chunk_tokens == 64


def test_relative_file_path_is_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_yaml(tmp_path, "chunk_tokens: 64\n")
    monkeypatch.chdir(tmp_path)
    loaded = load({"config": "kvtier.yaml"})
    assert loaded.sources["chunk_tokens"] == f"file:{os.path.join(str(tmp_path), 'kvtier.yaml')}"


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    loaded = load({"config": write_yaml(tmp_path, text)})
    assert loaded.config == load().config
    assert set(loaded.sources.values()) == {"default"}


def test_empty_config_path_means_no_file() -> None:
    assert load({"config": ""}, {"KVTIER_CONFIG": ""}).config == load().config


# ---- inline keys (kv_connector_extra_config) ------------------------------------------------------

def test_inline_nested_and_dotted_keys() -> None:
    loaded = load({"memory": {"capacity": "1GiB"}, "disk.path": "/tmp/kv", "disk": {"queue_depth": 4},
                   "chunk_tokens": 128})
    assert loaded.config.memory.capacity_bytes == GIB
    assert loaded.config.disk.path == "/tmp/kv"
    assert loaded.config.disk.queue_depth == 4
    assert loaded.config.chunk_tokens == 128
    for key in ("memory.capacity", "disk.path", "disk.queue_depth", "chunk_tokens"):
        assert loaded.sources[key] == "extra_config"
    assert loaded.sources["memory.policy"] == "default"


def test_inline_key_given_nested_and_dotted_is_an_error() -> None:
    error = config_error({"memory": {"capacity": "1GiB"}, "memory.capacity": "2GiB"})
    assert error.key == "memory.capacity"
    assert "given twice" in str(error)


@pytest.mark.parametrize("path", [None, ""])
def test_empty_disk_path_means_off(path: str | None) -> None:
    loaded = load({"disk": {"path": path}})
    assert loaded.config.disk.path is None
    assert loaded.sources["disk.path"] == "extra_config"


# ---- environment variables ------------------------------------------------------------------------

def test_env_sets_every_key() -> None:
    env = {"KVTIER_CHUNK_TOKENS": "512", "KVTIER_NAMESPACE": "t1", "KVTIER_MODEL_ID": "m",
           "KVTIER_STORE_DECODE_TOKENS": "yes", "KVTIER_MEMORY_CAPACITY": "512MiB",
           "KVTIER_MEMORY_POLICY": "lru", "KVTIER_MEMORY_KV_FORMAT": "int8", "KVTIER_MEMORY_LOAD_LAYER_GROUPS": "8", "KVTIER_DISK_PATH": "/d", "KVTIER_DISK_CAPACITY": "1.5GB",
           "KVTIER_DISK_WRITE_POLICY": "write_through", "KVTIER_DISK_QUEUE_DEPTH": "16",
           "KVTIER_METRICS_PORT": "9400", "KVTIER_METRICS_HOST": "::1"}
    loaded = load(env=env)
    assert loaded.config == KVTierConfig(
        chunk_tokens=512, namespace="t1", model_id="m", no_cache_namespaces="", store_decode_tokens=True,
        memory=MemoryConfig(capacity_bytes=512 * 2**20, policy="lru", kv_format="int8", load_layer_groups=8),
        disk=DiskConfig(path="/d", capacity_bytes=1_500_000_000, write_policy="write_through",
                        queue_depth=16),
        metrics=MetricsConfig(port=9400, host="::1"), remote=DEFAULT_REMOTE,
        encryption=DEFAULT_ENCRYPTION, admin=DEFAULT_ADMIN, namespace_limits={},
    )
    assert loaded.sources == {**{key: f"env:KVTIER_{key.replace('.', '_').upper()}" for key in ALL_KEYS},
                              **dict.fromkeys(UNSET_KEYS, "default")}


def test_remote_keys_from_env_and_secrets_never_shown() -> None:
    env = {"KVTIER_REMOTE_URL": "rediss://cache:6380/0", "KVTIER_REMOTE_TTL": "0",
           "KVTIER_REMOTE_TIMEOUT_MS": "500", "KVTIER_REMOTE_PASSWORD": "hunter2",
           "KVTIER_REMOTE_SECRET_KEY": "s3cret", "KVTIER_REMOTE_S3_REGION": "eu-west-1"}
    loaded = load(env=env)
    remote = loaded.config.remote
    assert (remote.url, remote.ttl_s, remote.timeout_ms) == ("rediss://cache:6380/0", 0, 500)
    assert (remote.password, remote.secret_key, remote.s3_region) == ("hunter2", "s3cret", "eu-west-1")
    shown = {key: value for key, value, _ in describe(loaded)}
    assert shown["remote.password"] == shown["remote.secret_key"] == '"***"'
    assert "hunter2" not in str(describe(loaded))
    assert load().config.remote == DEFAULT_REMOTE


def test_encryption_keys_from_file_and_env(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "encryption:\n  key_file: /etc/kvtier/master.key\n")
    loaded = load({"config": path})
    assert loaded.config.encryption == EncryptionConfig(key_file="/etc/kvtier/master.key", key_env=None)
    assert loaded.sources["encryption.key_file"] == f"file:{path}"
    loaded = load(env={"KVTIER_ENCRYPTION_KEY_ENV": "KV_MASTER_KEY"})
    assert loaded.config.encryption == EncryptionConfig(key_file=None, key_env="KV_MASTER_KEY")
    assert loaded.sources["encryption.key_env"] == "env:KVTIER_ENCRYPTION_KEY_ENV"
    assert load({"encryption": {"key_file": "", "key_env": ""}}).config.encryption == DEFAULT_ENCRYPTION


@pytest.mark.parametrize(("name", "reason"), [
    ("KVTIER_MASTER_KEY", "must not start with KVTIER_"), ("MY-KEY", "environment variable name"),
    ("1KEY", "environment variable name"), (42, "expected a string"),
])
def test_encryption_key_env_must_be_a_usable_name(name: object, reason: str) -> None:
    error = config_error({"encryption.key_env": name})
    assert error.key == "encryption.key_env"
    assert reason in str(error) and "extra_config" in str(error)


def test_encryption_key_file_and_key_env_are_exclusive() -> None:
    error = config_error({"encryption": {"key_file": "/k", "key_env": "K"}})
    assert error.key == "encryption.key_env"
    assert "only one of" in str(error)


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), (" Yes ", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("NO", False),
])
def test_env_bool_words(text: str, expected: bool) -> None:
    assert load(env={"KVTIER_STORE_DECODE_TOKENS": text}).config.store_decode_tokens is expected


def test_env_empty_disk_path_turns_disk_off() -> None:
    loaded = load({"disk": {"path": "/d"}}, {"KVTIER_DISK_PATH": ""})
    assert loaded.config.disk.path is None
    assert loaded.sources["disk.path"] == "env:KVTIER_DISK_PATH"


def test_unrelated_env_vars_are_ignored() -> None:
    assert load(env={"HOME": "/root", "KVTIERX": "1", "VLLM_X": "1"}).config == load().config


# ---- precedence -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("layers", "capacity_bytes", "source"), [
    ({"file", "inline", "env"}, 4 * GIB, "env:KVTIER_MEMORY_CAPACITY"),
    ({"file", "inline"}, 3 * GIB, "extra_config"),
    ({"file"}, 1 * GIB, "file"),
    (set(), 2 * GIB, "default"),
])
def test_precedence_default_file_inline_env(tmp_path: Path, layers: set[str], capacity_bytes: int,
                                            source: str) -> None:
    path = write_yaml(tmp_path, "memory:\n  capacity: 1GiB\n")
    inline: dict[str, object] = {"config": path} if "file" in layers else {}
    if "inline" in layers:
        inline["memory.capacity"] = "3GiB"
    env = {"KVTIER_MEMORY_CAPACITY": "4GiB"} if "env" in layers else {}
    loaded = load(inline, env)
    assert loaded.config.memory.capacity_bytes == capacity_bytes
    assert loaded.sources["memory.capacity"] == (f"file:{path}" if source == "file" else source)


def test_env_over_inline_without_file() -> None:
    loaded = load({"chunk_tokens": 64}, {"KVTIER_CHUNK_TOKENS": "32"})
    assert loaded.config.chunk_tokens == 32
    assert loaded.sources["chunk_tokens"] == "env:KVTIER_CHUNK_TOKENS"


def test_bad_value_in_an_overridden_layer_is_still_an_error() -> None:
    error = config_error({"chunk_tokens": "abc"}, {"KVTIER_CHUNK_TOKENS": "32"})
    assert error.key == "chunk_tokens"
    assert "extra_config" in str(error)


# ---- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("inline", "key", "suggestion"), [
    ({"chunk_token": 16}, "chunk_token", "chunk_tokens"),
    ({"memroy": {"capacity": 1}}, "memroy", "memory"),
    ({"memory": {"capasity": 1}}, "memory.capasity", "memory.capacity"),
    ({"disk.write_polcy": "spill"}, "disk.write_polcy", "disk.write_policy"),
    ({"zzz": 1}, "zzz", None),
])
def test_unknown_inline_key(inline: dict[str, object], key: str, suggestion: str | None) -> None:
    error = config_error(inline)
    assert error.key == key
    assert "unknown key" in str(error) and "extra_config" in str(error)
    if suggestion is None:
        assert "did you mean" not in str(error)
    else:
        assert f"did you mean {suggestion!r}" in str(error)


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "metrics:\n  prot: 9400\n")
    error = config_error({"config": path})
    assert error.key == "metrics.prot"
    assert f"file:{path}" in str(error)
    assert "did you mean 'metrics.port'" in str(error)


def test_unknown_env_var_is_a_warning_not_a_failed_start() -> None:
    loaded = load(env={"KVTIER_MEMORY_CAPACTY": "1GiB"})
    assert loaded.config == load().config
    [warning] = loaded.warnings
    assert "KVTIER_MEMORY_CAPACTY" in warning and "did you mean 'KVTIER_MEMORY_CAPACITY'" in warning


def test_kubernetes_service_links_are_ignored() -> None:
    # what a Service named kvtier-redis (and one named kvtier) inject into every pod
    env = {"KVTIER_REDIS_SERVICE_HOST": "10.0.0.11", "KVTIER_REDIS_SERVICE_PORT": "6379",
           "KVTIER_REDIS_PORT": "tcp://10.0.0.11:6379", "KVTIER_REDIS_PORT_6379_TCP": "tcp://10.0.0.11:6379",
           "KVTIER_REDIS_PORT_6379_TCP_PROTO": "tcp", "KVTIER_REDIS_PORT_6379_TCP_PORT": "6379",
           "KVTIER_REDIS_PORT_6379_TCP_ADDR": "10.0.0.11", "KVTIER_SERVICE_HOST": "10.0.0.12",
           "KVTIER_PORT": "tcp://10.0.0.12:9464", "KVTIER_SERVICE_PORT_METRICS": "9464",
           "KVTIER_MEMORY_CAPACITY": "4Gi"}
    loaded = load(env=env)
    assert loaded.warnings == ()
    assert loaded.config.memory.capacity_bytes == 4 * GIB


def test_a_service_link_that_collides_with_a_key_is_skipped_with_a_warning() -> None:
    # a Service named kvtier-metrics injects KVTIER_METRICS_PORT=tcp://...: not a port number
    loaded = load(env={"KVTIER_METRICS_PORT": "tcp://10.0.0.13:9464"})
    assert loaded.config.metrics.port == 0
    [warning] = loaded.warnings
    assert "service link" in warning and "metrics.port" in warning


@pytest.mark.parametrize(("text", "expected"), [("4Gi", 4 * GIB), ("512Mi", 512 << 20), ("100G", 100 * 10**9),
                                                ("1Ti", 1 << 40), ("750M", 750 * 10**6), ("64k", 64000)])
def test_kubernetes_size_units(text: str, expected: int) -> None:
    assert load({"memory": {"capacity": text}}).config.memory.capacity_bytes == expected


@pytest.mark.parametrize(("inline", "key"), [
    ({"chunk_tokens": "abc"}, "chunk_tokens"),
    ({"chunk_tokens": "256"}, "chunk_tokens"),  # file and inline values are typed: no string ints
    ({"chunk_tokens": True}, "chunk_tokens"),
    ({"chunk_tokens": 1.5}, "chunk_tokens"),
    ({"chunk_tokens": 0}, "chunk_tokens"),
    ({"chunk_tokens": -16}, "chunk_tokens"),
    ({"chunk_tokens": None}, "chunk_tokens"),
    ({"namespace": ""}, "namespace"),
    ({"namespace": "has space"}, "namespace"),
    ({"namespace": "a/b"}, "namespace"),
    ({"namespace": "x" * 65}, "namespace"),
    ({"namespace": 7}, "namespace"),
    ({"model_id": None}, "model_id"),
    ({"store_decode_tokens": "yes"}, "store_decode_tokens"),
    ({"store_decode_tokens": 1}, "store_decode_tokens"),
    ({"memory": ["capacity", 1]}, "memory"),
    ({"memory": "1GiB"}, "memory"),
    ({"memory.capacity": 0}, "memory.capacity"),
    ({"memory.capacity": "0GiB"}, "memory.capacity"),
    ({"memory.capacity": -1}, "memory.capacity"),
    ({"memory.capacity": "-1GiB"}, "memory.capacity"),
    ({"memory.capacity": "lots"}, "memory.capacity"),
    ({"memory.capacity": "2 GiBs"}, "memory.capacity"),
    ({"memory.capacity": 2.5}, "memory.capacity"),
    ({"memory.capacity": True}, "memory.capacity"),
    ({"memory.policy": "fifo"}, "memory.policy"),
    ({"memory.policy": "LRU"}, "memory.policy"),
    ({"memory.kv_format": "fp8"}, "memory.kv_format"),
    ({"memory.kv_format": "INT8"}, "memory.kv_format"),
    ({"memory.kv_format": 8}, "memory.kv_format"),
    ({"memory.load_layer_groups": 0}, "memory.load_layer_groups"),
    ({"memory.load_layer_groups": 65}, "memory.load_layer_groups"),
    ({"disk.path": 5}, "disk.path"),
    ({"disk.capacity": 0}, "disk.capacity"),
    ({"disk.write_policy": "write-back"}, "disk.write_policy"),
    ({"disk.queue_depth": 0}, "disk.queue_depth"),
    ({"metrics.port": 65536}, "metrics.port"),
    ({"metrics.port": -1}, "metrics.port"),
    ({"metrics.port": "9400"}, "metrics.port"),
    ({"metrics.host": ""}, "metrics.host"),
])
def test_bad_inline_value_names_key_and_source(inline: dict[str, object], key: str) -> None:
    error = config_error(inline)
    assert error.key == key
    assert str(error).startswith(f"{key}: ")
    assert "(from extra_config)" in str(error)


@pytest.mark.parametrize(("env", "key"), [
    ({"KVTIER_CHUNK_TOKENS": "abc"}, "chunk_tokens"),
    ({"KVTIER_CHUNK_TOKENS": "1.5"}, "chunk_tokens"),
    ({"KVTIER_CHUNK_TOKENS": ""}, "chunk_tokens"),
    ({"KVTIER_CHUNK_TOKENS": "-8"}, "chunk_tokens"),
    ({"KVTIER_STORE_DECODE_TOKENS": "maybe"}, "store_decode_tokens"),
    ({"KVTIER_MEMORY_CAPACITY": "0"}, "memory.capacity"),
    ({"KVTIER_MEMORY_CAPACITY": "2 gigs"}, "memory.capacity"),
    ({"KVTIER_METRICS_PORT": "http"}, "metrics.port"),
    ({"KVTIER_METRICS_PORT": "99999"}, "metrics.port"),
    ({"KVTIER_DISK_WRITE_POLICY": "always"}, "disk.write_policy"),
])
def test_bad_env_value_names_key_and_variable(env: dict[str, str], key: str) -> None:
    error = config_error(env=env)
    assert error.key == key
    assert f"(from env:{next(iter(env))})" in str(error)


def test_bad_file_value_names_key_and_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "disk:\n  queue_depth: [1, 2]\n")
    error = config_error({"config": path})
    assert error.key == "disk.queue_depth"
    assert f"(from file:{path})" in str(error)


def test_section_not_a_mapping_in_file(tmp_path: Path) -> None:
    error = config_error({"config": write_yaml(tmp_path, "disk: /var/cache\n")})
    assert error.key == "disk"
    assert "mapping" in str(error)


def test_non_string_key_in_file(tmp_path: Path) -> None:
    error = config_error({"config": write_yaml(tmp_path, "memory:\n  1: x\n")})
    assert error.key == "1"


@pytest.mark.parametrize(("text", "words"), [
    ("- a\n- b\n", "mapping"),
    ("just a string\n", "mapping"),
    ("memory: {capacity: [\n", "not valid YAML"),
])
def test_file_that_is_not_a_mapping(tmp_path: Path, text: str, words: str) -> None:
    error = config_error({"config": write_yaml(tmp_path, text)})
    assert error.key == "config"
    assert words in str(error)


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    for inline, env in (({"config": missing}, {}), ({}, {"KVTIER_CONFIG": missing})):
        error = config_error(inline, env)
        assert error.key == "config"
        assert "not found" in str(error) and missing in str(error)


def test_file_path_that_is_a_directory(tmp_path: Path) -> None:
    assert config_error({"config": str(tmp_path)}).key == "config"


def test_config_path_of_wrong_type() -> None:
    error = config_error({"config": ["a.yaml"]})
    assert error.key == "config"
    assert "extra_config" in str(error)


def test_config_key_is_not_allowed_inside_the_file(tmp_path: Path) -> None:
    error = config_error({"config": write_yaml(tmp_path, "config: other.yaml\n")})
    assert error.key == "config"
    assert "unknown key" in str(error)


# ---- sizes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "num_bytes"), [
    ("2GiB", 2 * GIB), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("100KB", 100_000),
    ("4096", 4096), ("0", 0), (0, 0), (4096, 4096), ("2 gib", 2 * GIB), ("2GIB", 2 * GIB),
    ("1.5 GiB", 3 * GIB // 2), ("0.5KiB", 512), ("1.1KiB", 1126), ("7b", 7), ("1TiB", 2**40),
    ("3tb", 3 * 10**12), (" 8 MB ", 8 * 10**6),
])
def test_parse_size_examples(text: str | int, num_bytes: int) -> None:
    assert parse_size(text, "memory.capacity") == num_bytes


@pytest.mark.parametrize("text", ["", "GiB", "-1", -1, "1.5.5GB", "1e9", "2 GiBs", "2PiB", "0x10", ".5GB",
                                  "one GiB", "inf", "nan"])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(text, "disk.capacity")
    assert info.value.key == "disk.capacity"


@pytest.mark.parametrize("value", [True, 1.5, None, [1]])
def test_parse_size_rejects_other_types(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value, "disk.capacity")  # type: ignore[arg-type]
    assert info.value.key == "disk.capacity"


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


@given(count=st.integers(0, 2**40), unit=st.sampled_from(sorted(UNITS)), space=st.sampled_from(["", " "]),
       case=st.sampled_from([str, str.lower, str.upper]))
def test_parse_size_integer_counts(count: int, unit: str, space: str, case: object) -> None:
    text = f"{count}{space}{case(unit)}"  # type: ignore[operator]
    assert parse_size(text, "k") == count * UNITS[unit]


@given(whole=st.integers(0, 10**6), tenths=st.integers(0, 9), unit=st.sampled_from(sorted(UNITS)))
def test_parse_size_decimal_counts_round_down(whole: int, tenths: int, unit: str) -> None:
    assert parse_size(f"{whole}.{tenths}{unit}", "k") == (whole * 10 + tenths) * UNITS[unit] // 10


@given(st.integers(1, 2**50))
def test_describe_size_round_trips(num_bytes: int) -> None:
    rows = {key: value for key, value, _ in describe(load({"memory.capacity": num_bytes}))}
    assert parse_size(rows["memory.capacity"], "k") == num_bytes


# ---- describe -------------------------------------------------------------------------------------

def test_describe_rows(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "chunk_tokens: 512\nmemory:\n  policy: lru\n")
    loaded = load({"config": path, "disk.capacity": "1.5GB", "disk.path": "/kv"},
                  {"KVTIER_STORE_DECODE_TOKENS": "1", "KVTIER_METRICS_PORT": "9400"})
    file_source = f"file:{path}"
    assert describe(loaded) == [
        ("chunk_tokens", "512", file_source),
        ("namespace", '"default"', "default"),
        ("no_cache_namespaces", '""', "default"),
        ("model_id", '""', "default"),
        ("store_decode_tokens", "true", "env:KVTIER_STORE_DECODE_TOKENS"),
        ("admission.policy", '"adaptive"', "default"), ("admission.min_reuse_percent", "5", "default"),
        ("admission.window", "4096", "default"),
        ("memory.capacity", "2GiB", "default"),
        ("memory.policy", '"lru"', file_source),
        ("memory.kv_format", '"exact"', "default"), ("memory.load_layer_groups", "4", "default"),
        ("disk.path", '"/kv"', "extra_config"),
        ("disk.capacity", "1500MB", "extra_config"),
        ("disk.write_policy", '"write_through"', "default"),
        ("disk.queue_depth", "256", "default"),
        ("metrics.port", "9400", "env:KVTIER_METRICS_PORT"),
        ("metrics.host", '"127.0.0.1"', "default"),
        ("remote.url", "null", "default"), ("remote.ttl", "86400", "default"),
        ("remote.timeout_ms", "2000", "default"), ("remote.queue_depth", "64", "default"),
        *[(key, "null", "default") for key in REMOTE_KEYS[4:-4]],
        ("remote.compression", '"none"', "default"), ("remote.compression_bits", "6", "default"),
        ("remote.handoff_wait_ms", "3000", "default"), ("remote.cost_gate", "true", "default"),
        ("encryption.key_file", "null", "default"), ("encryption.key_env", "null", "default"),
        ("namespace_limits", '""', "default"), ("admin.port", "0", "default"),
        ("admin.host", '"127.0.0.1"', "default"), ("admin.tokens_file", "null", "default"),
        ("admin.audit_log", "null", "default"),
        ("signing.key_file", "null", "default"), ("signing.key_env", "null", "default"),
        ("signing.unsigned", '"refuse"', "default"),
        ("p2p.listen", "null", "default"), ("p2p.advertise", "null", "default"), ("p2p.peers", '""', "default"),
        ("p2p.registry", "null", "default"), ("p2p.heartbeat_ttl", "10", "default"),
        ("p2p.key_file", "null", "default"), ("p2p.key_env", "null", "default"),
    ]


def test_describe_disk_off_is_null() -> None:
    rows = {key: value for key, value, _ in describe(load())}
    assert rows["disk.path"] == "null"
    assert rows["store_decode_tokens"] == "false"


def test_remote_compression() -> None:
    remote = load({"remote": {"compression": "cachegen", "compression_bits": 3}}).config.remote
    assert (remote.compression, remote.compression_bits) == ("cachegen", 3)
    assert config_error({"remote.compression": "zstd"}).key == "remote.compression"
    assert config_error({"remote.compression_bits": 9}).key == "remote.compression_bits"
    assert load({}, {"KVTIER_REMOTE_COMPRESSION_BITS": "6"}).config.remote.compression_bits == 6


def test_no_cache_namespaces() -> None:
    assert load({"no_cache_namespaces": "a,b.c"}).config.no_cache_namespaces == "a,b.c"
    assert config_error({"no_cache_namespaces": "a, b"}).key == "no_cache_namespaces"


# ---- tenants --------------------------------------------------------------------------------------

def test_namespace_limits_parse_ttl_and_quotas_per_namespace() -> None:
    config = load({"namespace_limits": "tenant-a:ttl=3600,memory=1GiB,disk=10GB; tenant-b:ttl=60"}).config
    assert config.namespace_limits == {"tenant-a": NamespaceLimits(3600, GIB, 10 * 10**9),
                                       "tenant-b": NamespaceLimits(ttl_s=60)}


@pytest.mark.parametrize("text", ["tenant-a", "tenant-a:ttl", "tenant-a:colour=red", "..:ttl=1",
                                  "a:ttl=1;a:ttl=2", "a:memory=lots", "a:ttl=-1"])
def test_bad_namespace_limits_are_refused_with_the_key(text: str) -> None:
    error = config_error({"namespace_limits": text})
    assert error.key == "namespace_limits"


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b", "", "x" * 65, "a b"])
def test_namespaces_that_could_be_paths_are_refused(name: str) -> None:
    assert config_error({"namespace": name}).key == "namespace"


def test_admin_keys_load_from_a_section() -> None:
    config = load({"admin": {"port": 9000, "tokens_file": "/etc/kvtier/tokens"}}).config
    assert config.admin == AdminConfig(port=9000, host="127.0.0.1", tokens_file="/etc/kvtier/tokens", audit_log=None)


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True),
                       st.tuples(st.integers(0, 10**6), st.integers(0, 2**40), st.integers(0, 2**40)), max_size=4))
def test_namespace_limits_round_trip_through_describe(limits: dict[str, tuple[int, int, int]]) -> None:
    text = ";".join(f"{name}:ttl={t},memory={m},disk={d}" for name, (t, m, d) in limits.items())
    parsed = parse_namespace_limits(text)
    assert parsed == {name: NamespaceLimits(*values) for name, values in limits.items()}
    shown = dict((row[0], row[1]) for row in describe(load({"namespace_limits": text})))
    assert parse_namespace_limits(shown["namespace_limits"].strip('"')) == parsed


def test_namespace_limits_are_shown_with_size_units() -> None:
    rows = {key: value for key, value, _ in describe(load({"namespace_limits": "a:memory=1GiB,disk=1500MB"}))}
    assert rows["namespace_limits"] == '"a:ttl=0,memory=1GiB,disk=1500MB"'


def test_a_client_certificate_needs_its_key() -> None:
    assert config_error({"remote.tls_cert": "/etc/kvtier/client.crt"}).key == "remote.tls_key"
    assert config_error({"remote.tls_key": "/etc/kvtier/client.key"}).key == "remote.tls_cert"


def test_config_check_and_errors_never_show_a_password_inside_the_url() -> None:
    from kvtier.config import describe

    loaded = load({"remote": {"url": "redis://alice:hunter2@cache:6379/0"}})
    assert loaded.config.remote.url == "redis://alice:hunter2@cache:6379/0"  # the client gets it whole
    shown = dict((key, value) for key, value, _ in describe(loaded))
    assert shown["remote.url"] == '"redis://alice:***@cache:6379/0"'
    error = config_error({"remote": {"url": "redis://alice:hunter2@cache:99999/0"}})
    assert "hunter2" not in str(error) and "alice:***@cache" in str(error)


@pytest.mark.parametrize(("url", "message"), [
    ("memcached://cache:11211", "unknown scheme"),
    ("redis://cache:99999/0", "99999"),
    ("rediss+cluster://h1:7000,h2:seven", "'seven'"),
    ("cache:6379", "unknown scheme"),
])
def test_remote_urls_are_checked_at_load_as_at_start(url: str, message: str) -> None:
    error = config_error({"remote": {"url": url}})
    assert error.key == "remote.url" and message in str(error)


@pytest.mark.parametrize("url", ["redis://cache:6379/0", "rediss://u:p@[::1]:6380", "redis+cluster://a:7000,b:7001",
                                 "s3://bucket/prefix", "redis://cache"])
def test_good_remote_urls_pass(url: str) -> None:
    assert load({"remote": {"url": url}}).config.remote.url == url


def test_signing_settings() -> None:
    config = load({"signing": {"key_env": "KV_SIGNING", "unsigned": "default"}}).config
    assert config.signing.key_env == "KV_SIGNING" and config.signing.unsigned == "default"
    assert load(env={"KVTIER_SIGNING_KEY_FILE": "/etc/kvtier/signing.key"}).config.signing.key_file == \
        "/etc/kvtier/signing.key"
    with pytest.raises(ConfigError, match="signing.unsigned"):
        load({"signing.unsigned": "allow"})
    with pytest.raises(ConfigError, match="signing.key_env"):
        load({"signing.key_env": "K", "signing.key_file": "/k"})
