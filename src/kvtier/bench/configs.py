"""The configurations ``kvtier bench`` compares, and the one set of engine settings they all share.

- ``vllm``: no connector; vLLM's own prefix cache on (its default).
- ``kvtier-memory``: kvtier with its host-memory tier only.
- ``kvtier-memory+disk``: memory and local disk (write-through).
- ``kvtier-memory+redis`` / ``kvtier-memory+s3``: memory and a shared remote tier, only when a URL
  is given. No disk here, so chunks memory does not hold come from the remote.
- ``kvtier-memory+redis+cachegen``: the same with compressed remote values
  (``remote.compression: cachegen``); only when named in ``--configs`` (it is lossy).

Every server gets the same engine arguments (a deliberately small engine KV cache, so vLLM's own
prefix cache must evict, as in ``kvtier demo``) and the same environment; kvtier's settings go
inline into ``kv_connector_extra_config``, with ``KVTIER_*`` variables removed from the server's
environment (credentials excepted) so nothing outside the bench changes a configuration.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kvtier.bench.server import ServerSpec
from kvtier.errors import ConfigError

MAX_MODEL_LEN_TOKENS = 4096
BLOCK_TOKENS = 128
DEFAULT_ENGINE_KV_TOKENS = 34 * BLOCK_TOKENS  # as the demo: one max-length request, and vLLM's null block
KVTIER_CHUNK_TOKENS = 256  # kvtier's default chunk_tokens (a unit test holds it to the config default)
BASELINE = "vllm"
# Credentials may come from the environment (the documented way for secrets): these are kept.
_KEPT_KVTIER_ENV = ("KVTIER_REMOTE_USERNAME", "KVTIER_REMOTE_PASSWORD", "KVTIER_REMOTE_ACCESS_KEY",
                    "KVTIER_REMOTE_SECRET_KEY", "KVTIER_REMOTE_TLS_CA")

KvTransferJson = Callable[[dict[str, object]], str]  # inline kvtier keys -> --kv-transfer-config value


@dataclass(frozen=True)
class BenchConfig:
    name: str
    kvtier_keys: tuple[tuple[str, str | int], ...] | None  # inline kvtier keys (JSON values); None = no kvtier
    uses_disk: bool = False
    by_default: bool = True  # False: runs only when named in --configs

    @property
    def uses_kvtier(self) -> bool:
        return self.kvtier_keys is not None


@dataclass(frozen=True)
class RemoteOptions:
    redis_url: str | None
    s3_url: str | None
    s3_endpoint: str | None


def all_configs(memory_capacity: str, remote: RemoteOptions, chunk_tokens: int | None = None) -> list[BenchConfig]:
    """Every configuration this run can compare, the baseline first; ``chunk_tokens`` (None: kvtier's
    default) goes to every kvtier configuration."""
    memory: tuple[tuple[str, str | int], ...] = (("memory.capacity", memory_capacity),)
    if chunk_tokens is not None:
        memory += (("chunk_tokens", chunk_tokens),)  # an integer: kvtier's inline config takes no text for it
    configs = [BenchConfig(BASELINE, None), BenchConfig("kvtier-memory", memory),
               BenchConfig("kvtier-memory+disk", memory, uses_disk=True)]
    if remote.redis_url:
        redis = (*memory, ("remote.url", remote.redis_url))
        configs.append(BenchConfig("kvtier-memory+redis", redis))
        configs.append(BenchConfig("kvtier-memory+redis+cachegen", (*redis, ("remote.compression", "cachegen")),
                                   by_default=False))
    if remote.s3_url:
        s3 = (("remote.url", remote.s3_url),)
        if remote.s3_endpoint:
            s3 += (("remote.s3_endpoint", remote.s3_endpoint),)
        configs.append(BenchConfig("kvtier-memory+s3", (*memory, *s3)))
    return configs


def select_configs(configs: list[BenchConfig], names: list[str] | None) -> list[BenchConfig]:
    """The configurations named (when ``names`` is None: all those run by default), in the order
    of ``configs``. Raises ConfigError naming an unknown one."""
    if names is None:
        return [config for config in configs if config.by_default]
    known = {config.name for config in configs}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError("--configs", f"unknown configuration {', '.join(unknown)}; this run has "
                                       f"{', '.join(sorted(known))} (remote ones need --redis-url / --s3-url)")
    return [config for config in configs if config.name in names]


def engine_args(engine_kv_bytes: int) -> list[str]:
    """vLLM arguments every configuration gets (``--kv-transfer-config`` is added for kvtier)."""
    return ["--max-model-len", str(MAX_MODEL_LEN_TOKENS), "--enforce-eager", "--block-size", str(BLOCK_TOKENS),
            "--dtype", "bfloat16", "--seed", "0", "--kv-cache-memory-bytes", str(engine_kv_bytes),
            "--enable-prompt-tokens-details"]


RESERVED_ENGINE_FLAGS = ("--model", "--host", "--port", "--kv-transfer-config")  # the bench sets these


def check_extra_engine_args(args: Sequence[str]) -> tuple[str, ...]:
    """vLLM arguments passed through after ``--`` (GPU settings, ``--gpu-memory-utilization``, ...):
    they follow ``engine_args``, so they override its defaults. ``ConfigError`` for a flag the bench
    sets itself."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_ENGINE_FLAGS:
            raise ConfigError("--", f"{flag} is set by kvtier bench itself and cannot be passed through to vLLM"
                                    f" (the model is --model before --; ports are picked free)")
    return tuple(args)


def kvtier_inline_keys(config: BenchConfig, metrics_port: int, disk_dir: str,
                       run_namespace: str) -> dict[str, object]:
    """The inline kvtier keys of one server: the configuration's own, plus the metrics port, a fresh
    disk folder (only if the configuration has a disk tier) and a namespace unique to this run and
    configuration (``run_namespace`` plus the configuration's name: a shared remote tier then holds
    nothing from an earlier run, and two configurations on one store never read each other's KV)."""
    assert config.kvtier_keys is not None, "only for kvtier configurations"
    keys: dict[str, object] = dict(config.kvtier_keys)
    keys["metrics.port"] = metrics_port
    keys["namespace"] = f"{run_namespace}-{config.name.replace('+', '.')}"
    if config.uses_disk:
        keys["disk.path"] = disk_dir
    return keys


def server_spec(config: BenchConfig, model_dir: str, port: int, engine_kv_bytes: int,
                kv_transfer_json: str | None, log_path: str, environ: Mapping[str, str],
                extra_args: Sequence[str] = ()) -> ServerSpec:
    """The server of one configuration: ``engine_args``, then ``extra_args`` (passed through after
    ``--``; they win over the defaults), then kvtier's ``--kv-transfer-config``.
    ``VLLM_CPU_KVCACHE_SPACE`` would override ``--kv-cache-memory-bytes`` and ``KVTIER_*`` would
    override the inline keys: both are removed (remote credentials excepted)."""
    args = [*engine_args(engine_kv_bytes), *check_extra_engine_args(extra_args)]
    if kv_transfer_json is not None:
        args += ["--kv-transfer-config", kv_transfer_json]
    unset = ("VLLM_CPU_KVCACHE_SPACE", *sorted(key for key in environ
                                                      if key.startswith("KVTIER_") and key not in _KEPT_KVTIER_ENV))
    return ServerSpec(name=config.name, model=model_dir, port=port, engine_args=tuple(args),
                      env=(("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),), unset_env=unset, log_path=log_path)


def log_path_for(log_dir: str, config_name: str) -> str:
    return os.path.join(log_dir, f"{config_name.replace('+', '_')}.log")
