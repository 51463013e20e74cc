"""kvtier's configuration: parsed once, at the edge, into frozen objects.

Four layers, later ones winning key by key:
defaults < YAML file < inline keys (vLLM's ``kv_connector_extra_config``) < environment variables
``KVTIER_<SECTION>_<KEY>``. Every value any layer gives is checked, even one a later layer
overrides, and an unknown key in any layer is an error (with a "did you mean" where one is close).
``docs/configuration.md`` is the reference for every key; keep the two in step.

This module is the public entry point: the config objects, ``load_config`` and ``describe``. The
parts live in ``kvtier.configparts``: the values of keys (``values``), the table of keys
(``keys``) and the layers that set them (``sources``); the names other modules use are
re-exported here.

No torch, no vLLM: this module only reads mappings, strings and one YAML file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from kvtier.configparts.keys import KEYS, KEYS_BY_NAME
from kvtier.configparts.sources import config_path, read_yaml, settings_from_env, settings_from_mapping
from kvtier.configparts.values import (NAMESPACE_PATTERN, NAMESPACE_RULE, REMOTE_SCHEMES, NamespaceLimits, Value,
                                       check_bool, check_int, check_str, is_namespace, mask_url,
                                       parse_namespace_limits, parse_size, render_limits)
from kvtier.errors import ConfigError

__all__ = [
    "NAMESPACE_PATTERN", "NAMESPACE_RULE", "REMOTE_SCHEMES", "AdminConfig", "DiskConfig", "EncryptionConfig",
    "KVTierConfig", "LoadedConfig", "MemoryConfig", "MetricsConfig", "NamespaceLimits", "P2PConfig", "RemoteConfig",
    "SigningConfig", "check_client_certificate", "describe", "is_namespace", "load_config", "mask_url",
    "parse_namespace_limits", "parse_size",
]

logger = logging.getLogger("kvtier")


@dataclass(frozen=True)
class MemoryConfig:
    """The in-memory (host RAM) tier."""

    capacity_bytes: int
    policy: str  # "lru" | "s3fifo"
    kv_format: str  # how a slot holds a chunk: "exact" | "int8" (lossy, ~half the bytes; kvtier.layout)
    load_layer_groups: int = 4  # CUDA memory loads pipelined in this many layer groups (kvtier.layerload)


@dataclass(frozen=True)
class DiskConfig:
    """The local-disk tier; off when ``path`` is None."""

    path: str | None
    capacity_bytes: int
    write_policy: str  # "spill" | "write_through"
    queue_depth: int


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus exposition; no HTTP server when ``port`` is 0."""

    port: int
    host: str


@dataclass(frozen=True)
class RemoteConfig:
    """A shared remote tier (Redis/Valkey or S3); off when ``url`` is None."""

    url: str | None  # redis://, rediss://, redis+cluster://h:p,h:p, s3://bucket/prefix
    ttl_s: int  # 0 = entries never expire
    timeout_ms: int  # deadline of every remote call
    queue_depth: int  # bounded upload queue; full => uploads dropped and counted
    username: str | None
    password: str | None
    tls_ca: str | None
    tls_cert: str | None  # client certificate (mutual TLS), with tls_key
    tls_key: str | None
    s3_endpoint: str | None
    s3_region: str | None
    access_key: str | None
    secret_key: str | None
    compression: str  # "none", or "cachegen": lossy, smaller values (kvtier.compression)
    compression_bits: int  # cachegen: bits per quantised difference (2..8); fewer = smaller, less exact
    handoff_wait_ms: int  # how long a request with expect_tokens waits for a prefill instance's uploads
    cost_gate: bool  # fetch only when the measured remote speed beats the measured prefill speed

    def __post_init__(self) -> None:
        check_client_certificate(self.tls_cert, self.tls_key)


