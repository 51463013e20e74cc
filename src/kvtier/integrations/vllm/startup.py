"""Scheduler-side start-up: rebuild the disk index from the files, start the metrics endpoint."""

from __future__ import annotations

import logging
import os
from collections import defaultdict

from kvtier.crypto import Sealer, load_sealer
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.metrics import Metrics
from kvtier.tiers.disk import DiskFiles
from kvtier.tiers.remote import RemoteTier

logger = logging.getLogger("kvtier")


def scan_disk(setup: EngineSetup, metrics: Metrics, sealer: Sealer | None) -> list[bytes]:
    """Keys whose entries exist for every rank with the right size, oldest first.

    Entries of the wrong size (truncated by a crash or tampering) are removed and counted; the
    payload checksum is verified later, when an entry is read.
    """
    if setup.disk_dir is None:
        return []
    files = DiskFiles(setup.disk_dir, setup.layout.fingerprint(), sealer=sealer)
    expected = files.entry_bytes(setup.chunk_bytes)
    ranks: dict[bytes, set[int]] = defaultdict(set)
    newest: dict[bytes, float] = {}
    for key, rank, size, mtime in files.scan():
        if size != expected:
            files.delete(key, rank)
            metrics.errors.labels(tier="disk").inc()
            continue
        ranks[key].add(rank)
        newest[key] = max(newest.get(key, 0.0), mtime)
    complete = [key for key, seen in ranks.items() if len(seen) >= setup.world_size]
    complete.sort(key=lambda key: newest[key])
    logger.info("kvtier: disk tier %s holds %d entries", setup.disk_dir, len(complete))
    return complete


def open_remote_tier(setup: EngineSetup, sealer: Sealer | None) -> RemoteTier | None:
    """The configured remote tier, or None. A server that is down is not an error: the tier starts
    unhealthy (a warning is logged) and kvtier runs on its local tiers until it comes back."""
    remote = setup.config.remote
    if remote.url is None:
        return None
    from kvtier.tiers.remote import open_remote

    return open_remote(remote.url, ttl_s=remote.ttl_s or None, timeout_s=remote.timeout_ms / 1000,
                       username=remote.username, password=remote.password, tls_ca=remote.tls_ca,
                       s3_endpoint=remote.s3_endpoint, s3_region=remote.s3_region,
                       access_key=remote.access_key, secret_key=remote.secret_key, sealer=sealer)


def open_sealer(setup: EngineSetup) -> Sealer | None:
    """The entry sealer of this process (each process loads the master key itself; the key never
    crosses a process boundary). None: entries are stored in clear."""
    return load_sealer(setup.config.encryption, os.environ)


def serve_metrics(metrics: Metrics, setup: EngineSetup) -> None:
    port = setup.config.metrics.port
    if port:
        metrics.serve(setup.config.metrics.host, port)
        logger.info("kvtier: metrics on http://%s:%d/metrics", setup.config.metrics.host, port)
