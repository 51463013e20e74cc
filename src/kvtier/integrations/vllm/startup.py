"""Scheduler-side start-up: rebuild the disk index from the files, start the metrics endpoint and
the admin API."""

from __future__ import annotations

import logging
import os
from collections import defaultdict

from kvtier.admin.audit import AuditLog
from kvtier.admin.auth import load_tokens
from kvtier.admin.http import AdminAPI, AdminServer
from kvtier.admin.service import AdminService, StoreShape
from kvtier.compression import KVCodec
from kvtier.crypto import Sealer, load_sealer
from kvtier.errors import ConfigError, LayoutError
from kvtier.integrations.vllm.scheduler import SchedulerSide
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.metrics import Metrics
from kvtier.signing import SigningKey, load_signing_key
from kvtier.store import DiskItem
from kvtier.tiers.disk import DiskFiles
from kvtier.tiers.remote import RemoteTier

logger = logging.getLogger("kvtier")


def scan_disk(setup: EngineSetup, metrics: Metrics, sealer: Sealer | None) -> list[DiskItem]:
    """Entries whose files exist for every shard (``EngineSetup.num_shards``: one per rank, or
    one for MLA) with the right size, oldest first.

    Entries of the wrong size (truncated by a crash or tampering) are removed and counted; the
    payload checksum is verified later, when an entry is read. The files of an entry that some
    rank lacks (a write or read that failed on one tensor-parallel rank, a crash between the
    ranks' writes) are removed: they can never be loaded, and would hold disk space for ever; so
    are the files of shards this engine does not have (written under a larger TP size, or once
    per rank by an MLA engine before MLA chunks were stored once).
    """
    if setup.disk_dir is None:
        return []
    files = DiskFiles(setup.disk_dir, setup.layout.fingerprint(), sealer=sealer)
    expected = files.entry_bytes(setup.chunk_bytes)
    ranks: dict[tuple[bytes, str], set[int]] = defaultdict(set)
    newest: dict[tuple[bytes, str], float] = {}
    for found in files.scan():
        if found.rank >= setup.num_shards:  # another TP size's shard (or MLA's, once per rank): never read
            files.delete([found.key], found.rank, namespace=found.namespace)
            continue
        if found.file_bytes != expected:
            files.delete([found.key], found.rank, namespace=found.namespace)
            metrics.errors.labels(tier="disk").inc()
            continue
        entry = (found.key, found.namespace)
        ranks[entry].add(found.rank)
        newest[entry] = max(newest.get(entry, 0.0), found.mtime)
    every_rank = set(range(setup.num_shards))
    complete = [DiskItem(key, namespace, newest[(key, namespace)])
                for (key, namespace), seen in ranks.items() if every_rank <= seen]
    for (key, namespace), seen in ranks.items():
        if not every_rank <= seen:
            for rank in seen:
                files.delete([key], rank, namespace=namespace)
    complete.sort(key=lambda item: item.created)
    logger.info("kvtier: disk tier %s holds %d entries", setup.disk_dir, len(complete))
    return complete


def open_remote_tier(setup: EngineSetup, sealer: Sealer | None) -> RemoteTier | None:
    """The configured remote tier, or None. A server that is down is not an error: the tier starts
    unhealthy (a warning is logged) and kvtier runs on its local tiers until it comes back."""
    remote = setup.config.remote
    if setup.config.p2p.fetches:  # peers take the remote tier's place (the config refuses both)
        from kvtier.integrations.vllm.peers import open_peer_tier

        return open_peer_tier(setup, sealer)
    if remote.url is None:
        return None
    from kvtier.tiers.remote import open_remote

    return open_remote(remote.url, ttl_s=remote.ttl_s or None, timeout_s=remote.timeout_ms / 1000,
                       username=remote.username, password=remote.password, tls_ca=remote.tls_ca,
                       tls_cert=remote.tls_cert, tls_key=remote.tls_key,
                       s3_endpoint=remote.s3_endpoint, s3_region=remote.s3_region,
                       access_key=remote.access_key, secret_key=remote.secret_key, sealer=sealer,
                       codec=open_codec(setup))


def open_codec(setup: EngineSetup) -> KVCodec | None:
    """The remote tier's compression codec (``remote.compression``), or None. ``ConfigError``
    naming ``remote.compression`` when the engine's KV dtype cannot be compressed."""
    remote = setup.config.remote
    if remote.compression == "none":
        return None
    try:
        return KVCodec(setup.layout, setup.config.chunk_tokens, remote.compression_bits)
    except LayoutError as exc:
        raise ConfigError("remote.compression", f"{exc}; set remote.compression: none") from None


def open_sealer(setup: EngineSetup) -> Sealer | None:
    """The entry sealer of this process (each process loads the master key itself; the key never
    crosses a process boundary). None: entries are stored in clear."""
    return load_sealer(setup.config.encryption, os.environ)


def open_signing_key(setup: EngineSetup) -> SigningKey | None:
    """The key namespace tokens and handoffs must be signed with (``signing.key_file`` or
    ``signing.key_env``); None: requests name their namespace and handoff unchecked."""
    config = setup.config.signing
    return load_signing_key(config.key_file, config.key_env, os.environ)


def serve_metrics(metrics: Metrics, setup: EngineSetup) -> None:
    """Serve kvtier's metrics on ``metrics.port``. A port that is taken (several engines on one
    host with the same setting) is reported, not fatal: the engine serves without it."""
    port = setup.config.metrics.port
    if not port:
        return
    try:
        metrics.serve(setup.config.metrics.host, port)
    except OSError as exc:
        logger.error("kvtier: cannot serve metrics on %s:%d (%s); this engine runs without kvtier's metrics "
                     "endpoint: give each engine on a host its own metrics.port (KVTIER_METRICS_PORT)",
                     setup.config.metrics.host, port, exc.strerror or exc)
        return
    logger.info("kvtier: metrics on http://%s:%d/metrics", setup.config.metrics.host, port)


def serve_admin(scheduler: SchedulerSide, setup: EngineSetup) -> AdminServer | None:
    """Start the admin API when ``admin.port`` is set. Raises ``ConfigError`` for a missing or bad
    tokens file, an audit log that cannot be opened, or a port that is taken."""
    config = setup.config.admin
    if not config.port:
        return None
    tokens = load_tokens(config.tokens_file)
    audit = AuditLog(config.audit_log)
    disk = DiskFiles(setup.disk_dir, setup.layout.fingerprint()) if setup.disk_dir is not None else None
    shape = StoreShape(setup.chunk_tokens, setup.chunk_bytes, setup.num_slots, setup.disk_capacity_entries,
                       setup.num_shards)
    # the engine's books through its KVManager; its own tier handles (a remote tier is used by one
    # thread at a time; deletes need no key)
    service = AdminService(scheduler.lock, scheduler.manager, setup.namespace, shape, disk,
                           open_remote_tier(setup, None))
    server = AdminServer(AdminAPI(service, tokens, audit), config.host, config.port)
    if config.host not in ("127.0.0.1", "::1", "localhost"):
        logger.warning("kvtier: the admin API listens on %s, not on loopback: put TLS in front of it", config.host)
    logger.info("kvtier: admin API on http://%s:%d/v1 (audit log: %s)", config.host, server.port,
                config.audit_log or "the kvtier.audit logger")
    return server
