"""The table of config keys: each key's dotted name, default, check and spellings, defined once.

``docs/configuration.md`` is the reference for every key; keep the two in step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvtier.configparts.values import (NAMESPACE_PATTERN, NAMESPACE_RULE, Value, address_list, bool_from_text,
                                       check_bool, check_str, int_from_text, int_in, namespace_limits, one_of,
                                       optional_address, optional_env_name, optional_redis_url, optional_str,
                                       positive_size, remote_url,
                                       render_secret, render_size, render_url, str_matching, yaml_text)


@dataclass(frozen=True)
class Key:
    """One configuration key: its dotted name, default and how values of it are checked."""

    dotted: str
    default: Value
    check: Callable[[object], Value]  # typed value -> checked value; raises ValueError
    from_text: Callable[[str], object] = str  # environment string -> typed value; raises ValueError
    render: Callable[[Value], str] = yaml_text

    @property
    def env_var(self) -> str:
        return "KVTIER_" + self.dotted.replace(".", "_").upper()


KEYS = (
    Key("chunk_tokens", 256, int_in(1, None, "> 0"), int_from_text),
    Key("namespace", "default", str_matching(NAMESPACE_PATTERN, NAMESPACE_RULE)),
    Key("no_cache_namespaces", "", str_matching(f"({NAMESPACE_PATTERN}(,{NAMESPACE_PATTERN})*)?",
                                                "a comma-separated list of namespaces, no spaces")),
    Key("model_id", "", check_str),
    Key("store_decode_tokens", False, check_bool, bool_from_text),
    Key("admission.policy", "adaptive", one_of("adaptive", "always", "second_sight")),
    Key("admission.min_reuse_percent", 5, int_in(0, 100, "0..100 percent"), int_from_text),
    Key("admission.window", 4096, int_in(1, None, "> 0 chunks"), int_from_text),
    Key("memory.capacity", 2 * 2**30, positive_size, render=render_size),
    Key("memory.policy", "s3fifo", one_of("lru", "s3fifo")),
    Key("memory.kv_format", "exact", one_of("exact", "int8")),
    Key("memory.load_layer_groups", 4, int_in(1, 64, "1..64 (1: no pipelining)"), int_from_text),
    Key("disk.path", None, optional_str),
    Key("disk.capacity", 16 * 2**30, positive_size, render=render_size),
    Key("disk.write_policy", "write_through", one_of("spill", "write_through")),
    Key("disk.queue_depth", 256, int_in(1, None, "> 0"), int_from_text),
    Key("metrics.port", 0, int_in(0, 65535, "0 (off) or a port in 1..65535"), int_from_text),
    Key("metrics.host", "127.0.0.1", str_matching(r"\S+", "a host name or address")),
    Key("remote.url", None, remote_url, render=render_url),
    Key("remote.ttl", 86400, int_in(0, None, ">= 0 seconds (0 = never expire)"), int_from_text),
    Key("remote.timeout_ms", 2000, int_in(1, None, "> 0 milliseconds"), int_from_text),
    Key("remote.queue_depth", 64, int_in(1, None, "> 0"), int_from_text),
    Key("remote.username", None, optional_str),
    Key("remote.password", None, optional_str, render=render_secret),
    Key("remote.tls_ca", None, optional_str),
    Key("remote.tls_cert", None, optional_str),
    Key("remote.tls_key", None, optional_str),
    Key("remote.s3_endpoint", None, optional_str),
    Key("remote.s3_region", None, optional_str),
    Key("remote.access_key", None, optional_str),
    Key("remote.secret_key", None, optional_str, render=render_secret),
    Key("remote.compression", "none", one_of("none", "cachegen")),
    Key("remote.compression_bits", 6, int_in(2, 8, "2..8"), int_from_text),
    Key("remote.handoff_wait_ms", 3000, int_in(0, None, ">= 0 milliseconds"), int_from_text),
    Key("remote.cost_gate", True, check_bool, bool_from_text),
    Key("encryption.key_file", None, optional_str),
    Key("encryption.key_env", None, optional_env_name),
    Key("namespace_limits", "", namespace_limits),
    Key("admin.port", 0, int_in(0, 65535, "0 (off) or a port in 1..65535"), int_from_text),
    Key("admin.host", "127.0.0.1", str_matching(r"\S+", "a host name or address")),
    Key("admin.tokens_file", None, optional_str),
    Key("admin.audit_log", None, optional_str),
    Key("signing.key_file", None, optional_str),
    Key("signing.key_env", None, optional_env_name),
    Key("signing.unsigned", "refuse", one_of("refuse", "default")),
    Key("p2p.listen", None, optional_address),
    Key("p2p.advertise", None, optional_address),
    Key("p2p.peers", "", address_list),
    Key("p2p.registry", None, optional_redis_url, render=render_url),
    Key("p2p.heartbeat_ttl", 10, int_in(2, None, ">= 2 seconds"), int_from_text),
    Key("p2p.key_file", None, optional_str),
    Key("p2p.key_env", None, optional_env_name),
)
KEYS_BY_NAME = {key.dotted: key for key in KEYS}
KEYS_BY_ENV = {key.env_var: key for key in KEYS}
SECTIONS = ("admission", "memory", "disk", "metrics", "remote", "encryption", "admin", "signing", "p2p")