def check_client_certificate(tls_cert: str | None, tls_key: str | None) -> None:
    """A client certificate comes with its key: ``ConfigError`` naming the one missing."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("remote.tls_key" if tls_key is None else "remote.tls_cert",
                          "set both remote.tls_cert and remote.tls_key (a client certificate and its key), "
                          "or neither")


@dataclass(frozen=True)
class EncryptionConfig:
    """Encryption at rest of the disk and remote tiers (``kvtier.crypto``): the master key comes
    from the file ``key_file`` or the environment variable named ``key_env``. Both None: entries
    are stored in clear. Both set: ``ConfigError`` on construction."""

    key_file: str | None  # file holding the 32-byte master key as 64 hex digits or base64
    key_env: str | None  # name of the environment variable holding it (hex or base64)

    def __post_init__(self) -> None:
        if self.key_file is not None and self.key_env is not None:
            raise ConfigError("encryption.key_env", "set only one of encryption.key_file and encryption.key_env")


@dataclass(frozen=True)
class SigningConfig:
    """Signed tenancy (``kvtier.signing``): with a key (from the file ``key_file`` or the
    environment variable named ``key_env``, never a value on a command line) a request's namespace
    comes only from a valid namespace token and ``expect_tokens`` only from a valid handoff.
    ``unsigned``: what a request without a namespace token gets, ``refuse`` (served without kvtier)
    or ``default`` (the configured ``namespace``). No key: requests are trusted as before."""

    key_file: str | None
    key_env: str | None
    unsigned: str = "refuse"

    def __post_init__(self) -> None:
        if self.key_file is not None and self.key_env is not None:
            raise ConfigError("signing.key_env", "set only one of signing.key_file and signing.key_env")


@dataclass(frozen=True)
class AdmissionConfig:
    """Which computed chunks are stored (``kvtier.admission``): ``adaptive`` stores every chunk
    while at least ``min_reuse_percent`` of the last ``window`` chunks looked up were seen before,
    else only chunks seen in an earlier request; ``always``; ``second_sight``."""

    policy: str = "adaptive"
    min_reuse_percent: int = 5
    window: int = 4096


@dataclass(frozen=True)
class P2PConfig:
    """Peer-to-peer transfer (``kvtier.tiers.peer_tier``, ``peer_server``). ``listen``: serve this
    instance's entries to peers on ``host:port``; ``peers`` (comma-separated ``host:port``) and/or
    ``registry`` (a Redis URL where serving instances register ``advertise``, else ``listen``,
    with a ``heartbeat_ttl``): fetch from them. Peers prove a shared secret (``key_file`` or
    ``key_env``, never a value on a command line) on every connection. All off by default."""

    listen: str | None = None
    advertise: str | None = None
    peers: str = ""
    registry: str | None = None
    heartbeat_ttl_s: int = 10
    key_file: str | None = None
    key_env: str | None = None

    def __post_init__(self) -> None:
        if self.key_file is not None and self.key_env is not None:
            raise ConfigError("p2p.key_env", "set only one of p2p.key_file and p2p.key_env")
        if (self.listen or self.fetches) and self.key_file is None and self.key_env is None:
            raise ConfigError("p2p.key_file", "peer-to-peer transfer needs a shared secret: set p2p.key_file "
                              "or p2p.key_env (make one with: openssl rand -hex 32)")
        if self.listen is not None and self.advertise is None and \
                self.listen.rpartition(":")[0] in ("0.0.0.0", "[::]", "::"):
            raise ConfigError("p2p.advertise", f"p2p.listen {self.listen} is a wildcard address: set "
                              "p2p.advertise to the host:port peers connect to (the server refuses a "
                              "client that dialled another address)")

    @property
    def fetches(self) -> bool:
        """Whether this instance fetches from peers (a static list or a registry)."""
        return bool(self.peers) or self.registry is not None

    @property
    def peer_list(self) -> tuple[str, ...]:
        return tuple(filter(None, self.peers.split(",")))

    @property
    def own_address(self) -> str | None:
        """The address peers reach this instance at (registered, and left out of its own peers)."""
        return self.advertise or self.listen


@dataclass(frozen=True)
class AdminConfig:
    """The admin HTTP API (``kvtier.admin``); off when ``port`` is 0. ``tokens_file`` is required
    when it is on: there is no unauthenticated mode."""

    port: int
    host: str
    tokens_file: str | None  # lines "<role> <token>", role "read" or "admin"
    audit_log: str | None  # JSON-lines file; None = the "kvtier.audit" logger (stderr)



@dataclass(frozen=True)
class KVTierConfig:
    """Everything kvtier reads from its configuration, checked."""

    chunk_tokens: int
    namespace: str
    no_cache_namespaces: str  # comma-separated: requests in these namespaces never load or store
    model_id: str  # "" = the engine's model name
    store_decode_tokens: bool
    memory: MemoryConfig
    disk: DiskConfig
    metrics: MetricsConfig
    remote: RemoteConfig
    encryption: EncryptionConfig
    admin: AdminConfig
    namespace_limits: dict[str, NamespaceLimits]  # from ``namespace_limits``
    signing: SigningConfig = SigningConfig(None, None)
    admission: AdmissionConfig = AdmissionConfig()
    p2p: P2PConfig = P2PConfig()

    def __post_init__(self) -> None:
        if self.p2p.fetches and self.remote.url is not None:
            raise ConfigError("p2p.peers" if self.p2p.peers else "p2p.registry",
                              "peer-to-peer fetching takes the remote tier's place: unset remote.url, or "
                              "unset p2p.peers and p2p.registry (p2p.listen may be used with either)")
        if self.p2p.listen is not None and self.disk.path is None:
            raise ConfigError("p2p.listen", "serving peers needs the disk tier (peers are served from its "
                              "files): set disk.path")


@dataclass(frozen=True)
class LoadedConfig:
    """A config and, per dotted key, the layer that set it:
    ``"default"``, ``"file:<absolute path>"``, ``"extra_config"`` or ``"env:KVTIER_<...>"``."""

    config: KVTierConfig
    sources: dict[str, str]
    warnings: tuple[str, ...] = ()  # settings that were ignored, each with the reason


# ---- loading ------------------------------------------------------------------------------------

def load_config(inline: Mapping[str, object], environ: Mapping[str, str]) -> LoadedConfig:
    """Merge defaults, the YAML file, ``inline`` and ``environ`` (later wins) into a checked config.

    ``inline`` is vLLM's ``kv_connector_extra_config``: config keys, nested or dotted, plus an
    optional ``config`` naming the YAML file (else ``environ["KVTIER_CONFIG"]``, else no file).
    Raises ConfigError naming the key and the source on an unknown key of the file or ``inline``,
    a wrong type or an impossible value; and with key ``config`` when the file is missing,
    unreadable, not YAML or not a mapping. ``KVTIER_*`` variables that are not config keys do not
    stop a start: Kubernetes service links (a Service named ``kvtier-redis`` gives every pod
    ``KVTIER_REDIS_PORT=tcp://...``) are ignored, any other is logged and listed in ``warnings``.
    """
    values: dict[str, Value] = {key.dotted: key.default for key in KEYS}
    sources = dict.fromkeys(values, "default")
    settings: list[tuple[str, object, str]] = []
    path = config_path(inline, environ)
    if path is not None:
        settings += settings_from_mapping(read_yaml(path), f"file:{path}")
    settings += settings_from_mapping({k: v for k, v in inline.items() if k != "config"}, "extra_config")
    from_env, warnings = settings_from_env(environ)
    settings += from_env
    for warning in warnings:
        logger.warning("kvtier: %s", warning)
    for dotted, value, source in settings:
        try:
            values[dotted] = KEYS_BY_NAME[dotted].check(value)
        except ValueError as exc:
            raise ConfigError(dotted, f"{exc} (from {source})") from None
        sources[dotted] = source
    return LoadedConfig(_build(values), sources, tuple(warnings))


def describe(loaded: LoadedConfig) -> list[tuple[str, str, str]]:
    """One row per key, in reference order: (dotted key, value as YAML text, source).

    Sizes are written in the unit that spells them shortest (``2GiB``), strings in double quotes.
    """
    values = _values_of(loaded.config)
    return [(key.dotted, key.render(values[key.dotted]), loaded.sources[key.dotted]) for key in KEYS]



def _build(values: Mapping[str, Value]) -> KVTierConfig:
    """The config from checked values (each already of its key's type)."""
    def num(key: str) -> int:
        return check_int(values[key])

    def text(key: str) -> str:
        return check_str(values[key])

    def optional(key: str) -> str | None:
        value = values[key]
        return None if value is None else check_str(value)

    disk_path = values["disk.path"]
    return KVTierConfig(
        chunk_tokens=num("chunk_tokens"), namespace=text("namespace"), model_id=text("model_id"),
        no_cache_namespaces=text("no_cache_namespaces"),
        store_decode_tokens=check_bool(values["store_decode_tokens"]),
        memory=MemoryConfig(capacity_bytes=num("memory.capacity"), policy=text("memory.policy"),
                            kv_format=text("memory.kv_format"), load_layer_groups=num("memory.load_layer_groups")),
        disk=DiskConfig(path=None if disk_path is None else check_str(disk_path),
                        capacity_bytes=num("disk.capacity"), write_policy=text("disk.write_policy"),
                        queue_depth=num("disk.queue_depth")),
        metrics=MetricsConfig(port=num("metrics.port"), host=text("metrics.host")),
        remote=RemoteConfig(
            url=optional("remote.url"), ttl_s=num("remote.ttl"), timeout_ms=num("remote.timeout_ms"),
            queue_depth=num("remote.queue_depth"), username=optional("remote.username"),
            password=optional("remote.password"), tls_ca=optional("remote.tls_ca"),
            tls_cert=optional("remote.tls_cert"), tls_key=optional("remote.tls_key"),
            s3_endpoint=optional("remote.s3_endpoint"), s3_region=optional("remote.s3_region"),
            access_key=optional("remote.access_key"), secret_key=optional("remote.secret_key"),
            compression=text("remote.compression"), compression_bits=num("remote.compression_bits"),
            handoff_wait_ms=num("remote.handoff_wait_ms"), cost_gate=check_bool(values["remote.cost_gate"])),
        encryption=EncryptionConfig(key_file=optional("encryption.key_file"),
                                    key_env=optional("encryption.key_env")),
        admin=AdminConfig(port=num("admin.port"), host=text("admin.host"),
                          tokens_file=optional("admin.tokens_file"), audit_log=optional("admin.audit_log")),
        namespace_limits=parse_namespace_limits(text("namespace_limits")),
        signing=SigningConfig(key_file=optional("signing.key_file"), key_env=optional("signing.key_env"),
                              unsigned=text("signing.unsigned")),
        admission=AdmissionConfig(policy=text("admission.policy"),
                                  min_reuse_percent=num("admission.min_reuse_percent"),
                                  window=num("admission.window")),
        p2p=P2PConfig(listen=optional("p2p.listen"), advertise=optional("p2p.advertise"), peers=text("p2p.peers"),
                      registry=optional("p2p.registry"), heartbeat_ttl_s=num("p2p.heartbeat_ttl"),
                      key_file=optional("p2p.key_file"), key_env=optional("p2p.key_env")),
    )


def _values_of(config: KVTierConfig) -> dict[str, Value]:
    """The inverse of ``_build``: dotted key -> value."""
    return {
        "chunk_tokens": config.chunk_tokens, "namespace": config.namespace, "model_id": config.model_id,
        "no_cache_namespaces": config.no_cache_namespaces,
        "store_decode_tokens": config.store_decode_tokens,
        "memory.capacity": config.memory.capacity_bytes, "memory.policy": config.memory.policy,
        "memory.kv_format": config.memory.kv_format, "memory.load_layer_groups": config.memory.load_layer_groups,
        "disk.path": config.disk.path, "disk.capacity": config.disk.capacity_bytes,
        "disk.write_policy": config.disk.write_policy, "disk.queue_depth": config.disk.queue_depth,
        "metrics.port": config.metrics.port, "metrics.host": config.metrics.host,
        "remote.url": config.remote.url, "remote.ttl": config.remote.ttl_s,
        "remote.timeout_ms": config.remote.timeout_ms, "remote.queue_depth": config.remote.queue_depth,
        "remote.username": config.remote.username, "remote.password": config.remote.password,
        "remote.tls_ca": config.remote.tls_ca, "remote.tls_cert": config.remote.tls_cert,
        "remote.tls_key": config.remote.tls_key, "remote.s3_endpoint": config.remote.s3_endpoint,
        "remote.s3_region": config.remote.s3_region, "remote.access_key": config.remote.access_key,
        "remote.secret_key": config.remote.secret_key, "remote.compression": config.remote.compression,
        "remote.compression_bits": config.remote.compression_bits,
        "remote.handoff_wait_ms": config.remote.handoff_wait_ms, "remote.cost_gate": config.remote.cost_gate,
        "encryption.key_file": config.encryption.key_file, "encryption.key_env": config.encryption.key_env,
        "namespace_limits": render_limits(config.namespace_limits),
        "admin.port": config.admin.port, "admin.host": config.admin.host,
        "admin.tokens_file": config.admin.tokens_file, "admin.audit_log": config.admin.audit_log,
        "signing.key_file": config.signing.key_file, "signing.key_env": config.signing.key_env,
        "signing.unsigned": config.signing.unsigned,
        "admission.policy": config.admission.policy,
        "admission.min_reuse_percent": config.admission.min_reuse_percent,
        "admission.window": config.admission.window,
        "p2p.listen": config.p2p.listen, "p2p.advertise": config.p2p.advertise, "p2p.peers": config.p2p.peers,
        "p2p.registry": config.p2p.registry, "p2p.heartbeat_ttl": config.p2p.heartbeat_ttl_s,
        "p2p.key_file": config.p2p.key_file, "p2p.key_env": config.p2p.key_env,
    }
