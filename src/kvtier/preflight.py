"""``kvtier config check``'s checks beyond the config loader: what start-up would check of the
machine a config runs on, done before start-up.

- files (``check_files``): the disk tier's folder can be created or written; the encryption and
  signing keys and the P2P secret load (the same loaders start-up uses); with the admin API on, its tokens file
  loads and its audit log can be written; the remote tier's TLS files are readable;
- the engine's block size (``check_block_size``): ``chunk_tokens`` is a multiple of it;
- the remote tier (``check_remote``, only when asked: it opens connections): a round trip to the
  server succeeds within ``remote.timeout_ms``.
Each finding names the config key and the layer it came from (``LoadedConfig.sources``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kvtier.admin.auth import load_tokens
from kvtier.config import LoadedConfig, mask_url
from kvtier.crypto import load_sealer
from kvtier.errors import ConfigError
from kvtier.signing import load_peer_secret, load_signing_key


@dataclass(frozen=True)
class Finding:
    """One thing start-up would refuse: the key, where its value came from, and why."""

    key: str
    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.key} (from {self.source}): {self.message}"


def check_files(loaded: LoadedConfig, environ: Mapping[str, str]) -> list[Finding]:
    """The files and folders the config names, as start-up will use them (see the module docstring)."""
    config = loaded.config
    findings: list[Finding] = []

    def finding(key: str, message: str) -> None:
        findings.append(Finding(key, loaded.sources.get(key, "default"), message))

    def loads(call: Callable[[], object]) -> None:
        try:
            call()
        except ConfigError as exc:
            finding(exc.key, str(exc).removeprefix(f"{exc.key}: "))

    if config.disk.path is not None:
        problem = _folder_problem(config.disk.path)
        if problem is not None:
            finding("disk.path", problem)
    loads(lambda: load_sealer(config.encryption, environ))
    loads(lambda: load_signing_key(config.signing.key_file, config.signing.key_env, environ))
    loads(lambda: load_peer_secret(config.p2p.key_file, config.p2p.key_env, environ))
    if config.admin.port:
        loads(lambda: load_tokens(config.admin.tokens_file))
        if config.admin.audit_log is not None:
            problem = _file_problem(config.admin.audit_log)
            if problem is not None:
                finding("admin.audit_log", problem)
    for key, path in (("remote.tls_ca", config.remote.tls_ca), ("remote.tls_cert", config.remote.tls_cert),
                      ("remote.tls_key", config.remote.tls_key)):
        if path is not None and config.remote.url is not None and not _readable(path):
            finding(key, f"cannot read {path}")
    return findings


def check_block_size(loaded: LoadedConfig, block_size: int) -> list[Finding]:
    """``chunk_tokens`` against the engine's ``--block-size`` (start-up: ``setup.build_setup``)."""
    chunk_tokens = loaded.config.chunk_tokens
    if chunk_tokens % block_size == 0:
        return []
    return [Finding("chunk_tokens", loaded.sources["chunk_tokens"],
                    f"{chunk_tokens} is not a multiple of the engine's block size {block_size}; "
                    f"use e.g. {block_size * max(1, round(chunk_tokens / block_size))}")]


def check_remote(loaded: LoadedConfig, environ: Mapping[str, str]) -> list[Finding]:
    """One round trip to the remote tier (a prefix lookup of a key nobody stores), as the engine's
    client makes it; a finding when it fails or passes ``remote.timeout_ms``. Nothing is written."""
    remote = loaded.config.remote
    if remote.url is None:
        return []
    from kvtier.tiers.remote import open_remote

    try:
        tier = open_remote(remote.url, ttl_s=remote.ttl_s or None, timeout_s=remote.timeout_ms / 1000,
                           username=remote.username, password=remote.password, tls_ca=remote.tls_ca,
                           tls_cert=remote.tls_cert, tls_key=remote.tls_key, s3_endpoint=remote.s3_endpoint,
                           s3_region=remote.s3_region, access_key=remote.access_key, secret_key=remote.secret_key,
                           sealer=load_sealer(loaded.config.encryption, environ))
    except ConfigError as exc:
        return [Finding(exc.key, loaded.sources.get(exc.key, "default"), str(exc).removeprefix(f"{exc.key}: "))]
    try:
        tier.exists_prefix([bytes(16)], 0, namespace=loaded.config.namespace)
        healthy = tier.healthy
    finally:
        tier.close()
    if healthy:
        return []
    return [Finding("remote.url", loaded.sources["remote.url"],
                    f"no answer from {mask_url(remote.url)}: unreachable, refused (credentials, TLS) or slower "
                    f"than remote.timeout_ms ({remote.timeout_ms} ms); the reason is logged above. The engine "
                    f"would start with the remote tier unhealthy, every remote lookup a miss until it answers")]


def _folder_problem(path: str) -> str | None:
    """Why the folder ``path`` cannot be used for writing (None: it can, or can be created)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"{path} is not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable by this user"
        return None
    parent = _nearest_existing(path)
    if not os.path.isdir(parent):
        return f"{parent} (on the way to {path}) is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} does not exist and cannot be created: {parent} is not writable by this user"
    return None


def _file_problem(path: str) -> str | None:
    """Why the file ``path`` cannot be appended to (None: it can, or can be created)."""
    if os.path.exists(path):
        if os.path.isdir(path) or not os.access(path, os.W_OK):
            return f"cannot write {path}"
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot create {path}: its folder is missing or not writable"
    return None


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _readable(path: str) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False
